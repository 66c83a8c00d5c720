"""The embedding store's layout, owned here alone: run folders, their run summaries (run.json),
the names of their tables (embedding shards, sources, tombstones, dead letter), which runs are
complete, and the state earlier runs left (what was embedded, at which object version; what was
deleted). The pipeline, the index builder and the nightly re-index all read the store through
these functions, so a change of layout is one edit here.

A store holds `run-<id>/` folders. A run is complete once its `run.json` exists (written last,
through a temporary name); a folder without it is the remains of a killed run and is removed
before a new run starts, so its work is redone and nothing it half-wrote is ever read. (Only the
holder of the store's lease, `lease.py`, scans and cleans: a live run's folder is never taken for
remains.)
Run ids sort in time order (the default id is a UTC timestamp): the newest run wins; a run id
names one folder directly inside the store (`check_run_id`).

A store never loses images silently. Each run records the --input it listed (`input_key`); a
URI missing from this run's listing is tombstoned only when the listing speaks for it
(`InputScope`): its newest earlier state came from a run of the same input, or the input is a
folder holding its path. URIs of other inputs are kept. The job's last step refuses (no
run.json) a listing of fewer than --min_listed images or tombstones beyond
--max_tombstone_fraction (`check_store_guards`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import fsspec

from remap_store.files import (comparable_uri, input_is_folder, input_key, join_url, redact,
                               with_protocol, write_json_atomic)

RUN_PREFIX = "run-"
RUN_SUMMARY = "run.json"
TABLE_PREFIXES = {"shards": "embeddings", "dead_letter": "dead_letter",
                  "tombstones": "tombstones", "sources": "sources"}   # run.json key -> file prefix
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
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
    metadata_sha1: str | None = None   # of its URI manifest row's extra columns (None: none)

    def signature(self) -> str | None:
        if self.size is None or self.version is None:
            return None
        return f"{self.size}:{self.version}"


class InputScope(NamedTuple):
    """Which URIs of earlier runs this run's listing speaks for: a URI it does not list is gone
    (tombstoned) only when `covers` it, else it belongs to another input and is kept."""

    key: str                    # this run's input_key (uris.input_key)
    folder: bool                # the input is a folder: its listing covers every URI under it
    run_keys: tuple = ()        # input_key of each earlier run, by run index (oldest first)

    def covers(self, uri: str, run_index: int) -> bool:
        if 0 <= run_index < len(self.run_keys) and self.run_keys[run_index] == self.key:
            return True
        if self.folder:
            prefix = comparable_uri(self.key).rstrip("/") + "/"
            return comparable_uri(uri).startswith(prefix)
        return False


def run_input_key(summary: dict) -> str | None:
    """The input_key a completed run listed (runs written before it was recorded: their
    --input, normalised now)."""
    if summary.get("input_key"):
        return summary["input_key"]
    return input_key(summary["input"]) if summary.get("input") else None


def input_scope(spec: str, runs: list["CompletedRun"]) -> InputScope:
    """This run's InputScope over the store's completed `runs` (oldest first). Asks storage
    whether --input is a folder only when there are earlier runs (a dry run has none)."""
    return InputScope(input_key(spec), bool(runs) and input_is_folder(spec),
                      tuple(run_input_key(r.summary) for r in runs))


class RunRefused(ValueError):
    """The job's last step refused to complete a run that would lose images (no run.json)."""


def check_store_guards(summary: dict, min_listed: int, max_tombstone_fraction: float) -> None:
    """Refuse (RunRefused) a run that listed fewer than `min_listed` images, or that would
    tombstone more than `max_tombstone_fraction` of the live URIs its input covers."""
    run_id, spec = summary["run_id"], summary["input"]
    after = ("; nothing was tombstoned and run.json was not written (the next run removes "
             "this incomplete run)")
    if summary["read"] < min_listed:
        raise RunRefused(
            f"run {run_id}: --input {spec!r} listed {summary['read']} images, fewer than "
            f"--min_listed={min_listed}{after}. Check --input (an unmounted folder, a mistyped "
            f"prefix or a glob that matches nothing lists nothing); pass --min_listed=0 to "
            f"accept an empty listing")
    gone = summary["tombstoned"] + summary["tombstoned_stale"]
    covered = summary["covered_before"]
    if gone and covered and gone / covered > max_tombstone_fraction:
        raise RunRefused(
            f"run {run_id} would tombstone {gone} of the {covered} live URIs its --input "
            f"{spec!r} covers ({gone / covered:.0%}), more than --max_tombstone_fraction="
            f"{max_tombstone_fraction:g}{after}. Check --input and the store's access; if those "
            f"images really are gone, rerun with --max_tombstone_fraction=1")


def check_run_id(run_id: str) -> None:
    """A run id names the folder run-<id> directly inside the store: 1 to 128 letters, digits,
    '.', '_' or '-', starting with a letter or digit, no '..'."""
    if not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ValueError(f"--run_id {run_id!r} is not a valid run id: use 1 to 128 letters, "
                         f"digits, '.', '_' or '-', starting with a letter or digit, without "
                         f"'..' (it names the folder run-<id> inside the store); or omit "
                         f"--run_id (default: a UTC timestamp)")


def check_store_path(store: str) -> None:
    """Refuse an --output that is a file, or (local) lies under a file: a store is a folder."""
    from fsspec.implementations.local import LocalFileSystem

    fs, root = fsspec.core.url_to_fs(store)
    if fs.isfile(root):
        raise ValueError(f"--output {store} is a file, not a folder; pass a folder for the "
                         f"embedding store (an existing store or a new path)")
    if isinstance(fs, LocalFileSystem):
        parent = root
        while parent and not fs.exists(parent):
            parent = parent.rsplit("/", 1)[0]
        if parent and parent != root and not fs.isdir(parent):
            raise ValueError(f"--output {store} lies under {parent}, which is a file; pass a "
                             f"folder for the embedding store")


def run_folder(store: str, run_id: str) -> str:
    """URL of the folder of run `run_id`: `<store>/run-<id>`."""
    return join_url(store, f"{RUN_PREFIX}{run_id}")


def run_summary_url(folder: str) -> str:
    """URL of a run folder's run summary (run.json; written last: the run is complete once it
    exists)."""
    return join_url(folder, RUN_SUMMARY)


def table_file_name(prefix: str, index: int, count: int) -> str:
    """The file name of table shard `index` of `count`: `<prefix>-SSSSS-of-NNNNN.parquet`
    (prefix: a value of TABLE_PREFIXES)."""
    return f"{prefix}-{index:05d}-of-{count:05d}.parquet"


def write_run_summary(folder: str, summary: dict) -> str:
    """Write a run's run.json (through a temporary name), the step that completes the run.
    -> its URL."""
    url = run_summary_url(folder)
    write_json_atomic(url, summary)
    return url


def list_completed_runs(store: str) -> list[CompletedRun]:
    """The completed runs of a store (those with a run.json), oldest first; [] when the store
    does not exist."""
    return scan_store(store)[0]


def run_files(run: CompletedRun, kind: str) -> list[str]:
    """URLs of a completed run's tables of `kind` (a run.json key: shards, sources, tombstones,
    dead_letter), as its run.json lists them. Tombstones of runs written before run.json
    listed them: any `tombstones-*.parquet` in the run folder."""
    if kind not in TABLE_PREFIXES:
        raise ValueError(f"unknown run table {kind!r}; one of {sorted(TABLE_PREFIXES)}")
    names = run.summary.get(kind)
    if names is None and kind == "tombstones":
        fs, root = fsspec.core.url_to_fs(run.folder)
        pattern = join_url(root, f"{TABLE_PREFIXES[kind]}-*.parquet")
        return [with_protocol(run.folder, p) for p in sorted(fs.glob(pattern))]
    return [join_url(run.folder, n) for n in names or []]


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
        folder = with_protocol(store, entry["name"].rstrip("/"))
        summary = run_summary_url(entry["name"].rstrip("/"))
        if fs.exists(summary):
            with fs.open(summary, "r") as f:
                complete.append(CompletedRun(name[len(RUN_PREFIX):], folder, json.load(f)))
        else:
            incomplete.append(folder)
    return complete, incomplete


def remove_incomplete(folders: list[str]) -> None:
    """Delete run folders left by killed runs (their work is redone by this run)."""
    for folder in folders:
        log.warning("removing incomplete run folder %s (no run.json: the run was killed or "
                    "failed); its URIs are processed again by this run", redact(folder))
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
        held = sorted(models)[0]
        recorded = next((r.summary.get("model_uri") for r in runs
                         if r.summary.get("model") == held and r.summary.get("model_uri")), None)
        if recorded is None:
            from remap_core.descriptor.checkpoint import model_hint

            recorded = model_hint(held) or None
        which = f" (--model {recorded})" if recorded else ""
        raise ValueError(f"store {store} holds embeddings of model {held}{which} but this "
                         f"run uses model {fingerprint}; write to a new --output to re-embed with "
                         f"this model (a store holds one model), or pass the store's --model")


def state_files(runs: list[CompletedRun]) -> list[tuple[int, str, str]]:
    """(run index, kind, URL) of every file holding state: `sources` and `tombstones` tables,
    or the embedding `shards` of runs written before the sources table existed."""
    out = []
    for i, run in enumerate(runs):
        kind = "shards" if run.summary.get("sources") is None else "sources"
        out += [(i, kind, url) for url in run_files(run, kind)]
        out += [(i, "tombstones", join_url(run.folder, s))
                for s in run.summary.get("tombstones", [])]
    return out


def read_state_file(run_index: int, kind: str, url: str) -> Iterator[tuple[str, PreviousState]]:
    """(uri, PreviousState) for every row of one state file."""
    import pyarrow.parquet as pq

    columns = {"sources": ["uri", "id", "size_bytes", "version", "outcome"],
               "shards": ["uri", "id"], "tombstones": ["uri", "id"]}[kind]
    with fsspec.open(url, "rb") as f:
        pf = pq.ParquetFile(f, pre_buffer=False)
        if kind == "sources" and "metadata_sha1" in pf.schema_arrow.names:
            columns = columns + ["metadata_sha1"]     # sources tables written since it exists
        for batch in pf.iter_batches(columns=columns, batch_size=65536):
            cols = batch.to_pydict()
            n = batch.num_rows
            for j in range(n):
                if kind == "sources":
                    state = PreviousState(run_index, cols["id"][j], cols["size_bytes"][j],
                                          cols["version"][j], cols["outcome"][j],
                                          cols.get("metadata_sha1", [None] * n)[j])
                elif kind == "shards":
                    state = PreviousState(run_index, cols["id"][j], None, None, "embedded")
                else:
                    state = PreviousState(run_index, cols["id"][j], None, None, "deleted")
                yield cols["uri"][j], state
