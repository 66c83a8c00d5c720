"""Batches of equally shaped images: images keep their aspect ratio (no cropping), so a batch
can only hold images of one shape. Every place that runs the model over many images (embedding,
evaluation, training, the embed pipeline) batches through `shape_batches`."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Iterator, Sequence


def shape_batches(images: Sequence, batch_size: int, index: Iterable[int] | None = None
                  ) -> Iterator[list[int]]:
    """Positions of `images` (arrays, anything with `.shape`) grouped by shape, at most
    `batch_size` a group, shapes in order of first appearance; `index`: only these positions
    (default: all). -> lists of int positions into `images`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i in (range(len(images)) if index is None else index):
        by_shape[tuple(images[int(i)].shape)].append(int(i))
    for positions in by_shape.values():
        for start in range(0, len(positions), batch_size):
            yield positions[start:start + batch_size]
