"""`remap serve --index ROOT|URL [--host H] [--port P] ...`: the HTTP service (remap_serve)."""

from __future__ import annotations

EPILOG = ("--index is an index folder or URL, or an index root whose CURRENT file names the "
          "published index (as the nightly re-index writes it): the service follows CURRENT and "
          "swaps to a new index without dropping a query. Open http://HOST:PORT/ in a browser "
          "for the search page; POST /search for JSON; /healthz, /readyz and /metrics "
          "(Prometheus) for operators.")


def add_arguments(parser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--index", required=True,
                        help="index folder / URL, or an index root with a CURRENT pointer")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--reload-interval", type=float, default=30.0,
                        help="seconds between checks of CURRENT for a new index")
    parser.add_argument("--cache", default=None,
                        help="local cache of remote indexes (default $REMAP_INDEX_CACHE or "
                             "~/.cache/remap/indexes)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checksum verification of a local index folder's files")
    parser.add_argument("--max-upload-mb", type=float, default=20.0,
                        help="largest request body accepted (413 above)")
    parser.add_argument("--decode-timeout", type=float, default=10.0,
                        help="seconds allowed to decode and embed one query image (408 above)")
    parser.add_argument("--max-k", type=int, default=1000, help="largest k a request may ask")
    parser.add_argument("--image-threads", type=int, default=2,
                        help="query images decoded and embedded at once")
    parser.add_argument("--faiss-threads", type=int, default=1,
                        help="OpenMP threads per FAISS search (requests run in parallel anyway)")


def main(args) -> int:
    from remap_serve import build_server
    from remap_serve.app import Settings

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    for name in ("reload_interval", "max_upload_mb", "decode_timeout"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got "
                             f"{getattr(args, name)}")
    if args.max_k < 1 or args.image_threads < 1 or args.faiss_threads < 1:
        raise ValueError("--max-k, --image-threads and --faiss-threads must be at least 1")
    settings = Settings(max_upload_mb=args.max_upload_mb,
                        decode_timeout=args.decode_timeout, max_k=args.max_k,
                        image_threads=args.image_threads)
    server = build_server(args.index, args.host, args.port, args.reload_interval,
                          not args.no_verify, args.cache, settings, args.faiss_threads)
    server.run()
    return 0
