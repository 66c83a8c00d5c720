"""Benchmark: query latency of the library and of `remap serve`, with recall against exact search.

    python bench/query_latency.py --n 1000000 --dim 256 --factory IVF4096,PQ64 \
        --queries 2000 --clients 4 --requests 4000

1. a synthetic store of n clustered vectors (index_builder.synthetic) is indexed with `remap
   index` (--factory: 64-byte codes by default; nprobe tuned to --target-recall), unless
   --index names a built one;
2. library: open_index (open seconds, RSS before/after), then one query at a time: p50/p99
   latency and queries/s, recall@10 of those queries against exact search (faiss IndexFlatIP
   over the same vectors; queries are held-out vectors of the same distribution): recall@10 is
   the share of the exact top 10 found in the top 10, 1-recall@10 (what the index manifest
   records) whether the exact nearest is among them. These searches ask for no query
   expansion (qe=0): they measure the ANN index. When the index re-ranks by default (alpha-QE,
   manifest `rerank`), the same queries are timed again as a caller gets them by default
   (`with_index_rerank`);
3. HTTP: `remap serve` as a subprocess on 127.0.0.1, --clients threads sending --requests
   POST /search with JSON vectors (k=10) in total, with the index's default re-ranking: p50/p99
   latency, queries/s, errors (must be 0), the server's RSS after the load.

Prints one JSON line. RSS is VmRSS from /proc (Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


def build(args, work: str) -> tuple[str, np.ndarray, np.ndarray]:
    """-> (index folder, indexed vectors (n, d), held-out queries (q, d))."""
    from index_builder.synthetic import clustered_vectors, synthetic_uris, write_run
    from remap_cli import main as remap

    X = clustered_vectors(args.n + args.queries, args.dim, clusters=args.clusters, seed=0)
    X, xq = X[:args.n], X[args.n:]
    store, index = os.path.join(work, "store"), os.path.join(work, "index")
    if not os.path.exists(os.path.join(index, "manifest.json")):
        t = time.time()
        write_run(store, "20260101T000000Z-bench0", synthetic_uris(args.n), X,
                  shards=args.shards)
        print(f"store written in {time.time() - t:.1f}s", file=sys.stderr)
        # --dba 0: recall is measured against exact search over the embeddings themselves
        argv = ["index", "--embeddings", store, "--output", index, "--no-progress",
                "--target-recall", str(args.target_recall), "--recall-queries", "1000",
                "--dba", "0"]
        if args.factory:
            argv += ["--factory", args.factory]
        if args.refine:
            argv += ["--refine", str(args.refine)]
        if remap(argv) != 0:
            raise SystemExit("remap index failed")
    return index, X, xq


def library(index: str, X: np.ndarray, xq: np.ndarray, k: int) -> dict:
    import faiss

    from index_builder.search import open_index

    before = rss_bytes()
    t = time.perf_counter()
    idx = open_index(index)
    open_s = time.perf_counter() - t
    after_open = rss_bytes()
    faiss.omp_set_num_threads(1)
    lat, found = [], []
    for q in xq:            # the ANN search itself: no query expansion (recall vs exact)
        t = time.perf_counter()
        hits = idx.search_vectors(q[None, :], k, qe=0)[0]
        lat.append(time.perf_counter() - t)
        found.append([h.id for h in hits])
    wall = sum(lat)
    rerank = idx.manifest.get("rerank") or {}
    default_lat = []
    if rerank.get("qe"):    # what a caller gets by default: the index's re-ranking on top
        for q in xq:
            t = time.perf_counter()
            idx.search_vectors(q[None, :], k)
            default_lat.append(time.perf_counter() - t)
    exact = faiss.IndexFlatIP(X.shape[1])
    exact.add(X)
    _, true = exact.search(xq, k)
    ids = np.asarray(idx.id_map.ids)   # positions of X are synthetic_uris order -> stable ids
    from index_builder.synthetic import synthetic_uris
    from remap_store.schema import stable_ids

    id_of_row = stable_ids(synthetic_uris(len(X)))
    recall = np.mean([len(set(f) & set(id_of_row[t].tolist())) / k
                      for f, t in zip(found, true)])
    nn_found = np.mean([id_of_row[t[0]] in f for f, t in zip(found, true)])
    return {"open_s": round(open_s, 3), "rss_before_open_mb": round(before / 2**20, 1),
            "rss_after_open_mb": round(after_open / 2**20, 1),
            "rss_open_growth_mb": round((after_open - before) / 2**20, 1),
            "id_map_mmap": isinstance(idx.id_map.ids, np.memmap), "ids": int(len(ids)),
            "queries": len(xq), "qps": round(len(xq) / wall, 1), **percentiles(lat),
            f"recall@{k}": round(float(recall), 4),   # |approx top-k & exact top-k| / k
            f"1-recall@{k}": round(float(nn_found), 4),  # the true nearest is in the top k
            "search_params": idx.manifest.get("search_params"),
            "factory": idx.factory, "index_bytes": sum(e["bytes"] for e in
                                                       idx.manifest["index_files"]),
            "with_index_rerank": {"rerank": rerank, **(
                {"qps": round(len(xq) / sum(default_lat), 1), **percentiles(default_lat)}
                if default_lat else {"note": "the index re-ranks nothing by default"})}}


def http(index: str, xq: np.ndarray, k: int, clients: int, requests: int) -> dict:
    import httpx

    from objectstore import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "remap_cli", "serve", "--index", index,
                               "--port", str(port)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t = time.time()
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.time() - t > 600:
                raise SystemExit(f"remap serve did not become ready: {server.stderr.read()}")
            time.sleep(0.2)
        ready_s = time.time() - t
        bodies = [json.dumps({"vectors": [q.tolist()], "k": k}).encode() for q in xq]
        lat, errors, lock = [], [], threading.Lock()
        per_client = [requests // clients + (c < requests % clients) for c in range(clients)]

        def client(c: int) -> None:
            mine, bad = [], []
            with httpx.Client(timeout=30, headers={"content-type": "application/json"}) as h:
                for i in range(per_client[c]):
                    body = bodies[(c * 7919 + i) % len(bodies)]
                    t0 = time.perf_counter()
                    try:
                        r = h.post(f"{url}/search", content=body)
                        ok = r.status_code == 200
                    except httpx.HTTPError as e:
                        ok, r = False, e
                    mine.append(time.perf_counter() - t0)
                    if not ok:
                        bad.append(str(getattr(r, "status_code", r)))
            with lock:
                lat.extend(mine)
                errors.extend(bad)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        server_rss = rss_bytes(server.pid)
        return {"clients": clients, "requests": requests, "errors": len(errors),
                "error_samples": errors[:5], "qps": round(requests / wall, 1),
                **percentiles(lat), "ready_s": round(ready_s, 2),
                "server_rss_mb": round(server_rss / 2**20, 1)}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="indexed vectors")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--factory", default="IVF4096,PQ64",
                    help="FAISS factory (default: 64-byte PQ codes); '' lets remap choose")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--refine", type=int, default=0,
                    help="remap index --refine K: re-rank K x k candidates on stored vectors")
    ap.add_argument("--queries", type=int, default=2000, help="held-out library queries")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    ap.add_argument("--requests", type=int, default=4000, help="HTTP requests in all")
    ap.add_argument("--work", default=None, help="working folder kept between runs (default: "
                                                 "a temporary one)")
    args = ap.parse_args()
    os.environ.setdefault("REMAP_INDEX_CACHE", os.path.join(tempfile.gettempdir(),
                                                            "remap-bench-cache"))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="remap-bench-") as tmp:
        work = args.work or tmp
        index, X, xq = build(args, work)
        lib = library(index, X, xq, args.k)
        del X
        web = http(index, xq, args.k, args.clients, args.requests)
    print(json.dumps({"bench": "query_latency", "n": args.n, "dim": args.dim,
                      "library": lib, "http": web,
                      "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                  "processor": platform.processor() or platform.machine()},
                      "seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
