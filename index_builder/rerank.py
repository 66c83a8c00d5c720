"""Re-ranking of global descriptors: alpha query expansion (alpha-QE) and database-side
augmentation (DBA), as in Radenovic, Tolias & Chum (TPAMI 2019) and the REMAP authors' landmark
system. Pure numpy on L2-normalised float32 rows; the query library and the benchmarks call these.

- alpha-QE: the query is replaced by the L2-normalised sum of itself and its top `k` results,
  each weighted by max(similarity, 0) ** alpha; the search is then run again.
- DBA: every database vector is replaced, before indexing, by the same weighted sum over its
  own `k` nearest neighbours (itself included, weight 1).
"""

from __future__ import annotations

import numpy as np


# What 0 means for each build-time re-ranking count (`remap index` and `remap index-beam`).
RERANK_OFF = {"dba": "no database-side augmentation", "refine": "no re-ranking on stored vectors",
              "qe": "no query expansion"}


def check_rerank_counts(**counts: int | None) -> None:
    """Refuse a negative --dba / --refine / --qe (None: not given), naming it."""
    for name, value in counts.items():
        if value is not None and value < 0:
            raise ValueError(f"--{name} must be >= 0 (0: {RERANK_OFF[name]}), got {value}")


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero): (N, D) -> (N, D) float32."""
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def weighted_expansion(anchors: np.ndarray, neighbours: np.ndarray, similarities: np.ndarray,
                       alpha: float) -> np.ndarray:
    """L2n(anchor + sum_i max(s_i, 0)^alpha * neighbour_i) per row.

    anchors (N, D); neighbours (N, K, D); similarities (N, K) -> (N, D) float32. Neighbours with
    a non-positive similarity (or NaN: a missing result) add nothing.
    """
    s = np.nan_to_num(np.asarray(similarities, np.float32), nan=0.0)
    w = np.clip(s, 0.0, None) ** np.float32(alpha)
    out = np.asarray(anchors, np.float32) + np.einsum("nk,nkd->nd", w,
                                                      np.asarray(neighbours, np.float32))
    return l2_normalise(out)


def alpha_query_expansion(queries: np.ndarray, result_vectors: np.ndarray,
                          result_scores: np.ndarray, k: int = 2, alpha: float = 3.0) -> np.ndarray:
    """Expanded queries from a first search: queries (Q, D), the vectors of their ranked results
    (Q, R, D) with inner-product scores (Q, R), R >= k -> (Q, D)."""
    if k < 1:
        return l2_normalise(queries)
    return weighted_expansion(queries, result_vectors[:, :k], result_scores[:, :k], alpha)


def reranked_similarities(queries: np.ndarray, database: np.ndarray, qe: int = 0, dba: int = 0,
                          alpha: float = 3.0) -> np.ndarray:
    """Exact inner-product similarities (Q, N) of `queries` (Q, D) to `database` (N, D) after
    DBA over the database (`dba` neighbours; 0: none) and alpha-QE over the top `qe` results
    (0: none): what a search with these re-rankings ranks by. For benchmarks over collections
    that fit in memory."""
    db = database_augmentation(database, dba, alpha) if dba else np.asarray(database, np.float32)
    qv = np.asarray(queries, np.float32)
    sims = qv @ db.T
    if qe:
        top = np.argsort(-sims, axis=1)[:, :qe]
        qv = alpha_query_expansion(qv, db[top], np.take_along_axis(sims, top, 1), qe, alpha)
        sims = qv @ db.T
    return sims


def augment_with_neighbours(vectors: np.ndarray, neighbours: np.ndarray, similarities: np.ndarray,
                            alpha: float = 3.0, batch: int = 65_536) -> np.ndarray:
    """DBA given each vector's nearest other vectors: vectors (N, D), neighbours (N, k) row
    indices (-1: none), similarities (N, k) -> (N, D) float32, each row the L2-normalised sum of
    itself (weight 1) and its neighbours weighted by max(s, 0) ** alpha."""
    x = l2_normalise(vectors)
    if neighbours.shape[1] == 0:
        return x
    out = np.empty_like(x)
    for start in range(0, len(x), batch):
        nn = neighbours[start:start + batch]
        s = np.where(nn < 0, np.nan, similarities[start:start + batch])
        out[start:start + batch] = weighted_expansion(x[start:start + batch],
                                                      x[np.maximum(nn, 0)], s, alpha)
    return out


def database_augmentation(vectors: np.ndarray, k: int = 2, alpha: float = 3.0,
                          batch: int = 4096) -> np.ndarray:
    """DBA by exact inner-product k-NN over `vectors` (N, D) -> (N, D) float32.

    Each vector is averaged with its k nearest *other* vectors (weights s^alpha; itself weight 1).
    Exact search costs O(N^2 D); `remap index` finds the neighbours with index_builder.knn
    (approximate above its EXACT_MAX vectors) and calls augment_with_neighbours.
    """
    x = l2_normalise(vectors)
    if k < 1 or len(x) < 2:
        return x
    k = min(k, len(x) - 1)
    nn = np.empty((len(x), k), np.int64)
    nn_s = np.empty((len(x), k), np.float32)
    for start in range(0, len(x), batch):
        sims = x[start:start + batch] @ x.T
        rows = np.arange(len(sims))
        sims[rows, start + rows] = -np.inf          # not itself
        nn[start:start + batch] = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        nn_s[start:start + batch] = np.take_along_axis(sims, nn[start:start + batch], axis=1)
    return augment_with_neighbours(x, nn, nn_s, alpha)
