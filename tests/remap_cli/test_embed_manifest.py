"""A URI manifest's extra columns (title, product_id, ...) travel from `remap embed` through the
embedding shards and `remap index` to every search hit, and filter hits. Real Beam
(FnApiRunner), real Parquet, real FAISS, small photos made here; the reference for each hit's
metadata is the manifest row of that hit's URI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from index_builder.embeddings import list_runs
from index_builder.search import open_index
from remap_cli import main as remap


def photos(folder, n: int, seed: int) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        blocks = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
        paths.append(str(folder / f"p{i}.jpg"))
        Image.fromarray(blocks).resize((96, 96), Image.Resampling.NEAREST).save(paths[-1])
    return paths


def write_csv(path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def embed(manifest: str, store, model: str, capsys) -> dict:
    capsys.readouterr()
    assert remap(["embed", "--input", manifest, "--output", str(store), f"--model={model}",
                  "--progress_seconds=0"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def index_and_search(store, out, queries: list[str], capsys, *flags) -> list[dict]:
    """`remap index` then `remap search --format json` -> each query's hits (dicts)."""
    assert remap(["index", "--embeddings", str(store), "--output", str(out),
                  "--no-progress"]) == 0
    capsys.readouterr()
    assert remap(["search", "--index", str(out), "--k", "20", "--format", "json", *flags,
                  *queries]) == 0
    return [json.loads(x)["results"] for x in capsys.readouterr().out.strip().splitlines()]


def shard_table(store) -> pa.Table:
    (run,) = list_runs(str(store))[-1:]
    return pa.concat_tables([pq.read_table(p) for p in run.shard_paths])


def test_csv_manifest_columns_reach_every_hit_and_filter(tmp_path, tiny_model_path, capsys):
    paths = photos(tmp_path / "img", 5, seed=1)
    rows = [{"uri": p, "title": f"red shoe {i}", "product_id": f"SKU-{i % 2}"}
            for i, p in enumerate(paths)]
    manifest = write_csv(tmp_path / "list.csv", rows)
    store = tmp_path / "store"
    assert embed(manifest, store, tiny_model_path, capsys)["embedded"] == 5
    shards = shard_table(store)
    # CSV values are not type-inferred: strings, as written
    assert shards.schema.field("title").type == pa.string()
    assert shards.schema.field("product_id").type == pa.string()
    by_uri = {r["uri"]: r for r in rows}
    results = index_and_search(store, tmp_path / "index", paths[:2], capsys)
    for hits in results:
        assert sorted(h["uri"] for h in hits) == sorted(paths)
        for h in hits:
            assert h["metadata"]["title"] == by_uri[h["uri"]]["title"]
            assert h["metadata"]["product_id"] == by_uri[h["uri"]]["product_id"]
    # the library's hits alike, and a filter on a manifest column
    idx = open_index(str(tmp_path / "index"))
    X = np.stack(shards.column("embedding").to_numpy(zero_copy_only=False))
    (hits,) = idx.search_vectors(X[:1], k=10, filters={"product_id": "SKU-1"})
    expect = sorted(r["uri"] for r in rows if r["product_id"] == "SKU-1")
    assert sorted(h.uri for h in hits) == expect
    assert all(h.metadata["title"] == by_uri[h.uri]["title"] for h in hits)
    filtered = index_and_search(store, tmp_path / "index2", paths[:1], capsys,
                                "--filter", "product_id=SKU-0")
    assert sorted(h["uri"] for h in filtered[0]) == sorted(
        r["uri"] for r in rows if r["product_id"] == "SKU-0")


def test_parquet_manifest_keeps_its_types_and_runs_with_other_columns_index_together(
        tmp_path, tiny_model_path, capsys):
    a = photos(tmp_path / "a", 3, seed=2)
    b = photos(tmp_path / "b", 3, seed=3)
    store = tmp_path / "store"
    csv_rows = [{"uri": p, "title": f"csv {i}"} for i, p in enumerate(a)]
    embed(write_csv(tmp_path / "a.csv", csv_rows), store, tiny_model_path, capsys)
    table = pa.table({"product_id": pa.array([101, 102, 103], pa.int64()),
                      "uri": pa.array(b, pa.string()),
                      "title": pa.array(["pq 0", "pq 1", None], pa.string())})
    pq.write_table(table, tmp_path / "b.parquet")
    assert embed(str(tmp_path / "b.parquet"), store, tiny_model_path, capsys)["embedded"] == 3
    shards = shard_table(store)
    assert shards.schema.field("product_id").type == pa.int64()        # Parquet types kept
    expect = {p: {"title": f"csv {i}", "product_id": None} for i, p in enumerate(a)}
    expect.update({u: {"title": t, "product_id": pid} for u, t, pid in
                   zip(b, ["pq 0", "pq 1", None], [101, 102, 103])})
    results = index_and_search(store, tmp_path / "index", [a[0], b[0]], capsys)
    for hits in results:
        assert sorted(h["uri"] for h in hits) == sorted(a + b)     # the first run's kept too
        for h in hits:
            got = {c: h["metadata"].get(c) for c in ("title", "product_id")}
            assert got == expect[h["uri"]]
    idx = open_index(str(tmp_path / "index"))
    X = np.stack(shards.column("embedding").to_numpy(zero_copy_only=False))
    (hits,) = idx.search_vectors(X[:1], k=10, filters={"product_id": [101, 103]})
    assert sorted(h.uri for h in hits) == sorted([b[0], b[2]])


@pytest.mark.parametrize("column", ["width", "content_sha1", "embedding"])
def test_a_manifest_column_named_like_a_shard_column_is_refused(tmp_path, tiny_model_path,
                                                                capsys, column):
    paths = photos(tmp_path / "img", 1, seed=4)
    manifest = write_csv(tmp_path / "list.csv", [{"uri": paths[0], column: "x"}])
    store = tmp_path / "store"
    capsys.readouterr()
    assert remap(["embed", "--input", manifest, "--output", str(store),
                  f"--model={tiny_model_path}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("remap embed: error: ") and f"column {column!r}" in line
    assert "rename" in line and not store.exists()


def test_an_incremental_rerun_reembeds_only_a_changed_row_and_indexes_no_duplicate(
        tmp_path, tiny_model_path, capsys):
    paths = photos(tmp_path / "img", 4, seed=5)
    rows = [{"uri": p, "title": f"t{i}", "product_id": f"P{i}"} for i, p in enumerate(paths)]
    manifest = tmp_path / "list.csv"
    store = tmp_path / "store"
    assert embed(write_csv(manifest, rows), store, tiny_model_path, capsys)["embedded"] == 4
    again = embed(str(manifest), store, tiny_model_path, capsys)
    assert again["embedded"] == 0 and again["skipped"] == 4
    rows[2]["title"] = "renamed"          # the image is unchanged, its manifest row is not
    changed = embed(write_csv(manifest, rows), store, tiny_model_path, capsys)
    assert changed["embedded"] == 1 and changed["skipped"] == 3
    assert shard_table(store).column("uri").to_pylist() == [paths[2]]
    by_uri = {r["uri"]: r for r in rows}
    (hits,) = index_and_search(store, tmp_path / "index", paths[:1], capsys)
    assert sorted(h["uri"] for h in hits) == sorted(paths)             # each image once
    assert {h["uri"]: h["metadata"]["title"] for h in hits} == {
        u: r["title"] for u, r in by_uri.items()}


def test_runs_giving_one_column_two_types_are_refused_by_the_index_build_naming_it(
        tmp_path, tiny_model_path, capsys):
    a = photos(tmp_path / "a", 1, seed=6)
    b = photos(tmp_path / "b", 1, seed=7)
    store = tmp_path / "store"
    embed(write_csv(tmp_path / "a.csv", [{"uri": a[0], "product_id": "7"}]), store,
          tiny_model_path, capsys)
    pq.write_table(pa.table({"uri": b, "product_id": pa.array([7], pa.int64())}),
                   tmp_path / "b.parquet")
    embed(str(tmp_path / "b.parquet"), store, tiny_model_path, capsys)
    assert remap(["index", "--embeddings", str(store), "--output", str(tmp_path / "index"),
                  "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "remap index: error: " in err and "product_id" in err and "one type" in err
