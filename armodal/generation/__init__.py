"""Decoding: pure logits processors and cached decode loops."""

from armodal.generation.decode import GenerationOutput, beam_search, generate, speculative_generate
from armodal.generation.processors import (
    SamplingParams,
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

__all__ = [
    "GenerationOutput",
    "SamplingParams",
    "beam_search",
    "cfg_mix",
    "generate",
    "greedy",
    "mask_disallowed",
    "min_p",
    "probs",
    "process",
    "repetition_penalty",
    "sample",
    "speculative_generate",
    "temperature",
    "top_k",
    "top_p",
]
