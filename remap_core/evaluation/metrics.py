"""Retrieval metrics: the revisitop (ROxford/RParis) mAP with positives and junk, precision@k and
recall@k. numpy only.

Conventions (row-major, batch first): `ranks` is (Q, N), row q the database indices sorted by
decreasing similarity to query q (e.g. `np.argsort(-scores, axis=1)`); ground truth is one dict
per query with "ok" (positive database indices) and optionally "junk" (indices ignored: neither
positive nor negative; removed from the ranking before scoring).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def compute_ap(ranks: np.ndarray, nres: int) -> float:
    """Average precision as in the revisitop code (trapezoidal interpolation between the
    precisions just before and at each positive).

    ranks: 0-based positions of the positives in the ranking (junk already removed), increasing;
    nres: number of positives.
    """
    ranks = np.asarray(ranks)
    ap = 0.0
    recall_step = 1.0 / nres
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return float(ap)


def _positive_positions(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """Positions of the positives in `ranking` once the junk entries are removed."""
    ranking = np.asarray(ranking)
    is_junk = np.isin(ranking, junk)
    kept = ranking[~is_junk]
    return np.flatnonzero(np.isin(kept, ok))


def compute_map(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = ()
                ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop's compute_map, row-major: ranks (Q, N), gnd per query {"ok": [...], "junk": [...]}.

    Returns (mAP, APs (Q,), mP@kappas (K,), P@kappas (Q, K)). Queries without positives are
    skipped (AP NaN, left out of the means), as in revisitop. P@k follows revisitop: k is clipped
    to the rank of the last positive, so a query with 2 positives both at the top scores 1 at k=5.
    """
    ranks = np.asarray(ranks)
    nq = ranks.shape[0]
    kappas = list(kappas)
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for q in range(nq):
        ok = np.asarray(gnd[q].get("ok", []), dtype=np.int64)
        if len(ok) == 0:
            continue
        junk = np.asarray(gnd[q].get("junk", []), dtype=np.int64)
        pos = _positive_positions(ranks[q], ok, junk)
        aps[q] = compute_ap(pos, len(ok))
        pos1 = pos + 1
        for j, k in enumerate(kappas):
            if len(pos1) == 0:
                prs[q, j] = 0.0
                continue
            kq = min(int(pos1.max()), k)
            prs[q, j] = float((pos1 <= kq).sum()) / kq
    valid = ~np.isnan(aps)
    m = float(aps[valid].mean()) if valid.any() else float("nan")
    mpr = prs[valid].mean(axis=0) if valid.any() else np.full(len(kappas), np.nan)
    return m, aps, mpr, prs


def _hits_at_k(ranks: np.ndarray, gnd: Sequence[dict], k: int) -> list[tuple[int, int]]:
    """Per query with positives: (positives among the first k results, junk removed; positives)."""
    out = []
    for q, g in enumerate(gnd):
        ok = np.asarray(g.get("ok", []), dtype=np.int64)
        if len(ok) == 0:
            continue
        pos = _positive_positions(ranks[q], ok, np.asarray(g.get("junk", []), dtype=np.int64))
        out.append((int((pos < k).sum()), len(ok)))
    return out


def precision_at_k(ranks: np.ndarray, gnd: Sequence[dict], k: int) -> float:
    """Mean over queries of (positives among the first k results, junk removed) / k."""
    vals = [hits / k for hits, _ in _hits_at_k(ranks, gnd, k)]
    return float(np.mean(vals)) if vals else float("nan")


def recall_at_k(ranks: np.ndarray, gnd: Sequence[dict], k: int) -> float:
    """Mean over queries of (positives among the first k results, junk removed) / positives."""
    vals = [hits / n_ok for hits, n_ok in _hits_at_k(ranks, gnd, k)]
    return float(np.mean(vals)) if vals else float("nan")


def rank_by_similarity(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Rankings by inner product (cosine for L2-normalised vectors): (Q, D), (N, D) -> (Q, N),
    ties broken by database index (stable)."""
    scores = np.asarray(queries, np.float64) @ np.asarray(database, np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")


def paired_bootstrap(values_a: np.ndarray, values_b: np.ndarray, groups: np.ndarray,
                     n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of (a - b) over queries with a 95 % bootstrap interval, resampling whole `groups`
    (e.g. the photo a query was made from, since its views are not independent).

    values_a, values_b, groups: (Q,) -> (mean difference, 2.5th percentile, 97.5th percentile).
    """
    a, b = np.asarray(values_a, np.float64), np.asarray(values_b, np.float64)
    groups = np.asarray(groups)
    ok = np.isfinite(a) & np.isfinite(b)
    diff, groups = a[ok] - b[ok], groups[ok]
    ids, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=diff, minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    rng = np.random.RandomState(seed)
    draws = rng.randint(0, len(ids), (n_boot, len(ids)))
    boot = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)
