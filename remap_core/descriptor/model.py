"""The retrieval network: backbone taps -> head -> (whitening) -> L2, built from one config dict.

Input convention: float tensors (B, 3, H, W) on a 0..255 scale; the model normalises internally,
so the normalisation is part of the model (and of its fingerprint), not of the caller.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from remap_core.descriptor.backbones import build_backbone
from remap_core.descriptor.batching import shape_batches
from remap_core.descriptor.heads import build_head
from remap_core.descriptor.pooling import l2n, resize_batch

DEFAULT_CONFIG: dict = {
    "backbone": "efficientnet_lite0",
    "taps": ["head"],
    "head": "gem",
    "head_args": {"p": 3.0},
    "whiten_dim": None,      # None: no whitening layer; int: PCA-whitening Linear to this dim
    "max_side": 512,         # long side of the network input
    "multiple": 32,          # short side snapped to a multiple of this (batching by shape)
    "scales": [1.0],         # multi-scale inference: descriptors summed over scales, then L2
}


# Per-head defaults used when a config names a head but not its head_args / scales.
HEAD_DEFAULT_ARGS: dict[str, dict] = {
    "mac": {}, "spoc": {}, "gem": {"p": 3.0}, "rmac": {"levels": 3},
    "remap": {"levels": 3, "include_global": True},
}
REMAP_SCALES = [1.0, 2 ** -0.5, 0.5]


def parse_scales(text: str) -> list[float]:
    """"1,1/sqrt(2),0.5" -> [1.0, 0.7071..., 0.5]: numbers, +-*/ and sqrt() only."""
    import ast
    import math
    import operator

    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv}

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "sqrt" and len(node.args) == 1):
            return math.sqrt(value(node.args[0]))
        raise ValueError(f"cannot read scale {text!r}: use numbers, / and sqrt(), e.g. "
                         f"1,1/sqrt(2),0.5")

    out = [value(ast.parse(t.strip(), mode="eval").body) for t in text.split(",") if t.strip()]
    if not out or any(s <= 0 for s in out):
        raise ValueError(f"scales must be positive numbers, got {text!r}")
    return out


def make_config(**overrides) -> dict:
    """DEFAULT_CONFIG with overrides applied; unknown keys are an error (typos fail loudly).

    Naming a head without head_args gives that head's defaults; a "remap" head without scales
    gets the REMAP multi-scale default (1, 1/sqrt(2), 1/2).
    """
    unknown = set(overrides) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown model config key(s) {sorted(unknown)}; "
                         f"known: {sorted(DEFAULT_CONFIG)}")
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    head = overrides.get("head", cfg["head"])
    if "head_args" not in overrides and head in HEAD_DEFAULT_ARGS:
        cfg["head_args"] = copy.deepcopy(HEAD_DEFAULT_ARGS[head])
    if "scales" not in overrides and head == "remap":
        cfg["scales"] = list(REMAP_SCALES)
    cfg.update(copy.deepcopy(overrides))
    cfg["taps"] = list(cfg["taps"])
    cfg["scales"] = [float(s) for s in cfg["scales"]]
    return cfg


class RetrievalNet(nn.Module):
    """Backbone + head + optional learned whitening + L2: (B, 3, H, W) in 0..255 -> (B, D)."""

    def __init__(self, config: dict, backbone_weights: str | None = "default"):
        super().__init__()
        self.config = make_config(**config)
        cfg = self.config
        self.backbone, self.spec = build_backbone(cfg["backbone"], tuple(cfg["taps"]),
                                                  backbone_weights)
        channels = [self.spec.channels[t] for t in cfg["taps"]]
        self.head = build_head(cfg["head"], channels, **(cfg["head_args"] or {}))
        self.whiten = (nn.Linear(self.head.out_dim, int(cfg["whiten_dim"]), bias=True)
                       if cfg["whiten_dim"] else None)
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return int(self.config["whiten_dim"] or self.head.out_dim)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone taps: (B, 3, H, W) in 0..255 -> [(B, C_t, H_t, W_t) for each tap]."""
        return self.backbone((x - self.mean) / self.std)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Head output before whitening: (B, 3, H, W) in 0..255 -> (B, D_head)."""
        return self.head(self.features(x))

    def describe(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Descriptor from already computed backbone taps: head -> whitening -> L2 -> (B, D).

        Lets several heads share one backbone pass (benchmarks); `forward` is
        `describe(features(x))`.
        """
        v = self.head(feats)
        if self.whiten is not None:
            v = self.whiten(v)
        return l2n(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Single-scale descriptor: (B, 3, H, W) in 0..255 -> (B, D), L2-normalised."""
        return self.describe(self.features(x))

    def forward_multiscale(self, x: torch.Tensor, scales: list[float] | None = None) -> torch.Tensor:
        """Sum of single-scale descriptors over `scales` (default: the config's), L2-normalised."""
        scales = scales or self.config["scales"]
        if len(scales) == 1 and scales[0] == 1.0:
            return self(x)
        return l2n(sum(self(resize_batch(x, s)) for s in scales))

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def embed_arrays(self, images: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """Embed uint8 (H, W, 3) arrays -> (N, D) float32, batching images of equal shape.
        On a GPU: uint8 batches copied through pinned memory, converted there, mixed
        precision (autocast)."""
        from remap_core.descriptor.devices import to_device

        out = np.zeros((len(images), self.dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        use_amp = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=use_amp):
            for chunk in shape_batches(images, batch_size):
                batch = to_device(np.stack([images[i] for i in chunk]), self.device)
                batch = batch.permute(0, 3, 1, 2).float()
                out[chunk] = self.forward_multiscale(batch).float().cpu().numpy()
        self.train(was_training)
        return out


def build_model(config: dict | None = None, backbone_weights: str | None = "default") -> RetrievalNet:
    """The one constructor: a RetrievalNet from a (partial) config dict."""
    return RetrievalNet(make_config(**(config or {})), backbone_weights)
