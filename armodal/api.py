"""Public Python API: ``armodal.load(path)`` -> :class:`ARModel`."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from armodal.generation import GenerationOutput, SamplingParams, generate
from armodal.modalities.base import Tokenizer, load_tokenizer
from armodal.training.checkpoint import CheckpointError, read_checkpoint
from armodal.utils.safety import check_config_targets

__all__ = ["ARModel", "load", "load_checkpoint_meta", "AR_MODULE"]

AR_MODULE = "armodal.training.ARLitModule"


class ARModel:
    """A trained autoregressive model ready to sample: ``net``, ``tokenizer``, ``conditioner``, ``config``."""

    def __init__(self, net, tokenizer: Tokenizer, conditioner=None, config: DictConfig | None = None,
                 ckpt_path: str | None = None) -> None:
        self.net = net
        self.tokenizer = tokenizer
        self.conditioner = conditioner
        self.config = config
        self.ckpt_path = ckpt_path

    @classmethod
    def from_module(cls, module) -> "ARModel":
        """View of a training module (EMA weights when present)."""
        if module.ema is not None:
            net = module.ema["net"]
            cond = module.ema["conditioner"] if "conditioner" in module.ema else None
        else:
            net, cond = module.net, module.conditioner
        meta = getattr(module, "armodal_meta", {}) or {}
        cfg = OmegaConf.create(meta["config"]) if "config" in meta else None
        return cls(net, module.tokenizer, cond, cfg)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def modality(self) -> str:
        return self.tokenizer.modality

    def to(self, device) -> "ARModel":
        self.net.to(device)
        if self.conditioner is not None:
            self.conditioner.to(device)
        return self

    def eval(self) -> "ARModel":
        self.net.eval()
        if self.conditioner is not None:
            self.conditioner.eval()
        return self

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor | None = None,
        cond: Any = None,
        num_samples: int = 1,
        max_new_tokens: int = 256,
        constrained: bool = True,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        greedy: bool = False,
        seed: int | None = None,
        stream=None,
        use_cache: bool = True,
    ) -> GenerationOutput:
        """Sample continuations. ``ids`` [B, T] (BOS is used when None), ``cond`` goes to the conditioner.

        ``num_samples`` continuations per prompt are drawn in one batch.
        """
        tok, dev = self.tokenizer, self.device
        prefix = uncond = None
        if cond is not None:
            if self.conditioner is None:
                raise ValueError("this model has no conditioner; `cond` cannot be used")
            prefix = self.conditioner(cond)
            if cfg_scale != 1.0:
                uncond = self.conditioner.uncond(cond)
        if ids is None:
            b = 1 if prefix is None else prefix.shape[0]
            ids = torch.full((b, 1), tok.bos_id, dtype=torch.long) if tok.bos_id is not None else torch.zeros(b, 0, dtype=torch.long)
        ids = ids.to(dev)
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, greedy)
        return generate(
            self.net, ids, max_new_tokens=max_new_tokens, prefix=prefix, uncond_prefix=uncond, cfg_scale=cfg_scale,
            sampling=params, eos_id=tok.eos_id, pad_id=tok.pad_id,
            types_fn=tok.types if tok.num_types > 0 else None,
            allowed_fn=tok.allowed_next if constrained else None,
            stream=stream, generator=gen, num_return_sequences=num_samples, use_cache=use_cache,
        )

    def sampler(self, **overrides):
        """The modality's sampler, rebuilt from the saved config."""
        return instantiate(self.config.modality.sampler, **overrides)

    def __repr__(self) -> str:
        return f"ARModel(modality={self.modality!r}, params={self.net.num_params():,}, tokenizer={self.tokenizer})"


def load_checkpoint_meta(path: str | Path, expect_modality: str | None = None) -> tuple[dict, DictConfig]:
    """Read a checkpoint safely and validate its armodal metadata. Returns (checkpoint dict, saved config)."""
    ckpt = read_checkpoint(path)
    meta = ckpt.get("armodal")
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"{path}: not an armodal checkpoint (no 'armodal' metadata)")
    cfg = OmegaConf.create(meta["config"])
    check_config_targets(cfg, source=str(path))
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


def load(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True,
         expect_modality: str | None = None):
    """Rebuild a trained model from a checkpoint written by ``armodal-train``.

    AR checkpoints give an :class:`ARModel`; other stages (e.g. a VQ tokenizer) give
    their LightningModule with the weights loaded. Only ``armodal.*`` targets are
    rebuilt, and weights are read with ``weights_only=True``.
    """
    path = Path(path)
    ckpt, cfg = load_checkpoint_meta(path, expect_modality)
    meta = ckpt["armodal"]
    state = ckpt["state_dict"]
    target = cfg.module._target_
    if target != AR_MODULE:
        module_path, _, name = target.rpartition(".")
        cls = getattr(importlib.import_module(module_path), name)
        if hasattr(cls, "from_checkpoint"):
            return cls.from_checkpoint(ckpt, cfg, path).to(device).eval()
        module = instantiate(cfg.module)
        module.load_state_dict(state)
        return module.to(device).eval()
    tokenizer = load_tokenizer(_find_tokenizer_dir(path, meta))
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
    return ARModel(net, tokenizer, cond, cfg, str(path)).to(device).eval()
