"""Indexes on object storage: `remap index --output gs://...` builds in a local staging folder and
uploads it manifest last (index_builder/publish.py); the query library opens it from there."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest

from index_builder.manifest import MANIFEST_NAME, manifest_files
from index_builder.publish import upload_index
from index_builder.search import open_index
from index_builder.synthetic import clustered_vectors, synthetic_uris, write_run
from objectstore import fake_gcs  # noqa: F401  (pytest fixture: fake-gcs-server on loopback)
from remap_cli import main as remap

DIM = 16


def built_folder(tmp_path, files: dict[str, bytes]):
    """A local index folder with a manifest listing `files` (plus an unlisted scratch file)."""
    local = tmp_path / "built"
    for name, data in files.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    (local / "recall_queries.npz").write_bytes(b"build scratch, not for readers")
    entries = [{"path": n, "bytes": len(d), "sha256": "x"} for n, d in files.items()]
    (local / MANIFEST_NAME).write_text(json.dumps(
        {"format_version": 1, "index_files": entries[:-1], "id_files": entries[-1:]}))
    return local


def test_upload_replaces_an_index_manifest_first_and_last(tmp_path, monkeypatch):
    local = built_folder(tmp_path, {"index.faiss": b"I" * 10, "shards/a.ids.parquet": b"P" * 7})
    fs = fsspec.filesystem("memory")
    dest = f"memory://{tmp_path.name}/indexes/2026-11-20"   # the memory fs is process-wide
    fs.pipe({f"{dest}/{MANIFEST_NAME}": b"{}", f"{dest}/old/shard.faiss": b"old"})
    ops = []
    real_put, real_rm = fs.put_file, fs.rm
    monkeypatch.setattr(fs, "put_file", lambda lpath, rpath, **kw: (
        ops.append(("put", rpath.rsplit("2026-11-20/", 1)[1])), real_put(lpath, rpath)))
    monkeypatch.setattr(fs, "rm", lambda path, *a, **kw: (
        ops.append(("rm", path.rsplit("2026-11-20/", 1)[1])), real_rm(path, *a, **kw)))

    out = upload_index(str(local), dest)
    assert ops == [("rm", MANIFEST_NAME), ("put", "index.faiss"), ("put", "shards/a.ids.parquet"),
                   ("rm", "old/shard.faiss"), ("put", MANIFEST_NAME)]
    assert out == {"to": dest, "uploaded": 3, "removed": 1,
                   "bytes": 17 + (local / MANIFEST_NAME).stat().st_size}
    assert not fs.exists(f"{dest}/recall_queries.npz")      # build scratch stays local


def test_a_cut_upload_leaves_no_index_and_a_rerun_completes_it(tmp_path, monkeypatch):
    local = built_folder(tmp_path, {"index.faiss": b"I" * 10, "ids.parquet": b"P" * 7})
    fs = fsspec.filesystem("memory")
    dest = f"memory://{tmp_path.name}/indexes/cut"
    fs.pipe({f"{dest}/{MANIFEST_NAME}": b'{"format_version": 1}'})   # yesterday's index
    real_put = fs.put_file

    def cut(lpath, rpath, **kw):
        if rpath.endswith("ids.parquet"):
            raise OSError("connection reset")
        return real_put(lpath, rpath)

    monkeypatch.setattr(fs, "put_file", cut)
    with pytest.raises(OSError, match="connection reset"):
        upload_index(str(local), dest)
    with pytest.raises(FileNotFoundError, match="no index at"):   # not the old manifest
        open_index(dest)
    monkeypatch.setattr(fs, "put_file", real_put)
    assert upload_index(str(local), dest)["uploaded"] == 3
    assert fs.cat(f"{dest}/ids.parquet") == b"P" * 7


def test_remap_index_to_gcs_then_search_from_it(fake_gcs, tmp_path, capsys):  # noqa: F811
    store = str(tmp_path / "store")
    X = clustered_vectors(3000, DIM, clusters=30, seed=0)
    uris = synthetic_uris(3000)
    write_run(store, "20260101T000000Z-aaaaaa", uris, X, shards=3)
    dest = fake_gcs.bucket("indexes-publish") + "/2026-11-20"

    assert remap(["index", "--dba", "0",
                  "--embeddings", store, "--output", dest, "--layout", "shards",
                  "--recall-queries", "200", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["index"] == dest and summary["vectors"] == 3000
    index = open_index(dest)                                 # checksums verified on open
    hits = index.search_vectors(X[[5, 2500]], k=1)
    assert [h[0].uri for h in hits] == [uris[5], uris[2500]]

    # rebuilt over it with one layout file instead of three shards: nothing stale is left
    staging = tmp_path / "staging"
    assert remap(["index", "--dba", "0",
                  "--embeddings", store, "--output", dest, "--layout", "single",
                  "--recall-queries", "200", "--no-progress", "--staging", str(staging)]) == 0
    fs = fake_gcs.fs
    fs.invalidate_cache()
    root = dest.split("://", 1)[1]
    remote = sorted(p[len(root) + 1:] for p in fs.find(root))
    manifest = json.loads(fs.cat(f"{root}/{MANIFEST_NAME}"))
    listed = sorted({e["path"] for e in manifest_files(manifest)})
    assert remote == sorted(listed + [MANIFEST_NAME]) and manifest["layout"] == "single"
    assert (staging / MANIFEST_NAME).exists()                # a given staging folder is kept
    np.testing.assert_array_equal(
        [h[0].uri for h in open_index(dest).search_vectors(X[:3], k=1)], uris[:3])


def test_index_steps_refuse_object_storage_and_say_what_works(tmp_path, capsys):
    rc = remap(["index", "train", "--embeddings", str(tmp_path), "--output", "gs://b/idx"])
    assert rc == 2
    assert "builds in a local staging folder and uploads it" in capsys.readouterr().err
