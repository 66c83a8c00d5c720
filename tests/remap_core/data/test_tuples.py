import numpy as np
import pytest

from remap_core.data.tuples import (build_tuples, hardest_negatives, pairwise_squared_distances,
                               sample_anchor_positive)


def _brute_force_negatives(anchors, alabels, pool, plabels, k):
    out = []
    for a, la in zip(anchors, alabels):
        # for each other class, its closest member; then the k closest such classes
        best = {}
        for j, (v, lv) in enumerate(zip(pool, plabels)):
            if lv == la:
                continue
            d = float(np.sum((a - v) ** 2))
            if lv not in best or d < best[lv][0]:
                best[lv] = (d, j)
        out.append([j for _, j in sorted(best.values())[:k]])
    return np.array(out)


def test_pairwise_squared_distances_matches_direct_computation():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 5)), rng.normal(size=(7, 5))
    ref = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(pairwise_squared_distances(a, b), ref, atol=1e-10)


def test_hardest_negatives_are_the_closest_other_class_one_per_class():
    rng = np.random.default_rng(2)
    pool = rng.normal(size=(60, 8))
    plabels = rng.integers(0, 12, size=60)
    anchors = rng.normal(size=(9, 8))
    alabels = rng.integers(0, 12, size=9)
    got = hardest_negatives(anchors, alabels, pool, plabels, k=4)
    np.testing.assert_array_equal(got, _brute_force_negatives(anchors, alabels, pool, plabels, 4))
    for i in range(len(anchors)):
        labels = plabels[got[i]]
        assert len(set(labels)) == 4                       # at most one per class
        assert alabels[i] not in labels                     # never the anchor's class
        d = ((pool[got[i]] - anchors[i]) ** 2).sum(1)
        assert np.all(np.diff(d) >= 0)                      # hardest first


def test_hardest_negative_skips_a_closer_same_class_image_and_a_second_image_of_a_class():
    anchor = np.array([[0.0, 0.0]])
    pool = np.array([[0.1, 0.0],    # class 0 = anchor's class: never a negative
                     [0.2, 0.0],    # class 1: hardest negative
                     [0.3, 0.0],    # class 1 again: skipped
                     [0.5, 0.0]])   # class 2
    got = hardest_negatives(anchor, np.array([0]), pool, np.array([0, 1, 1, 2]), k=2)
    assert got.tolist() == [[1, 3]]


def test_hardest_negatives_says_what_to_do_when_the_pool_has_too_few_classes():
    with pytest.raises(ValueError, match="lower --negatives"):
        hardest_negatives(np.zeros((1, 2)), [0], np.ones((3, 2)), [0, 1, 1], k=2)


def test_anchor_positive_pairs_share_a_class_and_differ():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3])   # class 2 has one image: never an anchor
    a, p = sample_anchor_positive(labels, 30, np.random.default_rng(3))
    assert np.all(labels[a] == labels[p]) and np.all(a != p)
    assert 5 not in a
    with pytest.raises(ValueError, match="at least two images"):
        sample_anchor_positive(np.array([0, 1, 2]), 2, np.random.default_rng(0))


def test_build_tuples_mines_from_a_pool_and_is_seeded():
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(10), 3)
    vecs = rng.normal(size=(30, 6))
    t1 = build_tuples(vecs, labels, 12, 3, np.random.default_rng(7), pool_size=20)
    t2 = build_tuples(vecs, labels, 12, 3, np.random.default_rng(7), pool_size=20)
    np.testing.assert_array_equal(t1.negatives, t2.negatives)
    assert t1.negatives.shape == (12, 3) and len(t1) == 12
    for a, negs in zip(t1.anchors, t1.negatives):
        assert labels[a] not in labels[negs] and len(set(labels[negs])) == 3
    assert set(t1.images()) >= set(t1.anchors) | set(t1.positives)


def test_negatives_never_come_from_the_anchor_s_group():
    anchor = np.array([[0.0, 0.0]])
    pool = np.array([[0.1, 0.0],    # class 1, group 0 (a tile of the anchor's photo): skipped
                     [0.2, 0.0],    # class 2, group 1: hardest allowed negative
                     [0.3, 0.0],    # class 3, group 0: skipped
                     [0.5, 0.0]])   # class 4, group 2
    labels = np.array([1, 2, 3, 4])
    got = hardest_negatives(anchor, np.array([0]), pool, labels, k=2,
                            anchor_groups=np.array([0]), pool_groups=np.array([0, 1, 0, 2]))
    assert got.tolist() == [[1, 3]]
    assert hardest_negatives(anchor, np.array([0]), pool, labels, k=2).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="for both"):
        hardest_negatives(anchor, np.array([0]), pool, labels, k=2, anchor_groups=np.array([0]))
    # build_tuples passes groups through
    vecs = np.concatenate([pool, pool + 5.0])
    t = build_tuples(vecs, np.concatenate([labels, labels]), 6, 1, np.random.default_rng(0),
                     groups=np.concatenate([[0, 1, 0, 2]] * 2))
    g = np.array([0, 1, 0, 2] * 2)
    assert np.all(g[t.negatives[:, 0]] != g[t.anchors])
