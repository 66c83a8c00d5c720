"""Index build at scale: sharded add + merge + sharded search agree with one index built in one
go; the manifest's recall is what an independent recomputation gives; incremental runs apply
re-embeds and tombstones. References are exact numpy/FAISS searches, never the code's output."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pytest

from index_builder.build import add_step, build_index, merge_step, train_step
from index_builder.manifest import manifest_files
from index_builder.rerank import reranked_similarities
from index_builder.search import open_index
from index_builder.synthetic import clustered_vectors, synthetic_uris, write_run
from remap_store.schema import stable_ids

N, DIM, SHARDS = 24_000, 32, 6
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IVF = "IVF64,PQ16x4"  # 16-centroid sub-quantizers: trains in seconds on 2 cores


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    X = clustered_vectors(N, DIM, clusters=200, seed=1)
    uris = synthetic_uris(N)
    write_run(str(root), "20260101T000000Z-aaaaaa", uris, X, shards=SHARDS)
    return str(root), X, stable_ids(uris), uris


@pytest.fixture(scope="module")
def ivf_folder(store, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ivf"))
    build_index(store[0], folder, factory=IVF, dba=0, recall_queries=300, workers=2, progress=False)
    return folder


def _one_go(folder, X, ids, nprobe):
    """The reference: the same trained index, all vectors added in one call."""
    ref = faiss.read_index(os.path.join(folder, "trained.faiss"))
    ref.add_with_ids(X, ids)
    faiss.ParameterSpace().set_index_parameter(ref, "nprobe", nprobe)
    return ref


def _same_neighbours(D, I, Dref, Iref):
    """Same scores; same ids wherever the score is not tied (the reference has one extra
    column so a tie across the k-th position is seen)."""
    k = D.shape[1]
    np.testing.assert_allclose(D, Dref[:, :k], rtol=1e-5, atol=1e-5)
    near = np.isclose(Dref[:, 1:], Dref[:, :-1], rtol=0, atol=1e-6)
    tied = np.zeros_like(Dref, bool)
    tied[:, 1:] |= near
    tied[:, :-1] |= near
    tied = tied[:, :k]
    assert (I[~tied] == Iref[:, :k][~tied]).all()
    assert tied.mean() < 0.2


@pytest.mark.parametrize("layout", ["single", "ondisk", "shards"])
def test_merged_and_sharded_ivfpq_return_the_neighbours_of_a_one_go_index(store, ivf_folder,
                                                                          layout):
    _, X, ids, _ = store
    merge_step(ivf_folder, layout=layout, recall_queries=300)
    m = json.load(open(os.path.join(ivf_folder, "manifest.json")))
    assert m["layout"] == layout and m["num_vectors"] == N
    state = json.load(open(os.path.join(ivf_folder, "state.json")))
    assert len(state["shards"]) == SHARDS
    idx = open_index(ivf_folder)
    nprobe = m["search_params"]["nprobe"]
    ref = _one_go(ivf_folder, X, ids, nprobe)
    xq = clustered_vectors(200, DIM, clusters=200, seed=1)  # same centres, fresh points
    Dref, Iref = ref.search(xq, 21)
    D, I = idx.index.search(xq, 20)
    _same_neighbours(D, I, Dref, Iref)
    hits = idx.search_vectors(xq[:3], k=5, qe=0)          # raw FAISS ranking
    assert [h.id for h in hits[0]] == list(I[0, :5])
    assert hits[0][0].uri == store[3][int(np.nonzero(ids == I[0, 0])[0][0])]


def test_flat_build_over_shards_equals_exact_numpy_search(store, tmp_path):
    """With the defaults (database-side augmentation with 2 neighbours): exact search over
    the numpy DBA of the embeddings."""
    from index_builder.rerank import database_augmentation

    _, X, ids, uris = store
    m = build_index(store[0], str(tmp_path), factory="Flat", recall_queries=100, workers=2,
                    progress=False)
    assert m["rerank"]["dba"] == 2 and m["rerank"]["dba_knn"]["knn"] == "exact"
    idx = open_index(str(tmp_path))
    xq = clustered_vectors(50, DIM, clusters=200, seed=7)
    scores = xq @ database_augmentation(X, 2, 3.0).T
    order = np.argsort(-scores, axis=1)[:, :10]
    hits = idx.search_vectors(xq, k=10, qe=0)             # no query expansion: exact search
    for q in range(len(xq)):
        np.testing.assert_allclose([h.score for h in hits[q]], scores[q, order[q]], rtol=1e-5)
        assert [h.id for h in hits[q]] == list(ids[order[q]])
        assert [h.uri for h in hits[q]] == [uris[i] for i in order[q]]
    assert idx.manifest["recall"]["recall@1"] == 1.0
    # a new index expands queries by default (top 2, alpha 3) over its augmented vectors,
    # ranking as rerank defines it
    rerank = dict(idx.manifest["rerank"])
    assert rerank.pop("dba_knn")["knn"] == "exact"
    assert rerank == {"qe": 2, "qe_alpha": 3.0, "dba": 2, "dba_alpha": 3.0, "dba_vectors": N}
    reranked = reranked_similarities(xq, X, qe=2, dba=2, alpha=3.0)
    order = np.argsort(-reranked, axis=1)[:, :10]
    hits = idx.search_vectors(xq, k=10)
    for q in range(len(xq)):
        np.testing.assert_allclose([h.score for h in hits[q]], reranked[q, order[q]],
                                   rtol=1e-5)
        assert [h.id for h in hits[q]] == list(ids[order[q]])


def test_manifest_recall_matches_an_independent_recomputation(store, ivf_folder):
    _, X, ids, _ = store
    m = merge_step(ivf_folder, layout="single", recall_queries=300, target_recall=0.4)
    saved = np.load(os.path.join(ivf_folder, "recall_queries.npz"))
    qids, xq = saved["ids"], saved["vectors"]
    assert len(qids) == 300 and np.isin(qids, ids).all()
    row = {int(i): r for r, i in enumerate(ids)}
    np.testing.assert_array_equal(xq, X[[row[int(i)] for i in qids]])
    # exact neighbours by numpy, the query's own vector left out
    scores = xq @ X.T
    scores[np.arange(len(qids)), [row[int(i)] for i in qids]] = -np.inf
    true_nn = ids[np.argmax(scores, axis=1)]
    idx = open_index(ivf_folder)  # applies the tuned search_params
    assert faiss.extract_index_ivf(idx.index).nprobe == m["search_params"]["nprobe"]
    _, found = idx.index.search(xq, 101)
    for k in (1, 10, 100):
        got = np.mean([true_nn[q] in [i for i in found[q] if i != qids[q]][:k]
                       for q in range(len(qids))])
        assert m["recall"][f"recall@{k}"] == pytest.approx(got, abs=1e-9)
    assert m["recall"]["recall@10"] >= 0.4 and m["recall"]["target_met"]
    assert m["recall"]["recall@1"] < 1.0  # PQ8 is lossy: the measurement is not a tautology


def test_manifest_lists_every_file_with_its_checksum_and_a_damaged_shard_is_refused(
        store, ivf_folder):
    import hashlib

    merge_step(ivf_folder, layout="shards", recall_queries=300)
    m = json.load(open(os.path.join(ivf_folder, "manifest.json")))
    for e in manifest_files(m) + [m["recall"]["queries_file"]]:
        data = open(os.path.join(ivf_folder, e["path"]), "rb").read()
        assert e["bytes"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    victim = os.path.join(ivf_folder, m["index_files"][2]["path"])
    original = open(victim, "rb").read()
    try:
        with open(victim, "r+b") as f:
            f.seek(len(original) // 2)
            f.write(b"\xff" * 16)
        with pytest.raises(ValueError, match="checksum"):
            open_index(ivf_folder)
    finally:
        open(victim, "wb").write(original)


def test_incremental_run_adds_new_replaces_reembedded_and_removes_tombstoned(tmp_path, capsys):
    store, folder = str(tmp_path / "store"), str(tmp_path / "index")
    X1 = clustered_vectors(8000, DIM, clusters=50, seed=3)
    u1 = synthetic_uris(8000)
    write_run(store, "20260101T000000Z-aaaaaa", u1, X1, shards=4)
    build_index(store, folder, factory="Flat", dba=0, recall_queries=100, progress=False)
    first_files = set(os.listdir(os.path.join(folder, "shards")))

    # run 2: 2000 new URIs, 500 re-embedded (new vectors), 300 deleted
    new_u = synthetic_uris(2000, start=8000)
    re_u = u1[1000:1500]
    X2 = clustered_vectors(2500, DIM, clusters=50, seed=4)
    gone = u1[5000:5300]
    write_run(store, "20260102T000000Z-bbbbbb", new_u + re_u, X2, shards=2, tombstone_uris=gone)
    s = add_step(store, folder, progress=False)
    assert s["added"] == 2500 and s["removed"] == 800
    assert add_step(store, folder, progress=False)["added"] == 0  # nothing new: idempotent
    merge_step(folder, recall_queries=100)

    live = {u: v for u, v in zip(u1, X1)}
    for u in gone:
        del live[u]
    live.update(zip(new_u + re_u, X2))
    lu = sorted(live)
    LX, lids = np.stack([live[u] for u in lu]), stable_ids(lu)
    idx = open_index(folder)
    assert len(idx) == len(lu) == 8000 - 300 + 2000
    xq = np.concatenate([X2[-5:], X1[5000:5005], clustered_vectors(20, DIM, 50, seed=9)])
    exact = np.argsort(-(xq @ LX.T), axis=1)[:, :5]
    hits = idx.search_vectors(xq, k=5, qe=0)
    for q in range(len(xq)):
        assert [h.id for h in hits[q]] == list(lids[exact[q]])
    assert hits[0][0].uri == re_u[-5] and hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert not set(stable_ids(gone)) & {h.id for row in hits for h in row}
    # earlier shard files are never rewritten in place; superseded generations are cleaned up
    now = set(os.listdir(os.path.join(folder, "shards")))
    # 2 new shards + new generations of the 2 shards that held re-embedded/deleted URIs (x .ids)
    assert len(now - first_files) == 2 * (2 + 2) and len(first_files - now) == 2 * 2
    assert len(first_files & now) == 2 * 2  # the untouched shards are reused as they were
    assert idx.manifest["source_runs"] == ["20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"]

    # run 3 holds only deletions (no shard at all): 100 of run 2's new URIs go
    run3 = write_run(store, "20260103T000000Z-cccccc", [], np.zeros((0, DIM), np.float32),
                     shards=0, tombstone_uris=new_u[:100])
    assert not [f for f in os.listdir(run3) if f.startswith("embeddings-")]
    assert add_step(store, folder, progress=False)["removed"] == 100
    merge_step(folder, recall_queries=100)
    idx = open_index(folder)
    assert len(idx) == 9700 - 100
    assert idx.search_vectors(X2[:1], k=1)[0][0].id != stable_ids(new_u[:1])[0]


def test_new_data_far_from_the_training_sample_logs_a_retrain_warning(tmp_path, caplog):
    store, folder = str(tmp_path / "store"), str(tmp_path / "index")
    write_run(store, "20260101T000000Z-aaaaaa", synthetic_uris(6000),
              clustered_vectors(6000, DIM, clusters=30, spread=0.3, seed=5), shards=2)
    train_step(store, folder, factory="IVF32,PQ8x4")
    add_step(store, folder, progress=False)
    assert "quantisation error has grown" not in caplog.text
    write_run(store, "20260102T000000Z-bbbbbb", synthetic_uris(3000, start=6000),
              clustered_vectors(3000, DIM, clusters=30, spread=1.5, seed=6), shards=1)
    add_step(store, folder, progress=False)
    err = caplog.text
    assert "quantisation error has grown" in err and "remap index train" in err


def test_mixed_models_are_refused_with_what_to_do(tmp_path):
    store, folder = str(tmp_path / "store"), str(tmp_path / "index")
    write_run(store, "20260101T000000Z-aaaaaa", synthetic_uris(500),
              clustered_vectors(500, DIM, seed=1), shards=1)
    build_index(store, folder, factory="Flat", dba=0, recall_queries=50, progress=False)
    write_run(store, "20260102T000000Z-bbbbbb", synthetic_uris(10, start=500),
              clustered_vectors(10, DIM, seed=2), shards=1, model="other-model")
    with pytest.raises(ValueError, match="remap index train"):
        add_step(store, folder, progress=False)


def test_index_cli_steps_and_one_shot(store, tmp_path, capsys):
    from remap_cli import main as remap

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert remap(["index", "--dba", "0",
                  "--embeddings", store[0], "--output", a, "--factory", "IVF64,Flat",
                  "--recall-queries", "100", "--no-progress"]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert remap(["index", "train", "--embeddings", store[0], "--output", b,
                  "--factory", "IVF64,Flat"]) == 0
    assert remap(["index", "add", "--embeddings", store[0], "--output", b, "--workers", "2",
                  "--no-progress"]) == 0
    assert remap(["index", "merge", "--output", b, "--layout", "ondisk",
                  "--recall-queries", "100"]) == 0
    steps = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert one["vectors"] == steps["vectors"] == N
    assert steps["layout"] == "ondisk" and os.path.exists(os.path.join(b, "index.ivfdata"))
    assert one["recall"] == steps["recall"]  # same seed, same sample: same index
    assert remap(["index", "merge", "--output", str(tmp_path / "none")]) == 2
    assert "remap index train" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["ondisk", "shards"])
def test_an_index_on_object_storage_opens_in_every_layout(store, ivf_folder, layout):
    import fsspec

    m = merge_step(ivf_folder, layout=layout, recall_queries=300)
    fs = fsspec.filesystem("memory")
    url = f"memory://bucket/{layout}"
    for e in manifest_files(m) + [m["recall"]["queries_file"]]:
        fs.put_file(os.path.join(ivf_folder, e["path"]), f"/bucket/{layout}/{e['path']}")
    fs.put_file(os.path.join(ivf_folder, "manifest.json"), f"/bucket/{layout}/manifest.json")
    remote, local = open_index(url), open_index(ivf_folder)
    xq = store[1][:20]
    assert [[h.id for h in row] for row in remote.search_vectors(xq, 10)] == \
        [[h.id for h in row] for row in local.search_vectors(xq, 10)]


@pytest.mark.parametrize("layout", ["single", "shards"])
def test_hnsw_shards_are_rebuilt_into_one_graph_or_searched_together(tmp_path, layout):
    store, folder = str(tmp_path / "store"), str(tmp_path / "index")
    X = clustered_vectors(5000, DIM, clusters=100, seed=11)
    uris = synthetic_uris(5000)
    write_run(store, "20260101T000000Z-aaaaaa", uris, X, shards=4)
    m = build_index(store, folder, factory="HNSW16", dba=0, recall_queries=200, layout=layout,
                    target_recall=0.99, progress=False)
    assert m["search_params"]["efSearch"] >= 16 and m["num_vectors"] == 5000
    idx = open_index(folder)
    xq = clustered_vectors(100, DIM, clusters=100, seed=11)
    exact = stable_ids(uris)[np.argmax(xq @ X.T, axis=1)]
    found = np.array([row[0].id for row in idx.search_vectors(xq, k=1)])
    assert (found == exact).mean() >= 0.97


def test_remap_index_shows_each_step_summary_once_on_stderr(tmp_path):
    """index_builder logs (no prints); the console shows those lines on stderr as plain lines,
    once each, and keeps stdout for the JSON summary. A subprocess: the console's own logging
    configuration, not pytest's, is what is checked."""
    import subprocess
    import sys

    store, index = str(tmp_path / "store"), str(tmp_path / "index")
    write_run(store, "20260101T000000Z-aaaaaa", synthetic_uris(300),
              clustered_vectors(300, DIM, seed=3), shards=2)
    done = subprocess.run([sys.executable, "-m", "remap_cli", "index", "--dba", "0",
                           "--embeddings", store,
                           "--output", index, "--no-progress", "--recall-queries", "50"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [REPO, os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["vectors"] == 300
    lines = done.stderr.splitlines()
    for start in ("train: 300 vectors of dim 32 in 2 shards", "train: done in",
                  "add: 300 vectors from 2 shards of 1 runs",
                  "merge: single index of 300 vectors", "merge: 300 vectors, Flat (single)"):
        assert sum(start in x for x in lines) == 1, (start, done.stderr)
        assert any(x.startswith(start) for x in lines), (start, done.stderr)


def test_a_killed_writers_temporary_files_are_removed_by_the_next_merge(store, tmp_path):
    from remap_store.files import temporary_name

    folder = str(tmp_path / "index")
    build_index(store[0], folder, factory="Flat", dba=0, recall_queries=20, workers=1,
                progress=False)
    shard_dir = tmp_path / "index" / "shards"
    left = temporary_name(str(shard_dir / "run-x-00000-g0.faiss"))
    open(left, "wb").write(b"half an index")
    merge_step(folder, "single", 0.95, recall_queries=20)
    assert not os.path.exists(left)
    assert open_index(folder).search_vectors(np.zeros((1, store[1].shape[1]), np.float32), 1)
