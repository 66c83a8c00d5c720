"""Choose an index for a collection, sample it uniformly, train the empty index.

    factory = choose_factory(n=1_000_000, dim=512, max_index_bytes=100 << 20)
    # 'IVF4096_HNSW32,PQ64x8'  (opq=True: 'OPQ64_448,IVF4096_HNSW32,PQ64x8')
    sample = reservoir_sample(batches, 200_000, seed=0)      # streamed, bounded memory
    index = train_index(factory, sample)

Everything here is numpy in, FAISS out; the file layout lives in build.py.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Iterable, NamedTuple

import faiss
import numpy as np

log = logging.getLogger(__name__)

# Collection sizes below which the exact or graph indexes are chosen (when they fit the budget).
FLAT_MAX = 100_000
HNSW_MAX = 500_000
MIN_POINTS_PER_CENTROID = 39
MAX_POINTS_PER_CENTROID = 256
KMEANS_ITERATIONS = 12  # coarse k-means; FAISS's 25 buys little at 39-256 points/centroid
PQ_CHOICES = (256, 128, 64, 48, 32, 24, 16, 8, 4)
ID_BYTES = 8  # an int64 id is stored beside every code in the inverted lists
HNSW_NODE_BYTES = 2 * 32 * 4 + 16  # HNSW32: 64 level-0 links, level + offset, upper levels
PQ_CENTROIDS = 256  # every PQ{m}x8 sub-quantizer (and OPQ's) is a 2^8-centroid k-means
# From this many IVF lists on, the coarse quantizer is trained by two-level k-means
# (faiss.contrib.clustering: sqrt(k) clusters, then each split in proportion to its points):
# about sqrt(k)/2 times less work than flat k-means over k centroids (see bench/RESULTS.md).
TWO_LEVEL_MIN_LISTS = 8192
ERROR_SAMPLE = 10_000  # vectors held out of training to measure the quantisation error
PQ_KEEP = 0.5  # a PQ size that divides the dimension is used if it keeps >= half the code bytes
# The largest PQ code chosen by default, bytes per vector (`--code-bytes`): on the benchmark the
# shipped model's (remap-lite0-v4) descriptors keep 98.7 % of float mAP in IVF-PQ codes at 64 B
# (93.1 against 94.4) and 99.8 % at 128 B, for twice the memory; 95.7 % at 32 B, where clutter
# loses 13.6 points (bench/RESULTS.md, "Compression of remap-lite0-v4"). The budget may choose
# less.
DEFAULT_CODE_BYTES = 64


def parse_bytes(text: str | int | float, what: str = "--max-index-memory") -> int:
    """'100MB', '4G', '1.5GiB', 2e9 -> bytes (> 0; a zero or negative size is refused)."""
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([-+]?[\d.]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
        if not m or m.group(1).strip("+-") in ("", "."):
            raise ValueError(f"cannot read a memory size from {what} {text!r}; write e.g. "
                             f"100MB, 4G, 1.5GiB")
        value = int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))
    if value <= 0:
        raise ValueError(f"{what} {text!r} is not a positive memory size; write e.g. 100MB, "
                         f"4G, 1.5GiB")
    return value


def held_out_size(n: int) -> int:
    """Vectors of an n-vector collection that training leaves out (quantisation error)."""
    return min(ERROR_SAMPLE, n // 10)


def nlist_for(n: int) -> int:
    """IVF centroids for n vectors: a power of two near 4*sqrt(n) (FAISS guideline 4-16 sqrt(n)),
    lowered if needed so that every centroid gets at least 39 training points."""
    k = 2 ** max(0, round(math.log2(max(4 * math.sqrt(n), 1))))
    while k > 1 and k * MIN_POINTS_PER_CENTROID > n:
        k //= 2
    return int(k)


def ivf_part(k: int) -> str:
    """Coarse quantizer spec: flat for few centroids, an HNSW32 graph over centroids beyond."""
    return f"IVF{k}" if k < 1000 else f"IVF{k}_HNSW32"


# efSearch of the HNSW graph over the IVF centroids while vectors are added: a vector goes to
# the list of the centroid this search finds. FAISS's default (16) put 3.8-4.3 % of 1M vectors in
# another list than their nearest centroid's (4,096 and 16,384 lists), which capped recall@10 at
# 0.974-0.976 at nprobe 16; 64 leaves 0.08-0.21 % (recall@10 0.997-0.998) for 3.1-3.4x the
# assignment time, 128 nearly none for 5-6x (bench/RESULTS.md, "Assigning vectors to lists")
ASSIGN_EF = 64


def hnsw_quantizer(index: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW graph over an IVF index's centroids (`ivf_part`'s, from 1,000 lists on), or
    None (not IVF, or a flat coarse quantizer)."""
    ivf = faiss.try_extract_index_ivf(index)
    quantizer = None if ivf is None else faiss.downcast_index(ivf.quantizer)
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def widen_assignment(index: faiss.Index, ef: int = ASSIGN_EF) -> None:
    """Search the HNSW graph over an IVF index's centroids (if it has one) at least `ef` wide,
    as vectors are assigned to their lists when they are added. Search time sets its own width
    (`quantizer_efSearch`, tuned with nprobe)."""
    quantizer = hnsw_quantizer(index)
    if quantizer is not None:
        quantizer.hnsw.efSearch = max(int(quantizer.hnsw.efSearch), int(ef))


def coarse_bytes(k: int, dim: int) -> int:
    """Memory of k coarse centroids of dim float32, with the HNSW32 graph over them when
    ivf_part uses one."""
    graph = HNSW_NODE_BYTES * k if k >= 1000 else 0
    return 4 * dim * k + graph


def ivf_pq_bytes(n: int, dim: int, k: int, m: int, rotated_dim: int | None = None) -> int:
    """Memory of an IVF{k},PQ{m}x8 index of n vectors (codes + ids, coarse quantizer, PQ
    codebooks), with a dim x rotated_dim rotation matrix in front if given."""
    d = rotated_dim or dim
    rotation = 4 * dim * rotated_dim if rotated_dim else 0
    return (m + ID_BYTES) * n + coarse_bytes(k, d) + 4 * d * PQ_CENTROIDS + rotation


def opq_dim(dim: int, m: int) -> int:
    """The output dimension of the OPQ rotation in front of PQ{m}x8 codes of dim-vectors, as
    autofaiss: dim // m + 1 dimensions per sub-vector, at most 7 (OPQ{m}_{opq_dim}); above dim
    when m > dim / 7 (the rotation then pads, inner products unchanged)."""
    return (min(dim // m, 6) + 1) * m


def choose_factory(n: int, dim: int, max_index_bytes: int, opq: bool = False,
                   code_bytes: int = DEFAULT_CODE_BYTES) -> str:
    """The index for n vectors of dim float32 under a memory budget, the way autofaiss picks:

    - n <= 100k and the raw vectors fit: Flat (exact);
    - n <= 500k and vectors + an HNSW32 graph fit: HNSW32;
    - IVF{k},Flat (k ~ 4 sqrt(n)) when the raw vectors + ids fit;
    - else IVF{k}(_HNSW32),PQ{m}x8 with the largest m, at most `code_bytes` (default
      DEFAULT_CODE_BYTES: more buys little retrieval), whose codes + ids fit. FAISS needs m to
      divide the dimension: the largest fitting m that divides it is taken when it keeps at
      least half the affordable code bytes, else the vectors are turned by a random rotation
      padded to a multiple of m (RR{y}: inner products unchanged, no training). With `opq`, a
      learned OPQ rotation to a multiple of m goes in front (OPQ{m}_{y}, as autofaiss: better
      codes on real descriptors; its training costs minutes on 2 cores, see bench/RESULTS.md).
    PQ needs at least 256 training vectors (one k-means of 256 centroids per sub-vector).
    """
    if n <= 0:
        raise ValueError("the collection is empty; embed some images first")
    if max_index_bytes <= 0:
        raise ValueError(f"--max-index-memory must be positive, got {max_index_bytes} bytes")
    check_code_bytes(code_bytes)
    raw = 4 * dim * n
    if n <= FLAT_MAX and raw <= max_index_bytes:
        return "Flat"
    if n <= HNSW_MAX and raw + n * (HNSW_NODE_BYTES + ID_BYTES) <= max_index_bytes:
        return "HNSW32"
    k = nlist_for(n)
    if (raw + ID_BYTES * n) + coarse_bytes(k, dim) <= max_index_bytes:
        return f"{ivf_part(k)},Flat"
    ivf = ivf_part(k)
    if n - held_out_size(n) < PQ_CENTROIDS:
        raise ValueError(f"{n} vectors are too few to train PQ codes ({PQ_CENTROIDS} centroids "
                         f"per sub-vector) and their exact index needs {raw} bytes; raise "
                         f"--max-index-memory to at least {raw} or pass --factory")
    fitting = [m for m in PQ_CHOICES
               if m < dim and m <= code_bytes and ivf_pq_bytes(n, dim, k, m) <= max_index_bytes]
    if opq:
        for m in fitting:
            y = opq_dim(dim, m)
            if ivf_pq_bytes(n, dim, k, m, y) <= max_index_bytes:
                return f"OPQ{m}_{y},{ivf},PQ{m}x8"
    else:
        divisor = next((m for m in fitting if dim % m == 0), None)
        for m in fitting:  # largest first
            if divisor is not None and divisor >= PQ_KEEP * m:
                return f"{ivf},PQ{divisor}x8"
            y = -(-dim // m) * m  # padded up to a multiple of m
            if ivf_pq_bytes(n, dim, k, m, y) <= max_index_bytes:
                return f"RR{y},{ivf},PQ{m}x8"
        if divisor is not None:
            return f"{ivf},PQ{divisor}x8"
    need = ivf_pq_bytes(n, dim, k, PQ_CHOICES[-1])
    raise ValueError(f"{n} vectors cannot fit {max_index_bytes} bytes even with 4-byte codes "
                     f"(need about {need}); raise --max-index-memory or pass --factory")


def check_code_bytes(code_bytes: int) -> None:
    """Refuse a `--code-bytes` below the smallest PQ code FAISS offers."""
    if int(code_bytes) < PQ_CHOICES[-1]:
        raise ValueError(f"--code-bytes must be at least {PQ_CHOICES[-1]} (the smallest PQ "
                         f"code), got {code_bytes}")


def nlist_of(factory: str) -> int:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else 0


def training_size(factory: str, n: int, dim: int, points_per_centroid: int = 50,
                  max_sample_bytes: int = 2 << 30) -> int:
    """Training points for a factory: `points_per_centroid` per IVF centroid, kept within the
    39-256 FAISS k-means bounds and a memory budget for the sample; at least 2^16 for PQ
    codebooks (256 centroids x 256 points); never more than n."""
    k = nlist_of(factory)
    want = 0
    if k:
        ppc = min(MAX_POINTS_PER_CENTROID, max(MIN_POINTS_PER_CENTROID, points_per_centroid))
        fit = max_sample_bytes // (4 * dim)
        want = max(MIN_POINTS_PER_CENTROID * k, min(ppc * k, fit))
    if "PQ" in factory:
        want = max(want, 256 * 256)
    return int(min(want, n))


# --------------------------------------------------------------------------- sampling

def sample_keys(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """A uniform random key in [0, 1) for each id (B,) int64 -> (B,) float64, a function of
    (id, seed) alone (splitmix64 of the id mixed with the seed): the same row draws the same key
    whichever stream, batch, shard or worker it is read in."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids, np.int64).view(np.uint64) ^ \
            np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 64))
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class SamplePart(NamedTuple):
    """The rows of one part of a collection with the smallest sample keys: (keys (S,),
    ids (S,), X (S, D) float32), keys ascending."""
    keys: np.ndarray
    ids: np.ndarray
    X: np.ndarray


def _bottom(keys: np.ndarray, ids: np.ndarray, size: int) -> np.ndarray:
    """Positions of the `size` rows with the smallest (key, id), in no particular order."""
    if not size:
        return np.zeros(0, np.int64)
    keep = np.argpartition(keys, size)[:size]
    # rows tied with the size-th key are rare; the id breaks ties so every way of cutting the
    # stream keeps the same rows
    if keys[keep].max() == np.delete(keys, keep).min():
        keep = np.lexsort((ids, keys))[:size]
    return keep


def _smallest(keys: np.ndarray, ids: np.ndarray, X: np.ndarray, size: int) -> SamplePart:
    """The `size` rows with the smallest (key, id), in that order."""
    if len(keys) > size:
        keep = _bottom(keys, ids, size)
        keys, ids, X = keys[keep], ids[keep], X[keep]
    order = np.lexsort((ids, keys))
    return SamplePart(keys[order], ids[order], np.ascontiguousarray(X[order]))


_COMPACT_ROWS = 8_192      # rows moved per step when the kept rows are packed to the front


def _cut(keys: np.ndarray, ids: np.ndarray, X: np.ndarray, n: int, size: int) -> int:
    """Keep, in place at the front of the buffers, the `size` rows of the first n with the
    smallest (key, id) (in buffer order) -> the rows now held. X is packed a chunk at a time:
    the kept rows ascend, so each chunk's source rows lie at or after its destination and after
    every earlier chunk's, and only a chunk's worth of memory is allocated."""
    if n <= size:
        return n
    keep = np.sort(_bottom(keys[:n], ids[:n], size))
    keys[:size], ids[:size] = keys[keep], ids[keep]
    for i in range(0, size, _COMPACT_ROWS):
        j = min(i + _COMPACT_ROWS, size)
        X[i:j] = X[keep[i:j]]
    return size


def _grown(a: np.ndarray, n: int, rows: int) -> np.ndarray:
    """A new buffer of `rows` rows holding the first n of `a`."""
    out = np.empty((rows,) + a.shape[1:], a.dtype)
    out[:n] = a[:n]
    return out


def sample_part(batches: Iterable[tuple[np.ndarray, np.ndarray]], size: int, seed: int = 0,
                dim: int | None = None) -> SamplePart:
    """Bottom-k sample of a stream of (ids (B,), X (B, D)) batches: the `size` rows with the
    smallest sample_keys. Memory is O(min(rows, size + batch)). Samples of disjoint parts of a
    collection (its shards, read by different workers) combine with merge_sample_parts into
    exactly the sample of the whole collection.

    The rows go into one buffer, doubled as rows come up to 2 x size + batch; when that is full,
    it is cut to the `size` smallest in place (O(size), after at least size + batch new rows:
    O(rows) in all). Allocating a large array costs a page fault per page, so a sample kept by
    concatenating every batch onto the kept rows spent most of its time there."""
    keys = ids = X = None
    n = 0
    for bid, bx in batches:
        bid = np.asarray(bid, np.int64)
        b, full = len(bid), 2 * size + len(bid)
        if X is None:
            keys, ids = np.empty(b), np.empty(b, np.int64)
            X = np.empty((b, np.shape(bx)[1]), np.float32)
        if n + b > len(X):
            if len(X) < full:
                rows = max(n + b, min(2 * len(X), full))
                keys, ids, X = (_grown(a, n, rows) for a in (keys, ids, X))
            else:
                n = _cut(keys, ids, X, n, size)          # then n + b <= size + b fits
        keys[n:n + b], ids[n:n + b], X[n:n + b] = sample_keys(bid, seed), bid, bx
        n += b
    if X is None:
        if dim is None:
            raise ValueError("nothing to sample: the stream was empty")
        return SamplePart(np.zeros(0), np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
    n = _cut(keys, ids, X, n, size)
    return _smallest(keys[:n], ids[:n], X[:n], size)


def merge_sample_parts(parts: Iterable[SamplePart], size: int) -> SamplePart:
    """Samples of disjoint parts -> the sample of their union (the `size` smallest keys)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        raise ValueError("nothing to sample: no part was sampled")
    return _smallest(np.concatenate([p.keys for p in parts]),
                     np.concatenate([p.ids for p in parts]),
                     np.concatenate([p.X for p in parts]), size)


def reservoir_sample(batches: Iterable[tuple[np.ndarray, np.ndarray]], size: int, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A uniform random sample without replacement of `size` rows from a stream of
    (ids (B,), X (B, D)) batches of unknown total length -> (ids (S,), X (S, D)).

    Bottom-k sampling: every row's key is a hash of its id and the seed (sample_keys), the
    sample is the rows with the `size` smallest keys, smallest first; memory is O(size + batch)
    and the result depends neither on how the stream is cut into batches nor on its order, so
    a sample drawn in parallel over shards (sample_part + merge_sample_parts) is the same."""
    part = sample_part(batches, size, seed)
    return part.ids, part.X


# --------------------------------------------------------------------------- training

FACTORY_EXAMPLES = "'Flat', 'HNSW32', 'IVF1024,Flat', 'IVF1024,PQ{m}x8' (m dividing {dim})"


def faiss_reason(e: Exception) -> str:
    """The readable part of a FAISS RuntimeError ("Error in ... failed: <reason>")."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    for mark in ("' failed: ", "Error: "):
        if mark in text:
            text = text.split(mark, 1)[1]
    return text.strip()


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index from a factory string, able to take our int64 ids (indexes
    without their own id storage are wrapped in IndexIDMap2). A string FAISS rejects for `dim`
    is refused with a ValueError that says what to pass."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        m = next((m for m in PQ_CHOICES if m < dim and dim % m == 0), 4)
        raise ValueError(f"--factory {factory!r} is not an index FAISS can make for {dim}-dim "
                         f"vectors ({faiss_reason(e)}); pass e.g. "
                         + FACTORY_EXAMPLES.format(m=m, dim=dim) +
                         ", or leave --factory out to choose one from --max-index-memory") from None
    if faiss.try_extract_index_ivf(index) is None:
        index = faiss.IndexIDMap2(index)
    return index


def training_needs(index: faiss.Index) -> list[tuple[int, str]]:
    """The fewest training vectors each trained part of an empty index needs (k-means needs at
    least as many points as centroids) -> [(count, what)]."""
    needs: list[tuple[int, str]] = []
    index = inner_index(faiss.downcast_index(index))
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                needs.append((PQ_CENTROIDS, f"the OPQ rotation's {PQ_CENTROIDS}-centroid "
                                            f"codebooks"))
        index = faiss.downcast_index(index.index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        needs.append((int(ivf.nlist), f"{ivf.nlist} IVF centroids"))
        index = faiss.downcast_index(ivf)
    parts = [index]
    if isinstance(index, faiss.IndexHNSW):
        parts.append(faiss.downcast_index(index.storage))
    for part in parts:
        pq = getattr(part, "pq", None)
        if isinstance(pq, faiss.ProductQuantizer):
            needs.append((int(pq.ksub), f"{pq.ksub} centroids per PQ sub-vector, {pq.nbits} "
                                        f"bits"))
    return needs


def check_trainable(factory: str, index: faiss.Index, points: int, n: int) -> None:
    """Refuse a factory whose training needs more vectors than the `points` the sample will
    hold (of a collection of n), before anything is sampled."""
    if index.is_trained:
        return
    for need, what in training_needs(index):
        if points < need:
            raise ValueError(
                f"--factory {factory!r} needs at least {need} training vectors ({what}) but "
                f"only {points} are available (collection of {n}); pass a factory with fewer "
                f"centroids (IVF<k> needs k, PQ<m>x8 256, PQ<m>x4 16), a larger --train-sample, "
                f"or leave --factory out")


def coarse_training(nlist: int) -> str:
    """How the coarse quantizer of an IVF index with `nlist` lists is trained: "two-level"
    k-means from TWO_LEVEL_MIN_LISTS lists on, else "flat" (FAISS's own k-means)."""
    return "two-level" if nlist >= TWO_LEVEL_MIN_LISTS else "flat"


def _gpus() -> int:
    """GPUs this FAISS build can use (0 for faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def train_two_level(index: faiss.Index, sample: np.ndarray, verbose: bool = False) -> None:
    """Train an IVF index (under any pre-transform) with its coarse centroids from two-level
    k-means (faiss.contrib.clustering.two_level_clustering: sqrt(nlist) clusters, each split
    into sub-clusters in proportion to its share of the sample), on the GPUs when FAISS has
    any; the rest of the index (PQ codebooks) then trains as usual on the same sample."""
    from faiss.contrib.clustering import two_level_clustering

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = index.chain.at(i)
            vt.train(sample)
            sample = vt.apply(sample)
        train_two_level(index.index, sample, verbose)
        index.is_trained = True
        return
    ivf = faiss.extract_index_ivf(index)
    centroids, _ = two_level_clustering(sample, int(math.sqrt(ivf.nlist)), ivf.nlist,
                                        clustering_niter=KMEANS_ITERATIONS, seed=1234,
                                        verbose=verbose, **({"gpu": True} if _gpus() else {}))
    ivf.quantizer.train(centroids)
    ivf.quantizer.add(centroids)
    index.train(sample)          # the coarse quantizer is full: only the codes train now


def train_index(factory: str, sample: np.ndarray, verbose: bool = False,
                two_level: bool | None = None) -> faiss.Index:
    """(S, D) float32 sample -> the trained, empty index. `two_level`: train the IVF coarse
    quantizer with two-level k-means (None: from TWO_LEVEL_MIN_LISTS lists on)."""
    index = make_index(factory, sample.shape[1])
    if not index.is_trained:
        if len(sample) == 0:
            raise ValueError(f"{factory} needs training vectors and the sample is empty")
        _no_polysemous_training(index)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.cp.max_points_per_centroid = MAX_POINTS_PER_CENTROID
            ivf.cp.min_points_per_centroid = 1
            ivf.cp.niter = KMEANS_ITERATIONS
            ivf.verbose = verbose
            if ivf.nlist > len(sample):
                raise ValueError(f"{factory} has {ivf.nlist} centroids but only {len(sample)} "
                                 f"training vectors; use a smaller IVF or pass --factory")
        started = time.time()
        if two_level is None:
            two_level = ivf is not None and coarse_training(ivf.nlist) == "two-level"
        try:
            if two_level and ivf is not None:
                train_two_level(index, np.ascontiguousarray(sample, dtype=np.float32), verbose)
            else:
                if ivf is not None and _gpus():   # flat k-means's assignments on the GPUs
                    ivf.clustering_index = faiss.index_cpu_to_all_gpus(
                        faiss.IndexFlat(ivf.d, ivf.metric_type))
                index.train(np.ascontiguousarray(sample, dtype=np.float32))
        except RuntimeError as e:
            raise ValueError(f"FAISS could not train {factory} on {len(sample)} vectors "
                             f"({faiss_reason(e)}); pass another --factory or a larger "
                             f"--train-sample") from None
        if verbose:
            log.info("trained %s on %d vectors in %.1fs", factory, len(sample),
                     time.time() - started)
    return index


def _no_polysemous_training(index: faiss.Index) -> None:
    """FAISS's factory turns on polysemous training for PQ{m}x8 codes: an annealing that
    reorders each sub-quantizer's centroids (~1.5 s per sub-quantizer on one core, 100 s for
    PQ64) so that Hamming distances between codes approximate real ones. It only serves
    polysemous search (the `ht` parameter), which remap never sets; without it the centroids,
    and so the reconstructions and search results, are the same (only their numbering
    differs)."""
    index = faiss.downcast_index(inner_index(index))
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    ivf = faiss.try_extract_index_ivf(index)
    target = faiss.downcast_index(ivf) if ivf is not None else index
    if hasattr(target, "do_polysemous_training"):
        target.do_polysemous_training = False


def inner_index(index: faiss.Index) -> faiss.Index:
    """The index under IndexIDMap/IndexIDMap2 wrappers."""
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.downcast_index(index.index)
    return index


def quantization_error(index: faiss.Index, X: np.ndarray) -> dict[str, float]:
    """How well a trained index represents (N, D) vectors:

    - reconstruction: mean ||x - decode(encode(x))||^2 (0 for exact storage),
    - coarse: mean squared distance to the assigned IVF centroid (IVF only).
    A growth of either on new data, relative to the training sample, says the collection has
    drifted from what the codebooks learned."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    out: dict[str, float] = {}
    base = inner_index(index)
    try:
        rec = base.sa_decode(base.sa_encode(X))
        out["reconstruction"] = float(np.mean(np.sum((rec - X) ** 2, axis=1)))
    except RuntimeError:
        pass
    ivf = faiss.try_extract_index_ivf(base)
    if ivf is not None:
        xt = X
        if isinstance(base, faiss.IndexPreTransform):
            xt = _apply_chain(base, X)
        _, assign = ivf.quantizer.search(xt, 1)
        cent = ivf.quantizer.reconstruct_batch(assign[:, 0])
        out["coarse"] = float(np.mean(np.sum((xt - cent) ** 2, axis=1)))
    return out


def _apply_chain(pre: faiss.IndexPreTransform, X: np.ndarray) -> np.ndarray:
    for i in range(pre.chain.size()):
        X = pre.chain.at(i).apply(X)
    return X


def error_growth(trained: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    """Ratio new/trained for each error both sides measured (nonzero)."""
    return {k: new[k] / trained[k] for k in trained if k in new and trained[k] > 0}

