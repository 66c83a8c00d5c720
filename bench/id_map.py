"""The query library's id -> URI map: opening it from the index's ids.parquet and looking up the
hits of a search, IdMap (Arrow buffer) against the map it replaced (a numpy array of Python
strings), in one process on the same file. Prints one JSON line per size:

    python bench/id_map.py [--sizes 1000000 5000000] [--queries 10000] [--k 10]

open_s: read ids.parquet and build the map (best of 3); lookup_s: the URIs of queries x k ids
(90% present, 10% misses); retained_mb: memory the map keeps after opening (tracemalloc for
Python and numpy allocations + pyarrow's allocator, measured in a separate pass since
tracemalloc slows the object-array path). Ratios are IdMap / object array.

`mapped` is what index format 2 readers open: `id_map.ids.npy` + `id_map.arrow`, written once
by the build (`write_id_map`, timed as write_s) and memory-mapped (`IdMap.open_mapped`); for it
the figures that matter are open_s and rss_growth_mb: the process's resident memory after
opening and after the lookups, minus before (mapped pages that the lookups touched count).

    python bench/id_map.py --sizes 1000000 10000000 --kinds mapped idmap

RSS growth is measured in this one process, kind after kind: the first kind (mapped by
default) gets the cleanest figure; later kinds may reuse memory freed by earlier ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from index_builder.id_map import IdMap, write_id_map  # noqa: E402


class ObjectArrayMap:
    """The map RemapIndex held before IdMap: sorted int64 ids and an object array of str."""

    def __init__(self, tables):
        ids = np.concatenate([t.column("id").to_numpy() for t in tables]).astype(np.int64)
        uris = np.concatenate([np.asarray(t.column("uri").to_pylist(), dtype=object)
                               for t in tables])
        order = np.argsort(ids)
        self.ids, self.uris = ids[order], uris[order]

    def lookup(self, ids):
        pos = np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)
        ok = self.ids[pos] == ids
        return [self.uris[p] if good else None for p, good in zip(pos, ok)]


def write_ids(path: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.choice(2**62, size=n, replace=False).astype(np.int64)  # stable ids look random
    uris = pa.array([f"gs://photos-prod/collections/{i % 1000:03d}/{i:012d}.jpg"
                     for i in range(n)], pa.string())
    pq.write_table(pa.table({"id": ids, "uri": uris}), path, compression="zstd")
    return ids


def open_map(kind, path):
    if kind == "mapped":
        return IdMap.open_mapped(os.path.join(os.path.dirname(path), "mapped"))
    tables = [pq.read_table(path)]
    return IdMap.from_tables(tables) if kind == "idmap" else ObjectArrayMap(tables)


def retained_bytes(kind, path) -> int:
    gc.collect()
    arrow0 = pa.total_allocated_bytes()
    tracemalloc.start()
    m = open_map(kind, path)
    gc.collect()
    py, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    arrow = pa.total_allocated_bytes() - arrow0
    del m
    return py + arrow


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench(n: int, queries: int, k: int, tmp: str, kinds: list[str]) -> dict:
    path = os.path.join(tmp, f"ids-{n}.parquet")
    ids = write_ids(path, n)
    rng = np.random.default_rng(1)
    q = rng.choice(ids, queries * k)
    miss = rng.random(len(q)) < 0.1
    q[miss] = -1
    out = {"bench": "id_map", "n": n, "lookups": int(len(q)),
           "parquet_mb": round(os.path.getsize(path) / 2**20, 1)}
    results = {}
    if "mapped" in kinds:
        folder = os.path.join(tmp, "mapped")
        os.makedirs(folder, exist_ok=True)
        t = time.perf_counter()
        write_id_map(folder, [pq.read_table(path)])
        out["mapped_write_s"] = round(time.perf_counter() - t, 2)
        out["mapped_mb"] = round(sum(os.path.getsize(os.path.join(folder, f))
                                     for f in os.listdir(folder)) / 2**20, 1)
    for kind in kinds:
        gc.collect()
        before = rss_mb()
        m = open_map(kind, path)
        opened = rss_mb()
        m.lookup(q)
        growth = {"after_open": round(opened - before, 1),
                  "after_lookups": round(rss_mb() - before, 1)}
        del m
        best = float("inf")
        for _ in range(3):
            gc.collect()
            t = time.perf_counter()
            m = open_map(kind, path)
            best = min(best, time.perf_counter() - t)
        t = time.perf_counter()
        got = m.lookup(q)
        look = time.perf_counter() - t
        results[kind] = got
        del m
        out[kind] = {"open_s": round(best, 4), "lookup_s": round(look, 4),
                     "retained_mb": round(retained_bytes(kind, path) / 2**20, 1),
                     "rss_growth_mb": growth}
    first = results[kinds[0]]
    assert all(r == first for r in results.values()), "the maps disagree"
    if "idmap" in kinds and "object_array" in kinds:
        for key in ("open_s", "lookup_s", "retained_mb"):
            out[f"{key}_ratio"] = round(out["idmap"][key] / out["object_array"][key], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", nargs="+", default=["mapped", "idmap", "object_array"],
                    choices=["object_array", "idmap", "mapped"])
    args = ap.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version(), "pyarrow": pa.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            print(json.dumps({**bench(n, args.queries, args.k, tmp, args.kinds),
                              "machine": machine, "load_avg_1m": round(os.getloadavg()[0], 2)}),
                  flush=True)


if __name__ == "__main__":
    main()
