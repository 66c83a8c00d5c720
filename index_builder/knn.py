"""The k nearest *other* vectors of every vector of a collection (all-kNN, inner product), as
database-side augmentation needs them (`remap index --dba K`).

    nn, sims, info = nearest_others(X, k=2)     # (N, k) int64, (N, k) float32, how it was found

Up to EXACT_MAX vectors the search is exact (FAISS brute force in blocks: O(N^2 D)). Above, it
is approximate: an IVF-Flat index over the collection itself (a power of two near 4 sqrt(N) lists,
trained on MIN_POINTS_PER_CENTROID vectors per list), about N^1.5 D work: the number of lists
probed is the first of NPROBES whose recall@k against exact search, measured on RECALL_SAMPLE
rows, reaches TARGET_RECALL (or where doubling it stops paying), and that recall is reported in
`info`.
Numpy in, numpy out; FAISS does the search.
"""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np

from index_builder.train import (MIN_POINTS_PER_CENTROID, hnsw_quantizer, ivf_part, nlist_for,
                                 train_index)

log = logging.getLogger(__name__)

EXACT_MAX = 50_000      # vectors; exact all-kNN costs N^2 D (50k x 256-D: ~10 s on 2 cores)
NPROBES = (16, 32, 64, 128, 256)  # IVF lists probed, tried in turn on the recall sample...
TARGET_RECALL = 0.95    # ...until recall@k against exact search reaches this,
MIN_GAIN = 0.005        # or doubling nprobe gains less than this (then the smaller one is kept)
# efSearch of the HNSW graph over the IVF centroids (from 1,000 lists on), when vectors are
# assigned and when lists are chosen: FAISS's default 16 finds the nearest centroids poorly
# under inner product and caps recall (1M synthetic 256-D vectors: recall@2 0.72 at any nprobe;
# 200k: 0.94, against 0.9995 with 128; bench/RESULTS.md "DBA by default")
QUANTIZER_EF = 128
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


def neighbour_recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true neighbours found: found, truth (Q, k) row indices -> recall@k."""
    return sum(len(np.intersect1d(a, b)) for a, b in zip(found, truth)) / max(truth.size, 1)


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


def approximate_nearest_others(x: np.ndarray, k: int, seed: int = 0,
                               target_recall: float = TARGET_RECALL
                               ) -> tuple[np.ndarray, np.ndarray, dict]:
    """k nearest other rows of every row of `x` (N, D) through an IVF-Flat index over x
    -> (N, k) int64, (N, k) float32 (-1 / NaN where fewer were found), info (factory, nprobe,
    recall@k against exact search on a sample, seconds). nprobe is the first of NPROBES whose
    recall@k on the sample reaches `target_recall`, or the one before the first doubling that
    gains less than MIN_GAIN (the largest tried when neither happens)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    t0 = time.time()
    nlist = nlist_for(n)
    factory = f"{ivf_part(nlist)},Flat"
    rng = np.random.default_rng(seed)
    train_rows = np.sort(rng.choice(n, size=min(n, MIN_POINTS_PER_CENTROID * nlist),
                                    replace=False))
    index = train_index(factory, x[train_rows])
    ivf, graph = faiss.extract_index_ivf(index), hnsw_quantizer(index)

    def probe(nprobe: int) -> None:
        """Probe nprobe lists; the HNSW graph over the centroids (if any) is searched at least
        QUANTIZER_EF wide, when vectors are assigned as when lists are chosen."""
        ivf.nprobe = nprobe
        if graph is not None:
            graph.hnsw.efSearch = max(QUANTIZER_EF, nprobe)

    probe(NPROBES[0])
    index.add(x)
    sample = np.sort(rng.choice(n, size=min(n, RECALL_SAMPLE), replace=False))
    truth, _ = exact_nearest_others(x, k, queries=sample)

    def search(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, found = index.search(x[rows], k + 1)
        return _drop_self(found, s, rows, k)

    tried: dict[int, float] = {}
    for nprobe in [p for p in NPROBES if p <= nlist] or [nlist]:
        probe(nprobe)
        tried[nprobe] = round(neighbour_recall(search(sample)[0], truth), 4)
        if tried[nprobe] >= target_recall:
            break
        if len(tried) > 1 and tried[nprobe] - list(tried.values())[-2] < MIN_GAIN:
            probe(list(tried)[-2])    # a plateau: more lists buy no more neighbours
            break
    nn = np.empty((n, k), np.int64)
    sims = np.empty((n, k), np.float32)
    for start in range(0, n, BLOCK):
        r = np.arange(start, min(n, start + BLOCK))
        nn[r], sims[r] = search(r)
    info = {"knn": "ivf", "factory": factory, "nprobe": int(ivf.nprobe),
            f"recall@{k}": round(neighbour_recall(nn[sample], truth), 4),
            "recall_sample": len(sample),
            "recall_by_nprobe": {str(p): r for p, r in tried.items()},
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
    if info[f"recall@{k}"] < TARGET_RECALL:
        log.warning("dba: the approximate %d-NN reached recall@%d %.3f (below %.2f) at nprobe "
                    "%d; the augmentation uses fewer true neighbours", k, k,
                    info[f"recall@{k}"], TARGET_RECALL, info["nprobe"])
    log.info("dba: approximate %d-NN of %d vectors (%s, nprobe %d): recall@%d %.3f on %d rows "
             "against exact search", k, len(x), info["factory"], info["nprobe"], k,
             info[f"recall@{k}"], info["recall_sample"])
    return nn, sims, info
