"""bench/scoring.py: AP per query under re-ranking, and the paired per-nuisance report that
benchmark_models, heldout_eval and inference_scales print."""

import numpy as np

from script_modules import load_bench

scoring = load_bench("scoring")


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ranked_aps_scores_a_known_ranking():
    # database: 0, 1 are query 0's positives; 2, 3 are query 1's
    db = _unit(np.array([[1, 0.1, 0], [1, 0, 0.1], [0, 1, 0.1], [0.1, 1, 0]], np.float64))
    q = _unit(np.array([[1, 0.05, 0.05], [0.05, 1, 0.05]]))
    gnd = [{"ok": np.array([0, 1]), "junk": np.array([], int)},
           {"ok": np.array([2, 3]), "junk": np.array([], int)}]
    np.testing.assert_allclose(scoring.ranked_aps(q, db, gnd), [1.0, 1.0])
    # each query with the other's positives: they rank 3rd and 4th; revisitop's AP averages the
    # precision before and at each positive: ((0 + 1/3) + (1/3 + 2/4)) / 2 / 2 = 7/24
    swapped = [gnd[1], gnd[0]]
    np.testing.assert_allclose(scoring.ranked_aps(q, db, swapped), [7 / 24] * 2)
    assert scoring.ranked_aps(q, db, gnd, ("qe", "dba")).shape == (2,)


def test_paired_report_against_itself_and_a_shifted_copy():
    rng = np.random.default_rng(0)
    aps = rng.uniform(0.2, 0.9, 60)
    nuisance = np.repeat(["clutter", "scale", "occlusion"], 20)
    groups = np.tile(np.arange(10), 6)
    same = scoring.paired_report(aps, aps, nuisance, groups)
    assert same["minus_ref"] == [0.0, 0.0, 0.0]
    assert list(same["per_nuisance"]) == ["clutter", "occlusion", "scale"]
    assert same["map"] == round(100 * aps.mean(), 1)
    lower = aps - 0.1 * (nuisance == "clutter")
    r = scoring.paired_report(lower, aps, nuisance, groups, names=("scale", "clutter"))
    assert list(r["per_nuisance"]) == ["scale", "clutter"]
    assert r["minus_ref_per_nuisance"]["clutter"] == [-10.0, -10.0, -10.0]
    assert r["minus_ref_per_nuisance"]["scale"] == [0.0, 0.0, 0.0]
    assert r["minus_ref"][0] == round(-10 / 3, 1)
