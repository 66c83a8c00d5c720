"""Checkpoints carry weights, config and fingerprint; loading needs no other argument."""

from __future__ import annotations

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
