"""Logits processors: small pure functions over logits [B, V].

Each returns new logits with disallowed entries set to ``-inf``; none mutates its
input.  :func:`process` composes them in the usual order (repetition penalty, grammar
mask, style-rule penalty, temperature, top-k, top-p, min-p) as a :class:`GenerationConfig` asks, and
:func:`probs` turns the result into the distribution that sampling, beam
search's scores and the speculative accept test all use.
"""

from __future__ import annotations

import torch

from armodal.generation.config import GenerationConfig

__all__ = [
    "greedy",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "mask_disallowed",
    "rule_penalty",
    "cfg_mix",
    "process",
    "probs",
    "sample",
]

NEG_INF = float("-inf")


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B] argmax ids."""
    return logits.argmax(dim=-1)


def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    if t <= 0:
        raise ValueError("temperature must be > 0 (use greedy for t = 0)")
    return logits / t


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = (cum - sorted_logits.softmax(dim=-1)) >= p  # mass before this token already >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, idx, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``p`` times the top token's probability."""
    if p <= 0:
        return logits
    pr = logits.softmax(dim=-1)
    return logits.masked_fill(pr < p * pr.max(dim=-1, keepdim=True).values, NEG_INF)


def repetition_penalty(logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty: for tokens in ``prev_ids`` [B, t], divide positive logits / multiply negative ones."""
    if penalty == 1.0 or prev_ids is None or prev_ids.numel() == 0:
        return logits
    seen = torch.gather(logits, -1, prev_ids)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, prev_ids, seen)


def mask_disallowed(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """``allowed`` bool [B, V] (or [V]); rows with nothing allowed are left unmasked."""
    if allowed is None:
        return logits
    allowed = allowed.to(logits.device).expand_as(logits)
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return logits.masked_fill(~allowed, NEG_INF)


def rule_penalty(logits: torch.Tensor, flagged: dict[str, torch.Tensor] | None,
                 penalties: dict[str, float] | None) -> torch.Tensor:
    """Subtract ``penalties[rule]`` nats from the logits of the tokens ``flagged[rule]`` (bool [B, V]) marks.

    An infinite penalty forbids the token; a row whose every finite logit would become -inf is left as it
    was (the rules are a preference, never a dead end).
    """
    if not flagged or not penalties:
        return logits
    x = logits
    for rule, mask in flagged.items():
        x = torch.where(mask.to(x.device), x - penalties[rule], x)
    dead = torch.isneginf(x).all(-1) & ~torch.isneginf(logits).all(-1)
    return torch.where(dead[:, None], logits, x) if dead.any() else x


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond). 0 -> uncond, 1 -> cond."""
    if scale == 1.0:
        return cond
    if scale == 0.0:
        return uncond
    return uncond + scale * (cond - uncond)


def process(
    logits: torch.Tensor,
    params: GenerationConfig,
    prev_ids: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    flagged: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Apply the configured processors in order; returns float32 logits [B, V].

    ``flagged`` {rule: bool [B, V]}: the tokens each style rule flags (``params.rule_penalty`` gives the nats).
    """
    x = logits.float()
    x = repetition_penalty(x, prev_ids, params.repetition_penalty)
    x = mask_disallowed(x, allowed)
    x = rule_penalty(x, flagged, params.rule_penalty)
    if params.is_greedy:
        return x
    x = temperature(x, params.temperature)
    x = top_k(x, params.top_k)
    x = top_p(x, params.top_p)
    return min_p(x, params.min_p)


def probs(processed: torch.Tensor, params: GenerationConfig) -> torch.Tensor:
    """Distribution [B, V] that :func:`sample` draws from (one-hot for greedy)."""
    if params.is_greedy:
        return torch.nn.functional.one_hot(processed.argmax(-1), processed.shape[-1]).float()
    return processed.softmax(dim=-1)


def sample(processed: torch.Tensor, params: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw next ids [B] from processed logits.

    With top-k on, the draw is made among the k largest entries only: :func:`process` has set
    every other entry to -inf, so the distribution is the same, but the softmax and
    ``multinomial`` run over k entries instead of the whole vocabulary (at batch 256 x 50257
    on the CPU that is most of a decoding step; scripts/bench_sampling.py).
    """
    if params.is_greedy:
        return greedy(processed)
    if 0 < params.top_k < processed.shape[-1]:
        vals, idx = processed.topk(params.top_k, dim=-1)  # [B, k]
        pick = torch.multinomial(vals.softmax(dim=-1), 1, generator=generator)
        return idx.gather(-1, pick).squeeze(-1)
    p = processed.softmax(dim=-1)
    return torch.multinomial(p, 1, generator=generator).squeeze(-1)
