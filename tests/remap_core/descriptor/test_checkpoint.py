"""Checkpoints carry weights, config and fingerprint; loading needs no other argument."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from remap_core.descriptor.checkpoint import load_model, model_fingerprint, read_checkpoint, save_checkpoint
from remap_core.descriptor.model import build_model


def test_checkpoint_round_trip_gives_identical_embeddings(tmp_path):
    model = build_model({"max_side": 64, "head": "rmac", "head_args": {}})
    path = str(tmp_path / "m.pt")
    fp = save_checkpoint(model, path)
    loaded = load_model(path, device="cpu")
    assert loaded.fingerprint == fp == model_fingerprint(model)
    assert loaded.config == model.config
    x = [np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)]
    np.testing.assert_array_equal(loaded.embed_arrays(x), model.eval().embed_arrays(x))


def test_fingerprint_changes_with_weights_and_with_preprocessing():
    a = build_model({"max_side": 64})
    b = build_model({"max_side": 96})
    assert model_fingerprint(a) != model_fingerprint(b)
    c = build_model({"max_side": 64})
    assert model_fingerprint(a) == model_fingerprint(c)
    with torch.no_grad():
        next(c.parameters()).add_(1e-3)
    assert model_fingerprint(a) != model_fingerprint(c)


def test_edited_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "m.pt")
    save_checkpoint(build_model({"max_side": 64}), path)
    ckpt = read_checkpoint(path)
    first = next(iter(ckpt["state_dict"]))
    ckpt["state_dict"][first] = ckpt["state_dict"][first] + 1
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="does not match its weights"):
        load_model(path)


def test_not_a_checkpoint_gets_a_clear_error(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not torch")
    with pytest.raises(ValueError, match="not a readable remap checkpoint"):
        load_model(str(path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "missing.pt"))


def test_unknown_config_key_is_an_error():
    with pytest.raises(ValueError, match="unknown model config key"):
        build_model({"max_sid": 64})


def test_the_default_model_is_the_shipped_trained_remap_checkpoint():
    from remap_core.descriptor.checkpoint import (DEFAULT_MODEL, MODEL_ALIASES, model_name,
                                                  read_checkpoint, shipped_model_path)

    path = shipped_model_path()
    ckpt = read_checkpoint(path)
    model = load_model(None, device="cpu")
    assert model.config["head"] == "remap" and len(model.config["taps"]) >= 2
    assert model.config["whiten_dim"] and len(model.config["scales"]) == 3
    assert model.fingerprint == ckpt["fingerprint"]
    assert "trained" in ckpt["extra"]                # a trained model, not an initialisation
    # every name of it loads the same model, and the recorded name is the versioned one
    assert load_model("remap", device="cpu").fingerprint == model.fingerprint
    assert load_model(DEFAULT_MODEL, device="cpu").fingerprint == model.fingerprint
    assert model_name(None) == model_name("remap") == DEFAULT_MODEL == MODEL_ALIASES["remap"]
    # it ships as float16: a few MB
    import os
    assert os.path.getsize(path) < 12e6


def test_baseline_names_build_the_untrained_heads_and_gem_is_the_former_default():
    from remap_core.descriptor.checkpoint import model_hint

    gem = load_model("gem", device="cpu")
    assert gem.config["head"] == "gem" and gem.dim == 1280
    assert gem.fingerprint == model_fingerprint(build_model())   # the pre-REMAP default
    assert load_model("rmac", device="cpu").config["head"] == "rmac"
    assert model_hint(gem.fingerprint) == "gem"
    assert model_hint(load_model(None, device="cpu").fingerprint) == "remap-lite0-v4"
    assert model_hint("efficientnet_lite0.gem.d1280.0000000000000000") == ""


def test_a_half_precision_checkpoint_loads_to_the_fingerprint_it_was_saved_with(tmp_path):
    torch.manual_seed(0)
    model = build_model({"head": "remap", "taps": ["stage5", "head"], "whiten_dim": 64},
                        backbone_weights=None).eval()
    x = torch.rand(2, 3, 96, 128) * 255
    before = model(x).detach()
    save_checkpoint(model, str(tmp_path / "m32.pt"))
    fp = save_checkpoint(model, str(tmp_path / "m.pt"), half=True)
    assert os.path.getsize(tmp_path / "m.pt") < 0.6 * os.path.getsize(tmp_path / "m32.pt")
    loaded = load_model(str(tmp_path / "m.pt"), device="cpu")
    assert loaded.fingerprint == fp == model_fingerprint(model)
    torch.testing.assert_close(loaded(x), model(x))
    assert torch.allclose(before, loaded(x), atol=2e-3)   # rounding to float16 moves it little


def test_the_trained_gem_baseline_ships_beside_the_default_and_is_named_back():
    from remap_core.descriptor.checkpoint import model_hint, read_checkpoint, shipped_model_path

    path = shipped_model_path("gem-lite0-v1")
    ckpt = read_checkpoint(path)
    model = load_model("gem-lite0-v1", device="cpu")
    assert model.config["head"] == "gem" and model.config["whiten_dim"] == 256
    assert model.config["max_side"] == load_model(None, device="cpu").config["max_side"]
    assert "trained" in ckpt["extra"] and model.fingerprint == ckpt["fingerprint"]
    assert model_hint(model.fingerprint) == "gem-lite0-v1"
    assert load_model(None, device="cpu").fingerprint != model.fingerprint   # not the default


def test_remap_lite0_v1_still_ships_and_differs_from_v2_only_by_the_final_step():
    """remap-lite0-v1 stays loadable (stores and indexes built with it name it back); v2 is the
    same trained network with the whole map weighed 100x the grid's mean and a refitted
    whitening."""
    from remap_core.descriptor.checkpoint import model_hint, read_checkpoint, shipped_model_path

    v1, v2 = load_model("remap-lite0-v1", device="cpu"), load_model("remap-lite0-v2", device="cpu")
    assert model_hint(v1.fingerprint) == "remap-lite0-v1" != model_hint(v2.fingerprint)
    assert v1.fingerprint != v2.fingerprint and v1.config == v2.config
    for (name, a), b in zip(v1.backbone.state_dict().items(), v2.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    w1, w2 = (m.head.region_weights.detach().float() for m in (v1, v2))
    torch.testing.assert_close(w2[:, 1:], w1[:, 1:], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(w2[:, 0], 100 * w1[:, 1:].mean(dim=1), rtol=1e-2, atol=1e-2)
    assert not torch.allclose(v1.whiten.weight, v2.whiten.weight)
    final = read_checkpoint(shipped_model_path("remap-lite0-v2"))["extra"]["trained"]["final"]
    assert final["whole_map_weight"] == 100.0 and final["final_whitening"] == "pca"


def test_the_default_is_v4_and_the_former_defaults_stay_loadable():
    """remap-lite0-v4, the default, is v3's architecture, photos and recipe (final step included)
    trained on new views every epoch; v3, v2 and v1 still load and are named back, never mixed
    with it."""
    from remap_core.descriptor.checkpoint import model_hint, read_checkpoint, shipped_model_path

    v4 = load_model(None, device="cpu")
    assert load_model("remap", device="cpu").fingerprint == v4.fingerprint
    assert model_hint(v4.fingerprint) == "remap-lite0-v4"
    for name in ("remap-lite0-v3", "remap-lite0-v2", "remap-lite0-v1"):
        old = load_model(name, device="cpu")
        assert model_hint(old.fingerprint) == name and old.fingerprint != v4.fingerprint
        assert old.config == v4.config
    trained = read_checkpoint(shipped_model_path("remap-lite0-v4"))["extra"]["trained"]
    assert trained["final"]["whole_map_weight"] == 100.0
    assert trained["final"]["final_whitening"] == "pca"
    assert "83 training photos" in trained["source"]     # v2: 62
    assert "new views every epoch" in trained["source"]  # v3: one draw for all epochs
    v3 = read_checkpoint(shipped_model_path("remap-lite0-v3"))["extra"]["trained"]
    assert "83 training photos" in v3["source"] and "new views" not in v3["source"]


def test_export_sets_the_test_time_scales_and_the_fingerprint_follows(tmp_path):
    from remap_core.descriptor.checkpoint import export_model
    from remap_core.descriptor.pooling import l2n, resize_batch

    torch.manual_seed(0)
    model = build_model({"head": "remap", "taps": ["stage5", "head"], "whiten_dim": 32},
                        backbone_weights=None).eval()
    save_checkpoint(model, str(tmp_path / "m.pt"))
    same = export_model(str(tmp_path / "m.pt"), str(tmp_path / "same.pt"), half=False)
    up = export_model(str(tmp_path / "m.pt"), str(tmp_path / "up.pt"), half=False,
                      scales=[2 ** 0.5, 1.0, 2 ** -0.5, 0.5])
    assert same == load_model(str(tmp_path / "m.pt"), device="cpu").fingerprint
    assert up != same                        # vectors at other scales must not mix
    loaded = load_model(str(tmp_path / "up.pt"), device="cpu")
    assert loaded.config["scales"] == [2 ** 0.5, 1.0, 2 ** -0.5, 0.5]
    assert read_checkpoint(str(tmp_path / "up.pt"))["extra"]["exported"]["scales"] == \
        loaded.config["scales"]
    x = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        expected = l2n(sum(model(resize_batch(x, s)) for s in loaded.config["scales"]))
        torch.testing.assert_close(loaded.forward_multiscale(x), expected)


@pytest.mark.parametrize("scales, match", [([], "distinct positive"), ([1.0, 0.0], "distinct positive"),
                                           ([1.0, 1.0], "distinct positive"),
                                           ([1.0, 0.05], "under 32 px")])
def test_export_refuses_scales_the_network_cannot_use(tmp_path, scales, match):
    from remap_core.descriptor.checkpoint import export_model

    model = build_model({"head": "gem"}, backbone_weights=None).eval()
    save_checkpoint(model, str(tmp_path / "m.pt"))
    with pytest.raises(ValueError, match=match):
        export_model(str(tmp_path / "m.pt"), str(tmp_path / "out.pt"), scales=scales)
    assert not (tmp_path / "out.pt").exists()


def test_parse_scales_reads_fractions_and_square_roots():
    from remap_core.descriptor.model import parse_scales

    assert parse_scales("sqrt(2),1,1/sqrt(2),1/2") == pytest.approx([2 ** 0.5, 1, 2 ** -0.5, 0.5])
    with pytest.raises(ValueError, match="sqrt"):
        parse_scales("__import__('os')")
    with pytest.raises(ValueError, match="positive"):
        parse_scales("1,0")
