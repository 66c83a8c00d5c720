"""Merge index shards (all copies of one trained index) into one index, or search them together.

    index = merge_in_memory(shard_paths, "trained.faiss")          # any layout, fits RAM
    merge_to_ondisk("trained.faiss", shard_paths, "index.faiss")   # IVF: index.ivfdata, mmap-able,
                                                                   # one shard in memory at a time
    index = sharded_index([faiss.read_index(p) for p in shard_paths])  # keep N shards

Three layouts, as the manifest names them:
  single  one index file, loaded into memory;
  ondisk  index.faiss + index.ivfdata: the inverted lists stay on disk, memory-mapped;
  shards  the N index shards. IVF shards hold their inverted lists under an empty quantizer
          and share the trained one (stored once): opened as one index (merge_in_memory).
          Other shards (Flat, HNSW) are whole indexes searched together (ShardedIndex).
"""

from __future__ import annotations

import os

import faiss
import numpy as np

from index_builder.add import read_index_shard, set_ntotal
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


def merge_in_memory(shard_paths: list[str], trained_path: str | None = None) -> faiss.Index:
    """Read index shards from files and merge them in memory (peak ~ the merged index).
    `trained_path`: the folder's trained index, which shards holding only inverted lists (IVF)
    share; their lists are moved into it one shard at a time."""
    if not shard_paths:
        raise ValueError("no index shards to merge; run `remap index add` first")
    trained = faiss.read_index(trained_path) if trained_path else None
    if trained is not None and faiss.try_extract_index_ivf(trained) is not None:
        ivf = faiss.extract_index_ivf(trained)
        for p in shard_paths:
            lists, _keep = _shard_lists(p)
            ivf.invlists.merge_from(lists, 0)
            del lists, _keep
        set_ntotal(trained, int(ivf.invlists.compute_ntotal()))
        return trained
    base = read_index_shard(shard_paths[0], trained)
    if _is_graph(base):
        return _rebuild_graph([base] + [read_index_shard(p, trained) for p in shard_paths[1:]])
    for p in shard_paths[1:]:
        part = read_index_shard(p, trained)
        base.merge_from(part, 0)
        del part
    return base


def _shard_lists(path: str):
    """The inverted lists of an IVF index shard, whichever way it was written -> (lists, the
    index that owns them, to keep alive while they are used)."""
    shard = faiss.read_index(path)
    return faiss.extract_index_ivf(shard).invlists, shard


def _list_sizes(lists: faiss.InvertedLists) -> np.ndarray:
    return np.fromiter((lists.list_size(i) for i in range(lists.nlist)), np.uint64, lists.nlist)


def merge_to_ondisk(trained_path: str, shard_paths: list[str], output: str) -> str:
    """IVF shards -> `output` (.faiss) + `output`'s .ivfdata. -> ivfdata path.

    Streamed, with memory bounded by one shard: a first pass reads each shard's list sizes and
    lays the .ivfdata out with every list at its final size (FAISS's OnDiskInvertedLists
    layout: per list, its codes then its ids); a second pass reads one shard at a time and
    writes each of its lists into place with plain file writes. No shard, and none of the
    .ivfdata, is memory-mapped into this process while it merges.

    Open the result with read_ondisk (IO_FLAG_ONDISK_SAME_DIR; not IO_FLAG_MMAP, which crashes
    searches over OnDiskInvertedLists in faiss 1.15.1)
    (the .ivfdata is found beside the .faiss file wherever the folder is moved)."""
    trained = faiss.read_index(trained_path)
    if faiss.try_extract_index_ivf(trained) is None:
        raise ValueError("the on-disk layout needs an IVF index; use --layout single or shards")
    ivf = faiss.extract_index_ivf(trained)
    code_size, entry = ivf.code_size, ivf.code_size + 8      # + the int64 id
    ivfdata = os.path.splitext(output)[0] + ".ivfdata"
    for p in (ivfdata, output):
        if os.path.exists(p):
            os.remove(p)
    sizes = np.zeros(ivf.nlist, np.uint64)
    for p in shard_paths:
        lists, _keep = _shard_lists(p)
        sizes += _list_sizes(lists)
        del lists, _keep
    starts = np.concatenate([[0], np.cumsum(sizes * np.uint64(entry))[:-1]]).astype(np.int64)
    # the file at its full size, and each list's place in it as OnDiskInvertedLists records it
    # (offset, size = capacity); it maps the file, but this process writes through the file
    # descriptor and never touches the mapping
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, code_size, ivfdata)
    ondisk.update_totsize(int(sizes.sum()) * entry)
    ondisk.set_all_lists_sizes(faiss.swig_ptr(sizes))
    filled = np.zeros(ivf.nlist, np.int64)
    fd = os.open(ivfdata, os.O_WRONLY)
    try:
        for p in shard_paths:
            lists, _keep = _shard_lists(p)
            for i in np.flatnonzero(_list_sizes(lists)):
                i = int(i)
                n = lists.list_size(i)
                codes = faiss.rev_swig_ptr(lists.get_codes(i), n * code_size)
                ids = faiss.rev_swig_ptr(lists.get_ids(i), n)
                start = int(starts[i])
                os.pwrite(fd, codes, start + int(filled[i]) * code_size)
                os.pwrite(fd, ids, start + int(sizes[i]) * code_size + int(filled[i]) * 8)
                filled[i] += n
            del lists, _keep
    finally:
        os.close(fd)
    ivf.replace_invlists(ondisk, True)
    ondisk.thisown = False
    set_ntotal(trained, int(sizes.sum()))
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
    from index_builder.refine import RefinedIndex

    if isinstance(index, (ShardedIndex, RefinedIndex)):
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
    to every part of a ShardedIndex (behind a RefinedIndex: to the index it re-ranks)."""
    from index_builder.refine import unwrap

    index = unwrap(index)
    ps = faiss.ParameterSpace()
    for part in index.parts if isinstance(index, ShardedIndex) else [index]:
        for key, value in params.items():
            ps.set_index_parameter(part, key, value)


def sharded_index(parts: list[faiss.Index]) -> ShardedIndex:
    """Search N index shards as one (ids kept, results merged by score)."""
    return ShardedIndex(parts)
