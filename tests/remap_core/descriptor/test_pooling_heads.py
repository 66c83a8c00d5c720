"""Pooling heads (MAC, SPoC, GeM, R-MAC, REMAP) against numpy references, and the REMAP model
end to end: multi-scale inference and checkpoint round trip with KLW + whitening."""

import numpy as np
import pytest
import torch

from remap_core.descriptor import pooling as P
from remap_core.descriptor.checkpoint import load_model, save_checkpoint
from remap_core.descriptor.heads import REMAPHead, build_head
from remap_core.descriptor.model import REMAP_SCALES, build_model
from remap_core.descriptor.regions import canonical_region_index, region_grid
from remap_core.fitting.whiten import pca_whitening, set_model_whitening


def _l2(v, axis=-1):
    return v / (np.linalg.norm(v, axis=axis, keepdims=True) + 1e-6)


def _regions_np(f, levels, include_global=True):
    """(C, H, W) -> (R, C): whole-map max then max over each R-MAC region."""
    out = [f.max(axis=(1, 2))] if include_global else []
    for y, x, h, w in region_grid(f.shape[1], f.shape[2], levels):
        out.append(f[:, y:y + h, x:x + w].max(axis=(1, 2)))
    return np.stack(out)


def test_region_max_pool_matches_numpy():
    x = torch.rand(2, 5, 9, 13)
    got = P.region_max_pool(x, 3, include_global=True).numpy()
    for b in range(2):
        np.testing.assert_allclose(got[b], _regions_np(x[b].numpy(), 3), rtol=1e-6)


def test_global_heads_match_numpy():
    x = torch.rand(3, 4, 6, 7)
    xn = x.numpy()
    np.testing.assert_allclose(build_head("mac", [4])([x]).numpy(), _l2(xn.max(axis=(2, 3))),
                               rtol=1e-5)
    np.testing.assert_allclose(build_head("spoc", [4])([x]).numpy(), _l2(xn.mean(axis=(2, 3))),
                               rtol=1e-5)
    gem = np.mean(np.clip(xn, 1e-6, None) ** 3, axis=(2, 3)) ** (1 / 3)
    np.testing.assert_allclose(build_head("gem", [4], p=3.0)([x]).numpy(), _l2(gem), rtol=1e-4)


def test_remap_head_matches_numpy_weighted_region_sum_over_two_layers():
    torch.manual_seed(0)
    feats = [torch.rand(2, 6, 10, 14), torch.rand(2, 4, 5, 7)]
    head = REMAPHead([6, 4], levels=3)
    weights = np.random.RandomState(0).uniform(0.1, 3.0, (2, head.n_regions))
    head.set_region_weights(weights)
    got = head(feats).detach().numpy()
    for b in range(2):
        parts = []
        for layer, f in enumerate(feats):
            f = f[b].numpy()
            idx = canonical_region_index(f.shape[1], f.shape[2], 3, True)
            regions = _l2(_regions_np(f, 3))
            parts.append((regions * weights[layer, list(idx)][:, None]).sum(0))
        np.testing.assert_allclose(got[b], np.concatenate(parts), rtol=1e-4)
    assert head.out_dim == 10


def test_remap_layer_norm_normalises_each_layer_then_scales_it_by_its_learned_weight():
    torch.manual_seed(1)
    feats = [torch.rand(2, 6, 10, 14), torch.rand(2, 4, 5, 7)]
    head = REMAPHead([6, 4], levels=3, layer_norm=True)
    weights = np.random.RandomState(1).uniform(0.1, 3.0, (2, head.n_regions))
    head.set_region_weights(weights)
    with torch.no_grad():
        head.layer_raw.copy_(REMAPHead._inverse_softplus(torch.tensor([0.5, 2.0])))
    got = head(feats).detach().numpy()
    for b in range(2):
        parts = []
        for layer, (f, lw) in enumerate(zip(feats, (0.5, 2.0))):
            f = f[b].numpy()
            idx = canonical_region_index(f.shape[1], f.shape[2], 3, True)
            v = (_l2(_regions_np(f, 3)) * weights[layer, list(idx)][:, None]).sum(0)
            parts.append(_l2(v) * lw)
        np.testing.assert_allclose(got[b], np.concatenate(parts), rtol=1e-4)
    # the layer weights are trained: they get gradients
    head(feats).sum().backward()
    assert head.layer_raw.grad is not None and torch.all(head.layer_raw.grad != 0)
    # without layer_norm there is no such parameter and the weights read as 1
    assert not hasattr(REMAPHead([6, 4]), "layer_raw")
    assert REMAPHead([6, 4]).layer_weights.tolist() == [1.0, 1.0]


def test_remap_with_uniform_weights_and_one_layer_is_rmac():
    x = torch.rand(2, 8, 9, 12)
    remap = REMAPHead([8], levels=3)
    remap.set_region_weights(np.ones((1, remap.n_regions)))
    rmac = build_head("rmac", [8], levels=3)
    np.testing.assert_allclose(P.l2n(remap([x])).detach().numpy(), rmac([x]).numpy(), atol=1e-5)


def test_klw_weights_stay_positive_and_receive_gradients():
    head = REMAPHead([3], levels=2)
    head.set_region_weights(np.array([[0.0, 0.5, 2.0, 30.0, 1.0, 1.0]]))
    np.testing.assert_allclose(head.region_weights.detach().numpy(),
                               [[1e-6, 0.5, 2.0, 30.0, 1.0, 1.0]], rtol=1e-4, atol=1e-7)
    head([torch.rand(1, 3, 6, 8)]).sum().backward()
    assert head.klw_raw.grad is not None and head.klw_raw.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="non-negative"):
        head.set_region_weights(-np.ones((1, head.n_regions)))
    with pytest.raises(ValueError, match="shape"):
        head.set_region_weights(np.ones((2, 3)))


def test_remap_head_handles_variable_image_sizes_including_tiny_maps():
    head = REMAPHead([4], levels=3)
    for h, w in [(1, 1), (2, 3), (7, 5), (14, 30)]:
        out = head([torch.rand(1, 4, h, w)])
        assert out.shape == (1, 4) and torch.isfinite(out).all()


def test_remap_config_defaults_to_three_scales_and_multiscale_is_sum_of_scales():
    model = build_model({"head": "remap", "taps": ["stage5", "head"]}).eval()
    assert model.config["scales"] == pytest.approx(REMAP_SCALES)
    assert model.config["head_args"]["levels"] == 3
    x = torch.rand(2, 3, 96, 128) * 255
    with torch.no_grad():
        got = model.forward_multiscale(x)
        ref = sum(model(P.resize_batch(x, s)) for s in REMAP_SCALES)
    np.testing.assert_allclose(got.numpy(), P.l2n(ref).numpy(), atol=1e-5)
    assert got.shape == (2, 112 + 1280)


def test_remap_model_with_klw_and_whitening_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model({"head": "remap", "taps": ["stage6", "head"], "scales": [1.0]}).eval()
    rng = np.random.RandomState(0)
    model.head.set_region_weights(rng.uniform(0.1, 2, (2, model.head.n_regions)))
    x = torch.rand(5, 3, 64, 96) * 255
    with torch.no_grad():
        pooled = model.pooled(x).numpy()
    set_model_whitening(model, *pca_whitening(pooled, dim=3))
    with torch.no_grad():
        before = model.forward_multiscale(x).numpy()
    fp = save_checkpoint(model, str(tmp_path / "remap.pt"))
    loaded = load_model(str(tmp_path / "remap.pt"), device="cpu")
    assert loaded.fingerprint == fp and loaded.dim == 3
    np.testing.assert_allclose(loaded.head.region_weights.detach().numpy(),
                               model.head.region_weights.detach().numpy(), rtol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(loaded.forward_multiscale(x).numpy(), before, atol=1e-5)
