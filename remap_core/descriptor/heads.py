"""Pooling heads as nn.Modules over a list of tapped feature maps.

Every head maps [(B, C_l, H_l, W_l) for each layer l] -> (B, D) and exposes `out_dim`.
Per layer the pooled vector is L2-normalised, then the layers are concatenated (multi-layer
aggregation) -- except REMAP, whose per-(layer, region) KLW weights also weigh the layers; the
model applies whitening and the final L2 after the head.
"""

from __future__ import annotations

import torch
from torch import nn

from remap_core.descriptor import pooling as P
from remap_core.descriptor.regions import canonical_region_count, canonical_region_index


class GlobalPoolHead(nn.Module):
    """MAC, SPoC or GeM on each layer, L2 per layer, concatenated."""

    def __init__(self, channels: list[int], kind: str = "gem", p: float = 3.0,
                 learn_p: bool = False):
        super().__init__()
        if kind not in ("mac", "spoc", "gem"):
            raise ValueError(f"unknown global pooling {kind!r}")
        self.kind = kind
        self.out_dim = int(sum(channels))
        if kind == "gem":
            self.p = nn.Parameter(torch.full((len(channels),), float(p)), requires_grad=learn_p)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        outs = []
        for i, f in enumerate(feats):
            if self.kind == "mac":
                v = P.mac(f)
            elif self.kind == "spoc":
                v = P.spoc(f)
            else:
                v = P.gem(f, self.p[i])
            outs.append(P.l2n(v))
        return torch.cat(outs, dim=1)


class RMACHead(nn.Module):
    """R-MAC on each layer (regions + global, L2 per region, summed, L2), concatenated."""

    def __init__(self, channels: list[int], levels: int = 3):
        super().__init__()
        self.levels = levels
        self.out_dim = int(sum(channels))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([P.rmac(f, self.levels) for f in feats], dim=1)


class REMAPHead(nn.Module):
    """REMAP (Husain & Bober, TIP 2019) without the whitening, which the model applies after.

    Per tapped layer: ROI max-pooling over the R-MAC grid (plus the whole map), L2 per region,
    a non-negative learnable weight per (layer, region) — the KL-divergence weighting (KLW) —,
    sum over regions; then the layers are concatenated *without* per-layer normalisation, so the
    KLW weights also weigh the layers against each other.

    Variable image sizes: the weights live on a canonical grid (see
    `regions.canonical_region_index`): `levels` square levels of l x l regions plus the whole
    map; each region of an actual map uses the weight of its nearest canonical region.
    Weights are stored as `klw_raw` with weight = softplus(klw_raw), so they stay positive under
    SGD and any positive initial value (e.g. a KL divergence) is represented exactly.

    `layer_norm=True`: each layer's weighted sum is L2-normalised before the concatenation and
    then scaled by a learnable non-negative layer weight (`layer_weights`, initially 1). The
    region weights then act within a layer only, and the layers' shares are learned separately
    instead of following the layers' channel counts and KL magnitudes (without it, the
    1280-channel head layer outweighs a 112-channel stage-5 layer whatever the weights say).
    """

    MIN_WEIGHT = 1e-6

    def __init__(self, channels: list[int], levels: int = 3, include_global: bool = True,
                 layer_norm: bool = False):
        super().__init__()
        self.levels = int(levels)
        self.include_global = bool(include_global)
        self.layer_norm = bool(layer_norm)
        self.out_dim = int(sum(channels))
        self.n_layers = len(channels)
        self.n_regions = canonical_region_count(self.levels, self.include_global)
        self.klw_raw = nn.Parameter(self._inverse_softplus(torch.ones(self.n_layers,
                                                                      self.n_regions)))
        if self.layer_norm:
            self.layer_raw = nn.Parameter(self._inverse_softplus(torch.ones(self.n_layers)))

    @property
    def layer_weights(self) -> torch.Tensor:
        """Non-negative per-layer weights (n_layers,); all 1 without `layer_norm`."""
        if not self.layer_norm:
            return torch.ones(self.n_layers, device=self.klw_raw.device)
        return nn.functional.softplus(self.layer_raw)

    @staticmethod
    def _inverse_softplus(w: torch.Tensor) -> torch.Tensor:
        w = w.clamp(min=REMAPHead.MIN_WEIGHT)
        return torch.where(w > 20, w, torch.log(torch.expm1(w)))

    @property
    def region_weights(self) -> torch.Tensor:
        """Non-negative KLW weights: (n_layers, n_canonical_regions)."""
        return nn.functional.softplus(self.klw_raw)

    @torch.no_grad()
    def set_region_weights(self, weights) -> None:
        """Set the KLW weights from a (n_layers, n_canonical_regions) array of values >= 0
        (e.g. `klw.kl_region_weights`); zeros become a tiny positive weight."""
        w = torch.as_tensor(weights, dtype=self.klw_raw.dtype)
        if tuple(w.shape) != tuple(self.klw_raw.shape):
            raise ValueError(f"KLW weights must have shape {tuple(self.klw_raw.shape)} "
                             f"(layers, canonical regions at levels={self.levels}), "
                             f"got {tuple(w.shape)}")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("KLW weights must be finite and non-negative")
        self.klw_raw.copy_(self._inverse_softplus(w))

    def region_vectors(self, feats: list[torch.Tensor]) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """Per layer: (L2-normalised region vectors (B, R_l, C_l), canonical index of each)."""
        out = []
        for f in feats:
            regions = P.region_max_pool(f, self.levels, include_global=self.include_global)
            idx = canonical_region_index(int(f.shape[-2]), int(f.shape[-1]), self.levels,
                                         self.include_global)
            if len(idx) != regions.shape[1]:  # a map too small for any region: whole map only
                idx = (0,) * regions.shape[1]
            out.append((P.l2n(regions), idx))
        return out

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """[(B, C_l, H_l, W_l)] -> (B, sum C_l)."""
        w = self.region_weights
        outs = []
        for layer, (regions, idx) in enumerate(self.region_vectors(feats)):
            wl = w[layer, torch.as_tensor(idx, device=w.device)]
            v = P.weighted_region_sum(regions, wl)
            if self.layer_norm:
                v = P.l2n(v) * self.layer_weights[layer]
            outs.append(v)
        return torch.cat(outs, dim=1)


HEADS = {
    "mac": lambda ch, **kw: GlobalPoolHead(ch, "mac"),
    "spoc": lambda ch, **kw: GlobalPoolHead(ch, "spoc"),
    "gem": lambda ch, **kw: GlobalPoolHead(ch, "gem", **kw),
    "rmac": lambda ch, **kw: RMACHead(ch, **kw),
    "remap": lambda ch, **kw: REMAPHead(ch, **kw),
}


def build_head(name: str, channels: list[int], **kwargs) -> nn.Module:
    """Build a head by name ("mac", "spoc", "gem", "rmac", "remap") for the given layer channels."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; known: {', '.join(sorted(HEADS))}")
    return HEADS[name](list(channels), **kwargs)
