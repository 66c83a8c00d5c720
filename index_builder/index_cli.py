"""`remap index`: build a FAISS index from an embedding store."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("--embeddings", required=True, help="embedding store written by remap embed")
    parser.add_argument("--output", required=True, help="index folder (local, gs://, s3://)")
    parser.add_argument("--factory", default="Flat",
                        help="FAISS factory string (default Flat: exact inner product)")
    parser.add_argument("--train-sample", type=int, default=100_000,
                        help="vectors sampled uniformly at random to train codebooks")
    parser.add_argument("--recall-queries", type=int, default=1000,
                        help="held-out queries for the recall measured into the manifest")
    parser.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    from .build import build_index

    m = build_index(args.embeddings, args.output, args.factory, args.train_sample,
                    args.recall_queries, args.seed)
    print(json.dumps({"index": args.output, "vectors": m["num_vectors"], "model": m["model"],
                      "factory": m["factory"], "recall": m["recall"],
                      "seconds": m["build_seconds"]}))
    return 0
