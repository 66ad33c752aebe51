"""H&E patch features from a ``timm`` backbone, with an optional self-supervised stage.

Hub weights are not reachable here, so the backbone's weights come from, in order:

* ``checkpoint``: a user state-dict / timm checkpoint path;
* ``weights='ssl'``: SimCLR (NT-Xent, Chen et al. 2020) on the *training* sections'
  patches with the training augmentation (flips, 90-degree rotations, HED and colour
  jitter); the trained weights are cached by a key of everything that shaped them;
* ``weights='random'``: the timm random initialisation (a fixed-seed random feature map).

Features are cached per section: ``[V, N, F]`` with view 0 the plain patch and views
1.. augmented copies (the datamodule draws one view per spot and step when training).

The *encoder* of a fold is the backbone plus an optional slide-level stain normaliser
(:mod:`~armodal.modalities.spatial.stain`, reference fitted on the encoder's sections); both
are unsupervised and see only the images of ``ssl_sections`` (default: the training
sections).  The backbone folder's key hashes the fields that shape the backbone; the
per-section features live in a sub-folder keyed by the feature options, so a new
normalisation or view augmentation reuses the trained backbone.  ``save`` / ``load`` put
the encoder next to a trained model so that a new slide is featurised the same way.
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
from armodal.utils.cache import atomic_write, writable_dir
from armodal.modalities.spatial.patches import augment
from armodal.modalities.spatial.stain import StainNormalizer, perturb_slide_stain

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
    stain_norm: Literal["none", "macenko", "reinhard"] = "none"  # slide-level stain normalisation before the backbone
    view_hed_sigma: float = 0.05  # augmented views: per-patch HED jitter, skimage units (the SSL stage's strong tint)
    view_stain_sigma: float = 0.0  # augmented views: per-patch stain jitter on the natural-OD scale (stain.STAIN_STRENGTHS)
    ssl_sections: list[str] | None = None  # sections whose images (never counts) train the encoder; None: the training sections

    def __post_init__(self) -> None:  # YAML ints and floats must hash alike
        self.patch_size, self.ssl_lr, self.ssl_temperature = float(self.patch_size), float(self.ssl_lr), float(self.ssl_temperature)
        self.patch_px, self.n_views, self.ssl_epochs, self.ssl_batch = int(self.patch_px), int(self.n_views), int(self.ssl_epochs), int(self.ssl_batch)
        self.view_hed_sigma, self.view_stain_sigma = float(self.view_hed_sigma), float(self.view_stain_sigma)
        if self.stain_norm not in ("none", "macenko", "reinhard"):
            raise ValueError(f"features.stain_norm must be none, macenko or reinhard, got {self.stain_norm!r}")
        if self.ssl_sections is not None:
            self.ssl_sections = [str(x) for x in self.ssl_sections]

    def key(self, train_sections: list[str] | None = None) -> str:
        """Key of the backbone folder: the fields that shape the backbone (and the encoder's sections)."""
        d = {k: v for k, v in asdict(self).items() if k in _BACKBONE_FIELDS}
        d["train_sections"] = sorted(train_sections or []) if self.weights == "ssl" and not self.checkpoint else []
        if self.checkpoint:
            d["ckpt_mtime"] = Path(self.checkpoint).stat().st_mtime if Path(self.checkpoint).exists() else 0
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def feature_key(self) -> str:
        """Key of the per-section feature folder inside the backbone folder (normalisation, view augmentation)."""
        d = {"stain_norm": self.stain_norm, "view_hed_sigma": self.view_hed_sigma, "view_stain_sigma": self.view_stain_sigma}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


# the fields the backbone folder's key hashes (the original FeatureConfig; later options live in feature_key)
_BACKBONE_FIELDS = ("backbone", "weights", "checkpoint", "patch_size", "patch_unit", "patch_px", "outside", "n_views",
                    "ssl_epochs", "ssl_batch", "ssl_lr", "ssl_temperature", "seed", "extra")


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
    """The encoder (backbone + stain normaliser) and its feature cache: ``features(name, patches) -> [V, N, F]``."""

    def __init__(self, cfg: FeatureConfig, cache_dir: str | Path | None, train_patches=None,
                 train_sections: list[str] | None = None, reference_images=None, state: dict | None = None,
                 sources: str = "") -> None:
        """``train_patches``: uint8 [N, H, W, 3] or a callable returning them (only called when the
        self-supervised stage actually has to run); ``reference_images``: the encoder sections' slide
        images (a list or a callable; only called when a stain reference has to be fitted);
        ``state``: backbone weights and normaliser of a saved encoder (:meth:`load`);
        ``sources``: a key of the encoder sections' content (images, spots, data root): the backbone and
        the stain reference are refitted when it changes.  A read-only cache: a warning, no cache."""
        self.cfg = cfg
        self.key = cfg.key(train_sections)
        if sources:
            self.key = hashlib.sha1(f"{self.key}:{sources}".encode()).hexdigest()[:12]
        base = writable_dir(Path(cache_dir) / "spatial" if cache_dir else None, "cache")
        self.cache_dir = base / f"{cfg.backbone}-{cfg.weights}-{self.key}" if base is not None else None
        self.feat_dir = self.cache_dir / f"feats-{cfg.feature_key()}" if self.cache_dir else None
        self.info: dict = {"backbone": cfg.backbone, "weights": cfg.weights, "key": self.key,
                           "feature_key": cfg.feature_key(), "encoder_sections": sorted(train_sections or [])}
        ckpt = cfg.checkpoint if (cfg.weights == "checkpoint" or cfg.checkpoint) else None
        if cfg.weights == "checkpoint" and not cfg.checkpoint and state is None:
            raise SpatialDataError("weights='checkpoint' needs features.checkpoint=<path>")
        self.model = build_backbone(cfg.backbone, None if state is not None else ckpt, seed=cfg.seed)
        if state is not None:
            self.model.load_state_dict(state["backbone"])
            self.normalizer = StainNormalizer.from_state(state["stain"])
            self.info.update(state.get("info", {}))
            self.model.eval()
            return
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
                    state = self.model.state_dict()
                    atomic_write(self.cache_dir / "ssl.json", lambda tmp: tmp.write_text(json.dumps(self.info)))
                    atomic_write(wpath, lambda tmp: torch.save(state, tmp))  # last: marks the entry complete
        self.model.eval()
        self.normalizer = self._normalizer(reference_images)

    def _normalizer(self, reference_images) -> StainNormalizer:
        norm = StainNormalizer(self.cfg.stain_norm)
        if norm.method == "none":
            return norm
        path = self.feat_dir / "stain.json" if self.feat_dir else None
        if path is not None and path.is_file():
            return StainNormalizer.from_state(json.loads(path.read_text()))
        if reference_images is None:
            raise SpatialDataError(f"features.stain_norm={norm.method} needs the encoder sections' images for its reference")
        norm.fit_reference(list(reference_images() if callable(reference_images) else reference_images))
        if path is not None:
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(norm.state())))
        return norm

    @property
    def dim(self) -> int:
        return int(self.model.num_features)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch: int = 128) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, F]."""
        return torch.cat([self.model(_normalise(self.model, x[i : i + batch])) for i in range(0, len(x), batch)])

    def patches(self, name: str, extract, obs_names: list[str], content: str = "") -> np.ndarray:
        """uint8 patches [N, px, px, 3] of a section, cached next to the backbone (its key holds the patch
        geometry; ``content`` the section's image and spots); ``extract()`` cuts them on a miss."""
        path = self.cache_dir / f"patches-{name}{'-' + content if content else ''}.npz" if self.cache_dir else None
        if path is not None and path.is_file():
            try:
                z = np.load(path, allow_pickle=False)
                if list(z["obs_names"]) == list(obs_names):
                    return z["patches"]
            except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed
                log.warning("%s: unreadable patch cache (%s); recomputing", path, type(e).__name__)
        p = extract()
        if path is not None:
            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:  # a file object: numpy adds no suffix
                    np.savez(f, patches=p, obs_names=np.asarray(obs_names, dtype=str))

            atomic_write(path, write)
        return p

    def prepare(self, patches: np.ndarray, image: np.ndarray | None, perturb: tuple[str | float, int] | None = None) -> np.ndarray:
        """Patches as the backbone sees them: optionally stain-perturbed (``(strength, seed)``, the same change
        for the whole slide), then stain-normalised with a map fitted on the slide ``image``."""
        if perturb is not None:
            patches = perturb_slide_stain(patches, *perturb)
            image = None if image is None else perturb_slide_stain(image, *perturb)
        if self.normalizer.method == "none":
            return patches
        if image is None:
            raise SpatialDataError(f"stain_norm={self.normalizer.method} needs the slide image to fit the slide's stain map")
        return self.normalizer.slide_transform(image)(patches)

    def features(self, name: str, patches, obs_names: list[str], image=None, perturb=None, cache: bool = True,
                 content: str = "") -> torch.Tensor:
        """[V, N, F] (view 0 plain, views 1.. augmented with a fixed seed), cached per section and content.

        ``patches``: uint8 [N, H, W, 3] or a callable returning them (called on a cache miss);
        ``image``: the slide's RGB image (or a callable), used by stain normalisation;
        ``perturb``: ``(strength, seed)`` of :func:`~.stain.perturb_slide_stain` (never cached);
        ``content``: a key of what the patches come from (image file hash, spots, data root), so a
        replaced image is never served stale features."""
        cache = cache and perturb is None
        path = self.feat_dir / f"{name}{'-' + content if content else ''}.pt" if (self.feat_dir and cache) else None
        if path is not None and path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed
                log.warning("%s: unreadable feature cache (%s); recomputing", path, type(e).__name__)
            else:
                if blob["obs_names"] == list(obs_names):
                    return blob["feats"]
        if callable(patches):
            patches = patches()
        if callable(image):
            image = image()
        x = _to_float(self.prepare(patches, image, perturb))
        g = torch.Generator().manual_seed(self.cfg.seed + 1)
        n_views = self.cfg.n_views if cache else 1
        views = [self.embed(x)] + [self.embed(augment(x, g, hed_sigma=self.cfg.view_hed_sigma, stain_sigma=self.cfg.view_stain_sigma))
                                   for _ in range(n_views - 1)]
        feats = torch.stack(views).float()  # [V, N, F]
        if path is not None:
            blob = {"feats": feats, "obs_names": list(obs_names)}
            try:
                atomic_write(path, lambda tmp: torch.save(blob, tmp))
            except OSError as e:
                log.warning("%s: could not write the feature cache (%s); continuing without it", path, e)
        return feats

    # -- saved with a trained model -------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """``encoder.json`` (config, normaliser, info) and ``encoder.safetensors`` (backbone weights: no pickle)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                  str(directory / "encoder.safetensors"))
        cfg = asdict(self.cfg)
        (directory / "encoder.json").write_text(json.dumps(
            {"config": cfg, "stain": self.normalizer.state(), "info": {k: v for k, v in self.info.items() if k != "ssl_loss"}},
            indent=2, default=str))

    @classmethod
    def load(cls, directory: str | Path) -> "FeatureExtractor":
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path, weights = directory / "encoder.json", directory / "encoder.safetensors"
        if not weights.is_file():
            weights = directory / "encoder.pt"  # written before the safetensors form (read weights-only)
        if not meta_path.is_file() or not weights.is_file():
            raise SpatialDataError(f"{directory}: no saved H&E encoder (encoder.json + encoder.safetensors); the model "
                                   "was trained before encoders were saved with it")
        meta = json.loads(meta_path.read_text())
        cfg = FeatureConfig(**meta["config"])
        backbone = (load_file(str(weights)) if weights.suffix == ".safetensors"
                    else torch.load(weights, map_location="cpu", weights_only=True))
        state = {"backbone": backbone, "stain": meta["stain"],
                 "info": meta.get("info", {})}
        return cls(cfg, None, state=state)
