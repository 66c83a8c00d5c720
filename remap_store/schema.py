"""The one place that knows the embedding-shard and dead-letter Parquet schemas (DESIGN.md §3).

pyarrow only: importable by the pipelines, the index builder and the query library alike.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

SHARD_FORMAT_VERSION = "1"
PARQUET_CODEC = "zstd"
ROW_GROUP_ROWS = 16_384

# File-level key-value metadata keys written on every shard.
META_MODEL = b"remap.model_fingerprint"
META_DIM = b"remap.dimension"
META_FORMAT = b"remap.shard_format"
META_PIPELINE = b"remap.pipeline_version"


def stable_id(uri: str) -> int:
    """The int64 FAISS id of an image: the first 8 bytes of sha1(uri), big-endian, signed.

    Never -1 (FAISS's "no result" marker). Collisions are checked where ids meet (index build).
    """
    v = int.from_bytes(hashlib.sha1(uri.encode("utf-8")).digest()[:8], "big", signed=True)
    return 0 if v == -1 else v


def stable_ids(uris) -> np.ndarray:
    """Vectorised `stable_id` over a sequence of URIs -> (N,) int64."""
    return np.fromiter((stable_id(u) for u in uris), dtype=np.int64, count=len(uris))


def embedding_schema(dim: int, model_fingerprint: str, pipeline_version: str = "0.1.0",
                     dtype: pa.DataType = pa.float32()) -> pa.Schema:
    """Schema of an embedding shard with the model fingerprint and dimension as file metadata."""
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("uri", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.field("item", dtype), dim), nullable=False),
            pa.field("content_sha1", pa.string(), nullable=False),
            pa.field("size_bytes", pa.int64(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
        ],
        metadata={
            META_MODEL: model_fingerprint.encode(),
            META_DIM: str(dim).encode(),
            META_FORMAT: SHARD_FORMAT_VERSION.encode(),
            META_PIPELINE: pipeline_version.encode(),
        },
    )


# Keys of an embed pipeline's shard row that are not columns: carried to the sources table.
ROW_INTERNAL_KEYS = ("_listed_size", "_version", "_metadata_sha1")


def manifest_field(field: pa.Field) -> pa.Field:
    """The shard column for an extra column of a URI manifest: same name and type (a
    dictionary-encoded column as its values' type), always nullable (a row, or a whole other
    manifest, may lack it)."""
    t = field.type
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.field(field.name, t, nullable=True)


def with_manifest_columns(schema: pa.Schema, fields: list[pa.Field]) -> pa.Schema:
    """An embedding schema with a URI manifest's extra columns appended (in the manifest's
    order). A column named like a shard column (or an internal row key) is refused, naming it."""
    taken = set(schema.names) | set(ROW_INTERNAL_KEYS)
    for f in fields:
        if f.name in taken:
            raise ValueError(
                f"the URI list's column {f.name!r} has the name of a column remap writes itself "
                f"(embedding shards hold {', '.join(schema.names)}); rename that column in the "
                f"URI list")
        schema = schema.append(manifest_field(f))
        taken.add(f.name)
    return schema


DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # list | fetch | decode | embed
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


def embedding_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts with the schema's columns, `embedding` a 1-D float array) -> pa.Table."""
    dim = schema.field("embedding").type.list_size
    emb = np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in rows]) if rows else \
        np.zeros((0, dim), np.float32)
    value_type = schema.field("embedding").type.value_type
    flat = pa.array(emb.reshape(-1), type=pa.float32()).cast(value_type)
    # a URI manifest's extra columns may be missing from a row (null)
    cols = {name: [r.get(name) for r in rows] for name in schema.names if name != "embedding"}
    arrays = []
    for field in schema:
        if field.name == "embedding":
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, dim))
        else:
            arrays.append(pa.array(cols[field.name], type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def embeddings_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_list<float> column -> (N, D) float32 array without a Python loop."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(-1, dim), dtype=np.float32)


# --------------------------------------------------------------------------- incremental runs
# A run folder (`run-<id>/`, complete once its run.json exists) may also hold:
#   tombstones-SSSSS-of-NNNNN.parquet  URIs that disappeared from the input since earlier runs;
#                                      a reader drops them from everything embedded before.
#   sources-SSSSS-of-NNNNN.parquet     what this run read of each URI it processed (size and
#                                      object version), so the next run re-reads only changes.
# run.json lists them under "tombstones" and "sources", beside "shards".

TOMBSTONE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("id", pa.int64(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),  # the run that saw the URI gone
    ]
)

SOURCE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("id", pa.int64(), nullable=False),
        pa.field("size_bytes", pa.int64()),   # as listed; null when unknown
        pa.field("version", pa.string()),     # e.g. "generation=17", "ETag=...", "mtime=..."
        pa.field("outcome", pa.string(), nullable=False),  # embedded | dead_letter:<stage>
        pa.field("run_id", pa.string(), nullable=False),
        # sha1 of the URI manifest row's extra columns (metadata_sha1); null without any
        pa.field("metadata_sha1", pa.string()),
    ]
)


def read_tombstone_uris(paths) -> set[str]:
    """URIs listed in tombstone Parquet files (local paths or fsspec URLs).

    Readers of a store apply runs oldest first: a run's shards add or replace URIs, then its
    tombstones remove URIs embedded by earlier runs."""
    import fsspec
    import pyarrow.parquet as pq

    out: set[str] = set()
    for path in paths:
        with fsspec.open(path, "rb") as f:
            out.update(pq.read_table(f, columns=["uri"], pre_buffer=False).column("uri").to_pylist())
    return out
