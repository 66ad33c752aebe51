"""Logger factories (armodal targets only in configs)."""

from __future__ import annotations

from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from armodal.utils.safety import constructible

__all__ = ["tensorboard", "csv"]


@constructible
def tensorboard(save_dir: str, name: str = "tensorboard", version: str = "") -> TensorBoardLogger:
    return TensorBoardLogger(save_dir=save_dir, name=name, version=version, default_hp_metric=False)


@constructible
def csv(save_dir: str, name: str = "csv", version: str = "") -> CSVLogger:
    return CSVLogger(save_dir=save_dir, name=name, version=version)
