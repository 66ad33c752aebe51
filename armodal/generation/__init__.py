"""Decoding: one settings object, one engine, every strategy.

* :class:`GenerationConfig` -- the settings (strategy, temperature ... seed), declared once;
* :func:`generate` -- the front door: ``generate(net, ids, config, **overrides)``;
* :class:`Engine` -- prefill, token step, caches, guidance, types, grammar (:mod:`.engine`);
* strategies -- :mod:`.sampling` (sample, greedy), :mod:`.beam`, :mod:`.speculative`, :mod:`.lookahead`;
* :class:`~armodal.generation.fast.FastDecoder` -- persistent static caches + compiled step (:mod:`.fast`);
* logits processors -- small pure functions (:mod:`.processors`).
"""

from armodal.generation.config import STRATEGIES, GenerationConfig, UnsupportedSetting, unsupported
from armodal.generation.engine import Engine, GenerationOutput, Tokens, generate, seeded_generator
from armodal.generation.processors import (
    cfg_mix,
    greedy,
    mask_disallowed,
    min_p,
    probs,
    process,
    repetition_penalty,
    sample,
    temperature,
    top_k,
    top_p,
)
from armodal.generation.speculative import Draft

__all__ = [
    "Draft",
    "Engine",
    "GenerationConfig",
    "GenerationOutput",
    "STRATEGIES",
    "Tokens",
    "UnsupportedSetting",
    "cfg_mix",
    "generate",
    "greedy",
    "mask_disallowed",
    "min_p",
    "probs",
    "process",
    "repetition_penalty",
    "sample",
    "seeded_generator",
    "temperature",
    "top_k",
    "top_p",
    "unsupported",
]
