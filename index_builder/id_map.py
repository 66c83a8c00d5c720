"""The id -> URI map of a built index, as the query library holds it in memory.

The ids are one sorted int64 numpy array; the URIs stay in one Arrow string buffer in the same
order (offsets + bytes), not a Python string per entry: a 10M-entry map of ~60-byte URIs takes
about the URI bytes plus 16 bytes an entry, and opening it makes no Python objects. Lookups
binary-search the ids and take only the hits' URIs out of the buffer.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class IdMap:
    def __init__(self, ids: np.ndarray, uris: pa.Array):
        """`ids` sorted ascending, `uris[i]` the URI of `ids[i]`."""
        if len(ids) != len(uris):
            raise ValueError(f"id map with {len(ids)} ids but {len(uris)} URIs")
        self.ids, self.uris = ids, uris

    @classmethod
    def from_tables(cls, tables: list[pa.Table]) -> "IdMap":
        """From the index's id files (columns `id`, `uri`), in any order."""
        if not tables:
            return cls(np.zeros(0, np.int64), pa.array([], pa.large_string()))
        table = pa.concat_tables([t.select(["id", "uri"]) for t in tables]).combine_chunks()
        order = pc.sort_indices(table.column("id"))
        ids = table.column("id").take(order).to_numpy().astype(np.int64, copy=False)
        uris = table.column("uri").cast(pa.large_string()).take(order).combine_chunks()
        # compare neighbours, never subtract them: int64 ids of opposite signs overflow a
        # difference (2**62 - -2**62 wraps negative)
        repeated = ids[1:] == ids[:-1]
        if repeated.any():
            dup = ids[1:][repeated][0]
            raise ValueError(f"the index's id map has id {int(dup)} more than once; the index "
                             f"is damaged, rebuild it")
        return cls(ids, uris)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.uris.nbytes)

    def lookup(self, ids: np.ndarray) -> list[str | None]:
        """The URI of each id, None for an id the map does not hold (e.g. FAISS's -1)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if not len(self.ids):
            return [None] * len(ids)
        pos = np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)
        ok = self.ids[pos] == ids
        found = iter(self.uris.take(pa.array(pos[ok])).to_pylist())
        return [next(found) if good else None for good in ok]
