"""`remap eval`: parse, then `remap_core.evaluation.evaluate.run`; print its table or JSON."""

from __future__ import annotations

import argparse
import json

from remap_core.evaluation.evaluate import EvalOptions

_D = EvalOptions()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("benchmark")
    g.add_argument("--cache", default=None,
                   help="folder for downloaded photos and built benchmarks (default: "
                        "$REMAP_CACHE or ~/.cache/remap)")
    g.add_argument("--no-debian", action="store_true",
                   help="use only the scikit-image/scikit-learn photos (no apt-get download)")
    g.add_argument("--views-per-nuisance", type=int, default=_D.views_per_nuisance,
                   help=f"views of each photo per nuisance (default {_D.views_per_nuisance})")
    g.add_argument("--side", type=int, default=_D.side,
                   help="long side of the benchmark images")
    g.add_argument("--seed", type=int, default=_D.seed, help="seed of the generated views")
    g.add_argument("--category", action="store_true",
                   help="also score category retrieval on Debian's tuxpaint-stamps-default "
                        "(folder = class; needs apt-get download; skipped when unavailable)")
    g.add_argument("--max-photos", type=int, default=_D.max_photos,
                   help="use at most this many photos per split (quick runs)")
    m = parser.add_argument_group("model")
    m.add_argument("--backbone", default=_D.backbone)
    m.add_argument("--weights", default=_D.weights,
                   help="backbone weights: 'default' (offline), a path/fsspec URL, 'torchvision'")
    m.add_argument("--taps", default=_D.taps,
                   help="REMAP's feature taps, comma-separated (default: stage5,head for the "
                        "EfficientNet/MobileNet backbones, the last two taps otherwise, e.g. "
                        "layer3,layer4)")
    m.add_argument("--baseline-taps", default=_D.baseline_taps,
                   help="taps of MAC/SPoC/GeM/R-MAC (default: the backbone's last tap)")
    m.add_argument("--max-side", type=int, default=_D.max_side,
                   help="long side of the network input")
    m.add_argument("--scales", default=_D.scales,
                   help=f"multi-scale inference for every method (default {_D.scales})")
    m.add_argument("--levels", type=int, default=_D.levels,
                   help="R-MAC/REMAP region grid levels")
    m.add_argument("--layer-norm", action="store_true",
                   help="REMAP rows: L2-normalise each layer before concatenation (learned layer "
                   "weights, here 1)")
    m.add_argument("--klw-method", choices=("gaussian", "histogram"), default=_D.klw_method)
    m.add_argument("--whiten", choices=("learned", "pca"), default=_D.whiten,
                   help="whitening learned on the train split (default: Radenović's learned)")
    m.add_argument("--whiten-dim", type=int, default=_D.whiten_dim)
    m.add_argument("--batch-size", type=int, default=_D.batch_size)
    m.add_argument("--model", action="append", default=[], metavar="CHECKPOINT",
                   help="also score this checkpoint (e.g. `remap train`'s init.pt and model.pt) "
                   "as it embeds in the product (`embed_arrays`: its own input size and "
                   "scales); repeatable; the first is the reference the others are compared to")
    m.add_argument("--save-model", default=_D.save_model,
                   help="also save the REMAP model (KLW + whitening) as a checkpoint here")
    o = parser.add_argument_group("output")
    o.add_argument("--format", choices=("table", "json"), default="table")
    o.add_argument("--output", default=None, help="also write the JSON results to this file")


def main(args: argparse.Namespace) -> int:
    from remap_core.evaluation import evaluate

    report = evaluate.run(EvalOptions(
        cache=args.cache, no_debian=args.no_debian, views_per_nuisance=args.views_per_nuisance,
        side=args.side, seed=args.seed, category=args.category, max_photos=args.max_photos,
        backbone=args.backbone, weights=args.weights, taps=args.taps,
        baseline_taps=args.baseline_taps, max_side=args.max_side, scales=args.scales,
        levels=args.levels, layer_norm=args.layer_norm, klw_method=args.klw_method,
        whiten=args.whiten,
        whiten_dim=args.whiten_dim, batch_size=args.batch_size, model=args.model,
        save_model=args.save_model))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(evaluate.format_table(report))
    return 0
