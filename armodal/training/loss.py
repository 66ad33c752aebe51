"""Next-token loss under teacher forcing: per batch (training) and over a dataloader (evaluation)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["token_logits_and_targets", "next_token_nll", "unlikelihood_sum", "soft_target_sums", "batch_nll",
           "batch_losses", "dataset_nll", "to_device"]


def token_logits_and_targets(
    logits: torch.Tensor,  # [B, P + T, V]
    ids: torch.Tensor,  # [B, T]
    prefix_len: int,
    loss_mask: torch.Tensor | None,  # [B, T] bool, True = target
    pad_id: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align logits with the tokens they predict. Returns (logits [B, T', V], targets [B, T'], mask [B, T'])."""
    if loss_mask is None:
        loss_mask = torch.ones_like(ids, dtype=torch.bool) if pad_id is None else ids != pad_id
    if prefix_len > 0:  # position P-1+t predicts token t: every token can be a target
        return logits[:, prefix_len - 1 : prefix_len - 1 + ids.shape[1]], ids, loss_mask
    return logits[:, :-1], ids[:, 1:], loss_mask[:, 1:]  # token 0 has no predictor


def next_token_nll(
    logits: torch.Tensor, ids: torch.Tensor, prefix_len: int = 0, loss_mask: torch.Tensor | None = None,
    pad_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of NLL (nats, fp32) over target tokens, and the number of target tokens."""
    lg, tgt, mask = token_logits_and_targets(logits, ids, prefix_len, loss_mask, pad_id)
    nll = F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none")
    mask = mask.reshape(-1).float()
    return (nll * mask).sum(), mask.sum()


def unlikelihood_sum(
    logits: torch.Tensor, ids: torch.Tensor, avoid: torch.Tensor, prefix_len: int = 0,
    loss_mask: torch.Tensor | None = None, pad_id: int | None = None, weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unlikelihood term (Welleck et al. 2019), summed over target tokens: ``-log(1 - p(avoid set))``.

    ``avoid`` [B, T, V] bool is aligned with ``ids`` like ``loss_mask``: ``avoid[b, t]`` are the tokens
    the data marks as wrong continuations *in place of* token ``t`` (the data never marks the target
    itself).  Positions with an empty set or outside the loss mask add nothing.  ``avoid`` [R, B, T, V]
    holds R rules' sets, each its own term, summed with ``weights`` [R] (default 1 each).
    """
    if avoid.dim() == 4:
        w = torch.ones(avoid.shape[0]) if weights is None else weights
        return sum(float(w[r]) * unlikelihood_sum(logits, ids, avoid[r], prefix_len, loss_mask, pad_id)
                   for r in range(avoid.shape[0]))
    lg, tgt, mask = token_logits_and_targets(logits, ids, prefix_len, loss_mask, pad_id)
    av = avoid if prefix_len > 0 else avoid[:, 1:]
    sel = mask & av.any(-1)
    if not bool(sel.any()):
        return lg.new_zeros((), dtype=torch.float32)
    logp = lg[sel].float().log_softmax(-1)  # [N, V]
    log_bad = torch.logsumexp(logp.masked_fill(~av[sel], float("-inf")), -1)  # [N] log p(avoid set)
    return -torch.log1p(-log_bad.exp().clamp(max=1.0 - 1e-6)).sum()


def soft_target_sums(
    logits: torch.Tensor, ids: torch.Tensor, soft: torch.Tensor, prefix_len: int = 0,
    loss_mask: torch.Tensor | None = None, pad_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distillation terms over the target tokens that have a soft target: (sum of the cross-entropy
    ``-sum_v q(v) log p(v)`` against the soft target q, sum of the plain NLL of the same tokens).

    ``soft`` [B, T, V] is aligned with ``ids`` like ``loss_mask``: ``soft[b, t]`` is a distribution over
    the vocabulary for token ``t`` (e.g. a teacher's prediction), or all zeros where there is none (that
    token keeps its one-hot target).  The caller mixes: ``nll + w * (soft_ce - nll_on_those)`` is the
    cross-entropy against ``(1 - w) * one-hot + w * q`` on the tokens with a soft target.
    """
    lg, tgt, mask = token_logits_and_targets(logits, ids, prefix_len, loss_mask, pad_id)
    q = soft if prefix_len > 0 else soft[:, 1:]
    sel = mask & (q.sum(-1) > 0)
    if not bool(sel.any()):
        zero = lg.new_zeros((), dtype=torch.float32)
        return zero, zero
    logp = lg[sel].float().log_softmax(-1)  # [N, V]
    qs = q[sel].float()
    soft_ce = -(qs * logp.clamp_min(-1e4)).sum()  # clamp: q = 0 on a -inf log p adds 0, not nan
    hard = -logp.gather(-1, tgt[sel][:, None]).sum()
    return soft_ce, hard


def batch_losses(net: nn.Module, conditioner: nn.Module | None, batch: dict, pad_id: int | None,
                 unlikelihood: bool = False, distill: bool = False):
    """(sum NLL in nats, number of target tokens, unlikelihood sum or None[, (soft CE sum, NLL sum on the
    soft-target tokens)] when ``distill``) for one batch dict; the unlikelihood term needs the batch's
    ``avoid`` sets, the distillation terms its ``soft_targets``."""
    ids = batch["ids"]
    prefix = None
    if conditioner is not None and batch.get("cond") is not None:
        prefix = conditioner(batch["cond"])
    logits = net(ids, prefix=prefix, types=batch.get("types"))
    p = 0 if prefix is None else prefix.shape[1]
    s, n = next_token_nll(logits, ids, p, batch.get("loss_mask"), pad_id)
    ul = None
    if unlikelihood:
        ul = unlikelihood_sum(logits, ids, batch["avoid"], p, batch.get("loss_mask"), pad_id, batch.get("avoid_weight"))
    if distill:
        return s, n, ul, soft_target_sums(logits, ids, batch["soft_targets"], p, batch.get("loss_mask"), pad_id)
    return s, n, ul


def batch_nll(net: nn.Module, conditioner: nn.Module | None, batch: dict, pad_id: int | None):
    """(sum NLL in nats, number of target tokens) for one batch dict."""
    s, n, _ = batch_losses(net, conditioner, batch, pad_id)
    return s, n


def to_device(batch, device):
    """A batch (tensor, or dict / list / tuple of them) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def dataset_nll(model, loader, max_batches: int | None = None) -> dict:
    """Token-weighted NLL over a dataloader: nats/token, bits/token, perplexity, token count."""
    total, count = 0.0, 0.0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        s, n = batch_nll(model.net, model.conditioner, to_device(batch, model.device), model.tokenizer.pad_id)
        total += float(s)
        count += float(n)
    nll = total / max(count, 1.0)
    return {"nll": nll, "bpt": nll / math.log(2), "ppl": math.exp(min(nll, 50)), "tokens": count}
