"""Optimizer and schedule factories (``_partial_: true`` in config)."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from armodal.utils.safety import constructible

__all__ = ["adamw", "warmup_cosine", "param_groups"]


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Decay matrices (dim >= 2); never decay norms, biases or 1-d gains."""
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@constructible
def adamw(
    params,
    lr: float = 3e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.1,
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW; ``params`` are named parameters (decay split) or plain params/groups.

    ``fused=None`` picks the fused CUDA kernel when every parameter is on a GPU.
    """
    params = list(params)
    if params and isinstance(params[0], tuple):
        params = param_groups(params, weight_decay)
    if fused is None:
        tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        fused = bool(tensors) and all(t.is_cuda for t in tensors)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps, fused=fused)


@constructible
def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int = 100, total_steps: int = 10_000, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base lr, then cosine decay to ``min_lr_ratio`` x base at ``total_steps``."""
    warmup_steps = max(0, int(warmup_steps))
    total_steps = max(int(total_steps), warmup_steps + 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
