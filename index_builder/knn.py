"""The k nearest *other* vectors of every vector of a collection (all-kNN, inner product), as
database-side augmentation needs them (`remap index --dba K`).

    nn, sims, info = nearest_others(X, k=2)     # (N, k) int64, (N, k) float32, how it was found

Up to EXACT_MAX vectors the search is exact (FAISS brute force in blocks: O(N^2 D)). Above, it
is approximate: an IVF-Flat index over the collection itself (a power of two near 4 sqrt(N) lists,
trained on MIN_POINTS_PER_CENTROID vectors per list, NPROBE lists probed), about N^1.5 D work,
and its recall@k against exact search is measured on RECALL_SAMPLE rows and reported in `info`.
Numpy in, numpy out; FAISS does the search.
"""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np

from index_builder.train import MIN_POINTS_PER_CENTROID, ivf_part, nlist_for, train_index

log = logging.getLogger(__name__)

EXACT_MAX = 50_000      # vectors; exact all-kNN costs N^2 D (50k x 256-D: ~10 s on 2 cores)
NPROBE = 16             # IVF lists probed per vector in the approximate search
RECALL_SAMPLE = 1_000   # rows whose approximate neighbours are checked against exact search
BLOCK = 8_192           # query rows per exact-search block


def _drop_self(found: np.ndarray, sims: np.ndarray, rows: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """The first k results of each row that are not the row itself: found/sims (B, k+1) of
    `rows` (B,) -> (B, k), (B, k). A missing result (-1) stays -1 with similarity NaN."""
    keep = found != rows[:, None]
    keep[keep.all(axis=1), -1] = False   # itself not among them (ties, IVF misses): drop the last
    nn = found[keep].reshape(len(rows), k)
    s = sims[keep].reshape(len(rows), k).astype(np.float32)
    s[nn < 0] = np.nan
    return nn.astype(np.int64), s


def exact_nearest_others(x: np.ndarray, k: int, queries: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest other rows of `x` (N, D) by inner product, for the rows `queries`
    (default all) -> (Q, k) int64 indices into x, (Q, k) float32 similarities, best first."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = np.arange(len(x)) if queries is None else np.asarray(queries, np.int64)
    nn = np.empty((len(rows), k), np.int64)
    sims = np.empty((len(rows), k), np.float32)
    for start in range(0, len(rows), BLOCK):
        r = rows[start:start + BLOCK]
        s, found = faiss.knn(x[r], x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
        nn[start:start + BLOCK], sims[start:start + BLOCK] = _drop_self(found, s, r, k)
    return nn, sims


def approximate_nearest_others(x: np.ndarray, k: int, seed: int = 0, nprobe: int = NPROBE
                               ) -> tuple[np.ndarray, np.ndarray, dict]:
    """k nearest other rows of every row of `x` (N, D) through an IVF-Flat index over x
    -> (N, k) int64, (N, k) float32 (-1 / NaN where fewer were found), info (factory, nprobe,
    recall@k measured against exact search on a sample, seconds)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    t0 = time.time()
    nlist = nlist_for(n)
    factory = f"{ivf_part(nlist)},Flat"
    rng = np.random.default_rng(seed)
    train_rows = np.sort(rng.choice(n, size=min(n, MIN_POINTS_PER_CENTROID * nlist),
                                    replace=False))
    index = train_index(factory, x[train_rows])
    index.add(x)
    faiss.extract_index_ivf(index).nprobe = min(nprobe, nlist)
    nn = np.empty((n, k), np.int64)
    sims = np.empty((n, k), np.float32)
    for start in range(0, n, BLOCK):
        r = np.arange(start, min(n, start + BLOCK))
        s, found = index.search(x[r], k + 1)
        nn[r], sims[r] = _drop_self(found, s, r, k)
    sample = np.sort(rng.choice(n, size=min(n, RECALL_SAMPLE), replace=False))
    truth, _ = exact_nearest_others(x, k, queries=sample)
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(nn[sample], truth))
    info = {"knn": "ivf", "factory": factory, "nprobe": int(min(nprobe, nlist)),
            f"recall@{k}": round(hits / (k * len(sample)), 4), "recall_sample": len(sample),
            "knn_seconds": round(time.time() - t0, 3)}
    return nn, sims, info


def nearest_others(x: np.ndarray, k: int, exact_max: int = EXACT_MAX, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
    """All-kNN of `x` (N, D) without self matches: exact up to `exact_max` rows, IVF-Flat above
    -> (N, k') int64 indices, (N, k') float32 similarities, info; k' = min(k, N - 1)."""
    k = min(k, len(x) - 1)
    if k < 1:
        return np.zeros((len(x), 0), np.int64), np.zeros((len(x), 0), np.float32), {"knn": "none"}
    if len(x) <= exact_max:
        t0 = time.time()
        nn, sims = exact_nearest_others(x, k)
        return nn, sims, {"knn": "exact", "knn_seconds": round(time.time() - t0, 3)}
    nn, sims, info = approximate_nearest_others(x, k, seed=seed)
    log.info("dba: approximate %d-NN of %d vectors (%s, nprobe %d): recall@%d %.3f on %d rows "
             "against exact search", k, len(x), info["factory"], info["nprobe"], k,
             info[f"recall@{k}"], info["recall_sample"])
    return nn, sims, info
