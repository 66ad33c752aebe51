"""Sampler for the tokens modality: writes the sampled id sequences as JSON and text."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from armodal.modalities.base import Sampler, register_sampler

__all__ = ["TokensSampler"]


@register_sampler("tokens")
class TokensSampler(Sampler):
    """``num_samples`` sequences from BOS, or continuations of ``prompt`` (comma-separated symbols)."""

    inputs = ("prompt",)

    def __call__(self, model, num_samples: int, out_dir, config=None, **inputs) -> dict:
        config = self.settings(config, inputs)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tok = model.tokenizer
        ids = None
        if inputs.get("prompt") is not None:
            try:
                symbols = [int(x) for x in str(inputs["prompt"]).split(",")]
            except ValueError:
                raise ValueError(f"prompt={inputs['prompt']!r}: expected comma-separated integer symbols") from None
            ids = torch.cat([torch.tensor([tok.bos_id]), tok.encode(symbols)])[None]
        out = model.generate(ids=ids, config=config, num_samples=num_samples)
        samples = [tok.decode(row[:n]) for row, n in zip(out.ids.cpu(), out.lengths.tolist())]
        (out_dir / "samples.json").write_text(json.dumps(samples))
        (out_dir / "samples.txt").write_text("\n".join(tok.to_text(s) for s in samples) + "\n")
        return {"text": [str(out_dir / "samples.txt")], "files": [str(out_dir / "samples.json")], "num_samples": len(samples),
                "mean_length": sum(map(len, samples)) / max(len(samples), 1)}
