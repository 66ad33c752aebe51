"""Sample metrics for music: generated pieces against held-out pieces.

All statistics are computed on :class:`symusic.Score` objects, so they apply to
the MIDI tokenizers and to the JSB grid alike:

* ``pitch_class_hist_l1``: L1 distance (0..2) between the pooled pitch-class
  histograms of the samples and of the held-out pieces;
* ``note_density``: note onsets per quarter note;
* ``polyphony``: mean number of sounding notes over the 16th-note steps where
  at least one note sounds;
* ``pitch_range``: highest minus lowest pitch of a piece, in semitones;
* ``grammar_error_rate``: grammar violations per generated token (0 with
  constrained decoding; also measured unconstrained for reference).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from symusic import Score

from armodal.generation import GenerationConfig
from armodal.modalities.base import register_evaluator

__all__ = ["piece_stats", "pitch_class_histogram", "compare_sets", "MusicEvaluator"]

log = logging.getLogger(__name__)


def _notes(score: Score) -> dict[str, np.ndarray]:
    arrs = [t.notes.numpy() for t in score.tracks if not t.is_drum]
    arrs = [a for a in arrs if len(a["time"])]
    if not arrs:
        return {k: np.zeros(0, dtype=np.int64) for k in ("time", "duration", "pitch")}
    return {k: np.concatenate([a[k] for a in arrs]).astype(np.int64) for k in ("time", "duration", "pitch")}


def pitch_class_histogram(score: Score) -> np.ndarray:
    """Counts [12] of pitch classes (each note counted once)."""
    return np.bincount(_notes(score)["pitch"] % 12, minlength=12).astype(np.float64)


def piece_stats(score: Score) -> dict[str, float]:
    """Note density, polyphony and pitch range of one piece (NaN-free; empty pieces give zeros)."""
    n = _notes(score)
    tpq = max(1, score.ticks_per_quarter)
    if n["pitch"].size == 0:
        return {"notes": 0, "note_density": 0.0, "polyphony": 0.0, "pitch_range": 0.0}
    length_q = max(1e-9, (n["time"] + n["duration"]).max() / tpq)
    step = tpq / 4  # 16th notes
    n_steps = int(np.ceil((n["time"] + n["duration"]).max() / step))
    sounding = np.zeros(n_steps + 1, dtype=np.int64)
    a = np.floor(n["time"] / step).astype(int)
    b = np.maximum(a + 1, np.ceil((n["time"] + n["duration"]) / step).astype(int))
    np.add.at(sounding, a, 1)
    np.add.at(sounding, b, -1)
    sounding = np.cumsum(sounding)[:-1]
    active = sounding[sounding > 0]
    return {
        "notes": int(n["pitch"].size),
        "note_density": float(len(np.unique(np.stack([n["time"], n["pitch"]]), axis=1).T) / length_q),
        "polyphony": float(active.mean()) if active.size else 0.0,
        "pitch_range": float(n["pitch"].max() - n["pitch"].min()),
    }


def compare_sets(samples: list[Score], reference: list[Score]) -> dict[str, float]:
    """Pitch-class histogram distance and mean statistics of samples vs reference pieces."""
    def mean_stats(scores):
        stats = [piece_stats(s) for s in scores if s is not None]
        return {k: float(np.mean([s[k] for s in stats])) if stats else 0.0
                for k in ("note_density", "polyphony", "pitch_range", "notes")}

    def pooled(scores):
        h = sum((pitch_class_histogram(s) for s in scores), np.zeros(12))
        return h / max(h.sum(), 1.0)

    s, r = mean_stats(samples), mean_stats(reference)
    out = {"pitch_class_hist_l1": float(np.abs(pooled(samples) - pooled(reference)).sum())}
    for k in ("note_density", "polyphony", "pitch_range", "notes"):
        out[f"sample_{k}"] = s[k]
        out[f"ref_{k}"] = r[k]
    return out


@register_evaluator("music")
class MusicEvaluator:
    """``armodal-eval`` hook: sample ``num_samples`` pieces and compare them with held-out pieces.

    ``split`` names the held-out split (JSB: "valid"/"test"; MIDI folders: "val"/"test").
    ``generation``: the sampling settings; they default to the model distribution
    (temperature 1, no top-k/top-p, seed 0; ``max_new_tokens`` unset fills the context) so
    the statistics describe the model.  ``unconstrained_check`` samples once more with
    ``constrained=False`` to measure how often the model alone breaks the grammar.
    """

    def __init__(self, num_samples: int = 16, split: str | None = None, generation=None,
                 unconstrained_check: bool = True) -> None:
        self.num_samples, self.split = num_samples, split
        self.generation = GenerationConfig.from_dict(generation or {"seed": 0}, source="MusicEvaluator generation")
        self.unconstrained_check = unconstrained_check

    def _reference(self, datamodule) -> tuple[list[Score], str]:
        if hasattr(datamodule, "pieces"):  # JSB grid
            from armodal.modalities.music.grid import grid_to_score

            split = self.split or "valid"
            return [grid_to_score(g) for g in datamodule.pieces(split)], split
        split = self.split or "val"
        return datamodule.scores(split), split

    def _sample(self, model, config: GenerationConfig) -> tuple[list[torch.Tensor], int]:
        out = model.generate(config=config, num_samples=self.num_samples)
        seqs = [out.ids[i, : out.lengths[i]].cpu() for i in range(out.ids.shape[0])]
        return seqs, int(sum(len(s) - 1 for s in seqs))

    def __call__(self, model, datamodule, out_dir: str | Path, num_samples: int | None = None,
                 config: GenerationConfig | None = None, **_: Any) -> dict:
        if num_samples:
            self.num_samples = int(num_samples)
        config = config or self.generation
        tok = model.tokenizer
        datamodule.setup("test")
        reference, split = self._reference(datamodule)
        seqs, n_tok = self._sample(model, config)
        errors = sum(tok.grammar_errors(s) for s in seqs)
        scores = [tok.to_score(s) for s in seqs]
        metrics = {f"music/{k}": v for k, v in compare_sets(scores, reference).items()}
        metrics.update({
            "music/num_samples": len(seqs), "music/reference_split": split, "music/reference_pieces": len(reference),
            "music/grammar_error_rate": errors / max(1, n_tok), "music/sample_tokens": n_tok,
        })
        if self.unconstrained_check:
            useqs, un_tok = self._sample(model, config.replace(constrained=False))
            metrics["music/grammar_error_rate_unconstrained"] = sum(tok.grammar_errors(s) for s in useqs) / max(1, un_tok)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "music_metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
