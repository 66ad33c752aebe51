"""Music sampler: unconditional or prompted generation -> .mid, piano-roll .png, .wav.

Works with any music tokenizer that offers ``to_score(ids)``, ``prompt_ids(score,
path, prompt_tokens, prompt_bars)`` and ``grammar_errors(ids)`` (the miditok
tokenizers and the JSB grid tokenizer).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from armodal.generation import GenerationConfig, seeded_generator
from armodal.modalities.base import Sampler, register_sampler
from armodal.modalities.music.grid import grid_to_score
from armodal.modalities.music.midi_io import read_midi
from armodal.modalities.music.render import AUDIO_HINT, piano_roll_png, render_wav, write_midi

if TYPE_CHECKING:  # pragma: no cover
    from armodal.ar_model import ARModel

__all__ = ["MusicSampler"]

log = logging.getLogger(__name__)


@register_sampler("music")
class MusicSampler(Sampler):
    """Sample ``num_samples`` pieces and write ``sample_XX.{mid,png,wav}`` into ``out_dir``.

    Inputs (``armodal-generate`` keys): ``prompt`` (a .mid path) with ``prompt_tokens``
    or ``prompt_bars`` (how much of it to keep), ``batch_size`` (pieces per decode call).
    ``task=harmonize melody=FILE`` (four-voice grid models only) harmonises a soprano line
    (a one-voice ``.mid`` / ``.musicxml`` file, or a music21 corpus chorale's soprano such
    as ``bach/bwv269``): the soprano is forced token by token through the allowed-token
    mask, alto, tenor and bass are decoded (:mod:`armodal.modalities.music.harmonize`);
    ``num_samples`` harmonisations are written, each keeping the melody exactly.
    Every generation setting applies (a continuation with ``strategy=beam`` ...);
    ``max_new_tokens`` unset fills the model's context after the prompt.
    """

    inputs = ("prompt", "prompt_tokens", "prompt_bars", "batch_size", "task", "melody")

    def __init__(self, generation=None, qpm: float | None = None, audio: bool = True, batch_size: int = 16) -> None:
        super().__init__(generation)
        self.qpm, self.audio, self.batch_size = qpm, audio, batch_size

    def _to_score(self, tok, ids: torch.Tensor):
        return tok.to_score(ids, qpm=self.qpm) if self.qpm is not None else tok.to_score(ids)

    def __call__(self, model: "ARModel", num_samples: int, out_dir: str | Path, config: GenerationConfig | None = None,
                 **inputs: Any) -> dict:
        config = self.settings(config, inputs)
        tok = model.tokenizer
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        task = inputs.get("task") or "sample"
        if task not in ("sample", "harmonize"):
            raise ValueError(f"MusicSampler: task={task!r}; the tasks are sample and harmonize")
        if task == "harmonize":
            return self._harmonize(model, num_samples, out_dir, config, inputs)
        if inputs.get("melody"):
            raise ValueError("MusicSampler: melody= is the input of task=harmonize (add task=harmonize)")

        prompt = None
        if inputs.get("prompt"):
            path = Path(str(inputs["prompt"])).expanduser()
            score = read_midi(path)  # BadMidiError (a ValueError) names the file and the reason
            prompt = tok.prompt_ids(score, str(path), inputs.get("prompt_tokens"), inputs.get("prompt_bars"))[None]  # [1, P]
            write_midi(self._to_score(tok, prompt[0]), out_dir / "prompt.mid")
            max_len = model.net.config.max_seq_len
            used, asked = prompt.shape[1], config.max_new_tokens
            room = min(asked or max_len // 2, max_len // 2)  # what a too-long prompt is cut to make room for
            if used > max_len - room:
                keep = max_len - room
                prompt = tok.prompt_ids(score, str(path), keep, inputs.get("prompt_bars"))[None]  # cut at a valid point
                capped = "" if asked is None or asked <= max_len - prompt.shape[1] else \
                    f"; max_new_tokens={asked} is capped to the {max_len - prompt.shape[1]} tokens left"
                warnings.warn(f"{path}: the prompt has {used} tokens, too many for max_seq_len={max_len} with room to "
                              f"continue; it is truncated to its first {prompt.shape[1]} tokens (set prompt_tokens or "
                              f"prompt_bars to choose){capped}", stacklevel=2)
                if capped:
                    config = config.replace(max_new_tokens=max_len - prompt.shape[1])
                write_midi(self._to_score(tok, prompt[0]), out_dir / "prompt.mid")

        seqs: list[torch.Tensor] = []
        generator = seeded_generator(config, model.device)  # one stream over all batches
        bs = max(1, int(inputs.get("batch_size") or self.batch_size))
        for start in range(0, num_samples, bs):
            n = min(bs, num_samples - start)
            out = model.generate(ids=prompt, config=config, num_samples=n, generator=generator)
            seqs += [out.ids[i, : out.lengths[i]].cpu() for i in range(out.ids.shape[0])]

        return self._write(tok, seqs, out_dir, "prompted" if prompt is not None else "",
                           prompt_tokens=0 if prompt is None else int(prompt.shape[1]))

    def _harmonize(self, model: "ARModel", num_samples: int, out_dir: Path, config: GenerationConfig,
                   inputs: dict) -> dict:
        """task=harmonize: ``num_samples`` harmonisations of ``inputs["melody"]``."""
        from armodal.modalities.music.harmonize import harmonize, read_melody

        tok = model.tokenizer
        melody_path = inputs.get("melody")
        if not melody_path:
            raise ValueError("task=harmonize needs melody=FILE (a one-voice .mid or .musicxml file, or a music21 "
                             "corpus chorale name such as bach/bwv269)")
        if not hasattr(tok, "to_chorale"):
            raise ValueError(f"task=harmonize needs a four-voice grid model (experiment=music_chorales or music_jsb); "
                             f"this checkpoint's tokenizer is {type(tok).__name__}")
        unused = sorted(k for k in ("prompt", "prompt_tokens", "prompt_bars") if inputs.get(k) is not None)
        if unused:
            raise ValueError(f"task=harmonize takes melody=, not {unused}")
        melody, known = read_melody(melody_path)
        seqs = harmonize(model, melody, known, config, num_samples, generator=seeded_generator(config, model.device),
                         where=str(melody_path), default_max_new=self.generation.max_new_tokens)
        sop = melody.grid[:, 0]
        kept = [bool(np.array_equal(tok.to_chorale(s).grid[:, 0], sop, equal_nan=True)) for s in seqs]
        melody_score = grid_to_score(melody.grid, qpm=self.qpm or 80)
        write_midi(melody_score, out_dir / "melody.mid")
        summary = self._write(tok, list(seqs), out_dir, "harmonisation")
        summary.update({"task": "harmonize", "melody": str(melody_path), "melody_steps": int(len(sop)),
                        "fermatas_known": known, "soprano_kept": kept})
        return summary

    def _write(self, tok, seqs: list[torch.Tensor], out_dir: Path, label: str, **extra: Any) -> dict:
        """``sample_XX.{mid,png,wav}`` for each id sequence, and the summary."""
        midis, images, audio, errors, notes = [], [], [], [], []
        for i, ids in enumerate(seqs):
            errors.append(int(tok.grammar_errors(ids)))
            try:
                score = self._to_score(tok, ids)
            except Exception as e:  # noqa: BLE001 - an unconstrained sample may not decode
                log.warning("sample %d does not decode to MIDI: %s", i, e)
                continue
            notes.append(int(sum(len(t.notes) for t in score.tracks)))
            mid = write_midi(score, out_dir / f"sample_{i:02d}.mid")
            midis.append(str(mid))
            title = f"sample {i}: {notes[-1]} notes, {len(ids)} tokens" + (f" ({label})" if label else "")
            images.append(str(piano_roll_png(score, out_dir / f"sample_{i:02d}.png", title=title,
                                             marks=_fermata_marks(tok, ids))))
            if self.audio:
                wav = render_wav(mid, out_dir / f"sample_{i:02d}.wav")
                if wav is not None:
                    audio.append(str(wav))
        summary = {
            "num_samples": len(seqs), "midi": midis, "files": midis, "images": images, "audio": audio,
            "grammar_errors": errors, "notes_per_sample": notes, **extra,
        }
        if self.audio and not audio and midis:
            summary["audio_note"] = AUDIO_HINT
            print(f"[music] {AUDIO_HINT}")
        return summary


def _fermata_marks(tok, ids: torch.Tensor) -> list[tuple[float, str]] | None:
    """[(quarter, text)] for each phrase ending of a chorale-grid sample: a fermata sign, "cad." when the
    ending is a V-I / IV-I cadence as the chorale metrics count it; None for a tokenizer without fermatas."""
    if not hasattr(tok, "fermata0"):
        return None
    from armodal.modalities.music.analysis import phrase_endings

    return [(s / 4, "\u25bc cad." if hit else "\u25bc") for s, hit in phrase_endings(tok.decode(ids))]
