"""Add embedding shards to copies of a trained index, in parallel processes, one index shard per
embedding shard; remove ids from index shards.

    jobs = [AddJob(shard_url, "work/shards/s00000-g0.faiss", drop_ids), ...]
    results = add_shards("work/trained.faiss", jobs, workers=2)

Each worker reads the trained index, streams its embedding shard in row batches, calls
`add_with_ids` with the shard's stable ids, and writes `<name>.faiss` plus `<name>.ids.parquet`
(id -> uri). Of an IVF index a shard file holds its inverted lists under an empty coarse
quantizer: the trained quantizer is the folder's trained.faiss, stored once (read_index_shard
joins them). Workers are processes (spawned, so FAISS/OpenMP state is never forked); how many
run at once is bounded by the CPU count and by a memory budget.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from remap_store.files import atomic_path
from remap_store.schema import PARQUET_CODEC

from index_builder.embeddings import iter_shard_batches
from index_builder.train import widen_assignment


@dataclass
class AddJob:
    source: str                 # embedding shard URL
    output: str                 # local path of the index shard to write (<name>.faiss)
    drop: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # ids to skip
    dba: str | None = None      # index folder whose DBA table replaces the vectors it holds


@dataclass
class AddResult:
    source: str
    output: str
    ids_file: str
    vectors: int
    skipped: int
    seconds: float
    peak_rss_bytes: int


def ids_path(index_path: str) -> str:
    """`x.faiss` -> `x.ids.parquet`."""
    return index_path[: -len(".faiss")] + ".ids.parquet" if index_path.endswith(".faiss") \
        else index_path + ".ids.parquet"


def write_id_table(path: str, ids: np.ndarray, uris: list[str]) -> None:
    """id -> uri Parquet, written to a temporary name and renamed."""
    table = pa.table({"id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=PARQUET_CODEC)


def write_index_atomic(index: faiss.Index, path: str) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, tmp)


def write_index_shard(index: faiss.Index, path: str) -> None:
    """An index shard to `path` (temporary name, then renamed). Of an IVF index only the IVF
    part is written, with its inverted lists and an empty coarse quantizer in place of the
    trained one: the quantizer (and any rotation in front), the same in every shard, stays once
    in the folder's trained.faiss (read_index_shard puts it back). Other indexes (Flat, HNSW:
    nothing shared to leave out) are written whole."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        write_index_atomic(index, path)
        return
    quantizer, empty = ivf.quantizer, faiss.IndexFlat(ivf.d, ivf.metric_type)
    ivf.quantizer = empty
    try:
        write_index_atomic(ivf, path)
    finally:
        ivf.quantizer = quantizer


def holds_only_lists(index: faiss.Index) -> bool:
    """True for an index shard written without its quantizer (write_index_shard of an IVF
    index); False for a whole index (every shard of remap before shared quantizers)."""
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and ivf.nlist > 0 and ivf.quantizer.ntotal == 0


def set_ntotal(index: faiss.Index, n: int) -> None:
    """ntotal of an index and of the indexes it wraps, down to the IVF index."""
    while index is not None:
        index = faiss.downcast_index(index)
        index.ntotal = n
        if isinstance(index, faiss.IndexIVF):
            return
        index = getattr(index, "index", None)


def with_lists(trained: faiss.Index, shard: faiss.Index) -> faiss.Index:
    """A copy of the trained (empty) IVF index holding the entries of `shard`'s inverted lists
    (which are moved: `shard` is left empty)."""
    index = faiss.clone_index(trained)
    ivf, lists = faiss.extract_index_ivf(index), faiss.extract_index_ivf(shard).invlists
    if lists.nlist != ivf.nlist or lists.code_size != ivf.code_size:
        raise ValueError(f"an index shard has {lists.nlist} lists of {lists.code_size}-byte codes "
                         f"but the trained index {ivf.nlist} of {ivf.code_size}: the shard "
                         f"belongs to another training; rebuild the index")
    ivf.invlists.merge_from(lists, 0)
    set_ntotal(index, int(ivf.invlists.compute_ntotal()))
    return index


def read_index_shard(path: str, trained: faiss.Index | None = None) -> faiss.Index:
    """An index shard as a searchable index: a whole index as it is, one written without its
    quantizer joined to a copy of `trained` (the folder's trained.faiss)."""
    shard = faiss.read_index(path)
    if not holds_only_lists(shard):
        return shard
    if trained is None:
        raise ValueError(f"{path} holds only inverted lists; its quantizer is the index "
                         f"folder's trained.faiss")
    return with_lists(trained, shard)


def add_shard(trained: faiss.Index, job: AddJob, batch_rows: int = 65_536) -> AddResult:
    """Add one embedding shard to a copy of `trained` and write the index shard + its id table."""
    started = time.time()
    index = faiss.clone_index(trained)
    widen_assignment(index)
    all_ids, all_uris, skipped = [], [], 0
    drop = np.asarray(job.drop, np.int64)
    with_drop = len(drop) > 0
    if job.dba:
        from index_builder.build import augmented, dba_table

        table = dba_table(job.dba)
    for ids, X, uris in iter_shard_batches(job.source, batch_rows):
        if job.dba:
            X = augmented(table, ids, X)
        if with_drop:
            m = ~np.isin(ids, drop)
            skipped += int((~m).sum())
            ids, X, uris = ids[m], X[m], [u for u, k in zip(uris, m) if k]
        if len(ids):
            index.add_with_ids(X, ids)
            all_ids.append(ids)
            all_uris += uris
    ids = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64)
    os.makedirs(os.path.dirname(os.path.abspath(job.output)), exist_ok=True)
    write_index_shard(index, job.output)
    write_id_table(ids_path(job.output), ids, all_uris)
    return AddResult(job.source, job.output, ids_path(job.output), int(len(ids)), skipped,
                     round(time.time() - started, 3), _peak_rss())


def _peak_rss() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb if sys.platform == "darwin" else kb * 1024)


_TRAINED: faiss.Index | None = None


def _worker_init(trained_path: str, threads: int) -> None:
    global _TRAINED
    faiss.omp_set_num_threads(threads)
    _TRAINED = faiss.read_index(trained_path)


def _worker_add(job: AddJob, batch_rows: int) -> AddResult:
    return add_shard(_TRAINED, job, batch_rows)


def worker_count(trained_bytes: int, dim: int, batch_rows: int, workers: int | None,
                 memory_budget: int | None) -> int:
    """Processes to run at once: the requested number (default: CPUs), lowered so that each
    worker's estimated peak (trained index x2 + one batch of vectors x3 + codes) fits the
    budget."""
    n = workers or os.cpu_count() or 1
    if memory_budget:
        per_worker = 2 * trained_bytes + 3 * batch_rows * dim * 4 + (256 << 20)
        n = min(n, max(1, memory_budget // per_worker))
    return max(1, int(n))


def add_shards(trained_path: str, jobs: list[AddJob], workers: int | None = None,
               memory_budget: int | None = None, batch_rows: int = 65_536,
               progress: bool = True) -> list[AddResult]:
    """Run `jobs` over a process pool; results in job order. One job runs in this process."""
    trained = faiss.read_index(trained_path)
    n = min(len(jobs), worker_count(os.path.getsize(trained_path), trained.d, batch_rows,
                                    workers, memory_budget))
    bar = _progress(len(jobs), "add shards", progress)
    if n <= 1:
        out = []
        for job in jobs:
            out.append(add_shard(trained, job, batch_rows))
            bar.update(1)
        bar.close()
        return out
    threads = max(1, (os.cpu_count() or 1) // n)
    results: dict[int, AddResult] = {}
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init,
                             initargs=(trained_path, threads)) as pool:
        futures = {pool.submit(_worker_add, job, batch_rows): i for i, job in enumerate(jobs)}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
    bar.close()
    return [results[i] for i in range(len(jobs))]


def remove_ids(index_path: str, ids: np.ndarray, output: str,
               trained: faiss.Index | None = None) -> tuple[int, int]:
    """Copy of an index shard without `ids` (and its id table likewise) -> (removed, left).
    `trained`: the folder's trained index (needed for shards holding only inverted lists)."""
    index = read_index_shard(index_path, trained)
    ids = np.unique(np.asarray(ids, np.int64))
    before = int(index.ntotal)
    try:
        index.remove_ids(faiss.IDSelectorBatch(ids))
    except RuntimeError:  # graph indexes (HNSW) cannot remove: rebuild from the kept vectors
        index = _rebuild_without(index, ids)
    removed = before - int(index.ntotal)
    table = pq.read_table(ids_path(index_path))
    keep = ~np.isin(table.column("id").to_numpy(), ids)
    write_index_shard(index, output)
    write_id_table(ids_path(output), table.column("id").to_numpy()[keep],
                   [u for u, k in zip(table.column("uri").to_pylist(), keep) if k])
    return removed, int(index.ntotal)


def _rebuild_without(index: faiss.Index, ids: np.ndarray) -> faiss.Index:
    """An IndexIDMap2 over a non-removable index, rebuilt without `ids` from stored vectors."""
    if not isinstance(index, faiss.IndexIDMap2):
        raise ValueError("this index type can neither remove ids nor be rebuilt from its stored "
                         "vectors; rebuild it with `remap index train` and `remap index add`")
    have = faiss.vector_to_array(index.id_map).astype(np.int64)
    X = index.index.reconstruct_n(0, index.ntotal)
    keep = ~np.isin(have, ids)
    inner = faiss.clone_index(index.index)
    inner.reset()
    out = faiss.IndexIDMap2(inner)
    out.add_with_ids(X[keep], have[keep])
    return out


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="shard", file=sys.stderr)
    except ImportError:
        return _NoBar()
