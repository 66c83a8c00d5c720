"""`remap embed --input <folder|glob|URI list> --output <store> [Beam pipeline flags]`

The pipeline gets the command's arguments exactly as the user gave them: its PipelineOptions
(EmbedOptions, EmbedWorkerOptions and Beam's own) parse them, as on any Beam launcher. The
console parses them too, but only to serve `--help` and to refuse a missing --input/--output or
a malformed value before anything starts; nothing is rebuilt from what it parsed, so every
option `--help` shows reaches the pipeline without a second list of names.
"""

from __future__ import annotations

import json
import logging

ACCEPTS_EXTRA_ARGS = True  # everything else goes to Beam (--runner, --project, ...)


def add_arguments(parser) -> None:
    from pipelines.embed import EmbedOptions, EmbedWorkerOptions

    EmbedOptions._add_argparse_args(parser)
    EmbedWorkerOptions._add_argparse_args(parser)
    for action in parser._actions:
        if action.dest in ("input", "output"):
            action.required = True
    parser.allow_abbrev = False   # Beam's parser takes no abbreviations: the console neither
    parser.epilog = ("Any Apache Beam pipeline option may follow (--runner, --project, --region, "
                     "--temp_location, --direct_num_workers, ...). Default runner: the local "
                     "in-process FnApiRunner. Runs are incremental: only URIs new or changed "
                     "since the store's earlier runs are embedded (--full: all of them).")


def main(args) -> int:
    from pipelines.embed import run
    from pipelines.options import unknown_options

    unknown = unknown_options(args.argv)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}: neither remap embed nor Apache "
                         f"Beam defines them (Beam would drop them silently); check the spelling "
                         f"(remap embed --help lists remap's options)")

    logging.getLogger("pipelines").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    summary = run(list(args.argv))
    if summary.get("submitted"):   # a dry run (graph built) or a job nothing waits for
        print(json.dumps(summary))
        return 0
    keys = ("run_id", "read", "embedded", "dead_lettered", "skipped", "tombstoned",
            "kept_other_sources", "listed_not_images", "dead_letter_by_reason",
            "skipped_by_reason", "shards", "seconds")
    print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0
