"""bench/region_aggregation.py: its numpy re-aggregation of stored region vectors is the REMAP
head's, and its whitening step is the model's, so its variants score what the product embeds."""

import numpy as np
import torch

from script_modules import load_bench

region_aggregation = load_bench("region_aggregation")


def test_stored_regions_re_aggregate_to_the_model_s_own_descriptors():
    from remap_core.descriptor.checkpoint import load_model
    from remap_core.descriptor.pooling import resize_batch
    from remap_core.fitting.klw import weigh_whole_map

    model = load_model("remap-lite0-v1", device="cpu").float().eval()   # trained, 3 scales
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (128, 192, 3), dtype=np.uint8) for _ in range(3)] + \
             [rng.integers(0, 255, (192, 128, 3), dtype=np.uint8)]        # two shapes
    regs, idx = region_aggregation.region_vectors(model, arrays)
    w = model.head.region_weights.detach().numpy()
    pooled = region_aggregation.aggregate(regs, idx, w)
    x = [torch.from_numpy(a).permute(2, 0, 1)[None].float() for a in arrays]
    with torch.no_grad():
        for si, s in enumerate(model.config["scales"]):
            want = torch.cat([model.pooled(resize_batch(xi, s)) for xi in x]).numpy()
            np.testing.assert_allclose(pooled[si], want, rtol=1e-4, atol=1e-5)
        # the model's whitening, as the script reads it back, gives the model's embedding
        W = model.whiten.weight.numpy().astype(np.float64)
        mean = np.linalg.lstsq(W, -model.whiten.bias.numpy(), rcond=None)[0]
        got = region_aggregation.describe(pooled, mean, W)
        np.testing.assert_allclose(got, model.embed_arrays(arrays), atol=1e-4)
        # a whole-map weight changes the whole-map region's term only
        w10 = weigh_whole_map(w, 10.0)
        diff = region_aggregation.aggregate(regs, idx, w10) - pooled
        whole = np.stack([np.concatenate([r[0] for r in regs[0, i]])     # already L2-normalised
                          for i in range(len(arrays))])
        scale = np.concatenate([np.full(r.shape[1], w10[l, 0] - w[l, 0])
                                for l, r in enumerate(regs[0, 0])])
        np.testing.assert_allclose(diff[0], whole * scale, rtol=1e-4, atol=1e-5)


def test_gem_regions_pool_each_region_by_its_generalised_mean_and_leave_max_in_place():
    from remap_core.descriptor import pooling
    from remap_core.descriptor.checkpoint import load_model
    from remap_core.descriptor.regions import region_grid

    model = load_model("remap-lite0-v1", device="cpu").float().eval()
    arrays = [np.random.default_rng(1).integers(0, 255, (128, 160, 3), dtype=np.uint8)]
    max_pool = pooling.region_max_pool
    regs, idx = region_aggregation.region_vectors(model, arrays, gem_p=3.0)
    assert pooling.region_max_pool is max_pool                   # restored
    max_regs, max_idx = region_aggregation.region_vectors(model, arrays)
    assert [list(i) for i in idx[0, 0]] == [list(i) for i in max_idx[0, 0]]
    with torch.no_grad():
        feats = model.features(torch.from_numpy(arrays[0]).permute(2, 0, 1)[None].float())
    f = feats[-1][0].clamp(min=1e-6).double()
    y, x, h, w = region_grid(int(f.shape[-2]), int(f.shape[-1]), model.head.levels)[0]
    want = f[:, y:y + h, x:x + w].pow(3).mean(dim=(-2, -1)).pow(1 / 3).numpy()
    got = regs[0, 0, -1][1]                                      # region 0 of the grid
    np.testing.assert_allclose(got, want / np.linalg.norm(want), rtol=1e-3, atol=1e-5)
    assert not np.allclose(got, max_regs[0, 0, -1][1], atol=1e-3)


def test_the_held_out_collection_must_be_given_whole():
    import pytest

    for argv in (["--photos", "x/*.png"], ["--standard", "--backgrounds", "y/*.jpg"], []):
        with pytest.raises(SystemExit):
            region_aggregation.main(argv)
