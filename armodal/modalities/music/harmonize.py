"""Harmonise a melody: a soprano line in, alto, tenor and bass sampled around it.

:func:`read_melody` reads the soprano (a one-voice MIDI or MusicXML file, or the
soprano of a music21 corpus chorale such as ``bach/bwv269``) into a
:class:`~armodal.modalities.music.chorales.Chorale` whose alto, tenor and bass are
empty.  It refuses, with a message naming the file, a melody with more than one
voice, notes outside the model's pitch range, and rhythms or meters the 16th-note
grid cannot hold.

:func:`forced_steps` turns the melody into what the decoder may write at each
position: the header and every soprano token are forced (a MIDI melody carries no
fermatas, so there the soprano may take the pitch with or without one), alto,
tenor and bass are free.  :func:`harmonize` decodes with that mask ANDed with the
tokenizer's grammar, window by window when the melody is longer than the model's
context (each next window restarts from the last ``context_steps`` steps already
written).  The soprano of every result equals the melody exactly.  With ``rule_penalty`` naming
``cadences`` and the melody's fermatas known, the rule also sees the melody a quarter ahead
(:func:`armodal.modalities.music.cadence.cadence_flags`): the chord before each fermata is asked to be V or IV.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from armodal.modalities.music.chorales import Chorale
from armodal.modalities.music.grid import NUM_VOICES

if TYPE_CHECKING:  # pragma: no cover
    from armodal.ar_model import ARModel

__all__ = ["MelodyError", "read_melody", "melody_from_chorale", "forced_steps", "check_settings", "harmonize"]

MIDI_SUFFIXES = (".mid", ".midi")
SCORE_SUFFIXES = (".xml", ".musicxml", ".mxl")


class MelodyError(ValueError):
    """A melody that cannot be harmonised (the message names the file and the reason)."""


# ----------------------------------------------------------------------------- reading
def melody_from_chorale(ch: Chorale, name: str | None = None) -> Chorale:
    """The soprano of a chorale as a melody (alto, tenor and bass emptied; key from the melody alone)."""
    from armodal.modalities.music.analysis import _pc_weights, key_of

    grid = np.full_like(ch.grid, np.nan)
    grid[:, 0] = ch.grid[:, 0]
    tonic, mode = key_of(_pc_weights(grid).sum(0)) or (ch.tonic, ch.mode)
    return Chorale(name or ch.name, grid, np.asarray(ch.fermata, dtype=bool).copy(), tonic, mode, ch.bar_len,
                   ch.first_pos, ch.split)


def _on_grid(where: str, offset_q: float, length_q: float) -> None:
    if (offset_q * 4) % 1 or (length_q * 4) % 1 or length_q <= 0:
        raise MelodyError(f"{where}: the 16th-note grid cannot hold a note at quarter {offset_q:g} lasting "
                          f"{length_q:g} quarters (triplets and notes shorter than a 16th do not fit)")


def _bar_len(where: str, numerator: int, denominator: int) -> int:
    bar = 16 * numerator / denominator
    if bar % 1 or bar <= 0:
        raise MelodyError(f"{where}: the 16th-note grid cannot hold a {numerator}/{denominator} bar")
    return int(bar)


def _from_notes(where: str, notes: list[tuple[float, float, int]], fermatas: list[bool] | None,
                bar_len: int, first_pos: int) -> Chorale:
    """(onset, length, pitch) in quarters, one voice -> melody Chorale."""
    from armodal.modalities.music.analysis import _pc_weights, key_of

    if not notes:
        raise MelodyError(f"{where}: the melody holds no notes")
    notes = sorted(notes)
    for (a, la, pa), (b, _, pb) in zip(notes, notes[1:]):
        if b < a + la - 1e-9:
            raise MelodyError(f"{where}: more than one voice: the note {pb} at quarter {b:g} starts while {pa} "
                              f"(quarter {a:g}) still sounds; a melody to harmonise is a single line")
    for a, la, _ in notes:
        _on_grid(where, a, la)
    start = notes[0][0]
    n = int(round((notes[-1][0] + notes[-1][1] - start) * 4))
    grid = np.full((n, NUM_VOICES), np.nan)
    fermata = np.zeros(n, dtype=bool)
    for i, (a, la, p) in enumerate(notes):
        s, e = int(round((a - start) * 4)), int(round((a + la - start) * 4))
        grid[s:e, 0] = p
        if fermatas is not None and fermatas[i]:
            fermata[s:e] = True
    tonic, mode = key_of(_pc_weights(grid).sum(0)) or (0, "major")
    pos = (first_pos + int(round(start * 4))) % bar_len
    return Chorale(Path(where).stem, grid, fermata, tonic, mode, bar_len, pos, "melody")


def _read_midi_melody(path: Path) -> tuple[Chorale, bool]:
    from armodal.modalities.music.midi_io import read_midi

    score = read_midi(path)  # BadMidiError names the file and the reason
    tracks = [t for t in score.tracks if not t.is_drum and len(t.notes)]
    if len(tracks) != 1:
        raise MelodyError(f"{path}: {len(tracks)} voices (non-empty tracks: {[t.name for t in tracks]}); a melody "
                          "to harmonise is one voice in one track")
    tpq = score.ticks_per_quarter
    bar_len = 16
    if len(score.time_signatures):
        ts = score.time_signatures[0]
        bar_len = _bar_len(str(path), ts.numerator, ts.denominator)
        if len({(t.numerator, t.denominator) for t in score.time_signatures}) > 1:
            raise MelodyError(f"{path}: the meter changes; the grid holds one meter per piece")
    notes = [(n.time / tpq, n.duration / tpq, int(n.pitch)) for n in tracks[0].notes]
    return _from_notes(str(path), notes, None, bar_len, 0), False


def _read_score_melody(path: Path | str, score) -> tuple[Chorale, bool]:
    from music21 import expressions, meter

    parts = list(score.parts) if hasattr(score, "parts") and len(score.parts) else [score]
    where = str(path)
    if len(parts) != 1:
        raise MelodyError(f"{where}: {len(parts)} parts; a melody to harmonise is one voice (give the soprano "
                          "alone, or a corpus chorale's name to take its soprano)")
    part = parts[0]
    sigs = {ts.ratioString for ts in part.recurse().getElementsByClass(meter.TimeSignature)}
    if len(sigs) > 1:
        raise MelodyError(f"{where}: the meter changes ({sorted(sigs)}); the grid holds one meter per piece")
    bar_len = 16
    if sigs:
        ts = next(iter(part.recurse().getElementsByClass(meter.TimeSignature)))
        bar_len = _bar_len(where, ts.numerator, ts.denominator)
    notes, ferm = [], []
    for el in part.flatten().notes:
        if el.isChord:
            raise MelodyError(f"{where}: more than one voice: a chord at quarter {float(el.offset):g}")
        notes.append((float(el.offset), float(el.quarterLength), int(el.pitch.midi)))
        ferm.append(any(isinstance(e, expressions.Fermata) for e in el.expressions))
    measures = part.getElementsByClass("Measure")
    first_pos = int(round(float(measures[0].paddingLeft) * 4)) % bar_len if len(measures) else 0
    return _from_notes(where, notes, ferm, bar_len, first_pos), True


def read_melody(source: str | Path) -> tuple[Chorale, bool]:
    """A melody file or corpus name -> (melody Chorale, fermatas known).

    ``.mid`` / ``.midi``: one track; ``.xml`` / ``.musicxml`` / ``.mxl``: one part (fermatas kept);
    anything else is looked up in music21's corpus (``bach/bwv269``) and its soprano is taken.
    """
    path = Path(str(source)).expanduser()
    suffix = path.suffix.lower()
    if suffix in MIDI_SUFFIXES:
        return _read_midi_melody(path)
    if suffix in SCORE_SUFFIXES:
        if not path.is_file():
            raise MelodyError(f"{path}: file not found")
        from music21 import converter

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                score = converter.parse(str(path))
        except Exception as e:  # noqa: BLE001 - music21 raises many kinds
            raise MelodyError(f"{path}: not a readable MusicXML file ({type(e).__name__}: {e})") from None
        return _read_score_melody(path, score)
    if path.exists():
        raise MelodyError(f"{path}: unknown melody format {suffix!r}; give a .mid, .musicxml / .mxl, or a music21 "
                          "corpus chorale name such as bach/bwv269")
    from music21 import corpus

    from armodal.modalities.music.chorales import ChoraleSkip, chorale_from_music21

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ch = chorale_from_music21(corpus.parse(str(source)), name=str(source))
    except ChoraleSkip as e:
        raise MelodyError(f"{source}: {e}") from None
    except Exception as e:  # noqa: BLE001 - not in the corpus
        raise MelodyError(f"{source}: neither a melody file nor a music21 corpus chorale "
                          f"({type(e).__name__}: {e})") from None
    return melody_from_chorale(ch, str(source)), True


# ----------------------------------------------------------------------------- forcing
def forced_steps(tok, melody: Chorale, fermatas_known: bool, where: str = "melody") -> tuple[list[int], torch.Tensor]:
    """(header ids to force, soprano choices [T, V] bool) for a melody under ``tok``.

    Refuses soprano notes outside ``[tok.low, tok.high]`` and meters the tokenizer cannot name,
    with :class:`MelodyError` messages naming ``where``.
    """
    from armodal.modalities.music.tokenizer import ChoraleTokenizer

    sop = melody.grid[:, 0]
    notes = sop[~np.isnan(sop)]
    if notes.size and (notes.min() < tok.low or notes.max() > tok.high):
        bad = int(notes.min()) if notes.min() < tok.low else int(notes.max())
        raise MelodyError(f"{where}: note {bad} lies outside the model's range [{tok.low}, {tok.high}] "
                          "(MIDI pitches); transpose the melody into it")
    filled = Chorale(melody.name, np.repeat(np.nan_to_num(sop, nan=np.nan)[:, None], NUM_VOICES, 1), melody.fermata,
                     melody.tonic, melody.mode, melody.bar_len, melody.first_pos)
    chorale_tok = isinstance(tok, ChoraleTokenizer)
    try:
        ids = tok.encode(filled if chorale_tok else filled.grid, bos=True, eos=False)
    except ValueError as e:
        raise MelodyError(f"{where}: {e}") from None
    header = ids[: tok.prefix_len(True)].tolist()
    soprano = ids[tok.prefix_len(True) :: NUM_VOICES]  # [T]
    choice = torch.zeros(len(soprano), tok.vocab_size, dtype=torch.bool)
    choice[torch.arange(len(soprano)), soprano] = True
    if chorale_tok and not fermatas_known:  # the pitch may carry a fermata or not: the model decides
        shift = tok.fermata0 - tok.pitch0
        plain = (soprano >= tok.pitch0) & (soprano < tok.fermata0)
        choice[torch.arange(len(soprano))[plain], soprano[plain] + shift] = True
    return header, choice


def check_settings(config, modality: str = "music", default_max_new: int | None = None) -> None:
    """Raise :class:`~armodal.generation.UnsupportedSetting` for a setting harmonisation cannot honour:
    a strategy other than sample / greedy (the soprano is forced position by position, window by
    window), and ``max_new_tokens`` other than the modality's default (the melody sets the length)."""
    from armodal.generation import UnsupportedSetting

    if config.strategy not in ("sample", "greedy"):
        raise UnsupportedSetting("strategy", config.strategy, modality, "harmonisation forces the soprano token by "
                                 "token and restarts windows on long melodies; it decodes with sample or greedy only")
    if config.max_new_tokens is not None and config.max_new_tokens != default_max_new:
        raise UnsupportedSetting("max_new_tokens", config.max_new_tokens, modality, "in harmonisation the melody sets "
                                 "the length (every soprano step, then EOS)")


@torch.no_grad()
def harmonize(model: "ARModel", melody: Chorale, fermatas_known: bool, config=None, num_samples: int = 1,
              context_steps: int | None = None, generator: torch.Generator | None = None,
              where: str = "melody", default_max_new: int | None = None) -> list[torch.Tensor]:
    """Sample ``num_samples`` harmonisations of ``melody``; returns full id sequences (BOS ... EOS).

    Decoding runs window by window when the melody does not fit the model's context: each
    next window is prompted with the header (no BOS) and the last ``context_steps`` steps
    already written (default: half the context).  ``config`` (a
    :class:`~armodal.generation.GenerationConfig`): strategy sample or greedy, any temperature /
    top-k / top-p ..., ``constrained=false`` keeps only the soprano forcing; ``max_new_tokens`` is
    refused unless it equals ``default_max_new`` (the modality's default, which the melody overrides).
    """
    from armodal.generation import GenerationConfig, generate, seeded_generator

    tok = model.tokenizer
    config = config or GenerationConfig()
    check_settings(config, model.modality, default_max_new)
    model.check(config)
    config = config.replace(max_new_tokens=None)
    if generator is None:  # one stream over every window (each window re-seeded alike would repeat its draws)
        generator = seeded_generator(config, model.device)
    header, choice = forced_steps(tok, melody, fermatas_known, where)
    steps = len(choice)
    max_len = model.net.config.max_seq_len
    per_window = (max_len - len(header) - 1) // NUM_VOICES  # steps one window can hold (+ EOS)
    if per_window < 2:
        raise MelodyError(f"{where}: the model's context ({max_len} tokens) holds no harmonisation window")
    context_steps = min(per_window - 1, context_steps if context_steps is not None else per_window // 2)
    context_steps -= context_steps % 4  # restart on a beat
    base = model.token_rules(config)
    done = torch.full((num_samples, 0, NUM_VOICES), -1, dtype=torch.long)  # [N, steps written, 4]
    start = 0
    while start < steps:
        ctx0 = max(0, start - context_steps) if start else 0
        if start:
            window_melody = melody[ctx0:]
            prompt_head = tok.encode(_header_only(window_melody, tok), bos=False, eos=False)[: tok.prefix_len(False)]
            prompt = torch.cat([prompt_head[None].expand(num_samples, -1), done[:, ctx0:start].reshape(num_samples, -1)], 1)
        else:
            prompt = torch.tensor(header)[None].expand(num_samples, -1)
        n_steps = min(steps - start, per_window - (start - ctx0))
        last = start + n_steps == steps
        plen = prompt.shape[1]
        table = torch.ones(NUM_VOICES * n_steps + 1, tok.vocab_size, dtype=torch.bool)  # rows: positions after the prompt
        table[0 : NUM_VOICES * n_steps : NUM_VOICES] = choice[start : start + n_steps]
        table[-1] = False
        table[-1, tok.eos_id] = True  # the piece ends with the melody (EOS after the last step)

        def allowed(ids: torch.Tensor, _table=table, _plen=plen) -> torch.Tensor:
            row = _table[min(ids.shape[1] - _plen, len(_table) - 1)].to(ids.device)[None].expand(ids.shape[0], -1)
            return row if base.allowed_fn is None else row & base.allowed_fn(ids)

        flagged = base.flagged_fn
        if flagged is not None and fermatas_known and "cadences" in (config.rule_penalty or {}):
            from armodal.modalities.music.cadence import cadence_flags

            def flagged(ids: torch.Tensor, rule: str, _ctx0=ctx0) -> torch.Tensor:  # the melody's fermatas ahead
                if rule == "cadences":
                    return cadence_flags(tok, ids.cpu(), melody=melody, offset=_ctx0).to(ids.device)
                return base.flagged_fn(ids, rule)

        rules = dataclasses.replace(base, allowed_fn=allowed, flagged_fn=flagged)  # the style rules stay
        out = generate(model.net, prompt.to(model.device), config, tokens=rules,
                       max_new_tokens=NUM_VOICES * n_steps + (1 if last else 0), generator=generator)
        new = out.ids[:, plen : plen + NUM_VOICES * n_steps].cpu().reshape(num_samples, n_steps, NUM_VOICES)
        done = torch.cat([done, new], 1)
        start += n_steps
    body = done.reshape(num_samples, -1)
    head = torch.tensor(header)[None].expand(num_samples, -1)
    eos = torch.full((num_samples, 1), tok.eos_id, dtype=torch.long)
    return list(torch.cat([head, body, eos], 1))


def _header_only(ch: Chorale, tok) -> Chorale | np.ndarray:
    """What ``tok.encode`` needs to write the header of a window starting at ``ch``'s first step."""
    from armodal.modalities.music.tokenizer import ChoraleTokenizer

    empty = np.full((0, NUM_VOICES), np.nan)
    if isinstance(tok, ChoraleTokenizer):
        return Chorale(ch.name, empty, np.zeros(0, bool), ch.tonic, ch.mode, ch.bar_len, ch.first_pos)
    return empty
