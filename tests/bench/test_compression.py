"""bench/compression.py ranks a whole database by an index's own scores."""

import numpy as np

from index_builder.train import inner_index

from script_modules import load_bench

compression = load_bench("compression")


def numpy_ranking(queries, database):
    """Database ids by decreasing inner product, ties by id (float64, stable argsort)."""
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")


def test_flat_index_ranking_equals_numpy_ranking_ties_broken_by_id():
    # small integer vectors: exact in float32, and many exactly tied scores
    rng = np.random.default_rng(0)
    db = rng.integers(-2, 3, (300, 8)).astype(np.float32)
    q = rng.integers(-2, 3, (25, 8)).astype(np.float32)
    assert len(np.unique(q[0] @ db.T)) < 100            # ties are there to be broken
    ranks = compression.rank_with_index(compression.build_index("Flat", db[:0], db), q, len(db))
    np.testing.assert_array_equal(ranks, numpy_ranking(q, db))


def test_ivf_ranking_probes_every_list_so_it_is_exact():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(8, 16))
    db = (centres[rng.integers(0, 8, 400)] + 0.3 * rng.normal(size=(400, 16))).astype(np.float32)
    q = (centres[rng.integers(0, 8, 20)] + 0.3 * rng.normal(size=(20, 16))).astype(np.float32)
    index = compression.build_index("IVF8,Flat", db, db)      # nprobe 1 until ranked
    ranks = compression.rank_with_index(index, q, len(db))
    assert sorted(ranks[0]) == list(range(len(db)))
    np.testing.assert_array_equal(ranks, numpy_ranking(q, db))


def test_pq_ranking_is_by_inner_product_with_the_decoded_codes():
    rng = np.random.default_rng(2)
    db = rng.normal(size=(600, 16)).astype(np.float32)
    q = rng.normal(size=(10, 16)).astype(np.float32)
    index = compression.build_index("PQ4x8", db, db)
    pq = inner_index(index)
    decoded = pq.sa_decode(pq.sa_encode(db))
    ranks = compression.rank_with_index(index, q, len(db))
    # asymmetric distance: the exact query against each database vector's PQ reconstruction
    scores = np.take_along_axis(q.astype(np.float64) @ decoded.astype(np.float64).T, ranks, 1)
    assert (np.diff(scores, axis=1) <= 1e-5).all()
    assert sorted(ranks[0]) == list(range(len(db)))
    assert not (ranks == numpy_ranking(q, db)).all()       # the codes, not the floats, rank


def test_search_default_reranking_on_a_flat_index_equals_the_numpy_reference():
    """--rerank qe+dba: DBA'd database, alpha-QE over the index's decoded top results, searched
    again; on Flat codes that is rerank.reranked_similarities."""
    from index_builder.rerank import database_augmentation, reranked_similarities

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(10, 16))
    db = (centres[rng.integers(0, 10, 200)] + 0.4 * rng.normal(size=(200, 16))).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:15] + 0.05 * rng.normal(size=(15, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    aug = database_augmentation(db, 2, 3.0)
    index = compression.build_index("Flat", aug[:0], aug)
    expanded = compression.expand_queries(index, q, 2, 3.0)
    ranks = compression.rank_with_index(index, expanded, len(db))
    want = reranked_similarities(q, db, qe=2, dba=2, alpha=3.0)
    got = np.take_along_axis(want, ranks, 1)
    assert (np.diff(got, axis=1) <= 1e-5).all()           # ranked by the reference's order
    assert not np.allclose(want, q @ db.T)                 # the re-ranking changed the scores
