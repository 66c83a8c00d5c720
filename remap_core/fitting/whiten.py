"""Descriptor whitening learned from data, as pure numpy functions, and the one way to put a
learned whitening into a RetrievalNet (its `whiten` Linear).

A whitening is a pair (mean (D,), projection (d, D)); a descriptor x (D,) becomes
projection @ (x - mean), then L2-normalised by the model. Rows of the projection are ordered by
decreasing variance, so keeping the first d rows is a dimensionality reduction.

- `pca_whitening`: PCA + scaling to unit variance (Jégou & Chum, ECCV 2012).
- `learned_whitening`: Radenović et al.'s "learned whitening" (Lw, TPAMI 2018): whiten the
  differences of matching pairs (intra-class covariance to identity), then rotate to the PCA
  basis of the data in that space.
"""

from __future__ import annotations

import numpy as np


def _as_matrix(x: np.ndarray, name: str = "descriptors") -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be an (N, D) array with N >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf; check the images that produced them")
    return x


def pca_whitening(x: np.ndarray, dim: int | None = None, eps: float = 1e-9,
                  shrinkage: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """PCA-whitening of descriptors x (N, D) -> (mean (D,), projection (d, D)).

    (x - mean) @ projection.T has identity covariance (denominator N - 1) on the training data.
    d = dim, or the rank of the centred data when None; asking for more than the rank is an
    error (the extra directions would be pure noise blown up to unit variance).
    `eps` is added to the eigenvalues before the inverse square root, and so is `shrinkage` x
    the mean of the kept eigenvalues: 0 whitens fully; larger values scale the weak directions
    up less (noise in them is not blown up to unit variance), tending to plain PCA.
    """
    x = _as_matrix(x)
    n, d_in = x.shape
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    eig = s ** 2 / (n - 1)
    rank = int((eig > eig[0] * 1e-10).sum()) if eig[0] > 0 else 0
    if rank == 0:
        raise ValueError("descriptors are all identical; cannot learn a whitening")
    dim = rank if dim is None else int(dim)
    if not 1 <= dim <= rank:
        raise ValueError(f"whitening dim {dim} exceeds the rank {rank} of {n} training "
                         f"descriptors of size {d_in}; use more images or a smaller whiten_dim")
    if shrinkage < 0:
        raise ValueError(f"whitening shrinkage must be >= 0, got {shrinkage}")
    projection = vt[:dim] / np.sqrt(eig[:dim] + eps + shrinkage * eig[:dim].mean())[:, None]
    return mean, projection


def learned_whitening(x: np.ndarray, pairs: np.ndarray, dim: int | None = None,
                      shrinkage: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Radenović's learned whitening from descriptors x (N, D) and matching pairs (P, 2) of
    row indices into x -> (mean (D,), projection (d, D)).

    mean is the mean of the pairs' first members (as in cnnimageretrieval-pytorch). The
    covariance of the pair differences, shrunk toward `shrinkage` x its mean eigenvalue (so it
    is invertible with few pairs), becomes the identity; the data is then rotated to its
    principal axes in that space, largest variance first, and the first d axes kept (all when
    None). When there are fewer descriptors than dimensions (N - 1 < D), everything happens in
    the span of the centred training data (an orthonormal PCA basis, no scaling): directions
    the training data never visits carry no information to whiten.
    """
    x = _as_matrix(x)
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) == 0:
        raise ValueError(f"pairs must be a non-empty (P, 2) array of indices, got {pairs.shape}")
    if pairs.min() < 0 or pairs.max() >= len(x):
        raise ValueError(f"pair indices must lie in [0, {len(x)})")
    mean = x[pairs[:, 0]].mean(axis=0)
    basis = None
    if x.shape[0] - 1 < x.shape[1]:
        _, sv, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
        basis = vt[sv > sv[0] * 1e-10]                      # (r, D) orthonormal rows
    z = x if basis is None else x @ basis.T
    zmean = mean if basis is None else mean @ basis.T
    d_in = z.shape[1]
    diff = z[pairs[:, 0]] - z[pairs[:, 1]]
    cov_s = diff.T @ diff / len(diff)
    cov_s += shrinkage * max(np.trace(cov_s) / d_in, 1e-12) * np.eye(d_in)
    # cov_s = L L^T; P1 = L^-1 whitens the pair differences.
    p1 = np.linalg.inv(np.linalg.cholesky(cov_s))
    y = (z - zmean) @ p1.T
    eigval, eigvec = np.linalg.eigh(y.T @ y)
    order = np.argsort(eigval)[::-1]
    projection = eigvec[:, order].T @ p1
    if basis is not None:
        projection = projection @ basis
    dim = d_in if dim is None else int(dim)
    if not 1 <= dim <= d_in:
        raise ValueError(f"whitening dim {dim} must be in [1, {d_in}] (the rank of the "
                         f"training descriptors); use more images or a smaller whiten_dim")
    return mean, projection[:dim]


def apply_whitening(x: np.ndarray, mean: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Whiten and L2-normalise descriptors: (N, D) -> (N, d), as the model does."""
    y = (np.asarray(x, dtype=np.float64) - mean) @ projection.T
    return y / (np.linalg.norm(y, axis=1, keepdims=True) + 1e-12)


def set_model_whitening(model, mean: np.ndarray, projection: np.ndarray) -> None:
    """Put a learned whitening into a RetrievalNet: its `whiten` Linear becomes
    projection @ (v - mean), and `config["whiten_dim"]` the output size (so checkpoints rebuild
    it). The head's output size must equal D."""
    import torch
    from torch import nn

    projection = np.asarray(projection, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    d_out, d_in = projection.shape
    if d_in != model.head.out_dim or mean.shape != (d_in,):
        raise ValueError(f"whitening learned on {d_in}-D descriptors but the model's head gives "
                         f"{model.head.out_dim}-D; learn it on this model's `pooled` outputs")
    linear = nn.Linear(d_in, d_out, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(projection).float())
        linear.bias.copy_(torch.from_numpy(-(projection @ mean)).float())
    model.whiten = linear.to(model.device)
    model.config["whiten_dim"] = int(d_out)


def fit_whitening(x_by_scale, kind: str, dim: int, pairs: np.ndarray | None = None,
                  shrinkage: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The whitening of pooled descriptors that `remap eval` and `remap train` both learn:
    x_by_scale (S, N, D), the pooled (pre-whitening) descriptors of N images at S scales, each
    scale a sample of its own. kind "pca": `pca_whitening`; "learned": `learned_whitening` from
    `pairs` (P, 2) matching image positions, paired within every scale. `shrinkage`: see
    `pca_whitening` (pca only).
    -> (mean (D,), projection (dim, D))."""
    x_by_scale = [np.asarray(x) for x in x_by_scale]
    n = len(x_by_scale[0])
    x = np.concatenate(x_by_scale)
    if kind == "pca":
        return pca_whitening(x, dim, shrinkage=shrinkage)
    if kind == "learned":
        if pairs is None:
            raise ValueError("learned whitening needs matching pairs")
        pairs = np.asarray(pairs, dtype=np.int64)
        pairs = np.concatenate([pairs + s * n for s in range(len(x_by_scale))])
        return learned_whitening(x, pairs, dim)
    raise ValueError(f"unknown whitening {kind!r}; use 'pca' or 'learned'")
