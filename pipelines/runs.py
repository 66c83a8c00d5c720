"""The embedding store as the pipeline sees it: completed and incomplete run folders, the state
earlier runs left (what was embedded, at which object version; what was deleted), run manifests.

A store holds `run-<id>/` folders. A run is complete once its `run.json` exists (written last,
through a temporary name); a folder without it is the remains of a killed run and is removed
before a new run starts, so its work is redone and nothing it half-wrote is ever read. (Only the
holder of the store's lease, `lease.py`, scans and cleans: a live run's folder is never taken for
remains.)
Run ids sort in time order (the default id is a UTC timestamp): the newest run wins.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import fsspec

RUN_PREFIX = "run-"
MANIFEST = "run.json"
log = logging.getLogger(__name__)


@dataclass
class CompletedRun:
    run_id: str
    folder: str      # URL of the run folder
    summary: dict    # its run.json


class PreviousState(NamedTuple):
    """What the newest earlier run knew of one URI."""

    run_index: int          # order of the run in the store (higher = newer)
    id: int
    size: int | None
    version: str | None
    outcome: str            # embedded | dead_letter:<stage> | deleted

    def signature(self) -> str | None:
        if self.size is None or self.version is None:
            return None
        return f"{self.size}:{self.version}"


def _url(store: str, path: str) -> str:
    proto = store.split("://", 1)[0] + "://" if "://" in store else ""
    return path if not proto or path.startswith(proto) else proto + path


def run_folder(store: str, run_id: str) -> str:
    return f"{store.rstrip('/')}/{RUN_PREFIX}{run_id}"


def scan_store(store: str) -> tuple[list[CompletedRun], list[str]]:
    """(completed runs oldest first, URLs of incomplete run folders) under a store."""
    fs, root = fsspec.core.url_to_fs(store)
    if not fs.exists(root):
        return [], []
    complete, incomplete = [], []
    for entry in sorted(fs.ls(root, detail=True), key=lambda e: e["name"]):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] != "directory" or not name.startswith(RUN_PREFIX):
            continue
        folder = _url(store, entry["name"].rstrip("/"))
        manifest = entry["name"].rstrip("/") + "/" + MANIFEST
        if fs.exists(manifest):
            with fs.open(manifest, "r") as f:
                complete.append(CompletedRun(name[len(RUN_PREFIX):], folder, json.load(f)))
        else:
            incomplete.append(folder)
    return complete, incomplete


def remove_incomplete(folders: list[str]) -> None:
    """Delete run folders left by killed runs (their work is redone by this run)."""
    for folder in folders:
        log.warning("removing incomplete run folder %s (no run.json: the run was killed or "
                    "failed); its URIs are processed again by this run", folder)
        fs, path = fsspec.core.url_to_fs(folder)
        fs.rm(path, recursive=True)


def check_new_run(runs: list[CompletedRun], run_id: str, fingerprint: str, store: str) -> None:
    """Refuse a run that would break the store's order or mix models, saying what to do."""
    if runs and run_id <= runs[-1].run_id:
        raise ValueError(f"run id {run_id!r} does not sort after the store's newest run "
                         f"{runs[-1].run_id!r}; omit --run_id (the default is a UTC timestamp) "
                         f"or pick a later one")
    models = {r.summary.get("model") for r in runs} - {None}
    if models and models != {fingerprint}:
        raise ValueError(f"store {store} holds embeddings of model {sorted(models)[0]} but this "
                         f"run uses model {fingerprint}; write to a new --output (a store holds "
                         f"one model) or pass the store's --model")


def state_files(runs: list[CompletedRun]) -> list[tuple[int, str, str]]:
    """(run index, kind, URL) of every file holding state: `sources` and `tombstones` tables,
    or the embedding `shards` of runs written before the sources table existed."""
    out = []
    for i, run in enumerate(runs):
        sources = run.summary.get("sources")
        if sources is None:
            out += [(i, "shards", f"{run.folder}/{s}") for s in run.summary.get("shards", [])]
        else:
            out += [(i, "sources", f"{run.folder}/{s}") for s in sources]
        out += [(i, "tombstones", f"{run.folder}/{s}") for s in run.summary.get("tombstones", [])]
    return out


def read_state_file(run_index: int, kind: str, url: str) -> Iterator[tuple[str, PreviousState]]:
    """(uri, PreviousState) for every row of one state file."""
    import pyarrow.parquet as pq

    columns = {"sources": ["uri", "id", "size_bytes", "version", "outcome"],
               "shards": ["uri", "id"], "tombstones": ["uri", "id"]}[kind]
    with fsspec.open(url, "rb") as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(columns=columns, batch_size=65536):
            cols = batch.to_pydict()
            n = batch.num_rows
            for j in range(n):
                if kind == "sources":
                    state = PreviousState(run_index, cols["id"][j], cols["size_bytes"][j],
                                          cols["version"][j], cols["outcome"][j])
                elif kind == "shards":
                    state = PreviousState(run_index, cols["id"][j], None, None, "embedded")
                else:
                    state = PreviousState(run_index, cols["id"][j], None, None, "deleted")
                yield cols["uri"][j], state


def write_json_atomic(url: str, data: dict) -> None:
    """Write JSON to a temporary name, then rename (a reader never sees half a file)."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    fs.mv(path + ".tmp", path)
