"""bench/klw_variants.py: the variants differ from the trained model in the KLW weights only."""

import numpy as np
import pytest
import torch

from script_modules import load_bench

klw_variants = load_bench("klw_variants")


def test_variants_change_only_the_region_weights_as_named(tmp_path):
    from remap_core.descriptor.checkpoint import load_model

    klw_variants.main(["--model", "remap", "--init", "remap", "--out", str(tmp_path)])
    base = load_model("remap", device="cpu")
    w = base.head.region_weights.detach().numpy()
    assert base.head.include_global                           # the default: whole map x 100
    grid, multiple = w[:, 1:], w[:, 0] / w[:, 1:].mean(1)
    got = {n: load_model(str(tmp_path / f"{n}.pt"), device="cpu")
           for n in ("layer-mean", "uniform", "init-klw", "no-grid")}
    weights = {n: m.head.region_weights.detach().numpy() for n, m in got.items()}
    tol = dict(rtol=2e-3)                                     # stored as float16
    np.testing.assert_allclose(weights["layer-mean"][:, 1:],
                               np.repeat(grid.mean(1, keepdims=True), grid.shape[1], 1), **tol)
    np.testing.assert_allclose(weights["uniform"][:, 1:], np.full_like(grid, grid.mean()), **tol)
    np.testing.assert_allclose(weights["init-klw"], w, **tol)
    for name in ("layer-mean", "uniform", "init-klw"):        # the whole map keeps its multiple
        v = weights[name]
        np.testing.assert_allclose(v[:, 0] / v[:, 1:].mean(1), multiple, rtol=5e-3)
    np.testing.assert_allclose(weights["no-grid"][:, 0], w[:, 0], **tol)
    assert (weights["no-grid"][:, 1:] < 1e-3 * w[:, 1:].min()).all()
    base_state = base.state_dict()
    for name, model in got.items():
        assert model.config == base.config
        for k, v in model.state_dict().items():
            if k != "head.klw_raw":
                assert torch.equal(v, base_state[k]), (name, k)
    assert len({m.fingerprint for m in got.values()} | {base.fingerprint}) >= 3


def test_a_head_without_klw_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="KLW variants need REMAP"):
        klw_variants.main(["--model", "gem", "--out", str(tmp_path)])
