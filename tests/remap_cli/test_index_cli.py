"""`remap index` and `remap search` as a user meets them through the console entry point: small
indexes that open, refusals that are one clear line with exit status 2 and leave nothing
half-written, and the recall the manifest records. References are numpy computations."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from index_builder.synthetic import clustered_vectors, synthetic_uris, write_run
from remap_cli import main as remap
from remap_store.schema import stable_ids

DIM = 8
RUN = "20260101T000000Z-aaaaaa"


def small_store(root, uris, seed=0, shards=1):
    X = clustered_vectors(len(uris), DIM, clusters=max(1, len(uris) // 4), seed=seed)
    write_run(str(root), RUN, list(uris), X, shards=shards)
    return str(root), X


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_a_two_image_index_with_ids_far_apart_opens_and_searches(tmp_path, capsys):
    """Sorted neighbour ids more than 2**63 apart overflowed the id map's duplicate check."""
    candidates = synthetic_uris(64)
    ids = stable_ids(candidates)
    uris = [candidates[int(np.argmax(ids < -2**62))], candidates[int(np.argmax(ids > 2**62))]]
    assert int(stable_ids(uris)[1]) - int(stable_ids(uris)[0]) > 2**63  # would wrap in int64
    store, X = small_store(tmp_path / "store", uris)
    index = str(tmp_path / "index")
    assert remap(["index", "--embeddings", store, "--output", index, "--no-progress"]) == 0
    np.save(tmp_path / "q.npy", X)
    capsys.readouterr()
    assert remap(["search", "--index", index, "--vectors", str(tmp_path / "q.npy"), "--k", "2",
                  "--format", "json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    order = np.argsort(-(X @ X.T), axis=1)
    assert [[r["uri"] for r in row["results"]] for row in rows] == \
        [[uris[j] for j in order[q]] for q in range(2)]


# --------------------------------------------------------------------------- 4: PQ sizes

def test_a_budget_where_48_byte_codes_fit_builds_an_index_faiss_accepts(tmp_path, capsys):
    """64-dim vectors, a budget whose largest fitting PQ is 48 bytes (64 % 48 != 0): FAISS
    refused PQ48x8; the build now takes the largest size that divides 64 and stays in budget."""
    n, dim, budget = 2000, 64, 200_000
    X = clustered_vectors(n, dim, clusters=40, seed=3)
    uris = synthetic_uris(n)
    write_run(str(tmp_path / "store"), RUN, uris, X, shards=2)
    index = tmp_path / "index"
    assert remap(["index", "--embeddings", str(tmp_path / "store"), "--output", str(index),
                  "--max-index-memory", str(budget), "--no-progress"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["factory"] == "IVF32,PQ32x8" and summary["vectors"] == n
    assert os.path.getsize(index / "index.faiss") <= budget       # the budget holds on disk
    np.save(tmp_path / "q.npy", X[:50])
    assert remap(["search", "--index", str(index), "--vectors", str(tmp_path / "q.npy"),
                  "--k", "1", "--format", "json"]) == 0
    top = [json.loads(x)["results"][0]["id"] for x in capsys.readouterr().out.splitlines()]
    assert np.mean(np.array(top) == stable_ids(uris[:50])) >= 0.9  # 32-byte codes of 64 dims


# --------------------------------------------------------------------------- 10: refusals

def files_under(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def one_error_line(err: str, *needles: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.startswith("remap ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    return small_store(tmp_path_factory.mktemp("tiny") / "store", synthetic_uris(100))[0]


def test_an_output_path_that_is_a_file_is_refused_in_one_line(tiny_store, tmp_path, capsys):
    out = tmp_path / "index"
    out.write_text("not a folder")
    assert remap(["index", "--embeddings", tiny_store, "--output", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "is a file", "--output")
    assert out.read_text() == "not a folder"
    assert remap(["index", "--embeddings", tiny_store, "--output", str(out / "sub")]) == 2
    one_error_line(capsys.readouterr().err, "--output")


@pytest.mark.parametrize("factory,says", [
    ("IVF99999,Garbage", "could not parse"),
    ("PQ7", "multiple of the number of subquantizers"),           # 8 dims: 7 does not divide
    ("IVF1,PQ8", "needs at least 256 training vectors"),           # 100 vectors
    ("IVF99999,Flat", "needs at least 99999 training vectors")])
def test_a_factory_faiss_cannot_make_or_train_is_refused_before_anything_is_written(
        tiny_store, tmp_path, capsys, factory, says):
    out = tmp_path / "index"
    assert remap(["index", "--embeddings", tiny_store, "--output", str(out),
                  "--factory", factory]) == 2
    err = capsys.readouterr().err
    line = one_error_line(err, factory, says)
    assert "--factory" in line and "train:" not in err   # refused before sampling
    assert not out.exists()                         # the refused build created nothing
    assert remap(["index", "train", "--embeddings", tiny_store, "--output", str(out),
                  "--factory", factory]) == 2
    assert not out.exists()


def test_a_failed_rebuild_keeps_the_folder_and_the_index_already_in_it(tiny_store, tmp_path,
                                                                       capsys):
    out = tmp_path / "index"
    assert remap(["index", "--embeddings", tiny_store, "--output", str(out),
                  "--no-progress"]) == 0
    before = files_under(out)
    for bad in (["--factory", "PQ7"], ["--max-index-memory", "1KB"], ["--layout", "ondisk"]):
        assert remap(["index", "--embeddings", tiny_store, "--output", str(out), *bad]) == 2
        one_error_line(capsys.readouterr().err)
        assert files_under(out) == before               # nothing rewritten, nothing removed
    empty = tmp_path / "empty"
    empty.mkdir()
    assert remap(["index", "--embeddings", tiny_store, "--output", str(empty),
                  "--factory", "PQ7"]) == 2
    assert empty.is_dir() and not any(empty.iterdir())  # an existing folder stays


def test_a_build_that_fails_midway_names_the_damaged_shard_and_removes_what_it_created(
        tmp_path, capsys):
    import pyarrow.parquet as pq

    store = str(tmp_path / "store")
    run = write_run(store, RUN, synthetic_uris(400), clustered_vectors(400, DIM, seed=2),
                    shards=2)
    shard = os.path.join(run, "embeddings-00001-of-00002.parquet")
    meta = pq.ParquetFile(shard).metadata.row_group(0)
    col = next(meta.column(i) for i in range(meta.num_columns)
               if meta.column(i).path_in_schema.startswith("embedding"))
    with open(shard, "r+b") as f:     # the embedding column's page header: ids still read
        f.seek(col.data_page_offset)
        f.write(b"\xde\xad\xbe\xef" * 4)
    out = tmp_path / "new" / "index"
    # the default build reads every vector first (database-side augmentation): named there
    assert remap(["index", "--embeddings", store, "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    one_error_line(err, shard, "damaged")
    assert not (tmp_path / "new").exists()
    # without it, the shard is read when it is added, after the folder was made and trained
    assert remap(["index", "--embeddings", store, "--output", str(out), "--no-progress",
                  "--dba", "0"]) == 2
    err = capsys.readouterr().err
    assert "train: done" in err
    one_error_line(err, shard, "damaged")
    assert not (tmp_path / "new").exists()


def test_a_truncated_manifest_is_named_with_what_to_do(tiny_store, tmp_path, capsys):
    out = tmp_path / "index"
    assert remap(["index", "--embeddings", tiny_store, "--output", str(out),
                  "--no-progress"]) == 0
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[: len(text) // 2])
    np.save(tmp_path / "q.npy", np.eye(1, DIM, dtype=np.float32))
    capsys.readouterr()
    assert remap(["search", "--index", str(out), "--vectors", str(tmp_path / "q.npy")]) == 2
    one_error_line(capsys.readouterr().err, str(out / "manifest.json"), "not valid JSON",
                   "remap index")
    assert remap(["search", "--index", str(out / "index.faiss"), "--vectors",
                  str(tmp_path / "q.npy")]) == 2
    one_error_line(capsys.readouterr().err, "not an index folder")


# --------------------------------------------------------------------------- 11: exit status

@pytest.mark.parametrize("flag,value", [("--max-index-memory", "0"), ("--max-index-memory", "-5MB"),
                                        ("--max-index-memory", "0.0KB"), ("--add-memory", "0"),
                                        ("--max-index-memory", "lots")])
def test_budgets_that_are_not_positive_sizes_are_refused_before_any_work(tiny_store, tmp_path,
                                                                         capsys, flag, value):
    out = tmp_path / "index"
    assert remap(["index", "--embeddings", tiny_store, "--output", str(out),
                  f"{flag}={value}"]) == 2
    err = capsys.readouterr().err
    one_error_line(err, flag, repr(value), "e.g. 100MB")
    assert "train:" not in err and not out.exists()


def test_a_code_size_below_the_smallest_pq_code_is_refused_before_any_work(tiny_store, tmp_path,
                                                                           capsys):
    out = tmp_path / "index"
    assert remap(["index", "--embeddings", tiny_store, "--output", str(out),
                  "--code-bytes", "2"]) == 2
    err = capsys.readouterr().err
    one_error_line(err, "--code-bytes must be at least 4")
    assert "train:" not in err and not out.exists()


def test_refusals_exit_2_every_time_in_a_fresh_process(tiny_store, tmp_path):
    """The issue's commands, each in a new interpreter: 4 of 33 runs used to abort at exit
    (status 134, `terminate called without an active exception`) instead of exiting 2. Those
    that fail after the shards were read (a budget too small, a factory too big to train)
    exercise the exit right after Arrow's reads."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")])}
    cases = [["--max-index-memory=0"], ["--max-index-memory=-5MB"],
             ["--max-index-memory=1KB"], ["--factory", "IVF1,PQ8"]]

    def run(i):
        cmd = [sys.executable, "-m", "remap_cli", "index", "--embeddings", tiny_store,
               "--output", str(tmp_path / f"o{i}"), *cases[i % len(cases)]]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        return p.returncode, p.stderr

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, range(20)))
    assert [rc for rc, _ in results] == [2] * 20, [e[-300:] for rc, e in results if rc != 2]
    assert all("terminate called" not in e for _, e in results)


def test_reading_a_shard_leaves_no_arrow_thread_holding_the_file(tmp_path, monkeypatch):
    """The cause of those aborts: a Python file object handed to Arrow's pre-buffering reader
    was sometimes released by an Arrow I/O thread after the read returned; at exit that
    thread needs the GIL and aborts the process. Every read must be over, and the file
    released, when it returns."""
    import weakref

    import fsspec

    from index_builder.embeddings import (iter_shard_batches, list_runs, read_shard_ids,
                                          read_tombstone_ids, shard_metadata)

    write_run(str(tmp_path), RUN, synthetic_uris(100), clustered_vectors(100, DIM), shards=1,
              tombstone_uris=synthetic_uris(5, start=100))
    (run,) = list_runs(str(tmp_path))
    (shard,) = run.shard_paths
    opened = []
    real_open = fsspec.open

    class Recorded:            # the real fsspec file, with a weak reference kept to it
        def __init__(self, *a, **kw):
            self.of = real_open(*a, **kw)

        def __enter__(self):
            f = self.of.__enter__()
            opened.append(weakref.ref(f))
            return f

        def __exit__(self, *exc):
            return self.of.__exit__(*exc)

    monkeypatch.setattr(fsspec, "open", Recorded)
    held = 0
    for _ in range(250):
        for read in (lambda: read_shard_ids(shard), lambda: read_tombstone_ids(run),
                     lambda: shard_metadata(shard), lambda: list(iter_shard_batches(shard))):
            del opened[:]
            read()
            assert opened
            held += sum(ref() is not None for ref in opened)   # still referenced on return
    assert held == 0


# --------------------------------------------------------------------------- 13: queries, recall

def test_query_vectors_and_images_together_are_refused(tiny_store, tmp_path, capsys):
    out = tmp_path / "index"
    assert remap(["index", "--embeddings", tiny_store, "--output", str(out),
                  "--no-progress"]) == 0
    np.save(tmp_path / "q.npy", np.eye(2, DIM, dtype=np.float32))
    capsys.readouterr()
    assert remap(["search", "--index", str(out), "--vectors", str(tmp_path / "q.npy"),
                  str(tmp_path / "photo.jpg")]) == 2
    captured = capsys.readouterr()
    one_error_line(captured.err, "--vectors", "not both")
    assert captured.out == ""


def test_the_recall_log_says_how_many_queries_it_used(tmp_path, capsys):
    store, _ = small_store(tmp_path / "store", synthetic_uris(21))
    assert remap(["index", "--embeddings", store, "--output", str(tmp_path / "index"),
                  "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "measuring recall on 21 held-out queries (not 1000: the index holds 21" \
        in captured.err
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["recall"]["queries"] == 21 and manifest["recall"]["measured"] is True
    assert len(np.load(tmp_path / "index" / "recall_queries.npz")["ids"]) == 21


def test_a_one_vector_index_records_recall_as_not_measured(tmp_path, capsys):
    store, X = small_store(tmp_path / "store", synthetic_uris(1))
    index = tmp_path / "index"
    assert remap(["index", "--embeddings", store, "--output", str(index), "--no-progress"]) == 0
    captured = capsys.readouterr()
    summary = last_json(captured.out)
    assert summary["vectors"] == 1
    assert summary["recall"] == {"recall@1": None, "recall@10": None, "recall@100": None}
    assert "recall not measured" in captured.err
    recall = json.loads((index / "manifest.json").read_text())["recall"]
    assert recall["measured"] is False and recall["queries"] == 0
    assert "at least 2" in recall["reason"] and recall["recall@1"] is None
    assert not (index / "recall_queries.npz").exists()
    np.save(tmp_path / "q.npy", X)          # the query library opens and searches it
    assert remap(["search", "--index", str(index), "--vectors", str(tmp_path / "q.npy"),
                  "--format", "json"]) == 0
    (row,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in row["results"]] == list(stable_ids(synthetic_uris(1)))
    assert row["results"][0]["score"] == pytest.approx(float(X[0] @ X[0]), abs=1e-5)


def test_the_dba_help_spells_the_limits_the_builder_applies(capsys):
    """`remap index --help` states the DBA limits as numbers (the console does not import FAISS
    to build its parsers); they must be the ones index_builder applies."""
    from index_builder.build import DBA_DEFAULT_MAX_BYTES
    from index_builder.knn import EXACT_MAX
    from remap_cli import main

    with pytest.raises(SystemExit):
        main(["index", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"at most {DBA_DEFAULT_MAX_BYTES / 2**30:g} GiB" in text
    assert f"({DBA_DEFAULT_MAX_BYTES // (256 * 4) // 10**6}M at 256-D;" in text
    assert f"exact up to {EXACT_MAX:,} vectors" in text
