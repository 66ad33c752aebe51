"""Music sampler: unconditional or prompted generation -> .mid, piano-roll .png, .wav.

Works with any music tokenizer that offers ``to_score(ids)``, ``prompt_ids(score,
path, prompt_tokens, prompt_bars)`` and ``grammar_errors(ids)`` (the miditok
tokenizers and the JSB grid tokenizer).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from armodal.modalities.base import Sampler
from armodal.modalities.music.midi_io import read_midi
from armodal.modalities.music.render import AUDIO_HINT, piano_roll_png, render_wav, write_midi

if TYPE_CHECKING:  # pragma: no cover
    from armodal.ar_model import ARModel

__all__ = ["MusicSampler"]

log = logging.getLogger(__name__)


class MusicSampler(Sampler):
    """Sample ``num_samples`` pieces and write ``sample_XX.{mid,png,wav}`` into ``out_dir``.

    Overrides (``armodal-generate`` keys): ``temperature``, ``top_k``, ``top_p``,
    ``min_p``, ``max_new_tokens``, ``constrained``, ``seed``, ``prompt`` (a .mid
    path) with ``prompt_tokens`` or ``prompt_bars`` (how much of it to keep).
    """

    def __init__(
        self,
        max_new_tokens: int = 512,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        constrained: bool = True,
        prompt: str | None = None,
        prompt_tokens: int | None = None,
        prompt_bars: float | None = None,
        qpm: float | None = None,
        audio: bool = True,
        batch_size: int = 16,
    ) -> None:
        self.defaults = dict(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            constrained=constrained, prompt=prompt, prompt_tokens=prompt_tokens, prompt_bars=prompt_bars,
            batch_size=batch_size,
        )
        self.qpm, self.audio = qpm, audio

    def _to_score(self, tok, ids: torch.Tensor):
        return tok.to_score(ids, qpm=self.qpm) if self.qpm is not None else tok.to_score(ids)

    def __call__(self, model: "ARModel", num_samples: int, out_dir: str | Path, **overrides: Any) -> dict:
        opts = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        tok = model.tokenizer
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)

        prompt = None
        if opts["prompt"]:
            path = Path(str(opts["prompt"])).expanduser()
            score = read_midi(path)  # BadMidiError (a ValueError) names the file and the reason
            prompt = tok.prompt_ids(score, str(path), opts["prompt_tokens"], opts["prompt_bars"])[None]  # [1, P]
            write_midi(self._to_score(tok, prompt[0]), out_dir / "prompt.mid")
        max_len = model.net.config.max_seq_len
        used = 1 if prompt is None else prompt.shape[1]
        max_new = min(int(opts["max_new_tokens"]), max_len - used)
        if max_new <= 0:
            raise ValueError(f"the prompt ({used} tokens) leaves no room under max_seq_len={max_len}; "
                             "lower prompt_tokens / prompt_bars")

        seqs: list[torch.Tensor] = []
        seed = overrides.get("seed")
        bs = max(1, int(opts["batch_size"]))
        for start in range(0, num_samples, bs):
            n = min(bs, num_samples - start)
            out = model.generate(
                ids=prompt, num_samples=n, max_new_tokens=max_new, constrained=bool(opts["constrained"]),
                temperature=float(opts["temperature"]), top_k=int(opts["top_k"]), top_p=float(opts["top_p"]),
                min_p=float(opts["min_p"]), seed=None if seed is None else int(seed) + start,
            )
            seqs += [out.ids[i, : out.lengths[i]].cpu() for i in range(n)]

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
            title = f"sample {i}: {notes[-1]} notes, {len(ids)} tokens" + (" (prompted)" if prompt is not None else "")
            images.append(str(piano_roll_png(score, out_dir / f"sample_{i:02d}.png", title=title)))
            if self.audio:
                wav = render_wav(mid, out_dir / f"sample_{i:02d}.wav")
                if wav is not None:
                    audio.append(str(wav))
        summary = {
            "num_samples": len(seqs), "midi": midis, "images": images, "audio": audio,
            "grammar_errors": errors, "notes_per_sample": notes,
            "prompt_tokens": 0 if prompt is None else int(prompt.shape[1]),
        }
        if self.audio and not audio and midis:
            summary["audio_note"] = AUDIO_HINT
            print(f"[music] {AUDIO_HINT}")
        return summary
