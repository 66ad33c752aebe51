"""Sampler for the tokens modality: writes the sampled id sequences as JSON and text."""

from __future__ import annotations

import json
from pathlib import Path

from armodal.modalities.base import Sampler, register_sampler

__all__ = ["TokensSampler"]


@register_sampler("tokens")
class TokensSampler(Sampler):
    def __init__(self, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
        self.defaults = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p}

    def __call__(self, model, num_samples: int, out_dir, **overrides) -> dict:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        kw = {**self.defaults, **{k: v for k, v in overrides.items() if k not in ("prompt", "prompt_tokens", "batch_size")}}
        prompt = overrides.get("prompt")
        ids = None
        if prompt is not None:
            import torch

            ids = torch.cat([torch.tensor([model.tokenizer.bos_id]), model.tokenizer.encode([int(x) for x in str(prompt).split(",")])])[None]
        out = model.generate(ids=ids, num_samples=num_samples, **kw)
        tok = model.tokenizer
        samples = [tok.decode(row) for row in out.ids.cpu()]
        (out_dir / "samples.json").write_text(json.dumps(samples))
        (out_dir / "samples.txt").write_text("\n".join(tok.to_text(s) for s in samples) + "\n")
        return {"text": [str(out_dir / "samples.txt")], "files": [str(out_dir / "samples.json")], "num_samples": len(samples),
                "mean_length": sum(map(len, samples)) / max(len(samples), 1)}
