"""One model per worker process, shared by every DoFn instance and thread in it."""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
_MODELS: dict = {}


def shared_model(model_uri: str | None, device: str | None = None):
    """Load (once per process) and return the model for `model_uri` (None: offline default)."""
    key = (model_uri, device)
    with _LOCK:
        if key not in _MODELS:
            import torch

            from remap_core.checkpoint import load_model

            if torch.get_num_threads() < 1:
                torch.set_num_threads(1)
            _MODELS[key] = load_model(model_uri, device=device)
        return _MODELS[key]
