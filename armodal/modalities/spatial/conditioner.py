"""H&E neighbourhood -> continuous prefix for the shared transformer."""

from __future__ import annotations

import math

import torch
from torch import nn

from armodal.modalities.base import Conditioner, register_conditioner

__all__ = ["SpatialConditioner"]


@register_conditioner("spatial")
class SpatialConditioner(Conditioner):
    """One prefix position per spot of the neighbourhood.

    ``cond = {"feats": [B, N, F] patch features, "pos": [B, N, 2] spot offsets from the
    centre spot in units of the spot spacing}``; the centre spot is the last slot, so under
    the causal mask it sees every neighbour.  prefix[b, n] = proj(LayerNorm(feats)) +
    MLP(Fourier(pos)).  ``feat_dropout`` zeroes whole feature vectors while training.
    """

    def __init__(self, d_model: int, feat_dim: int = 512, n_freqs: int = 8, max_offset: float = 4.0,
                 feat_dropout: float = 0.1, feat_noise: float = 0.0) -> None:
        super().__init__(d_model)
        self.feat_dim = feat_dim
        self.norm = nn.LayerNorm(feat_dim)
        self.proj = nn.Sequential(nn.Linear(feat_dim, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        freqs = math.pi * (2.0 ** torch.arange(n_freqs)) / max_offset  # periods from 2*max_offset down
        self.register_buffer("freqs", freqs, persistent=False)
        self.pos_mlp = nn.Sequential(nn.Linear(4 * n_freqs, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.feat_dropout = feat_dropout
        self.feat_noise = feat_noise

    def forward(self, cond: dict) -> torch.Tensor:  # -> [B, N, D]
        feats, pos = cond["feats"], cond["pos"]  # [B, N, F], [B, N, 2]
        if feats.shape[-1] != self.feat_dim:
            raise ValueError(f"SpatialConditioner expects {self.feat_dim}-dim patch features, got {feats.shape[-1]} "
                             "(set modality.conditioner.feat_dim to the backbone's feature size)")
        x = self.norm(feats.float())
        if self.training and self.feat_noise > 0:
            x = x + self.feat_noise * torch.randn_like(x)
        h = self.proj(x)  # [B, N, D]
        if self.training and self.feat_dropout > 0:
            keep = (torch.rand(h.shape[:2], device=h.device) >= self.feat_dropout).to(h.dtype)[..., None]
            h = h * keep
        ang = pos.float()[..., None] * self.freqs  # [B, N, 2, n_freqs]
        four = torch.cat([ang.sin(), ang.cos()], -1).flatten(-2)  # [B, N, 4 * n_freqs]
        return h + self.pos_mlp(four)
