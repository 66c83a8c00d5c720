"""Benchmark: the coarse quantizer trained by flat k-means against two-level k-means
(faiss.contrib.clustering, what index_builder.train uses from TWO_LEVEL_MIN_LISTS lists on).

    python bench/kmeans.py --n 1000000 --dim 512 --nlist 16384
    python bench/kmeans.py --n 20000 --dim 64 --nlist 256           # a quick check

The same synthetic vectors (index_builder.synthetic.clustered_vectors), the same training
sample (index_builder.train.training_size points for the factory), one IVF{nlist},Flat index
per method: training seconds, then recall@10 of the IVF against exact search on --queries
held-out vectors at several nprobe (IVF-Flat, so the coarse quantizer alone decides recall).
Prints a Markdown table and a JSON line; --results appends the table to bench/RESULTS.md.
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


def main() -> None:
    import faiss

    from index_builder.recall import exact_knn_stream
    from index_builder.synthetic import clustered_vectors
    from index_builder.train import train_index, training_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--nlist", type=int, default=16_384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nprobe", default="8,32,128")
    ap.add_argument("--results", action="store_true", help="append the table to RESULTS.md")
    args = ap.parse_args()

    X = clustered_vectors(args.n + args.queries, args.dim, clusters=args.clusters, seed=0)
    xq, xb = X[:args.queries], X[args.queries:]
    factory = f"IVF{args.nlist},Flat"
    sample = xb[:training_size(factory, len(xb), args.dim)]
    blocks = ((np.arange(i, min(i + 100_000, len(xb))), xb[i:i + 100_000])
              for i in range(0, len(xb), 100_000))
    _, true = exact_knn_stream(xq, blocks, 10)
    probes = [int(p) for p in args.nprobe.split(",")]
    rows = []
    for method in ("flat", "two-level"):
        t0 = time.time()
        index = train_index(factory, sample, two_level=method == "two-level")
        seconds = time.time() - t0
        index.add(xb)
        recalls = {}
        for nprobe in probes:
            faiss.extract_index_ivf(index).nprobe = nprobe
            _, I = index.search(xq, 10)
            recalls[nprobe] = float(np.mean([len(set(a) & set(b)) / 10
                                             for a, b in zip(I, true)]))
        rows.append({"method": method, "train_seconds": round(seconds, 2),
                     "recall@10": recalls, "sample": len(sample)})
        del index
    head = (f"| vectors | nlist | k-means | sample | train | "
            + " | ".join(f"recall@10 nprobe {p}" for p in probes) + " |")
    lines = [head, "|" + " --- |" * (4 + len(probes) + 1)]
    for r in rows:
        lines.append(f"| {args.n:,} x {args.dim} | {args.nlist} | {r['method']} | "
                     f"{r['sample']:,} | {r['train_seconds']} s | "
                     + " | ".join(f"{r['recall@10'][p]:.3f}" for p in probes) + " |")
    table = "\n".join(lines)
    print(table)
    print(json.dumps({"n": args.n, "dim": args.dim, "nlist": args.nlist, "rows": rows,
                      "cpus": os.cpu_count(), "machine": platform.machine()}))
    if args.results:
        with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
            f.write(f"\n### Coarse k-means, flat vs two-level ({time.strftime('%Y-%m-%d')}, "
                    f"{os.cpu_count()} cores)\n\n{table}\n")


if __name__ == "__main__":
    main()
