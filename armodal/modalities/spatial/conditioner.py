"""H&E neighbourhood -> continuous prefix for the shared transformer."""

from __future__ import annotations

import math

import torch
from torch import nn

from armodal.modalities.base import Conditioner, register_conditioner

__all__ = ["SpatialConditioner"]


def _small_cnn(width: int) -> nn.Sequential:
    """Patches [B, 3, H, W] -> [B, 4 * width]: four stride-2 3x3 convolutions (GroupNorm, GELU), global mean."""
    layers, c = [], 3
    for w in (width, 2 * width, 4 * width, 4 * width):
        layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.GELU()]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


@register_conditioner("spatial")
class SpatialConditioner(Conditioner):
    """One prefix position per spot of the neighbourhood.

    ``cond = {"feats": [B, N, F] patch features, "pos": [B, N, 2] spot offsets from the
    centre spot in units of the spot spacing}``.  prefix[b, n] = proj(LayerNorm(feats)) +
    MLP(Fourier(pos)).  ``feat_dropout`` zeroes whole feature vectors while training.

    ``pixels=True`` learns from pixels end to end: ``feats`` are then the patches themselves,
    [B, N, 3, H, W] in 0..255 (after the slide's stain normalisation), and a small CNN trained
    with the AR loss turns each into a ``feat_dim`` vector.

    ``n_keys > 0``: ``cond["key"]`` [B, N] (long, < n_keys) adds a learned key embedding to each
    element -- how a window sequence's spot marker finds its own spot's H&E (``modality.data.spot_key``).
    """

    def __init__(self, d_model: int, feat_dim: int = 512, n_freqs: int = 8, max_offset: float = 4.0,
                 feat_dropout: float = 0.1, feat_noise: float = 0.0, pixels: bool = False, pixel_width: int = 32,
                 n_keys: int = 0) -> None:
        super().__init__(d_model)
        self.n_keys = int(n_keys)
        self.key_emb = nn.Embedding(self.n_keys, d_model) if self.n_keys > 0 else None
        self.pixels = bool(pixels)
        if self.pixels:
            feat_dim = 4 * pixel_width
            self.pixel_encoder = _small_cnn(pixel_width)
        self.feat_dim = feat_dim
        self.norm = nn.LayerNorm(feat_dim)
        self.proj = nn.Sequential(nn.Linear(feat_dim, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        freqs = math.pi * (2.0 ** torch.arange(n_freqs)) / max_offset  # periods from 2*max_offset down
        self.register_buffer("freqs", freqs, persistent=False)
        self.pos_mlp = nn.Sequential(nn.Linear(4 * n_freqs, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.feat_dropout = feat_dropout
        self.feat_noise = feat_noise

    def forward(self, cond: dict) -> torch.Tensor:  # -> [B, N, D]
        feats, pos = cond["feats"], cond["pos"]  # [B, N, F] (or [B, N, 3, H, W] patches), [B, N, 2]
        if self.pixels:
            if feats.dim() != 5 or feats.shape[2] != 3:
                raise ValueError(f"SpatialConditioner(pixels=True) expects patches [B, N, 3, H, W], got {tuple(feats.shape)} "
                                 "(set modality.data.inputs=pixels)")
            b, n = feats.shape[:2]
            x = (feats.flatten(0, 1).float() / 255.0 - 0.5) / 0.25
            feats = self.pixel_encoder(x).view(b, n, -1)  # [B, N, feat_dim]
        elif feats.dim() != 3:
            raise ValueError(f"SpatialConditioner expects patch features [B, N, F], got {tuple(feats.shape)} "
                             "(patches need conditioner.pixels=true)")
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
        h = h + self.pos_mlp(four)
        key = cond.get("key")
        if key is None and self.key_emb is not None:
            raise ValueError(f"modality.conditioner.n_keys={self.n_keys} but the data gives no spot keys "
                             "(modality.data.spot_key=none, or sequence=spot): set modality.conditioner.n_keys=0")
        if key is not None:
            if self.key_emb is None:
                raise ValueError("the prefix carries spot keys (modality.data.spot_key=cell|slot) but the conditioner has "
                                 "none: set modality.conditioner.n_keys to (2 * window_radius + 1)^2 (81 for radius 4)")
            if key.shape != h.shape[:2] or int(key.min()) < 0 or int(key.max()) >= self.n_keys:
                raise ValueError(f"spot keys must be [B, N] = {tuple(h.shape[:2])} ids in [0, {self.n_keys}), got shape "
                                 f"{tuple(key.shape)}, range [{int(key.min())}, {int(key.max())}] "
                                 "(modality.conditioner.n_keys too small for the window?)")
            h = h + self.key_emb(key)
        return h
