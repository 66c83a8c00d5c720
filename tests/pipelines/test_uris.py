"""Where URIs come from (pipelines/uris.py): URI lists, folders, globs, listing with versions."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import image_cases
from objectstore import moto_s3  # noqa: F401  (pytest fixture)
from pipelines.uris import (Source, expand_input, expand_partition, list_partitions, list_uris,
                            read_uri_list, stat, version_of)


def test_txt_uri_list_skips_blanks_and_comments(tmp_path):
    m = tmp_path / "m.txt"
    m.write_text("# crawl of 2026-11-23\n\ngs://b/a.jpg\n  s3://c/d.png  \n")
    assert list(read_uri_list(str(m))) == ["gs://b/a.jpg", "s3://c/d.png"]


def test_csv_uri_list_needs_a_uri_column(tmp_path):
    with_header = tmp_path / "h.csv"
    with_header.write_text("label,uri\ncat,gs://b/1.jpg\ndog,gs://b/2.jpg\n,\n")
    assert list(read_uri_list(str(with_header))) == ["gs://b/1.jpg", "gs://b/2.jpg"]
    exported = tmp_path / "bom.csv"            # a spreadsheet export: byte-order mark, spaces
    exported.write_bytes("\ufeff uri ,label\ngs://b/3.jpg,x\n".encode("utf-8"))
    assert list(read_uri_list(str(exported))) == ["gs://b/3.jpg"]
    no_header = tmp_path / "n.csv"             # was read as URIs (header and first column)
    no_header.write_text("gs://b/1.jpg,x\ngs://b/2.jpg,y\n")
    with pytest.raises(ValueError, match=r"no 'uri' column \(header: \['gs://b/1.jpg', 'x'\]\)"):
        list(read_uri_list(str(no_header)))


def test_parquet_uri_list_needs_a_uri_column(tmp_path):
    good = tmp_path / "g.parquet"
    pq.write_table(pa.table({"uri": ["a.jpg", None, "b.jpg"], "w": [1, 2, 3]}), good)
    assert list(read_uri_list(str(good))) == ["a.jpg", "b.jpg"]
    bad = tmp_path / "b.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"]}), bad)
    with pytest.raises(ValueError, match="no 'uri' column"):
        list(read_uri_list(str(bad)))


def test_folder_is_listed_as_one_task_per_subfolder(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for rel in ("top.jpg", "a/1.jpg", "a/deep/2.png", "b/3.jpeg", "b/notes.txt"):
        (tmp_path / rel).write_bytes(image_cases.jpeg(8, 8) if not rel.endswith("txt") else b"x")
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


def test_glob_of_uri_lists_and_glob_of_images(tmp_path):
    for i in range(3):
        (tmp_path / f"part-{i}.txt").write_text(f"gs://b/{i}.jpg\n")
        (tmp_path / f"img-{i}.jpg").write_bytes(image_cases.jpeg(8, 8))
    parts = list_partitions(str(tmp_path / "part-*.txt"))
    assert parts == [("uri_list", str(tmp_path / f"part-{i}.txt")) for i in range(3)]
    assert [s for p in parts for s in expand_partition(*p)] == \
        [Source(f"gs://b/{i}.jpg") for i in range(3)]
    (glob_part,) = list_partitions(str(tmp_path / "img-*.jpg"))
    assert [s.uri for s in expand_partition(*glob_part)] == \
        [str(tmp_path / f"img-{i}.jpg") for i in range(3)]


def test_missing_input_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass a folder, a glob or URI list"):
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
    data = image_cases.jpeg(30, 20)
    with moto_s3.fs.open(f"{bucket}/x.jpg", "wb") as f:
        f.write(data)
    s = stat(Source(f"{bucket}/x.jpg"))
    assert s.size == len(data) and s.version.startswith("ETag=")
    with pytest.raises(FileNotFoundError):
        stat(Source(f"{bucket}/missing.jpg"))
    (part,) = [p for p in list_partitions(bucket) if p[1].endswith("x.jpg")]
    assert list(expand_partition(*part)) == [s]


def test_parquet_uri_list_splits_into_row_group_tasks(tmp_path):
    from pipelines.uris import split_partition

    m = tmp_path / "big.parquet"
    uris = [f"gs://b/{i:03d}.jpg" for i in range(25)]
    pq.write_table(pa.table({"uri": uris}), m, row_group_size=10)
    tasks = split_partition("uri_list", str(m))
    assert tasks == [("uri_list_row_group", str(m), i) for i in range(3)]
    assert [s.uri for t in tasks for s in expand_partition(*t)] == uris
    assert split_partition("uri_list", str(tmp_path / "list.txt")) == \
        [("uri_list", str(tmp_path / "list.txt"))]
    assert split_partition("dir", "gs://b/x") == [("dir", "gs://b/x")]


@pytest.mark.parametrize("name", ["photos [2024]", "what?", "star*"])
def test_an_existing_path_with_glob_characters_is_a_path(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "a.jpg").write_bytes(image_cases.jpeg(8, 8))
    (tmp_path / "whatX.jpg").write_bytes(image_cases.jpeg(8, 8))   # what the glob "what?" would match
    (tmp_path / "photos 2.jpg").write_bytes(image_cases.jpeg(8, 8))   # ... and "photos [2024]"
    assert expand_input(str(folder)) == ("images", [str(folder / "a.jpg")])
    assert list_partitions(str(folder)) == [("file", str(folder / "a.jpg"))]
    assert list_uris(str(folder / "a.jpg")) == [str(folder / "a.jpg")]
    assert list_partitions(str(tmp_path / "wha?X.jpg")) == [("glob", str(tmp_path / "wha?X.jpg"))]


def test_an_existing_object_store_prefix_with_glob_characters_is_a_path(moto_s3):  # noqa: F811
    bucket = moto_s3.bucket("uris-globchars")
    for key in ("photos [2024]/a.jpg", "photos [2024]/sub/b.jpg", "photos 2/c.jpg",
                "what?/d.jpg", "whatX/e.jpg"):
        with moto_s3.fs.open(f"{bucket}/{key}", "wb") as f:
            f.write(image_cases.jpeg(8, 8))
    moto_s3.fs.invalidate_cache()
    kind, uris = expand_input(f"{bucket}/photos [2024]")
    assert (kind, uris) == ("images", [f"{bucket}/photos [2024]/a.jpg",
                                       f"{bucket}/photos [2024]/sub/b.jpg"])
    parts = list_partitions(f"{bucket}/photos [2024]")
    assert parts == [("file", f"{bucket}/photos [2024]/a.jpg"),
                     ("dir", f"{bucket}/photos [2024]/sub")]
    assert sorted(s.uri for p in parts for s in expand_partition(*p)) == uris
    parts = list_partitions(f"{bucket}/what?")
    assert [s.uri for p in parts for s in expand_partition(*p)] == [f"{bucket}/what?/d.jpg"]
    # a pattern that names no existing prefix is still a glob
    assert expand_input(f"{bucket}/wha?X/*.jpg") == ("images", [f"{bucket}/whatX/e.jpg"])


def test_local_uris_are_normalised_and_other_files_reported(tmp_path, monkeypatch):
    from pipelines.uris import NotAnImage, normalize_uri

    monkeypatch.chdir(tmp_path)
    assert normalize_uri("dir/./x.jpg") == normalize_uri(f"{tmp_path}//dir/x.jpg") == \
        str(tmp_path / "dir" / "x.jpg")
    assert normalize_uri("file:///a/./b/../x.jpg") == "file:///a/x.jpg"
    assert normalize_uri("gs://b/./x.jpg") == "gs://b/./x.jpg"      # a valid object key there
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jpg").write_bytes(image_cases.jpeg(8, 8))
    (tmp_path / "d" / "x.txt").write_text("x")
    items = list(expand_partition("dir", "d/.", with_others=True))
    assert [type(i).__name__ for i in items] == ["Source", "NotAnImage"]
    assert items[0].uri == str(tmp_path / "d" / "x.jpg")
    assert items[1] == NotAnImage(str(tmp_path / "d" / "x.txt"))
    assert [i.uri for i in expand_partition("dir", "d/.")] == [items[0].uri]
    assert list_partitions(str(tmp_path / "d")) == [("file", str(tmp_path / "d" / "x.jpg")),
                                                     ("other", str(tmp_path / "d" / "x.txt"))]
