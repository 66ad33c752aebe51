"""Next-token loss under teacher forcing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["token_logits_and_targets", "next_token_nll"]


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
