"""Batching by shape, against a plain reference."""

import numpy as np
import pytest

from remap_core.descriptor.batching import shape_batches


def test_every_position_once_in_batches_of_one_shape():
    rng = np.random.default_rng(0)
    shapes = [(32, 64, 3), (64, 32, 3), (32, 32, 3)]
    images = [np.zeros(shapes[rng.integers(3)], np.uint8) for _ in range(50)]
    batches = list(shape_batches(images, 4))
    assert sorted(i for b in batches for i in b) == list(range(50))
    for b in batches:
        assert 1 <= len(b) <= 4 and len({images[i].shape for i in b}) == 1
    # at most one partial batch per shape
    for s in shapes:
        sizes = [len(b) for b in batches if images[b[0]].shape == s]
        assert sum(1 for n in sizes if n < 4) <= 1


def test_index_selects_positions_and_bad_sizes_are_refused():
    images = [np.zeros((2, 2)), np.zeros((3, 3)), np.zeros((2, 2))]
    assert list(shape_batches(images, 8, index=[2, 0])) == [[2, 0]]
    with pytest.raises(ValueError, match="batch_size"):
        list(shape_batches(images, 0))
