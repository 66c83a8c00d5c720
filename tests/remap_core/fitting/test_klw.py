"""KL-divergence region weights against closed forms and independent numpy computations."""

import numpy as np
import pytest
import torch

from remap_core.descriptor.heads import REMAPHead
from remap_core.fitting.klw import (canonical_region_vectors, gaussian_kl, histogram_kl,
                            kl_region_weights, pair_region_distances)


def _kl_by_integration(mu_p, s_p, mu_q, s_q):
    """Independent reference: numerically integrate p log(p / q) on a fine grid."""
    t = np.linspace(-30, 30, 400_001)
    logp = -0.5 * ((t - mu_p) / s_p) ** 2 - np.log(s_p * np.sqrt(2 * np.pi))
    logq = -0.5 * ((t - mu_q) / s_q) ** 2 - np.log(s_q * np.sqrt(2 * np.pi))
    return np.trapezoid(np.exp(logp) * (logp - logq), t)


@pytest.mark.parametrize("mu_p,s_p,mu_q,s_q", [(0, 1, 1, 1), (0.3, 0.5, 1.0, 2.0),
                                               (2, 1.5, -1, 0.7)])
def test_gaussian_kl_closed_form_matches_numerical_integration(mu_p, s_p, mu_q, s_q):
    assert gaussian_kl(mu_p, s_p ** 2, mu_q, s_q ** 2) == pytest.approx(
        _kl_by_integration(mu_p, s_p, mu_q, s_q), rel=1e-6)


def test_kl_region_weights_recover_known_gaussian_divergences_per_layer_and_region():
    rng = np.random.RandomState(0)
    n = 20000
    # (layers=2, regions=3): matching distances N(mu_m, s_m), non-matching N(mu_n, s_n)
    mu_m = np.array([[0.4, 0.6, 0.8], [0.5, 0.5, 0.9]])
    s_m = np.array([[0.10, 0.15, 0.20], [0.1, 0.2, 0.1]])
    mu_n = np.array([[1.2, 1.0, 0.9], [1.1, 1.3, 1.0]])
    s_n = np.array([[0.15, 0.15, 0.20], [0.2, 0.1, 0.1]])
    match = mu_m + s_m * rng.randn(n, 2, 3)
    nonmatch = mu_n + s_n * rng.randn(n, 2, 3)
    fwd = gaussian_kl(mu_m, s_m ** 2, mu_n, s_n ** 2)
    bwd = gaussian_kl(mu_n, s_n ** 2, mu_m, s_m ** 2)
    got = kl_region_weights(match, nonmatch, method="gaussian", direction="match||nonmatch")
    np.testing.assert_allclose(got, fwd, rtol=0.05, atol=0.02)
    got = kl_region_weights(match, nonmatch, method="gaussian")
    np.testing.assert_allclose(got, 0.5 * (fwd + bwd), rtol=0.05, atol=0.02)
    got = kl_region_weights(match, nonmatch, method="histogram", bins=60,
                            direction="nonmatch||match")
    # histograms with pseudocounts saturate on nearly disjoint distributions: compare where the
    # divergence is moderate, and check the order elsewhere
    moderate = bwd < 5
    np.testing.assert_allclose(got[moderate], bwd[moderate], rtol=0.15, atol=0.05)
    # the better-separated region gets the larger weight
    assert np.argmax(got[0]) == 0 and np.argmin(got[0]) == 2


def test_histogram_kl_of_identical_samples_is_zero_and_of_disjoint_samples_large():
    x = np.random.RandomState(0).randn(5000)
    assert histogram_kl(x, x) == pytest.approx(0.0, abs=1e-12)
    assert histogram_kl(x, x + 10) > 3.0


def test_regions_missing_on_some_pairs_are_skipped_and_empty_regions_get_the_layer_mean():
    rng = np.random.RandomState(0)
    match = 0.5 + 0.1 * rng.randn(200, 1, 3)
    nonmatch = 1.0 + 0.1 * rng.randn(200, 1, 3)
    match[:100, 0, 1] = np.nan           # half missing: still estimated
    match[:, 0, 2] = np.nan              # never seen: layer mean
    w = kl_region_weights(match, nonmatch)
    seen_half = kl_region_weights(match[100:, :, 1:2], nonmatch[:, :, 1:2])
    np.testing.assert_allclose(w[0, 1], seen_half[0, 0], rtol=1e-12)
    assert w[0, 2] == pytest.approx(w[0, :2].mean())


def test_canonical_region_vectors_and_pair_distances_match_a_direct_computation():
    torch.manual_seed(0)
    head = REMAPHead([5], levels=2)                 # canonical: global + 1 + 4 = 6 regions
    feats_a = [torch.rand(2, 5, 6, 6)]              # square: identity mapping
    va = canonical_region_vectors(head, feats_a)[0]
    assert va.shape == (2, 6, 5)
    f = feats_a[0][0].numpy()
    np.testing.assert_allclose(va[0, 0], f.max(axis=(1, 2)) / np.linalg.norm(f.max(axis=(1, 2))),
                               rtol=1e-5)
    # a wide map: several actual regions share one canonical slot, averaged then renormalised
    vb = canonical_region_vectors(head, [torch.rand(2, 5, 6, 12)])[0]
    assert np.isfinite(vb).all()
    np.testing.assert_allclose(np.linalg.norm(vb, axis=2), 1.0, rtol=1e-6)
    vectors = [np.concatenate([va, vb])]
    d = pair_region_distances(vectors, np.array([[0, 2], [1, 3]]))
    assert d.shape == (2, 1, 6)
    np.testing.assert_allclose(d[1, 0, 4], np.linalg.norm(va[1, 4] - vb[1, 4]), rtol=1e-6)


def test_weigh_whole_map_sets_the_whole_map_from_the_grid_mean_only():
    from remap_core.fitting.klw import weigh_whole_map

    w = np.array([[5.0, 1.0, 2.0, 3.0], [0.5, 4.0, 4.0, 4.0]])
    out = weigh_whole_map(w, 10.0)
    np.testing.assert_allclose(out[:, 0], [20.0, 40.0])     # 10 x mean(1, 2, 3), 10 x 4
    np.testing.assert_array_equal(out[:, 1:], w[:, 1:])     # the grid is left alone
    assert w[0, 0] == 5.0                                    # the input is not changed
    np.testing.assert_array_equal(weigh_whole_map(w, 0.0)[:, 0], [0.0, 0.0])
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and >= 0"):
            weigh_whole_map(w, bad)
    with pytest.raises(ValueError, match="at least one grid region"):
        weigh_whole_map(np.ones((2, 1)), 3.0)
    # one factor per layer (bench/klw_variants.py keeps each layer's trained multiple)
    np.testing.assert_allclose(weigh_whole_map(w, np.array([10.0, 0.5]))[:, 0], [20.0, 2.0])
    with pytest.raises(ValueError, match="one per layer"):
        weigh_whole_map(w, np.ones(3))
    with pytest.raises(ValueError, match="finite and >= 0"):
        weigh_whole_map(w, np.array([1.0, -1.0]))
