"""Characters of a small alphabet <-> ids (0 pad, 1 bos, 2 eos, then one id per letter)."""

from __future__ import annotations

from pathlib import Path

import torch

from armodal.modalities.base import Tokenizer, register_tokenizer


@register_tokenizer("toy")
class ToyTokenizer(Tokenizer):
    modality = "toy"
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, alphabet: str = "abcd") -> None:
        if not alphabet or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet must be non-empty without repeats, got {alphabet!r}")
        self.alphabet = alphabet

    @property
    def vocab_size(self) -> int:
        return 3 + len(self.alphabet)

    def encode(self, item: str) -> torch.Tensor:
        bad = sorted(set(item) - set(self.alphabet))
        if bad:
            raise ValueError(f"letters {bad} are not in the alphabet {self.alphabet!r}")
        return torch.tensor([self.bos_id, *(3 + self.alphabet.index(c) for c in item), self.eos_id])

    def decode(self, ids: torch.Tensor) -> str:
        out = []
        for i in torch.as_tensor(ids).tolist():
            if i == self.eos_id:
                break
            if i >= 3:
                out.append(self.alphabet[i - 3])
        return "".join(out)

    def state(self) -> dict:
        return {"alphabet": self.alphabet}

    @classmethod
    def from_state(cls, state: dict, directory: Path) -> "ToyTokenizer":
        return cls(state["alphabet"])
