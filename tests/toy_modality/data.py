"""Motif strings ("abcabcab...") as batches of ids; nothing is read from disk."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from armodal.modalities.base import register_datamodule
from tests.toy_modality.tokenizer import ToyTokenizer


def motif_strings(n: int, alphabet: str, rng: np.random.Generator, min_len: int = 8, max_len: int = 16) -> list[str]:
    """``n`` strings, each a random 2- or 3-letter motif repeated to a random length."""
    out = []
    for _ in range(n):
        motif = "".join(rng.choice(list(alphabet), size=int(rng.integers(2, 4))))
        length = int(rng.integers(min_len, max_len + 1))
        out.append((motif * length)[:length])
    return out


@register_datamodule("toy")
class ToyDataModule(pl.LightningDataModule):
    def __init__(self, alphabet: str = "abcd", n_train: int = 64, n_val: int = 16, seq_len: int = 18,
                 batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.alphabet, self.n_train, self.n_val = alphabet, n_train, n_val
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.tokenizer: ToyTokenizer | None = None
        self.splits: dict[str, list[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.tokenizer = ToyTokenizer(self.alphabet)
        rng = np.random.default_rng(self.seed)
        max_len = self.seq_len - 2  # BOS and EOS
        self.splits = {s: motif_strings(n, self.alphabet, rng, min(8, max_len), max_len)
                       for s, n in (("train", self.n_train), ("val", self.n_val), ("test", self.n_val))}

    def collate(self, items: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.full((len(items), self.seq_len), self.tokenizer.pad_id, dtype=torch.long)  # [B, T]
        for i, s in enumerate(items):
            row = self.tokenizer.encode(s)
            ids[i, : len(row)] = row
        return {"ids": ids}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, collate_fn=self.collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
