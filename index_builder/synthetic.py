"""Synthetic embedding stores for tests and benchmarks: clustered unit vectors written as real
embedding runs (run-<id>/ with Parquet shards following remap_store.schema + run.json).

    X = clustered_vectors(100_000, 512, seed=0)
    write_run(store, "20260101T000000Z-a", uris, X, shards=8)
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from remap_store.files import atomic_path
from remap_store.runs import (TABLE_PREFIXES, run_folder, table_file_name,
                              write_run_summary)
from remap_store.schema import PARQUET_CODEC, ROW_GROUP_ROWS, embedding_schema, stable_ids

SYNTHETIC_MODEL = "synthetic.d{dim}"


def clustered_vectors(n: int, dim: int, clusters: int = 1000, spread: float = 0.5,
                      seed: int = 0, batch: int = 100_000) -> np.ndarray:
    """(n, dim) float32 L2-normalised vectors around `clusters` random centres, like image
    descriptors (neighbourhoods exist, nothing is trivially separable)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, batch):
        m = min(batch, n - i)
        x = centres[rng.integers(0, clusters, m)] + \
            rng.normal(scale=spread / np.sqrt(dim), size=(m, dim)).astype(np.float32)
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def synthetic_uris(n: int, prefix: str = "gs://bucket/img", start: int = 0) -> list[str]:
    return [f"{prefix}/{i:09d}.jpg" for i in range(start, start + n)]


def write_shard(path: str, uris: list[str], X: np.ndarray, model: str,
                metadata: dict[str, pa.Array] | None = None) -> None:
    """One embedding shard (DESIGN.md section 3) at a local path, written via a temp name;
    `metadata` {column: values}: extra columns (as a URI list's travel) or values for the
    standard ones (content_sha1, size_bytes, width, height)."""
    n, dim = X.shape
    schema = embedding_schema(dim, model)
    flat = pa.array(np.ascontiguousarray(X, np.float32).reshape(-1), pa.float32())
    cols = {
        "id": pa.array(stable_ids(uris), pa.int64()),
        "uri": pa.array(uris, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        "content_sha1": pa.array([""] * n, pa.string()),
        "size_bytes": pa.array(np.zeros(n, np.int64)),
        "width": pa.array(np.zeros(n, np.int32)),
        "height": pa.array(np.zeros(n, np.int32)),
        "model": pa.array([model] * n, pa.string()),
    }
    for name, values in (metadata or {}).items():
        values = pa.array(values)
        if name in schema.names:
            values = values.cast(schema.field(name).type)
        else:
            schema = schema.append(pa.field(name, values.type))
        cols[name] = values
    table = pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=PARQUET_CODEC, row_group_size=ROW_GROUP_ROWS)


def write_run(store: str, run_id: str, uris: list[str], X: np.ndarray, shards: int = 4,
              tombstone_uris: list[str] = (), model: str | None = None,
              metadata: dict[str, list] | None = None) -> str:
    """A completed embedding run: `shards` Parquet shards, an optional tombstone table, and
    run.json written last. `metadata` {column: one value per URI} (see write_shard).
    -> the run folder."""
    model = model or SYNTHETIC_MODEL.format(dim=X.shape[1])
    folder = run_folder(store, run_id)
    os.makedirs(folder, exist_ok=True)
    names = []
    bounds = np.linspace(0, len(uris), shards + 1).astype(int)
    for s in range(shards):
        name = table_file_name(TABLE_PREFIXES["shards"], s, shards)
        write_shard(os.path.join(folder, name), uris[bounds[s]:bounds[s + 1]],
                    X[bounds[s]:bounds[s + 1]], model,
                    {c: v[bounds[s]:bounds[s + 1]] for c, v in (metadata or {}).items()})
        names.append(name)
    summary = {"run_id": run_id, "model": model, "model_uri": None, "dimension": int(X.shape[1]),
               "embedded": len(uris), "shards": names}
    if tombstone_uris:
        name = table_file_name(TABLE_PREFIXES["tombstones"], 0, 1)
        t = pa.table({"uri": pa.array(list(tombstone_uris), pa.string()),
                      "id": pa.array(stable_ids(list(tombstone_uris)), pa.int64()),
                      "run_id": pa.array([run_id] * len(tombstone_uris), pa.string())})
        with atomic_path(os.path.join(folder, name)) as tmp:
            pq.write_table(t, tmp, compression=PARQUET_CODEC)
        summary["tombstones"] = [name]
    write_run_summary(folder, summary)
    return folder
