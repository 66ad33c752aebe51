"""Identity tokenizer over a fixed integer vocabulary, plus pad/bos/eos specials."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from armodal.modalities.base import Tokenizer, register_tokenizer

__all__ = ["TokensTokenizer"]


@register_tokenizer("tokens")
class TokensTokenizer(Tokenizer):
    """Ids ``0..n_symbols-1`` are the user's symbols; pad, bos and eos follow unless the vocab names them.

    ``vocab.json`` holds ``{"vocab_size": N}`` or ``{"tokens": ["a", "b", ...]}``, and may name
    ``"pad"``, ``"bos"``, ``"eos"`` ids inside the user's range and ``"dtype"`` for ``.bin`` files.
    """

    modality = "tokens"

    def __init__(self, n_symbols: int, tokens: list[str] | None = None, pad: int | None = None,
                 bos: int | None = None, eos: int | None = None) -> None:
        if n_symbols <= 0:
            raise ValueError(f"vocabulary must have at least one symbol, got {n_symbols}")
        self.n_symbols = int(n_symbols)
        self.tokens = list(tokens) if tokens is not None else None
        specials = {"pad": pad, "bos": bos, "eos": eos}
        nxt = self.n_symbols
        for name, value in specials.items():  # unnamed specials follow the user's symbols
            if value is None:
                specials[name], nxt = nxt, nxt + 1
        self.pad_id, self.bos_id, self.eos_id = specials["pad"], specials["bos"], specials["eos"]
        self._vocab_size = max(nxt, *(v + 1 for v in specials.values()))

    @classmethod
    def from_vocab_file(cls, path: str | Path) -> "TokensTokenizer":
        path = Path(path)
        try:
            v = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: vocabulary file not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        tokens = v.get("tokens")
        n = len(tokens) if tokens is not None else v.get("vocab_size")
        if not isinstance(n, int) or n <= 0:
            raise ValueError(f"{path}: needs 'vocab_size' (a positive int) or a 'tokens' list")
        return cls(n, tokens, v.get("pad"), v.get("bos"), v.get("eos"))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, item) -> torch.Tensor:
        if isinstance(item, str):
            if self.tokens is None:
                raise ValueError("this vocabulary has no token strings; pass integer ids")
            index = {t: i for i, t in enumerate(self.tokens)}
            try:
                return torch.tensor([index[t] for t in item.split()], dtype=torch.long)
            except KeyError as e:
                raise ValueError(f"unknown token {e.args[0]!r}") from None
        ids = torch.as_tensor(item, dtype=torch.long).flatten()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.n_symbols):
            raise ValueError(f"token ids must be in [0, {self.n_symbols}), got range [{ids.min()}, {ids.max()}]")
        return ids

    def decode(self, ids: torch.Tensor) -> list[int]:
        out = []
        for i in torch.as_tensor(ids).tolist():
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id) or i >= self.n_symbols:
                continue
            out.append(i)
        return out

    def to_text(self, ids: list[int]) -> str:
        return " ".join(self.tokens[i] for i in ids) if self.tokens else " ".join(map(str, ids))

    def state(self) -> dict:
        return {"n_symbols": self.n_symbols, "tokens": self.tokens, "pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id}

    @classmethod
    def from_state(cls, state: dict, directory: Path) -> "TokensTokenizer":
        return cls(state["n_symbols"], state.get("tokens"), state["pad"], state["bos"], state["eos"])
