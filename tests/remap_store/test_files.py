"""The one atomic writer and the URL helpers."""

import json
import os

import fsspec
import pytest

from remap_store.files import (atomic_open, atomic_path, join_url, with_protocol,
                               write_json_atomic)


def test_with_protocol_gives_back_what_fsspec_stripped():
    assert with_protocol("gs://b/root", "b/root/x") == "gs://b/root/x"
    assert with_protocol("gs://b/root", "gs://b/root/x") == "gs://b/root/x"
    assert with_protocol("/data/root", "/data/root/x") == "/data/root/x"
    assert join_url("s3://b/root/", "run-1", "/run.json") == "s3://b/root/run-1/run.json"


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
    target = tmp_path / "sub" / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_open(str(target), "w") as f:
            f.write('{"half":')
            raise RuntimeError("killed")
    assert not target.exists() and os.listdir(tmp_path / "sub") == []
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path / "sub") == []


def test_a_finished_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "x.json"
    write_json_atomic(str(target), {"a": 1})
    write_json_atomic(str(target), {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2} and os.listdir(tmp_path) == ["x.json"]
    with atomic_path(str(tmp_path / "y.bin")) as tmp:
        open(tmp, "wb").write(b"abc")
    assert (tmp_path / "y.bin").read_bytes() == b"abc"


def test_atomic_open_works_on_other_filesystems():
    url = "memory://remap-files-test/a/b.json"
    write_json_atomic(url, {"k": [1, 2]})
    fs, path = fsspec.core.url_to_fs(url)
    assert json.loads(fs.cat_file(path)) == {"k": [1, 2]}
    assert [p.rsplit("/", 1)[-1] for p in fs.ls("/remap-files-test/a", detail=False)] == ["b.json"]


def test_is_remote_tells_object_storage_from_local_paths():
    from remap_store.files import is_remote

    assert is_remote("gs://b/x") and is_remote("s3://b/x") and is_remote("memory://x")
    assert not is_remote("/data/x") and not is_remote("rel/x") and not is_remote("file:///x")
