"""The query library's id -> URI map (index_builder/id_map.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from index_builder.id_map import IdMap


def table(ids, uris):
    return pa.table({"id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.string())})


def test_lookup_across_unsorted_id_files_with_misses():
    rng = np.random.default_rng(0)
    ids = rng.choice(np.arange(-10**12, 10**12, 7919), 20_000, replace=False)
    uris = [f"gs://b/{i}/é-{i % 97}.jpg" for i in range(len(ids))]
    truth = dict(zip(ids.tolist(), uris))
    m = IdMap.from_tables([table(ids[:5000], uris[:5000]), table(ids[5000:], uris[5000:])])
    assert len(m) == 20_000 and m.nbytes > 0
    query = np.concatenate([rng.choice(ids, 300), [-1, ids.max() + 1, ids.min() - 1, 3]])
    got = m.lookup(query)
    assert got == [truth.get(int(q)) for q in query]
    assert got[-4:] == [None, None, None, None]           # FAISS's -1 and ids it never held
    assert m.lookup(np.zeros(0, np.int64)) == []


def test_empty_map_and_duplicate_ids():
    empty = IdMap.from_tables([])
    assert len(empty) == 0 and empty.lookup(np.array([1, -1])) == [None, None]
    with pytest.raises(ValueError, match="id 5 more than once"):
        IdMap.from_tables([table([5, 1], ["a", "b"]), table([5], ["c"])])
