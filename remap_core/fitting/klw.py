"""KL-divergence weighting (KLW) of REMAP regions (Husain & Bober, TIP 2019).

For each (layer, canonical region), the distances between the region vectors of matching image
pairs and of non-matching pairs form two distributions; a region whose two distributions are far
apart (large KL divergence) discriminates well and gets a large weight. These weights initialise
`heads.REMAPHead` (`set_region_weights`), which then trains them with everything else.

The maths (`gaussian_kl`, `histogram_kl`, `kl_region_weights`) is numpy only; the functions that
compute region vectors from a model take torch tensors.

Shapes: region distances are (N_pairs, L_layers, R_canonical) arrays, NaN where a canonical
region had no region on that pair's maps.
"""

from __future__ import annotations

import numpy as np

DIRECTIONS = ("symmetric", "match||nonmatch", "nonmatch||match")


def gaussian_kl(mu_p, var_p, mu_q, var_q):
    """KL(P || Q) between 1-D Gaussians P = N(mu_p, var_p), Q = N(mu_q, var_q) (closed form);
    broadcasts over arrays."""
    mu_p, var_p, mu_q, var_q = (np.asarray(a, dtype=np.float64) for a in (mu_p, var_p, mu_q, var_q))
    return 0.5 * (np.log(var_q / var_p) + (var_p + (mu_p - mu_q) ** 2) / var_q - 1.0)


def histogram_kl(p_samples: np.ndarray, q_samples: np.ndarray, bins: int = 32,
                 pseudocount: float = 0.5) -> float:
    """KL(P || Q) estimated from samples with histograms on shared bins spanning both samples.

    `pseudocount` is added to every bin of both histograms, so the divergence stays finite when
    a bin of Q is empty.
    """
    p = np.asarray(p_samples, dtype=np.float64).ravel()
    q = np.asarray(q_samples, dtype=np.float64).ravel()
    lo, hi = min(p.min(), q.min()), max(p.max(), q.max())
    if hi <= lo:
        return 0.0
    edges = np.linspace(lo, hi, bins + 1)
    hp = np.histogram(p, edges)[0] + pseudocount
    hq = np.histogram(q, edges)[0] + pseudocount
    hp, hq = hp / hp.sum(), hq / hq.sum()
    return float(np.sum(hp * np.log(hp / hq)))


def _kl(p: np.ndarray, q: np.ndarray, method: str, bins: int, min_var: float) -> float:
    if method == "gaussian":
        vp, vq = max(p.var(ddof=1), min_var), max(q.var(ddof=1), min_var)
        return float(gaussian_kl(p.mean(), vp, q.mean(), vq))
    if method == "histogram":
        return histogram_kl(p, q, bins)
    raise ValueError(f"unknown KL method {method!r}; use 'gaussian' or 'histogram'")


def kl_region_weights(match: np.ndarray, nonmatch: np.ndarray, method: str = "gaussian",
                      direction: str = "symmetric", bins: int = 32, min_var: float = 1e-8,
                      min_samples: int = 3) -> np.ndarray:
    """KL divergence between the distance distributions of matching and non-matching pairs,
    per layer and region: match (N_m, L, R), nonmatch (N_n, L, R) -> weights (L, R) >= 0.

    method: "gaussian" fits a normal distribution to each side and uses the closed form (robust
    with a few hundred pairs; the default), "histogram" uses `histogram_kl` with `bins`.
    direction: "match||nonmatch", "nonmatch||match", or "symmetric" (their mean).
    NaN entries (region absent on that pair) are ignored; a (layer, region) with fewer than
    `min_samples` finite distances on either side gets its layer's mean weight.
    """
    match = np.asarray(match, dtype=np.float64)
    nonmatch = np.asarray(nonmatch, dtype=np.float64)
    if match.ndim != 3 or nonmatch.ndim != 3 or match.shape[1:] != nonmatch.shape[1:]:
        raise ValueError(f"match and nonmatch distances must be (N, L, R) arrays with the same "
                         f"(L, R); got {match.shape} and {nonmatch.shape}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose from {DIRECTIONS}")
    n_layers, n_regions = match.shape[1:]
    out = np.full((n_layers, n_regions), np.nan)
    for layer in range(n_layers):
        for r in range(n_regions):
            m = match[:, layer, r]
            n = nonmatch[:, layer, r]
            m, n = m[np.isfinite(m)], n[np.isfinite(n)]
            if len(m) < min_samples or len(n) < min_samples:
                continue
            if direction == "match||nonmatch":
                kl = _kl(m, n, method, bins, min_var)
            elif direction == "nonmatch||match":
                kl = _kl(n, m, method, bins, min_var)
            else:
                kl = 0.5 * (_kl(m, n, method, bins, min_var) + _kl(n, m, method, bins, min_var))
            out[layer, r] = max(kl, 0.0)
    for layer in range(n_layers):
        row = out[layer]
        fill = np.nanmean(row) if np.isfinite(row).any() else 1.0
        row[~np.isfinite(row)] = fill
    return out


# --------------------------------------------------------------------------- from a model

def canonical_region_vectors(head, feats) -> list[np.ndarray]:
    """Region vectors of each image on the head's canonical grid.

    head: a `heads.REMAPHead`; feats: backbone taps [(B, C_l, H_l, W_l)] (torch).
    Returns per layer an array (B, R_canonical, C_l): the L2-normalised mean of the image's
    region vectors that map to each canonical region, NaN where none maps to it.
    """
    import torch

    out = []
    with torch.no_grad():
        for regions, idx in head.region_vectors(feats):
            regions = regions.float().cpu().numpy()
            b, _, c = regions.shape
            acc = np.zeros((b, head.n_regions, c))
            count = np.zeros(head.n_regions)
            for j, k in enumerate(idx):
                acc[:, k] += regions[:, j]
                count[k] += 1
            acc[:, count == 0] = np.nan
            norm = np.linalg.norm(acc, axis=2, keepdims=True)
            out.append(acc / np.maximum(norm, 1e-12))
    return out


def pair_region_distances(vectors: list[np.ndarray], pairs: np.ndarray) -> np.ndarray:
    """Euclidean distances between the canonical region vectors of image pairs.

    vectors: per layer (N_images, R, C_l) (from `canonical_region_vectors`, stacked over
    images); pairs: (P, 2) image indices -> (P, L, R), NaN where a region is missing.
    """
    pairs = np.asarray(pairs, dtype=np.int64)
    return np.stack([np.linalg.norm(v[pairs[:, 0]] - v[pairs[:, 1]], axis=2) for v in vectors],
                    axis=1)


def fit_region_weights(head, batches, match: np.ndarray, nonmatch: np.ndarray,
                       method: str = "gaussian", dtype=np.float64) -> np.ndarray:
    """KLW weights of a REMAP head from matching and non-matching image pairs: the one fitting
    that `remap eval` and `remap train` both use.

    head: a `heads.REMAPHead`; batches: iterable of (positions, taps), taps the backbone
    features [(B, C_l, H_l, W_l)] of the images at those positions (scale 1); match, nonmatch:
    (P, 2) image positions. Only images that some pair uses are kept, their region vectors
    stored as `dtype` (`remap eval` keeps float32, as its recorded results were computed).
    -> weights (L_layers, R_canonical), as `kl_region_weights`.
    """
    match = np.asarray(match, dtype=np.int64)
    nonmatch = np.asarray(nonmatch, dtype=np.int64)
    used = np.unique(np.concatenate([match.ravel(), nonmatch.ravel()]))
    wanted = set(used.tolist())
    per_layer: list[dict[int, np.ndarray]] = []
    for positions, feats in batches:
        for layer, vecs in enumerate(canonical_region_vectors(head, feats)):
            if layer == len(per_layer):
                per_layer.append({})
            for j, i in enumerate(positions):
                if int(i) in wanted:
                    per_layer[layer][int(i)] = vecs[j].astype(dtype, copy=False)
    missing = wanted - set(per_layer[0]) if per_layer else wanted
    if missing:
        raise ValueError(f"no features for {len(missing)} image(s) the pairs use, e.g. "
                         f"{sorted(missing)[:3]}; pass batches that cover every paired image")
    # dense (N_used, R, C) arrays per layer, pairs re-indexed into them
    position = np.full(int(used.max()) + 1, -1, dtype=np.int64)
    position[used] = np.arange(len(used))
    vectors = [np.stack([d[int(i)] for i in used]) for d in per_layer]
    return kl_region_weights(pair_region_distances(vectors, position[match]),
                             pair_region_distances(vectors, position[nonmatch]),
                             method=method)


def weigh_whole_map(weights: np.ndarray, factor: float | np.ndarray) -> np.ndarray:
    """KLW weights (L_layers, R_canonical) with the whole-map region (canonical index 0, present
    when the head includes it) weighed `factor` times the mean weight of the layer's other
    regions: a prior for clutter and occlusion. The whole map's max-pooled vector holds the
    strongest activations wherever the object lies; each grid region, L2-normalised, votes
    equally however little of the object it holds, so a background that fills most of the image
    outvotes the object. factor 0 drops the whole map; the grid weights are left as they are.
    `factor` is one number for every layer or one per layer (L,). -> a new (L, R) array."""
    w = np.array(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] < 2:
        raise ValueError(f"KLW weights must be (layers, regions) with the whole map and at least "
                         f"one grid region, got shape {w.shape}")
    f = np.asarray(factor, dtype=np.float64)
    if f.shape not in ((), (len(w),)):
        raise ValueError(f"the whole-map weight factor must be one number or one per layer "
                         f"({len(w)}), got shape {f.shape}")
    if not np.isfinite(f).all() or (f < 0).any():
        raise ValueError(f"the whole-map weight factor must be finite and >= 0, got {factor}")
    w[:, 0] = f * w[:, 1:].mean(axis=1)
    return w
