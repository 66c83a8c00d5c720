"""What `remap embed --input` reads, through the console entry point: a .csv URI list needs a
`uri` column, a path that exists is never a glob, local paths are one URI however spelt, files
without an image extension are counted, and numeric options out of range are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import image_cases
from remap_cli import main


def remap_embed(capsys, model, inp, out, *extra) -> tuple[int, dict | None, str]:
    """`remap embed ...` in-process -> (exit status, run.json of the run or None, stderr)."""
    rc = main(["embed", f"--input={inp}", f"--output={out}", f"--model={model}",
               "--progress_seconds=0", *extra])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.out.splitlines() if ln.startswith("{")]
    if not lines:
        return rc, None, captured.err
    run_id = json.loads(lines[-1])["run_id"]
    return rc, json.loads((Path(out) / f"run-{run_id}" / "run.json").read_text()), captured.err


def embedded_uris(store: Path, summary: dict) -> list[str]:
    folder = store / f"run-{summary['run_id']}"
    return sorted(u for s in summary["shards"]
                  for u in pq.read_table(folder / s, columns=["uri"]).column("uri").to_pylist())


def test_csv_uri_list_without_a_uri_column_is_refused(tmp_path, tiny_model_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        (images / f"{i}.jpg").write_bytes(image_cases.jpeg(48, 40, seed=i))
    headerless = tmp_path / "list.csv"          # the issue: header and first column read as URIs
    headerless.write_text("".join(f"{images / f'{i}.jpg'},label{i}\n" for i in range(2)))
    store = tmp_path / "store"
    rc, s, err = remap_embed(capsys, tiny_model_path, headerless, store)
    assert (rc, s) == (2, None)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"remap embed: error: URI list {headerless} has no 'uri' column")
    assert "a .csv URI list starts with a header row naming a 'uri' column" in last
    assert not list(store.glob("run-*/run.json")) and not (store / "_lease.json").exists()

    named = tmp_path / "named.csv"
    named.write_text("label,uri\n" + "".join(f"label{i},{images / f'{i}.jpg'}\n"
                                             for i in range(2)))
    rc, s, _ = remap_embed(capsys, tiny_model_path, named, store)
    assert rc == 0 and (s["read"], s["embedded"], s["dead_lettered"]) == (2, 2, 0)
    assert embedded_uris(store, s) == [str(images / f"{i}.jpg") for i in range(2)]


@pytest.mark.parametrize("name", ["photos [2024]", "what?", "star*"])
def test_an_existing_folder_with_glob_characters_is_a_folder(tmp_path, tiny_model_path, capsys,
                                                            name):
    folder = tmp_path / name
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.jpg").write_bytes(image_cases.jpeg(48, 40, seed=i))
    # a sibling the glob reading would have matched instead ("what?" -> "whatX")
    (tmp_path / "whatX").mkdir()
    (tmp_path / "whatX" / "other.jpg").write_bytes(image_cases.jpeg(48, 40, seed=9))
    store = tmp_path / "store"
    rc, s, err = remap_embed(capsys, tiny_model_path, folder, store)
    assert rc == 0, err
    assert (s["read"], s["embedded"]) == (2, 2)
    assert embedded_uris(store, s) == [str(folder / f"{i}.jpg") for i in range(2)]
    # a glob that names no existing path is still a glob
    rc, s, _ = remap_embed(capsys, tiny_model_path, tmp_path / "wha?X" / "*.jpg", store)
    assert rc == 0 and s["read"] == 1
    assert embedded_uris(store, s) == [str(tmp_path / "whatX" / "other.jpg")]


def test_local_paths_are_one_uri_however_spelt(tmp_path, tiny_model_path, capsys,
                                              monkeypatch):
    images = tmp_path / "dir"
    images.mkdir()
    (images / "x.jpg").write_bytes(image_cases.jpeg(48, 40, seed=1))
    monkeypatch.chdir(tmp_path)
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"dir/./x.jpg\ndir/x.jpg\n{images}//x.jpg\n{tmp_path}/dir/../dir/x.jpg\n")
    store = tmp_path / "store"
    rc, s, _ = remap_embed(capsys, tiny_model_path, manifest, store)
    assert rc == 0 and (s["read"], s["duplicates"], s["embedded"]) == (1, 3, 1)
    assert embedded_uris(store, s) == [str(images / "x.jpg")]
    # the folder, spelt another way, lists the same URI: unchanged, not new
    rc, s, _ = remap_embed(capsys, tiny_model_path, "dir/./", store)
    assert rc == 0 and (s["read"], s["skipped"], s["embedded"], s["tombstoned"]) == (1, 1, 0, 0)


def test_files_skipped_for_their_extension_are_counted(tmp_path, tiny_model_path, capsys):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.jpg").write_bytes(image_cases.jpeg(48, 40, seed=1))
    (images / "sub" / "b.PNG").write_bytes(image_cases.jpeg(48, 40, seed=2))   # extension, any case
    (images / "sub" / "broken.jpg").write_bytes(image_cases.truncated_jpeg())
    for name in ("notes.txt", "sub/readme.md", "sub/.DS_Store", "sub/raw.cr2"):
        (images / name).write_bytes(b"not an image")
    store = tmp_path / "store"
    rc, s, _ = remap_embed(capsys, tiny_model_path, images, store)
    assert rc == 0
    assert s["listed_not_images"] == 4
    assert (s["read"], s["embedded"], s["dead_lettered"], s["skipped"]) == (3, 2, 1, 0)
    assert s["embedded"] + s["dead_lettered"] + s["skipped"] == s["read"] and s["accounted"]
    # a glob counts them too
    rc, s, _ = remap_embed(capsys, tiny_model_path, images / "sub" / "*", store)
    assert rc == 0 and (s["listed_not_images"], s["read"], s["skipped"]) == (3, 2, 2)


@pytest.mark.parametrize("flag,message", [
    ("--batch_size=0", "--batch_size must be at least 1 (got 0)"),
    ("--num_shards=-1", "--num_shards must be at least 0 (0: one shard per --shard_rows rows) "
                        "(got -1)"),
    ("--shard_rows=0", "--shard_rows must be at least 1 (got 0)"),
    ("--progress_seconds=-1", "--progress_seconds must be at least 0 (0: no progress lines) "
                              "(got -1.0)"),
    ("--progress_seconds=nan", "--progress_seconds must be at least 0 (0: no progress lines) "
                               "(got nan)"),
    ("--min_listed=-1", "--min_listed must be at least 0 (got -1)"),
    ("--max_tombstone_fraction=1.5", "--max_tombstone_fraction must be between 0 and 1 "
                                     "(got 1.5)"),
    ("--max_tombstone_fraction=-0.1", "--max_tombstone_fraction must be between 0 and 1 "
                                      "(got -0.1)"),
])
def test_numeric_options_out_of_range_are_refused(tmp_path, tiny_model_path, capsys, flag,
                                                  message):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(image_cases.jpeg(48, 40))
    rc, s, err = remap_embed(capsys, tiny_model_path, tmp_path / "images", tmp_path / "store",
                             flag)
    assert (rc, s) == (2, None)
    assert err.strip() == f"remap embed: error: {message}"
    assert not (tmp_path / "store").exists()
