"""The share of sampled strings that repeat a motif of at most 3 letters (1.0 for the data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from armodal.modalities.base import register_evaluator


def is_periodic(s: str, max_period: int = 3) -> bool:
    """Whether ``s`` (at least two letters) repeats its first ``p <= max_period`` letters."""
    return len(s) >= 2 and any(all(s[i] == s[i % p] for i in range(len(s))) for p in range(1, max_period + 1))


@register_evaluator("toy")
class ToyEvaluator:
    def __init__(self, num_samples: int = 16, max_new_tokens: int = 20, seed: int = 0) -> None:
        self.num_samples, self.max_new_tokens, self.seed = num_samples, max_new_tokens, seed

    def __call__(self, model: Any, datamodule: Any, out_dir: str | Path, num_samples: int | None = None,
                 **_: Any) -> dict:
        out = model.generate(num_samples=int(num_samples or self.num_samples), max_new_tokens=self.max_new_tokens,
                             seed=self.seed)
        texts = [model.tokenizer.decode(row) for row in out.ids.cpu()]
        return {"toy/periodic_fraction": sum(map(is_periodic, texts)) / len(texts),
                "toy/mean_length": sum(map(len, texts)) / len(texts)}
