"""`remap index`: build a FAISS index from an embedding store.

    remap index --embeddings STORE --output DIR            train, add, merge in one go
    remap index --embeddings STORE --output gs://b/idx     ... in a local staging folder, then
                                                           uploaded, manifest.json last
    remap index train --embeddings STORE --output DIR      sample + train the empty index
    remap index add   --embeddings STORE --output DIR      add new runs (parallel), apply deletes
    remap index merge --output DIR [--layout ...]          merge / keep shards, recall, manifest
"""

from __future__ import annotations

import argparse
import json


def _train_args(p, one_shot: bool = False) -> None:
    p.add_argument("--factory", default=None,
                   help="FAISS factory string, e.g. 'OPQ64_448,IVF4096_HNSW32,PQ64x8' (default: "
                        "chosen from the collection size and --max-index-memory, as autofaiss)")
    p.add_argument("--max-index-memory", default="4GB",
                   help="memory the searchable index may take (e.g. 100MB, 4GB); picks Flat, "
                        "HNSW, IVF-Flat or IVF-PQ/OPQ")
    p.add_argument("--train-sample", type=int, default=None,
                   help="training vectors, drawn uniformly at random across all shards (default: "
                        "50 per IVF centroid, within FAISS's 39-256)")
    p.add_argument("--code-bytes", type=int, default=None, metavar="B",
                   help="largest PQ code, bytes per vector, when PQ is chosen (default 64: 98.9 "
                        "%% of float mAP on the benchmark, against 99.9 %% at 128 for twice the "
                        "memory; see bench/RESULTS.md 'Compression'); the budget may pick less")
    p.add_argument("--opq", action="store_true",
                   help="when PQ is chosen, learn an OPQ rotation in front (better codes, "
                        "slower training)")


def _add_args(p) -> None:
    p.add_argument("--workers", type=int, default=None,
                   help="parallel processes adding shards (default: CPU count)")
    p.add_argument("--add-memory", default=None,
                   help="memory budget for all add workers together (lowers --workers)")


def _merge_args(p) -> None:
    p.add_argument("--layout", choices=("single", "ondisk", "shards"), default="single",
                   help="single: one index file; ondisk: IVF lists in a memory-mapped .ivfdata; "
                        "shards: keep one index per embedding shard, searched together")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="tune nprobe/efSearch to the cheapest setting reaching this recall@10")
    p.add_argument("--recall-queries", type=int, default=1000,
                   help="held-out queries for the recall measured into the manifest")
    p.add_argument("--qe", type=int, default=None, metavar="N",
                   help="alpha query expansion over the top N results (weights score ** 3) "
                        "that searches of this index apply by default (0: off; default 2: the "
                        "measured choice, +0.8 mAP on the benchmark and +2.2 on held-out views, "
                        "see bench/RESULTS.md 'Issue 12'); `remap search --qe 0` turns it off "
                        "for one search")
    p.add_argument("--refine", type=int, default=0, metavar="K",
                   help="re-rank K x k candidates on stored float16 vectors at search time "
                        "(refine.f16.npy beside the id map, memory-mapped by readers: 2 x "
                        "dimension bytes per vector on disk). For compressed codes (PQ) whose "
                        "recall stops rising with nprobe; recall is tuned with it. 0 (default): "
                        "off; 10 is a usual choice")


def _common(p, embeddings: bool = True, progress: bool = True) -> None:
    if embeddings:
        p.add_argument("--embeddings", required=True,
                       help="embedding store written by remap embed (local, gs://, s3://)")
    p.add_argument("--output", required=True, help="local index folder (steps resume in it)")
    p.add_argument("--seed", type=int, default=0)
    if progress:    # of the steps, only add shows progress bars
        p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_arguments(parser) -> None:
    # one-shot form (no subcommand): every option of the three steps
    parser.add_argument("--embeddings", help="embedding store written by remap embed")
    parser.add_argument("--output", help="index folder: local, or gs:// / s3:// (built in a "
                                         "local staging folder, then uploaded, manifest last)")
    parser.add_argument("--staging", default=None,
                        help="local folder to build in when --output is object storage "
                             "(default: a temporary folder, removed afterwards)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    _train_args(parser)
    _add_args(parser)
    _merge_args(parser)
    parser.add_argument("--dba", type=int, default=None, metavar="K",
                        help="database-side augmentation before indexing: each stored vector "
                             "becomes the score**3-weighted sum of itself and its K nearest "
                             "others (recorded in the manifest). Default: 2 when the "
                             "collection's float32 vectors take at most 2 GiB (2M at 256-D; "
                             "it holds them in memory about three times), none above; 0: off. "
                             "The neighbours are exact up to 50,000 vectors, found with an "
                             "IVF-Flat index above (recall measured and recorded). One-shot "
                             "build only: runs added later with `remap index add` are indexed "
                             "as embedded")
    sub = parser.add_subparsers(dest="step", metavar="STEP",
                                help="run one step (default: all three in order)")
    p = sub.add_parser("train", help="sample uniformly across all shards and train the index",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(p, progress=False)
    _train_args(p)
    p = sub.add_parser("add", help="add the shards of runs not yet in the index (parallel); "
                                   "remove re-embedded and deleted URIs")
    _common(p)
    _add_args(p)
    p = sub.add_parser("merge", help="merge or keep shards, measure recall, tune, write manifest")
    _common(p, embeddings=False, progress=False)
    _merge_args(p)


def check_args(args) -> None:
    """Refuse option values that cannot work, before any work is done."""
    from index_builder.rerank import check_rerank_counts
    from index_builder.train import parse_bytes

    if getattr(args, "max_index_memory", None) is not None:
        parse_bytes(args.max_index_memory, "--max-index-memory")
    if getattr(args, "add_memory", None) is not None:
        parse_bytes(args.add_memory, "--add-memory")
    for name in ("train_sample", "workers", "recall_queries"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    target = getattr(args, "target_recall", None)
    if target is not None and not 0 < target <= 1:
        raise ValueError(f"--target-recall must be in (0, 1], got {target}")
    if getattr(args, "code_bytes", None) is not None:
        from index_builder.train import check_code_bytes

        check_code_bytes(args.code_bytes)
    check_rerank_counts(**{name: getattr(args, name, None) for name in ("dba", "refine", "qe")})


def _code_bytes(args) -> dict:
    """{"code_bytes": B} when --code-bytes was given, else {} (the builder's default)."""
    return {} if getattr(args, "code_bytes", None) is None else {"code_bytes": args.code_bytes}


def main(args) -> int:
    from index_builder import log_to_stderr

    with log_to_stderr():   # index_builder's progress and summary lines, on stderr as before
        return _run(args)


def _run(args) -> int:
    from index_builder.build import add_step, build_index, merge_step, train_step
    from index_builder.publish import build_and_upload
    from remap_store.files import is_remote

    check_args(args)
    step = getattr(args, "step", None)
    progress = not args.no_progress
    if step is None:
        if not args.embeddings or not args.output:
            raise ValueError("give --embeddings STORE and --output DIR (or a step: "
                             "remap index train|add|merge --help)")

        def build(folder: str) -> dict:
            return build_index(args.embeddings, folder, args.factory, args.train_sample,
                               args.recall_queries, args.seed, args.max_index_memory,
                               args.layout, args.target_recall, args.workers, progress, args.opq,
                               args.add_memory, args.qe, args.dba, args.refine,
                               **_code_bytes(args))

        if is_remote(args.output):
            m, upload = build_and_upload(build, args.output, args.staging)
            print(json.dumps({**_summary(args.output, m), "uploaded_bytes": upload["bytes"]}))
        else:
            print(json.dumps(_summary(args.output, build(args.output))))
    elif step == "train":
        info = train_step(args.embeddings, args.output, args.factory, args.max_index_memory,
                          args.train_sample, seed=args.seed, opq=args.opq,
                          **_code_bytes(args))
        print(json.dumps({"index": args.output, "step": "train", "factory": info["factory"],
                          "training_sample": info["training_sample"],
                          "quantization_error": info["quantization_error"],
                          "seconds": info["seconds"]}))
    elif step == "add":
        s = add_step(args.embeddings, args.output, args.workers, args.add_memory,
                     seed=args.seed, progress=progress)
        print(json.dumps({"index": args.output, "step": "add", **s}))
    else:
        m = merge_step(args.output, args.layout, args.target_recall,
                       recall_queries=args.recall_queries, seed=args.seed, qe=args.qe,
                       refine=args.refine)
        print(json.dumps(_summary(args.output, m)))
    return 0


def _summary(output: str, m: dict) -> dict:
    recall = {k: v for k, v in m["recall"].items() if k.startswith("recall@")}
    return {"index": output, "vectors": m["num_vectors"], "model": m["model"],
            "factory": m["factory"], "layout": m["layout"], "search_params": m["search_params"],
            "recall": recall, "seconds": m["build_seconds"]}
