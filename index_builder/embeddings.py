"""Reading embedding runs written by `remap embed` (pyarrow only).

Which runs a store holds and which files each has is remap_store.runs' to say (a run counts only
once its run summary, run.json, exists); this module reads the shards and tombstones it names.
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from remap_store.runs import CompletedRun, list_completed_runs, run_files
from remap_store.schema import META_DIM, META_MODEL, embeddings_to_numpy, stable_ids


@dataclass
class EmbeddingRun:
    run_id: str
    path: str               # run folder URL
    summary: dict           # run.json
    shard_paths: list[str]  # full URLs


def list_runs(store: str) -> list[EmbeddingRun]:
    """Completed runs under an embedding store, oldest first (run ids sort by time)."""
    fs, root = fsspec.core.url_to_fs(store)
    if not fs.exists(root):
        raise FileNotFoundError(f"embedding store {store} does not exist")
    runs = [EmbeddingRun(r.summary["run_id"], r.folder, r.summary, run_files(r, "shards"))
            for r in list_completed_runs(store)]
    if not runs:
        raise FileNotFoundError(f"no completed embedding runs (run-*/run.json) under {store}; "
                                f"run `remap embed --output {store}` first")
    return runs


def open_parquet(f) -> pq.ParquetFile:
    """A ParquetFile over a Python file object (fsspec), read only by the calling thread.

    Arrow's default pre-buffering (and `pq.read_table`) reads through its I/O thread pool, and
    one of those threads may drop Arrow's reference to the Python file after the call has
    returned. That needs the GIL: when the process is already exiting (a refusal right after
    the shards were read), the thread is stopped inside Arrow's C++ code and the process
    aborts with `terminate called without an active exception` (exit 134) instead of its exit
    status. Without pre-buffering every read, and the release, happen in the caller."""
    return pq.ParquetFile(f, pre_buffer=False)


def read_parquet(path: str, columns: list[str] | None = None):
    """A whole Parquet file (local path or fsspec URL) -> pa.Table, read and closed before it
    returns (see open_parquet)."""
    try:
        with fsspec.open(path, "rb") as f, open_parquet(f) as pf:
            return pf.read(columns=columns)
    except (FileNotFoundError, PermissionError):
        raise
    except (OSError, pa.ArrowException) as e:
        raise damaged(path, e) from None


def damaged(path: str, e: Exception) -> ValueError:
    """The error for a store file Arrow cannot read (cut short, overwritten, not Parquet)."""
    reason = " ".join(str(e).split()) or type(e).__name__
    return ValueError(f"{path} cannot be read ({reason}): the file is damaged; embed its run "
                      f"again (remap embed --full into a new store) or remove that run folder")


def shard_metadata(path: str) -> tuple[str, int]:
    """(model fingerprint, dimension) from a shard's key-value metadata."""
    try:
        with fsspec.open(path, "rb") as f, open_parquet(f) as pf:
            meta = pf.schema_arrow.metadata or {}
    except (FileNotFoundError, PermissionError):
        raise
    except (OSError, pa.ArrowException) as e:
        raise damaged(path, e) from None
    if META_MODEL not in meta or META_DIM not in meta:
        raise ValueError(f"{path} is not a remap embedding shard (no model/dimension metadata)")
    return meta[META_MODEL].decode(), int(meta[META_DIM])


def load_embeddings(store: str) -> tuple[np.ndarray, np.ndarray, list[str], str, list[str]]:
    """All current embeddings of a store, in memory -> (ids, X, uris, model fingerprint, run ids).

    A URI embedded in several runs keeps its latest embedding; URIs a later run tombstoned are
    left out. Shards of different models, or two URIs that hash to one id, are refused with a
    message that says what to do. (Small stores only; the index build streams instead.)"""
    runs = list_runs(store)
    fingerprint, dim = check_store_model(runs)
    shards, _ = plan_live_shards(runs)
    ids, X, uris = [np.zeros(0, np.int64)], [np.zeros((0, dim), np.float32)], []
    for s in shards:
        for bi, bx, bu in iter_shard_batches(s.path, drop=s.drop):
            ids.append(bi)
            X.append(bx)
            uris += bu
    ids, X = np.concatenate(ids), np.concatenate(X)
    order = np.argsort(np.asarray(uris, dtype=object), kind="stable") if uris else np.zeros(0, int)
    ids, X, uris = ids[order], X[order], [uris[i] for i in order]
    check_unique_ids(ids, uris)
    return ids, X, uris, fingerprint, [r.run_id for r in runs]


def check_unique_ids(ids: np.ndarray, uris: list[str]) -> None:
    """Raise if two different URIs share an id (a 64-bit hash collision)."""
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    dup = np.nonzero(ordered[1:] == ordered[:-1])[0]  # compared, not subtracted (int64 overflow)
    if dup.size:
        a, b = uris[order[dup[0]]], uris[order[dup[0] + 1]]
        raise ValueError(f"id collision: {a!r} and {b!r} both hash to {ids[order[dup[0]]]}; "
                         f"rename one of them")


# --------------------------------------------------------------------------- streaming, at scale

def shard_num_rows(path: str) -> int:
    """Rows of a shard from its Parquet footer (no data read)."""
    with fsspec.open(path, "rb") as f, open_parquet(f) as pf:
        return int(pf.metadata.num_rows)


def read_shard_ids(path: str) -> np.ndarray:
    """Only the id column of a shard -> (N,) int64."""
    return read_parquet(path, ["id"]).column("id").to_numpy().astype(np.int64)


def iter_shard_batches(path: str, batch_rows: int = 65_536, keep: np.ndarray | None = None,
                       drop: np.ndarray | None = None, with_uris: bool = True):
    """Stream one shard in row batches -> (ids (B,), X (B, D) float32, uris or None).

    `keep` keeps only rows whose id is in it, `drop` skips rows whose id is in it (int64 arrays;
    None: no filter). Memory is bounded by one batch, whatever the shard size."""
    columns = ["id", "uri", "embedding"] if with_uris else ["id", "embedding"]
    with fsspec.open(path, "rb") as f, open_parquet(f) as pf:
        for batch in _batches(path, pf, batch_rows, columns):
            ids = batch.column("id").to_numpy().astype(np.int64)
            X = embeddings_to_numpy(batch.column("embedding"))
            uris = batch.column("uri").to_pylist() if with_uris else None
            m = None
            if keep is not None:
                m = np.isin(ids, keep)
            if drop is not None and len(drop):
                m = ~np.isin(ids, drop) if m is None else m & ~np.isin(ids, drop)
            if m is not None and not m.all():
                ids, X = ids[m], X[m]
                uris = [u for u, k in zip(uris, m) if k] if with_uris else None
            if len(ids):
                yield ids, X, uris


def _batches(path: str, pf: pq.ParquetFile, batch_rows: int, columns: list[str]):
    """pf.iter_batches, a damaged file named in a ValueError."""
    it = pf.iter_batches(batch_size=batch_rows, columns=columns)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as e:
            raise damaged(path, e) from None
        yield batch


def run_tombstone_paths(run: EmbeddingRun) -> list[str]:
    """Tombstone tables of a run: those run.json lists, else any `tombstones-*.parquet` there."""
    return run_files(CompletedRun(run.run_id, run.path, run.summary), "tombstones")


def read_tombstone_ids(run: EmbeddingRun) -> np.ndarray:
    """Ids of the URIs a run saw deleted -> sorted unique (T,) int64."""
    out = [np.zeros(0, np.int64)]
    for path in run_tombstone_paths(run):
        t = read_parquet(path)
        if "id" in t.column_names:
            out.append(t.column("id").to_numpy().astype(np.int64))
        else:
            out.append(stable_ids(t.column("uri").to_pylist()))
    return np.unique(np.concatenate(out))


@dataclass
class LiveShard:
    """One embedding shard and which of its rows are current (not re-embedded later, not
    deleted)."""
    path: str
    run_id: str
    rows: int             # rows in the file
    drop: np.ndarray      # sorted ids of rows superseded by a later run or tombstoned

    @property
    def live_rows(self) -> int:
        return self.rows - int(len(self.drop))


def plan_live_shards(runs: list[EmbeddingRun], later_ids: np.ndarray | None = None
                     ) -> tuple[list[LiveShard], np.ndarray]:
    """Which rows of which shards make the current collection, reading only id columns.

    Runs apply oldest first: a run's shards add or replace URIs, then its tombstones remove URIs
    embedded by earlier runs. Walking newest first, a row is live unless a later run re-embedded
    or deleted its id. `later_ids` are ids already claimed by newer data (none by default).
    -> (live shards, oldest first; sorted ids every run touched, its tombstones included)."""
    seen = np.zeros(0, np.int64) if later_ids is None else np.unique(later_ids)
    out: list[LiveShard] = []
    for run in reversed(runs):
        run_ids = []
        for path in reversed(run.shard_paths):
            ids = read_shard_ids(path)
            drop = np.unique(ids[np.isin(ids, seen)])
            out.append(LiveShard(path, run.run_id, len(ids), drop))
            run_ids.append(ids)
        seen = np.union1d(seen, np.concatenate(run_ids + [read_tombstone_ids(run)]))
    out.reverse()
    return out, seen


def check_store_model(runs: list[EmbeddingRun], expect: str | None = None) -> tuple[str, int]:
    """(model fingerprint, dimension) shared by every shard of `runs`; refuses a mix."""
    fingerprint, dim, first = expect, None, None
    for run in runs:
        for path in run.shard_paths:
            fp, d = shard_metadata(path)
            if fingerprint is None:
                fingerprint, dim, first = fp, d, path
            elif fp != fingerprint:
                where = f"earlier shards ({first})" if first else "the trained index"
                raise ValueError(f"shard {path} was embedded with model {fp} but {where} with "
                                 f"{fingerprint}; re-embed with one model, or train a new index "
                                 f"(remap index train) for the new model")
            dim = d if dim is None else dim
    if fingerprint is None or dim is None:
        raise ValueError("the runs hold no embedding shards; nothing to index")
    return fingerprint, dim
