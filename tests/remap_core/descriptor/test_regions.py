"""The R-MAC region grid and the canonical grid that indexes REMAP's per-region weights."""

import math

import numpy as np
import pytest

from remap_core.descriptor.regions import (canonical_region_count, canonical_region_index, region_count,
                                region_grid)


@pytest.mark.parametrize("h,w", [(24, 32), (32, 24)])
def test_32x24_map_has_40_regions_at_four_levels(h, w):
    assert region_count(h, w, 4) == 40
    sides = sorted({r[2] for r in region_grid(h, w, 4)}, reverse=True)
    # side at level l is floor(2 * min(H, W) / (l + 1))
    assert sides == [math.floor(2 * 24 / (l + 1)) for l in range(1, 5)]


@pytest.mark.parametrize("h,w,levels", [(24, 32, 4), (7, 5, 3), (13, 40, 3), (9, 9, 3)])
def test_regions_lie_inside_the_map_and_cover_it(h, w, levels):
    covered = np.zeros((h, w), bool)
    for y, x, rh, rw in region_grid(h, w, levels):
        assert 0 <= y and y + rh <= h and 0 <= x and x + rw <= w
        covered[y:y + rh, x:x + rw] = True
    assert covered.all()


def test_canonical_index_is_identity_on_a_square_map():
    for levels in (1, 3, 4):
        idx = canonical_region_index(16, 16, levels, include_global=True)
        assert idx == tuple(range(canonical_region_count(levels, True)))
        assert canonical_region_count(levels, True) == 1 + sum(l * l for l in range(1, levels + 1))


def test_wide_map_regions_map_to_nearest_canonical_region_of_their_level():
    levels = 4
    idx = canonical_region_index(24, 32, levels, include_global=True)
    grid = region_grid(24, 32, levels)
    assert len(idx) == len(grid) + 1 and idx[0] == 0
    start = {1: 1, 2: 2, 3: 6, 4: 15}
    level_of_side = {math.floor(2 * 24 / (l + 1)): l for l in range(1, levels + 1)}
    for (y, x, h, w), k in zip(grid, idx[1:]):
        level = level_of_side[h]
        assert start[level] <= k < start[level] + level * level
        # reference: nearest of the level's canonical centres on each normalised axis
        side = 2 / (level + 1)
        centres = [0.5] if level == 1 else [side / 2 + i * (1 - side) / (level - 1)
                                            for i in range(level)]
        row = int(np.argmin([abs(c - (y + h / 2) / 24) for c in centres]))
        col = int(np.argmin([abs(c - (x + w / 2) / 32) for c in centres]))
        assert k == start[level] + row * level + col
    # every canonical region is used on this map
    assert set(idx) == set(range(canonical_region_count(levels, True)))
