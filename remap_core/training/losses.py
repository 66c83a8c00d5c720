"""Metric-learning losses as pure functions on descriptor tensors.

Descriptors are row vectors, batch first. The triplet loss is the one REMAP is trained with
(Husain & Bober, TIP 2019): for an anchor q, a positive p and a negative n,

    max(0, margin + ||q - p||^2 - ||q - n||^2)

with squared Euclidean distances on L2-normalised descriptors (so distances lie in [0, 4]).
"""

from __future__ import annotations

import torch


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise squared Euclidean distance: (..., D), (..., D) -> (...), broadcasting."""
    return (a - b).pow(2).sum(dim=-1)


def triplet_losses(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                   margin: float = 0.1) -> torch.Tensor:
    """Per-triplet hinge losses: (B, D), (B, D), (B, K, D) -> (B, K).

    Every anchor is paired with its positive and each of its K negatives.
    """
    if anchor.shape != positive.shape or anchor.dim() != 2:
        raise ValueError(f"anchor and positive must both be (B, D); got {tuple(anchor.shape)} and "
                         f"{tuple(positive.shape)}")
    if negatives.dim() != 3 or negatives.shape[0] != anchor.shape[0] \
            or negatives.shape[2] != anchor.shape[1]:
        raise ValueError(f"negatives must be (B, K, D) = ({anchor.shape[0]}, K, {anchor.shape[1]}); "
                         f"got {tuple(negatives.shape)}")
    d_pos = squared_distances(anchor, positive).unsqueeze(1)           # (B, 1)
    d_neg = squared_distances(anchor.unsqueeze(1), negatives)          # (B, K)
    return torch.clamp(margin + d_pos - d_neg, min=0.0)


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                 margin: float = 0.1) -> torch.Tensor:
    """Mean triplet loss over all (anchor, negative) pairs: (B, D), (B, D), (B, K, D) -> ()."""
    return triplet_losses(anchor, positive, negatives, margin).mean()


def active_fraction(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                    margin: float = 0.1) -> float:
    """Share of triplets that still violate the margin (loss > 0): a progress signal."""
    with torch.no_grad():
        return float((triplet_losses(anchor, positive, negatives, margin) > 0).float().mean())
