"""ARModel: a trained autoregressive model (network, tokenizer, optional conditioner) ready to sample.

``armodal.load(path)`` builds one from a checkpoint; :meth:`ARModel.from_module` gives a view of a
training module (used by the sample-logging callback).
"""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from armodal.generation import GenerationOutput, SamplingParams, generate
from armodal.modalities.base import Tokenizer

__all__ = ["ARModel"]


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
