"""bench/inference_scales.py: a set of scales composed from single-scale descriptors is the
model's own multi-scale descriptor, stored descriptors are reused, and variants parse."""

import numpy as np
import pytest

from script_modules import load_bench

scales_bench = load_bench("inference_scales")


def test_variants_parse_and_bad_ones_are_refused():
    assert scales_bench.parse_variant("shipped=1,0.7071,0.5") == (
        "shipped", [1.0, 0.7071, 0.5], [1.0, 0.7071, 0.5])
    assert scales_bench.parse_variant("q=1.4142,1/1") == ("q", [1.4142, 1.0], [1.0])
    for bad in ("1,0.5", "=1", "x=", "x=0,1", "x=1/-1"):
        with pytest.raises(ValueError):
            scales_bench.parse_variant(bad)


def test_composed_scales_are_the_models_multiscale_descriptor(tmp_path, monkeypatch):
    from remap_core.descriptor.checkpoint import load_model

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(3)]
    model = load_model("remap", device="cpu")
    own = model.embed_arrays(arrays)
    scales = list(model.config["scales"])
    desc = scales_bench.per_scale(model, arrays, scales + [2 ** 0.5], str(tmp_path), "abc")
    assert len(list(tmp_path.iterdir())) == 4
    assert model.config["scales"] == scales            # left as they were
    np.testing.assert_allclose(scales_bench.compose(desc, scales), own, atol=1e-5)
    # a second call reads the stored files instead of embedding again
    monkeypatch.setattr(model, "embed_arrays", lambda *a, **k: pytest.fail("embedded again"))
    again = scales_bench.per_scale(model, arrays, scales, str(tmp_path), "abc")
    for s in scales:
        np.testing.assert_array_equal(again[s], desc[s])
