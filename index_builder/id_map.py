"""The id -> URI (+ metadata) map of a built index: written once at build time, memory-mapped by
readers.

Two files beside the manifest (format 2), listed under its `id_map`:

    id_map.ids.npy   (N,) int64, sorted ascending: `np.load(path, mmap_mode="r")`
    id_map.arrow     an Arrow IPC file (uncompressed, record batches of BATCH_ROWS rows): row i
                     belongs to ids[i]; column `uri` and the metadata columns of the embedding
                     shards (`content_sha1`, `size_bytes`, `width`, `height`, and the extra
                     columns of a URI list, e.g. `title`, `product_id`)

A reader maps both files and makes no Python object per entry: its memory does not grow with the
number of URIs (the pages the OS keeps cached are shared and evictable). Lookups binary-search the
ids and take only the hits' rows out of the mapped batches.

Indexes of format 1 have only the per-shard `id_files` (id, uri); `IdMap.from_tables` reads those
into one Arrow string buffer (the URI bytes plus 16 bytes an entry, in memory).
"""

from __future__ import annotations

import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index_builder.embeddings import open_parquet, read_parquet
from remap_store.files import atomic_path

ID_MAP_IDS = "id_map.ids.npy"
ID_MAP_TABLE = "id_map.arrow"
ID_MAP_FILES = (ID_MAP_IDS, ID_MAP_TABLE)
BATCH_ROWS = 1 << 20
# shard columns that are not metadata of a hit: the key, the vector and the model (the index has one)
NOT_METADATA = ("id", "embedding", "model")


def sorted_positions(ids_sorted: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (row of each of `ids` in the ascending `ids_sorted`, whether it is there)."""
    if not len(ids_sorted):
        return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
    pos = np.clip(np.searchsorted(ids_sorted, ids), 0, len(ids_sorted) - 1)
    return pos, np.asarray(ids_sorted[pos] == ids)


class IdMap:
    def __init__(self, ids: np.ndarray, table: pa.Table):
        """`ids` sorted ascending; row i of `table` (column `uri`, then metadata) is `ids[i]`'s."""
        if len(ids) != table.num_rows:
            raise ValueError(f"id map with {len(ids)} ids but {table.num_rows} rows")
        if "uri" not in table.column_names:
            raise ValueError("the id map has no 'uri' column; the index is damaged, rebuild it")
        self.ids, self.table = ids, table
        lengths = [len(c) for c in table.column("uri").chunks]
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._selections: dict = {}

    @classmethod
    def from_tables(cls, tables: list[pa.Table]) -> "IdMap":
        """From the index's per-shard id files (columns `id`, `uri`, and any metadata), in any
        order; held in memory (format-1 indexes, and the build's own writer)."""
        if not tables:
            return cls(np.zeros(0, np.int64), pa.table({"uri": pa.array([], pa.large_string())}))
        try:    # shards of runs with other URI list columns: a column a shard lacks is null
            table = pa.concat_tables(tables, promote_options="permissive").combine_chunks()
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            reason = " ".join(str(e).split())
            raise ValueError(f"the embedding shards' metadata columns do not agree ({reason}): "
                             f"runs embedded from URI lists that give one column two types; "
                             f"give it one type in every list and embed those runs again "
                             f"(--full into a new store)") from None
        order = pc.sort_indices(table.column("id"))
        ids = table.column("id").take(order).to_numpy().astype(np.int64, copy=False)
        # compare neighbours, never subtract them: int64 ids of opposite signs overflow a
        # difference (2**62 - -2**62 wraps negative)
        repeated = ids[1:] == ids[:-1]
        if repeated.any():
            dup = ids[1:][repeated][0]
            raise ValueError(f"the index's id map has id {int(dup)} more than once; the index "
                             f"is damaged, rebuild it")
        rest = table.drop_columns(["id"]).take(order)
        rest = rest.set_column(rest.column_names.index("uri"), "uri",
                               rest.column("uri").cast(pa.large_string()))
        return cls(ids, rest.combine_chunks())

    @classmethod
    def open_mapped(cls, folder: str) -> "IdMap":
        """Memory-map `id_map.ids.npy` and `id_map.arrow` of a local index folder (no copy)."""
        ids = np.load(os.path.join(folder, ID_MAP_IDS), mmap_mode="r", allow_pickle=False)
        source = pa.memory_map(os.path.join(folder, ID_MAP_TABLE), "r")
        table = pa.ipc.open_file(source).read_all()     # zero-copy over the mapping
        return cls(ids, table)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def uris(self) -> pa.ChunkedArray:
        return self.table.column("uri")

    @property
    def columns(self) -> list[str]:
        """The metadata columns a hit carries (besides its URI)."""
        return [c for c in self.table.column_names if c != "uri"]

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.table.nbytes)

    # ------------------------------------------------------------------ lookups
    def positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (row of each id, whether the map holds it) for (Q,) int64 ids."""
        return sorted_positions(self.ids, np.asarray(ids, np.int64).reshape(-1))

    def _take(self, column: str, pos: np.ndarray) -> list:
        """Python values of `column` at rows `pos` (chunk by chunk: no chunk is concatenated)."""
        chunks = self.table.column(column).chunks
        which = np.searchsorted(self._starts, pos, side="right") - 1
        out: list = [None] * len(pos)
        for c in np.unique(which):
            sel = np.nonzero(which == c)[0]
            values = chunks[c].take(pa.array(pos[sel] - self._starts[c])).to_pylist()
            for i, v in zip(sel, values):
                out[i] = v
        return out

    def lookup(self, ids: np.ndarray) -> list[str | None]:
        """The URI of each id, None for an id the map does not hold (e.g. FAISS's -1)."""
        pos, ok = self.positions(ids)
        found = iter(self._take("uri", pos[ok]))
        return [next(found) if good else None for good in ok]

    def rows(self, ids: np.ndarray, columns: list[str] | None = None) -> list[dict | None]:
        """The metadata of each id ({column: value}), None for an id the map does not hold."""
        pos, ok = self.positions(ids)
        cols = self.columns if columns is None else columns
        values = {c: iter(self._take(c, pos[ok])) for c in cols}
        return [{c: next(values[c]) for c in cols} if good else None for good in ok]

    def ids_where(self, column: str, values: list) -> np.ndarray:
        """Sorted ids whose `column` is one of `values` (a scan of the mapped column; the last
        few selections are kept)."""
        if column == "uri" or column not in self.table.column_names:
            raise ValueError(f"cannot filter on {column!r}: this index's hits carry "
                             f"{', '.join(self.columns) or 'no metadata columns'}")
        key = (column, tuple(sorted(map(str, values))))
        if key not in self._selections:
            col = self.table.column(column)
            try:
                value_set = pa.array(values).cast(col.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise ValueError(f"filter values {values!r} do not fit column {column!r} of "
                                 f"type {col.type}") from None
            rows = np.concatenate([np.zeros(0, np.int64)] + [
                np.nonzero(pc.is_in(chunk, value_set=value_set).to_numpy(zero_copy_only=False))[0]
                + self._starts[i] for i, chunk in enumerate(col.chunks)])
            if len(self._selections) >= 32:
                self._selections.pop(next(iter(self._selections)))
            self._selections[key] = np.asarray(self.ids[rows], np.int64)
        return self._selections[key]


def write_id_map(folder: str, tables: list[pa.Table], batch_rows: int = BATCH_ROWS) -> list[str]:
    """Write the id-sorted map of `tables` (columns `id`, `uri`, metadata; any order, as the
    index shards hold them) into `folder`, each file via a temporary name.
    -> the names written (ID_MAP_FILES)."""
    m = IdMap.from_tables(tables)
    with atomic_path(os.path.join(folder, ID_MAP_IDS)) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(m.ids, np.int64), allow_pickle=False)
    with atomic_path(os.path.join(folder, ID_MAP_TABLE)) as tmp:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, m.table.schema) as writer:
            for batch in m.table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
    return list(ID_MAP_FILES)


def shard_rows(ids_file: str, source: str) -> pa.Table:
    """The rows of one index shard for the id map: its id file's ids (id, uri) with the metadata
    columns of the embedding shard they were added from (rows the shard no longer holds, i.e.
    re-embedded or deleted later, are left out)."""
    kept = pq.read_table(ids_file, columns=["id", "uri"])
    with fsspec.open(source, "rb") as f, open_parquet(f) as pf:
        names = [n for n in pf.schema_arrow.names if n not in NOT_METADATA[1:]]
    rows = read_parquet(source, names)
    rows = rows.filter(pc.is_in(rows.column("id"), value_set=kept.column("id")))
    if rows.num_rows != kept.num_rows:
        raise ValueError(f"embedding shard {source} no longer holds the {kept.num_rows} ids of "
                         f"{ids_file} (found {rows.num_rows}); it changed after the index shard "
                         f"was added: add it again (remap index train + add)")
    return rows
