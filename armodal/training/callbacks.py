"""Training callbacks: checkpoints, samples at validation, metrics.json, progress."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn

from armodal.ar_model import ARModel

__all__ = [
    "last_checkpoint",
    "best_checkpoint",
    "early_stopping",
    "progress_bar",
    "lr_monitor",
    "SampleCallback",
    "MetricsJSON",
]


def last_checkpoint(dirpath: str, every_n_train_steps: int = 200) -> ModelCheckpoint:
    """``last.ckpt`` every N steps and at the end of training (what ``resume=true`` restarts from)."""
    return ModelCheckpoint(
        dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps,
        save_on_train_epoch_end=True,
    )


def best_checkpoint(dirpath: str, monitor: str = "val/nll", mode: str = "min") -> ModelCheckpoint:
    """``best.ckpt``: the checkpoint with the best monitored validation metric."""
    return ModelCheckpoint(
        dirpath=dirpath, filename="best", monitor=monitor, mode=mode, save_top_k=1, auto_insert_metric_name=False,
        enable_version_counter=False,
    )


def early_stopping(monitor: str = "val/nll", patience: int = 2, mode: str = "min", min_delta: float = 0.0) -> EarlyStopping:
    """Stop after ``patience`` validations in a row without a better ``monitor`` (each validation
    counts once, also with a step-based ``val_check_interval``); ``best.ckpt`` keeps the best one."""
    return EarlyStopping(monitor=monitor, patience=patience, mode=mode, min_delta=min_delta,
                         check_on_train_epoch_end=False, verbose=True)


def progress_bar(refresh_rate: int = 10) -> TQDMProgressBar:
    return TQDMProgressBar(refresh_rate=refresh_rate)


def lr_monitor() -> LearningRateMonitor:
    return LearningRateMonitor(logging_interval="step")


def _scalars(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = v
    return out


class SampleCallback(pl.Callback):
    """At validation, ask the modality's sampler to render a few samples to files (and TensorBoard)."""

    def __init__(self, num_samples: int = 4, every_n_val: int = 1, enabled: bool = True, **sampler_overrides) -> None:
        self.num_samples, self.every_n_val, self.enabled = num_samples, every_n_val, enabled
        self.overrides = sampler_overrides
        self._n = 0

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking or getattr(pl_module, "sampler", None) is None:
            return
        self._n += 1
        if (self._n - 1) % self.every_n_val:
            return
        out_dir = Path(pl_module.run_dir) / "samples" / f"step_{trainer.global_step:07d}"
        model = ARModel.from_module(pl_module)
        was_training = pl_module.training
        pl_module.eval()
        try:
            summary = pl_module.sampler(model, self.num_samples, out_dir, **self.overrides)
        except Exception as e:  # noqa: BLE001 - a sampler bug must not kill a long training run
            rank_zero_warn(f"[armodal] sampling at step {trainer.global_step} failed: {type(e).__name__}: {e}")
            return
        finally:
            pl_module.train(was_training)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        self._log_images(trainer, summary)

    @staticmethod
    def _log_images(trainer: pl.Trainer, summary: dict) -> None:
        images = summary.get("images") or []
        exp = getattr(trainer.logger, "experiment", None)
        if not images or not hasattr(exp, "add_image"):
            return
        import numpy as np
        from PIL import Image

        for i, path in enumerate(images[:8]):
            arr = np.asarray(Image.open(path).convert("RGB"))
            exp.add_image(f"samples/{i}", arr, trainer.global_step, dataformats="HWC")


class MetricsJSON(pl.Callback):
    """Write ``metrics.json`` in the run folder: final/best validation metrics, size, time, throughput."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.best: dict = {}
        self._t0 = None
        self._tokens = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t0 = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict) and "ids" in batch:
            self._tokens += batch["ids"].numel()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        m = _scalars(trainer.callback_metrics)
        if "val/nll" in m and m["val/nll"] < self.best.get("val/nll", float("inf")):
            self.best = {k: v for k, v in m.items() if k.startswith("val/")} | {"step": trainer.global_step}
        self._write(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)

    @rank_zero_only
    def _write(self, trainer, pl_module) -> None:
        elapsed = time.time() - (self._t0 or time.time())
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        data = {
            **old,
            "experiment": pl_module.armodal_meta.get("name") if hasattr(pl_module, "armodal_meta") else None,
            "modality": pl_module.armodal_meta.get("modality") if hasattr(pl_module, "armodal_meta") else None,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "num_params": getattr(pl_module, "num_params", None),
            "final": _scalars(trainer.callback_metrics),
            "best": self.best or old.get("best", {}),
            "train_seconds_this_session": round(elapsed, 2),
            "train_tokens_per_second_this_session": round(self._tokens * trainer.world_size / elapsed, 1) if elapsed > 0 else None,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.path)
