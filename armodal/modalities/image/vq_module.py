"""The VQ tokenizer's own training stage (a LightningModule, not the AR one).

``armodal-train experiment=image_fmnist_vq`` builds this module with ``model: null``;
the core passes ``net`` / ``tokenizer`` / ``conditioner`` only when they exist and this
module ignores them.  Batches come from :class:`ImageDataModule` in pixel mode:
``{"image": float [B, C, H, W] in [-1, 1], "label": long [B]}``.

Besides the Lightning checkpoint, every save also writes ``vq.safetensors`` +
``vq.json`` next to the checkpoints directory, which is what the AR stage loads
(:func:`armodal.modalities.image.load_vq` reads either form).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from armodal.modalities.image.vq import VQConfig, VQModel

__all__ = ["VQLitModule", "psnr", "save_vq", "load_vq"]


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean PSNR (dB) of images in [-1, 1] (peak-to-peak range 2), per image then averaged."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)  # [B]
    return (10 * torch.log10(4.0 / mse)).mean()


def _plain(x: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return x


class VQLitModule(pl.LightningModule):
    """Trains a :class:`VQModel` with MSE + L1 reconstruction and the quantizer loss."""

    def __init__(
        self,
        vq: dict | None = None,
        optimizer: Any = None,  # a partial optimizer factory (core config) or a dict of AdamW kwargs
        scheduler: Any = None,  # a partial scheduler factory taking the optimizer, or a dict
        l1_weight: float = 0.2,
        net: Any = None,  # accepted and ignored (the AR stage's transformer)
        tokenizer: Any = None,  # accepted and ignored
        conditioner: Any = None,  # accepted and ignored
        **_: Any,
    ) -> None:
        super().__init__()
        self.vq_config = VQConfig(**(_plain(vq) or {}))
        self.optimizer_factory = optimizer if callable(optimizer) else _plain(optimizer)
        self.scheduler_factory = scheduler if callable(scheduler) else _plain(scheduler)
        self.l1_weight = l1_weight
        self.vq = VQModel(self.vq_config)
        self.armodal_meta: dict = {}
        self.run_dir = None
        self.sampler = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict, cfg: Any = None, path: Any = None) -> "VQLitModule":
        """Rebuild from a checkpoint dict (used by :func:`armodal.load_stage` for this stage)."""
        if "vq_config" not in ckpt:
            raise ValueError(f"{path}: not a VQ tokenizer checkpoint (no 'vq_config')")
        module = cls(vq=ckpt["vq_config"])
        module.load_state_dict(ckpt["state_dict"])
        module.armodal_meta = ckpt.get("armodal", {})
        return module

    # -- steps -------------------------------------------------------------------------
    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        x = batch["image"]  # [B, C, H, W]
        recon, q = self.vq(x)
        mse = F.mse_loss(recon, x)
        loss = mse + self.l1_weight * F.l1_loss(recon, x) + q.loss
        on_step = stage == "train"
        bs = x.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step, batch_size=bs)
        self.log(f"{stage}/mse", mse, on_step=on_step, on_epoch=not on_step, batch_size=bs)
        self.log(f"{stage}/psnr", psnr(recon.detach().clamp(-1, 1), x), prog_bar=True, on_step=on_step,
                 on_epoch=not on_step, batch_size=bs)
        self.log(f"{stage}/codebook_usage", q.usage, on_step=on_step, on_epoch=not on_step, batch_size=bs)
        self.log(f"{stage}/perplexity", q.perplexity, prog_bar=True, on_step=on_step, on_epoch=not on_step,
                 batch_size=bs)
        if stage == "train" and hasattr(self.vq.quantizer, "num_reinit"):
            self.log("train/codes_reinit_total", float(self.vq.quantizer.num_reinit), on_step=True, batch_size=bs)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    # -- optim -------------------------------------------------------------------------
    def configure_optimizers(self):
        opt_cfg, sched_cfg = self.optimizer_factory, self.scheduler_factory
        if callable(opt_cfg):  # a hydra partial, e.g. armodal.training.optim.adamw
            opt = opt_cfg(self.named_parameters())
        else:
            c = {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.99), **(opt_cfg or {})}
            opt = torch.optim.AdamW(self.parameters(), lr=c["lr"], weight_decay=c["weight_decay"],
                                    betas=tuple(c["betas"]))
        if sched_cfg is None:
            return opt
        if callable(sched_cfg):
            sched = sched_cfg(opt)
        else:
            from armodal.training.optim import warmup_cosine

            total = sched_cfg.get("total_steps") or (self.trainer.max_steps if self.trainer else 0) or 1000
            sched = warmup_cosine(opt, sched_cfg.get("warmup_steps", 100), total, sched_cfg.get("min_lr_ratio", 0.1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- saving --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["armodal"] = self.armodal_meta  # set by armodal's train(): config, modality, run_dir
        checkpoint["vq_config"] = self.vq_config.to_dict()
        if self.trainer is not None and self.trainer.is_global_zero:
            ckpt_dir = self._export_dir()
            if ckpt_dir is not None:
                save_vq(self.vq, ckpt_dir)

    def _export_dir(self) -> Path | None:
        root = self.run_dir or getattr(self.trainer, "default_root_dir", None)
        return Path(root) if root else None


def save_vq(vq: VQModel, directory: str | Path) -> Path:
    """Write ``vq.safetensors`` + ``vq.json`` (config) into ``directory`` atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in vq.state_dict().items()}
    tmp = directory / "vq.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(directory / "vq.safetensors")
    tmp = directory / "vq.json.tmp"
    tmp.write_text(json.dumps(vq.config.to_dict(), indent=2))
    tmp.replace(directory / "vq.json")
    return directory


def load_vq(path: str | Path, map_location: str = "cpu") -> VQModel:
    """Load a VQ model from a Lightning ``.ckpt`` of :class:`VQLitModule`, a ``vq.safetensors``
    file (with ``vq.json`` beside it) or a directory holding those two files."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"VQ checkpoint {path} does not exist; train it first with "
            "`armodal-train experiment=image_fmnist_vq` and point modality.data.vq_ckpt at it"
        )
    if path.is_dir():
        path = path / "vq.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent}: no vq.safetensors in this directory")
    if path.suffix == ".safetensors":
        cfg_path = path.with_suffix(".json")
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: the VQ config sidecar is missing")
        vq = VQModel(VQConfig(**json.loads(cfg_path.read_text())))
        vq.load_state_dict(load_file(str(path), device=map_location))
        return vq.eval()
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if "vq_config" not in ckpt:
        raise ValueError(f"{path}: not a VQ tokenizer checkpoint (no 'vq_config'); is it the AR stage's?")
    vq = VQModel(VQConfig(**ckpt["vq_config"]))
    state = {k[len("vq."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("vq.")}
    vq.load_state_dict(state)
    return vq.eval()
