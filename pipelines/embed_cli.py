"""`remap embed --input <folder|glob|manifest> --output <store> [Beam pipeline flags]`"""

from __future__ import annotations

import json
import logging

ACCEPTS_EXTRA_ARGS = True  # everything else goes to Beam (--runner, --project, ...)
OPTIONS = ("input", "output", "model", "run_id", "batch_size", "num_shards", "shard_rows",
           "device", "fsspec_config", "progress_seconds", "torch_threads", "min_listed",
           "max_tombstone_fraction")


def add_arguments(parser) -> None:
    from .embed import EmbedOptions, EmbedWorkerOptions

    EmbedOptions._add_argparse_args(parser)
    EmbedWorkerOptions._add_argparse_args(parser)
    for action in parser._actions:
        if action.dest in ("input", "output"):
            action.required = True
    parser.epilog = ("Any Apache Beam pipeline option may follow (--runner, --project, --region, "
                     "--temp_location, --direct_num_workers, ...). Default runner: the local "
                     "in-process FnApiRunner. Runs are incremental: only URIs new or changed "
                     "since the store's earlier runs are embedded (--full: all of them).")


def _to_argv(args) -> list[str]:
    argv = []
    for key in OPTIONS:
        value = getattr(args, key)
        if value is not None:
            argv.append(f"--{key}={value}")
    if args.full:
        argv.append("--full")
    return argv + list(args.extra)


def main(args) -> int:
    from .embed import run

    logging.getLogger("pipelines").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    summary = run(_to_argv(args))
    if summary.get("submitted"):   # a dry run (graph built) or a job nothing waits for
        print(json.dumps(summary))
        return 0
    keys = ("run_id", "read", "embedded", "dead_lettered", "skipped", "tombstoned",
            "dead_letter_by_reason", "skipped_by_reason", "shards", "seconds")
    print(json.dumps({k: summary[k] for k in keys}))
    return 0
