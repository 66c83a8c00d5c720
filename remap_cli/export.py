"""`remap export --model SRC --output DST [--max-side N] [--scales S] [--float32]`: parse, then
`remap_core.descriptor.checkpoint.export_model`; print the new fingerprint."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="checkpoint path/URL (e.g. runs/remap/model.pt) or model name")
    parser.add_argument("--output", required=True, help="where to write the exported checkpoint")
    parser.add_argument("--max-side", type=int, default=None,
                        help="long side of the network input at inference (default: keep the "
                             "checkpoint's)")
    parser.add_argument("--scales", default=None,
                        help="test-time scales, e.g. 'sqrt(2),1,1/sqrt(2),1/2' (default: keep the "
                             "checkpoint's; the shipped model's are 1,1/sqrt(2),1/2). A scale "
                             "above 1 helps find small objects and costs embedding time: "
                             "bench/RESULTS.md, 'Test-time scales'")
    parser.add_argument("--float32", action="store_true",
                        help="keep float32 weights (default: float16, half the bytes)")
    parser.add_argument("--note", default=None, help="a note stored in the checkpoint")


def main(args: argparse.Namespace) -> int:
    from remap_core.descriptor.checkpoint import export_model
    from remap_core.descriptor.model import parse_scales

    scales = parse_scales(args.scales) if args.scales is not None else None
    fp = export_model(args.model, args.output, args.max_side, half=not args.float32,
                      note=args.note, scales=scales)
    print(f"wrote {args.output} ({fp})")
    return 0
