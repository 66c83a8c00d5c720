"""`remap search --index DIR [--k N] [--format table|json] IMAGE...`"""

from __future__ import annotations

import json
import sys


def add_arguments(parser) -> None:
    parser.add_argument("--index", required=True, help="built index folder (local, gs://, s3://)")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--model", default="manifest",
                        help="query model checkpoint (default: the one recorded in the index)")
    parser.add_argument("--vectors", default=None,
                        help="a .npy file of (Q, D) query vectors instead of images")
    parser.add_argument("--denoise", action="store_true", help="median-filter query images")
    parser.add_argument("--autocontrast", action="store_true", help="stretch query contrast")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checksum verification of the index files")
    parser.add_argument("images", nargs="*", help="query image paths or URLs")


def main(args) -> int:
    from .search import open_index

    if not args.images and not args.vectors:
        print("remap search: error: give query IMAGE paths or --vectors FILE.npy", file=sys.stderr)
        return 2
    idx = open_index(args.index, verify=not args.no_verify)
    if args.vectors:
        import numpy as np

        vecs = np.load(args.vectors)
        names = [f"{args.vectors}[{i}]" for i in range(len(np.atleast_2d(vecs)))]
        results = idx.search_vectors(vecs, args.k)
    else:
        names = list(args.images)
        model = None if args.model in ("default", "none") else args.model
        results = idx.search_images(names, args.k, model_uri=model, denoise=args.denoise,
                                    autocontrast=args.autocontrast)
    for name, hits in zip(names, results):
        if args.format == "json":
            print(json.dumps({"query": name, "results": [h.as_dict() for h in hits]}))
        else:
            print(f"query: {name}")
            for h in hits:
                print(f"  {h.rank:>3}  {h.score:8.4f}  {h.uri}")
    return 0
