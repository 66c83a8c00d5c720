"""One `remap train` run, start to model.pt: `run_training(TrainRun) -> summary`, and the steps
it is made of (`load_training_set`, `initialise_model`, `cache_frozen_trunk`,
`make_validator`, `benchmark_training_photos`), which bench/train_ablation.py calls too.

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

import functools
import glob
import json
import os
import time
from dataclasses import dataclass

import numpy as np

from remap_core.training.train import TrainOptions

DEFAULT_TAPS = "stage5,head"   # as `remap eval`
# The whole-map region's weight in the final REMAP model, as a multiple of the mean weight of the
# grid regions: chosen on half of the held-out proxy's photos (bench/RESULTS.md, "Issue 12:
# the whole map and the final whitening").
WHOLE_MAP_WEIGHT = 100.0
FINAL_WHITENINGS = ("pca", "learned", "keep")
TRAINABLE_HEADS = ("remap", "gem", "rmac")
_T = TrainOptions()


@dataclass
class TrainRun:
    """Everything one `remap train` run depends on (field names and defaults are the command's
    options; see `remap train --help`). Exactly one of data, photos, benchmark_views."""

    out: str
    # training data
    data: str | None = None               # labelled layout: folder per class or uri,label table
    photos: str | None = None             # unlabelled photos (folder or glob): view families
    benchmark_views: bool = False         # view families of the benchmark's training photos
    views_per_photo: int = 5
    tiles: int = 2                        # cut every photo into tiles x tiles classes
    no_extra_photos: bool = False         # --benchmark-views without training-only photos
    no_pypi_photos: bool = False          # ... without those of PyPI wheels (remap-lite0-v2's data)
    clutter_backgrounds: int = 16         # shared clutter backgrounds; 0: one per view
    photo_backgrounds: int = 16           # also paste clutter views onto crops of the photos
    photo_occluders: int = 0              # occlusion views: half the shapes cut from N crops of
                                          # the photos; 0: flat and noise shapes only
    view_seed: int | None = None          # None: training_view_seed(seed)
    fresh_views: bool = False             # view families: new views every epoch (epoch_views)
    resume: bool = False                  # continue from out/last.pt
    # model
    init_model: str | None = None         # start from this checkpoint
    head: str = "remap"                   # remap, or a baseline trained the same way: gem, rmac
    backbone: str = "efficientnet_lite0"
    taps: str = DEFAULT_TAPS              # comma-separated
    levels: int = 3
    max_side: int = 320
    scales: str | None = None             # comma-separated test-time scales; None: the head's
    whiten: str = "pca"                   # "pca", "learned" or "none"
    whiten_dim: int = 256
    whiten_shrinkage: float = 0.0         # pca: eigenvalues + shrinkage x their mean
    layer_norm: bool = False              # L2 per layer before concatenation, learned layer weights
    klw_pairs: int = 400
    no_klw_init: bool = False
    whole_map_at_init: bool = False       # REMAP: apply whole_map_weight to the initial KLW
                                          # weights too, so that training sees the final weighting
    # the final model (model.pt), after the last epoch; see `finalise_model`
    whole_map_weight: float | None = WHOLE_MAP_WEIGHT   # REMAP: whole map x the grid's mean
    final_whiten: str = "pca"             # refit the whitening: "pca", "learned" or "keep"
    # training (see TrainOptions)
    epochs: int = _T.epochs
    tuples: int = _T.tuples_per_epoch
    negatives: int = _T.negatives
    pool_size: int | None = _T.pool_size
    batch: int = _T.batch_tuples
    margin: float = _T.margin
    lr: float = _T.lr
    lr_head: float = _T.lr_head
    lr_whiten: float = _T.lr_whiten
    weight_decay: float = _T.weight_decay
    optimizer: str = _T.optimizer
    freeze: int = 11                      # Lite0: units 0-10 frozen; the stage-5 tap's last
                                          # block, stages 6-7 and the conv head train
    no_cache: bool = False
    seed: int = 0
    device: str = "auto"                  # auto, cpu or cuda
    no_amp: bool = False
    # benchmark (training photos of benchmark_views, validation)
    no_val: bool = False
    cache: str | None = None              # None: benchmark.default_cache_dir()
    no_debian: bool = False
    views_per_nuisance: int = 2
    side: int = 384
    val_seed: int = 0
    max_photos: int | None = None
    quiet: bool = False


# --------------------------------------------------------------------------- helpers

def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def train_options(options: TrainRun) -> TrainOptions:
    return TrainOptions(epochs=options.epochs, tuples_per_epoch=options.tuples,
                        negatives=options.negatives, pool_size=options.pool_size,
                        batch_tuples=options.batch, margin=options.margin, lr=options.lr,
                        lr_head=options.lr_head, lr_whiten=options.lr_whiten,
                        weight_decay=options.weight_decay, optimizer=options.optimizer,
                        freeze=options.freeze, seed=options.seed,
                        amp=not options.no_amp, cache=not options.no_cache)


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


def check_training_data(options: TrainRun) -> None:
    """Refuse a choice of training data that `load_training_set` cannot honour."""
    chosen = [bool(options.data), bool(options.photos), bool(options.benchmark_views)]
    if sum(chosen) != 1:
        raise ValueError("give exactly one of --data (labelled layout), --photos (unlabelled "
                         "photos for view families) or --benchmark-views")
    if options.fresh_views and options.data:
        raise ValueError("--fresh-views draws new views of --photos or --benchmark-views each "
                         "epoch; a labelled layout (--data) has no views to draw")


def load_training_set(options: TrainRun, max_side: int, multiple: int = 32,
                      family: tuple[dict, str] | None = None):
    """The TrainingSet the arguments ask for, with a one-line description of it. `family`: the
    view families' photos and description (`family_photos`) when the caller has read them."""
    from remap_core.data.training_sets import load_labelled, read_labelled_layout

    check_training_data(options)
    if options.data:
        ts = load_labelled(read_labelled_layout(options.data), max_side, multiple,
                           not options.quiet)
        return ts, f"labelled layout {options.data}"
    photos, source = family if family is not None else family_photos(options)
    return _draw_views(photos, options, _view_seed(options), max_side, multiple, source)


def epoch_views(options: TrainRun, max_side: int, multiple: int = 32,
                family: tuple[dict, str] | None = None):
    """--fresh-views: -> views(epoch), the TrainingSet of that epoch's draw of views of the
    same photos (the same classes, labels and groups). Epoch 1 is `load_training_set`'s draw;
    each later epoch draws every view and the shared clutter backgrounds from a seed of its own
    (`epoch_view_seed`), so a resumed run sees the views it would have seen. `family`: as for
    `load_training_set`, so that the photos are read once."""
    photos, source = family if family is not None else family_photos(options)
    first = _view_seed(options)

    def views(epoch: int):
        return _draw_views(photos, options, epoch_view_seed(first, epoch), max_side, multiple,
                           source)[0]
    return views


def epoch_view_seed(view_seed: int, epoch: int) -> int:
    """The view seed of `epoch` under --fresh-views: `view_seed` itself for epoch 1."""
    if epoch <= 1:
        return view_seed
    return int(np.random.SeedSequence([view_seed, epoch]).generate_state(1, dtype=np.uint32)[0])


def _view_seed(options: TrainRun) -> int:
    return options.view_seed if options.view_seed is not None else training_view_seed(options.seed)


def family_photos(options: TrainRun) -> tuple[dict, str]:
    """The photos of view families (--photos or --benchmark-views), cut into tiles: -> (photos,
    description)."""
    from remap_core.data.training_sets import photo_tiles, read_image

    if options.photos:
        photos = {}
        for f in _photo_files(options.photos):
            try:
                photos[os.path.relpath(f, options.photos) if os.path.isdir(options.photos) else f] = \
                    read_image(f)
            except (OSError, ValueError) as e:
                print(f"skipping unreadable photo {f}: {e}")
        source = f"view families of {len(photos)} photos from {options.photos}"
    else:
        photos, n_extra = benchmark_training_photos(options, options.side * options.tiles)
        source = (f"view families of {len(photos)} training photos (benchmark train split + "
                  f"{n_extra} training-only photos)")
    if options.tiles > 1:
        photos = photo_tiles(photos, options.tiles)
        source += f" cut into {options.tiles}x{options.tiles} tiles ({len(photos)} classes)"
    if len(photos) < options.negatives + 1:
        raise ValueError(f"{len(photos)} photos give {len(photos)} classes, but each tuple "
                         f"needs {options.negatives} negatives from other classes; add photos or "
                         f"lower --negatives")
    return photos, source


def _draw_views(photos: dict, options: TrainRun, view_seed: int, max_side: int, multiple: int,
                source: str):
    """Every photo's view family drawn from `view_seed`: -> (TrainingSet, description)."""
    from remap_core.data.training_sets import (OCCLUDER_SALT, clutter_pool, compound_view,
                                               photo_backgrounds, view_families)

    pool, occluders = [], []
    if options.clutter_backgrounds > 0 or options.photo_backgrounds > 0:
        pool = (clutter_pool(options.clutter_backgrounds, view_seed)
                if options.clutter_backgrounds > 0 else [])
        pool += photo_backgrounds(photos, options.photo_backgrounds, view_seed)
        source += (f", clutter on {options.clutter_backgrounds} shared generated and "
                   f"{options.photo_backgrounds} photo backgrounds")
    if options.photo_occluders > 0:
        occluders = photo_backgrounds(photos, options.photo_occluders, view_seed,
                                      salt=OCCLUDER_SALT)
        source += f", occluders cut from {options.photo_occluders} photo crops"
    make_view = functools.partial(compound_view, backgrounds=pool, occluders=occluders)
    ts = view_families(photos, options.views_per_photo, view_seed, make_view, max_side, multiple,
                       progress=not options.quiet)
    fresh = ", new views every epoch" if options.fresh_views else ""
    return ts, f"{source}, {options.views_per_photo} views each, view seed {view_seed}{fresh}"


# --------------------------------------------------------------------------- main

# what the training set depends on; --seed too, since the view seed derives from it (a run
# folder written before "seed" was recorded is not checked for it)
RUN_KEYS = ("data", "photos", "benchmark_views", "views_per_photo", "view_seed", "max_side",
            "val_seed", "views_per_nuisance", "side", "no_debian", "max_photos", "tiles",
            "no_extra_photos", "no_pypi_photos", "clutter_backgrounds", "photo_backgrounds",
            "seed", "fresh_views", "photo_occluders")


def _run_record(options: TrainRun, max_side: int) -> dict:
    rec = {k: getattr(options, k, None) for k in RUN_KEYS}
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


def new_model(options: TrainRun, device):
    from remap_core.descriptor.checkpoint import load_model
    from remap_core.descriptor.model import build_model

    if options.init_model:
        model = load_model(options.init_model, device=str(device))
        if model.config["head"] not in TRAINABLE_HEADS:
            raise ValueError(f"--init-model {options.init_model} has a {model.config['head']!r} "
                             f"head; remap train trains {', '.join(TRAINABLE_HEADS)} heads")
        return model
    if options.head not in TRAINABLE_HEADS:
        raise ValueError(f"--head {options.head!r}: remap train trains "
                         f"{', '.join(TRAINABLE_HEADS)} heads")
    taps = [t.strip() for t in options.taps.split(",")]
    if options.head == "remap":
        head_args = {"levels": options.levels, "include_global": True,
                     **({"layer_norm": True} if options.layer_norm else {})}
    elif options.head == "gem":
        head_args = {"p": 3.0, "learn_p": True}          # p trained, as Radenovic et al.
    else:
        head_args = {"levels": options.levels}
    cfg = {"backbone": options.backbone, "taps": taps, "head": options.head,
           "head_args": head_args, "max_side": options.max_side, "whiten_dim": None}
    # every head gets the same test-time scales (REMAP's multi-scale default), so trained
    # baselines and REMAP compare at equal inference as well as equal training
    from remap_core.descriptor.model import REMAP_SCALES, parse_scales

    cfg["scales"] = parse_scales(options.scales) if options.scales else list(REMAP_SCALES)
    return build_model(cfg).to(device).eval()


def run_training(options: TrainRun) -> dict:
    """Train as `options` say; writes OUT/run.json, init.pt, log.jsonl, last.pt, model.pt.
    -> {"model": path of model.pt (None when the run had already finished), "history": [...]}."""
    import dataclasses

    import torch

    from remap_core.descriptor.checkpoint import save_checkpoint
    from remap_core.training.train import resume_training, train

    t_start = time.time()
    if options.cache is None:
        from remap_core.evaluation.benchmark import default_cache_dir

        options = dataclasses.replace(options, cache=default_cache_dir())
    device = _device(options.device)
    out = options.out
    last = os.path.join(out, "last.pt")
    torch.manual_seed(options.seed)
    progress = not options.quiet

    if options.resume:
        if not os.path.exists(last):
            raise FileNotFoundError(f"--resume but {last} does not exist; run without --resume "
                                    f"to start training in {out}")
        model, optimizer, state = resume_training(last, device)
        opts = TrainOptions.from_dict({**state["options"], "epochs": options.epochs})
        start_epoch, history = int(state["epoch"]) + 1, state["history"]
        scaler_state = state.get("scaler")
        record = _run_record(options, int(model.config["max_side"]))
        _check_same_run(out, record)
        if start_epoch > opts.epochs:
            print(f"{out} already trained for {state['epoch']} epochs (raise --epochs to go "
                  f"on): writing its final model again")
    else:
        if os.path.exists(last):
            raise ValueError(f"{out} already holds a training run (last.pt); pass --resume to "
                             f"continue it or choose another --out")
        model = new_model(options, device)
        if options.whole_map_at_init and not _can_weigh_whole_map(model,
                                                                  options.whole_map_weight):
            raise ValueError("--whole-map-at-init needs a REMAP head with the whole-map region "
                             "and a --whole-map-weight >= 0")
        opts = train_options(options)
        optimizer, start_epoch, history, scaler_state = None, 1, [], None
        record = _run_record(options, int(model.config["max_side"]))

    multiple = int(model.config["multiple"])
    check_training_data(options)
    # --fresh-views draws every epoch's views from the same photos: read them once
    family = family_photos(options) if options.fresh_views else None
    ts, source = load_training_set(options, int(model.config["max_side"]), multiple, family)
    print(f"training data: {source}: {ts.summary()}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(record, f, indent=1)

    caches = cache_frozen_trunk(model, ts, opts, options.resume, progress)
    if not options.resume:
        t0 = time.time()
        initialise_model(model, ts, options, caches)
        os.makedirs(out, exist_ok=True)
        fp0 = save_checkpoint(model, os.path.join(out, "init.pt"),
                              extra={"untrained": "KLW + whitening initialised, no SGD"})
        print(f"initialisation took {time.time() - t0:.1f}s; untrained model {fp0} saved to "
              f"{os.path.join(out, 'init.pt')}")

    n_cached = opts.freeze if opts.cache else 0
    validate = None if options.no_val else make_validator(options, model, n_cached, progress)
    if start_epoch <= opts.epochs:
        views_for_epoch = (fresh_views_for_training(model, options, opts, ts, progress, family)
                           if options.fresh_views else None)
        history = train(model, ts.images, ts.labels, opts, out, validate=validate,
                        optimizer=optimizer, start_epoch=start_epoch, history=history,
                        scaler_state=scaler_state, progress=progress, cache=caches.get(1.0),
                        groups=ts.groups, views_for_epoch=views_for_epoch)
    finalised = finalise_model(model, ts, options, caches)
    final_record = {"epoch": "final", **finalised}
    if validate is not None:
        final_record.update(validate(model))
    # plain JSON types (validation returns numpy scalars): the checkpoint loads weights_only
    final_record = json.loads(json.dumps(final_record, default=float))
    print(f"final model: {json.dumps(final_record)}")
    final = os.path.join(out, "model.pt")
    fp = save_checkpoint(model, final, extra={"trained": {"epochs": opts.epochs,
                                                          "source": source,
                                                          "history": history,
                                                          "final": final_record}})
    _print_summary(history, final, fp, time.time() - t_start)
    return {"model": final, "fingerprint": fp, "history": history}


def fresh_views_for_training(model, options: TrainRun, opts: TrainOptions, ts,
                             progress: bool = True, family: tuple[dict, str] | None = None):
    """--fresh-views: -> epoch -> (images, frozen-trunk cache at scale 1) of that epoch's draw
    (`epoch_views`), for `train`. The draw must give `ts`'s classes in `ts`'s order. The KLW,
    the initial and the final whitening are fitted on the first draw (`ts`)."""
    from remap_core.training.train import FrozenTrunkCache

    draw = epoch_views(options, int(model.config["max_side"]), int(model.config["multiple"]),
                       family)

    def views(epoch: int):
        fresh = draw(epoch)
        if not np.array_equal(fresh.labels, ts.labels):
            raise ValueError(f"epoch {epoch}'s views do not have the first draw's classes")
        cache = (FrozenTrunkCache(model, fresh.images, opts.freeze, progress=progress, scale=1.0)
                 if opts.cache and opts.freeze > 0 else None)
        return fresh.images, cache
    return views


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


def initialise_model(model, ts, options: TrainRun, caches: dict) -> None:
    """The untrained starting point: KLW from matching / non-matching pairs of the training
    set and whitening from its descriptors (unless --no-klw-init / --whiten none)."""
    from remap_core.training.train import initialise_klw

    rng = np.random.default_rng([options.seed, 2024])
    if not options.no_klw_init and model.config["head"] == "remap":
        w = initialise_klw(model, ts.images, ts.labels, options.klw_pairs, rng,
                           cache=caches.get(1.0))
        print(f"KLW initialised from {options.klw_pairs} matching / non-matching pairs: weights "
              f"{w.min():.3f}..{w.max():.3f} (layers x regions {w.shape[0]}x{w.shape[1]})")
    if options.whole_map_at_init and _weigh_whole_map(model, options.whole_map_weight) is not None:
        print(f"whole-map region weighed {options.whole_map_weight:g} x the grid's mean before "
              f"training")
    if options.whiten != "none":
        _fit_whitening(model, ts, options, caches, options.whiten, options.whiten_dim, rng)
        print(f"{options.whiten} whitening initialised: {model.head.out_dim} -> {model.dim}")


def finalise_model(model, ts, options: TrainRun, caches: dict) -> dict:
    """The last step of a run, on the trained model in place: (1) REMAP heads: the whole-map
    region's KLW weight set to `options.whole_map_weight` x the mean of the grid regions'
    (`klw.weigh_whole_map`; None keeps the trained weight); (2) the whitening refitted on the
    trained model's descriptors of the training images (`options.final_whiten`, as
    `initialise_model` fits it; "keep": the whitening as trained).

    Why: the triplet loss co-adapts the whitening with the training views' generator; a PCA
    whitening refitted after training, as Radenović et al. learn theirs after fine-tuning,
    generalises better. And the KLW weights estimated and trained on generated views leave the
    grid regions outvoting the whole map under real clutter (bench/RESULTS.md).
    -> what was done, for the checkpoint and the log."""
    if options.final_whiten not in FINAL_WHITENINGS:
        raise ValueError(f"--final-whiten {options.final_whiten!r}: choose one of "
                         f"{', '.join(FINAL_WHITENINGS)}")
    done: dict = {}
    if _weigh_whole_map(model, options.whole_map_weight) is not None:
        done["whole_map_weight"] = options.whole_map_weight
    if options.final_whiten != "keep" and model.whiten is not None:
        model.eval()
        _fit_whitening(model, ts, options, caches, options.final_whiten, model.dim,
                       np.random.default_rng([options.seed, 2025]))
        done["final_whitening"] = options.final_whiten
    return done


def _can_weigh_whole_map(model, factor: float | None) -> bool:
    """A whole-map weight applies: a factor is given and the head is REMAP with the whole map."""
    return (factor is not None and model.config["head"] == "remap"
            and getattr(model.head, "include_global", False))


def _weigh_whole_map(model, factor: float | None) -> float | None:
    """REMAP heads with the whole-map region: its KLW weight set to `factor` x the grid's mean
    (`klw.weigh_whole_map`), in place. -> factor, or None where it does not apply."""
    from remap_core.fitting.klw import weigh_whole_map

    if not _can_weigh_whole_map(model, factor):
        return None
    head = model.head
    head.set_region_weights(weigh_whole_map(head.region_weights.detach().cpu().numpy(), factor))
    return factor


def _fit_whitening(model, ts, options: TrainRun, caches: dict, kind: str, dim: int,
                   rng: np.random.Generator) -> None:
    """The whitening a run fits on its training set (`train.initialise_whitening`), at the start
    and again in the final step: `kind` ("pca" or "learned") to `dim`, from the model's pooled
    descriptors at every test-time scale."""
    from remap_core.training.train import initialise_whitening

    initialise_whitening(model, ts.images, ts.labels, dim, kind,
                         n_pairs=max(options.klw_pairs, 1000), rng=rng, caches=caches,
                         shrinkage=options.whiten_shrinkage)


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


def benchmark_training_photos(options: TrainRun, side: int) -> tuple[dict, int]:
    """The benchmark's train-split photos plus, unless --no-extra-photos (or --no-debian), the
    training-only photos (Debian wallpapers and PyPI wheels' sample photos; {name: PIL image, long
    side at most `side`}): never an evaluation photo. Returns (photos, how many of them are
    training-only photos)."""
    from remap_core.evaluation.benchmark import benchmark_photos, training_only_photos

    photos = benchmark_photos("train", options.cache, debian=not options.no_debian, max_side=side,
                              max_photos=options.max_photos)
    if not photos:
        raise ValueError("the benchmark's train split holds no photos: is scikit-image "
                         "installed? (or drop --no-debian)")
    extra = {}
    if not (options.no_extra_photos or options.no_debian):
        extra = training_only_photos(options.cache, side, pypi=not options.no_pypi_photos)
        extra = dict(list(extra.items())[:options.max_photos]) if options.max_photos else extra
    return {**photos, **extra}, len(extra)


def make_validator(options: TrainRun, model, n_frozen: int, progress: bool = True):
    """A function model -> {"map": ..., "mP@5": ..., "per_nuisance": ...} on the benchmark's
    eval split, computing what `model.embed_arrays` (and so `remap embed`) computes, with the
    model's own multi-scale inference; frozen backbone units are run once, not every epoch."""
    from PIL import Image

    from remap_core.evaluation.benchmark import build_benchmark
    from remap_core.evaluation.evaluate import score
    from remap_core.data.preprocess import resize_for_model
    from remap_core.training.train import CachedEmbedder

    bench = build_benchmark("eval", options.cache, views_per_nuisance=options.views_per_nuisance,
                            seed=options.val_seed, side=options.side, debian=not options.no_debian,
                            max_photos=options.max_photos)
    max_side, multiple = int(model.config["max_side"]), int(model.config["multiple"])
    images = [resize_for_model(Image.fromarray(im), max_side, multiple) for im in bench.images]
    print(f"validation: benchmark eval split, {bench.summary()}")
    cached = CachedEmbedder(model, images, n_frozen, progress=progress) if n_frozen > 0 else None

    def validate(m) -> dict:
        r = score(cached(m) if cached is not None else m.embed_arrays(images), bench)
        return {"map": round(r["mAP"], 5), "mP@5": round(r["mP@5"], 5),
                "per_nuisance": {k: round(v, 4) for k, v in r["per_nuisance"].items()}}

    return validate
