"""Benchmark: the all-kNN that database-side augmentation needs (`remap index`'s default DBA),
exact against the IVF-Flat search `index_builder.knn` uses above knn.EXACT_MAX vectors.

    python bench/dba_knn.py --sizes 50000,200000 --approx-only 1000000 --dim 256

For each size n, n clustered synthetic vectors (index_builder.synthetic, like descriptors:
neighbourhoods exist) are drawn and their 2 nearest other vectors found both ways in the same
process: exact (knn.exact_nearest_others, FAISS brute force) and approximate
(knn.approximate_nearest_others: training, adding, choosing nprobe on the recall sample and
searching included). Reports seconds of
each, their ratio, the approximate search's recall@2 against the exact result over all n rows,
and the recall the build records (estimated on knn.RECALL_SAMPLE rows). `--approx-only` sizes run
only the approximate search (exact all-kNN there takes hours on 2 cores): their recall is the
sampled estimate. Peak RSS (ru_maxrss) is reported once at the end: the largest size's.

Prints one JSON line per size ({"bench": "dba_knn", ...}).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_output import write_json_lines  # noqa: E402


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="50000,200000", help="sizes timed both ways")
    ap.add_argument("--approx-only", default="", help="sizes timed with the IVF search only")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--clusters", type=int, default=None,
                    help="synthetic clusters (default n // 20: ~20 vectors around each centre)")
    ap.add_argument("--output", default=None, help="append the JSON lines to this file")
    args = ap.parse_args(argv)

    import faiss

    from index_builder.knn import (approximate_nearest_others, exact_nearest_others,
                                   neighbour_recall)
    from index_builder.synthetic import clustered_vectors

    runs = [(int(s), True) for s in args.sizes.split(",") if s.strip()]
    runs += [(int(s), False) for s in args.approx_only.split(",") if s.strip()]
    reports = []
    for n, both in runs:
        x = clustered_vectors(n, args.dim, clusters=args.clusters or max(1, n // 20), seed=0)
        load0 = os.getloadavg()[0]
        t = time.time()
        nn, _, info = approximate_nearest_others(x, args.k, seed=0)
        t_approx = time.time() - t
        r = {"bench": "dba_knn", "n": n, "dim": args.dim, "k": args.k,
             "approx_seconds": round(t_approx, 2), "approx_factory": info["factory"],
             "nprobe": info["nprobe"], "recall_by_nprobe": info["recall_by_nprobe"],
             "recall_sampled": info[f"recall@{args.k}"],
             "recall_sample_rows": info["recall_sample"]}
        if both:
            t = time.time()
            truth, _ = exact_nearest_others(x, args.k)
            t_exact = time.time() - t
            r.update(exact_seconds=round(t_exact, 2),
                     exact_over_approx=round(t_exact / t_approx, 2),
                     recall_all_rows=round(neighbour_recall(nn, truth), 4))
        r.update(load_avg_1m=[round(load0, 2), round(os.getloadavg()[0], 2)],
                 peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                    2),
                 machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                         f"faiss {faiss.__version__}, omp threads {faiss.omp_get_max_threads()}",
                 command="python bench/dba_knn.py " + " ".join(sys.argv[1:] if argv is None
                                                               else argv))
        print(json.dumps(r), flush=True)
        if args.output:
            write_json_lines(args.output, [r], mode="a")
        reports.append(r)
        del x, nn
    return reports


if __name__ == "__main__":
    main()
