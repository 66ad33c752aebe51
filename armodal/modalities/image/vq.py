"""A small convolutional VQ-VAE: encoder -> quantizer -> decoder.

Two quantizers, chosen by ``VQConfig.quantizer``:

* ``"vq"``: a learned codebook with l2-normalised low-dimensional codes (LlamaGen /
  ViT-VQGAN "factorised codes"): encoder outputs and code vectors are projected onto
  the unit sphere, so nearest neighbour = largest cosine.  Codebook loss + commitment
  loss (beta), straight-through gradients, and dead-code re-initialisation: codes whose
  running usage falls below a threshold are reset to random encoder outputs.
* ``"fsq"``: finite scalar quantization (Mentzer et al. 2023): each latent channel is
  bounded with tanh and rounded to one of ``levels[c]`` values; the code id is the
  mixed-radix number of the per-channel levels.  No codebook, no auxiliary loss.

Shapes: B batch, C image channels, H x W image, h x w code grid, D code dim,
K codebook size, N = B*h*w flattened latents.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VQConfig", "VQModel", "VectorQuantizer", "FSQuantizer", "QuantOut"]


# ----------------------------------------------------------------------------- config
@dataclass
class VQConfig:
    in_channels: int = 1  # image channels (1 grayscale, 3 RGB)
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # widths; len-1 stride-2 downsamplings
    num_res_blocks: int = 1  # residual blocks per resolution
    quantizer: str = "vq"  # "vq" (l2-normalised codebook) or "fsq"
    codebook_size: int = 512  # K for "vq" (ignored by "fsq": K = prod(levels))
    code_dim: int = 8  # D for "vq" (ignored by "fsq": D = len(levels))
    fsq_levels: list[int] = field(default_factory=lambda: [8, 8, 8])  # FSQ levels per channel
    beta: float = 0.25  # commitment loss weight
    dead_code_threshold: float = 0.03  # reset codes whose EMA count per batch falls below this
    reinit_every: int = 100  # check for dead codes every this many training forwards (0 = never)
    usage_decay: float = 0.99  # EMA decay of the per-code usage counts

    def __post_init__(self) -> None:
        self.channels = [int(c) for c in self.channels]
        self.fsq_levels = [int(v) for v in self.fsq_levels]
        if self.quantizer not in ("vq", "fsq"):
            raise ValueError(f"quantizer must be 'vq' or 'fsq', got {self.quantizer!r}")
        if len(self.channels) < 1:
            raise ValueError("channels needs at least one width")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def num_codes(self) -> int:
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_size

    @property
    def latent_dim(self) -> int:
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.code_dim

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantOut:
    z_q: torch.Tensor  # [B, D, h, w] quantized latents (straight-through)
    ids: torch.Tensor  # [B, h, w] code ids
    loss: torch.Tensor  # scalar: codebook + commitment loss (0 for FSQ)
    perplexity: torch.Tensor  # scalar: exp(entropy) of the batch's code histogram
    usage: torch.Tensor  # scalar: fraction of the K codes used in this batch


def _histogram_stats(ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = torch.bincount(ids.flatten(), minlength=k).float()  # [K]
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
    return counts, perplexity, (counts > 0).float().mean()


# ----------------------------------------------------------------------------- quantizers
class VectorQuantizer(nn.Module):
    """l2-normalised codebook with commitment loss and dead-code re-initialisation."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.k, self.d, self.beta = cfg.codebook_size, cfg.code_dim, cfg.beta
        self.threshold, self.reinit_every, self.decay = cfg.dead_code_threshold, cfg.reinit_every, cfg.usage_decay
        self.embedding = nn.Embedding(self.k, self.d)  # [K, D]
        nn.init.normal_(self.embedding.weight)
        self.register_buffer("usage", torch.ones(self.k))  # EMA of per-batch counts per code
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.num_reinit = 0  # total codes re-initialised so far (logged)
        self._pending: torch.Tensor | None = None  # latents [n, D] for a deferred re-initialisation

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)  # [K, D]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> z_q [B, D, h, w]."""
        return self.codebook()[ids].permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> QuantOut:
        if self.training and self._pending is not None:  # re-init before the codebook enters a new graph
            self.reinit_dead_codes(self._pending)
            self._pending = None
        b, d, h, w = z.shape
        z = F.normalize(z.permute(0, 2, 3, 1), dim=-1)  # [B, h, w, D] on the unit sphere
        flat = z.reshape(-1, d)  # [N, D]
        book = self.codebook()  # [K, D]
        ids = (flat @ book.t()).argmax(-1)  # [N]: nearest on the sphere = largest cosine
        zq = book[ids].view(b, h, w, d)
        loss = F.mse_loss(zq, z.detach()) + self.beta * F.mse_loss(z, zq.detach())
        zq = z + (zq - z).detach()  # straight-through estimator
        counts, perplexity, usage = _histogram_stats(ids, self.k)
        if self.training:
            self._track_and_reinit(counts, flat.detach())
        return QuantOut(zq.permute(0, 3, 1, 2), ids.view(b, h, w), loss, perplexity, usage)

    @torch.no_grad()
    def _track_and_reinit(self, counts: torch.Tensor, flat: torch.Tensor) -> None:
        self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.steps += 1
        if self.reinit_every > 0 and int(self.steps) % self.reinit_every == 0:
            # the codebook is part of this step's autograd graph: apply at the next forward
            keep = torch.randperm(flat.shape[0], device=flat.device)[:4096]
            self._pending = flat[keep].clone()

    @torch.no_grad()
    def reinit_dead_codes(self, flat: torch.Tensor) -> int:
        """Reset codes whose usage EMA is below the threshold to random latents ``flat`` [N, D]."""
        dead = (self.usage < self.threshold).nonzero().flatten()
        n = dead.numel()
        if n == 0 or flat.shape[0] == 0:
            return 0
        pick = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        noise = 0.01 * torch.randn(n, self.d, device=flat.device)
        self.embedding.weight[dead] = F.normalize(flat[pick] + noise, dim=-1).to(self.embedding.weight)
        self.usage[dead] = 1.0  # give the new codes a grace period
        self.num_reinit += n
        return n


class FSQuantizer(nn.Module):
    """Finite scalar quantization: per-channel bounded rounding, implicit codebook."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        levels = torch.tensor(cfg.fsq_levels, dtype=torch.long)
        self.k = int(levels.prod())
        self.register_buffer("levels", levels, persistent=False)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), levels[:-1]]), 0)
        self.register_buffer("basis", basis, persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """[.., D] -> values in (-half_l, half_l) per channel (offset for even levels)."""
        lv = self.levels.to(z.dtype)
        half = (lv - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> z_q [B, D, h, w] in [-1, 1]."""
        digits = (ids[..., None] // self.basis) % self.levels  # [B, h, w, D]
        half = (self.levels // 2).to(torch.float32)
        return ((digits.float() - half) / half).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> QuantOut:
        zc = z.permute(0, 2, 3, 1)  # [B, h, w, D]
        bounded = self._bound(zc)
        rounded = bounded + (bounded.round() - bounded).detach()  # straight-through rounding
        half = (self.levels // 2).to(z.dtype)
        digits = (rounded.detach().round() + half).long()  # [B, h, w, D] in [0, L)
        ids = (digits * self.basis).sum(-1)  # [B, h, w]
        zq = rounded / half  # [-1, 1]
        _, perplexity, usage = _histogram_stats(ids, self.k)
        return QuantOut(zq.permute(0, 3, 1, 2), ids, z.new_zeros(()), perplexity, usage)


# ----------------------------------------------------------------------------- conv blocks
def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c // 4) if c >= 8 else 1, c)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            _norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    """[B, C, H, W] -> [B, D, H/ds, W/ds]."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)]
        for i, c in enumerate(ch):
            c_prev = ch[max(i - 1, 0)]
            if i > 0:
                layers.append(nn.Conv2d(c_prev, c, 4, stride=2, padding=1))  # downsample x2
            layers += [ResBlock(c, c) for _ in range(cfg.num_res_blocks)]
        layers += [_norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], cfg.latent_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """[B, D, h, w] -> [B, C, h*ds, w*ds]."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        ch = list(reversed(cfg.channels))
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_dim, ch[0], 3, padding=1)]
        for i, c in enumerate(ch):
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i - 1], c, 3, padding=1)]
            layers += [ResBlock(c, c) for _ in range(cfg.num_res_blocks)]
        layers += [_norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


# ----------------------------------------------------------------------------- model
class VQModel(nn.Module):
    """VQ-VAE over images in [-1, 1]: ``encode`` -> code ids, ``decode`` -> images."""

    def __init__(self, config: VQConfig | None = None, **kwargs) -> None:
        super().__init__()
        self.config = cfg = config or VQConfig(**kwargs)
        self.encoder = Encoder(cfg)
        self.quantizer: VectorQuantizer | FSQuantizer = (
            VectorQuantizer(cfg) if cfg.quantizer == "vq" else FSQuantizer(cfg)
        )
        self.decoder = Decoder(cfg)

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        ds = self.config.downsample
        if height % ds or width % ds:
            raise ValueError(f"image size {height}x{width} is not divisible by the VQ downsampling factor {ds}")
        return height // ds, width // ds

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantOut]:
        """x [B, C, H, W] -> (reconstruction [B, C, H, W], QuantOut)."""
        q = self.quantizer(self.encoder(x))
        return self.decoder(q.z_q), q

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [-1, 1] -> ids [B, h, w]."""
        self.grid_shape(x.shape[-2], x.shape[-1])
        return self.quantizer(self.encoder(x)).ids

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> images [B, C, H, W] clamped to [-1, 1]."""
        if ids.min() < 0 or ids.max() >= self.num_codes:
            raise ValueError(f"code ids must lie in [0, {self.num_codes}), got [{int(ids.min())}, {int(ids.max())}]")
        return self.decoder(self.quantizer.lookup(ids)).clamp(-1, 1)
