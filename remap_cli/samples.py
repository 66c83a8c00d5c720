"""`remap samples`: parse, then `remap_core.data.samples.write_samples`; say what was written."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="samples", help="folder to write (default: samples)")


def main(args: argparse.Namespace) -> int:
    from remap_core.data import samples

    images, queries = samples.write_samples(args.output)
    print(f"wrote {len(images)} images to {os.path.join(args.output, 'images')} and "
          f"{len(queries)} altered queries to {os.path.join(args.output, 'queries')}")
    return 0
