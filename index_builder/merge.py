"""Merge index shards (all copies of one trained index) into one index, or search them together.

    index = merge_in_memory(["s0.faiss", "s1.faiss"])            # any layout, fits RAM
    merge_to_ondisk("trained.faiss", shard_paths, "index.faiss")   # IVF: index.ivfdata, mmap-able
    index = sharded_index([faiss.read_index(p) for p in shard_paths])  # keep N shards

Three layouts, as the manifest names them:
  single  one index file, loaded into memory;
  ondisk  index.faiss + index.ivfdata: the inverted lists stay on disk, memory-mapped;
  shards  the N index shards, searched together (ShardedIndex), results merged by score.
"""

from __future__ import annotations

import os

import faiss
import numpy as np

from remap_store.files import atomic_path

LAYOUTS = ("single", "ondisk", "shards")


def _is_graph(index: faiss.Index) -> bool:
    """IndexIDMap2 over an HNSW graph (cannot merge_from: rebuilt instead)."""
    return isinstance(index, faiss.IndexIDMap2) and \
        isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW)


def _rebuild_graph(parts: list[faiss.Index]) -> faiss.Index:
    """Graph indexes (HNSW) cannot be merged: rebuild one from the shards' stored vectors."""
    first = parts[0]
    inner = faiss.clone_index(first.index)
    inner.reset()
    out = faiss.IndexIDMap2(inner)
    for p in parts:
        if p.ntotal:
            out.add_with_ids(p.index.reconstruct_n(0, p.ntotal),
                             faiss.vector_to_array(p.id_map).astype(np.int64))
    return out


def merge_indexes(parts: list[faiss.Index]) -> faiss.Index:
    """Index shards (copies of one trained index, disjoint ids) -> one index holding them all.
    The first part is consumed (it becomes the result)."""
    if not parts:
        raise ValueError("no index shards to merge; run `remap index add` first")
    base = parts[0]
    if _is_graph(base):
        return _rebuild_graph(parts)
    for p in parts[1:]:
        base.merge_from(p, 0)  # ids are kept: add_id = 0
    return base


def merge_in_memory(shard_paths: list[str]) -> faiss.Index:
    """Read index shards from files and merge them in memory (peak ~ the merged index)."""
    if not shard_paths:
        raise ValueError("no index shards to merge; run `remap index add` first")
    base = faiss.read_index(shard_paths[0])
    if _is_graph(base):
        return _rebuild_graph([base] + [faiss.read_index(p) for p in shard_paths[1:]])
    for p in shard_paths[1:]:
        part = faiss.read_index(p)
        base.merge_from(part, 0)
        del part
    return base


def merge_to_ondisk(trained_path: str, shard_paths: list[str], output: str) -> str:
    """IVF shards -> `output` (.faiss) + `output`'s .ivfdata, merged list by list without loading
    the lists (faiss.contrib.ondisk.merge_ondisk; shards are memory-mapped). -> ivfdata path.

    Open the result with read_ondisk (IO_FLAG_ONDISK_SAME_DIR; not IO_FLAG_MMAP, which crashes
    searches over OnDiskInvertedLists in faiss 1.15.1)
    (the .ivfdata is found beside the .faiss file wherever the folder is moved)."""
    from faiss.contrib.ondisk import merge_ondisk

    trained = faiss.read_index(trained_path)
    if faiss.try_extract_index_ivf(trained) is None:
        raise ValueError("the on-disk layout needs an IVF index; use --layout single or shards")
    ivfdata = os.path.splitext(output)[0] + ".ivfdata"
    for p in (ivfdata, output):
        if os.path.exists(p):
            os.remove(p)
    merge_ondisk(trained, shard_paths, ivfdata)
    with atomic_path(output) as tmp:
        faiss.write_index(trained, tmp)
    return ivfdata


def read_ondisk(path: str) -> faiss.Index:
    """Open an on-disk IVF index: the .ivfdata beside it is memory-mapped, not read."""
    return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)


class ShardedIndex:
    """N index shards searched as one: each shard is searched (in threads; FAISS releases the
    GIL) and the per-shard lists are merged by score. Duck-types the parts of faiss.Index that
    the query library uses (d, ntotal, metric_type, search).

    Not faiss.IndexShards: its result merge treats every negative id as "no result", and our
    stable ids are signed 64-bit hashes, half of them negative."""

    def __init__(self, parts: list[faiss.Index], threads: int | None = None):
        if not parts:
            raise ValueError("no index shards to search")
        self.parts = parts
        self.d = parts[0].d
        self.metric_type = parts[0].metric_type
        self.threads = threads or min(len(parts), os.cpu_count() or 1)
        if any(p.d != self.d or p.metric_type != self.metric_type for p in parts):
            raise ValueError("index shards differ in dimension or metric; rebuild them from "
                             "one trained index")

    @property
    def ntotal(self) -> int:
        return int(sum(p.ntotal for p in self.parts))

    def search(self, xq: np.ndarray, k: int, params: list | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) -> (scores (Q, k), ids (Q, k)), best first; -1 ids where fewer than k.
        `params`: one faiss.SearchParameters per part (e.g. carrying an id selector)."""
        from concurrent.futures import ThreadPoolExecutor

        xq = np.ascontiguousarray(xq, dtype=np.float32)
        heap = faiss.ResultHeap(len(xq), k, keep_max=self.metric_type == faiss.METRIC_INNER_PRODUCT)
        params = params or [None] * len(self.parts)

        def one(i):
            return self.parts[i].search(xq, k, params=params[i])

        if self.threads > 1:
            with ThreadPoolExecutor(self.threads) as pool:
                results = list(pool.map(one, range(len(self.parts))))
        else:
            results = [one(i) for i in range(len(self.parts))]
        for D, I in results:
            heap.add_result(D, I)
        heap.finalize()
        return heap.D, heap.I

    def search_and_reconstruct(self, xq: np.ndarray, k: int
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As faiss.Index.search_and_reconstruct: (scores (Q, k), ids (Q, k), vectors (Q, k, d))
        merged over the shards by score."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        parts = [search_and_reconstruct(p, xq, k) for p in self.parts]
        D = np.concatenate([p[0] for p in parts], axis=1)
        I = np.concatenate([p[1] for p in parts], axis=1)
        R = np.concatenate([p[2] for p in parts], axis=1)
        big_first = self.metric_type == faiss.METRIC_INNER_PRODUCT
        key = np.where(I == -1, np.inf, -D if big_first else D)
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        return (np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1),
                np.take_along_axis(R, order[..., None], 1))


def search_and_reconstruct(index, xq: np.ndarray, k: int
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search and also decode the results' vectors: (scores (Q, k), ids (Q, k), vectors
    (Q, k, d)), NaN vectors where there is no result. IndexIDMap2 (Flat, HNSW layouts) looks
    each id up (faiss's own search_and_reconstruct on it mistakes negative ids for missing ones);
    IVF indexes (also behind OPQ) decode from the inverted lists."""
    if isinstance(index, ShardedIndex):
        return index.search_and_reconstruct(xq, k)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    if isinstance(index, faiss.IndexIDMap2):
        D, I = index.search(xq, k)
        R = np.full((len(xq), k, index.d), np.nan, np.float32)
        for q, row in enumerate(I):
            for j, i in enumerate(row):
                if i != -1:
                    R[q, j] = index.reconstruct(int(i))
        return D, I, R
    return index.search_and_reconstruct(xq, k)


def set_search_params(index, params: dict) -> None:
    """Apply FAISS search parameters (nprobe, efSearch, quantizer_efSearch, ...) to an index or
    to every part of a ShardedIndex."""
    ps = faiss.ParameterSpace()
    for part in index.parts if isinstance(index, ShardedIndex) else [index]:
        for key, value in params.items():
            ps.set_index_parameter(part, key, value)


def sharded_index(parts: list[faiss.Index]) -> ShardedIndex:
    """Search N index shards as one (ids kept, results merged by score)."""
    return ShardedIndex(parts)
