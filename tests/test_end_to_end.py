"""The walking skeleton end to end: samples -> remap embed (Beam) -> remap index -> remap search."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from index_builder.search import FingerprintMismatch, open_index
from remap_cli import main as remap


def _original_of(query: str) -> str:
    return Path(query).name.split("__")[0]


@pytest.fixture(scope="module")
def built(sample_dir, tmp_path_factory):
    """Embed the sample images with the default model, build the index once for this module."""
    work = tmp_path_factory.mktemp("e2e")
    store, index = work / "store", work / "index"
    assert remap(["embed", "--input", str(sample_dir / "images"), "--output", str(store)]) == 0
    assert remap(["index", "--embeddings", str(store), "--output", str(index)]) == 0
    return store, index


def test_every_altered_sample_query_returns_its_original_first(built, sample_dir):
    _, index = built
    idx = open_index(str(index))
    queries = sorted(str(p) for p in (sample_dir / "queries").glob("*.jpg"))
    assert len(queries) >= 80
    results = idx.search_images(queries, k=5)
    misses = [(q, [h.uri for h in hits[:2]]) for q, hits in zip(queries, results)
              if Path(hits[0].uri).stem != _original_of(q)]
    assert misses == []


def test_embed_run_is_accounted_for_and_shards_follow_the_contract(built, sample_dir):
    store, _ = built
    (run,) = list(store.glob("run-*"))
    summary = json.loads((run / "run.json").read_text())
    n_images = len(list((sample_dir / "images").glob("*.jpg")))
    assert summary["read"] == summary["embedded"] == n_images
    assert summary["dead_lettered"] == 0
    (shard,) = [run / s for s in summary["shards"]]
    pf = pq.ParquetFile(shard)
    meta = pf.schema_arrow.metadata
    assert meta[b"remap.model_fingerprint"].decode() == summary["model"]
    assert int(meta[b"remap.dimension"]) == summary["dimension"]
    assert pf.metadata.row_group(0).column(0).compression.lower() == "zstd"
    table = pf.read()
    assert set(table.column_names) >= {"id", "uri", "embedding", "content_sha1", "width",
                                       "height", "model"}
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert len(set(table.column("id").to_pylist())) == table.num_rows


def test_search_cli_json_contract(built, sample_dir, capsys):
    _, index = built
    q = str(sample_dir / "queries" / "chelsea__crop.jpg")
    assert remap(["search", "--index", str(index), "--k", "3", "--format", "json", q]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 1 and lines[0]["query"] == q
    res = lines[0]["results"]
    assert [r["rank"] for r in res] == [1, 2, 3]
    assert Path(res[0]["uri"]).stem == "chelsea"
    assert res[0]["score"] >= res[1]["score"] >= res[2]["score"]
    assert all(isinstance(r["id"], int) for r in res)


def test_manifest_recall_and_damaged_index_is_refused(built, tmp_path):
    _, index = built
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["recall"]["recall@1"] == 1.0  # Flat is exact
    copy = tmp_path / "copy"
    shutil.copytree(index, copy)
    with open(copy / "index.faiss", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(ValueError, match="checksum"):
        open_index(str(copy))


def test_corrupt_and_empty_files_land_in_dead_letter_and_the_run_continues(
        sample_dir, tiny_model_path, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("chelsea", "coffee", "rocket"):
        shutil.copy(sample_dir / "images" / f"{name}.jpg", src)
    good = (sample_dir / "images" / "astronaut.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.png").write_bytes(b"this is not an image")
    store = tmp_path / "store"
    assert remap(["embed", "--input", str(src), "--output", str(store),
                  "--model", tiny_model_path]) == 0
    (run,) = list(store.glob("run-*"))
    summary = json.loads((run / "run.json").read_text())
    assert (summary["read"], summary["embedded"], summary["dead_lettered"]) == (6, 3, 3)
    dead = pq.read_table(list(run.glob("dead_letter-*.parquet"))).to_pylist()
    by_uri = {Path(d["uri"]).name: d for d in dead}
    assert set(by_uri) == {"truncated.jpg", "empty.jpg", "notes.png"}
    assert by_uri["empty.jpg"]["error_type"] == "empty"
    assert by_uri["notes.png"]["error_type"] == "not_an_image"
    assert all(d["stage"] == "decode" and d["message"] and d["run_id"] == summary["run_id"]
               for d in dead)


def test_query_with_another_model_is_refused(sample_dir, tiny_model_path, tmp_path, capsys):
    store, index = tmp_path / "store", tmp_path / "index"
    remap(["embed", "--input", str(sample_dir / "images" / "c*.jpg"), "--output", str(store),
           "--model", tiny_model_path])
    remap(["index", "--embeddings", str(store), "--output", str(index)])
    q = str(sample_dir / "queries" / "coffee__bright.jpg")
    idx = open_index(str(index))
    assert Path(idx.search_images([q], k=1)[0][0].uri).stem == "coffee"  # its own model works
    with pytest.raises(FingerprintMismatch, match="index built with model"):
        open_index(str(index)).search_images([q], k=1, model_uri=None)
    assert remap(["search", "--index", str(index), "--model", "default", q]) == 2
    assert "index built with model" in capsys.readouterr().err


def test_query_library_does_not_import_beam(built):
    _, index = built
    code = ("import sys, numpy as np; from index_builder.search import open_index; "
            f"i = open_index({str(index)!r}); "
            "i.search_vectors(np.eye(1, i.dimension, dtype='float32'), 3); "
            "assert 'apache_beam' not in sys.modules, 'beam imported'; "
            "assert 'torch' not in sys.modules, 'torch imported for a vector query'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wrong_dimension_query_vectors_get_a_clear_error(built):
    _, index = built
    idx = open_index(str(index))
    assert idx.dimension == 256          # the shipped default model's
    with pytest.raises(ValueError, match=r"this index takes \(Q, 256\)"):
        idx.search_vectors(np.zeros((1, 7), np.float32))


def test_open_index_follows_a_current_pointer_at_an_index_root(built, tmp_path):
    _, index = built
    root = tmp_path / "indexes"
    root.mkdir()
    (root / "CURRENT").write_text(str(index) + "\n")
    via_pointer = open_index(str(root))
    assert via_pointer.folder == str(index)
    vec = np.eye(1, via_pointer.dimension, dtype=np.float32)
    assert [h.id for h in via_pointer.search_vectors(vec, 3)[0]] == \
        [h.id for h in open_index(str(index)).search_vectors(vec, 3)[0]]
    (root / "CURRENT").write_text("")
    with pytest.raises(ValueError, match="no index has been published"):
        open_index(str(root))
