"""Recall of an index against exact search, and search parameters tuned to a target recall.

Queries are vectors of the collection itself, held out leave-one-out: a query's own id is
removed from both the exact and the approximate result lists, so the neighbour to find is the
nearest *other* image, never the trivial self-match.

    gt = exact_knn_stream(xq, batches, k=100, exclude=qids)           # (Q, k) ids
    r = measure_recall(index, xq, qids, gt)                          # {"recall@1": ..}
    params, r = tune_search_params(index, xq, qids, gt, target=0.95)  # {"nprobe": 16}
"""

from __future__ import annotations

import time
from typing import Iterable

import faiss
import numpy as np
from faiss import ResultHeap

from index_builder.train import hnsw_quantizer

KS = (1, 10, 100)
MAX_NPROBE = 2048  # beyond this an IVF scans most of the collection: pick another index


def exact_knn_stream(xq: np.ndarray, batches: Iterable[tuple[np.ndarray, np.ndarray]], k: int,
                     exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product k-NN of (Q, D) queries over a stream of (ids (B,), X (B, D)) batches
    -> (scores (Q, k), ids (Q, k)), best first, -1 where fewer than k. `exclude` (Q,) removes
    each query's own id from its list."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    extra = 1 if exclude is not None else 0
    heap = ResultHeap(len(xq), k + extra, keep_max=True)
    for ids, X in batches:
        kk = min(k + extra, len(X))
        D, I = faiss.knn(xq, np.ascontiguousarray(X, dtype=np.float32), kk,
                         metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(D, np.where(I >= 0, ids[np.maximum(I, 0)], -1))
    heap.finalize()
    return drop_self(heap.D, heap.I, exclude, k)


def drop_self(D: np.ndarray, I: np.ndarray, exclude: np.ndarray | None, k: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from its result row, keep the first k."""
    if exclude is None:
        return D[:, :k], I[:, :k]
    outD = np.full((len(I), k), -np.inf, np.float32)
    outI = np.full((len(I), k), -1, np.int64)
    for q in range(len(I)):
        keep = I[q] != exclude[q]
        row_i, row_d = I[q][keep][:k], D[q][keep][:k]
        outI[q, :len(row_i)], outD[q, :len(row_d)] = row_i, row_d
    return outD, outI


def recall_at(found: np.ndarray, true: np.ndarray, ks=KS) -> dict[str, float]:
    """1-recall@k: fraction of queries whose exact nearest neighbour is in the first k found."""
    out = {}
    for k in ks:
        if k <= found.shape[1]:
            out[f"recall@{k}"] = float((found[:, :k] == true[:, :1]).any(axis=1).mean())
    return out


def search_excluding_self(index: faiss.Index, xq: np.ndarray, qids: np.ndarray, k: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    D, I = index.search(np.ascontiguousarray(xq, dtype=np.float32), k + 1)
    return drop_self(D, I, qids, k)


def measure_recall(index: faiss.Index, xq: np.ndarray, qids: np.ndarray, true: np.ndarray,
                   ks=KS) -> dict:
    """Recall@ks of `index` (with its current search parameters) against exact ids `true`,
    plus the measured single-thread-batch query throughput."""
    kmax = min(max(ks), true.shape[1])
    started = time.perf_counter()
    _, found = search_excluding_self(index, xq, qids, kmax)
    seconds = time.perf_counter() - started
    return {"queries": int(len(xq)), **recall_at(found, true, ks),
            "queries_per_second": round(len(xq) / max(seconds, 1e-9), 1)}


def _set(index, params: dict) -> None:
    from index_builder.merge import set_search_params

    set_search_params(index, params)


def parameter_grid(index: faiss.Index) -> list[dict]:
    """Candidate search parameters, cheapest first: nprobe (IVF; with the HNSW coarse
    quantizer's efSearch at 2 x nprobe) or efSearch (HNSW); [{}] for exact indexes."""
    ivf = faiss.try_extract_index_ivf(_first_part(index))
    if ivf is not None:
        graph = hnsw_quantizer(ivf) is not None
        grid = []
        p = 1
        while p <= min(ivf.nlist, MAX_NPROBE):
            grid.append({"nprobe": p, **({"quantizer_efSearch": max(64, 2 * p)}
                                         if graph else {})})
            p *= 2
        return grid
    if _hnsw(_first_part(index)) is not None:
        return [{"efSearch": e} for e in (16, 32, 64, 128, 256, 512, 1024, 2048)]
    return [{}]


def _first_part(index) -> faiss.Index:
    from index_builder.merge import ShardedIndex

    from index_builder.refine import unwrap

    index = unwrap(index)     # a RefinedIndex's parameters are those of the index it re-ranks
    if isinstance(index, ShardedIndex):
        return index.parts[0]
    return faiss.downcast_index(index)


def _hnsw(index: faiss.Index):
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def tune_search_params(index: faiss.Index, xq: np.ndarray, qids: np.ndarray, true: np.ndarray,
                       target: float = 0.95, at: int = 10, ks=KS) -> tuple[dict, dict]:
    """The cheapest search parameters whose recall@`at` reaches `target` (the index is left set
    to them) -> (params, recall measured with them, plus "target_met"). When no candidate reaches
    the target, the most accurate one is kept and target_met is False."""
    best = None
    for params in parameter_grid(index):
        _set(index, params)
        r = measure_recall(index, xq, qids, true, ks)
        got = r.get(f"recall@{at}", r.get("recall@1", 0.0))
        if best is None or got > best[2]:
            best = (params, r, got)
        if got >= target:
            return params, {**r, "target": target, "target_at": at, "target_met": True}
    params, r, _ = best
    _set(index, params)
    return params, {**r, "target": target, "target_at": at, "target_met": False}


def unmeasured_recall(index, reason: str, target: float = 0.95, at: int = 10, ks=KS
                      ) -> tuple[dict, dict]:
    """When recall cannot be measured (e.g. a one-vector index: a held-out query has nothing
    left to find): the most accurate search parameters (the index is left set to them), and a
    recall record that says so -> (params, {"measured": False, "reason": ..., "recall@k": None,
    "queries": 0, ...})."""
    params = parameter_grid(index)[-1]
    _set(index, params)
    return params, {"measured": False, "reason": reason, "queries": 0,
                    **{f"recall@{k}": None for k in ks}, "queries_per_second": None,
                    "target": target, "target_at": at, "target_met": None}
