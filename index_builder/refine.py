"""Re-ranking on stored vectors: a compressed index (IVF-PQ, OPQ, ...) finds candidates by its
codes, then their scores are recomputed from float16 copies of the indexed vectors.

PQ codes cap recall: past some nprobe, more probes find nothing new, because within a tight
neighbourhood the quantisation error is larger than the distance differences. The exact
neighbour is then usually among the first ~100 candidates but not the first 10; re-scoring
`k x k_factor` candidates with the real vectors puts it back in place (FAISS's IndexRefine does
the same in memory). Here the vectors are one id-sorted file beside the id map,

    refine.f16.npy   (N, D) float16, row i = the vector of id_map.ids.npy[i]

which readers memory-map like the id map: opening costs nothing, and a search reads the
`k x k_factor` rows it re-scores (2 D bytes each). On disk: 2 D bytes per vector (512 B at 256-D,
8x the 64-byte PQ codes). `remap index --refine K_FACTOR` writes it; off by default.

    write_refine_vectors(folder, ids_sorted, batches)               # the build (merge step)
    scores, ids = refine_search(xq, cand_ids, ids_sorted, vectors, k)  # pure: the re-ranking
    RefinedIndex(index, ids_sorted, vectors, k_factor).search(xq, k)   # faiss.Index-like
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from index_builder.id_map import sorted_positions as positions
from remap_store.files import atomic_path

REFINE_FILE = "refine.f16.npy"
DEFAULT_K_FACTOR = 10
BLOCK_FLOATS = 1 << 24      # candidate rows gathered at once (64 MB as float32)


def write_refine_vectors(folder: str, ids_sorted: np.ndarray, dim: int,
                         batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> str:
    """Write REFINE_FILE into `folder`: float16 copies of the vectors of `ids_sorted` (the id
    map's sorted ids), in that order, from (ids (B,), X (B, D)) batches in any order (via a
    temporary name). Every id must get its vector; ids the map does not hold are ignored.
    Memory: one batch. -> the file name."""
    n = len(ids_sorted)
    filled = np.zeros(n, bool)
    with atomic_path(os.path.join(folder, REFINE_FILE)) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
        for ids, X in batches:
            ids = np.asarray(ids, np.int64)
            if X.shape[1] != dim:
                raise ValueError(f"vectors of dimension {X.shape[1]} for an index of {dim}")
            pos, ok = positions(ids_sorted, ids)
            out[pos[ok]] = np.asarray(X, np.float32)[ok].astype(np.float16)
            filled[pos[ok]] = True
        out.flush()
        del out
        if not filled.all():
            missing = int(np.asarray(ids_sorted)[~filled][0])
            raise ValueError(f"{int((~filled).sum())} indexed vectors were not found in the "
                             f"embedding shards (e.g. id {missing}); the store changed under the "
                             f"build: run `remap index` again")
    return REFINE_FILE


def open_refine_vectors(folder: str, mapped: bool = True, name: str = REFINE_FILE) -> np.ndarray:
    """The (N, D) float16 refine vectors of a local index folder (memory-mapped read-only)."""
    return np.load(os.path.join(folder, name), mmap_mode="r" if mapped else None,
                   allow_pickle=False)


def refine_search(xq: np.ndarray, cand_ids: np.ndarray, ids_sorted: np.ndarray,
                  vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidates by the stored vectors: (Q, D) queries and (Q, K') candidate ids
    (-1: none) -> (scores (Q, k), ids (Q, k)) by inner product with `vectors` (rows aligned with
    `ids_sorted`), best first; -inf / -1 where fewer than k candidates. Ties keep the
    candidates' order."""
    xq = np.asarray(xq, np.float32)
    Q, K = cand_ids.shape
    block = max(1, BLOCK_FLOATS // max(1, K * xq.shape[1]))
    if Q > block:       # bounded memory: the gathered rows of `block` queries at a time
        parts = [refine_search(xq[i:i + block], cand_ids[i:i + block], ids_sorted, vectors, k)
                 for i in range(0, Q, block)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    scores = np.full((Q, k), -np.inf, np.float32)
    out = np.full((Q, k), -1, np.int64)
    if not K:
        return scores, out
    flat = cand_ids.reshape(-1)
    pos, ok = positions(ids_sorted, flat)
    ok &= flat != -1
    rows = np.zeros((Q * K, xq.shape[1]), np.float32)
    if ok.any():
        want = pos[ok]
        order = np.argsort(want, kind="stable")      # read the mapped file in file order
        got = np.empty((len(want), xq.shape[1]), np.float32)
        got[order] = np.asarray(vectors[want[order]], np.float32)
        rows[ok] = got
    s = np.einsum("qkd,qd->qk", rows.reshape(Q, K, -1), xq)
    s[~ok.reshape(Q, K)] = -np.inf
    best = np.argsort(-s, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(s, best, 1)
    ids = np.where(np.isfinite(top), np.take_along_axis(cand_ids, best, 1), -1)
    n = best.shape[1]
    scores[:, :n], out[:, :n] = top, ids
    return scores, out


def unwrap(index):
    """The index a RefinedIndex re-ranks (where search parameters are set); others as they are."""
    return index.base if isinstance(index, RefinedIndex) else index


class RefinedIndex:
    """A FAISS index (or ShardedIndex) whose results are re-ranked on the stored vectors: it
    asks the index for `k x k_factor` candidates and returns the best k by the exact scores.
    Duck-types what the query library and the recall tuner use (d, ntotal, metric_type, search
    with params, search_and_reconstruct); `base` is the wrapped index (search parameters such as
    nprobe are set on it)."""

    def __init__(self, base, ids_sorted: np.ndarray, vectors: np.ndarray,
                 k_factor: int = DEFAULT_K_FACTOR):
        if k_factor < 1:
            raise ValueError(f"the refine k_factor must be at least 1, got {k_factor}")
        if len(vectors) != len(ids_sorted) or vectors.shape[1] != base.d:
            raise ValueError(f"refine vectors of shape {vectors.shape} do not fit an index of "
                             f"{len(ids_sorted)} ids and dimension {base.d}; rebuild the index")
        self.base, self.ids_sorted, self.vectors = base, ids_sorted, vectors
        self.k_factor = int(k_factor)
        self.d, self.metric_type = base.d, base.metric_type

    @property
    def ntotal(self) -> int:
        return int(self.base.ntotal)

    def search(self, xq: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        fetch = max(k, min(k * self.k_factor, self.ntotal))
        if params is None:
            _, cand = self.base.search(xq, fetch)
        else:
            _, cand = self.base.search(xq, fetch, params=params)
        return refine_search(xq, cand, self.ids_sorted, self.vectors, k)

    def search_and_reconstruct(self, xq: np.ndarray, k: int
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """search, with the results' stored vectors (NaN rows where there is no result)."""
        D, I = self.search(xq, k)
        pos, ok = positions(self.ids_sorted, I.reshape(-1))
        ok &= I.reshape(-1) != -1
        R = np.full((I.size, self.d), np.nan, np.float32)
        R[ok] = np.asarray(self.vectors[pos[ok]], np.float32)
        return D, I, R.reshape(I.shape[0], I.shape[1], self.d)
