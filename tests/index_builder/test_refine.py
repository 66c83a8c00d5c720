"""Re-ranking on stored vectors (`remap index --refine K`, index_builder.refine): candidates of a
compressed index re-scored with float16 copies of the vectors. References are numpy rankings of
the vectors read back from the embedding shards, never the code's own output."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from index_builder.manifest import MANIFEST_NAME
from index_builder.refine import REFINE_FILE, RefinedIndex, refine_search
from index_builder.search import open_index
from index_builder.synthetic import clustered_vectors, synthetic_uris, write_run
from objectstore import fake_gcs  # noqa: F401  (pytest fixture)
from remap_cli import main as remap
from remap_store.schema import stable_ids

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

N, DIM = 6000, 32
PQ = "IVF16,PQ4x4"      # 4 sub-quantizers of 16 centroids: coarse codes that cap recall


def test_refine_search_ranks_the_candidates_by_their_stored_vectors():
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(np.arange(-2**62, 2**62, 2**50), 300, replace=False))
    V = rng.normal(size=(300, 8)).astype(np.float16)
    xq = rng.normal(size=(5, 8)).astype(np.float32)
    cand = np.stack([rng.choice(ids, 40, replace=False) for _ in range(5)])
    cand[1, 10:] = -1                       # fewer candidates than k for one query
    cand[2, 3] = 12345                      # an id the map does not hold is dropped
    scores, got = refine_search(xq, cand, ids, V, k=15)
    for q in range(5):
        keep = [i for i in cand[q] if i in set(ids.tolist())]
        s = np.array([V[np.searchsorted(ids, i)].astype(np.float32) @ xq[q] for i in keep])
        order = np.argsort(-s, kind="stable")[:15]
        n = len(order)
        assert got[q, :n].tolist() == [keep[j] for j in order]
        np.testing.assert_allclose(scores[q, :n], s[order], rtol=1e-6)
        assert (got[q, n:] == -1).all() and np.isneginf(scores[q, n:]).all()
    assert (got[1, 10:] == -1).all()


def test_refine_search_in_query_blocks_gives_the_same_results(monkeypatch):
    import index_builder.refine as refine

    rng = np.random.default_rng(2)
    ids = np.arange(1000, dtype=np.int64) * 7 - 3000
    V = rng.normal(size=(1000, 8)).astype(np.float16)
    xq = rng.normal(size=(9, 8)).astype(np.float32)
    cand = np.stack([rng.choice(ids, 50, replace=False) for _ in range(9)])
    whole = refine_search(xq, cand, ids, V, 10)
    monkeypatch.setattr(refine, "BLOCK_FLOATS", 2 * 50 * 8)     # two queries per block
    blocks = refine_search(xq, cand, ids, V, 10)
    np.testing.assert_array_equal(whole[1], blocks[1])
    np.testing.assert_allclose(whole[0], blocks[0])


def test_a_refined_index_asked_for_every_vector_is_exact_on_the_stored_vectors():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(500, 16)).astype(np.float32)
    ids = np.sort(rng.choice(2**40, 500, replace=False)).astype(np.int64)
    base = faiss.IndexIDMap2(faiss.IndexScalarQuantizer(16, faiss.ScalarQuantizer.QT_4bit,
                                                        faiss.METRIC_INNER_PRODUCT))
    base.train(X)
    base.add_with_ids(X, ids)
    V = X.astype(np.float16)
    idx = RefinedIndex(base, ids, V, k_factor=100)      # 10 x 100 >= N: every vector
    xq = rng.normal(size=(20, 16)).astype(np.float32)
    D, I = idx.search(xq, 10)
    ref = np.argsort(-(xq @ V.astype(np.float32).T), axis=1, kind="stable")[:, :10]
    assert (I == ids[ref]).all()
    _, I2, R = idx.search_and_reconstruct(xq, 3)
    assert (I2 == I[:, :3]).all()
    np.testing.assert_array_equal(R, V[ref[:, :3]].astype(np.float32))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine")
    X = clustered_vectors(N, DIM, clusters=30, seed=3)
    uris = synthetic_uris(N)
    colour = [["red", "green", "blue"][i % 3] for i in range(N)]
    write_run(str(root / "store"), "20260101T000000Z-aaaaaa", uris, X, shards=3,
              metadata={"colour": colour})
    return str(root / "store"), X, stable_ids(uris), np.array(colour)


def build(store_root, out, *extra):
    assert remap(["index", "--dba", "0",
                  "--embeddings", store_root, "--output", str(out), "--factory", PQ,
                  "--no-progress", "--recall-queries", "200", "--qe", "0", *extra]) == 0
    return str(out)


def shard_vectors(store_root):
    """id -> vector, read from the embedding shards with pyarrow (not through index_builder)."""
    out = {}
    for dirpath, _, files in os.walk(store_root):
        for f in files:
            if f.startswith("embeddings-") and f.endswith(".parquet"):
                t = pq.read_table(os.path.join(dirpath, f), columns=["id", "embedding"])
                for i, e in zip(t.column("id").to_pylist(), t.column("embedding").to_pylist()):
                    out[i] = np.asarray(e, np.float32)
    return out


def test_refine_lifts_the_recall_that_pq_codes_cap_and_scores_are_the_stored_vectors(
        store, tmp_path):
    root, X, ids, colour = store
    plain = json.load(open(os.path.join(build(root, tmp_path / "plain"), MANIFEST_NAME)))
    folder = build(root, tmp_path / "refined", "--refine", "10")
    m = json.load(open(os.path.join(folder, MANIFEST_NAME)))
    assert m["refine"]["k_factor"] == 10 and m["refine"]["dtype"] == "float16"
    assert m["refine"]["file"]["path"] == REFINE_FILE
    assert m["refine"]["file"]["bytes"] == os.path.getsize(os.path.join(folder, REFINE_FILE))
    # the codes cap recall; re-ranking 100 candidates on the real vectors lifts it
    assert plain["recall"]["recall@1"] < 0.8
    assert m["recall"]["recall@1"] >= plain["recall"]["recall@1"] + 0.15
    assert m["recall"]["recall@10"] >= 0.95

    # the file holds every vector, float16, in the id map's order
    vecs = shard_vectors(root)
    V = np.load(os.path.join(folder, REFINE_FILE))
    id_order = np.load(os.path.join(folder, "id_map.ids.npy"))
    assert V.dtype == np.float16 and V.shape == (N, DIM)
    for row in (0, 1234, N - 1):
        np.testing.assert_array_equal(V[row], vecs[int(id_order[row])].astype(np.float16))

    # hits are scored by the stored vectors, best first
    idx = open_index(folder)
    xq = X[[7, 2500, 5999]] + 0.01
    for q, hits in zip(xq, idx.search_vectors(xq, 10, qe=0)):
        s = [float(vecs[h.id].astype(np.float16).astype(np.float32) @ q) for h in hits]
        np.testing.assert_allclose([h.score for h in hits], s, rtol=1e-5, atol=1e-6)
        assert s == sorted(s, reverse=True)
    # filters apply to the candidates before re-ranking
    for hits in idx.search_vectors(xq, 10, filters={"colour": "green"}, qe=0):
        assert hits and all(h.metadata["colour"] == "green" for h in hits)
    # query expansion reads the stored vectors too
    assert len(idx.search_vectors(xq, 5)[0]) == 5

    # a tampered refine file is refused; a rebuild without --refine removes it
    with open(os.path.join(folder, REFINE_FILE), "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01")
    with pytest.raises(ValueError, match="does not match its manifest checksum"):
        open_index(folder)
    build(root, folder)
    assert not os.path.exists(os.path.join(folder, REFINE_FILE))
    assert "refine" not in json.load(open(os.path.join(folder, MANIFEST_NAME)))


def test_a_refined_index_is_published_and_opened_from_object_storage(
        store, tmp_path, fake_gcs):  # noqa: F811
    root, X, ids, _ = store
    local = build(root, tmp_path / "local", "--refine", "10")
    dest = fake_gcs.bucket("refined") + "/idx"
    build(root, dest, "--refine", "10")
    cached = open_index(dest, cache=str(tmp_path / "cache"))
    assert REFINE_FILE in cached.open_stats["downloaded"]
    uncached = open_index(dest, cache=False)
    here = open_index(local)
    xq = X[[3, 3000]]
    for a, b, c in zip(here.search_vectors(xq, 5, qe=0), cached.search_vectors(xq, 5, qe=0),
                       uncached.search_vectors(xq, 5, qe=0)):
        assert [h.id for h in a] == [h.id for h in b] == [h.id for h in c]


def test_a_negative_refine_is_refused_in_one_line(store, tmp_path, capsys):
    assert remap(["index", "--dba", "0", "--embeddings", store[0], "--output", str(tmp_path / "x"),
                  "--refine", "-1"]) == 2
    assert "--refine must be >= 0" in capsys.readouterr().err
