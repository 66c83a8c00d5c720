"""Checkpoints (weights + config + fingerprint in one file) and the one model fingerprint.

`load_model(path_or_url)` rebuilds a model with no other argument; `load_model(None)` gives the
bundled offline default (EfficientNet-Lite0 ImageNet weights, GeM head).
"""

from __future__ import annotations

import hashlib
import io
import json

import torch

from remap_core.descriptor.model import RetrievalNet, build_model, make_config

CHECKPOINT_FORMAT = "remap-checkpoint/1"


def model_fingerprint(model: RetrievalNet) -> str:
    """Architecture + weights + preprocessing, as `<backbone>.<head>.d<dim>.<sha256[:16]>`."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    cfg = model.config
    return f"{cfg['backbone']}.{cfg['head']}.d{model.dim}.{h.hexdigest()[:16]}"


def save_checkpoint(model: RetrievalNet, path_or_url: str, extra: dict | None = None) -> str:
    """Write weights, config and fingerprint to one file (local path or fsspec URL).

    Written to a temporary name and renamed (`remap_store.files`). Returns the fingerprint.
    """
    from remap_store.files import write_bytes_atomic

    fp = model_fingerprint(model)
    blob = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "config": model.config, "fingerprint": fp,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "extra": extra or {}}, blob)
    write_bytes_atomic(path_or_url, blob.getvalue())
    return fp


def read_checkpoint(path_or_url: str) -> dict:
    """The raw checkpoint dict, validated for format."""
    import fsspec

    try:
        with fsspec.open(path_or_url, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model checkpoint not found: {path_or_url}") from e
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path_or_url} is not a readable remap checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path_or_url} is not a remap checkpoint (expected format "
                         f"{CHECKPOINT_FORMAT}); make one with `remap train` or save_checkpoint")
    return ckpt


def load_model(path_or_url: str | None = None, device: str | None = None) -> RetrievalNet:
    """Rebuild a model from a checkpoint (or the offline default when None), in eval mode, on
    `device` (None: a CUDA GPU when one is visible, else the CPU; "cuda" without one: ValueError).

    The stored fingerprint is checked against the loaded weights, so a damaged or edited file is
    refused rather than silently producing different embeddings.
    """
    if path_or_url is None:
        model = build_model()
    else:
        ckpt = read_checkpoint(path_or_url)
        model = build_model(make_config(**ckpt["config"]), backbone_weights=None)
        model.load_state_dict(ckpt["state_dict"])
        got = model_fingerprint(model)
        if got != ckpt["fingerprint"]:
            raise ValueError(f"checkpoint {path_or_url} fingerprint {ckpt['fingerprint']} does not "
                             f"match its weights ({got}); the file is damaged or was edited")
    from remap_core.descriptor.devices import resolve_device

    model.to(resolve_device(device)).eval()
    model.fingerprint = model_fingerprint(model) if path_or_url is None else ckpt["fingerprint"]
    return model
