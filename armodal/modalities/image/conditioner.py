"""Class conditioning: a learned class embedding as a one-position prefix.

Label dropout (``p_uncond``) swaps labels for the extra "null" class during training,
so the same model learns the unconditional distribution needed by classifier-free
guidance; ``uncond()`` returns the null-class prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from armodal.modalities.base import Conditioner, register_conditioner

__all__ = ["ClassConditioner"]


@register_conditioner("image.class")
class ClassConditioner(Conditioner):
    """``cond`` long [B] class ids -> prefix [B, 1, d_model]; class ``num_classes`` is null."""

    def __init__(self, d_model: int, num_classes: int = 10, p_uncond: float = 0.1, init_std: float = 0.02) -> None:
        super().__init__(d_model)
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond}")
        self.num_classes, self.p_uncond = num_classes, p_uncond
        self.embedding = nn.Embedding(num_classes + 1, d_model)  # [K + 1, D], row K = null class
        nn.init.normal_(self.embedding.weight, 0.0, init_std)

    @property
    def null_id(self) -> int:
        return self.num_classes

    def _labels(self, cond) -> torch.Tensor:
        labels = torch.as_tensor(cond, device=self.embedding.weight.device).long().flatten()  # [B]
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"class ids must lie in [0, {self.num_classes}], got {labels.tolist()[:8]}...")
        return labels

    def forward(self, cond) -> torch.Tensor:
        labels = self._labels(cond)
        if self.training and self.p_uncond > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.p_uncond
            labels = torch.where(drop, torch.full_like(labels, self.null_id), labels)
        return self.embedding(labels)[:, None]  # [B, 1, D]

    def uncond(self, cond) -> torch.Tensor:
        labels = self._labels(cond)
        return self.embedding(torch.full_like(labels, self.null_id))[:, None]  # [B, 1, D]
