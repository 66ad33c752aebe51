"""``sample`` and ``greedy``: one token per step, drawn from (or the argmax of) the processed logits.

``greedy`` is sampling at temperature 0; both run the engine's prefill and cached
token step.  :func:`reference` is the readable uncached loop the cached one is
checked against (nanoGPT's ``generate``, with the engine's guidance, types and
grammar).
"""

from __future__ import annotations

import torch

from armodal.generation.engine import Engine, GenerationOutput, Rows

__all__ = ["decode", "reference"]


@torch.no_grad()
def decode(
    engine: Engine,
    ids: torch.Tensor,  # [B, T]
    *,
    max_new: int,
    num_return: int = 1,
    generator: torch.Generator | None = None,
    stream=None,
    use_cache: bool = True,
) -> GenerationOutput:
    """``num_return`` continuations of every prompt, sampled in one batch, with per-row EOS stopping."""
    ids = engine.expand(num_return, ids)
    if not use_cache:
        return reference(engine, ids, max_new=max_new, generator=generator, stream=stream)
    rows = Rows(ids, engine.tokens, stream)
    with engine.caches(ids.shape[0], engine.prefix_len + ids.shape[1] + max_new):
        logits = engine.prefill(ids)  # [B, V]
        for step in range(max_new):
            rows.append(engine.choose(logits, rows.seq, generator))
            if step == max_new - 1 or rows.done:
                break
            logits = engine.forward(rows.seq, rows.seq.shape[1] - 1)[:, -1]
    return rows.output()


@torch.no_grad()
def reference(engine: Engine, ids: torch.Tensor, *, max_new: int, generator=None, stream=None) -> GenerationOutput:
    """The uncached loop: recompute the whole sequence every step."""
    rows = Rows(ids, engine.tokens, stream)
    for _ in range(max_new):
        rows.append(engine.choose(engine.forward_uncached(rows.seq), rows.seq, generator))
        if rows.done:
            break
    return rows.output()
