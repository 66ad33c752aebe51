"""Transposition ensemble for JSB scoring: one trained model, evaluated in several keys at once.

A model trained with random transposition gives, for every shift ``s``, a slightly
different predictor: transpose the history by ``s`` semitones, predict, transpose
the prediction back.  Averaging those predictors' next-token distributions is an
ensemble in the ordinary sense and stays a proper autoregressive model:

* shift ``s`` takes part in predicting token ``j`` only while every pitch of the
  history (tokens before ``j`` in the scored window) stays inside 36..81 when
  shifted; the choice depends on the past only, never on the token being scored;
* a shifted prediction puts no mass on pitches it cannot name (those that would
  leave the range); it is renormalised over the ids it can name, so each
  member is a distribution over the full vocabulary and so is their mean.

The reported number is the note-wise NLL of that mixture, token-weighted exactly
like :func:`armodal.training.dataset_nll`.  It is a test-time ensemble: report it next
to the single-model number, never instead of it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from armodal.modalities.music.tokenizer import JSBTokenizer

__all__ = ["shifted_log_probs", "mixture_log_probs", "transposition_ensemble_nll"]


def shifted_log_probs(net, tok: JSBTokenizer, ids: torch.Tensor,
                      shifts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T] (one window) -> (log p [S, T - 1, V], usable bool [S, T - 1]): each shift's next-token
    distribution in the original key for targets ``ids[1:]``, and whether the shift takes part there
    (its history is in range); rows that do not take part are -inf."""
    v, first = tok.vocab_size, tok.num_specials  # pitch ids are [first, v)
    is_pitch = ids >= first  # [T]
    rows, valid = [], []
    for s in shifts:
        moved = ids + s * is_pitch.long()
        ok = ~is_pitch | ((moved >= first) & (moved < v))  # [T] this token can be named after the shift
        valid.append(torch.cumprod(ok.long(), 0).bool())  # history in range up to and including j
        rows.append(torch.where(ok, moved, torch.full_like(ids, tok.rest_id)))  # placeholder past the break
    batch = torch.stack(rows)  # [S, T]
    logits = net(batch, types=tok.types(batch)).float()[:, :-1]  # [S, T-1, V]: position j predicts j + 1
    logp = torch.log_softmax(logits, -1)
    out = torch.full_like(logp, -math.inf)
    usable = torch.stack([val[:-1] for val in valid])  # [S, T-1]: history up to the predicting position
    ids_v = torch.arange(v, device=ids.device)
    for k, s in enumerate(shifts):
        src = ids_v + s * (ids_v >= first).long()  # original id -> id in the shifted key
        nameable = (ids_v < first) | ((src >= first) & (src < v))  # [V]
        member = logp[k][:, src.clamp(0, v - 1)].masked_fill(~nameable, -math.inf)  # [T-1, V]
        member = member - torch.logsumexp(member, -1, keepdim=True)  # renormalise over what it can name
        out[k] = torch.where(usable[k][:, None], member, out[k])
    return out, usable


def mixture_log_probs(logp: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """The ensemble's next-token log-distribution [T - 1, V]: the uniform mixture of the members that take
    part at each position (``logp`` [S, T - 1, V], ``usable`` [S, T - 1] from :func:`shifted_log_probs`)."""
    return torch.logsumexp(logp, 0) - torch.log(usable.sum(0).float())[:, None]


@torch.no_grad()
def transposition_ensemble_nll(net, tok: JSBTokenizer, dataset, shifts: Sequence[int] = (-2, -1, 0, 1, 2)) -> dict:
    """Note-wise NLL of the transposition ensemble over a JSB eval dataset of ``(ids, skip)`` windows.

    ``shifts`` must contain 0, so every token has at least one member (the plain model)."""
    shifts = [int(s) for s in shifts]
    if 0 not in shifts:
        raise ValueError(f"shifts must include 0 (the untransposed model), got {shifts}")
    dev = next(net.parameters()).device
    total, count, total_single = 0.0, 0, 0.0
    for ids, skip in dataset:
        ids = ids.to(dev)
        logp, usable = shifted_log_probs(net, tok, ids, shifts)  # [S, T-1, V], [S, T-1]
        target = ids[1:]
        scored = torch.zeros_like(target, dtype=torch.bool)
        scored[max(skip - 1, 0):] = True  # target j + 1 is scored when j + 1 >= skip
        scored &= target >= tok.rest_id  # voice-step tokens only, as in the datamodule's loss_mask
        member = logp.gather(-1, target[None, :, None].expand(len(shifts), -1, 1))[..., 0]  # [S, T-1]
        mix = torch.logsumexp(member, 0) - torch.log(usable.sum(0).float())  # uniform over the usable members
        total -= float(mix[scored].sum())
        total_single -= float(member[shifts.index(0)][scored].sum())
        count += int(scored.sum())
    return {"nll": total / max(count, 1), "nll_single": total_single / max(count, 1), "tokens": count,
            "shifts": shifts}
