"""H&E patch features from a ``timm`` backbone, with an optional self-supervised stage.

Hub weights are not reachable here, so the backbone's weights come from, in order:

* ``checkpoint``: a user state-dict / timm checkpoint path;
* ``weights='ssl'``: SimCLR (NT-Xent, Chen et al. 2020) on the *training* sections'
  patches with the training augmentation (flips, 90-degree rotations, HED and colour
  jitter); the trained weights are cached by a key of everything that shaped them;
* ``weights='random'``: the timm random initialisation (a fixed-seed random feature map).

Features are cached per section: ``[V, N, F]`` with view 0 the plain patch and views
1.. augmented copies (the datamodule draws one view per spot and step when training).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from armodal.modalities.spatial.io import SpatialDataError
from armodal.modalities.spatial.patches import augment

__all__ = ["FeatureConfig", "build_backbone", "train_simclr", "FeatureExtractor"]

log = logging.getLogger(__name__)


@dataclass
class FeatureConfig:
    backbone: str = "resnet18"  # any timm model name
    weights: Literal["random", "ssl", "checkpoint"] = "ssl"  # where the backbone's weights come from
    checkpoint: str | None = None  # user weights (used when weights='checkpoint' or when given)
    patch_size: float = 160.0  # patch edge ...
    patch_unit: Literal["um", "px"] = "um"  # ... in um or full-resolution px
    patch_px: int = 64  # backbone input resolution
    outside: Literal["pad", "drop", "error"] = "pad"  # patches reaching beyond the image
    n_views: int = 8  # cached views per spot (view 0 plain, the rest augmented)
    ssl_epochs: int = 15
    ssl_batch: int = 64
    ssl_lr: float = 1e-3
    ssl_temperature: float = 0.2
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:  # YAML ints and floats must hash alike
        self.patch_size, self.ssl_lr, self.ssl_temperature = float(self.patch_size), float(self.ssl_lr), float(self.ssl_temperature)
        self.patch_px, self.n_views, self.ssl_epochs, self.ssl_batch = int(self.patch_px), int(self.n_views), int(self.ssl_epochs), int(self.ssl_batch)

    def key(self, train_sections: list[str] | None = None) -> str:
        d = asdict(self)
        d["train_sections"] = sorted(train_sections or []) if self.weights == "ssl" and not self.checkpoint else []
        if self.checkpoint:
            d["ckpt_mtime"] = Path(self.checkpoint).stat().st_mtime if Path(self.checkpoint).exists() else 0
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_backbone(name: str, checkpoint: str | Path | None = None, seed: int = 0) -> nn.Module:
    """timm model without its classifier (``num_classes=0``): images [B,3,H,W] -> [B, F]."""
    torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as e:
        raise SpatialDataError(f"unknown timm backbone {name!r}: {e}") from None
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise SpatialDataError(f"{path}: backbone checkpoint not found")
        state = torch.load(path, map_location="cpu", weights_only=True)
        for k in ("state_dict", "model", "backbone"):
            if isinstance(state, dict) and k in state and isinstance(state[k], dict):
                state = state[k]
        own = model.state_dict()
        state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not usable:
            raise SpatialDataError(f"{path}: no tensor matches the {name} backbone")
        missing = [k for k in own if k not in usable]
        if missing:
            log.warning("%s: %d backbone tensor(s) not in the checkpoint (kept at init), e.g. %s", path, len(missing), missing[:3])
        model.load_state_dict(usable, strict=False)
    return model


def _normalise(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
    return (x - mean) / std


def _to_float(patches: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0  # [N, 3, H, W]


def train_simclr(model: nn.Module, patches: np.ndarray, cfg: FeatureConfig) -> dict:
    """SimCLR on ``patches`` uint8 [N, H, W, 3]; trains ``model`` in place, returns the loss curve."""
    g = torch.Generator().manual_seed(cfg.seed)
    x_all = _to_float(patches)
    n = len(x_all)
    if n < 4:
        raise SpatialDataError(f"self-supervised stage needs at least 4 patches, got {n}")
    dim = model.num_features
    head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 128))
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=cfg.ssl_lr, weight_decay=1e-4)
    steps_per_epoch = max(1, n // cfg.ssl_batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.ssl_epochs * steps_per_epoch)
    model.train()
    curve = []
    t0 = time.time()
    for ep in range(cfg.ssl_epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.ssl_batch : (i + 1) * cfg.ssl_batch]
            xb = x_all[idx]
            v1 = _random_crop(augment(xb, g), g)
            v2 = _random_crop(augment(xb, g), g)
            z = F.normalize(head(model(_normalise(model, torch.cat([v1, v2])))), dim=-1)  # [2b, 128]
            sim = z @ z.T / cfg.ssl_temperature
            sim.fill_diagonal_(float("-inf"))
            b = len(idx)
            target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
            loss = F.cross_entropy(sim, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
        curve.append(tot / steps_per_epoch)
        log.info("simclr epoch %d/%d loss %.4f (%.0fs)", ep + 1, cfg.ssl_epochs, curve[-1], time.time() - t0)
    model.eval()
    return {"ssl_loss": curve}


def _random_crop(x: torch.Tensor, g: torch.Generator, min_scale: float = 0.6) -> torch.Tensor:
    """Random resized crop (same size out), [B,3,H,W]."""
    b, _, h, w = x.shape
    s = min_scale + (1 - min_scale) * torch.rand(1, generator=g).item()
    ch, cw = max(2, int(h * s)), max(2, int(w * s))
    top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
    return F.interpolate(x[:, :, top : top + ch, left : left + cw], size=(h, w), mode="bilinear", align_corners=False)


class FeatureExtractor:
    """Backbone + feature cache: ``features(name, patches) -> [V, N, F]`` float32."""

    def __init__(self, cfg: FeatureConfig, cache_dir: str | Path | None, train_patches=None,
                 train_sections: list[str] | None = None) -> None:
        """``train_patches``: uint8 [N, H, W, 3] or a callable returning them (only called when the
        self-supervised stage actually has to run)."""
        self.cfg = cfg
        self.key = cfg.key(train_sections)
        self.cache_dir = Path(cache_dir) / "spatial" / f"{cfg.backbone}-{cfg.weights}-{self.key}" if cache_dir else None
        self.info: dict = {"backbone": cfg.backbone, "weights": cfg.weights, "key": self.key}
        ckpt = cfg.checkpoint if (cfg.weights == "checkpoint" or cfg.checkpoint) else None
        if cfg.weights == "checkpoint" and not cfg.checkpoint:
            raise SpatialDataError("weights='checkpoint' needs features.checkpoint=<path>")
        self.model = build_backbone(cfg.backbone, ckpt, seed=cfg.seed)
        if cfg.weights == "ssl" and not ckpt:
            wpath = self.cache_dir / "backbone.pt" if self.cache_dir else None
            if wpath is not None and wpath.is_file():
                self.model.load_state_dict(torch.load(wpath, map_location="cpu", weights_only=True))
                self.info.update(json.loads((self.cache_dir / "ssl.json").read_text()))
            else:
                if train_patches is None:
                    raise SpatialDataError("weights='ssl' needs the training patches for the self-supervised stage")
                if callable(train_patches):
                    train_patches = train_patches()
                self.info.update(train_simclr(self.model, train_patches, cfg))
                if wpath is not None:
                    wpath.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(self.model.state_dict(), str(wpath) + ".tmp")
                    Path(str(wpath) + ".tmp").replace(wpath)
                    (self.cache_dir / "ssl.json").write_text(json.dumps(self.info))
        self.model.eval()

    @property
    def dim(self) -> int:
        return int(self.model.num_features)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch: int = 128) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, F]."""
        return torch.cat([self.model(_normalise(self.model, x[i : i + batch])) for i in range(0, len(x), batch)])

    def features(self, name: str, patches, obs_names: list[str]) -> torch.Tensor:
        """Cached per section: [V, N, F] (view 0 plain, views 1.. augmented with a fixed seed).

        ``patches``: uint8 [N, H, W, 3] or a callable returning them (called on a cache miss)."""
        path = self.cache_dir / f"{name}.pt" if self.cache_dir else None
        if path is not None and path.is_file():
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob["obs_names"] == list(obs_names):
                return blob["feats"]
        if callable(patches):
            patches = patches()
        x = _to_float(patches)
        g = torch.Generator().manual_seed(self.cfg.seed + 1)
        views = [self.embed(x)] + [self.embed(augment(x, g)) for _ in range(self.cfg.n_views - 1)]
        feats = torch.stack(views).float()  # [V, N, F]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"feats": feats, "obs_names": list(obs_names)}, str(path) + ".tmp")
            Path(str(path) + ".tmp").replace(path)
        return feats
