"""One model per worker process, shared by every DoFn instance and thread in it."""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
_MODELS: dict = {}


def set_torch_threads(torch_threads: int | None) -> None:
    """torch's intra-op threads for this process; None leaves torch's default (OMP_NUM_THREADS,
    else the core count) alone."""
    if torch_threads is None:
        return
    if torch_threads < 1:
        raise ValueError(f"torch_threads must be at least 1, got {torch_threads}")
    import torch

    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)


def shared_model(model_uri: str | None, device: str | None = None,
                 torch_threads: int | None = None):
    """Load (once per process) and return the model for `model_uri` (None: offline default).
    `torch_threads` (process-wide) is applied on every call, loaded model or not."""
    key = (model_uri, device)
    with _LOCK:
        set_torch_threads(torch_threads)
        if key not in _MODELS:
            from remap_core.descriptor.checkpoint import load_model

            _MODELS[key] = load_model(model_uri, device=device)
        return _MODELS[key]
