"""Sample metrics for the tokens modality: sampled sequences against held-out sequences.

* ``tokens/unigram_tv``: total variation distance (0..1) between the symbol frequencies of the
  samples and of the held-out split;
* ``tokens/bigram_seen``: fraction of the samples' bigrams that occur in the training data
  (1.0 for a model that only strings together transitions it has seen);
* ``tokens/distinct_2``: distinct bigrams / all bigrams in the samples (low: repetitive samples);
* ``tokens/eos_rate``: fraction of samples that ended with EOS before the length limit;
* ``tokens/mean_length`` and ``tokens/reference_mean_length``: symbols per sequence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from armodal.generation import GenerationConfig
from armodal.modalities.base import register_evaluator

__all__ = ["TokensEvaluator", "unigram_tv", "bigrams", "sequence_stats"]


def bigrams(seqs: list[list[int]] | list[np.ndarray]) -> list[tuple[int, int]]:
    """All adjacent pairs inside each sequence."""
    return [(int(a), int(b)) for s in seqs for a, b in zip(s[:-1], s[1:])]


def unigram_tv(a: list, b: list, n_symbols: int) -> float:
    """Total variation distance between the symbol histograms of two sets of sequences."""
    ha = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in a] or [np.zeros(0, np.int64)]),
                     minlength=n_symbols).astype(np.float64)
    hb = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in b] or [np.zeros(0, np.int64)]),
                     minlength=n_symbols).astype(np.float64)
    if ha.sum() == 0 or hb.sum() == 0:
        return 1.0
    return float(0.5 * np.abs(ha / ha.sum() - hb / hb.sum()).sum())


def sequence_stats(samples: list[list[int]], reference: list, train: list, n_symbols: int) -> dict[str, float]:
    """The metrics of this module's docstring (without the EOS rate) for decoded samples."""
    seen = set(bigrams(train))
    sb = bigrams(samples)
    return {
        "unigram_tv": unigram_tv(samples, reference, n_symbols),
        "bigram_seen": float(np.mean([p in seen for p in sb])) if sb else 0.0,
        "distinct_2": len(set(sb)) / len(sb) if sb else 0.0,
        "mean_length": float(np.mean([len(s) for s in samples])) if samples else 0.0,
        "reference_mean_length": float(np.mean([len(s) for s in reference])) if reference else 0.0,
    }


@register_evaluator("tokens")
class TokensEvaluator:
    """``armodal-eval`` hook: sample ``num_samples`` sequences from BOS and compare them with the
    held-out ``split`` (and the training bigrams).  ``generation``: the sampling settings (default:
    the model distribution, seed 0; ``max_new_tokens`` unset = one more than the longest reference)."""

    def __init__(self, num_samples: int = 64, split: str = "val", generation=None) -> None:
        self.num_samples, self.split = num_samples, split
        self.generation = GenerationConfig.from_dict(generation or {"seed": 0}, source="TokensEvaluator generation")

    def __call__(self, model: Any, datamodule: Any, out_dir: str | Path, num_samples: int | None = None,
                 config: GenerationConfig | None = None, **_: Any) -> dict:
        n = int(num_samples or self.num_samples)
        config = config or self.generation
        tok = model.tokenizer
        reference, train = datamodule.sequences(self.split), datamodule.sequences("train")
        if config.max_new_tokens is None:
            config = config.replace(max_new_tokens=max(2, max(len(s) for s in reference) + 1))
        out = model.generate(config=config, num_samples=n)
        rows = out.ids.cpu()
        samples = [tok.decode(r) for r in rows]
        stats = sequence_stats(samples, reference, train, tok.n_symbols)
        metrics = {f"tokens/{k}": v for k, v in stats.items()}
        metrics["tokens/eos_rate"] = float(out.finished.float().mean())
        metrics["tokens/num_samples"] = float(len(samples))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tokens_samples.json").write_text(json.dumps(samples))
        return metrics
