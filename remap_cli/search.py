"""`remap search --index DIR [--k N] [--format table|json] IMAGE...`"""

from __future__ import annotations

import json
import sys

from remap_store.files import redact

EPILOG = ("A query image that cannot be read or decoded gets one line on stderr naming it and "
          "the reason (with --format json also {\"query\": ..., \"error\": ...} on its line of "
          "stdout); the other queries are still answered. Exit status: 0 when every query was "
          "answered, 1 when some failed and others were answered, 2 when none was answered or "
          "the search could not run (no index, wrong model, bad options).")


def add_arguments(parser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--index", required=True, help="built index folder (local, gs://, s3://)")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--model", default="manifest",
                        help="query model checkpoint (default: the one recorded in the index)")
    parser.add_argument("--vectors", default=None,
                        help="a .npy file of (Q, D) query vectors instead of images")
    parser.add_argument("--denoise", action="store_true", help="median-filter query images")
    parser.add_argument("--autocontrast", action="store_true", help="stretch query contrast")
    parser.add_argument("--qe", type=int, default=None, metavar="N",
                        help="alpha query expansion over the top N results of a first search; "
                        "--qe 0 turns it off (raw FAISS scores). Default: the index's own "
                        "(2 for indexes built by `remap index` since it became the default, see "
                        "`remap index --qe`; none for older indexes)")
    parser.add_argument("--qe-alpha", type=float, default=None,
                        help="query expansion weight exponent: result i weighs score_i ** alpha "
                        "(default: the index's, 3)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checksum verification of the index files")
    parser.add_argument("--html", default=None, metavar="OUT.html",
                        help="also write the results as a gallery page (thumbnails embedded: "
                             "the file stands alone)")
    parser.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE",
                        help="only hits whose metadata COLUMN equals VALUE (repeatable; the same "
                             "COLUMN twice: either value)")
    parser.add_argument("--dedupe", action="store_true",
                        help="keep one hit per identical image bytes (content_sha1)")
    parser.add_argument("images", nargs="*", help="query image paths or URLs")


def _load_vectors(path: str):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"query vectors file {path} not found") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read query vectors from {path} ({e}); pass a .npy file of "
                         f"(Q, D) float32 vectors") from None


def parse_filters(items: list[str]) -> dict | None:
    """["col=a", "col=b", "other=c"] -> {"col": ["a", "b"], "other": ["c"]}; values that read as
    integers are integers (e.g. width=640)."""
    out: dict[str, list] = {}
    for item in items:
        column, sep, value = item.partition("=")
        if not sep or not column:
            raise ValueError(f"--filter takes COLUMN=VALUE, got {item!r}")
        out.setdefault(column, []).append(int(value) if value.lstrip("-").isdigit() else value)
    return out or None


def main(args) -> int:
    from index_builder.search import QueryImageError, open_index

    if args.images and args.vectors:
        raise ValueError(f"give query IMAGE paths or --vectors FILE.npy, not both (got "
                         f"{len(args.images)} images and --vectors {args.vectors})")
    if not args.images and not args.vectors:
        raise ValueError("give query IMAGE paths or --vectors FILE.npy")
    if args.k < 1:
        raise ValueError(f"--k must be at least 1, got {args.k}")
    filters = parse_filters(args.filter)
    if args.vectors:
        import numpy as np

        vecs = _load_vectors(args.vectors)
        idx = open_index(args.index, verify=not args.no_verify)
        names = [f"{args.vectors}[{i}]" for i in range(len(np.atleast_2d(vecs)))]
        results = idx.search_vectors(vecs, args.k, filters, args.dedupe, args.qe, args.qe_alpha)
    else:
        idx = open_index(args.index, verify=not args.no_verify)
        names = list(args.images)
        model = None if args.model in ("default", "none") else args.model
        results = idx.search_images(names, args.k, model_uri=model, errors="return",
                                    filters=filters, dedupe=args.dedupe, denoise=args.denoise,
                                    autocontrast=args.autocontrast, qe=args.qe,
                                    qe_alpha=args.qe_alpha)
    failed = 0
    for name, hits in zip(names, results):
        if isinstance(hits, QueryImageError):
            failed += 1
            print(f"remap search: error: {redact(str(hits))}", file=sys.stderr)
            if args.format == "json":
                print(json.dumps({"query": name, "error": hits.reason}))
        elif args.format == "json":
            print(json.dumps({"query": name, "results": [h.as_dict() for h in hits]}))
        else:
            print(f"query: {name}")
            for h in hits:
                print(f"  {h.rank:>3}  {h.score:8.4f}  {h.uri}")
    if args.html:
        from remap_serve.gallery import write_results_page

        write_results_page(args.html, names, results, idx, query_images=bool(args.images))
        print(f"remap search: wrote {args.html}", file=sys.stderr)
    if failed:
        if len(names) > 1:
            print(f"remap search: {failed} of {len(names)} queries failed", file=sys.stderr)
        return 2 if failed == len(names) else 1
    return 0

