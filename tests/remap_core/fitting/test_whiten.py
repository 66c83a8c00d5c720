"""Whitening learned from descriptors, checked against numpy / scikit-learn references."""

import numpy as np
import pytest
import torch

from remap_core.descriptor.model import build_model
from remap_core.fitting.whiten import (apply_whitening, learned_whitening, pca_whitening,
                               set_model_whitening)


def _correlated(n=400, d=12, seed=0):
    rng = np.random.RandomState(seed)
    a = rng.randn(d, d) * np.linspace(3, 0.2, d)
    return rng.randn(n, d) @ a.T + rng.randn(d) * 5


def test_pca_whitened_training_data_has_identity_covariance():
    x = _correlated()
    mean, p = pca_whitening(x)
    y = (x - mean) @ p.T
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(x.shape[1]), atol=1e-6)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-9)


def test_pca_whitening_matches_scikit_learn_up_to_sign():
    from sklearn.decomposition import PCA

    x = _correlated(d=10)
    mean, p = pca_whitening(x, dim=6)
    ours = (x - mean) @ p.T
    ref = PCA(n_components=6, whiten=True, svd_solver="full").fit_transform(x)
    signs = np.sign((ours * ref).sum(0))
    np.testing.assert_allclose(ours * signs, ref, atol=1e-6)


def test_pca_whitening_refuses_more_dims_than_the_data_rank():
    x = _correlated(n=5, d=12)
    with pytest.raises(ValueError, match="rank 4"):
        pca_whitening(x, dim=8)


def test_learned_whitening_whitens_pair_differences_and_diagonalises_the_data():
    rng = np.random.RandomState(1)
    d, n_cls = 8, 60
    centres = _correlated(n=n_cls, d=d, seed=2)
    noise_shape = rng.randn(d, d)
    x = np.concatenate([centres + rng.randn(n_cls, d) @ noise_shape.T * 0.3 for _ in range(3)])
    pairs = np.array([(c, c + k * n_cls) for c in range(n_cls) for k in (1, 2)])
    mean, p = learned_whitening(x, pairs, shrinkage=0.0)
    np.testing.assert_allclose(mean, x[pairs[:, 0]].mean(0))
    diff = (x[pairs[:, 0]] - x[pairs[:, 1]]) @ p.T
    np.testing.assert_allclose(diff.T @ diff / len(diff), np.eye(d), atol=1e-8)
    y = (x - mean) @ p.T
    scatter = y.T @ y
    off = scatter - np.diag(np.diag(scatter))
    assert np.abs(off).max() < 1e-8 * np.abs(scatter).max()
    assert np.all(np.diff(np.diag(scatter)) <= 1e-9)  # largest variance first


def test_model_whitening_layer_equals_numpy_whitening_of_pooled_descriptors():
    torch.manual_seed(0)
    model = build_model({"head": "gem", "max_side": 64}).eval()
    x = torch.rand(6, 3, 64, 96) * 255
    with torch.no_grad():
        pooled = model.pooled(x).numpy()
    mean, p = pca_whitening(pooled, dim=4)
    set_model_whitening(model, mean, p)
    assert model.config["whiten_dim"] == 4 and model.dim == 4
    with torch.no_grad():
        got = model(x).numpy()
    np.testing.assert_allclose(got, apply_whitening(pooled, mean, p), atol=1e-4)


def test_model_whitening_rejects_a_whitening_of_the_wrong_size():
    model = build_model({"head": "mac"})
    with pytest.raises(ValueError, match="learn it on this model"):
        set_model_whitening(model, np.zeros(5), np.eye(5))


def test_learned_whitening_with_fewer_descriptors_than_dimensions_works_in_their_span():
    rng = np.random.RandomState(3)
    x = rng.randn(30, 80)
    pairs = np.array([(i, i + 15) for i in range(15)])
    mean, p = learned_whitening(x, pairs, dim=10)
    assert p.shape == (10, 80)
    # rows lie in the span of the centred training data
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    span = vt[s > s[0] * 1e-10]
    np.testing.assert_allclose(p @ span.T @ span, p, atol=1e-8)
    with pytest.raises(ValueError, match="rank"):
        learned_whitening(x, pairs, dim=40)


def test_pca_whitening_shrinkage_scales_each_direction_by_the_shrunk_eigenvalue():
    from remap_core.fitting.whiten import pca_whitening

    rng = np.random.default_rng(5)
    x = rng.normal(size=(500, 6)) * np.array([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])
    _, full = pca_whitening(x, 4)
    _, shrunk = pca_whitening(x, 4, shrinkage=0.5)
    eig = np.linalg.svd(x - x.mean(0), compute_uv=False)[:4] ** 2 / (len(x) - 1)
    # same directions; row norms 1/sqrt(eig) (full) and 1/sqrt(eig + 0.5 * mean(eig)) (shrunk)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1 / np.sqrt(eig), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(shrunk, axis=1),
                               1 / np.sqrt(eig + 0.5 * eig.mean()), rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(full / np.linalg.norm(full, axis=1, keepdims=True) *
                                             shrunk / np.linalg.norm(shrunk, axis=1, keepdims=True),
                                             axis=1)), 1.0, rtol=1e-9)
    with pytest.raises(ValueError, match="shrinkage"):
        pca_whitening(x, 4, shrinkage=-1)
