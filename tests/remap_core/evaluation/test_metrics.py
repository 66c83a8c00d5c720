"""revisitop mAP, precision@k and recall@k against hand-computed examples."""

import numpy as np
import pytest

from remap_core.evaluation.metrics import (compute_ap, compute_map, precision_at_k, rank_by_similarity,
                                recall_at_k)

# query 0: ranking of 8 database items, positives {0, 1, 2}, junk {5}.
# Junk removed: [3, 0, 1, 7, 2, 4, 6]; positives at positions 1, 2, 4.
# revisitop AP = 1/3 * [ (0/1 + 1/2)/2 + (1/2 + 2/3)/2 + (2/4 + 3/5)/2 ] = 0.461111...
# query 1: the only positive ranked first -> AP 1. query 2: no positives -> skipped.
RANKS = np.array([[3, 0, 5, 1, 7, 2, 4, 6],
                  [1, 2, 0, 3, 4, 5, 6, 7],
                  [0, 1, 2, 3, 4, 5, 6, 7]])
GND = [{"ok": [0, 1, 2], "junk": [5]}, {"ok": [1]}, {"ok": [], "junk": []}]
AP0 = (1 / 3) * ((0 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2 + (2 / 4 + 3 / 5) / 2)


def test_compute_ap_matches_the_hand_computed_value():
    assert compute_ap(np.array([1, 2, 4]), 3) == pytest.approx(AP0)
    assert compute_ap(np.array([0, 1]), 2) == pytest.approx(1.0)


def test_compute_map_removes_junk_and_skips_queries_without_positives():
    m, aps, mpr, prs = compute_map(RANKS, GND, kappas=(1, 5, 10))
    assert aps[0] == pytest.approx(AP0) and aps[1] == pytest.approx(1.0) and np.isnan(aps[2])
    assert m == pytest.approx((AP0 + 1) / 2)
    # revisitop P@k clips k to the last positive's rank (5 for query 0, 1 for query 1)
    np.testing.assert_allclose(prs[0], [0.0, 3 / 5, 3 / 5])
    np.testing.assert_allclose(prs[1], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(mpr, [0.5, 0.8, 0.8])


def test_precision_and_recall_at_k_match_hand_counts():
    # query 0 (junk removed): positives at positions 1, 2, 4; query 1: position 0
    assert precision_at_k(RANKS, GND, 2) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert precision_at_k(RANKS, GND, 5) == pytest.approx((3 / 5 + 1 / 5) / 2)
    assert recall_at_k(RANKS, GND, 2) == pytest.approx((1 / 3 + 1) / 2)
    assert recall_at_k(RANKS, GND, 5) == pytest.approx(1.0)


def test_rank_by_similarity_orders_by_inner_product():
    db = np.array([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071]])
    q = np.array([[0.9, 0.1], [0.0, 1.0]])
    np.testing.assert_array_equal(rank_by_similarity(q, db), [[0, 2, 1], [1, 2, 0]])


def test_paired_bootstrap_interval_resamples_whole_groups():
    from remap_core.evaluation.metrics import paired_bootstrap

    # every group has the same difference: the interval collapses onto it
    a = np.array([0.9, 0.8, 0.7, 0.6])
    m, lo, hi = paired_bootstrap(a, a - 0.1, groups=np.array([0, 0, 1, 1]))
    assert (m, lo, hi) == pytest.approx((0.1, 0.1, 0.1))
    # differences of +1 in one group and -1 in the other: mean 0, interval spans both signs
    m, lo, hi = paired_bootstrap(np.array([1.0, 1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0, 1.0]),
                                 groups=np.array([0, 0, 1, 1]))
    assert m == pytest.approx(0.0) and lo == pytest.approx(-1.0) and hi == pytest.approx(1.0)
