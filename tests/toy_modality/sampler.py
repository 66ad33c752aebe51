"""Writes the sampled strings to ``samples.txt`` and declares it as a text output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from armodal.modalities.base import Sampler, register_sampler


@register_sampler("toy")
class ToySampler(Sampler):
    def __init__(self, max_new_tokens: int = 20, temperature: float = 1.0) -> None:
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    def __call__(self, model: Any, num_samples: int, out_dir: str | Path, **overrides: Any) -> dict:
        out = model.generate(num_samples=num_samples,
                             max_new_tokens=int(overrides.get("max_new_tokens") or self.max_new_tokens),
                             temperature=float(overrides.get("temperature") or self.temperature),
                             seed=overrides.get("seed"))
        texts = [model.tokenizer.decode(row) for row in out.ids.cpu()]
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "samples.txt"
        path.write_text("\n".join(texts) + "\n")
        return {"text": [str(path)], "num_samples": len(texts)}
