"""alpha query expansion and database-side augmentation: the numpy functions against a loop
written from the definitions, and query expansion through a built index."""

import numpy as np
import pytest

from index_builder.rerank import (alpha_query_expansion, database_augmentation,
                                  weighted_expansion)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_expand(q, vecs, sims, alpha):
    acc = q.astype(np.float64).copy()
    for v, s in zip(vecs, sims):
        if np.isfinite(s) and s > 0:
            acc += (s ** alpha) * v
    return acc / np.linalg.norm(acc)


def test_weighted_expansion_matches_the_definition_and_ignores_negative_and_missing():
    rng = np.random.default_rng(0)
    q = _unit(rng.normal(size=(3, 8)))
    nb = _unit(rng.normal(size=(3, 4, 8)))
    sims = np.array([[0.9, 0.5, -0.2, 0.1], [np.nan, 0.7, 0.3, 0.0], [0.2, 0.2, 0.2, 0.2]])
    got = weighted_expansion(q, nb, sims, alpha=3.0)
    for i in range(3):
        np.testing.assert_allclose(got[i], _reference_expand(q[i], nb[i], sims[i], 3.0),
                                   rtol=1e-5, atol=1e-6)


def test_alpha_query_expansion_uses_only_the_top_k_and_k0_is_the_query():
    rng = np.random.default_rng(1)
    q = _unit(rng.normal(size=(2, 6)))
    nb = _unit(rng.normal(size=(2, 5, 6)))
    s = np.sort(rng.uniform(0.1, 0.9, (2, 5)))[:, ::-1]
    got = alpha_query_expansion(q, nb, s, k=2, alpha=1.0)
    for i in range(2):
        np.testing.assert_allclose(got[i], _reference_expand(q[i], nb[i, :2], s[i, :2], 1.0),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alpha_query_expansion(q, nb, s, k=0), q, rtol=1e-6)


def test_database_augmentation_averages_each_vector_with_its_nearest_others():
    rng = np.random.default_rng(2)
    x = _unit(rng.normal(size=(40, 16)))
    got = database_augmentation(x, k=3, alpha=2.0, batch=7)   # several blocks
    sims = x @ x.T
    for i in range(40):
        s = sims[i].copy()
        s[i] = -np.inf
        nn = np.argsort(-s)[:3]
        np.testing.assert_allclose(got[i], _reference_expand(x[i], x[nn], s[nn], 2.0),
                                   rtol=1e-4, atol=1e-5)


def test_query_expansion_through_an_index_matches_the_numpy_definition(tmp_path):
    faiss = pytest.importorskip("faiss")
    from index_builder.search import RemapIndex
    from index_builder.id_map import IdMap
    import pyarrow as pa

    rng = np.random.default_rng(3)
    x = _unit(rng.normal(size=(200, 32))).astype(np.float32)
    ids = rng.integers(-2**62, 2**62, 200)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(32))
    index.add_with_ids(x, ids)
    table = pa.table({"id": pa.array(ids, pa.int64()),
                      "uri": pa.array([f"img{i}.jpg" for i in range(200)])})
    idx = RemapIndex("mem://", {"model": "m", "dimension": 32}, index, IdMap.from_tables([table]))
    q = _unit(x[:5] + 0.3 * rng.normal(size=(5, 32))).astype(np.float32)
    hits = idx.search_vectors(q, k=10, qe=3, qe_alpha=3.0)
    sims = q @ x.T
    for i in range(5):
        top = np.argsort(-sims[i])[:3]
        expanded = _reference_expand(q[i], x[top], sims[i, top], 3.0)
        want = np.argsort(-(x @ expanded))[:10]
        assert [h.uri for h in hits[i]] == [f"img{j}.jpg" for j in want]
        np.testing.assert_allclose([h.score for h in hits[i]], (x @ expanded)[want], rtol=1e-4)
    plain = idx.search_vectors(q, k=10)          # the manifest has no default: no expansion
    assert [h.uri for h in plain[0]][0] == "img0.jpg"
    with pytest.raises(ValueError, match="qe must be >= 0"):
        idx.search_vectors(q, k=10, qe=-1)


def test_reranked_similarities_compose_dba_then_query_expansion_as_defined():
    from index_builder.rerank import reranked_similarities

    rng = np.random.default_rng(4)
    x = _unit(rng.normal(size=(30, 8))).astype(np.float32)
    q = _unit(rng.normal(size=(5, 8))).astype(np.float32)
    np.testing.assert_allclose(reranked_similarities(q, x), q @ x.T, rtol=1e-6)
    db = database_augmentation(x, k=2, alpha=3.0)
    got = reranked_similarities(q, x, qe=2, dba=2, alpha=3.0)
    for i in range(5):
        s = db @ q[i]
        top = np.argsort(-s)[:2]
        expanded = _reference_expand(q[i], db[top], s[top], 3.0)
        np.testing.assert_allclose(got[i], db @ expanded, rtol=1e-4, atol=1e-5)


def test_index_dba_stores_the_database_augmentation_of_the_embeddings(tmp_path, capsys):
    """`remap index --dba 2` on a Flat index: the stored vectors are
    rerank.database_augmentation of the embeddings, the manifest says so, and a search
    without query expansion ranks by inner products with the augmented vectors."""
    import json

    from index_builder.search import open_index
    from index_builder.synthetic import clustered_vectors, synthetic_uris, write_run
    from remap_cli import main as remap
    from remap_store.schema import stable_ids

    n, d = 300, 32
    X = clustered_vectors(n, d, clusters=30, seed=5)
    uris = synthetic_uris(n)
    store, out = str(tmp_path / "store"), str(tmp_path / "idx")
    write_run(store, "20260101T000000Z-aaaaaa", uris, X, shards=3)
    assert remap(["index", "--embeddings", store, "--output", out, "--factory", "Flat",
                  "--dba", "2", "--no-progress", "--recall-queries", "50"]) == 0
    capsys.readouterr()
    idx = open_index(out)
    rerank = idx.manifest["rerank"]
    assert rerank["dba"] == 2 and rerank["dba_alpha"] == 3.0 and rerank["dba_vectors"] == n
    want = database_augmentation(X, k=2, alpha=3.0)
    ids = stable_ids(uris)
    got = np.stack([idx.index.reconstruct(int(i)) for i in ids])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, X, atol=1e-3)                    # it did change them
    assert idx.manifest["recall"]["recall@1"] == 1.0             # measured on what is stored
    q = clustered_vectors(5, d, clusters=30, seed=6)
    sims = q @ want.T
    order = np.argsort(-sims, axis=1)[:, :5]
    hits = idx.search_vectors(q, k=5, qe=0)
    for r in range(5):
        assert [h.id for h in hits[r]] == list(ids[order[r]])
        np.testing.assert_allclose([h.score for h in hits[r]], sims[r, order[r]], rtol=1e-5)

    assert rerank["dba_knn"]["knn"] == "exact"

    # rebuilt into the same folder with --dba 0: the embeddings as they are, and it says so
    assert remap(["index", "--embeddings", store, "--output", out, "--factory", "Flat",
                  "--no-progress", "--recall-queries", "50", "--dba", "0"]) == 0
    idx = open_index(out)
    assert idx.manifest["rerank"]["dba"] == 0 and "dba_vectors" not in idx.manifest["rerank"]
    np.testing.assert_allclose(idx.index.reconstruct(int(ids[7])), X[7], rtol=1e-6)
    capsys.readouterr()
    assert remap(["index", "--embeddings", store, "--output", out, "--dba", "-1"]) == 2
    assert "--dba must be >= 0" in capsys.readouterr().err


def test_index_applies_dba_by_default_and_skips_it_above_the_memory_limit(tmp_path, monkeypatch,
                                                                          caplog):
    """`remap index` without --dba augments with DEFAULT_DBA neighbours; a collection whose
    vectors take more than DBA_DEFAULT_MAX_BYTES is indexed as embedded, with a warning that
    names --dba; --dba K then augments it anyway."""
    import logging

    import index_builder.build as build
    from index_builder.search import open_index
    from index_builder.synthetic import clustered_vectors, synthetic_uris, write_run
    from remap_store.schema import stable_ids

    n, d = 200, 16
    X = clustered_vectors(n, d, clusters=20, seed=7)
    uris = synthetic_uris(n)
    store = str(tmp_path / "store")
    write_run(store, "20260101T000000Z-aaaaaa", uris, X, shards=2)
    ids = stable_ids(uris)
    want = database_augmentation(X, k=build.DEFAULT_DBA, alpha=3.0)

    m = build.build_index(store, str(tmp_path / "a"), "Flat", recall_queries=20, progress=False)
    assert m["rerank"]["dba"] == build.DEFAULT_DBA == 2 and m["rerank"]["dba_vectors"] == n
    got = np.stack([open_index(str(tmp_path / "a")).index.reconstruct(int(i)) for i in ids])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    monkeypatch.setattr(build, "DBA_DEFAULT_MAX_BYTES", 4 * n * d - 1)
    with caplog.at_level(logging.WARNING, logger="index_builder.build"):
        m = build.build_index(store, str(tmp_path / "b"), "Flat", recall_queries=20,
                              progress=False)
    assert m["rerank"]["dba"] == 0
    assert "dba: skipped" in caplog.text and "--dba 2" in caplog.text
    got = open_index(str(tmp_path / "b")).index.reconstruct(int(ids[3]))
    np.testing.assert_allclose(got, X[3], rtol=1e-6)
    m = build.build_index(store, str(tmp_path / "c"), "Flat", recall_queries=20, progress=False,
                          dba=2)
    assert m["rerank"]["dba"] == 2
