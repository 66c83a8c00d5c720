"""All-kNN for database-side augmentation: exact search against a numpy reference, the IVF
search's neighbours and measured recall, and the augmentation they feed."""

import numpy as np

from index_builder.knn import approximate_nearest_others, exact_nearest_others, nearest_others
from index_builder.rerank import augment_with_neighbours, database_augmentation
from index_builder.synthetic import clustered_vectors


def _numpy_nearest_others(x, k):
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    nn = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return nn, np.take_along_axis(s, nn, axis=1)


def test_exact_nearest_others_match_numpy_and_never_return_the_row_itself():
    x = clustered_vectors(700, 24, clusters=40, seed=1)
    nn, sims = exact_nearest_others(x, 3)
    ref_nn, ref_s = _numpy_nearest_others(x, 3)
    assert nn.shape == (700, 3) and sims.dtype == np.float32
    assert not (nn == np.arange(700)[:, None]).any()
    np.testing.assert_allclose(sims, ref_s, rtol=1e-5, atol=1e-5)
    assert (nn == ref_nn).mean() > 0.99           # equal up to ties


def test_exact_nearest_others_with_duplicates_keeps_the_duplicate_not_itself():
    x = clustered_vectors(50, 8, clusters=5, seed=2)
    x[10] = x[11]                                  # two identical rows: each is the other's 1-NN
    nn, sims = exact_nearest_others(x, 2)
    assert nn[10, 0] == 11 and nn[11, 0] == 10
    np.testing.assert_allclose(sims[10, 0], 1.0, atol=1e-5)


def test_approximate_nearest_others_find_most_true_neighbours_and_report_their_recall():
    x = clustered_vectors(6000, 32, clusters=300, seed=3)
    nn, sims, info = approximate_nearest_others(x, 2, seed=0)
    ref_nn, ref_s = _numpy_nearest_others(x, 2)
    assert info["knn"] == "ivf" and info["factory"].startswith("IVF")
    assert not (nn == np.arange(len(x))[:, None]).any()
    found = np.mean([len(np.intersect1d(a, b)) / 2 for a, b in zip(nn, ref_nn)])
    assert found > 0.9
    assert abs(info["recall@2"] - found) < 0.05   # the sampled recall estimates the true one
    ok = nn >= 0                                   # the similarities are those of the rows found
    np.testing.assert_allclose(sims[ok], np.einsum("nd,nd->n", np.repeat(x, 2, 0).reshape(
        len(x), 2, -1)[ok], x[nn[ok]]), rtol=1e-4, atol=1e-4)


def test_nearest_others_is_exact_up_to_the_threshold_and_approximate_above():
    x = clustered_vectors(3000, 16, clusters=100, seed=4)
    assert nearest_others(x, 2, exact_max=3000)[2]["knn"] == "exact"
    assert nearest_others(x, 2, exact_max=2999)[2]["knn"] == "ivf"
    nn, sims, info = nearest_others(x[:1], 2)
    assert nn.shape == (1, 0) and info["knn"] == "none"
    assert nearest_others(x[:3], 5)[0].shape == (3, 2)     # k capped at N - 1


def test_augment_with_neighbours_equals_database_augmentation_on_exact_neighbours():
    x = clustered_vectors(400, 16, clusters=30, seed=5)
    nn, sims, _ = nearest_others(x, 2)
    np.testing.assert_allclose(augment_with_neighbours(x, nn, sims, 3.0),
                               database_augmentation(x, 2, 3.0), rtol=1e-5, atol=1e-6)
    # a missing neighbour (-1) adds nothing
    nn[0, 1] = -1
    want = x[0] + max(sims[0, 0], 0) ** 3 * x[nn[0, 0]]
    np.testing.assert_allclose(augment_with_neighbours(x, nn, sims, 3.0)[0],
                               want / np.linalg.norm(want), rtol=1e-5, atol=1e-6)


def test_approximate_search_raises_nprobe_until_the_sampled_recall_reaches_the_target():
    from index_builder.knn import MIN_GAIN, NPROBES

    x = clustered_vectors(6000, 32, clusters=1500, spread=1.0, seed=6)
    _, _, low = approximate_nearest_others(x, 2, target_recall=0.0)
    assert list(low["recall_by_nprobe"]) == [str(NPROBES[0])] and low["nprobe"] == NPROBES[0]
    _, _, high = approximate_nearest_others(x, 2, target_recall=1.01)   # never reached
    recalls = list(high["recall_by_nprobe"].values())
    tried = [int(p) for p in high["recall_by_nprobe"]]
    assert tried == list(NPROBES[:len(tried)]) and len(tried) >= 2
    assert recalls == sorted(recalls) and recalls[-1] > recalls[0]
    # it stopped where one more doubling gained less than MIN_GAIN (keeping the smaller nprobe),
    # or ran out of nprobes to try
    gains = np.diff(recalls)
    assert (gains[:-1] >= MIN_GAIN).all()
    if gains[-1] < MIN_GAIN:
        assert high["nprobe"] == tried[-2]
    else:
        assert high["nprobe"] == tried[-1]


def test_with_an_hnsw_graph_over_the_centroids_the_neighbours_are_still_found():
    """From 1,000 IVF lists on the centroids are searched through an HNSW graph, and the
    neighbours are still found. (What FAISS's default graph width cost shows only at 200k+
    vectors of 256-D, too large here: bench/dba_knn.py measures it.)"""
    x = clustered_vectors(70_000, 16, clusters=3500, seed=8)
    nn, _, info = approximate_nearest_others(x, 2, seed=0)
    assert "HNSW" in info["factory"]
    sample = np.random.default_rng(1).choice(len(x), 300, replace=False)
    truth, _ = exact_nearest_others(x, 2, queries=sample)
    found = np.mean([len(np.intersect1d(a, b)) / 2 for a, b in zip(nn[sample], truth)])
    assert found >= 0.97 and info["recall@2"] >= 0.97
