"""Reading embedding runs written by `remap embed` (pyarrow only).

A store holds `run-<id>/` folders; a run counts only once its `run.json` exists (written last).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq

from remap_core.shard_schema import META_DIM, META_MODEL, embeddings_to_numpy


@dataclass
class EmbeddingRun:
    run_id: str
    path: str               # run folder URL
    summary: dict           # run.json
    shard_paths: list[str]  # full URLs


def _join(fs, root: str, name: str, like: str) -> str:
    proto = like.split("://", 1)[0] + "://" if "://" in like else ""
    return f"{proto}{root.rstrip('/')}/{name}"


def list_runs(store: str) -> list[EmbeddingRun]:
    """Completed runs under an embedding store, oldest first (run ids sort by time)."""
    fs, root = fsspec.core.url_to_fs(store)
    if not fs.exists(root):
        raise FileNotFoundError(f"embedding store {store} does not exist")
    runs = []
    for manifest in sorted(fs.glob(root.rstrip("/") + "/run-*/run.json")):
        folder = manifest.rsplit("/", 1)[0]
        with fs.open(manifest, "r") as f:
            summary = json.load(f)
        shards = [_join(fs, folder, s, store) for s in summary.get("shards", [])]
        runs.append(EmbeddingRun(summary["run_id"], _join(fs, folder, "", store).rstrip("/"),
                                 summary, shards))
    if not runs:
        raise FileNotFoundError(f"no completed embedding runs (run-*/run.json) under {store}; "
                                f"run `remap embed --output {store}` first")
    return runs


def shard_metadata(path: str) -> tuple[str, int]:
    """(model fingerprint, dimension) from a shard's key-value metadata."""
    with fsspec.open(path, "rb") as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    if META_MODEL not in meta or META_DIM not in meta:
        raise ValueError(f"{path} is not a remap embedding shard (no model/dimension metadata)")
    return meta[META_MODEL].decode(), int(meta[META_DIM])


def read_shard(path: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One shard -> (ids (N,) int64, embeddings (N, D) float32, uris)."""
    with fsspec.open(path, "rb") as f:
        table = pq.read_table(f, columns=["id", "uri", "embedding"])
    return (table.column("id").to_numpy().astype(np.int64),
            embeddings_to_numpy(table.column("embedding")),
            table.column("uri").to_pylist())


def load_embeddings(store: str) -> tuple[np.ndarray, np.ndarray, list[str], str, list[str]]:
    """All embeddings of a store -> (ids, X, uris, model fingerprint, run ids).

    A URI embedded in several runs keeps its latest embedding. Shards of different models, or two
    URIs that hash to one id, are refused with a message that says what to do.
    """
    runs = list_runs(store)
    latest: dict[str, tuple[int, np.ndarray]] = {}
    fingerprint, dim = None, None
    for run in runs:
        for path in run.shard_paths:
            fp, d = shard_metadata(path)
            if fingerprint is None:
                fingerprint, dim = fp, d
            elif fp != fingerprint:
                raise ValueError(f"shard {path} was embedded with model {fp} but earlier shards "
                                 f"with {fingerprint}; re-embed the store with one model")
            ids, X, uris = read_shard(path)
            for i, u, v in zip(ids, uris, X):
                latest[u] = (int(i), v)
    if fingerprint is None:
        raise ValueError(f"the runs under {store} hold no embedding shards")
    uris = sorted(latest)
    ids = np.array([latest[u][0] for u in uris], dtype=np.int64)
    X = np.stack([latest[u][1] for u in uris]).astype(np.float32) if uris else \
        np.zeros((0, dim), np.float32)
    check_unique_ids(ids, uris)
    return ids, X, uris, fingerprint, [r.run_id for r in runs]


def check_unique_ids(ids: np.ndarray, uris: list[str]) -> None:
    """Raise if two different URIs share an id (a 64-bit hash collision)."""
    order = np.argsort(ids, kind="stable")
    dup = np.nonzero(np.diff(ids[order]) == 0)[0]
    if dup.size:
        a, b = uris[order[dup[0]]], uris[order[dup[0] + 1]]
        raise ValueError(f"id collision: {a!r} and {b!r} both hash to {ids[order[dup[0]]]}; "
                         f"rename one of them")
