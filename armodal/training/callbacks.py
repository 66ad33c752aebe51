"""Training callbacks: checkpoints, samples at validation (logged by kind), metrics.json, progress."""

from __future__ import annotations

import json
import math
import time
import traceback
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn

from armodal.ar_model import ARModel
from armodal.modalities.base import OUTPUT_KINDS
from armodal.training.checkpoint import BestCheckpoint
from armodal.utils.safety import constructible

__all__ = [
    "last_checkpoint",
    "best_checkpoint",
    "early_stopping",
    "progress_bar",
    "lr_monitor",
    "SampleCallback",
    "MetricsJSON",
    "declared_outputs",
    "log_to_tensorboard",
    "write_samples_csv",
]


@constructible
def last_checkpoint(dirpath: str, every_n_train_steps: int = 200) -> ModelCheckpoint:
    """``last.ckpt`` every N steps and at the end of training (what ``resume=true`` restarts from)."""
    return ModelCheckpoint(
        dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps,
        save_on_train_epoch_end=True,
    )


@constructible
def best_checkpoint(dirpath: str, monitor: str = "val/nll", mode: str = "min") -> ModelCheckpoint:
    """``best.ckpt``: the checkpoint with the best monitored validation metric (only ever replaced by a better one)."""
    return BestCheckpoint(
        dirpath=dirpath, filename="best", monitor=monitor, mode=mode, save_top_k=1, auto_insert_metric_name=False,
        enable_version_counter=False,
    )


@constructible
def early_stopping(monitor: str = "val/nll", patience: int = 2, mode: str = "min", min_delta: float = 0.0) -> EarlyStopping:
    """Stop after ``patience`` validations in a row without a better ``monitor`` (each validation
    counts once, also with a step-based ``val_check_interval``); ``best.ckpt`` keeps the best one."""
    return EarlyStopping(monitor=monitor, patience=patience, mode=mode, min_delta=min_delta,
                         check_on_train_epoch_end=False, verbose=True)


@constructible
def progress_bar(refresh_rate: int = 10) -> TQDMProgressBar:
    return TQDMProgressBar(refresh_rate=refresh_rate)


@constructible
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
    """At validation, ask the modality's sampler to render a few samples to files, then log every file it
    declares (:data:`~armodal.modalities.base.OUTPUT_KINDS`): images, audio and text to TensorBoard, and
    every kind to ``samples/samples.csv`` in the run folder (step, kind, path).  No modality-specific code.

    ``on_error``: what a sampler exception does.  ``"raise"`` (default) stops the run with the
    sampler's error: a broken sampler shows at the first validation, and ``resume=true`` continues
    from ``last.ckpt`` once it is fixed.  ``"warn"`` trains on: the traceback goes to
    ``samples/step_N/error.txt`` and a warning names it.
    """

    def __init__(self, num_samples: int = 4, every_n_val: int = 1, enabled: bool = True, max_logged: int = 8,
                 on_error: str = "raise", **sampler_overrides) -> None:
        if on_error not in ("raise", "warn"):
            raise ValueError(f"callbacks.samples.on_error must be 'raise' or 'warn', got {on_error!r}")
        self.num_samples, self.every_n_val, self.enabled, self.on_error = num_samples, every_n_val, enabled, on_error
        self.max_logged = max_logged
        self.overrides = sampler_overrides
        self._n = 0

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking or getattr(pl_module, "sampler", None) is None:
            return
        self._n += 1
        if (self._n - 1) % self.every_n_val:
            return
        samples_dir = Path(pl_module.run_dir) / "samples"
        out_dir = samples_dir / f"step_{trainer.global_step:07d}"
        model = ARModel.from_module(pl_module)
        was_training = pl_module.training
        pl_module.eval()
        try:
            summary = pl_module.sampler(model, self.num_samples, out_dir, **self.overrides)
        except Exception as e:  # noqa: BLE001 - every failure is raised or written down, never dropped
            what = f"[armodal] sampling at step {trainer.global_step} failed ({type(e).__name__}: {e})"
            if self.on_error == "raise":
                raise RuntimeError(f"{what}; fix the sampler or its settings and resume (resume=true), or set "
                                   "callbacks.samples.on_error=warn to train on without samples") from e
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "error.txt").write_text(traceback.format_exc())
            rank_zero_warn(f"{what}; traceback in {out_dir / 'error.txt'}")
            return
        finally:
            pl_module.train(was_training)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        outputs = declared_outputs(summary)
        write_samples_csv(samples_dir / "samples.csv", trainer.global_step, outputs)
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if exp is not None and hasattr(exp, "add_image"):  # a TensorBoard SummaryWriter
                log_to_tensorboard(exp, outputs, trainer.global_step, self.max_logged)


def declared_outputs(summary: dict) -> list[tuple[str, str]]:
    """(kind, path) of every file a sampler's summary declares under an output kind."""
    out = []
    for kind in OUTPUT_KINDS:
        paths = summary.get(kind) or []
        out += [(kind, str(p)) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    return out


def write_samples_csv(path: Path, step: int, outputs: list[tuple[str, str]]) -> None:
    """Append ``step,kind,path`` rows (header on creation)."""
    import csv

    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", "kind", "path"])
        w.writerows([step, kind, p] for kind, p in outputs)


def _read_wav(path: str) -> tuple[torch.Tensor, int]:
    """A PCM WAV -> (mono float samples [1, L] in [-1, 1], sample rate)."""
    import wave

    import numpy as np

    with wave.open(path, "rb") as w:
        width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
        raw = w.readframes(w.getnframes())
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    x = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    x = (x - 128.0) / 128.0 if width == 1 else x / float(2 ** (8 * width - 1))
    return torch.from_numpy(x.reshape(-1, channels).mean(1))[None], rate


def log_to_tensorboard(writer, outputs: list[tuple[str, str]], step: int, max_per_kind: int = 8) -> None:
    """Images, audio and text files to a TensorBoard ``SummaryWriter`` (``samples/<kind>/<i>``);
    a file that cannot be read is skipped with a warning naming it."""
    import numpy as np
    from PIL import Image

    counts: dict[str, int] = {}
    for kind, path in outputs:
        i = counts.get(kind, 0)
        if kind not in ("images", "audio", "text") or i >= max_per_kind:
            continue
        try:
            if kind == "images":
                writer.add_image(f"samples/images/{i}", np.asarray(Image.open(path).convert("RGB")), step,
                                 dataformats="HWC")
            elif kind == "audio":
                wav, rate = _read_wav(path)
                writer.add_audio(f"samples/audio/{i}", wav, step, sample_rate=rate)
            else:
                writer.add_text(f"samples/text/{i}", Path(path).read_text(errors="replace")[:10000], step)
        except Exception as e:  # noqa: BLE001 - a bad sample file must not stop training
            rank_zero_warn(f"[armodal] could not log {kind} sample {path}: {type(e).__name__}: {e}")
            continue
        counts[kind] = i + 1


class MetricsJSON(pl.Callback):
    """Write ``metrics.json`` in the run folder: final/best validation metrics, size, time, throughput."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.best: dict = {}
        self._t0 = None
        self._tokens = 0.0
        self._start_step = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t0 = time.time()

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step = trainer.global_step  # after a resume: the restored step

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
            "session_start_step": self._start_step,  # 0 for a fresh run, the restored step after a resume
            "world_size": trainer.world_size,
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
