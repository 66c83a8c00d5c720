"""Pooling maths as pure functions on (B, C, H, W) feature maps. Modules live in heads.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from remap_core.descriptor.regions import region_grid

EPS = 1e-6


def l2n(x: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """L2-normalise along `dim`."""
    return x / (x.norm(p=2, dim=dim, keepdim=True) + eps)


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions: (B, C, H, W) -> (B, C)."""
    return x.amax(dim=(-2, -1))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Sum-pooled (here: average-pooled) convolutional features: (B, C, H, W) -> (B, C)."""
    return x.mean(dim=(-2, -1))


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = EPS) -> torch.Tensor:
    """Generalised mean pooling (Radenović et al.): (B, C, H, W) -> (B, C)."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def region_pool(x: torch.Tensor, levels: int = 3, include_global: bool = False,
                pool=mac) -> torch.Tensor:
    """Pool every region of the R-MAC grid with `pool` ((B, C, h, w) -> (B, C)):
    (B, C, H, W) -> (B, R, C).

    With `include_global` the whole map is region 0 (as in R-MAC); otherwise only the grid.
    """
    h, w = x.shape[-2:]
    grid = region_grid(int(h), int(w), levels)
    pooled = [pool(x[..., y:y + rh, xx:xx + rw]) for (y, xx, rh, rw) in grid]
    if include_global or not pooled:
        pooled.insert(0, pool(x))
    return torch.stack(pooled, dim=1)


def region_max_pool(x: torch.Tensor, levels: int = 3, include_global: bool = False) -> torch.Tensor:
    """Max-pool every region of the R-MAC grid (REMAP's and R-MAC's regional pooling):
    (B, C, H, W) -> (B, R, C)."""
    return region_pool(x, levels, include_global, mac)


def weighted_region_sum(regions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """REMAP aggregation of one layer: L2-normalise each region vector, scale it by its
    non-negative weight and sum over regions: (B, R, C), (R,) -> (B, C)."""
    return (l2n(regions) * weights.view(1, -1, 1)).sum(dim=1)


def rmac(x: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """R-MAC without per-region PCA: sum of L2-normalised region MACs, L2-normalised. -> (B, C)."""
    return l2n(l2n(region_max_pool(x, levels, include_global=True)).sum(dim=1))


def resize_batch(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear resize of an image batch by `scale` (multi-scale inference)."""
    if scale == 1.0:
        return x
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False,
                         antialias=scale < 1.0)
