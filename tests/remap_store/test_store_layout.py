"""The embedding store's layout has one owner, remap_store.runs: which runs are complete, where
their files are, how a run summary is written. Stores are made here by hand (os, json), the way
the README's data contract describes them, not by the code under test."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from remap_store.runs import (TABLE_PREFIXES, list_completed_runs, run_files, run_folder,
                              table_file_name, write_run_summary)

README = Path(__file__).resolve().parents[2] / "README.md"


def _run(store: Path, run_id: str, summary: dict | None, files=()) -> Path:
    folder = store / f"run-{run_id}"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"")
    if summary is not None:
        (folder / "run.json").write_text(json.dumps({"run_id": run_id, **summary}))
    return folder


def test_completed_runs_are_the_run_folders_with_a_run_summary_oldest_first(tmp_path):
    store = tmp_path / "store"
    _run(store, "20260102T000000Z-b", {"embedded": 2})
    _run(store, "20260101T000000Z-a", {"embedded": 1})
    _run(store, "20260103T000000Z-c", None)                 # killed: no run.json
    (store / "run-20260104T000000Z-d").write_text("a file, not a run folder")
    (store / "_lease.json").write_text("{}")
    (store / "other").mkdir()
    runs = list_completed_runs(str(store))
    assert [r.run_id for r in runs] == ["20260101T000000Z-a", "20260102T000000Z-b"]
    assert [r.folder for r in runs] == [str(store / "run-20260101T000000Z-a"),
                                        str(store / "run-20260102T000000Z-b")]
    assert [r.summary["embedded"] for r in runs] == [1, 2]
    assert list_completed_runs(str(tmp_path / "missing")) == []


def test_run_files_are_what_the_run_summary_lists_and_old_tombstones_are_found(tmp_path):
    store = tmp_path / "store"
    listed = ["embeddings-00000-of-00002.parquet", "embeddings-00001-of-00002.parquet"]
    _run(store, "a", {"shards": listed, "tombstones": []},
         files=listed + ["tombstones-00000-of-00001.parquet"])  # listed: none, so none
    _run(store, "b", {"shards": []},                           # before run.json listed them
         files=["tombstones-00001-of-00002.parquet", "tombstones-00000-of-00002.parquet"])
    a, b = list_completed_runs(str(store))
    assert run_files(a, "shards") == [str(store / "run-a" / n) for n in listed]
    assert run_files(a, "tombstones") == [] and run_files(a, "sources") == []
    assert run_files(b, "tombstones") == [
        str(store / "run-b" / f"tombstones-0000{i}-of-00002.parquet") for i in (0, 1)]


def test_a_written_run_summary_completes_the_run_and_leaves_no_temporary(tmp_path):
    store = str(tmp_path / "store")
    folder = run_folder(store, "20260101T000000Z-a")
    assert folder == os.path.join(store, "run-20260101T000000Z-a")
    os.makedirs(folder)
    assert list_completed_runs(store) == []
    url = write_run_summary(folder, {"run_id": "20260101T000000Z-a", "shards": []})
    assert url == os.path.join(folder, "run.json") and os.listdir(folder) == ["run.json"]
    with open(url) as f:
        assert json.load(f) == {"run_id": "20260101T000000Z-a", "shards": []}
    assert [r.run_id for r in list_completed_runs(store)] == ["20260101T000000Z-a"]


def test_the_readme_store_contract_names_every_table_and_its_run_summary_key():
    text = README.read_text()
    bullet = text[text.index("- **Embedding store**"):text.index("- **Index**")]
    for key, prefix in TABLE_PREFIXES.items():
        assert f"`{prefix}-" in bullet, prefix
        assert f"`{key}`" in bullet, key
    assert table_file_name(TABLE_PREFIXES["shards"], 3, 12) == "embeddings-00003-of-00012.parquet"
    assert "embeddings-SSSSS-of-NNNNN.parquet" in bullet


def test_the_readme_package_table_names_modules_that_exist():
    """A newcomer finds the module from the table in one guess: every `x.py` a package row
    names exists in that package, and the functions it names are defined there."""
    root = README.parent
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `")]
    named = 0
    for row in rows:
        package = re.match(r"\| `([a-z_]+)/`", row)
        if not package:
            continue
        for module, func in re.findall(r"`([a-z_]+\.py)`(?: \(`([a-z_]+)`)?", row):
            path = root / package.group(1) / module
            assert path.exists(), (row[:40], module)
            if func:
                assert re.search(rf"^def {func}\(", path.read_text(), re.M), (module, func)
            named += 1
    assert named >= 4   # lease.py, schema.py, runs.py, train.py at least
    for where in ("`lease.py`", "`schema.py`", "`train.py` (`choose_factory`"):
        assert any(where in row for row in rows), where
