"""`remap train`: train REMAP end to end with a triplet loss.

    remap train --benchmark-views --out runs/remap      # view families of the benchmark's
                                                        # training photos, validated on its
                                                        # evaluation photos
    remap train --data landmarks/ --out runs/gld        # a folder per class
    remap train --data train.csv --out runs/gld         # uri,label (or id,url,landmark_id)
    remap train --photos my_photos/ --out runs/self     # self-supervised view families
    remap train --out runs/remap --resume               # continue from runs/remap/last.pt

Writes OUT/init.pt (the initialised, untrained model: KLW + whitening from the training data),
OUT/log.jsonl (one JSON line per epoch: loss, share of active triplets, validation mAP; epoch 0
is the untrained model), OUT/last.pt (resumable: weights + config + fingerprint + optimiser
state) and, at the end, OUT/model.pt, a plain checkpoint for `remap embed --model` /
`load_model`.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import time

import numpy as np

from remap_core.training.train import TrainOptions

DEFAULT_TAPS = "stage5,head"   # as `remap eval`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("training data (choose one)")
    src.add_argument("--data", help="labelled layout: a folder with a sub-folder per class, or a "
                     "Parquet/CSV table with uri,label (id,url,landmark_id) columns")
    src.add_argument("--photos", help="unlabelled photos (a folder or a glob): each becomes a "
                     "class of generated views (self-supervised)")
    src.add_argument("--benchmark-views", action="store_true", help="view families of the "
                     "benchmark's training photos (disjoint from its evaluation photos)")
    src.add_argument("--views-per-photo", type=int, default=5,
                     help="generated views per photo (default 5), each 1-2 chained nuisances")
    src.add_argument("--tiles", type=int, default=2, metavar="G",
                     help="view families: cut every photo into G x G tiles, each a class of its "
                     "own (default 2; 1: whole photos); --benchmark-views reads photos at G "
                     "times the side, so tiles keep their detail")
    src.add_argument("--no-extra-photos", action="store_true",
                     help="--benchmark-views without the training-only wallpaper photos (Debian "
                     "packages the benchmark never evaluates on): only the train split")
    src.add_argument("--clutter-backgrounds", type=int, default=16, metavar="N",
                     help="clutter views of every class share N generated backgrounds (default "
                     "16), so the background never identifies a class; 0: a new background per "
                     "view")
    src.add_argument("--view-seed", type=int, default=None,
                     help="seed of the generated views (default: derived from --seed, and "
                     "different from every benchmark seed)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, help="run folder for last.pt, model.pt, log.jsonl")
    out.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")

    m = parser.add_argument_group("model")
    m.add_argument("--init-model", help="start from this checkpoint instead of the ImageNet "
                   "backbone with a fresh head (its KLW/whitening are kept unless re-initialised)")
    m.add_argument("--backbone", default="efficientnet_lite0")
    m.add_argument("--taps", default=DEFAULT_TAPS, help=f"backbone layers REMAP aggregates "
                   f"(default {DEFAULT_TAPS})")
    m.add_argument("--levels", type=int, default=3, help="R-MAC grid levels (default 3)")
    m.add_argument("--max-side", type=int, default=320,
                   help="long side of training and validation images (default 320)")
    m.add_argument("--scales", default=None, help="test-time scales stored in the model, e.g. "
                   "1,0.7071,0.5 (default: the head's default)")
    m.add_argument("--whiten", choices=("pca", "learned", "none"), default="pca",
                   help="whitening initialised from training descriptors: pca (default; leaves "
                   "the triplet loss something to learn) or learned (Radenović's Lw from "
                   "matching pairs: on few training classes it separates every training tuple "
                   "already, so the loss starts at zero)")
    m.add_argument("--whiten-dim", type=int, default=256, help="whitened dimension (default 256)")
    m.add_argument("--klw-pairs", type=int, default=400,
                   help="matching and non-matching pairs for the KLW initialisation (default 400)")
    m.add_argument("--no-klw-init", action="store_true",
                   help="keep uniform (or --init-model's) KLW weights")

    t = parser.add_argument_group("training")
    d = TrainOptions()
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--tuples", type=int, default=d.tuples_per_epoch, help="tuples per epoch")
    t.add_argument("--negatives", type=int, default=d.negatives,
                   help="hard negatives per tuple, at most one per class")
    t.add_argument("--pool-size", type=int, default=None,
                   help="negative pool drawn each epoch (default: every training image)")
    t.add_argument("--batch", type=int, default=d.batch_tuples, help="tuples per step")
    t.add_argument("--margin", type=float, default=d.margin)
    t.add_argument("--lr", type=float, default=d.lr, help="backbone learning rate")
    t.add_argument("--lr-head", type=float, default=d.lr_head, help="KLW learning rate")
    t.add_argument("--lr-whiten", type=float, default=d.lr_whiten,
                   help="whitening learning rate")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--freeze", type=int, default=12, help="leading backbone units kept frozen "
                   "(EfficientNet-Lite0: stem + 16 blocks + conv head = 18; default 12 trains "
                   "stage 6, stage 7 and the conv head)")
    t.add_argument("--no-cache", action="store_true",
                   help="recompute the frozen units every step (slower; same result)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    t.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")

    v = parser.add_argument_group("benchmark (training photos of --benchmark-views, validation)")
    v.add_argument("--no-val", action="store_true", help="skip the per-epoch benchmark mAP")
    v.add_argument("--cache", default=None, help="benchmark cache folder (default: "
                   "$REMAP_CACHE or ~/.cache/remap, as `remap eval`)")
    v.add_argument("--no-debian", action="store_true",
                   help="only the scikit-image/scikit-learn photos (no apt-get download)")
    v.add_argument("--views-per-nuisance", type=int, default=2,
                   help="benchmark views per photo and nuisance (default 2, as `remap eval`)")
    v.add_argument("--side", type=int, default=384,
                   help="long side of the benchmark photos (default 384, as `remap eval`)")
    v.add_argument("--val-seed", type=int, default=0,
                   help="seed of the benchmark's views (default 0, as `remap eval --seed`)")
    v.add_argument("--max-photos", type=int, default=None,
                   help="at most this many photos per split (quick runs)")
    v.add_argument("--quiet", action="store_true", help="no progress bars")


# --------------------------------------------------------------------------- helpers

def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def _options(args) -> TrainOptions:
    return TrainOptions(epochs=args.epochs, tuples_per_epoch=args.tuples,
                        negatives=args.negatives, pool_size=args.pool_size,
                        batch_tuples=args.batch, margin=args.margin, lr=args.lr,
                        lr_head=args.lr_head, lr_whiten=args.lr_whiten,
                        weight_decay=args.weight_decay, freeze=args.freeze, seed=args.seed,
                        amp=not args.no_amp, cache=not args.no_cache)


def _photo_files(spec: str) -> list[str]:
    from remap_core.data.training_sets import IMAGE_EXTENSIONS

    if os.path.isdir(spec):
        files = [os.path.join(dp, f) for dp, _, fs in os.walk(spec) for f in fs
                 if f.lower().endswith(IMAGE_EXTENSIONS)]
    else:
        files = glob.glob(spec, recursive=True)
    if not files:
        raise FileNotFoundError(f"no photos found at {spec}; give a folder of images or a glob "
                                f"such as 'photos/**/*.jpg'")
    return sorted(files)


def load_training_set(args, max_side: int, multiple: int = 32):
    """The TrainingSet the arguments ask for, with a one-line description of it."""
    from remap_core.data.training_sets import (clutter_pool, compound_view, load_labelled, photo_tiles,
                             read_image, read_labelled_layout, view_families)

    chosen = [bool(args.data), bool(args.photos), bool(args.benchmark_views)]
    if sum(chosen) != 1:
        raise ValueError("give exactly one of --data (labelled layout), --photos (unlabelled "
                         "photos for view families) or --benchmark-views")
    progress = not args.quiet
    view_seed = args.view_seed if args.view_seed is not None else training_view_seed(args.seed)
    if args.data:
        ts = load_labelled(read_labelled_layout(args.data), max_side, multiple, progress)
        return ts, f"labelled layout {args.data}"
    if args.photos:
        photos = {}
        for f in _photo_files(args.photos):
            try:
                photos[os.path.relpath(f, args.photos) if os.path.isdir(args.photos) else f] = \
                    read_image(f)
            except (OSError, ValueError) as e:
                print(f"skipping unreadable photo {f}: {e}")
        source = f"view families of {len(photos)} photos from {args.photos}"
    else:
        photos, n_extra = benchmark_training_photos(args, args.side * args.tiles)
        source = (f"view families of {len(photos)} training photos (benchmark train split + "
                  f"{n_extra} training-only wallpapers)")
    if args.tiles > 1:
        photos = photo_tiles(photos, args.tiles)
        source += f" cut into {args.tiles}x{args.tiles} tiles ({len(photos)} classes)"
    if len(photos) < args.negatives + 1:
        raise ValueError(f"{len(photos)} photos give {len(photos)} classes, but each tuple "
                         f"needs {args.negatives} negatives from other classes; add photos or "
                         f"lower --negatives")
    make_view = compound_view
    if args.clutter_backgrounds > 0:
        pool = clutter_pool(args.clutter_backgrounds, view_seed)
        make_view = functools.partial(compound_view, backgrounds=pool)
        source += f", clutter on {args.clutter_backgrounds} shared backgrounds"
    ts = view_families(photos, args.views_per_photo, view_seed, make_view, max_side, multiple,
                       progress=progress)
    return ts, f"{source}, {args.views_per_photo} views each, view seed {view_seed}"


# --------------------------------------------------------------------------- main

RUN_KEYS = ("data", "photos", "benchmark_views", "views_per_photo", "view_seed", "max_side",
            "val_seed", "views_per_nuisance", "side", "no_debian", "max_photos", "tiles",
            "no_extra_photos", "clutter_backgrounds")


def _run_record(args, max_side: int) -> dict:
    rec = {k: getattr(args, k, None) for k in RUN_KEYS}
    rec["max_side"] = max_side
    return rec


def _check_same_run(out: str, record: dict) -> None:
    path = os.path.join(out, "run.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        before = json.load(f)
    # keys a run folder written by an older version lacks are not compared
    diff = {k: (before[k], record.get(k)) for k in RUN_KEYS
            if k in before and before[k] != record.get(k)}
    if diff:
        changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"--resume with different training data than the run in {out} "
                         f"({changes}); pass the original arguments or start a new --out")


def _new_model(args, device):
    from remap_core.descriptor.checkpoint import load_model
    from remap_core.descriptor.model import build_model

    if args.init_model:
        model = load_model(args.init_model, device=str(device))
        if model.config["head"] != "remap":
            raise ValueError(f"--init-model {args.init_model} has a {model.config['head']!r} "
                             f"head; remap train trains REMAP heads")
        return model
    cfg = {"backbone": args.backbone, "taps": [t.strip() for t in args.taps.split(",")],
           "head": "remap", "head_args": {"levels": args.levels, "include_global": True},
           "max_side": args.max_side, "whiten_dim": None}
    if args.scales:
        cfg["scales"] = [float(s) for s in args.scales.split(",")]
    return build_model(cfg).to(device).eval()


def main(args) -> int:
    import torch

    from remap_core.descriptor.checkpoint import save_checkpoint
    from remap_core.training.train import resume_training, train

    t_start = time.time()
    if args.cache is None:
        from remap_cli.eval import default_cache_dir

        args.cache = default_cache_dir()
    device = _device(args.device)
    out = args.out
    last = os.path.join(out, "last.pt")
    torch.manual_seed(args.seed)
    progress = not args.quiet

    if args.resume:
        if not os.path.exists(last):
            raise FileNotFoundError(f"--resume but {last} does not exist; run without --resume "
                                    f"to start training in {out}")
        model, optimizer, state = resume_training(last, device)
        opts = TrainOptions.from_dict({**state["options"], "epochs": args.epochs})
        start_epoch, history = int(state["epoch"]) + 1, state["history"]
        scaler_state = state.get("scaler")
        record = _run_record(args, int(model.config["max_side"]))
        _check_same_run(out, record)
        if start_epoch > opts.epochs:
            print(f"{out} already trained for {state['epoch']} epochs; raise --epochs to go on")
            return 0
    else:
        if os.path.exists(last):
            raise ValueError(f"{out} already holds a training run (last.pt); pass --resume to "
                             f"continue it or choose another --out")
        model = _new_model(args, device)
        opts = _options(args)
        optimizer, start_epoch, history, scaler_state = None, 1, [], None
        record = _run_record(args, int(model.config["max_side"]))

    multiple = int(model.config["multiple"])
    ts, source = load_training_set(args, int(model.config["max_side"]), multiple)
    print(f"training data: {source}: {ts.summary()}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(record, f, indent=1)

    caches = cache_frozen_trunk(model, ts, opts, args.resume, progress)
    if not args.resume:
        t0 = time.time()
        initialise_model(model, ts, args, caches)
        os.makedirs(out, exist_ok=True)
        fp0 = save_checkpoint(model, os.path.join(out, "init.pt"),
                              extra={"untrained": "KLW + whitening initialised, no SGD"})
        print(f"initialisation took {time.time() - t0:.1f}s; untrained model {fp0} saved to "
              f"{os.path.join(out, 'init.pt')}")

    n_cached = opts.freeze if opts.cache else 0
    validate = None if args.no_val else make_validator(args, model, n_cached, progress)
    history = train(model, ts.images, ts.labels, opts, out, validate=validate,
                    optimizer=optimizer, start_epoch=start_epoch, history=history,
                    scaler_state=scaler_state, progress=progress, cache=caches.get(1.0),
                    groups=ts.groups)
    final = os.path.join(out, "model.pt")
    fp = save_checkpoint(model, final, extra={"trained": {"epochs": opts.epochs,
                                                          "source": source,
                                                          "history": history}})
    _print_summary(history, final, fp, time.time() - t_start)
    return 0


def cache_frozen_trunk(model, ts, opts: TrainOptions, resume: bool = False,
                       progress: bool = True) -> dict:
    """Freeze `opts.freeze` backbone units and run them once per training image and scale:
    {scale: FrozenTrunkCache}, every test-time scale of the model (the whitening is learned on
    them) plus 1 (KLW, mining, steps); only scale 1 when resuming. Empty without a cache."""
    from remap_core.training.train import FrozenTrunkCache, freeze_backbone

    if not (opts.cache and opts.freeze > 0):
        return {}
    freeze_backbone(model, opts.freeze)
    t0 = time.time()
    scales = [1.0] if resume else sorted(set(model.config["scales"]) | {1.0}, reverse=True)
    caches = {s: FrozenTrunkCache(model, ts.images, opts.freeze, progress=progress, scale=s)
              for s in scales}
    print(f"cached the {opts.freeze} frozen backbone units for {len(ts.images)} images x "
          f"{len(scales)} scale(s) in {time.time() - t0:.1f}s")
    return caches


def initialise_model(model, ts, args, caches: dict) -> None:
    """The untrained starting point: KLW from matching / non-matching pairs of the training
    set and whitening from its descriptors (unless --no-klw-init / --whiten none)."""
    from remap_core.training.train import initialise_klw, initialise_whitening

    rng = np.random.default_rng([args.seed, 2024])
    if not args.no_klw_init:
        w = initialise_klw(model, ts.images, ts.labels, args.klw_pairs, rng,
                           cache=caches.get(1.0))
        print(f"KLW initialised from {args.klw_pairs} matching / non-matching pairs: weights "
              f"{w.min():.3f}..{w.max():.3f} (layers x regions {w.shape[0]}x{w.shape[1]})")
    if args.whiten != "none":
        initialise_whitening(model, ts.images, ts.labels, args.whiten_dim, args.whiten,
                             n_pairs=max(args.klw_pairs, 1000), rng=rng, caches=caches)
        print(f"{args.whiten} whitening initialised: {model.head.out_dim} -> {model.dim}")


def _print_summary(history: list[dict], final: str, fingerprint: str, wall_s: float) -> None:
    print("epoch  loss      active  mAP")
    for r in history:
        loss = f"{r['loss']:.4f}" if "loss" in r else "-"
        active = f"{r['active']:.2f}" if "active" in r else "-"
        m = f"{100 * r['map']:.2f}" if "map" in r else "-"
        print(f"{r['epoch']:>5}  {loss:<8}  {active:<6}  {m}")
    print(f"model: {final} ({fingerprint}); wall time {wall_s / 60:.1f} min")
    print(f"use it with: remap embed --model {final} ...  /  load_model('{final}')")


# --------------------------------------------------------------------------- the benchmark

# View seeds of training families live in their own namespace: the benchmark draws its views
# with sha1("{seed}/{photo}/{nuisance}/{k}") on its own photos; training views are drawn from
# SeedSequence([TRAIN_VIEW_NAMESPACE, seed]) on the *train* split's photos only.
TRAIN_VIEW_NAMESPACE = 0x7EA1


def training_view_seed(seed: int) -> int:
    """The view seed of a training run with --seed `seed` (never a benchmark seed stream)."""
    return int(np.random.SeedSequence([TRAIN_VIEW_NAMESPACE, seed]).generate_state(1)[0])


def benchmark_training_photos(args, side: int) -> tuple[dict, int]:
    """The benchmark's train-split photos plus, unless --no-extra-photos (or --no-debian), the
    training-only wallpapers ({name: PIL image, long side at most `side`}): never an evaluation
    photo. Returns (photos, how many of them are training-only wallpapers)."""
    from remap_core.evaluation.benchmark import benchmark_photos, training_only_photos

    photos = benchmark_photos("train", args.cache, debian=not args.no_debian, max_side=side,
                              max_photos=args.max_photos)
    if not photos:
        raise ValueError("the benchmark's train split holds no photos: is scikit-image "
                         "installed? (or drop --no-debian)")
    extra = {}
    if not (args.no_extra_photos or args.no_debian):
        extra = training_only_photos(args.cache, side)
        extra = dict(list(extra.items())[:args.max_photos]) if args.max_photos else extra
    return {**photos, **extra}, len(extra)


def make_validator(args, model, n_frozen: int, progress: bool = True):
    """A function model -> {"map": ..., "mP@5": ..., "per_nuisance": ...} on the benchmark's
    eval split, computing what `model.embed_arrays` (and so `remap embed`) computes, with the
    model's own multi-scale inference; frozen backbone units are run once, not every epoch."""
    from PIL import Image

    from remap_core.evaluation.benchmark import build_benchmark
    from remap_cli.eval import score
    from remap_core.data.preprocess import resize_for_model
    from remap_core.training.train import CachedEmbedder

    bench = build_benchmark("eval", args.cache, views_per_nuisance=args.views_per_nuisance,
                            seed=args.val_seed, side=args.side, debian=not args.no_debian,
                            max_photos=args.max_photos)
    max_side, multiple = int(model.config["max_side"]), int(model.config["multiple"])
    images = [resize_for_model(Image.fromarray(im), max_side, multiple) for im in bench.images]
    print(f"validation: benchmark eval split, {bench.summary()}")
    cached = CachedEmbedder(model, images, n_frozen, progress=progress) if n_frozen > 0 else None

    def validate(m) -> dict:
        r = score(cached(m) if cached is not None else m.embed_arrays(images), bench)
        return {"map": round(r["mAP"], 5), "mP@5": round(r["mP@5"], 5),
                "per_nuisance": {k: round(v, 4) for k, v in r["per_nuisance"].items()}}

    return validate
