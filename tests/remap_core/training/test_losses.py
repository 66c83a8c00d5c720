import numpy as np
import pytest
import torch

from remap_core.training.losses import active_fraction, triplet_loss, triplet_losses


def _numpy_triplet(a, p, n, margin):
    out = np.zeros((a.shape[0], n.shape[1]))
    for i in range(a.shape[0]):
        dp = np.sum((a[i] - p[i]) ** 2)
        for k in range(n.shape[1]):
            dn = np.sum((a[i] - n[i, k]) ** 2)
            out[i, k] = max(0.0, margin + dp - dn)
    return out


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_triplet_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    a, p, n = _unit(rng, 6, 8), _unit(rng, 6, 8), _unit(rng, 6, 3, 8)
    for margin in (0.1, 0.5, 1.5):
        ref = _numpy_triplet(a, p, n, margin)
        got = triplet_losses(torch.tensor(a), torch.tensor(p), torch.tensor(n), margin).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
        total = triplet_loss(torch.tensor(a), torch.tensor(p), torch.tensor(n), margin)
        assert float(total) == pytest.approx(ref.mean(), rel=1e-10)
        frac = active_fraction(torch.tensor(a), torch.tensor(p), torch.tensor(n), margin)
        assert frac == pytest.approx((ref > 0).mean())


def test_triplet_loss_is_zero_when_negatives_are_far_beyond_the_margin():
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0]])
    n = torch.tensor([[[-1.0, 0.0], [0.0, 1.0]]])   # squared distances 4 and 2
    assert float(triplet_loss(a, p, n, margin=0.5)) == 0.0
    # margin 2.5: the far negative (4) still satisfies it, the near one (2) misses by 0.5
    assert float(triplet_loss(a, p, n, margin=2.5)) == pytest.approx(0.25)


def test_triplet_loss_gradient_pulls_positive_and_pushes_negative():
    a = torch.tensor([[1.0, 0.0]], requires_grad=True)
    p = torch.tensor([[0.0, 1.0]], requires_grad=True)
    n = torch.tensor([[[0.9, 0.1]]], requires_grad=True)
    triplet_loss(a, p, n, margin=0.1).backward()
    # moving the positive along its gradient's negative brings it towards the anchor
    assert float((p.grad * (a - p).detach()).sum()) < 0
    assert float((n.grad * (a.unsqueeze(1) - n).detach()).sum()) > 0


def test_triplet_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="negatives must be"):
        triplet_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, 1, 4))
    with pytest.raises(ValueError, match="anchor and positive"):
        triplet_loss(torch.zeros(2, 4), torch.zeros(2, 5), torch.zeros(2, 1, 4))
