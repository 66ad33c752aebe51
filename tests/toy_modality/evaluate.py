"""The share of sampled strings that repeat a motif of at most 3 letters (1.0 for the data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from armodal.generation import GenerationConfig
from armodal.modalities.base import register_evaluator


def is_periodic(s: str, max_period: int = 3) -> bool:
    """Whether ``s`` (at least two letters) repeats its first ``p <= max_period`` letters."""
    return len(s) >= 2 and any(all(s[i] == s[i % p] for i in range(len(s))) for p in range(1, max_period + 1))


@register_evaluator("toy")
class ToyEvaluator:
    def __init__(self, num_samples: int = 16, generation=None) -> None:
        self.num_samples = num_samples
        self.generation = GenerationConfig.from_dict(generation or {"max_new_tokens": 20, "seed": 0})

    def __call__(self, model: Any, datamodule: Any, out_dir: str | Path, num_samples: int | None = None,
                 config: GenerationConfig | None = None, **_: Any) -> dict:
        out = model.generate(config=config or self.generation, num_samples=int(num_samples or self.num_samples))
        texts = [model.tokenizer.decode(row) for row in out.ids.cpu()]
        return {"toy/periodic_fraction": sum(map(is_periodic, texts)) / len(texts),
                "toy/mean_length": sum(map(len, texts)) / len(texts)}
