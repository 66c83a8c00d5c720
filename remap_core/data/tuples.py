"""Training tuples (anchor, positive, hard negatives) as pure numpy functions.

Images are referred to by their index in the training set and carry an integer class label (a
landmark, or the source photo of a family of generated views). Each epoch the trainer embeds the
anchors and a negative pool with the current model and calls `build_tuples`; negatives are the
pool images closest to the anchor that belong to another class, at most one per class (so one
near-duplicate cluster cannot fill a tuple), as in Radenović et al. and REMAP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tuples:
    """Index arrays into the training images: anchors (T,), positives (T,), negatives (T, K)."""

    anchors: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray

    def __len__(self) -> int:
        return int(len(self.anchors))

    def images(self) -> np.ndarray:
        """Every image index the tuples use, once, sorted."""
        return np.unique(np.concatenate([self.anchors, self.positives, self.negatives.ravel()]))


def pairwise_squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, D), (P, D) -> (A, P) squared Euclidean distances (float64, clipped at 0)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def hardest_negatives(anchor_vecs: np.ndarray, anchor_labels: np.ndarray, pool_vecs: np.ndarray,
                      pool_labels: np.ndarray, k: int, anchor_groups: np.ndarray | None = None,
                      pool_groups: np.ndarray | None = None) -> np.ndarray:
    """The k hardest negatives of each anchor, at most one per class: -> (A, k) pool indices.

    Hardest means closest to the anchor (smallest squared distance) among pool images whose
    label differs from the anchor's; once a class has given a negative to an anchor, its other
    images are skipped for that anchor. Negatives are ordered hardest first.

    Groups (optional, one per image): classes cut from one source (tiles of one photo) share a
    group, and an anchor takes no negative from its own group: neighbouring tiles can show the
    same sky or wall, and such a "negative" would be a mislabelled positive.
    """
    anchor_labels = np.asarray(anchor_labels)
    pool_labels = np.asarray(pool_labels)
    if len(anchor_vecs) != len(anchor_labels) or len(pool_vecs) != len(pool_labels):
        raise ValueError("each vector needs exactly one label")
    if (anchor_groups is None) != (pool_groups is None):
        raise ValueError("give groups for both the anchors and the pool, or for neither")
    if anchor_groups is None:
        anchor_groups, pool_groups = anchor_labels, pool_labels
    anchor_groups, pool_groups = np.asarray(anchor_groups), np.asarray(pool_groups)
    if k < 1:
        raise ValueError(f"need at least one negative per tuple, got k={k}")
    dist = pairwise_squared_distances(anchor_vecs, pool_vecs)
    order = np.argsort(dist, axis=1, kind="stable")
    out = np.empty((len(anchor_vecs), k), dtype=np.int64)
    for i, label in enumerate(anchor_labels):
        seen: set = {label}
        n = 0
        for j in order[i]:
            lj = pool_labels[j]
            if lj in seen or pool_groups[j] == anchor_groups[i]:
                continue
            seen.add(lj)
            out[i, n] = j
            n += 1
            if n == k:
                break
        if n < k:
            raise ValueError(f"the negative pool holds only {n} class(es) outside anchor "
                             f"{i}'s class (and group); need {k}: lower --negatives or enlarge "
                             f"--pool-size")
    return out


def sample_anchor_positive(labels: np.ndarray, n: int, rng: np.random.Generator
                           ) -> tuple[np.ndarray, np.ndarray]:
    """n (anchor, positive) index pairs of the same class, anchor != positive: -> (n,), (n,).

    Classes with a single image cannot give a pair and are skipped. Anchors are drawn without
    replacement while enough images remain, spread over classes as they come.
    """
    labels = np.asarray(labels)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    eligible = np.flatnonzero(counts[inverse] >= 2)
    if len(eligible) == 0:
        raise ValueError("no class has two images, so no (anchor, positive) pair exists; give "
                         "each class (folder / label) at least two images")
    anchors = rng.choice(eligible, size=n, replace=n > len(eligible))
    members = {c: np.flatnonzero(inverse == c) for c in np.unique(inverse[eligible])}
    positives = np.empty(n, dtype=np.int64)
    for t, a in enumerate(anchors):
        others = members[inverse[a]]
        others = others[others != a]
        positives[t] = others[rng.integers(len(others))]
    return anchors.astype(np.int64), positives


def build_tuples(vectors: np.ndarray, labels: np.ndarray, n_tuples: int, negatives: int,
                 rng: np.random.Generator, pool_size: int | None = None,
                 groups: np.ndarray | None = None) -> Tuples:
    """One epoch of tuples mined with the current descriptors.

    vectors: (N, D) descriptors of every training image from the current model; labels: (N,);
    groups: (N,) or None, see `hardest_negatives`.
    The negative pool is a random subset of `pool_size` images (all images when None), redrawn
    on every call, from which each anchor takes its `negatives` hardest, one per class.
    """
    vectors = np.asarray(vectors)
    labels = np.asarray(labels)
    if len(vectors) != len(labels):
        raise ValueError(f"{len(vectors)} vectors but {len(labels)} labels")
    anchors, positives = sample_anchor_positive(labels, n_tuples, rng)
    if pool_size is None or pool_size >= len(labels):
        pool = np.arange(len(labels))
    else:
        pool = np.sort(rng.choice(len(labels), size=pool_size, replace=False))
    anchor_groups = pool_groups = None
    if groups is not None:
        anchor_groups, pool_groups = np.asarray(groups)[anchors], np.asarray(groups)[pool]
    neg = hardest_negatives(vectors[anchors], labels[anchors], vectors[pool], labels[pool],
                            negatives, anchor_groups, pool_groups)
    return Tuples(anchors, positives, pool[neg])
