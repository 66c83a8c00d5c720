"""Benchmark: how wide the HNSW graph over the IVF centroids is searched when vectors are *added*
(assigned to their inverted list), against recall and add time.

From 1,000 lists on, `index_builder.train` puts an HNSW32 graph over the coarse centroids
(`IVF{k}_HNSW32,...`). Search tunes the graph's efSearch with nprobe (`recall.py`), but a vector
is assigned to a list when it is added, with the graph's efSearch as it stands then: FAISS's
default is 16. A vector assigned to a list other than its nearest centroid's is found only by
probing that list, however wide the search.

One IVF{k}_HNSW32,Flat index (Flat codes, so the coarse quantizer alone decides recall), trained
once on the same synthetic vectors as bench/kmeans.py; then for each add-time efSearch, emptied,
filled again and timed: the fraction of vectors in the same list as exact assignment (a flat
search over the centroids), and recall@10 against exact search on --queries held-out vectors at
several nprobe (search-time quantizer efSearch as `recall.py` sets it). The first row (16,
FAISS's default) is the in-process baseline.

    python bench/ivf_assignment.py --n 1000000 --dim 256            # 4,096 lists, as remap index
    python bench/ivf_assignment.py --n 20000 --dim 64 --nlist 1024  # a quick check

Prints a Markdown table and one JSON line per row, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_output import finish  # noqa: E402


def main(argv=None) -> list[dict]:
    import faiss

    from index_builder.recall import exact_knn_stream, parameter_grid
    from index_builder.synthetic import clustered_vectors
    from index_builder.train import nlist_for, train_index, training_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (default: as remap index)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--add-ef", default="16,32,64,128,256",
                    help="add-time quantizer efSearch values; the first is the baseline")
    ap.add_argument("--nprobe", default="1,4,16,64")
    ap.add_argument("--output", help="also write the JSON lines here")
    args = ap.parse_args(argv)

    t_start = time.time()
    X = clustered_vectors(args.n + args.queries, args.dim, clusters=args.clusters, seed=0)
    xq, xb = X[:args.queries], X[args.queries:]
    nlist = args.nlist or nlist_for(len(xb))
    factory = f"IVF{nlist}_HNSW32,Flat"
    sample = xb[:training_size(factory, len(xb), args.dim)]
    t0 = time.time()
    index = train_index(factory, sample)
    train_seconds = time.time() - t0
    ivf = faiss.extract_index_ivf(index)
    hnsw = faiss.downcast_index(ivf.quantizer)
    centroids = hnsw.storage.reconstruct_n(0, nlist)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(centroids)
    exact_list = np.concatenate([flat.search(xb[i:i + 100_000], 1)[1][:, 0]
                                 for i in range(0, len(xb), 100_000)])
    blocks = ((np.arange(i, min(i + 100_000, len(xb))), xb[i:i + 100_000])
              for i in range(0, len(xb), 100_000))
    _, true = exact_knn_stream(xq, blocks, 10)
    probes = [int(p) for p in args.nprobe.split(",")]
    grid = {g["nprobe"]: g for g in parameter_grid(index)}
    ids = np.arange(len(xb), dtype=np.int64)
    rows, seconds = [], []
    for ef in [int(e) for e in args.add_ef.split(",")]:
        index.reset()
        hnsw.hnsw.efSearch = ef
        t0 = time.time()
        index.add_with_ids(xb, ids)
        add_seconds = time.time() - t0
        seconds.append(add_seconds)
        assigned = np.empty(len(xb), np.int64)
        for lst in range(nlist):
            n = ivf.invlists.list_size(lst)
            if n:
                got = faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), n)
                assigned[np.array(got, copy=True)] = lst
        recalls = {}
        for p in probes:
            params = grid.get(p, {"nprobe": p})
            for name, value in params.items():
                faiss.ParameterSpace().set_index_parameter(index, name, value)
            _, found = index.search(xq, 10)
            recalls[p] = round(float(np.mean([len(set(a) & set(b)) / 10
                                              for a, b in zip(found, true)])), 4)
        row = {"add_ef": ef, "add_seconds": round(add_seconds, 1),
               "exact_list_share": round(float(np.mean(assigned == exact_list)), 4),
               "recall@10": recalls}
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = rows[0]
    for r, s in zip(rows, seconds):          # from the unrounded times: a small run adds in < 0.1 s
        r["add_time_ratio"] = round(s / max(seconds[0], 1e-9), 2)
    probes_head = " | ".join(f"recall@10 nprobe {p}" for p in probes)
    lines = [f"| add efSearch | add time | vs {base['add_ef']} | in the exact list | "
             f"{probes_head} |", "|" + " --- |" * (4 + len(probes))]
    for r in rows:
        lines.append(f"| {r['add_ef']} | {r['add_seconds']} s | {r['add_time_ratio']}x | "
                     f"{r['exact_list_share']:.4f} | "
                     + " | ".join(f"{r['recall@10'][p]:.4f}" for p in probes) + " |")
    print("\n".join(lines), file=sys.stderr)
    summary = {"bench": "ivf_assignment", "n": len(xb), "dim": args.dim, "nlist": nlist,
               "factory": factory, "train_seconds": round(train_seconds, 1), "rows": rows,
               "search_params": {p: grid.get(p, {"nprobe": p}) for p in probes},
               "machine": f"{platform.machine()} {os.cpu_count()} cores",
               "threads": faiss.omp_get_max_threads(),
               "load_avg_1m": round(os.getloadavg()[0], 2),
               "seconds": round(time.time() - t_start, 1)}
    finish(summary, rows, args.output)
    return rows


if __name__ == "__main__":
    main()
