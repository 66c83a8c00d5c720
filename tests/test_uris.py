"""Where URIs come from (pipelines/uris.py): manifests, folders, globs, listing with versions."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import image_cases as C
from objectstore import moto_s3  # noqa: F401  (pytest fixture)
from pipelines.uris import (Source, expand_input, expand_partition, list_partitions, list_uris,
                            read_manifest, stat, version_of)


def test_txt_manifest_skips_blanks_and_comments(tmp_path):
    m = tmp_path / "m.txt"
    m.write_text("# crawl of 2026-11-23\n\ngs://b/a.jpg\n  s3://c/d.png  \n")
    assert list(read_manifest(str(m))) == ["gs://b/a.jpg", "s3://c/d.png"]


def test_csv_manifest_uses_uri_column_or_first_column(tmp_path):
    with_header = tmp_path / "h.csv"
    with_header.write_text("label,uri\ncat,gs://b/1.jpg\ndog,gs://b/2.jpg\n,\n")
    assert list(read_manifest(str(with_header))) == ["gs://b/1.jpg", "gs://b/2.jpg"]
    no_header = tmp_path / "n.csv"
    no_header.write_text("gs://b/1.jpg,x\ngs://b/2.jpg,y\n")
    assert list(read_manifest(str(no_header))) == ["gs://b/1.jpg", "gs://b/2.jpg"]


def test_parquet_manifest_needs_a_uri_column(tmp_path):
    good = tmp_path / "g.parquet"
    pq.write_table(pa.table({"uri": ["a.jpg", None, "b.jpg"], "w": [1, 2, 3]}), good)
    assert list(read_manifest(str(good))) == ["a.jpg", "b.jpg"]
    bad = tmp_path / "b.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"]}), bad)
    with pytest.raises(ValueError, match="no 'uri' column"):
        list(read_manifest(str(bad)))


def test_folder_is_listed_as_one_task_per_subfolder(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for rel in ("top.jpg", "a/1.jpg", "a/deep/2.png", "b/3.jpeg", "b/notes.txt"):
        (tmp_path / rel).write_bytes(C.jpeg(8, 8) if not rel.endswith("txt") else b"x")
    parts = list_partitions(str(tmp_path))
    assert parts == [("dir", str(tmp_path / "a")), ("dir", str(tmp_path / "b")),
                     ("file", str(tmp_path / "top.jpg"))]
    found = sorted(s.uri for p in parts for s in expand_partition(*p))
    assert found == sorted(str(tmp_path / r) for r in ("top.jpg", "a/1.jpg", "a/deep/2.png",
                                                        "b/3.jpeg"))
    assert found == sorted(list_uris(str(tmp_path)))
    for p in parts:
        for s in expand_partition(*p):
            assert s.size == os.path.getsize(s.uri) and s.version.startswith("mtime=")


def test_glob_of_manifests_and_glob_of_images(tmp_path):
    for i in range(3):
        (tmp_path / f"part-{i}.txt").write_text(f"gs://b/{i}.jpg\n")
        (tmp_path / f"img-{i}.jpg").write_bytes(C.jpeg(8, 8))
    parts = list_partitions(str(tmp_path / "part-*.txt"))
    assert parts == [("manifest", str(tmp_path / f"part-{i}.txt")) for i in range(3)]
    assert [s for p in parts for s in expand_partition(*p)] == \
        [Source(f"gs://b/{i}.jpg") for i in range(3)]
    (glob_part,) = list_partitions(str(tmp_path / "img-*.jpg"))
    assert [s.uri for s in expand_partition(*glob_part)] == \
        [str(tmp_path / f"img-{i}.jpg") for i in range(3)]


def test_missing_input_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass a folder, a glob or manifest"):
        list_partitions(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="matched nothing"):
        expand_input(str(tmp_path / "*.jpg"))


def test_version_of_prefers_object_generation_then_etag_then_mtime():
    assert version_of({"generation": "17", "etag": "x", "mtime": 1}) == "generation=17"
    assert version_of({"ETag": '"abc"', "LastModified": "t"}) == 'ETag="abc"'
    assert version_of({"mtime": 1.5}) == "mtime=1.5"
    assert version_of({"size": 3}) is None
    assert Source("u", 3, None).signature() is None
    assert Source("u", 3, "mtime=1").signature() == "3:mtime=1"


def test_stat_reads_size_and_etag_from_s3(moto_s3):  # noqa: F811
    bucket = moto_s3.bucket("uris-s3")
    data = C.jpeg(30, 20)
    with moto_s3.fs.open(f"{bucket}/x.jpg", "wb") as f:
        f.write(data)
    s = stat(Source(f"{bucket}/x.jpg"))
    assert s.size == len(data) and s.version.startswith("ETag=")
    with pytest.raises(FileNotFoundError):
        stat(Source(f"{bucket}/missing.jpg"))
    (part,) = [p for p in list_partitions(bucket) if p[1].endswith("x.jpg")]
    assert list(expand_partition(*part)) == [s]


def test_parquet_manifest_splits_into_row_group_tasks(tmp_path):
    from pipelines.uris import split_partition

    m = tmp_path / "big.parquet"
    uris = [f"gs://b/{i:03d}.jpg" for i in range(25)]
    pq.write_table(pa.table({"uri": uris}), m, row_group_size=10)
    tasks = split_partition("manifest", str(m))
    assert tasks == [("manifest_row_group", str(m), i) for i in range(3)]
    assert [s.uri for t in tasks for s in expand_partition(*t)] == uris
    assert split_partition("manifest", str(tmp_path / "list.txt")) == \
        [("manifest", str(tmp_path / "list.txt"))]
    assert split_partition("dir", "gs://b/x") == [("dir", "gs://b/x")]
