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
    got = {n: load_model(str(tmp_path / f"{n}.pt"), device="cpu")
           for n in ("layer-mean", "uniform", "init-klw")}
    tol = dict(rtol=2e-3)                                     # stored as float16
    lm = got["layer-mean"].head.region_weights.detach().numpy()
    np.testing.assert_allclose(lm, np.repeat(w.mean(1, keepdims=True), w.shape[1], 1), **tol)
    np.testing.assert_allclose(got["uniform"].head.region_weights.detach().numpy(),
                               np.full_like(w, w.mean()), **tol)
    np.testing.assert_allclose(got["init-klw"].head.region_weights.detach().numpy(), w, **tol)
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
