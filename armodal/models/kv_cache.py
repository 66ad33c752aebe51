"""Static, position-indexed key/value cache (gpt-fast style).

The cache holds ``max_len`` slots per layer.  ``update(input_pos, k, v)`` writes the
keys/values of the current tokens at their absolute positions and returns the whole
buffer; attention then masks slots *after* each query position.  Because slots are
indexed by position, rolling back (speculative decoding, beam reordering) is just a
matter of decoding from an earlier position: stale slots are masked and later
overwritten.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KVCache"]


class KVCache(nn.Module):
    def __init__(
        self,
        max_batch: int,
        max_len: int,
        n_head: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (max_batch, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` ([B, H, T, Dh]) at positions ``input_pos`` ([T]); return full buffers."""
        b = k.shape[0]
        self.k[:b, :, input_pos] = k.to(self.k.dtype)
        self.v[:b, :, input_pos] = v.to(self.v.dtype)
        return self.k[:b], self.v[:b]

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder the batch dimension in place (beam search)."""
        n = index.shape[0]
        self.k[:n] = self.k.index_select(0, index)
        self.v[:n] = self.v.index_select(0, index)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
