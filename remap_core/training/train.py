"""The training loop: triplet loss over hard-negative tuples re-mined every epoch.

One optimiser (Adam) over the trainable backbone blocks, the head (REMAP's KLW region/layer
weights) and the whitening layer, with a learning rate per group. Batch-norm statistics stay
frozen (tuples are small and of mixed shapes), early backbone blocks can be frozen, and KLW is
kept non-negative after every step. Each epoch: embed the training images with the current
model, mine tuples, take the optimiser steps, validate, log one JSON line, save a resumable
checkpoint (weights + config + fingerprint via `checkpoint.save_checkpoint`, plus the optimiser
state and epoch in its `extra`). The saved file loads unchanged with `checkpoint.load_model`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np
import torch
from torch import nn

from remap_core.descriptor.batching import shape_batches
from remap_core.descriptor.checkpoint import read_checkpoint, save_checkpoint
from remap_core.training.losses import active_fraction, triplet_loss
from remap_core.descriptor.model import RetrievalNet, build_model, make_config
from remap_core.data.tuples import Tuples, build_tuples, sample_anchor_positive

log = logging.getLogger(__name__)

TRAIN_STATE_KEY = "train_state"


@dataclass
class TrainOptions:
    """Everything that shapes a training run (stored in every checkpoint, so --resume agrees)."""

    # defaults: the recipe measured in bench/RESULTS.md ("Training"), ~18 min on 2 CPU cores
    epochs: int = 5
    tuples_per_epoch: int = 800
    negatives: int = 5            # hard negatives per tuple, at most one per class
    pool_size: int | None = None  # negative pool drawn each epoch; None: every training image
    batch_tuples: int = 16        # tuples per optimiser step
    margin: float = 0.1           # on squared distances of L2-normalised descriptors (0..4)
    lr: float = 1e-5              # trainable backbone blocks
    lr_head: float = 1e-2         # head parameters (KLW, softplus-parametrised)
    # whitening: trained, slowly. At 1e-4 it trades clutter for the other nuisances
    # (bench/train_ablation.py: -2.5 clutter mAP after 400 tuples); at 1e-6 it did not move
    lr_whiten: float = 1e-5
    weight_decay: float = 1e-6
    optimizer: str = "adam"       # "adam", or "sgd" (momentum 0.9) as in the paper
    freeze: int = 0               # leading backbone units (stem, blocks / stages) kept frozen
    seed: int = 0
    amp: bool = True              # mixed precision when training on CUDA
    cache: bool = True            # compute the frozen units once per image (see FrozenTrunkCache)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- model surgery

def backbone_units(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's sequential units, input side first (what --freeze counts)."""
    if hasattr(backbone, "blocks") and hasattr(backbone, "stem"):       # EfficientNet-Lite taps
        units = [backbone.stem, *backbone.blocks]
        if hasattr(backbone, "conv_head"):
            units.append(backbone.conv_head)
        return units
    if hasattr(backbone, "stages"):                                     # torchvision trunks
        return list(backbone.stages)
    return list(backbone.children())


def freeze_backbone(model: RetrievalNet, n_units: int) -> int:
    """Freeze the first `n_units` backbone units; returns how many remain trainable."""
    units = backbone_units(model.backbone)
    if n_units > len(units):
        raise ValueError(f"--freeze {n_units} exceeds the backbone's {len(units)} units")
    for i, unit in enumerate(units):
        for p in unit.parameters():
            p.requires_grad_(i >= n_units)
    return len(units) - n_units


def klw_parameters(model: RetrievalNet) -> list[nn.Parameter]:
    """Head parameters that *are* region/layer weights and so must be clamped at zero.

    Empty when the head parametrises its weights to be non-negative by construction (REMAPHead
    stores `klw_raw` and uses softplus(klw_raw), exposed as `region_weights`).
    """
    head = model.head
    if hasattr(head, "region_weights"):
        return []
    return [p for n, p in head.named_parameters() if "klw" in n.lower()]


@torch.no_grad()
def keep_klw_non_negative(model: RetrievalNet) -> None:
    """Clamp directly stored KLW weights at zero after a step (projected SGD)."""
    for p in klw_parameters(model):
        p.clamp_(min=0.0)


def parameter_groups(model: RetrievalNet, opts: TrainOptions) -> list[dict]:
    """Optimiser groups: trainable backbone, head, whitening, each with its learning rate."""
    groups = [
        {"name": "backbone", "lr": opts.lr,
         "params": [p for p in model.backbone.parameters() if p.requires_grad]},
        {"name": "head", "lr": opts.lr_head,
         "params": [p for p in model.head.parameters() if p.requires_grad]},
        {"name": "whiten", "lr": opts.lr_whiten,
         "params": [] if model.whiten is None else list(model.whiten.parameters())},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model: RetrievalNet, opts: TrainOptions) -> torch.optim.Optimizer:
    groups = parameter_groups(model, opts)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen; lower --freeze")
    if opts.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=opts.lr, momentum=0.9, weight_decay=opts.weight_decay)
    if opts.optimizer != "adam":
        raise ValueError(f"unknown optimizer {opts.optimizer!r}; use adam or sgd")
    return torch.optim.Adam(groups, weight_decay=opts.weight_decay)


# --------------------------------------------------------------------------- forward passes

def _to_batch(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float()


def tap_units(backbone: nn.Module) -> dict[str, int]:
    """Tap name -> index (in `backbone_units`) of the unit whose output it is."""
    if hasattr(backbone, "blocks") and hasattr(backbone, "stage_ends"):   # EfficientNet-Lite
        out = dict(backbone.stage_ends)               # stage end k = output of unit k (stem = 0)
        out["head"] = len(backbone.blocks) + 1
        return out
    if hasattr(backbone, "stages") and hasattr(backbone, "stage_names"):
        return {name: i for i, name in enumerate(backbone.stage_names)}
    raise ValueError(f"cannot cache features of backbone {type(backbone).__name__}; "
                     f"train with --no-cache")


class FrozenTrunkCache:
    """Outputs of the frozen leading backbone units, computed once per image.

    With batch-norm statistics frozen and the first `n_frozen` units' weights fixed, their
    output for a given image never changes, so training only runs the trainable tail: the same
    descriptors as `model(x)` at a fraction of the cost. Invalid once the frozen units change.
    """

    def __init__(self, model: RetrievalNet, images: list[np.ndarray], n_frozen: int,
                 batch_size: int = 16, progress: bool = False, scale: float = 1.0):
        from tqdm import tqdm

        from remap_core.descriptor.pooling import resize_batch

        self.model = model
        self.units = backbone_units(model.backbone)
        where = tap_units(model.backbone)
        self.tap_unit = [where[t] for t in model.config["taps"]]
        self.last_unit = max(self.tap_unit)
        self.n_frozen = min(int(n_frozen), self.last_unit + 1)
        self.entries: list = [None] * len(images)    # per image: (output, {tap unit: output})
        batches = list(shape_batches(images, batch_size))
        with torch.no_grad():
            for idx in tqdm(batches, desc="cache frozen trunk", unit="batch",
                            disable=not progress, leave=False):
                x = resize_batch(_to_batch([images[i] for i in idx], model.device), scale)
                x = (x - model.mean) / model.std
                kept: dict[int, torch.Tensor] = {}
                for u in range(self.n_frozen):
                    x = self.units[u](x)
                    if u in self.tap_unit:
                        kept[u] = x
                for j, i in enumerate(idx):
                    self.entries[i] = (x[j], {u: t[j] for u, t in kept.items()})

    def features(self, index: list[int]) -> list[torch.Tensor]:
        """Backbone taps of images[index] (all of one shape) from the cached frozen output."""
        x = torch.stack([self.entries[i][0] for i in index])
        out = {u: torch.stack([self.entries[i][1][u] for i in index])
               for u in self.entries[index[0]][1]}
        for u in range(self.n_frozen, self.last_unit + 1):
            x = self.units[u](x)
            if u in self.tap_unit:
                out[u] = x
        return [out[u] for u in self.tap_unit]


def _features(model: RetrievalNet, images: list[np.ndarray], idx: list[int],
              cache: FrozenTrunkCache | None) -> list[torch.Tensor]:
    if cache is not None:
        return cache.features(idx)
    return model.features(_to_batch([images[i] for i in idx], model.device))


def embed_images(model: RetrievalNet, images: list[np.ndarray], batch_size: int = 32,
                 cache: FrozenTrunkCache | None = None) -> np.ndarray:
    """Single-scale descriptors of uint8 (H, W, 3) images with the current weights: (N, D)."""
    out = np.zeros((len(images), model.dim), dtype=np.float32)
    use_amp = model.device.type == "cuda"
    with torch.inference_mode(), torch.autocast(model.device.type, enabled=use_amp):
        for idx in shape_batches(images, batch_size):
            out[idx] = model.describe(_features(model, images, idx, cache)).float().cpu().numpy()
    return out


def describe_with_grad(model: RetrievalNet, images: list[np.ndarray], index: np.ndarray,
                       cache: FrozenTrunkCache | None = None) -> dict[int, torch.Tensor]:
    """Descriptors (with autograd) of images[index], forwarded in batches of equal shape."""
    out: dict[int, torch.Tensor] = {}
    for idx in shape_batches(images, max(1, len(index)), index.tolist()):
        desc = model.describe(_features(model, images, idx, cache))
        for j, i in enumerate(idx):
            out[i] = desc[j]
    return out


def tuple_loss(model: RetrievalNet, images: list[np.ndarray], tuples: Tuples, margin: float,
               cache: FrozenTrunkCache | None = None) -> tuple[torch.Tensor, float]:
    """Triplet loss of a batch of tuples, each image forwarded once: -> (loss, active share)."""
    desc = describe_with_grad(model, images, tuples.images(), cache)
    a = torch.stack([desc[i] for i in tuples.anchors.tolist()]).float()
    p = torch.stack([desc[i] for i in tuples.positives.tolist()]).float()
    n = torch.stack([torch.stack([desc[i] for i in row]) for row in tuples.negatives.tolist()]
                    ).float()
    return triplet_loss(a, p, n, margin), active_fraction(a, p, n, margin)


class CachedEmbedder:
    """`model.embed_arrays(images)` (multi-scale, the model's own scales) for a fixed image set,
    re-run cheaply after every epoch: the frozen units are cached once per image and scale."""

    def __init__(self, model: RetrievalNet, images: list[np.ndarray], n_frozen: int,
                 batch_size: int = 16, progress: bool = False):
        self.images = images
        self.scales = list(model.config["scales"])
        self.batch_size = batch_size
        self.caches = [FrozenTrunkCache(model, images, n_frozen, batch_size, progress, s)
                       for s in self.scales]

    def __call__(self, model: RetrievalNet) -> np.ndarray:
        """(N, D) L2-normalised descriptors with the model's current weights."""
        from remap_core.descriptor.pooling import l2n

        out = np.zeros((len(self.images), model.dim), dtype=np.float32)
        use_amp = model.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(model.device.type, enabled=use_amp):
            for idx in shape_batches(self.images, self.batch_size):
                v = sum(model.describe(c.features(idx)).float() for c in self.caches)
                out[idx] = (v if len(self.caches) == 1 else l2n(v)).cpu().numpy()
        return out


# --------------------------------------------------------------------------- initialisation

@torch.no_grad()
def pooled_descriptors(model: RetrievalNet, images: list[np.ndarray], batch_size: int = 32,
                       scale: float = 1.0, cache: FrozenTrunkCache | None = None) -> np.ndarray:
    """Head outputs before whitening (what whitening is learned on), of the images resized by
    `scale` (`cache`, when given, must have been built at that scale): -> (N, D_head)."""
    from remap_core.descriptor.pooling import resize_batch

    out = np.zeros((len(images), model.head.out_dim))
    for idx in shape_batches(images, batch_size):
        if cache is not None:
            feats = cache.features(idx)
        else:
            feats = model.features(resize_batch(_to_batch([images[i] for i in idx],
                                                          model.device), scale))
        out[idx] = model.head(feats).float().cpu().numpy()
    return out


def sample_pairs(labels: np.ndarray, n: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """n matching and n non-matching index pairs: -> (n, 2), (n, 2)."""
    labels = np.asarray(labels)
    a, p = sample_anchor_positive(labels, n, rng)
    match = np.stack([a, p], axis=1)
    if len(np.unique(labels)) < 2:
        raise ValueError("all training images share one label; non-matching pairs need two "
                         "classes or more")
    nonmatch = []
    while len(nonmatch) < n:
        i, j = rng.integers(len(labels), size=2)
        if labels[i] != labels[j]:
            nonmatch.append((i, j))
    return match, np.asarray(nonmatch, dtype=np.int64)


@torch.no_grad()
def initialise_klw(model: RetrievalNet, images: list[np.ndarray], labels: np.ndarray,
                   n_pairs: int, rng: np.random.Generator, method: str = "gaussian",
                   cache: FrozenTrunkCache | None = None) -> np.ndarray:
    """Set the REMAP head's KLW weights to the KL divergence between the region-distance
    distributions of `n_pairs` matching and `n_pairs` non-matching pairs. Returns the weights
    (layers, canonical regions)."""
    from remap_core.fitting.klw import fit_region_weights

    if not hasattr(model.head, "set_region_weights"):
        raise ValueError(f"head {model.config['head']!r} has no KLW weights; train with "
                         f"--head remap or pass --no-klw-init")
    match, nonmatch = sample_pairs(labels, n_pairs, rng)
    used = np.unique(np.concatenate([match.ravel(), nonmatch.ravel()]))
    batches = ((idx, _features(model, images, idx, cache))
               for idx in shape_batches(images, 16, used))
    weights = fit_region_weights(model.head, batches, match, nonmatch, method=method)
    model.head.set_region_weights(weights)
    return weights


def initialise_whitening(model: RetrievalNet, images: list[np.ndarray], labels: np.ndarray,
                         dim: int, kind: str = "learned", n_pairs: int = 1000,
                         rng: np.random.Generator | None = None,
                         caches: dict[float, FrozenTrunkCache] | None = None,
                         shrinkage: float = 0.0) -> None:
    """Learn a whitening on the model's pooled descriptors of the training images and put it
    into the model (`whiten.set_model_whitening`). Every test-time scale of the model gives one
    sample per image (as `remap eval` learns it). kind: "pca" or "learned" (Radenović's Lw,
    from matching pairs within a scale)."""
    from remap_core.fitting.whiten import fit_whitening, set_model_whitening

    if kind not in ("pca", "learned"):
        raise ValueError(f"unknown whitening {kind!r}; use 'pca' or 'learned'")
    scales = list(model.config["scales"])
    caches = caches or {}
    x = [pooled_descriptors(model, images, scale=s, cache=caches.get(s)) for s in scales]
    match = None
    if kind == "learned":
        match, _ = sample_pairs(labels, n_pairs, rng or np.random.default_rng(0))
    mean, projection = fit_whitening(x, kind, dim, match, shrinkage=shrinkage)
    set_model_whitening(model, mean, projection)


# --------------------------------------------------------------------------- checkpoints

def save_training_checkpoint(model: RetrievalNet, path: str, optimizer: torch.optim.Optimizer,
                             scaler, epoch: int, opts: TrainOptions, history: list[dict]) -> str:
    """A model checkpoint that also carries what --resume needs. Returns the fingerprint."""
    state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "options": asdict(opts),
             "history": history}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return save_checkpoint(model, path, extra={TRAIN_STATE_KEY: state})


def resume_training(path: str, device: torch.device, opts: TrainOptions | None = None
                    ) -> tuple[RetrievalNet, torch.optim.Optimizer, dict]:
    """Rebuild model and optimiser from a training checkpoint. Returns (model, optimiser,
    train state); the stored options are used unless `opts` overrides them."""
    ckpt = read_checkpoint(path)
    state = ckpt.get("extra", {}).get(TRAIN_STATE_KEY)
    if state is None:
        raise ValueError(f"{path} is a model checkpoint without training state (optimiser, "
                         f"epoch); resume from the last.pt that `remap train` writes, or start "
                         f"a new run with --init-model {path}")
    model = build_model(make_config(**ckpt["config"]), backbone_weights=None)
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    opts = opts or TrainOptions.from_dict(state["options"])
    freeze_backbone(model, opts.freeze)
    optimizer = make_optimizer(model, opts)
    optimizer.load_state_dict(state["optimizer"])
    return model, optimizer, state


# --------------------------------------------------------------------------- the loop

Validate = Callable[[RetrievalNet], dict]


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def train(model: RetrievalNet, images: list[np.ndarray], labels: np.ndarray, opts: TrainOptions,
          out_dir: str, validate: Validate | None = None,
          optimizer: torch.optim.Optimizer | None = None, start_epoch: int = 1,
          history: list[dict] | None = None, scaler_state: dict | None = None,
          progress: bool = True, cache: FrozenTrunkCache | None = None,
          groups: np.ndarray | None = None,
          views_for_epoch: Callable[[int], tuple[list[np.ndarray], FrozenTrunkCache | None]]
          | None = None) -> list[dict]:
    """Train `model` in place for epochs start_epoch..opts.epochs; returns the log records.

    Writes out_dir/last.pt (resumable) and out_dir/log.jsonl every epoch. With `validate`, an
    epoch-0 record of the initial model is logged first (when starting from epoch 1). `cache`:
    a FrozenTrunkCache of `images` at scale 1 built with `opts.freeze` (built here if absent).
    `groups`: (N,) source of each image's class; no anchor takes a negative from its own group
    (see `tuples.hardest_negatives`). `views_for_epoch`: epoch -> (images, cache) of that
    epoch's fresh views, the same classes in the same order as `labels`; called for every epoch
    after the first (which trains on `images`).
    """
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    labels = np.asarray(labels, dtype=np.int64)
    device = model.device
    model.eval()                      # frozen batch-norm statistics; autograd still runs
    freeze_backbone(model, opts.freeze)
    optimizer = optimizer or make_optimizer(model, opts)
    use_amp = opts.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    history = list(history or [])
    if cache is None and opts.cache and opts.freeze > 0:
        cache = FrozenTrunkCache(model, images, opts.freeze, progress=progress)
    log_path = os.path.join(out_dir, "log.jsonl")
    ckpt_path = os.path.join(out_dir, "last.pt")

    def emit(record: dict) -> None:
        # plain JSON types only: numpy scalars (e.g. from metrics) would make the checkpoint
        # unreadable under torch.load(weights_only=True)
        record = json.loads(json.dumps(record, default=float))
        history.append(record)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    if start_epoch == 1 and validate is not None and not history:
        t0 = time.time()
        emit({"epoch": 0, **validate(model), "val_s": round(time.time() - t0, 1)})

    steps = math.ceil(opts.tuples_per_epoch / opts.batch_tuples)
    for epoch in range(start_epoch, opts.epochs + 1):
        t0 = time.time()
        views_s = None
        if views_for_epoch is not None and epoch > 1:
            images, cache = views_for_epoch(epoch)
            if len(images) != len(labels):
                raise ValueError(f"epoch {epoch}'s views are {len(images)} images for "
                                 f"{len(labels)} labels")
            views_s = round(time.time() - t0, 1)
        torch.manual_seed(opts.seed * 1000 + epoch)
        rng = _epoch_rng(opts.seed, epoch)
        t_mine = time.time()
        vecs = embed_images(model, images, cache=cache)        # mine with the current model
        tuples = build_tuples(vecs, labels, opts.tuples_per_epoch, opts.negatives, rng,
                              opts.pool_size, groups)
        mine_s = time.time() - t_mine
        losses, actives = [], []
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{opts.epochs}", unit="step",
                   disable=not progress, dynamic_ncols=True)
        for s in bar:
            sl = slice(s * opts.batch_tuples, (s + 1) * opts.batch_tuples)
            batch = Tuples(tuples.anchors[sl], tuples.positives[sl], tuples.negatives[sl])
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=use_amp):
                loss, active = tuple_loss(model, images, batch, opts.margin, cache)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            keep_klw_non_negative(model)
            losses.append(float(loss.detach()))
            actives.append(active)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", active=f"{np.mean(actives):.2f}")
        bar.close()
        record = {"epoch": epoch, "loss": round(float(np.mean(losses)), 6),
                  "active": round(float(np.mean(actives)), 4), "tuples": len(tuples),
                  "mine_s": round(mine_s, 1), "train_s": round(time.time() - t_mine - mine_s, 1),
                  **({} if views_s is None else {"views_s": views_s})}
        if validate is not None:
            tv = time.time()
            record.update(validate(model))
            record["val_s"] = round(time.time() - tv, 1)
        emit(record)
        save_training_checkpoint(model, ckpt_path, optimizer, scaler, epoch, opts, history)
    return history
