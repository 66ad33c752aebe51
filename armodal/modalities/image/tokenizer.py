"""The image Tokenizer: a trained VQ model turns an image into h*w raster-order code ids.

Vocabulary: the K code ids, plus one pad id (K) that is never a target and never
sampled (``allowed_next`` masks it).  There is no BOS: the class prefix from
:class:`ClassConditioner` predicts the first code.  The type stream is the raster cell
index 0..h*w-1, which gives the shared transformer a learned 2D position per cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from armodal.modalities.base import Tokenizer, register_tokenizer
from armodal.modalities.image.vq import VQConfig, VQModel

__all__ = ["VQImageTokenizer"]


@register_tokenizer("image.vq")
class VQImageTokenizer(Tokenizer):
    """Wraps a :class:`VQModel`: ``encode(image) -> ids [h*w]``, ``decode(ids) -> image``."""

    modality = "image"

    def __init__(self, vq: VQModel, image_size: tuple[int, int], class_names: list[str] | None = None) -> None:
        self.vq = vq.eval()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.grid = vq.grid_shape(*self.image_size)  # (h, w)
        self.channels = vq.config.in_channels
        self.class_names = list(class_names or [])
        self.num_codes = vq.num_codes
        self.pad_id = self.num_codes

    # -- sizes ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.num_codes + 1  # codes + pad

    @property
    def num_types(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def seq_len(self) -> int:
        return self.num_types

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # -- images <-> ids ----------------------------------------------------------------
    def _as_batch(self, images: Any) -> torch.Tensor:
        """uint8 [B, C, H, W] / [C, H, W] / [H, W], float in [-1, 1], or PIL -> float [B, C, H, W]."""
        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True))
            if images.dim() == 3:
                images = images.permute(2, 0, 1)
        if images.dim() == 2:
            images = images[None]
        if images.dim() == 3:
            images = images[None]
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        if tuple(images.shape[1:]) != (self.channels, *self.image_size):
            raise ValueError(
                f"expected images of shape [B, {self.channels}, {self.image_size[0]}, {self.image_size[1]}], "
                f"got {tuple(images.shape)}"
            )
        return images.to(next(self.vq.parameters()).device)

    @torch.no_grad()
    def encode_batch(self, images: Any) -> torch.Tensor:
        """images -> ids LongTensor [B, h*w] (raster order)."""
        return self.vq.encode(self._as_batch(images)).flatten(1).cpu()

    @torch.no_grad()
    def decode_batch(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h*w] -> images float [B, C, H, W] in [-1, 1].  Pad ids become code 0."""
        if ids.shape[-1] != self.seq_len:
            raise ValueError(f"expected {self.seq_len} code ids per image, got {ids.shape[-1]}")
        ids = ids.clone()
        ids[(ids < 0) | (ids >= self.num_codes)] = 0
        dev = next(self.vq.parameters()).device
        return self.vq.decode(ids.view(-1, *self.grid).to(dev)).cpu()

    def encode(self, item: Any) -> torch.Tensor:
        """One image (uint8 [C, H, W] / [H, W], PIL, or float in [-1, 1]) -> ids [h*w]."""
        return self.encode_batch(item)[0]

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [h*w] -> uint8 image [C, H, W]."""
        return to_uint8(self.decode_batch(ids[None]))[0]

    # -- hooks for generation -------------------------------------------------------
    def types(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> raster cell index [B, T] (clamped to the last cell)."""
        t = torch.arange(ids.shape[1], device=ids.device).clamp_max(self.num_types - 1)
        return t.expand(ids.shape[0], -1)

    def allowed_next(self, ids: torch.Tensor) -> torch.Tensor:
        """Every code is allowed, the pad id never: bool [B, V]."""
        mask = torch.ones(ids.shape[0], self.vocab_size, dtype=torch.bool, device=ids.device)
        mask[:, self.pad_id] = False
        return mask

    # -- save / load -------------------------------------------------------------------
    def state(self) -> dict:
        return {"image_size": list(self.image_size), "class_names": self.class_names,
                "vq_config": self.vq.config.to_dict()}

    def save_extra(self, directory: Path) -> None:
        from armodal.modalities.image.vq_module import save_vq

        save_vq(self.vq, directory)

    @classmethod
    def from_state(cls, state: dict, directory: Path) -> "VQImageTokenizer":
        from armodal.modalities.image.vq_module import load_vq

        vq = load_vq(Path(directory) / "vq.safetensors")
        if vq.config.to_dict() != VQConfig(**state["vq_config"]).to_dict():
            raise ValueError(f"{directory}: vq.json does not match the tokenizer's saved VQ config")
        return cls(vq, tuple(state["image_size"]), state.get("class_names"))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [..] in [-1, 1] -> uint8 [..] in [0, 255]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
