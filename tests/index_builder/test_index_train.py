"""Index choice, uniform streamed sampling, training, quantisation error and the recall/tuning
helpers, each checked against a direct numpy/FAISS computation."""

from __future__ import annotations

import re

import faiss
import numpy as np
import pytest

from index_builder.recall import exact_knn_stream, recall_at, tune_search_params
from index_builder.synthetic import clustered_vectors
from index_builder.train import (DEFAULT_CODE_BYTES, choose_factory, ivf_part, ivf_pq_bytes,
                                 nlist_for, parse_bytes, quantization_error, reservoir_sample, train_index, training_size)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def test_index_choice_follows_collection_size_and_memory_budget():
    assert choose_factory(500, 512, 1 << 30) == "Flat"
    assert choose_factory(300_000, 512, 4 << 30) == "HNSW32"
    assert choose_factory(1_000_000, 512, 8 << 30) == "IVF4096_HNSW32,Flat"
    assert choose_factory(1_000_000, 512, 100 << 20) == "IVF4096_HNSW32,PQ64x8"
    assert choose_factory(1_000_000, 512, 100 << 20, opq=True) == \
        "OPQ64_448,IVF4096_HNSW32,PQ64x8"
    f = choose_factory(10**9, 1280, 200 << 30)
    k, m = nlist_for(10**9), int(f.split("PQ")[1].split("x")[0])
    assert f == f"IVF{k}_HNSW32,PQ{m}x8" and (m + 8) * 10**9 <= 200 << 30
    assert 2 * np.sqrt(1e9) <= k <= 16 * np.sqrt(1e9)
    with pytest.raises(ValueError, match="--max-index-memory"):
        choose_factory(10**9, 512, 1 << 30)
    assert parse_bytes("100MB") == 100 << 20 and parse_bytes("1.5GiB") == int(1.5 * 2**30)


def test_training_size_stays_within_39_to_256_points_per_centroid():
    for n in (20_000, 1_000_000, 50_000_000):
        f = choose_factory(n, 128, 48 * n)  # a budget that forces IVF-PQ
        assert "IVF" in f and "PQ" in f
        k = int(f.split("IVF")[1].split("_")[0].split(",")[0])
        s = training_size(f, n, 128)
        assert min(n, 39 * k) <= s <= max(256 * k, 65_536)
    assert training_size("Flat", 10**6, 128) == 0
    assert training_size("IVF1024,PQ16", 10**6, 128, points_per_centroid=500) == 256 * 1024


def _stream(n, batch, dim=4):
    ids = np.arange(n, dtype=np.int64)
    X = np.repeat(ids[:, None], dim, axis=1).astype(np.float32)
    for i in range(0, n, batch):
        yield ids[i:i + batch], X[i:i + batch]


def test_reservoir_sample_is_uniform_and_independent_of_batching():
    a_ids, a_x = reservoir_sample(_stream(10_000, 333), 500, seed=3)
    b_ids, _ = reservoir_sample(_stream(10_000, 4096), 500, seed=3)
    assert len(np.unique(a_ids)) == 500 and (a_x[:, 0] == a_ids).all()
    # keys are drawn per row in stream order: the sample depends on the seed, not the batching
    np.testing.assert_array_equal(np.sort(a_ids), np.sort(b_ids))
    # uniform: over many seeds, each tenth of the stream gets ~10% of the sample
    counts = np.zeros(10)
    for seed in range(40):
        ids, _ = reservoir_sample(_stream(10_000, 1000), 200, seed=seed)
        counts += np.bincount(ids // 1000, minlength=10)
    expected = 40 * 200 / 10
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.9  # p = 0.001 for 9 degrees of freedom
    assert counts[0] < 1.2 * expected  # not the first rows


def test_sample_part_is_the_bottom_k_of_the_whole_stream_however_it_is_cut():
    from index_builder.train import sample_keys, sample_part

    keys = sample_keys(np.arange(10_000, dtype=np.int64), 7)
    for size in (0, 1, 300, 5_000, 10_000, 20_000):
        want = np.sort(np.argsort(keys, kind="stable")[:size])
        for batch in (1_000, 4_096, 10_000):
            part = sample_part(_stream(10_000, batch), size, seed=7)
            assert (np.diff(part.keys) >= 0).all()               # smallest key first
            np.testing.assert_array_equal(np.sort(part.ids), want)
            assert (part.X[:, 0] == part.ids).all() and part.X.dtype == np.float32
    # batches of changing sizes (the buffer grows, then is cut), a small shard (no cut at all)
    sizes = [10, 5_000, 100, 3_000, 1_890]
    cuts = np.cumsum([0] + sizes)
    ids, X = np.arange(10_000, dtype=np.int64), np.repeat(np.arange(10_000.0)[:, None], 4, 1)
    uneven = [(ids[a:b], X[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    for size in (0, 300, 4_000):
        part = sample_part(iter(uneven), size, seed=7)
        np.testing.assert_array_equal(np.sort(part.ids),
                                      np.sort(np.argsort(keys, kind="stable")[:size]))
        assert (part.X[:, 0] == part.ids).all()
    small = sample_part(_stream(50, 20), 300, seed=7)
    assert len(small.ids) == 50 and len(small.X) == 50
    empty = sample_part(iter(()), 5, dim=4)
    assert empty.X.shape == (0, 4)
    with pytest.raises(ValueError, match="empty"):
        sample_part(iter(()), 5)


def test_quantisation_error_matches_numpy_reference():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(5000, 16)).astype(np.float32)
    index = train_index("IVF16,Flat", X)
    err = quantization_error(index, X[:500])
    cent = faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 16)
    assign = np.argmax(X[:500] @ cent.T, axis=1)  # inner-product coarse assignment
    ref = np.mean(np.sum((X[:500] - cent[assign]) ** 2, axis=1))
    assert err["coarse"] == pytest.approx(ref, rel=1e-4)
    assert err["reconstruction"] == pytest.approx(0.0, abs=1e-8)
    pq = train_index("PQ4x4", X)
    rec = pq.index.sa_decode(pq.index.sa_encode(X[:500]))
    assert quantization_error(pq, X[:500])["reconstruction"] == \
        pytest.approx(np.mean(np.sum((rec - X[:500]) ** 2, axis=1)), rel=1e-5)


def test_streamed_exact_knn_excluding_self_equals_numpy():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3000, 8)).astype(np.float32)
    ids = rng.integers(-2**62, 2**62, size=3000)  # signed ids, half negative, like stable ids
    q = np.arange(0, 3000, 150)
    D, I = exact_knn_stream(X[q], ((ids[i:i + 700], X[i:i + 700]) for i in range(0, 3000, 700)),
                            5, exclude=ids[q])
    S = X[q] @ X.T
    S[np.arange(len(q)), q] = -np.inf
    order = np.argsort(-S, axis=1)[:, :5]
    np.testing.assert_array_equal(I, ids[order])
    np.testing.assert_allclose(D, np.take_along_axis(S, order, 1), rtol=1e-5)
    assert recall_at(I, ids[order][:, :1], (1, 5)) == {"recall@1": 1.0, "recall@5": 1.0}


def test_tuning_picks_the_smallest_nprobe_that_reaches_the_target():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(8000, 16)).astype(np.float32)
    index = train_index("IVF64,Flat", X)
    index.add_with_ids(X, np.arange(8000))
    q = np.arange(0, 8000, 40)
    S = X[q] @ X.T
    S[np.arange(len(q)), q] = -np.inf
    true = np.argsort(-S, axis=1)[:, :10]
    params, r = tune_search_params(index, X[q], q, true, target=0.9, at=10)
    assert r["target_met"] and r["recall@10"] >= 0.9
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nprobe == params["nprobe"]
    if params["nprobe"] > 1:  # half the nprobe misses the target: it was the cheapest
        ivf.nprobe = params["nprobe"] // 2
        _, I = index.search(X[q], 11)
        found = np.array([[i for i in row if i != qq][:10] for row, qq in zip(I, q)])
        assert recall_at(found, true, (10,))["recall@10"] < 0.9


# --------------------------------------------------------------------------- PQ sizes FAISS takes

def shipped_dimensions() -> list[int]:
    """Every descriptor size the shipped models give: each backbone's default taps, REMAP's
    default taps (the stride-16 stage + head, else the last two), any single tap, and the
    whitening sizes used here (256 default; 100, 255, 1000 arbitrary)."""
    from remap_core.descriptor.backbones import BACKBONES

    dims = {256, 100, 255, 1000}
    for entry in BACKBONES.values():
        spec = entry.spec
        dims.add(sum(spec.channels[t] for t in spec.default_taps))
        two = ["stage5", "head"] if {"stage5", "head"} <= set(spec.taps) else spec.taps[-2:]
        dims.add(sum(spec.channels[t] for t in two))
        dims.update(c for c in spec.channels.values() if c >= 64)
    return sorted(dims)


def faiss_bytes(index: faiss.Index, n: int) -> int:
    """Memory of `index` holding n vectors, from FAISS's own sizes: codes + 8-byte ids per vector,
    coarse centroids (+ HNSW links), PQ codebooks, rotation matrices."""
    total = 0
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            total += 4 * vt.d_in * vt.d_out
        index = faiss.downcast_index(index.index)
    links = 2 * 32 * 4 + 16  # HNSW32 node: 64 level-0 links, level + offset, ~1/31 upper links
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        q = faiss.downcast_index(ivf.quantizer)
        total += (ivf.code_size + 8) * n + 4 * q.d * ivf.nlist
        if isinstance(q, faiss.IndexHNSW):
            total += links * ivf.nlist
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
        if pq is not None:
            total += 4 * pq.M * pq.ksub * pq.dsub
        return total
    if isinstance(index, faiss.IndexHNSW):
        return total + (4 * index.d + links + 8) * n
    return total + 4 * index.d * n


@pytest.mark.parametrize("opq", [False, True])
def test_every_chosen_factory_is_one_faiss_makes_and_fits_the_budget(opq):
    dims = shipped_dimensions()
    assert {1280, 1392, 2048, 512, 256} <= set(dims)
    chosen = set()
    for dim in dims:
        for n in (20_000, 200_000, 1_000_000, 30_000_000, 10**9):
            raw = 4 * dim * n
            for budget in {int(raw * f) for f in (2, 1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005)} \
                    | {20 << 20, 100 << 20, 4 << 30}:
                try:
                    f = choose_factory(n, dim, budget, opq=opq)
                except ValueError as e:
                    assert "--max-index-memory" in str(e)
                    # refused only when even the smallest codes FAISS offers cannot fit
                    smallest = f"{ivf_part(nlist_for(n))},PQ4x8"
                    if dim % 4:
                        smallest = f"RR{dim + 4 - dim % 4},{smallest}"
                    assert faiss_bytes(faiss.index_factory(dim, smallest), n) > budget
                    continue
                index = faiss.index_factory(dim, f, faiss.METRIC_INNER_PRODUCT)  # accepted
                assert faiss_bytes(index, n) <= budget, (dim, n, budget, f)
                chosen.add(re.sub(r"[\d_x]+", "", f))  # e.g. "RR,IVFHNSW,PQ"
    # the grid reached every kind: exact, graph, IVF-Flat, PQ codes, rotations
    assert {"Flat", "HNSW", "IVFHNSW,Flat"} <= chosen
    assert {"OPQ,IVFHNSW,PQ"} <= chosen if opq else {"IVFHNSW,PQ", "RR,IVFHNSW,PQ"} <= chosen


def test_pq_sizes_divide_the_dimension_or_come_with_a_rotation():
    # budgets where 48-byte codes are the largest that fit: 48 divides neither 512 nor 1280
    assert choose_factory(200_000, 512, 18 << 20) == "IVF2048_HNSW32,PQ32x8"
    assert choose_factory(1_000_000, 1280, 90 << 20) == "IVF4096_HNSW32,PQ32x8"
    assert choose_factory(1_000_000, 1280, 100 << 20) == "IVF4096_HNSW32,PQ64x8"
    # 1400 = 8 x 175: PQ8 would keep a sixth of the affordable bytes; a random rotation
    # padded to 1440 = 30 x 48 keeps them (64-byte codes + a 1408-wide rotation do not fit)
    assert choose_factory(1_000_000, 1400, 100 << 20) == "RR1440,IVF4096_HNSW32,PQ48x8"
    assert choose_factory(1_000_000, 1400, 100 << 20, opq=True) == \
        "OPQ64_448,IVF4096_HNSW32,PQ64x8"


@pytest.mark.parametrize("dim,budget,expect", [(64, 150_000, "IVF32,PQ16x8"),
                                               (100, 300_000, "RR128,IVF32,PQ32x8")])
def test_a_chosen_pq_factory_trains_on_its_training_sample(dim, budget, expect):
    n = 2000
    f = choose_factory(n, dim, budget)
    assert f == expect
    X = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    size = training_size(f, n, dim)
    index = train_index(f, X[:size])
    index.add_with_ids(X, np.arange(n))
    assert index.is_trained and index.ntotal == n


def _recall_at_10(index, xq, X, nprobe):
    faiss.extract_index_ivf(index).nprobe = nprobe
    _, I = index.search(xq, 10)
    true = np.argsort(-(xq @ X.T), axis=1)[:, :10]
    return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, true)])


def test_two_level_kmeans_trains_large_list_counts_and_recalls_as_flat_kmeans(monkeypatch):
    from index_builder import train as train_module
    from index_builder.train import TWO_LEVEL_MIN_LISTS, coarse_training

    assert coarse_training(TWO_LEVEL_MIN_LISTS - 1) == "flat"
    assert coarse_training(TWO_LEVEL_MIN_LISTS) == coarse_training(131_072) == "two-level"
    X = clustered_vectors(60_000, 64, clusters=200, spread=1.5, seed=5)
    xq, base = X[:300], X[300:]
    flat = train_index("IVF1024,Flat", base, two_level=False)
    two = train_index("IVF1024,Flat", base, two_level=True)
    for index in (flat, two):
        index.add(base)
    # recall@10 against exact search within two points of flat k-means (measured here: 0.820
    # vs 0.775 at nprobe 4, 0.902 vs 0.896 at nprobe 16)
    for nprobe in (4, 16):
        r_flat, r_two = (_recall_at_10(i, xq, base, nprobe) for i in (flat, two))
        assert r_two >= r_flat - 0.02, (nprobe, r_flat, r_two)
    # above the threshold train_index takes two-level k-means by itself
    monkeypatch.setattr(train_module, "TWO_LEVEL_MIN_LISTS", 1024)
    auto = train_index("IVF1024,Flat", base)
    centroids = [faiss.extract_index_ivf(i).quantizer.reconstruct_n(0, 1024)
                 for i in (auto, two, flat)]
    np.testing.assert_array_equal(centroids[0], centroids[1])
    assert not np.array_equal(centroids[0], centroids[2])


def test_pq_codes_stop_at_the_default_code_size_unless_asked_for_more():
    # 5M x 256-D under the default 4 GB: 128-byte codes would fit (about 0.7 GB)
    n, dim, budget = 5_000_000, 256, 4 << 30
    k = nlist_for(n)
    assert ivf_pq_bytes(n, dim, k, 128) <= budget < 4 * dim * n
    assert choose_factory(n, dim, budget) == f"{ivf_part(k)},PQ{DEFAULT_CODE_BYTES}x8"
    assert DEFAULT_CODE_BYTES == 64
    assert choose_factory(n, dim, budget, code_bytes=128) == f"{ivf_part(k)},PQ128x8"
    assert choose_factory(n, dim, budget, code_bytes=32) == f"{ivf_part(k)},PQ32x8"
    assert choose_factory(n, dim, budget, opq=True, code_bytes=32).startswith("OPQ32_")
    # a cap between sizes takes the largest size under it; the budget still decides below it
    assert choose_factory(n, dim, budget, code_bytes=100) == f"{ivf_part(k)},PQ64x8"
    assert choose_factory(n, dim, ivf_pq_bytes(n, dim, k, 32), code_bytes=128) == \
        f"{ivf_part(k)},PQ32x8"
    # exact and graph indexes are not codes: the cap does not touch them
    assert choose_factory(500, 256, 1 << 30, code_bytes=4) == "Flat"
    with pytest.raises(ValueError, match="--code-bytes must be at least 4"):
        choose_factory(n, dim, budget, code_bytes=2)
