"""Loading trained models: ``armodal.load(path)`` -> :class:`~armodal.ar_model.ARModel`;
``armodal.load_stage(path)`` -> a non-AR training stage (e.g. the image VQ tokenizer) with its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from armodal.ar_model import ARModel
from armodal.modalities.base import load_tokenizer
from armodal.pretrained import MANIFEST, is_pretrained_dir, load_pretrained
from armodal.training.checkpoint import CheckpointError, read_checkpoint, verify_tokenizer_files
from armodal.utils.safety import locate_target, safe_config

__all__ = ["ARModel", "load", "load_any", "load_stage", "load_checkpoint_meta", "is_ar_config", "AR_MODULE"]

AR_MODULE = "armodal.training.ARLitModule"


def load_checkpoint_meta(path: str | Path, expect_modality: str | None = None) -> tuple[dict, DictConfig]:
    """Read a checkpoint safely and validate its armodal metadata. Returns (checkpoint dict, saved config)."""
    ckpt = read_checkpoint(path)
    meta = ckpt.get("armodal")
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"{path}: not an armodal checkpoint (no 'armodal' metadata)")
    cfg = safe_config(meta["config"], source=str(path))  # checked targets, interpolations resolved
    got = meta.get("modality")
    if expect_modality is not None and got != expect_modality:
        raise CheckpointError(f"{path}: checkpoint is for modality {got!r}, but {expect_modality!r} was expected")
    return ckpt, cfg


def _find_tokenizer_dir(path: Path, meta: dict) -> Path:
    candidates = [path.parent.parent / "tokenizer", path.parent / "tokenizer"]
    if meta.get("run_dir"):
        candidates.append(Path(meta["run_dir"]) / "tokenizer")
    for c in candidates:
        if (c / "tokenizer.json").is_file():
            return c
    raise CheckpointError(f"{path}: no saved tokenizer found next to the checkpoint (looked in {[str(c) for c in candidates]})")


def _sub_state(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def is_ar_config(cfg: DictConfig) -> bool:
    """Whether a saved run config trains the shared AR transformer (else it is another stage)."""
    return cfg.module._target_ == AR_MODULE


def load(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True,
         expect_modality: str | None = None) -> ARModel:
    """Rebuild a trained autoregressive model from a checkpoint written by ``armodal-train``, or from a
    folder written by ``armodal-export`` (safetensors weights, no pickle; see :mod:`armodal.pretrained`).

    Always an :class:`ARModel`; a checkpoint of another stage (e.g. the image VQ tokenizer)
    is a :class:`CheckpointError` pointing at :func:`load_stage`.  Only ``armodal.*`` targets
    are rebuilt, and weights are read with ``weights_only=True``.
    """
    path = Path(path)
    if path.is_dir():
        if not is_pretrained_dir(path):
            raise CheckpointError(f"{path}: a folder without {MANIFEST}; pass a .ckpt file or a folder written by "
                                  "armodal-export")
        model = load_pretrained(path, device=device, expect_modality=expect_modality)
        model.loader = load  # draft_ckpt= loads its draft the same way
        return model
    ckpt, cfg = load_checkpoint_meta(path, expect_modality)
    if not is_ar_config(cfg):
        raise CheckpointError(f"{path}: not an autoregressive checkpoint (stage {cfg.module._target_}); "
                              "load it with armodal.load_stage, or pass the AR stage's checkpoint")
    return _build_ar(path, ckpt, cfg, device, use_ema)


def _build_ar(path: Path, ckpt: dict, cfg: DictConfig, device, use_ema: bool) -> ARModel:
    """The AR model of a checkpoint already read and checked by :func:`load_checkpoint_meta`."""
    meta = ckpt["armodal"]
    state = ckpt["state_dict"]
    tok_dir = _find_tokenizer_dir(path, meta)
    verify_tokenizer_files(tok_dir, meta.get("tokenizer_sha256"), path)
    tokenizer = load_tokenizer(tok_dir)
    if cfg.modality.get("name") and tokenizer.modality != cfg.modality.name:
        raise CheckpointError(f"{path}: saved tokenizer is for {tokenizer.modality!r}, config says {cfg.modality.name!r}")
    net = instantiate(cfg.model, vocab_size=tokenizer.vocab_size, num_types=tokenizer.num_types)
    cond = None
    if cfg.modality.get("conditioner") is not None:
        cond = instantiate(cfg.modality.conditioner, d_model=net.config.d_model)
    prefix = "ema." if use_ema and any(k.startswith("ema.") for k in state) else ""
    try:
        net.load_state_dict(_sub_state(state, prefix + "net."))
        if cond is not None:
            cond.load_state_dict(_sub_state(state, prefix + "conditioner."))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the saved model config ({' '.join(str(e).split())[:300]})") from None
    return ARModel(net, tokenizer, cond, cfg, str(path), loader=load).to(device).eval()


def load_stage(path: str | Path, device: str | torch.device = "cpu", expect_modality: str | None = None):
    """Rebuild a non-AR training stage (e.g. the image VQ tokenizer's ``VQLitModule``) with its weights.

    The stage's class may define ``from_checkpoint(ckpt, cfg, path)``; otherwise it is built from the
    saved ``module`` config and given the saved ``state_dict``.  An AR checkpoint is a
    :class:`CheckpointError` pointing at :func:`load`.
    """
    path = Path(path)
    ckpt, cfg = load_checkpoint_meta(path, expect_modality)
    if is_ar_config(cfg):
        raise CheckpointError(f"{path}: an autoregressive checkpoint; load it with armodal.load")
    return _build_stage(path, ckpt, cfg, device)


def _build_stage(path: Path, ckpt: dict, cfg: DictConfig, device):
    """The non-AR stage of a checkpoint already read and checked by :func:`load_checkpoint_meta`."""
    cls = locate_target(cfg.module._target_, str(path), "module._target_")
    if hasattr(cls, "from_checkpoint"):
        return cls.from_checkpoint(ckpt, cfg, path).to(device).eval()
    module = instantiate(cfg.module)
    module.load_state_dict(ckpt["state_dict"])
    return module.to(device).eval()


def load_any(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> tuple[Any, DictConfig, bool]:
    """(model, saved config, is_ar) of an AR checkpoint, an exported folder or another stage, reading the
    file once (``armodal-eval`` takes all three)."""
    path = Path(path)
    if path.is_dir():
        model = load(path, device=device)
        return model, model.config, True
    ckpt, cfg = load_checkpoint_meta(path)
    if is_ar_config(cfg):
        return _build_ar(path, ckpt, cfg, device, use_ema), cfg, True
    return _build_stage(path, ckpt, cfg, device), cfg, False
