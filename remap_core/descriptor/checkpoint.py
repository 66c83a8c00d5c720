"""Checkpoints (weights + config + fingerprint in one file), the one model fingerprint, and the
models that ship with remap.

`load_model(path_or_url)` rebuilds a model with no other argument. Names instead of paths:

- "remap-lite0-v4" (also "remap" and `None`: the default): the trained REMAP model shipped in
  `remap_core/models/` (MODEL.md: backbone, taps, training recipe, fingerprint, benchmarks);
- "remap-lite0-v3": the default before it (the same recipe with one draw of the training views
  for all epochs instead of new views every epoch);
- "remap-lite0-v2": the default before v3 (the same recipe on fewer training photos), and
  "remap-lite0-v1" (v2's trained weights without the final step: the whole-map weight and the
  refitted whitening), both kept for stores and indexes built with them;
- "gem-lite0-v1": the same backbone with a GeM head, trained by the shipped model's recipe at
  equal budget, whitening as trained (MODEL.md, "gem-lite0-v1"): the trained baseline;
- "gem", "mac", "spoc", "rmac": EfficientNet-Lite0 ImageNet weights with that head, untrained
  (the baselines; "gem" was the default before the trained REMAP model shipped).
"""

from __future__ import annotations

import hashlib
import io
import json

import torch

from remap_core.descriptor.model import RetrievalNet, build_model, make_config

CHECKPOINT_FORMAT = "remap-checkpoint/1"

SHIPPED_MODELS = {"remap-lite0-v4": "remap-lite0-v4.pt",  # name -> file in remap_core/models/
                  "remap-lite0-v3": "remap-lite0-v3.pt",
                  "remap-lite0-v2": "remap-lite0-v2.pt",
                  "remap-lite0-v1": "remap-lite0-v1.pt",
                  "gem-lite0-v1": "gem-lite0-v1.pt"}
MODEL_ALIASES = {"remap": "remap-lite0-v4"}                # "remap": the current default
DEFAULT_MODEL = MODEL_ALIASES["remap"]
BASELINE_MODELS = ("gem", "mac", "spoc", "rmac")


def shipped_model_path(name: str = DEFAULT_MODEL) -> str:
    """Local path of a model file that ships inside the package."""
    from importlib.resources import files

    name = MODEL_ALIASES.get(name, name)
    path = files("remap_core").joinpath("models", SHIPPED_MODELS[name])
    if not path.is_file():
        raise FileNotFoundError(f"the shipped model {name!r} is missing from the installation "
                                f"({path}); reinstall remap, or pass --model PATH")
    return str(path)


def model_name(name_or_uri: str | None) -> str | None:
    """The name to record for a model argument: the default (None) and aliases become the
    versioned shipped name (so a store or index keeps naming the model it was built with when
    the default changes); anything else as given."""
    if name_or_uri is None:
        return DEFAULT_MODEL
    return MODEL_ALIASES.get(name_or_uri, name_or_uri)


def resolve_model(name_or_uri: str | None) -> str:
    """A model argument as the user gave it -> what `load_model` reads: the default (None),
    aliases and shipped names become their file; baseline names stay names; anything else is a
    path or URL."""
    name = model_name(name_or_uri)
    if name in SHIPPED_MODELS:
        return shipped_model_path(name)
    return name


def model_fingerprint(model: RetrievalNet) -> str:
    """Architecture + weights + preprocessing, as `<backbone>.<head>.d<dim>.<sha256[:16]>`."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    cfg = model.config
    return f"{cfg['backbone']}.{cfg['head']}.d{model.dim}.{h.hexdigest()[:16]}"


def save_checkpoint(model: RetrievalNet, path_or_url: str, extra: dict | None = None,
                    half: bool = False) -> str:
    """Write weights, config and fingerprint to one file (local path or fsspec URL).

    Written to a temporary name and renamed (`remap_store.files`). Returns the fingerprint.
    `half`: store float tensors as float16 (half the bytes, for shipping). The model itself is
    rounded to float16 precision first, so the fingerprint, the saved file and the model in
    memory all agree; loading casts back to float32.
    """
    from remap_store.files import write_bytes_atomic

    if half:
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.half().float())
    fp = model_fingerprint(model)
    blob = io.BytesIO()
    state = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "config": model.config, "fingerprint": fp,
                "state_dict": state, "extra": extra or {}}, blob)
    write_bytes_atomic(path_or_url, blob.getvalue())
    return fp


def read_checkpoint(path_or_url: str) -> dict:
    """The raw checkpoint dict, validated for format."""
    import fsspec

    try:
        with fsspec.open(path_or_url, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model checkpoint not found: {path_or_url}") from e
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path_or_url} is not a readable remap checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path_or_url} is not a remap checkpoint (expected format "
                         f"{CHECKPOINT_FORMAT}); make one with `remap train` or save_checkpoint")
    return ckpt


def load_model(path_or_url: str | None = None, device: str | None = None) -> RetrievalNet:
    """Rebuild a model from a checkpoint, a shipped or baseline name (see the module docstring),
    or the shipped default when None, in eval mode, on `device` (None: a CUDA GPU when one is
    visible, else the CPU; "cuda" without one: ValueError).

    The stored fingerprint is checked against the loaded weights, so a damaged or edited file is
    refused rather than silently producing different embeddings.
    """
    path_or_url = resolve_model(path_or_url)
    baseline = path_or_url in BASELINE_MODELS
    if baseline:
        model = build_model({"head": path_or_url})
    else:
        ckpt = read_checkpoint(path_or_url)
        model = build_model(make_config(**ckpt["config"]), backbone_weights=None)
        model.load_state_dict(ckpt["state_dict"])
        got = model_fingerprint(model)
        if got != ckpt["fingerprint"]:
            raise ValueError(f"checkpoint {path_or_url} fingerprint {ckpt['fingerprint']} does not "
                             f"match its weights ({got}); the file is damaged or was edited")
    from remap_core.descriptor.devices import resolve_device

    model.to(resolve_device(device)).eval()
    model.fingerprint = model_fingerprint(model) if baseline else ckpt["fingerprint"]
    return model


def export_model(src: str, dst: str, max_side: int | None = None, half: bool = True,
                 note: str | None = None, scales: list[float] | None = None) -> str:
    """A checkpoint as it is deployed: `src` (path/URL/name) with its network input's long side
    set to `max_side` (training usually runs smaller than inference), its test-time `scales`
    replaced (None: kept; the descriptor is the L2-normalised sum over them, so a larger scale
    such as sqrt(2) finds smaller objects at about twice the embedding cost) and float16
    weights (`half`), written to `dst`. Returns the new fingerprint (input size, scales and
    rounding are part of it, so vectors embedded at other scales never mix with its own). The
    source's `extra` (training history) is kept, with an "exported" record added."""
    ckpt = read_checkpoint(resolve_model(src)) if src not in BASELINE_MODELS else None
    model = load_model(src, device="cpu")
    if max_side is not None:
        if max_side < 32:
            raise ValueError(f"--max-side {max_side} is too small (at least 32)")
        model.config["max_side"] = int(max_side)
    if scales is not None:
        scales = [float(s) for s in scales]
        if not scales or any(not s > 0 for s in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"--scales must be distinct positive numbers, got {scales}")
        if model.config["max_side"] * min(scales) < 32:
            raise ValueError(f"--scales {min(scales):g} x --max-side {model.config['max_side']} "
                             f"is under 32 px: too small for the network")
        model.config["scales"] = scales
    extra = dict((ckpt or {}).get("extra") or {})
    extra["exported"] = {"from": src, "from_fingerprint": model.fingerprint,
                         "max_side": model.config["max_side"],
                         "scales": list(model.config["scales"]), "half": half,
                         **({"note": note} if note else {})}
    return save_checkpoint(model, dst, extra=extra, half=half)


def model_hint(fingerprint: str) -> str:
    """What to pass as --model to get `fingerprint` back, when it is a shipped or baseline model
    (for error messages about stores and indexes built with another model); else ""."""
    for name in (*SHIPPED_MODELS, *BASELINE_MODELS):
        head = name.split("-")[0]                    # "remap-lite0-v1" -> "remap", "gem" -> "gem"
        if f".{head}." not in fingerprint:          # <backbone>.<head>.d<dim>.<hash>
            continue
        try:
            if load_model(name, device="cpu").fingerprint == fingerprint:
                return name
        except (FileNotFoundError, ValueError):
            continue
    return ""
