"""Logger factories (armodal targets only in configs)."""

from __future__ import annotations

from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

__all__ = ["tensorboard", "csv"]


def tensorboard(save_dir: str, name: str = "tensorboard", version: str = "") -> TensorBoardLogger:
    return TensorBoardLogger(save_dir=save_dir, name=name, version=version, default_hp_metric=False)


def csv(save_dir: str, name: str = "csv", version: str = "") -> CSVLogger:
    return CSVLogger(save_dir=save_dir, name=name, version=version)
