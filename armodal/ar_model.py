"""ARModel: a trained autoregressive model (network, tokenizer, optional conditioner) ready to sample.

``armodal.load(path)`` builds one from a checkpoint; :meth:`ARModel.from_module` gives a view of a
training module (used by the sample-logging callback).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from armodal.generation import Draft, GenerationConfig, GenerationOutput, Tokens, UnsupportedSetting, generate
from armodal.modalities.base import Conditioner, Tokenizer

__all__ = ["ARModel", "nest_settings"]


def nest_settings(node: DictConfig) -> DictConfig:
    """Move generation settings written as flat keys of a sampler / evaluator node (configs saved
    before the settings object: ``temperature: 0.9``) into its ``generation`` mapping, in place."""
    flat = [k for k in node if k in GenerationConfig.field_names()]
    if flat:
        with open_dict(node):
            nested = {k: node.pop(k) for k in flat}
            node["generation"] = {**nested, **(OmegaConf.to_container(node["generation"]) if node.get("generation") else {})}
    return node


class ARModel:
    """A trained autoregressive model ready to sample: ``net``, ``tokenizer``, ``conditioner``, ``config``."""

    def __init__(self, net, tokenizer: Tokenizer, conditioner=None, config: DictConfig | None = None,
                 ckpt_path: str | None = None, loader: Callable[..., "ARModel"] | None = None) -> None:
        self.net = net
        self.tokenizer = tokenizer
        self.conditioner = conditioner
        self.config = config
        self.ckpt_path = ckpt_path
        self.loader = loader  # checkpoint path -> ARModel (armodal.load), for draft_ckpt=
        self.draft: ARModel | None = None  # speculative decoding's draft when no draft_ckpt is given
        self._drafts: dict[str, ARModel] = {}  # drafts loaded from draft_ckpt=, by path

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

    # -- generation ------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor | None = None,  # [B, T] prompt; None: BOS (or nothing when the tokenizer has none)
        cond: Any = None,  # the conditioner's input (labels, features ...): one row per prompt
        config: GenerationConfig | None = None,
        *,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        stream=None,
        on_probs=None,
        **overrides: Any,
    ) -> GenerationOutput:
        """Generate with the settings ``config`` (default :class:`GenerationConfig`), ``overrides`` applied.

        ``stream`` / ``on_probs``: :func:`armodal.generation.generate`'s per-step callbacks.

        ``overrides`` are :class:`GenerationConfig` fields (``strategy="beam", num_beams=4``);
        ``num_samples`` rows per prompt come back (samples; beam: the best hypotheses).
        A setting this model cannot honour raises :class:`UnsupportedSetting` naming it.
        """
        config = (config or GenerationConfig()).replace(**overrides)
        self.check(config, cond)
        prefix = uncond = None
        if cond is not None:
            prefix = self.conditioner(cond)
            if config.cfg_scale != 1.0:
                uncond = self.conditioner.uncond(cond)
        if ids is None:
            b = 1 if prefix is None else prefix.shape[0]
            tok = self.tokenizer
            ids = torch.full((b, 1), tok.bos_id, dtype=torch.long) if tok.bos_id is not None else torch.zeros(b, 0, dtype=torch.long)
        draft = self._draft(config, cond) if config.strategy == "speculative" else None
        return generate(self.net, ids.to(self.device), config, prefix=prefix, uncond_prefix=uncond,
                        tokens=self.token_rules(config), num_return_sequences=num_samples, generator=generator,
                        stream=stream, draft=draft, on_probs=on_probs)

    def token_rules(self, config: GenerationConfig) -> Tokens:
        """What the engine needs from the tokenizer: EOS / pad ids, the type stream, the grammar (if constrained),
        the style rules (if ``rule_penalty`` is set)."""
        tok = self.tokenizer
        self._check_rules(config)  # every decode path (the modalities' own too) builds its rules here
        return Tokens(tok.eos_id, tok.pad_id, tok.types if tok.num_types > 0 else None,
                      tok.allowed_next if config.constrained else None,
                      tok.flagged_next if config.rule_penalty else None)

    def _check_rules(self, config: GenerationConfig) -> None:
        """``rule_penalty`` names only rules the tokenizer has: else :class:`UnsupportedSetting`."""
        have = tuple(self.tokenizer.style_rules)
        for rule in config.rule_penalty or {}:
            if rule not in have:
                raise UnsupportedSetting("rule_penalty", config.rule_penalty, self.modality, f"{type(self.tokenizer).__name__} "
                                         + (f"has the style rules {', '.join(have)}, not {rule!r}" if have else "has no style rules"))

    def check(self, config: GenerationConfig, cond: Any = None) -> None:
        """Raise :class:`UnsupportedSetting` for a setting this model cannot honour."""
        m = self.modality
        if config.cfg_scale != 1.0:
            if self.conditioner is None:
                raise UnsupportedSetting("cfg_scale", config.cfg_scale, m, "the model has no conditioner, so there is "
                                         "no unconditional prefix to guide against")
            if type(self.conditioner).uncond is Conditioner.uncond:
                raise UnsupportedSetting("cfg_scale", config.cfg_scale, m, f"{type(self.conditioner).__name__} has no "
                                         "unconditional prefix (it was not trained with condition dropout)")
            if cond is None:
                raise UnsupportedSetting("cfg_scale", config.cfg_scale, m, "guidance needs a condition (cond=)")
        for name in ("length_penalty", "early_stopping"):
            if getattr(config, name) is not None and self.tokenizer.eos_id is None:
                raise UnsupportedSetting(name, getattr(config, name), m, "its sequences have no end token, so every "
                                         "beam hypothesis has the same length and ends at the same step")
        if not config.constrained and type(self.tokenizer).allowed_next is Tokenizer.allowed_next:
            raise UnsupportedSetting("constrained", False, m, f"{type(self.tokenizer).__name__} has no grammar to switch off")
        self._check_rules(config)
        if config.strategy == "speculative" and config.draft_ckpt is None and self.draft is None:
            raise ValueError("strategy=speculative needs a draft model: draft_ckpt=PATH (a smaller model trained "
                             "with the same tokenizer), or set ARModel.draft")
        if cond is not None and self.conditioner is None:
            raise ValueError(f"this {m} model has no conditioner; cond= cannot be used")

    def _draft(self, config: GenerationConfig, cond: Any) -> Draft:
        """The draft for speculative decoding: ``self.draft``, or ``config.draft_ckpt`` loaded once."""
        draft = self.draft
        if draft is not None and config.draft_ckpt is None:
            self.check_draft(draft)
        if config.draft_ckpt is not None:
            path = str(config.draft_ckpt)
            if path not in self._drafts:
                if self.loader is None:
                    raise ValueError(f"draft_ckpt={path}: this ARModel was not made by armodal.load, so it cannot "
                                     "load a draft; set model.draft = armodal.load(path) instead")
                d = self.loader(path, device=self.device)
                self.check_draft(d, path)
                self._drafts[path] = d
            draft = self._drafts[path]
        prefix = uncond = None
        if cond is not None:
            if draft.conditioner is None:
                raise UnsupportedSetting("strategy", "speculative", self.modality, "the draft has no conditioner, "
                                         "the target has one: train the draft with the same modality config")
            prefix = draft.conditioner(cond)
            if config.cfg_scale != 1.0:
                uncond = draft.conditioner.uncond(cond)
        return Draft(draft.net, prefix, uncond)

    def check_draft(self, draft: "ARModel", source: str = "draft") -> None:
        """A draft must share the tokenizer (same class and state): else a clear error naming ``source``."""
        a, b = self.tokenizer, draft.tokenizer
        if type(a) is not type(b) or a.vocab_size != b.vocab_size or a.state() != b.state():
            raise ValueError(f"{source}: its tokenizer ({b}) differs from the target's ({a}); a draft must be trained "
                             "with the same tokenizer")

    def sampler(self, **overrides):
        """The modality's sampler, rebuilt from the saved config.

        Runs saved before the settings object kept sampling settings as flat sampler keys
        (``temperature: 0.9``); they are read as the sampler's ``generation`` defaults.
        """
        cfg = OmegaConf.create(OmegaConf.to_container(self.config, resolve=False))  # a copy: interpolations still resolve
        return instantiate(nest_settings(cfg.modality.sampler), **overrides)

    def __repr__(self) -> str:
        return f"ARModel(modality={self.modality!r}, params={self.net.num_params():,}, tokenizer={self.tokenizer})"
