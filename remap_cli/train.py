"""`remap train`: parse, then `remap_core.training.run.run_training` (what it writes: see
that module)."""

from __future__ import annotations

import argparse
import dataclasses

from remap_core.training.run import DEFAULT_TAPS, FINAL_WHITENINGS, TrainRun

_D = TrainRun(out="")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("training data (choose one)")
    src.add_argument("--data", help="labelled layout: a folder with a sub-folder per class, or a "
                     "Parquet/CSV table with uri,label (id,url,landmark_id) columns")
    src.add_argument("--photos", help="unlabelled photos (a folder or a glob): each becomes a "
                     "class of generated views (self-supervised)")
    src.add_argument("--benchmark-views", action="store_true", help="view families of the "
                     "benchmark's training photos (disjoint from its evaluation photos)")
    src.add_argument("--views-per-photo", type=int, default=_D.views_per_photo,
                     help="generated views per photo (default 5), each 1-2 chained nuisances")
    src.add_argument("--tiles", type=int, default=_D.tiles, metavar="G",
                     help="view families: cut every photo into G x G tiles, each a class of its "
                     "own (default 2; 1: whole photos); --benchmark-views reads photos at G "
                     "times the side, so tiles keep their detail")
    src.add_argument("--no-extra-photos", action="store_true",
                     help="--benchmark-views without the training-only photos (Debian wallpaper "
                     "packages and PyPI wheels' sample photos, which the benchmark never "
                     "evaluates on): only the train split")
    src.add_argument("--no-pypi-photos", action="store_true",
                     help="--benchmark-views with the Debian wallpapers but without the photos "
                     "of PyPI wheels: remap-lite0-v2's training data (v3 added them)")
    src.add_argument("--clutter-backgrounds", type=int, default=_D.clutter_backgrounds, metavar="N",
                     help="clutter views of every class share N generated backgrounds (default "
                     "16), so the background never identifies a class; 0: a new background per "
                     "view")
    src.add_argument("--photo-backgrounds", type=int, default=_D.photo_backgrounds, metavar="N",
                     help="also paste clutter views onto N crops of the training photos (real "
                     "scenes behind the pasted photo; default 16)")
    src.add_argument("--photo-occluders", type=int, default=_D.photo_occluders, metavar="N",
                     help="occlusion views cut half their shapes from N crops of the training "
                     "photos (real objects in front of the photo) instead of flat colours and "
                     "noise only (default 0: off; no gain on the shipped recipe: bench/RESULTS.md)")
    src.add_argument("--fresh-views", action="store_true",
                     help="--photos or --benchmark-views: draw new views of every photo (and new "
                     "shared backgrounds) each epoch, so training never sees a view twice; the "
                     "KLW and whitening are fitted on the first epoch's views")
    src.add_argument("--view-seed", type=int, default=None,
                     help="seed of the generated views (default: derived from --seed, and "
                     "different from every benchmark seed)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, help="run folder for last.pt, model.pt, log.jsonl")
    out.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")

    m = parser.add_argument_group("model")
    m.add_argument("--init-model", help="start from this checkpoint instead of the ImageNet "
                   "backbone with a fresh head (its KLW/whitening are kept unless re-initialised)")
    m.add_argument("--head", choices=("remap", "gem", "rmac"), default=_D.head,
                   help="remap (default), or a baseline head trained the same way (gem with a "
                   "learned p, rmac) for comparisons at equal budget; baselines usually take "
                   "--taps head")
    m.add_argument("--backbone", default=_D.backbone)
    m.add_argument("--taps", default=DEFAULT_TAPS, help=f"backbone layers REMAP aggregates "
                   f"(default {DEFAULT_TAPS})")
    m.add_argument("--levels", type=int, default=_D.levels, help="R-MAC grid levels (default 3)")
    m.add_argument("--max-side", type=int, default=_D.max_side,
                   help="long side of training and validation images (default 320)")
    m.add_argument("--scales", default=None, help="test-time scales stored in the model, e.g. "
                   "1,0.7071,0.5 (default: the head's default)")
    m.add_argument("--whiten", choices=("pca", "learned", "none"), default=_D.whiten,
                   help="whitening initialised from training descriptors: pca (default; leaves "
                   "the triplet loss something to learn) or learned (Radenović's Lw from "
                   "matching pairs: on few training classes it separates every training tuple "
                   "already, so the loss starts at zero)")
    m.add_argument("--whiten-dim", type=int, default=_D.whiten_dim, help="whitened dimension (default 256)")
    m.add_argument("--whiten-shrinkage", type=float, default=_D.whiten_shrinkage,
                   help="pca whitening: add this x the mean eigenvalue before the inverse square "
                   "root (0: full whitening; larger: weak directions amplified less)")
    m.add_argument("--layer-norm", action="store_true", default=_D.layer_norm,
                   help="L2-normalise each tapped layer's REMAP vector before concatenation, "
                   "with a learned weight per layer")
    m.add_argument("--klw-pairs", type=int, default=_D.klw_pairs,
                   help="matching and non-matching pairs for the KLW initialisation (default 400)")
    m.add_argument("--no-klw-init", action="store_true",
                   help="keep uniform (or --init-model's) KLW weights")

    f = parser.add_argument_group("final model (model.pt, after the last epoch; --resume on a "
                                  "finished run writes it again)")
    f.add_argument("--whole-map-weight", type=float, default=_D.whole_map_weight, metavar="K",
                   help="REMAP: weigh the whole-map region K times the mean weight of the grid "
                   f"regions (default {_D.whole_map_weight:g}: the grid regions outvote the "
                   "whole map under clutter; see MODEL.md); a negative K keeps the trained "
                   "weight")
    m.add_argument("--whole-map-at-init", action="store_true",
                   help="REMAP: also weigh the whole-map region --whole-map-weight x the grid's "
                   "mean right after the KLW initialisation, so that training sees the final "
                   "weighting (default: only the final model gets it)")
    f.add_argument("--final-whiten", choices=FINAL_WHITENINGS, default=_D.final_whiten,
                   help="refit the whitening on the trained model's descriptors of the training "
                   "images: pca (default), learned, or keep the whitening as trained")

    t = parser.add_argument_group("training")
    d = _D
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--tuples", type=int, default=d.tuples, help="tuples per epoch")
    t.add_argument("--negatives", type=int, default=d.negatives,
                   help="hard negatives per tuple, at most one per class")
    t.add_argument("--pool-size", type=int, default=None,
                   help="negative pool drawn each epoch (default: every training image)")
    t.add_argument("--batch", type=int, default=d.batch, help="tuples per step")
    t.add_argument("--margin", type=float, default=d.margin)
    t.add_argument("--lr", type=float, default=d.lr, help="backbone learning rate")
    t.add_argument("--lr-head", type=float, default=d.lr_head, help="KLW learning rate")
    t.add_argument("--lr-whiten", type=float, default=d.lr_whiten,
                   help="whitening learning rate")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--optimizer", choices=("adam", "sgd"), default=d.optimizer,
                   help="adam (default) or sgd with momentum 0.9, as in the REMAP paper")
    t.add_argument("--freeze", type=int, default=_D.freeze, help="leading backbone units kept frozen "
                   "(EfficientNet-Lite0: stem + 16 blocks + conv head = 18; default 11 trains "
                   "the last block of stage 5 (so both REMAP taps train), stages 6 and 7 and the "
                   "conv head; 9 trains all of stage 5, about 3x slower per step on a CPU)")
    t.add_argument("--no-cache", action="store_true",
                   help="recompute the frozen units every step (slower; same result)")
    t.add_argument("--seed", type=int, default=_D.seed)
    t.add_argument("--device", default=_D.device, help="auto (CUDA when present), cpu or cuda")
    t.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")

    v = parser.add_argument_group("benchmark (training photos of --benchmark-views, validation)")
    v.add_argument("--no-val", action="store_true", help="skip the per-epoch benchmark mAP")
    v.add_argument("--cache", default=None, help="benchmark cache folder (default: "
                   "$REMAP_CACHE or ~/.cache/remap, as `remap eval`)")
    v.add_argument("--no-debian", action="store_true",
                   help="only the scikit-image/scikit-learn photos (no apt-get download)")
    v.add_argument("--views-per-nuisance", type=int, default=_D.views_per_nuisance,
                   help="benchmark views per photo and nuisance (default 2, as `remap eval`)")
    v.add_argument("--side", type=int, default=_D.side,
                   help="long side of the benchmark photos (default 384, as `remap eval`)")
    v.add_argument("--val-seed", type=int, default=_D.val_seed,
                   help="seed of the benchmark's views (default 0, as `remap eval --seed`)")
    v.add_argument("--max-photos", type=int, default=None,
                   help="at most this many photos per split (quick runs)")
    v.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    from remap_core.training import run

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainRun)}
    if values["whole_map_weight"] is not None and values["whole_map_weight"] < 0:
        values["whole_map_weight"] = None
    run.run_training(TrainRun(**values))
    return 0
