"""The R-MAC region grid (Tolias, Sicre & Jégou, ICLR 2016), as pure functions.

Square regions at L scales; at scale l the side is floor(2 * min(H, W) / (l + 1)) and regions are
spaced so consecutive ones overlap by about 40 %. The number of regions along the long side is
chosen so that the overlap is closest to 40 %, exactly as in the reference implementations.
"""

from __future__ import annotations

import math
from functools import lru_cache

OVERLAP = 0.4


def _long_side_extra(height: int, width: int, overlap: float = OVERLAP) -> tuple[int, int]:
    """Extra regions (Wd, Hd) along the long side, chosen for the overlap closest to `overlap`."""
    w = min(height, width)
    if height == width or w == 0:
        return 0, 0
    best, best_err = 0, float("inf")
    for i, steps in enumerate(range(2, 8)):
        b = (max(height, width) - w) / (steps - 1)
        err = abs((w * w - w * b) / (w * w) - overlap)
        if err < best_err:
            best, best_err = i, err
    extra = best + 1
    return (extra, 0) if height < width else (0, extra)


@lru_cache(maxsize=256)
def region_grid(height: int, width: int, levels: int = 3) -> tuple[tuple[int, int, int, int], ...]:
    """Regions of an (height, width) feature map as (y, x, h, w) tuples, coarse scale first.

    The whole-map region is not included (heads add it when they want it).
    For a 24x32 map (H=24, W=32) at levels=4 this yields 2 + 6 + 12 + 20 = 40 regions.
    """
    if height < 1 or width < 1:
        raise ValueError(f"feature map must be at least 1x1, got {height}x{width}")
    wd, hd = _long_side_extra(height, width)
    w = min(height, width)
    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * w / (level + 1))
        if side == 0:
            continue
        half = math.floor(side / 2 - 1)
        nx, ny = level + wd, level + hd
        bx = 0.0 if nx == 1 else (width - side) / (nx - 1)
        by = 0.0 if ny == 1 else (height - side) / (ny - 1)
        xs = [int(math.floor(half + i * bx) - half) for i in range(nx)]
        ys = [int(math.floor(half + j * by) - half) for j in range(ny)]
        for y in ys:
            for x in xs:
                regions.append((y, x, side, side))
    return tuple(regions)


def region_count(height: int, width: int, levels: int = 3) -> int:
    """Number of regions `region_grid` yields for an (height, width) map."""
    return len(region_grid(height, width, levels))
