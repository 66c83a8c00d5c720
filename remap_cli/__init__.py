"""The `remap` console command: all of remap's argument parsing. Each subcommand is one module
here (embed, index, search, serve, eval, train, samples) with `add_arguments(parser)` and
`main(args) -> int`, which parses and calls one library function; modules are imported only
when their subcommand runs (so `remap search` never imports Beam). This dispatcher turns the
errors a user can fix (ValueError, FileNotFoundError, PermissionError) into one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from remap_store.files import redact, redact_logs

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "embed": ("remap_cli.embed", "embed images into Parquet shards (Apache Beam pipeline)"),
    "index": ("remap_cli.index", "build a FAISS index from embedding shards"),
    "index-beam": ("remap_cli.index_beam", "build a FAISS index as an Apache Beam job (the "
                                           "steps of remap index on Beam's runners)"),
    "search": ("remap_cli.search", "search a built index with query images or vectors"),
    "serve": ("remap_cli.serve", "serve an index over HTTP: search API, results page, metrics"),
    "eval": ("remap_cli.eval", "benchmark the descriptor heads on generated view families"),
    "train": ("remap_cli.train", "train REMAP end to end with a triplet loss"),
    "export": ("remap_cli.export", "write a checkpoint for deployment: input size, float16"),
    "samples": ("remap_cli.samples", "write the bundled sample images and altered queries"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="remap", description="REMAP content-based image "
                                     "retrieval: embed, index, search.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    verbose = argv[0] in ("-v", "--verbose")
    if verbose:
        argv = argv[1:]
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[name][0])
    cmd = argparse.ArgumentParser(prog=f"remap {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd)
    args, extra = cmd.parse_known_args(argv[1:])
    if extra and not getattr(module, "ACCEPTS_EXTRA_ARGS", False):
        cmd.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    redact_logs()   # no log line of any library shows a URI's credentials
    args.argv = argv[1:]   # the subcommand's arguments as given (remap embed hands them to Beam)
    try:
        return int(module.main(args) or 0)
    except (FileNotFoundError, ValueError, PermissionError) as e:
        print(f"remap {name}: error: {redact(str(e))}", file=sys.stderr)
        return 2
    except Exception as e:
        status = getattr(e, "exit_status", None)     # refusals that carry their own status
        if status is None:
            raise
        if verbose:   # remap -v: the cause's traceback (a failed job: the runner's) too
            logging.getLogger("remap_cli").debug("remap %s failed", name, exc_info=True)
        print(f"remap {name}: error: {redact(str(e))}", file=sys.stderr)
        return int(status)


if __name__ == "__main__":
    sys.exit(main())
