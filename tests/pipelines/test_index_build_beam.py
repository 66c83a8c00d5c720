"""The index build as a Beam job (pipelines/index_build.py, `remap index-beam`): on the
PortableRunner with an EXTERNAL worker pool against a GCS server on 127.0.0.1 it gives the same
neighbours, ids and scores, as the local `remap index` on the same collection, database-side
augmentation (on by default in both) included; a job killed in the middle and run again
completes from what it left, with no duplicate vectors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import faiss
import fsspec
import numpy as np
import pytest

from beam_services import job_service, service_env, worker_pool  # noqa: F401  (fixtures)
from index_builder.build import DBA_VECTORS, augmented, build_index, dba_table
from index_builder.search import open_index
from index_builder.synthetic import clustered_vectors, synthetic_uris, write_run
from objectstore import fake_gcs  # noqa: F401  (pytest fixture: fake-gcs-server on loopback)
from remap_cli import main as remap
from remap_store.files import TMP_SUFFIX

N, DIM, SHARDS = 30_000, 32, 6
IVF = "IVF64,PQ16x4"       # 16-centroid sub-quantizers: trains in seconds on 2 cores
RUN = "20260101T000000Z-aaaaaa"

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A 30k-vector store in 6 shards (a second run re-embeds 500 URIs and deletes 300), and
    the index the local build makes of it."""
    root = tmp_path_factory.mktemp("beam_build")
    X = clustered_vectors(N, DIM, clusters=200, seed=1)
    uris = synthetic_uris(N)
    store = str(root / "store")
    write_run(store, RUN, uris, X, shards=SHARDS)
    again = clustered_vectors(500, DIM, clusters=200, seed=2)
    write_run(store, "20260102T000000Z-bbbbbb", uris[:500], again, shards=1,
              tombstone_uris=uris[500:800])
    local = str(root / "local")   # with the default DBA (K = 2 at this size), as index-beam's
    build_index(store, local, factory=IVF, recall_queries=300, workers=1, progress=False)
    assert open_index(local).manifest["rerank"]["dba"] == 2
    return root, store, local


def _queries() -> np.ndarray:
    return clustered_vectors(200, DIM, clusters=200, seed=7)


def _assert_same_neighbours(built, reference, k: int = 10, lookahead: int = 1):
    """Same scores, and the same ids wherever a score is not tied with its neighbour's (the
    reference's k + `lookahead`-th result shows a tie across the cut; 0 for a refined index,
    whose candidates are k x k_factor, so a deeper search is another search)."""
    xq = _queries()
    D, I = built.index.search(xq, k)
    Dr, Ir = reference.index.search(xq, k + lookahead)
    np.testing.assert_allclose(D, Dr[:, :k], rtol=1e-6, atol=1e-6)
    tied = np.zeros_like(Dr, bool)
    near = np.isclose(Dr[:, 1:], Dr[:, :-1], rtol=0, atol=1e-6)
    tied[:, 1:] |= near
    tied[:, :-1] |= near
    untied = ~tied[:, :k]
    assert untied.mean() > 0.5
    np.testing.assert_array_equal(I[untied], Ir[:, :k][untied])


def _assert_complete(index_url: str, fs, expected_ids: np.ndarray):
    """Every live vector once, nothing left of the job's work folder or temporary files."""
    idx = open_index(index_url)
    assert len(idx) == len(expected_ids)
    np.testing.assert_array_equal(np.sort(idx.id_map.ids), np.sort(expected_ids))
    root = fs._strip_protocol(index_url)
    fs.invalidate_cache()
    names = [p[len(root):] for p in fs.find(root)]
    assert not [n for n in names if n.endswith(TMP_SUFFIX) or "/_build/" in n + "/"], names
    return idx


def _live_ids(local: str) -> np.ndarray:
    return open_index(local).id_map.ids


def test_portable_runner_with_external_worker_pool_on_gcs_matches_the_local_build(
        collection, fake_gcs, job_service, worker_pool):  # noqa: F811
    root, store, local = collection
    bucket = fake_gcs.bucket("beam-index")
    fake_gcs.fs.put(store, f"{bucket}/store", recursive=True)
    fake_gcs.fs.invalidate_cache()
    out = remap(["index-beam", f"--embeddings={bucket}/store", f"--index={bucket}/idx",
                 f"--factory={IVF}", "--recall_queries=300",
                 f"--fsspec_config={json.dumps(fake_gcs.fsspec_config)}",
                 "--runner=PortableRunner", f"--job_endpoint={job_service}",
                 "--environment_type=EXTERNAL", f"--environment_config={worker_pool}"])
    assert out == 0
    reference = open_index(local)
    built = _assert_complete(f"{bucket}/idx", fake_gcs.fs, reference.id_map.ids)
    assert built.manifest["factory"] == IVF and built.manifest["layout"] == "single"
    # the parallel sample is the local one: the same trained quantizer and search parameters
    assert built.manifest["search_params"] == reference.manifest["search_params"]
    assert built.manifest["recall"]["recall@10"] == reference.manifest["recall"]["recall@10"]
    cb, cr = (faiss.extract_index_ivf(x.index).quantizer.reconstruct_n(0, 64)
              for x in (built, reference))
    # equal up to float rounding: the workers' BLAS sums the augmented vectors in another order
    np.testing.assert_allclose(cb, cr, rtol=0, atol=1e-6)
    _assert_same_neighbours(built, reference)
    # the augmentation is the local one, recorded alike
    timing = ("dba_knn",)     # the k-NN search's own record holds its time
    assert ({k: v for k, v in built.manifest["rerank"].items() if k not in timing}
            == {k: v for k, v in reference.manifest["rerank"].items() if k not in timing})
    assert built.manifest["rerank"]["dba"] == 2
    assert built.manifest["rerank"]["dba_knn"]["knn"] == "exact"
    # and the reference is right: its neighbours are those of one index holding every live
    # vector, augmented, added in one call to the same trained index
    one_go = faiss.read_index(os.path.join(local, "trained.faiss"))
    ids = reference.id_map.ids
    X = augmented(dba_table(local), ids, _vectors_of(store, ids))
    one_go.add_with_ids(X, ids)
    faiss.ParameterSpace().set_index_parameter(one_go, "nprobe",
                                               reference.manifest["search_params"]["nprobe"])
    _assert_same_neighbours(built, type("I", (), {"index": one_go})())


def _vectors_of(store: str, ids: np.ndarray) -> np.ndarray:
    """The live vectors of `ids` read straight from the store's shards (the later run wins)."""
    from index_builder.embeddings import load_embeddings

    sids, X, _, _, _ = load_embeddings(store)
    pos = {int(i): n for n, i in enumerate(sids)}
    return X[[pos[int(i)] for i in ids]]


def test_a_killed_build_run_again_completes_with_no_duplicates(collection, tmp_path, caplog):
    root, store, local = collection
    index = str(tmp_path / "idx")
    argv = ["index-beam", f"--embeddings={store}", f"--index={index}", f"--factory={IVF}",
            "--recall_queries=300"]
    trained = os.path.join(index, "_build", "train.json")
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "remap_cli", *argv], env=service_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(trained) and proc.poll() is None:
            assert time.monotonic() < deadline, "the job wrote no trained index in 300 s"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)      # the launcher and the job it runs in-process
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    assert not os.path.exists(os.path.join(index, "manifest.json"))   # killed mid-build
    with open(trained) as f:
        first_training = json.load(f)["trained_at"]
    with open(os.path.join(index, "_build", "dba", "dba.json")) as f:
        first_knn = json.load(f)["knn"]      # the augmentation came before the training

    with caplog.at_level("INFO", logger="pipelines.index_build"):
        assert remap(argv) == 0
    assert "resuming in" in caplog.text
    reference = open_index(local)
    built = _assert_complete(index, fsspec.filesystem("file"), reference.id_map.ids)
    assert built.manifest["train"]["trained_at"] == first_training   # not trained again
    assert built.manifest["rerank"]["dba_knn"] == first_knn          # nor augmented (its time)
    _assert_same_neighbours(built, reference)


def test_the_augment_worker_writes_each_shards_part_and_the_local_builds_sample(collection,
                                                                              tmp_path):
    """AugmentFn on its own: one part per live shard holding exactly that shard's live rows of
    the table; the training sample it emits is the one the local build draws from its DBA
    table; and a rerun that finds the table (killed before training) emits the same sample
    from it without augmenting again."""
    from index_builder.build import _live_batches, plan_training
    from index_builder.embeddings import read_shard_ids
    from index_builder.train import reservoir_sample
    from pipelines.index_build import AugmentFn

    root, store, local = collection
    plan = plan_training(store, IVF)
    size = plan.size + plan.held
    work = str(tmp_path / "_build")
    fn = AugmentFn(plan, 2, work, None, sample_size=size)
    fn.setup()
    first = list(fn.process(None))
    assert [type(o).__name__ for o in first] == ["TaggedOutput", "str"] and first[1] == work
    whole = dba_table(os.path.join(work, "dba"))
    reference = dba_table(local)
    np.testing.assert_array_equal(whole[1], reference[1])
    np.testing.assert_allclose(whole[2], reference[2], rtol=0, atol=1e-6)
    parts = sorted(os.listdir(os.path.join(work, "dba", "dba")))     # _dba_part's names
    live = [p for p, s in enumerate(plan.shards) if s.live_rows > 0]
    assert [p for p in parts if p.isdigit()] == [f"{p:06d}" for p in live]
    for position in live:
        shard = plan.shards[position]
        part = dba_table(os.path.join(work, "dba", "dba", f"{position:06d}"))
        mine = np.setdiff1d(read_shard_ids(shard.path), shard.drop)
        np.testing.assert_array_equal(part[1], mine)             # sorted, that shard's rows
        np.testing.assert_array_equal(part[2], whole[2][np.isin(whole[1], mine)])
    sample = first[0].value
    assert first[0].tag == AugmentFn.SAMPLE and len(sample.ids) == size
    ids, X = reservoir_sample(_live_batches(plan.shards, table=reference), size, plan.seed)
    np.testing.assert_array_equal(sample.ids, ids)
    np.testing.assert_allclose(sample.X, X, rtol=0, atol=1e-6)

    again = list(fn.process(None))          # the table is there: read, not augmented again
    np.testing.assert_array_equal(again[0].value.ids, sample.ids)
    np.testing.assert_array_equal(again[0].value.X, sample.X)
    assert list(AugmentFn(plan, 2, work, None).process(None)) == [work]   # trained: no sample
    # a Flat index trains on no sample, but Train still waits for one
    flat = list(AugmentFn(plan, 2, work, None, sample_size=0).process(None))
    assert flat[0].tag == AugmentFn.SAMPLE and len(flat[0].value.ids) == 0 and flat[1] == work


def test_refine_and_query_expansion_options_match_the_local_build(collection, tmp_path):
    """`--refine` and `--qe` as `remap index`'s: the merge worker writes the same float16
    vectors (same checksum) and the same rerank default, and the re-ranked neighbours match."""
    root, store, _ = collection
    local = str(tmp_path / "local")
    build_index(store, local, factory=IVF, dba=0, recall_queries=300, workers=1, progress=False,
                refine=5, qe=0)
    index = str(tmp_path / "idx")
    assert remap(["index-beam", f"--embeddings={store}", f"--index={index}", f"--factory={IVF}",
                  "--recall_queries=300", "--refine=5", "--qe=0", "--dba=0"]) == 0
    reference = open_index(local)
    built = _assert_complete(index, fsspec.filesystem("file"), reference.id_map.ids)
    for key in ("refine", "rerank"):
        assert built.manifest[key] == reference.manifest[key], key
    assert built.manifest["refine"]["k_factor"] == 5 and built.manifest["rerank"]["qe"] == 0
    assert built.manifest["rerank"]["dba"] == 0 and not os.path.exists(
        os.path.join(index, DBA_VECTORS))                       # --dba=0: no augmentation
    assert built.manifest["recall"]["recall@10"] > 0.95     # re-ranked on the stored vectors
    _assert_same_neighbours(built, reference, lookahead=0)


def test_a_work_folder_of_another_plan_is_cleared_not_reused(collection, tmp_path):
    root, store, local = collection
    index = tmp_path / "idx"
    stale = index / "_build" / "shards"
    stale.mkdir(parents=True)
    (index / "_build" / "plan.json").write_text(json.dumps({"key": "another plan"}))
    (stale / f"{RUN}-embeddings-00000-of-00006-g1.ids.parquet").write_bytes(b"not this plan's")
    assert remap(["index-beam", f"--embeddings={store}", f"--index={index}",
                  f"--factory={IVF}", "--recall_queries=300"]) == 0
    reference = open_index(local)
    _assert_same_neighbours(_assert_complete(str(index), fsspec.filesystem("file"),
                                             reference.id_map.ids), reference)


def test_refusals_come_before_the_job_and_write_nothing(collection, tmp_path, capsys):
    root, store, _ = collection
    index = tmp_path / "idx"
    assert remap(["index-beam", f"--embeddings={store}", f"--index={index}",
                  "--factory=HNSW32", "--layout=ondisk"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("remap index-beam: error: --layout ondisk needs an IVF index")
    assert len(err.splitlines()) == 1 and not index.exists()
    assert remap(["index-beam", f"--embeddings={store}", f"--index={index}",
                  "--recall_querys=5"]) == 2
    assert "unknown option(s) --recall_querys" in capsys.readouterr().err
    assert remap(["index-beam", f"--embeddings={store}", f"--index={index}",
                  "--refine=-1"]) == 2
    assert "--refine must be >= 0" in capsys.readouterr().err and not index.exists()
    assert remap(["index-beam", f"--embeddings={store}", f"--index={index}",
                  "--dba=-1"]) == 2
    assert "--dba must be at least 0" in capsys.readouterr().err and not index.exists()
    assert remap(["index-beam", f"--embeddings={store}", f"--index={index}", "--dry_run=True",
                  f"--factory={IVF}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] and "AddShard" in out["transforms"] and not index.exists()


def test_the_job_graph_translates_for_dataflow_offline(collection, tmp_path):
    """--dry_run with the DataflowRunner: the job is translated, nothing is submitted or written
    (run in a network namespace of its own where the machine allows one: nothing can leave)."""
    root, store, _ = collection
    isolate = ["unshare", "-n"] if subprocess.run(
        ["unshare", "-n", "true"], capture_output=True).returncode == 0 else []
    done = subprocess.run(
        [*isolate, sys.executable, "-m", "remap_cli", "index-beam", f"--embeddings={store}",
         "--index=gs://remap-dry-run/idx", f"--factory={IVF}", "--runner=DataflowRunner",
         "--dry_run=True", "--no_auth", "--project=remap-dry-run", "--region=europe-west1",
         "--temp_location=gs://remap-dry-run/tmp", "--staging_location=gs://remap-dry-run/st",
         "--experiments=use_runner_v2", "--sdk_location=container",
         "--sdk_container_image=remap-worker:test"],
        capture_output=True, text=True, env=service_env(), timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["dry_run"] and out["factory"] == IVF
    # with DBA (the default here) the Augment worker draws the sample: no SampleShard
    assert out["transforms"] == ["Shards", "Spread", "AugmentOnce", "Augment", "DbaTable",
                                 "Train", "AddShard", "Collect", "Merge"]
    assert os.listdir(tmp_path) == []
