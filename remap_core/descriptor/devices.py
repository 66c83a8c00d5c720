"""Where the model runs and how many images a forward pass takes there.

`resolve_device` makes the choice explicit (a GPU asked for and absent is an error, not a silent
CPU run); `memory_batch_size` sizes GPU batches from the memory one image's forward pass takes;
`to_device` moves a uint8 batch to the GPU through pinned memory (asynchronous copy, a quarter
of float32's bytes; the conversion to float happens on the GPU).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> str:
    """`"cuda"` when `device` is None or "auto" and a CUDA GPU is visible, else "cpu"; an
    explicit "cuda"/"cuda:N" without a GPU raises ValueError saying what to pass."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device torch knows; pass cpu or cuda "
                         f"(or cuda:N)") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but no CUDA GPU is visible to this process "
                         f"(torch.cuda.is_available() is False); pass --device cpu, or run on "
                         f"a GPU worker (deploy/dataflow/README.md: GPU workers)")
    return device


def device_name(device: str) -> str:
    """A person's name for the device: the GPU's model, or "cpu"."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def to_device(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) numpy -> uint8 tensor on `device`: through pinned (page-locked)
    memory and a non-blocking copy on a GPU, so the copy overlaps the host's next work."""
    tensor = torch.from_numpy(batch)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def memory_batch_size(model, height: int, width: int, requested: int,
                      memory_fraction: float = 0.5, probe: int = 4) -> int:
    """Images of (height, width) per forward pass: `requested`, lowered on a GPU to what
    `memory_fraction` of its free memory holds, measured from the peak memory of a `probe`-image
    forward pass (mixed precision, as embedding runs). On a CPU: `requested`."""
    if requested < 1:
        raise ValueError(f"batch size must be at least 1 (got {requested})")
    device = model.device
    if device.type != "cuda":
        return requested
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.zeros((probe, 3, height, width), device=device)
    with torch.inference_mode(), torch.autocast("cuda"):
        model.forward_multiscale(x)
    torch.cuda.synchronize(device)
    per_image = max(1, (torch.cuda.max_memory_allocated(device) - base) // probe)
    del x
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(free * memory_fraction // per_image)
    chosen = max(1, min(requested, fits))
    log.info("batch size %d at %dx%d on %s (%.0f MiB per image; asked %d, %d fit in %.0f%% of "
             "%.0f MiB free)", chosen, width, height, device_name(str(device)),
             per_image / 2**20, requested, fits, 100 * memory_fraction, free / 2**20)
    return chosen
