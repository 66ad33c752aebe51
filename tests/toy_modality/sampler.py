"""Writes the sampled strings to ``samples.txt`` and declares it as a text output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from armodal.modalities.base import Sampler, register_sampler


@register_sampler("toy")
class ToySampler(Sampler):
    """Takes the generation settings as ``config`` (defaults: ``generation`` in the modality config)."""

    def __call__(self, model: Any, num_samples: int, out_dir: str | Path, config=None, **inputs: Any) -> dict:
        out = model.generate(config=self.settings(config, inputs), num_samples=num_samples)
        texts = [model.tokenizer.decode(row) for row in out.ids.cpu()]
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "samples.txt"
        path.write_text("\n".join(texts) + "\n")
        return {"text": [str(path)], "num_samples": len(texts)}
