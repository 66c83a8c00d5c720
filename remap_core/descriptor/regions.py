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
def _grid_by_level(height: int, width: int, levels: int
                   ) -> tuple[tuple[int, tuple[tuple[int, int, int, int], ...]], ...]:
    """((level, regions of that level), ...) for levels whose region side is at least 1."""
    if height < 1 or width < 1:
        raise ValueError(f"feature map must be at least 1x1, got {height}x{width}")
    wd, hd = _long_side_extra(height, width)
    w = min(height, width)
    out = []
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
        out.append((level, tuple((y, x, side, side) for y in ys for x in xs)))
    return tuple(out)


def region_grid(height: int, width: int, levels: int = 3) -> tuple[tuple[int, int, int, int], ...]:
    """Regions of an (height, width) feature map as (y, x, h, w) tuples, coarse scale first.

    The whole-map region is not included (heads add it when they want it).
    For a 24x32 map (H=24, W=32) at levels=4 this yields 2 + 6 + 12 + 20 = 40 regions.
    """
    return tuple(r for _, regs in _grid_by_level(height, width, levels) for r in regs)


def region_count(height: int, width: int, levels: int = 3) -> int:
    """Number of regions `region_grid` yields for an (height, width) map."""
    return len(region_grid(height, width, levels))


# --------------------------------------------------------------------------- canonical grid
#
# The number of regions depends on the map's size and aspect, but per-region weights (KLW) must
# be a fixed set of parameters. They are indexed by a *canonical* grid: the grid of a square map,
# i.e. l x l regions at level l (plus, optionally, the whole map as index 0). A region of an
# actual map takes the weight of the canonical region of the same level whose centre is nearest
# to its own centre, in coordinates normalised to [0, 1] on each axis. On a square map the
# mapping is the identity; on a wide map the extra columns share the weights of their nearest
# canonical column.

def canonical_region_count(levels: int, include_global: bool = True) -> int:
    """Size of the canonical grid: 1 (whole map, if included) + sum of l*l for l = 1..levels."""
    return int(include_global) + sum(l * l for l in range(1, levels + 1))


def _canonical_centres(level: int) -> list[float]:
    side = 2.0 / (level + 1)
    if level == 1:
        return [0.5]
    return [side / 2 + i * (1.0 - side) / (level - 1) for i in range(level)]


@lru_cache(maxsize=256)
def canonical_region_index(height: int, width: int, levels: int = 3,
                           include_global: bool = True) -> tuple[int, ...]:
    """For each region of the (height, width) map, in the order heads pool them (the whole map
    first when `include_global`, then `region_grid`), its index in the canonical grid."""
    out = [0] if include_global else []
    offset = int(include_global)
    level_start = {}
    for level in range(1, levels + 1):
        level_start[level] = offset
        offset += level * level
    for level, regs in _grid_by_level(height, width, levels):
        centres = _canonical_centres(level)
        for (y, x, h, w) in regs:
            cy, cx = (y + h / 2) / height, (x + w / 2) / width
            row = min(range(level), key=lambda i: abs(centres[i] - cy))
            col = min(range(level), key=lambda i: abs(centres[i] - cx))
            out.append(level_start[level] + row * level + col)
    return tuple(out)
