"""`remap embed --input <folder|glob|manifest> --output <store> [Beam pipeline flags]`"""

from __future__ import annotations

import json

ACCEPTS_EXTRA_ARGS = True  # everything else goes to Beam (--runner, --project, ...)


def add_arguments(parser) -> None:
    from .embed import EmbedOptions

    EmbedOptions._add_argparse_args(parser)
    parser.epilog = ("Any Apache Beam pipeline option may follow (--runner, --project, --region, "
                     "--temp_location, --direct_num_workers, ...). Default runner: the local "
                     "in-process FnApiRunner.")


def _to_argv(args) -> list[str]:
    argv = []
    for key in ("input", "output", "model", "run_id", "batch_size", "num_shards", "device"):
        value = getattr(args, key)
        if value is not None:
            argv.append(f"--{key}={value}")
    return argv + list(args.extra)


def main(args) -> int:
    from .embed import run

    summary = run(_to_argv(args))
    print(json.dumps({k: summary[k] for k in ("run_id", "read", "embedded", "dead_lettered",
                                              "dead_letter_by_reason", "shards", "seconds")}))
    return 0
