"""Sample metrics for music: generated pieces against held-out pieces.

Four-voice grids (JSB, corpus chorales) are measured with the chorale metrics of
:mod:`armodal.modalities.music.analysis` (polyphony, note density, pitch-class
histogram L1, key stability, voice crossings, parallel fifths / octaves, cadences
at fermatas).  MIDI event tokenizers get these note statistics, computed on
:class:`symusic.Score` objects:

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from symusic import Score

from armodal.generation import GenerationConfig, seeded_generator
from armodal.modalities.base import register_evaluator

__all__ = ["piece_stats", "pitch_class_histogram", "compare_sets", "as_chorale", "MusicEvaluator"]

if TYPE_CHECKING:  # pragma: no cover
    from armodal.modalities.music.chorales import Chorale

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


def as_chorale(piece) -> "Chorale":
    """A held-out piece (a :class:`Chorale`, or a JSB grid: 4/4 from step 0, no fermatas, the key
    from music21's profiles) as a :class:`Chorale` for the chorale metrics."""
    from armodal.modalities.music.analysis import _pc_weights, key_of
    from armodal.modalities.music.chorales import Chorale

    if isinstance(piece, Chorale):
        return piece
    grid = np.asarray(piece, dtype=np.float64)
    tonic, mode = key_of(_pc_weights(grid).sum(0)) or (0, "major")
    return Chorale("piece", grid, np.zeros(len(grid), dtype=bool), tonic, mode, 16, 0)


@register_evaluator("music")
class MusicEvaluator:
    """``armodal-eval`` hook: sample ``num_samples`` pieces and compare them with held-out pieces.

    ``split`` names the held-out split (JSB and corpus chorales: "valid"/"test"; MIDI folders:
    "val"/"test").  ``generation``: the sampling settings; they default to the model distribution
    (temperature 1, no top-k/top-p, seed 0; ``max_new_tokens`` unset fills the context) so the
    statistics describe the model; pieces are sampled ``batch_size`` at a time from one seeded
    stream.  ``unconstrained_check`` samples once more with ``constrained=False`` to measure how
    often the model alone breaks the grammar.

    Grid tokenizers (JSB, corpus chorales) get the chorale metrics of
    :mod:`armodal.modalities.music.analysis` (``music/sample_<stat>``, ``music/ref_<stat>`` for the
    held-out pieces, ``music/<rate>_rel_err``); MIDI event tokenizers the note statistics of
    :func:`compare_sets`.  ``ensemble_shifts`` (JSB grid only, e.g. ``[-2, -1, 0, 1, 2]``) adds the
    NLL of the transposition ensemble (:mod:`armodal.modalities.music.jsb_ensemble`) on valid and
    test, beside the single model's.  ``harmonize=true`` (grid tokenizers) harmonises the soprano of
    every piece of ``harmonize_split`` (:mod:`armodal.modalities.music.harmonize`): the chorale
    metrics of one sampled harmonisation per piece against Bach's own (``music/harmonize/*``), the
    share of alto / tenor / bass voice-step tokens equal to Bach's under greedy decoding, and a check
    that every result keeps the soprano exactly.
    """

    def __init__(self, num_samples: int = 16, split: str | None = None, generation=None,
                 unconstrained_check: bool = True, batch_size: int = 32,
                 ensemble_shifts: list[int] | None = None, harmonize: bool = False, harmonize_split: str = "test",
                 harmonize_limit: int | None = None) -> None:
        self.num_samples, self.split = num_samples, split
        self.generation = GenerationConfig.from_dict(generation or {"seed": 0}, source="MusicEvaluator generation")
        self.unconstrained_check, self.batch_size = unconstrained_check, max(1, int(batch_size))
        self.ensemble_shifts = None if ensemble_shifts is None else [int(s) for s in ensemble_shifts]
        self.harmonize, self.harmonize_split, self.harmonize_limit = bool(harmonize), harmonize_split, harmonize_limit

    def _reference(self, datamodule) -> tuple[list, str]:
        if hasattr(datamodule, "pieces"):  # grids: JSB or corpus chorales
            split = self.split or "valid"
            return datamodule.pieces(split), split
        split = self.split or "val"
        return datamodule.scores(split), split

    def _sample(self, model, config: GenerationConfig) -> tuple[list[torch.Tensor], int]:
        seqs: list[torch.Tensor] = []
        generator = seeded_generator(config, model.device)  # one stream over all batches
        for start in range(0, self.num_samples, self.batch_size):
            n = min(self.batch_size, self.num_samples - start)
            out = model.generate(config=config, num_samples=n, generator=generator)
            seqs += [out.ids[i, : out.lengths[i]].cpu() for i in range(out.ids.shape[0])]
        return seqs, int(sum(len(s) - 1 for s in seqs))

    def _ensemble(self, model, datamodule) -> dict:
        from armodal.modalities.music.jsb_ensemble import transposition_ensemble_nll
        from armodal.modalities.music.tokenizer import ChoraleTokenizer, JSBTokenizer

        tok = model.tokenizer
        if not isinstance(tok, JSBTokenizer) or isinstance(tok, ChoraleTokenizer):
            raise ValueError(f"evaluator.ensemble_shifts: the transposition ensemble scores the JSB voice-step "
                             f"grid only; this checkpoint's tokenizer is {type(tok).__name__}")
        out = {}
        for split in ("valid", "test"):
            r = transposition_ensemble_nll(model.net.eval(), tok, datamodule.eval_dataset(split), self.ensemble_shifts)
            out[f"music/ensemble_{split}_nll"] = r["nll"]
            out[f"music/ensemble_{split}_nll_single"] = r["nll_single"]
            out[f"music/ensemble_{split}_tokens"] = r["tokens"]
        out["music/ensemble_shifts"] = self.ensemble_shifts
        return out

    def _harmonize(self, model, datamodule, config: GenerationConfig) -> dict:
        from armodal.modalities.music.analysis import compare_chorales
        from armodal.modalities.music.harmonize import harmonize, melody_from_chorale
        from armodal.modalities.music.tokenizer import ChoraleTokenizer

        tok = model.tokenizer
        if not hasattr(tok, "to_chorale"):
            raise ValueError(f"evaluator.harmonize: harmonisation needs a four-voice grid tokenizer; this checkpoint's "
                             f"tokenizer is {type(tok).__name__}")
        pieces = [as_chorale(p) for p in datamodule.pieces(self.harmonize_split)][: self.harmonize_limit]
        known = isinstance(tok, ChoraleTokenizer)  # JSB grids carry no fermatas (and the JSB tokenizer none)
        sampled, kept, same, total = [], 0, 0, 0
        for i, piece in enumerate(pieces):
            melody = melody_from_chorale(piece)
            seed = None if config.seed is None else config.seed + i
            ids = harmonize(model, melody, known, config.replace(seed=seed), 1, where=piece.name,
                            default_max_new=config.max_new_tokens)[0]  # max_new_tokens: the free samples'
            sampled.append(tok.to_chorale(ids))
            greedy = tok.to_chorale(harmonize(model, melody, known, config.replace(strategy="greedy", seed=None), 1,
                                              where=piece.name, default_max_new=config.max_new_tokens)[0])
            for h in (sampled[-1], greedy):
                kept += int(np.array_equal(h.grid[:, 0], piece.grid[:, 0], equal_nan=True))
            atb_bach, atb = np.nan_to_num(piece.grid[:, 1:], nan=-1), np.nan_to_num(greedy.grid[:, 1:], nan=-1)
            same += int((atb_bach == atb).sum())
            total += atb_bach.size
        out = {f"music/harmonize/{k}": v for k, v in compare_chorales(sampled, pieces).items()}
        out.update({
            "music/harmonize/split": self.harmonize_split, "music/harmonize/pieces": len(pieces),
            "music/harmonize/atb_accuracy_greedy": same / max(total, 1),
            "music/harmonize/soprano_kept": kept / max(2 * len(pieces), 1),
        })
        return out

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
        if hasattr(tok, "to_chorale"):
            from armodal.modalities.music.analysis import compare_chorales

            metrics = {f"music/{k}": v for k, v in compare_chorales(
                [tok.to_chorale(s) for s in seqs], [as_chorale(p) for p in reference]).items()}
        else:
            metrics = {f"music/{k}": v for k, v in compare_sets([tok.to_score(s) for s in seqs], reference).items()}
        metrics.update({
            "music/num_samples": len(seqs), "music/reference_split": split, "music/reference_pieces": len(reference),
            "music/grammar_error_rate": errors / max(1, n_tok), "music/grammar_errors": errors,
            "music/sample_tokens": n_tok,
        })
        if self.unconstrained_check:
            useqs, un_tok = self._sample(model, config.replace(constrained=False))
            metrics["music/grammar_error_rate_unconstrained"] = sum(tok.grammar_errors(s) for s in useqs) / max(1, un_tok)
        if self.ensemble_shifts is not None:
            metrics.update(self._ensemble(model, datamodule))
        if self.harmonize:
            metrics.update(self._harmonize(model, datamodule, config))
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "music_metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
