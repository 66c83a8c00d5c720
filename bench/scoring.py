"""What the retrieval bench scripts share for scoring: average precision per query under a
re-ranking, and the per-nuisance report of one model paired against another."""

from __future__ import annotations

import numpy as np


def ranked_aps(queries: np.ndarray, database: np.ndarray, gnd, rerank=()) -> np.ndarray:
    """Average precision per query of ranking `database` (N, D) for `queries` (Q, D), after the
    re-ranking named in `rerank` ("qe", "dba": αQE and DBA over the top 2, as the library's
    defaults); `gnd`: the revisitop ground truth of the Q queries."""
    from index_builder.rerank import reranked_similarities
    from remap_core.evaluation.metrics import compute_map

    sims = reranked_similarities(queries, database, qe=2 if "qe" in rerank else 0,
                                 dba=2 if "dba" in rerank else 0)
    _, aps, _, _ = compute_map(np.argsort(-sims, axis=1, kind="stable"), gnd)
    return aps


def paired_report(aps: np.ndarray, ref: np.ndarray, nuisance: np.ndarray, groups: np.ndarray,
                  names=None) -> dict:
    """mAP (%) overall and per nuisance of `aps`, and its paired difference to `ref` (the same
    queries' APs under another model or variant) as [mean, 2.5th, 97.5th percentile] in points,
    resampling whole `groups` (the photo each query came from). `names`: the nuisances, in the
    report's order (default: those in `nuisance`, sorted)."""
    from remap_core.evaluation.metrics import paired_bootstrap

    def pct(x):
        return [round(100 * float(v), 1) for v in x]

    names = sorted(set(nuisance.tolist())) if names is None else list(names)
    return {"map": round(100 * float(np.nanmean(aps)), 1),
            "per_nuisance": {n: round(100 * float(np.nanmean(aps[nuisance == n])), 1)
                             for n in names},
            "minus_ref": pct(paired_bootstrap(aps, ref, groups)),
            "minus_ref_per_nuisance": {n: pct(paired_bootstrap(aps[nuisance == n],
                                                               ref[nuisance == n],
                                                               groups[nuisance == n]))
                                       for n in names}}
