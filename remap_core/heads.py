"""Pooling heads as nn.Modules over a list of tapped feature maps.

Every head maps [(B, C_l, H_l, W_l) for each layer l] -> (B, D) and exposes `out_dim`.
Per layer the pooled vector is L2-normalised, then the layers are concatenated (multi-layer
aggregation); the model applies whitening and the final L2 after the head.
"""

from __future__ import annotations

import torch
from torch import nn

from . import pooling as P


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


HEADS = {
    "mac": lambda ch, **kw: GlobalPoolHead(ch, "mac"),
    "spoc": lambda ch, **kw: GlobalPoolHead(ch, "spoc"),
    "gem": lambda ch, **kw: GlobalPoolHead(ch, "gem", **kw),
    "rmac": lambda ch, **kw: RMACHead(ch, **kw),
}


def build_head(name: str, channels: list[int], **kwargs) -> nn.Module:
    """Build a head by name ("mac", "spoc", "gem", "rmac", "remap") for the given layer channels."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; known: {', '.join(sorted(HEADS))}")
    return HEADS[name](list(channels), **kwargs)
