"""Benchmark: remap's index build against autofaiss on the same vectors and memory budget.

    python bench/index_build.py --n 1000000 --dim 512 --max-index-memory 100MB
    python bench/index_build.py --embeddings STORE            # real embeddings of `remap embed`

Each builder runs as its own subprocess (autofaiss in its own venv, default .bench-venv, made by
`python -m venv .bench-venv && .bench-venv/bin/pip install autofaiss psutil "pyarrow<18"
faiss-cpu==1.11.0`: autofaiss 2.18 needs numpy 1.26 / faiss-cpu 1.11), its peak memory is the largest summed RSS of its process tree
(polled every 0.2 s). Both indexes are then evaluated here, in one process, on the same 1000
leave-one-out queries (database vectors whose own id is excluded) against exact search:
1-recall@10 (is the true nearest neighbour among the first 10), queries per second with each
builder's own chosen search parameters, bytes per vector of the index file(s).
Prints a Markdown table and a JSON line; --results appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

AUTOFAISS_SCRIPT = r"""
import json, sys, time
from autofaiss import build_index
emb, out, infos, budget = sys.argv[1:5]
t = time.time()
build_index(embeddings=emb, index_path=out, index_infos_path=infos, max_index_memory_usage=budget,
            current_memory_available="16G", metric_type="ip", save_on_disk=True, verbose=30)
print(json.dumps({"seconds": time.time() - t}))
"""

REMAP_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[5])
from index_builder.build import build_index
store, out, budget, layout, _, opq, refine = sys.argv[1:8]
t = time.time()
# dba=0: the index of the embeddings themselves, as autofaiss builds it (no augmentation)
m = build_index(store, out, max_index_memory=budget, layout=layout, recall_queries=1000,
                progress=False, opq=opq == "opq", refine=int(refine), dba=0)
print(json.dumps({"seconds": time.time() - t, "factory": m["factory"]}))
"""


def run_measured(cmd: list[str], log_path: str) -> dict:
    """Run `cmd`, polling the summed RSS of its process tree -> {seconds, peak_rss_bytes, rc,
    stdout_tail}."""
    import psutil

    started = time.time()
    with open(log_path, "w") as log:
        # passive OpenMP waits for both builders: spinning threads starve on a shared machine
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss
                                                 for c in ps.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.2)
        out = proc.stdout.read()
    return {"seconds": time.time() - started, "peak_rss_bytes": peak, "rc": proc.returncode,
            "load_average_after": round(os.getloadavg()[0], 1),
            "stdout": out.strip().splitlines()[-1] if out.strip() else ""}


def leave_one_out_truth(X: np.ndarray, nq: int, seed: int = 123):
    """Query rows, and the exact nearest other row of each (inner product)."""
    import faiss

    rng = np.random.default_rng(seed)
    rows = rng.choice(len(X), nq, replace=False)
    _, I = faiss.knn(X[rows], X, 2, metric=faiss.METRIC_INNER_PRODUCT)
    nn = np.where(I[:, 0] == rows, I[:, 1], I[:, 0])
    return rows, nn


def evaluate(index, xq: np.ndarray, q_ids: np.ndarray, nn_ids: np.ndarray, k: int = 10) -> dict:
    """1-recall@1/@10 excluding the query itself, and queries per second (all threads)."""
    t = time.perf_counter()
    _, I = index.search(xq, k + 1)
    qps = len(xq) / (time.perf_counter() - t)
    r1, r10 = [], []
    for q in range(len(xq)):
        row = [i for i in I[q] if i != q_ids[q]][:k]
        r1.append(bool(row) and row[0] == nn_ids[q])
        r10.append(nn_ids[q] in row)
    return {"recall@1": float(np.mean(r1)), "recall@10": float(np.mean(r10)), "qps": qps}


def write_store(store: str, X: np.ndarray, shards: int) -> list[str]:
    from index_builder.synthetic import synthetic_uris, write_run

    uris = synthetic_uris(len(X))
    write_run(store, "20260101T000000Z-bench0", uris, X, shards=shards)
    return uris


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--embeddings", default=None, help="a real embedding store instead")
    ap.add_argument("--max-index-memory", default="100MB")
    ap.add_argument("--layout", default="single")
    ap.add_argument("--opq", action="store_true", help="let remap put OPQ in front of PQ")
    ap.add_argument("--refine", type=int, default=0,
                    help="remap index --refine K: re-rank K x k candidates on stored float16 "
                         "vectors (their file is counted in bytes/vector on disk, not in RAM)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--work", default=None, help="working folder (default: a temp dir)")
    ap.add_argument("--bench-venv", default=os.path.join(ROOT, ".bench-venv"))
    ap.add_argument("--skip-autofaiss", action="store_true")
    ap.add_argument("--results", action="store_true", help="append the table to RESULTS.md")
    ap.add_argument("--latency", action="store_true",
                    help="also time queries on the remap index in each layout (single, shards, "
                         "ondisk)")
    args = ap.parse_args(argv)
    try:    # before the vectors are made: a 10M run spends minutes on them
        import psutil  # noqa: F401
    except ImportError:
        sys.exit("bench/index_build.py measures peak memory with psutil: pip install -e '.[bench]'")

    import faiss

    from index_builder.embeddings import iter_shard_batches, list_runs
    from index_builder.search import open_index
    from index_builder.synthetic import clustered_vectors

    work = args.work or tempfile.mkdtemp(prefix="bench-index-")
    os.makedirs(work, exist_ok=True)
    t = time.time()
    if args.embeddings:
        store = args.embeddings
        ids, X = [], []
        for run in list_runs(store):
            for p in run.shard_paths:
                for i, x, _ in iter_shard_batches(p, with_uris=False):
                    ids.append(i)
                    X.append(x)
        ids, X = np.concatenate(ids), np.concatenate(X)
        data = f"real embeddings {store}"
    else:
        store = os.path.join(work, "store")
        X = clustered_vectors(args.n, args.dim, clusters=args.clusters, seed=0)
        if not os.path.exists(os.path.join(store, "run-20260101T000000Z-bench0", "run.json")):
            write_store(store, X, args.shards)
        from remap_store.schema import stable_ids
        from index_builder.synthetic import synthetic_uris

        ids = stable_ids(synthetic_uris(len(X)))
        data = f"synthetic clustered ({args.clusters} clusters), {args.shards} Parquet shards"
    n, dim = X.shape
    print(f"data: {n} x {dim} ({data}), prepared in {time.time() - t:.0f}s", file=sys.stderr)

    rows, nn = leave_one_out_truth(X, min(args.queries, n - 1))
    xq = X[rows].copy()
    results = {}
    emb_dir = os.path.join(work, "npy")
    if not args.skip_autofaiss and not os.path.exists(os.path.join(emb_dir, "part0.npy")):
        os.makedirs(emb_dir, exist_ok=True)
        np.save(os.path.join(emb_dir, "part0.npy"), X)
    del X  # the builders read their own copies: at 10M x 256 this holds 10 GB otherwise

    # ---- remap
    out = os.path.join(work, "remap-index")
    r = run_measured([sys.executable, "-c", REMAP_SCRIPT, store, out, args.max_index_memory,
                      args.layout, ROOT, "opq" if args.opq else "pq", str(args.refine)],
                     os.path.join(work, "remap.log"))
    if r["rc"] != 0:
        print(open(os.path.join(work, "remap.log")).read()[-3000:], file=sys.stderr)
        raise SystemExit("remap build failed")
    idx = open_index(out)
    m = idx.manifest
    ev = evaluate(idx.index, xq, ids[rows], ids[nn])
    index_bytes = sum(e["bytes"] for e in m["index_files"])
    refine = m.get("refine") or {"k_factor": 0, "file": {"bytes": 0}}
    results["remap"] = {**r, **ev, "factory": m["factory"], "params": m["search_params"],
                        "refine": refine["k_factor"],
                        "refine_bytes_per_vector": refine["file"]["bytes"] / n,
                        "index_bytes": index_bytes, "bytes_per_vector": index_bytes / n,
                        "manifest_recall@10": m["recall"].get("recall@10")}
    print(f"remap: {results['remap']}", file=sys.stderr)
    del idx

    # ---- autofaiss
    if not args.skip_autofaiss:
        py = os.path.join(args.bench_venv, "bin", "python")
        if not os.path.exists(py):
            results["autofaiss"] = {"error": f"no autofaiss venv at {args.bench_venv}"}
        else:
            af_index = os.path.join(work, "autofaiss.index")
            af_infos = os.path.join(work, "autofaiss_infos.json")
            r = run_measured([py, "-c", AUTOFAISS_SCRIPT, emb_dir, af_index, af_infos,
                              args.max_index_memory], os.path.join(work, "autofaiss.log"))
            if r["rc"] != 0:
                results["autofaiss"] = {"error": open(os.path.join(work, "autofaiss.log"))
                                        .read()[-1500:]}
            else:
                infos = json.load(open(af_infos))
                index = faiss.read_index(af_index)
                if infos.get("index_param"):
                    faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
                ev = evaluate(index, xq, rows, nn)  # autofaiss ids are row numbers
                results["autofaiss"] = {**r, **ev, "factory": infos.get("index_key"),
                                        "params": infos.get("index_param"),
                                        "index_bytes": os.path.getsize(af_index),
                                        "bytes_per_vector": os.path.getsize(af_index) / n}
            print(f"autofaiss: {results['autofaiss']}", file=sys.stderr)

    if not args.embeddings:
        shard_bytes = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(store)
                          for f in fs if f.endswith(".parquet"))
        results["remap"]["parquet_bytes_per_vector"] = shard_bytes / n
    latency = latency_by_layout(out, xq) if args.latency else []
    table = markdown_table(results, n, dim, data, args.max_index_memory)
    if latency:
        table += "\n\n| layout | index files | search params | recall@10 | ms/query (1 thread) " \
                 "| queries/s (batch 1000) | index bytes |\n| --- | --- | --- | --- | --- | --- | --- |\n"
        table += "\n".join(f"| {r['layout']} | {r['index_files']} | `{r['params']}` | "
                           f"{r['recall@10']:.3f} | {r['ms_per_query_1thread']:.2f} | "
                           f"{r['qps_batch']:,.0f} | {r['bytes']:,} |" for r in latency)
    print(table)
    print(json.dumps({"n": n, "dim": dim, "budget": args.max_index_memory, "results": results,
                      "latency": latency}, default=str))
    if args.results:
        with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
            f.write("\n" + table + "\n")
    return 0


def latency_by_layout(folder: str, xq: np.ndarray, layouts=("single", "shards", "ondisk")) -> list:
    """Re-publish a built remap index in each layout; per-query latency (one query per call,
    one FAISS thread, and batches of 1000 with all threads), with the tuned parameters."""
    import faiss

    from index_builder.build import merge_step
    from index_builder.search import open_index

    out = []
    threads = faiss.omp_get_max_threads()
    for layout in layouts:
        m = merge_step(folder, layout=layout, recall_queries=len(xq))
        idx = open_index(folder)
        parts = len(m["index_files"]) if layout == "shards" else 1
        faiss.omp_set_num_threads(1)
        t = time.perf_counter()
        for q in xq[:200]:
            idx.index.search(q[None, :], 10)
        single_ms = (time.perf_counter() - t) / 200 * 1000
        faiss.omp_set_num_threads(threads)
        t = time.perf_counter()
        idx.index.search(xq, 10)
        batch_qps = len(xq) / (time.perf_counter() - t)
        out.append({"layout": layout, "index_files": parts, "params": m["search_params"],
                    "recall@10": m["recall"]["recall@10"], "ms_per_query_1thread": single_ms,
                    "qps_batch": batch_qps,
                    "bytes": sum(e["bytes"] for e in m["index_files"])})
        print(f"latency: {out[-1]}", file=sys.stderr)
    return out


def markdown_table(results: dict, n: int, dim: int, data: str, budget: str) -> str:
    lines = [f"{n:,} x {dim} float32, {data}; memory budget {budget}; "
             f"{os.cpu_count()} cores ({platform.machine()}), {time.strftime('%Y-%m-%d')}", "",
             "| builder | index chosen | search params | build time | peak RSS | bytes/vector "
             "| recall@1 | recall@10 | queries/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:120]!r} | | | | | | | |")
            continue
        refine = (f" + refine x{r['refine']} ({r['refine_bytes_per_vector']:.0f} B/vector float16 "
                  f"on disk, memory-mapped)" if r.get("refine") else "")
        lines.append(f"| {name} | `{r['factory']}`{refine} | `{r['params']}` | {r['seconds']:.0f} s | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['bytes_per_vector']:.1f} | "
                     f"{r['recall@1']:.3f} | {r['recall@10']:.3f} | {r['qps']:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
