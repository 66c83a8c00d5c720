"""The query library's id -> URI map (index_builder/id_map.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --------------------------------------------------------------------------- property test

I64 = np.iinfo(np.int64)
EXTREMES = [int(I64.min), int(I64.min) + 1, -2**62 - 1, -1, 0, 1, 2**62 + 1, int(I64.max) - 1,
            int(I64.max)]
int64s = st.one_of(st.sampled_from(EXTREMES), st.integers(int(I64.min), int(I64.max)))


@settings(max_examples=300, deadline=None, database=None)  # no saved examples
@given(ids=st.lists(int64s, min_size=1, max_size=40), cuts=st.lists(st.integers(0, 40),
                                                                     max_size=3),
       probe=st.lists(int64s, max_size=10))
def test_any_int64_id_set_opens_and_maps_back_and_only_real_repeats_are_refused(ids, cuts,
                                                                               probe):
    uris = [f"u{i}" for i in range(len(ids))]
    bounds = [0, *sorted(c % (len(ids) + 1) for c in cuts), len(ids)]
    tables = [table(ids[a:b], uris[a:b]) for a, b in zip(bounds, bounds[1:])]
    repeated = {i for i in ids if ids.count(i) > 1}
    if repeated:
        with pytest.raises(ValueError, match="more than once") as err:
            IdMap.from_tables(tables)
        assert int(str(err.value).split("has id ")[1].split()[0]) in repeated
        return
    m = IdMap.from_tables(tables)
    truth = dict(zip(ids, uris))
    assert len(m) == len(ids)
    assert m.lookup(np.array(ids + probe, np.int64)) == [truth.get(i) for i in ids + probe]


def test_two_ids_of_opposite_signs_far_apart_open():
    """The case that overflowed np.diff: sorted neighbours more than 2**63 apart."""
    m = IdMap.from_tables([table([2**62 + 5, -2**62 - 5], ["pos", "neg"])])
    assert m.lookup(np.array([-2**62 - 5, 2**62 + 5, 0])) == ["neg", "pos", None]
