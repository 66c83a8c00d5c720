"""Parquet shard writing: deterministic names, temporary name then rename, explicit codec, row
groups sized for reading, the schema's key-value metadata on every file.

`WriteParquetShards` spreads rows over N shards by a stable key (N fixed, or derived from the
row count: `--shard_rows` rows per shard), groups each shard's rows on one worker and streams
them to `<prefix>-SSSSS-of-NNNNN.parquet`. A retried bundle rewrites the same name.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from remap_store.files import temporary_name
from remap_store.runs import table_file_name
from remap_store.schema import PARQUET_CODEC, ROW_GROUP_ROWS

TMP_FOLDER = "_tmp"


def shard_count(rows: int, shard_rows: int, fixed: int = 0) -> int:
    """`fixed` when > 0, else enough shards of at most `shard_rows` rows (at least 1)."""
    if fixed > 0:
        return fixed
    return max(1, math.ceil(rows / max(1, shard_rows)))


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Plain rows (dicts with the schema's columns) -> pa.Table."""
    return pa.Table.from_pylist(rows, schema=schema)


def write_parquet_atomic(rows: Iterable[dict], schema: pa.Schema, url: str,
                         to_table: Callable[[list[dict], pa.Schema], pa.Table] = rows_table,
                         row_group_rows: int = ROW_GROUP_ROWS) -> int:
    """Stream rows into one Parquet file at `url` (zstd, `row_group_rows` rows per row group,
    the schema's metadata), written under `_tmp/` beside it and renamed at the end.
    Returns the number of rows written.

    Unlike remap_store.files.atomic_open (temporary name beside the target), a shard's
    temporary file lives in the run's `_tmp/` folder: a run folder's listing never shows one,
    and the run's last step (tables.WriteRunSummary) removes the folder with whatever a killed
    or retried worker left there."""
    fs, path = fsspec.core.url_to_fs(url)
    folder, name = path.rsplit("/", 1)
    tmp = temporary_name(f"{folder}/{TMP_FOLDER}/{name}")
    fs.makedirs(f"{folder}/{TMP_FOLDER}", exist_ok=True)
    n = 0
    with fs.open(tmp, "wb") as f:
        with pq.ParquetWriter(f, schema, compression=PARQUET_CODEC) as writer:
            for chunk in _chunks(rows, row_group_rows):
                writer.write_table(to_table(chunk, schema), row_group_size=row_group_rows)
                n += len(chunk)
    fs.mv(tmp, path)
    return n


def _chunks(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _WriteShardFn(beam.DoFn):
    def __init__(self, folder, prefix, schema, to_table, row_group_rows):
        self.folder, self.prefix, self.schema = folder, prefix, schema
        self.to_table, self.row_group_rows = to_table, row_group_rows

    def process(self, keyed, num_shards):
        index, rows = keyed
        name = table_file_name(self.prefix, index, num_shards)
        n = write_parquet_atomic(rows, self.schema, f"{self.folder}/{name}", self.to_table,
                                 self.row_group_rows)
        yield name, n


class WriteParquetShards(beam.PTransform):
    """rows -> Parquet shards `<folder>/<prefix>-SSSSS-of-NNNNN.parquet`; outputs
    (file name, rows) per written shard (a shard that would be empty is not written).

    `key_fn(row) -> int` places a row in shard `key_fn(row) % N` (use the stable id: a shard's
    contents then do not depend on the runner's bundling)."""

    def __init__(self, folder: str, prefix: str, schema: pa.Schema, key_fn: Callable[[dict], int],
                 num_shards: int = 0, shard_rows: int = 1_000_000,
                 to_table: Callable = rows_table, row_group_rows: int = ROW_GROUP_ROWS):
        super().__init__()
        self.folder, self.prefix, self.schema, self.key_fn = folder, prefix, schema, key_fn
        self.num_shards, self.shard_rows = num_shards, shard_rows
        self.to_table, self.row_group_rows = to_table, row_group_rows

    def expand(self, rows):
        count = rows | "Count" >> beam.combiners.Count.Globally()
        n = count | "Shards" >> beam.Map(shard_count, self.shard_rows, self.num_shards)
        key_fn = self.key_fn
        return (rows
                | "Key" >> beam.Map(lambda r, n: (key_fn(r) % n, r), beam.pvalue.AsSingleton(n))
                | "GroupByShard" >> beam.GroupByKey()
                | "Write" >> beam.ParDo(_WriteShardFn(self.folder, self.prefix, self.schema,
                                                      self.to_table, self.row_group_rows),
                                        beam.pvalue.AsSingleton(n)))
