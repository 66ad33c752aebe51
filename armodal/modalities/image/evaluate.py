"""Image metrics for ``armodal-eval``.

Protocol (fixed; documented in results/image.md):

* **Classifier.**  A small CNN (:class:`FMNISTClassifier`) trained once on the 60k
  training images (train + val splits) for ``clf_epochs`` epochs with a fixed seed, and
  cached in ``cache_dir/image_eval/``.  Its **feature layer** is the 128-d ReLU output of
  the penultimate fully-connected layer.
* **Fréchet distance** (FD) between Gaussians fitted to those features, always against the
  **reference = the 10k test images**:
  - floor: 10k real training images (a fixed random subset) vs test;
  - reconstructions: the VQ reconstructions of that same 10k subset vs test;
  - samples: ``num_fid_samples`` (10k = 1000 per class) class-conditional samples vs test.
* **Accuracy on samples**: how often the classifier predicts the class that was asked for.
* **VQ**: PSNR (peak-to-peak 2 on [-1, 1] images) of test reconstructions, and codebook
  usage (fraction of codes used over the test set) and perplexity.
* **AR**: NLL in bits per code token and per image (x h*w) on val and test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from armodal.generation import GenerationConfig
from armodal.modalities.base import register_evaluator
from armodal.modalities.image.data import ImageDataModule, ImageSet
from armodal.modalities.image.tokenizer import to_uint8
from armodal.utils.cache import atomic_write, writable_dir

__all__ = ["ImageEvaluator", "FMNISTClassifier", "MetricUnavailable", "frechet_distance", "get_classifier",
           "classifier_features"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- classifier
class FMNISTClassifier(nn.Module):
    """conv32-pool-conv64-pool-fc128 (feature layer)-fc(num_classes); inputs [B, C, 28, 28] in [-1, 1]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * (image_size // 4) ** 2, 128), nn.ReLU())
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))  # [B, 128]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))  # [B, K]


def _float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()


def get_classifier(train: ImageSet, test: ImageSet, cache_dir: str | Path, epochs: int = 4, seed: int = 0,
                   batch_size: int = 128) -> tuple[FMNISTClassifier, dict]:
    """Train (once) or load the cached evaluation classifier; returns (model, info)."""
    from safetensors.torch import load_file, save_file

    c, h, _ = train.images.shape[1:]
    key = hashlib.sha1(f"v1:{len(train)}:{len(test)}:{epochs}:{seed}:{batch_size}:{c}x{h}".encode())
    for part in (train.images, train.labels, test.images, test.labels):  # every image: a replaced one changes it
        key.update(part.contiguous().numpy().tobytes())
    key = key.hexdigest()[:12]
    d = writable_dir(Path(cache_dir) / "image_eval", "cache")  # read-only: warn, train without caching
    w = d / f"classifier_{key}.safetensors" if d is not None else None
    meta = d / f"classifier_{key}.json" if d is not None else None
    model = FMNISTClassifier(c, len(train.class_names), h)
    if w is not None and w.is_file() and meta.is_file():
        model.load_state_dict(load_file(str(w)))
        return model.eval(), json.loads(meta.read_text())
    log.info("training the evaluation classifier (%d images, %d epochs) -> %s", len(train), epochs, w)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    t0 = time.time()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train), generator=g).split(batch_size):
            x, y = _float(train.images[idx]), train.labels[idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    acc = float((predict(model, test.images) == test.labels).float().mean())
    info = {"test_accuracy": acc, "epochs": epochs, "train_images": len(train), "seed": seed,
            "train_seconds": round(time.time() - t0, 1), "feature_layer": "fc 128-d ReLU (penultimate)"}
    if d is not None:
        atomic_write(meta, lambda tmp: tmp.write_text(json.dumps(info, indent=2)))
        atomic_write(w, lambda tmp: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp)))
    return model, info


@torch.no_grad()
def classifier_features(model: FMNISTClassifier, images: torch.Tensor, batch_size: int = 1000) -> tuple[np.ndarray, torch.Tensor]:
    """images uint8/float [N, C, H, W] -> (features float64 [N, 128], predicted class [N])."""
    feats, preds = [], []
    for x in images.split(batch_size):
        f = model.features(_float(x))
        feats.append(f.double())
        preds.append(model.head(f).argmax(-1))
    return torch.cat(feats).numpy(), torch.cat(preds)


def predict(model: FMNISTClassifier, images: torch.Tensor) -> torch.Tensor:
    return classifier_features(model, images)[1]


class MetricUnavailable(ValueError):
    """A metric that cannot be computed on this data (e.g. a tiny folder); the message says why."""


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D].

    Raises :class:`MetricUnavailable` (with the reason) when it cannot be computed: fewer than
    2 vectors in a set, non-finite features, or a matrix square root that fails."""
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        raise MetricUnavailable(f"Fréchet distance needs at least 2 images per set (got {len(a)} and {len(b)})")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise MetricUnavailable("Fréchet distance: non-finite classifier features")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eps = 1e-6 * np.eye(s1.shape[0])  # keeps the product well conditioned (as the reference FID code does)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    except (linalg.LinAlgError, ValueError) as e:
        raise MetricUnavailable(f"Fréchet distance: the matrix square root failed ({e})") from None
    out = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))
    if not np.isfinite(out):
        raise MetricUnavailable(f"Fréchet distance is not finite on these {len(a)} and {len(b)} images")
    return out


def _fd(a: np.ndarray, b: np.ndarray, name: str, unavailable: dict) -> float | None:
    """The Fréchet distance, or None with the reason recorded under ``unavailable[name]``."""
    try:
        return frechet_distance(a, b)
    except MetricUnavailable as e:
        unavailable[name] = str(e)
        return None


# ----------------------------------------------------------------------------- evaluator
@torch.no_grad()
def _reconstruct(vq, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, C, H, W] -> (reconstructions uint8 [N, C, H, W], code ids [N, h, w])."""
    dev = next(vq.parameters()).device
    recons, codes = [], []
    for x in images.split(batch_size):
        ids = vq.encode(_float(x).to(dev))
        recons.append(to_uint8(vq.decode(ids)).cpu())
        codes.append(ids.cpu())
    return torch.cat(recons), torch.cat(codes)


def _psnr_u8(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) / 255.0).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


@register_evaluator("image")
class ImageEvaluator:
    """``armodal-eval`` hook: VQ metrics for a VQ checkpoint; everything for an AR checkpoint."""

    def __init__(self, cache_dir: str = "data_cache", num_fid_samples: int = 10000, generation=None,
                 batch_size: int = 500, clf_epochs: int = 4, seed: int = 0,
                 extra_cfg_scales: list[float] | None = None, extra_samples: int = 2000) -> None:
        """``generation``: the sampling settings (default ``cfg_scale=3``, seed 0); ``seed`` seeds the
        classifier and the reference subsets; ``extra_cfg_scales``: a smaller sweep over guidance scales."""
        self.cache_dir = Path(cache_dir)
        self.num_fid_samples = num_fid_samples
        self.generation = GenerationConfig.from_dict(generation or {"cfg_scale": 3.0, "seed": 0},
                                                     source="ImageEvaluator generation")
        self.batch_size, self.clf_epochs, self.seed = batch_size, clf_epochs, seed
        self.extra_cfg_scales, self.extra_samples = list(extra_cfg_scales or []), extra_samples

    def __call__(self, model: Any, datamodule: ImageDataModule, out_dir: str | Path, num_samples: int | None = None,
                 config: GenerationConfig | None = None, **_: Any) -> dict:
        from armodal.ar_model import ARModel

        out_dir = Path(out_dir)
        datamodule.setup("test")
        s = datamodule.splits
        real_train = ImageSet(torch.cat([s["train"].images, s["val"].images]),
                              torch.cat([s["train"].labels, s["val"].labels]), s["train"].class_names)
        test = s["test"]
        t0 = time.time()
        clf, clf_info = get_classifier(real_train, test, self.cache_dir, self.clf_epochs, self.seed)
        metrics: dict = {"classifier": clf_info}
        unavailable: dict = {}  # metric -> why it could not be computed (tiny data)
        vq = model.tokenizer.vq if isinstance(model, ARModel) else model.vq
        vq = vq.eval()

        # -- VQ: PSNR and codebook usage on the test set -----------------------------
        test_recon, test_codes = _reconstruct(vq, test.images)
        counts = torch.bincount(test_codes.flatten(), minlength=vq.num_codes).double()
        p = counts / counts.sum()
        metrics["vq"] = {
            "test_psnr_db": _psnr_u8(test_recon, test.images),
            "codebook_usage": float((counts > 0).double().mean()),
            "codes_used": int((counts > 0).sum()),
            "codebook_size": vq.num_codes,
            "code_perplexity": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())),
        }
        # -- Fréchet: floor (train vs test) and reconstructions vs test -------------------
        g = torch.Generator().manual_seed(self.seed)
        n_ref = min(10000, len(real_train))
        sub = real_train.subset(torch.randperm(len(real_train), generator=g)[:n_ref])
        f_test, p_test = classifier_features(clf, test.images)
        f_train, _ = classifier_features(clf, sub.images)
        recon_sub, _ = _reconstruct(vq, sub.images)
        f_recon, p_recon = classifier_features(clf, recon_sub)
        metrics["classifier"]["test_accuracy_check"] = float((p_test == test.labels).double().mean())
        metrics["fd"] = {"train_vs_test": _fd(f_train, f_test, "fd.train_vs_test", unavailable),
                         "recon_vs_test": _fd(f_recon, f_test, "fd.recon_vs_test", unavailable)}
        metrics["recon_accuracy"] = float((p_recon == sub.labels).double().mean())
        save_grid_rows(sub, recon_sub, out_dir / "recon_grid.png")
        metrics["recon_grid"] = str(out_dir / "recon_grid.png")

        if isinstance(model, ARModel):
            ar = self._ar_metrics(model, datamodule, clf, f_test, out_dir, config or self.generation, unavailable)
            metrics["fd"].update(ar.pop("fd"))
            metrics.update(ar)
            metrics["targets"] = {
                "accuracy_cfg_ge_0.90": metrics["samples"]["accuracy"] >= 0.90,
                "fd_samples_le_2x_recon": None if None in (metrics["fd"]["samples_vs_test"], metrics["fd"]["recon_vs_test"])
                else metrics["fd"]["samples_vs_test"] <= 2 * metrics["fd"]["recon_vs_test"],
            }
        if unavailable:
            metrics["unavailable"] = unavailable
        metrics["eval_seconds"] = round(time.time() - t0, 1)
        return metrics

    def _ar_metrics(self, model, dm, clf, f_test, out_dir: Path, config: GenerationConfig, unavailable: dict) -> dict:
        from armodal.training.loss import dataset_nll
        from armodal.modalities.image.sampler import sample_images, save_grid

        seq_len = model.tokenizer.seq_len
        out: dict = {"nll": {}}
        for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
            r = dataset_nll(model, loader)
            out["nll"][split] = {"bits_per_token": r["bpt"], "bits_per_image": r["bpt"] * seq_len,
                                 "nats_per_token": r["nll"]}
        n_cls = model.tokenizer.num_classes or model.conditioner.num_classes
        per = max(1, self.num_fid_samples // n_cls)
        labels = torch.arange(n_cls).repeat_interleave(per)  # [n_cls * per]
        t0 = time.time()
        imgs = sample_images(model, labels, config, self.batch_size)
        dt = time.time() - t0
        f_s, pred = classifier_features(clf, imgs)
        out["samples"] = {"n": len(labels), "generation": config.changed(), "cfg_scale": config.cfg_scale,
                          "accuracy": float((pred == labels).double().mean()),
                          "per_class_accuracy": [float((pred[labels == c] == c).double().mean()) for c in range(n_cls)],
                          "sampling_seconds": round(dt, 1)}
        out["fd"] = {"samples_vs_test": _fd(f_s, f_test, "fd.samples_vs_test", unavailable)}
        idx = torch.cat([torch.nonzero(labels == c).flatten()[:10] for c in range(n_cls)])
        out["samples"]["grid"] = str(save_grid(imgs[idx], out_dir / "eval_samples_grid.png", nrow=10))
        for scale in self.extra_cfg_scales:  # a smaller sweep over guidance scales
            per_x = max(1, self.extra_samples // n_cls)
            lab_x = torch.arange(n_cls).repeat_interleave(per_x)
            seed = None if config.seed is None else config.seed + 1  # other draws than the main samples
            imgs_x = sample_images(model, lab_x, config, self.batch_size, cfg_scale=scale, seed=seed)
            f_x, pred_x = classifier_features(clf, imgs_x)
            out.setdefault("cfg_sweep", []).append({
                "cfg_scale": scale, "n": len(lab_x), "accuracy": float((pred_x == lab_x).double().mean()),
                "fd_vs_test": _fd(f_x, f_test, f"cfg_sweep[{scale}].fd_vs_test", unavailable),
            })
        return out


def save_grid_rows(real: ImageSet, recon: torch.Tensor, path: Path, per_class: int = 8) -> None:
    """Real (odd rows) over reconstruction (even rows), ``per_class`` columns, one class per row pair."""
    from armodal.modalities.image.sampler import save_grid

    rows = []
    for c in range(len(real.class_names)):
        idx = torch.nonzero(real.labels == c).flatten()[:per_class]
        if len(idx) < per_class:
            continue
        rows += [real.images[idx], recon[idx]]
    if rows:
        save_grid(torch.cat(rows), path, nrow=per_class)
