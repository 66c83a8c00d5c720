"""`remap index-beam --embeddings <store> --index <folder> [Beam pipeline flags]`

The index build of `remap index` (train, add, merge) as an Apache Beam job, on the runners
`remap embed` runs on. As for `remap embed`, the arguments go to the pipeline exactly as given
(pipelines/index_build.py's IndexBuildOptions and Beam's own parse them); the console parses
them only for `--help` and to refuse a missing or misspelt option before anything starts.
"""

from __future__ import annotations

import json
import logging

ACCEPTS_EXTRA_ARGS = True  # everything else goes to Beam (--runner, --project, ...)


def add_arguments(parser) -> None:
    from pipelines.options import IndexBuildOptions

    IndexBuildOptions._add_argparse_args(parser)
    for action in parser._actions:
        if action.dest in ("embeddings", "index"):
            action.required = True
    parser.allow_abbrev = False
    parser.epilog = ("Any Apache Beam pipeline option may follow (--runner, --project, "
                     "--region, --temp_location, --environment_type, ...), and --fsspec_config "
                     "as for remap embed. Default runner: the local in-process FnApiRunner. A "
                     "killed job run again resumes from the index folder's _build/.")


def main(args) -> int:
    from pipelines.index_build import run
    from pipelines.options import unknown_options

    unknown = unknown_options(args.argv)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}: neither remap index-beam nor "
                         f"Apache Beam defines them (Beam would drop them silently); check the "
                         f"spelling (remap index-beam --help lists remap's options)")
    logging.getLogger("pipelines").setLevel(logging.INFO)
    logging.getLogger("index_builder").setLevel(logging.INFO)
    out = run(list(args.argv))
    if out.get("dry_run"):
        print(json.dumps(out))
        return 0
    from remap_cli.index import _summary

    print(json.dumps(_summary(args.index, out)))
    return 0
