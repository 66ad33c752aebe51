"""MIDI event tokenizers: armodal wrappers around miditok's MIDI-Like and REMI.

One token stream per piece: all pitched tracks are merged into one piano track
(``merge_tracks=True``), then miditok turns it into events (MIDI-Like:
``NoteOn / Velocity / NoteOff / TimeShift`` as in Music Transformer; REMI:
``Bar / Position / Pitch / Velocity / Duration``).  The time resolution
(``beat_res``: positions per beat for each range of beats) and the number of
velocity bins come from config.  The miditok parameters are embedded in
``state()`` and written next to the checkpoint as ``miditok.json``.

The grammar (:meth:`MidiTokenizer.allowed_next`) is miditok's token-type graph
(``tokens_types_graph``) plus the value rules miditok's ``tokens_errors`` checks:
MIDI-Like ``NoteOff`` only for a sounding pitch and EOS only once every note is
closed; REMI ``Position`` strictly increasing inside a bar.  Constrained samples
therefore have zero grammar errors and decode to valid MIDI.

:class:`JSBTokenizer` is the JSB chorales grid tokenizer: one token per voice and
16th-note step (see :mod:`armodal.modalities.music.grid`).  :class:`ChoraleTokenizer` extends it
with a key / meter / pickup header and soprano fermatas for music21's corpus chorales
(:mod:`armodal.modalities.music.chorales`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from symusic import Score, Track

from armodal.modalities.base import Tokenizer, register_tokenizer
from armodal.modalities.music.avoid import AVOID_RULES, next_flags
from armodal.modalities.music.cadence import cadence_flags
from armodal.modalities.music.chorales import Chorale
from armodal.modalities.music.grid import JSB_HIGH, JSB_LOW, NUM_VOICES, grid_to_score, score_to_grid
from armodal.modalities.music.midi_io import read_midi

__all__ = ["MidiTokenizer", "JSBTokenizer", "ChoraleTokenizer", "merge_tracks", "TOKENIZER_KINDS", "METERS"]

TOKENIZER_KINDS = ("midilike", "remi")
SPECIALS = ["PAD", "BOS", "EOS"]
MIDITOK_FILE = "miditok.json"


def _parse_beat_res(beat_res: dict | None) -> dict[tuple[int, int], int]:
    """{"0_4": 8, "4_12": 4} (config-friendly keys) -> {(0, 4): 8, (4, 12): 4}."""
    if not beat_res:
        return {(0, 4): 8, (4, 12): 4}
    out = {}
    for k, v in dict(beat_res).items():
        if isinstance(k, str):
            a, _, b = k.partition("_")
            k = (int(a), int(b))
        out[tuple(int(x) for x in k)] = int(v)
    return out


def merge_tracks(score: Score) -> Score:
    """All pitched (non-drum) notes of ``score`` in one piano track; tempos and time signatures kept."""
    out = Score(score.ticks_per_quarter)
    out.tempos.extend(list(score.tempos))
    out.time_signatures.extend(list(score.time_signatures))
    track = Track("piano", 0, False)
    for t in score.tracks:
        if not t.is_drum:
            track.notes.extend(list(t.notes))
    track.notes.sort(key=lambda n: (n.time, n.pitch))
    out.tracks.append(track)
    return out


@register_tokenizer("music.midilike", "music.remi")
class MidiTokenizer(Tokenizer):
    """miditok MIDI-Like or REMI behind armodal's :class:`Tokenizer` interface.

    ``encode(score | path)`` -> ids ``[BOS, events..., EOS]``; ``decode(ids)`` -> a
    :class:`symusic.Score` (one piano track).
    """

    modality = "music"

    def __init__(
        self,
        kind: str = "midilike",
        beat_res: dict | None = None,
        num_velocities: int = 8,
        pitch_range: tuple[int, int] | list[int] = (21, 109),
        use_time_signatures: bool = False,
        params: dict | None = None,
    ) -> None:
        from miditok import REMI, MIDILike, TokenizerConfig

        kind = kind.lower().replace("-", "").replace("_", "")
        if kind not in TOKENIZER_KINDS:
            raise ValueError(f"unknown MIDI tokenizer kind {kind!r}; choose one of {TOKENIZER_KINDS}")
        self.kind = kind
        cls = MIDILike if kind == "midilike" else REMI
        if params is not None:  # rebuilt from a saved state: the exact miditok parameters
            self.tok = cls(params=params)
        else:
            cfg = TokenizerConfig(
                pitch_range=tuple(pitch_range), beat_res=_parse_beat_res(beat_res),
                num_velocities=max(1, int(num_velocities)), use_velocities=num_velocities > 0,
                special_tokens=list(SPECIALS), use_programs=False, remove_duplicated_notes=True, use_time_signatures=use_time_signatures,
                use_tempos=False, use_chords=False, use_rests=False,
            )
            self.tok = cls(cfg)
        self.pad_id = int(self.tok["PAD_None"])
        self.bos_id = int(self.tok["BOS_None"])
        self.eos_id = int(self.tok["EOS_None"])
        self._build_tables()
        self._cache: tuple[torch.Tensor, list] | None = None

    # -- vocabulary tables ---------------------------------------------------------------
    def _build_tables(self) -> None:
        vocab = self.tok.vocab  # token string -> id
        v = len(vocab)
        self.id_to_token = [""] * v
        for s, i in vocab.items():
            self.id_to_token[i] = s
        self.id_type = [s.split("_")[0] for s in self.id_to_token]
        self.id_value = [s.split("_", 1)[1] if "_" in s else "" for s in self.id_to_token]
        present = set(self.id_type)
        graph = {k: {t.split("_")[0] for t in vals} & present for k, vals in self.tok.tokens_types_graph.items()}
        unusable = {"PAD", "BOS", "DrumOn", "DrumOff", "PitchDrum"}  # never generated
        allowed = torch.zeros(v, v, dtype=torch.bool)  # [last id, next id]
        type_ids: dict[str, list[int]] = {}
        for i, t in enumerate(self.id_type):
            type_ids.setdefault(t, []).append(i)
        for i, t in enumerate(self.id_type):
            for nt in graph.get(t, set()) - unusable:
                allowed[i, type_ids[nt]] = True
        start_types = {"NoteOn", "TimeShift", "TimeSig"} if self.kind == "midilike" else {"Bar"}
        for nt in start_types & present:
            allowed[self.bos_id, type_ids[nt]] = True
        allowed[:, self.pad_id] = False
        allowed[:, self.bos_id] = False
        self._allowed = allowed
        self._type_ids = {k: torch.tensor(v_) for k, v_ in type_ids.items()}
        # pitch of NoteOn / NoteOff / Pitch ids, REMI position values
        self._pitch_of = {i: int(self.id_value[i]) for i, t in enumerate(self.id_type) if t in ("NoteOn", "NoteOff", "Pitch")}
        self._noteoff_ids = {int(self.id_value[i]): i for i, t in enumerate(self.id_type) if t == "NoteOff"}
        self._position_ids = torch.tensor([i for i, t in enumerate(self.id_type) if t == "Position"], dtype=torch.long)
        self._position_val = torch.tensor([int(self.id_value[i]) for i in self._position_ids.tolist()], dtype=torch.long)
        self._transpose_cache: dict[int, np.ndarray] = {}

    # -- sizes -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    @property
    def pitch_range(self) -> tuple[int, int]:
        lo, hi = self.tok.config.pitch_range
        return int(lo), int(hi)

    # -- encode / decode ------------------------------------------------------------------
    def representable(self, score: Score) -> Score:
        """What the tokenizer can represent of ``score``: merged, resampled and quantised by miditok."""
        return self.tok.preprocess_score(merge_tracks(score))

    def encode(self, item: Any, bos: bool = True, eos: bool = True) -> torch.Tensor:
        """A :class:`symusic.Score` or a MIDI path -> LongTensor [T] (BOS, events, EOS)."""
        score = item if isinstance(item, Score) else read_midi(item)
        seq = self.tok.encode(merge_tracks(score))
        if isinstance(seq, list):
            seq = seq[0]
        ids = ([self.bos_id] if bos else []) + list(seq.ids) + ([self.eos_id] if eos else [])
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> Score:
        """ids [T] -> :class:`symusic.Score` (BOS/PAD dropped, stops at the first EOS)."""
        ids = [int(i) for i in torch.as_tensor(ids).reshape(-1).tolist()]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        ids = [i for i in ids if i not in (self.pad_id, self.bos_id)]
        if not ids:
            return Score(self.tok.time_division)
        return self.tok.decode([ids])

    def to_score(self, ids: torch.Tensor, qpm: float | None = None) -> Score:
        """ids [T] -> a playable Score (one piano track); ``qpm`` sets the tempo when given."""
        from symusic import Tempo

        score = self.decode(ids)
        if qpm is not None:
            score.tempos.clear()
            score.tempos.append(Tempo(0, float(qpm)))
        return score

    def prompt_ids(self, score: Score, path: str, prompt_tokens: int | None = None,
                   prompt_bars: float | None = None) -> torch.Tensor:
        """A MIDI prompt -> ids (BOS, events) cut to ``prompt_bars`` bars or ``prompt_tokens`` tokens."""
        if prompt_bars is not None:
            tpq = score.ticks_per_quarter
            score = score.clip(0, int(prompt_bars * 4 * tpq), clip_end=True)
        ids = self.encode(score, bos=True, eos=False)
        if prompt_tokens is not None:
            ids = ids[: max(2, int(prompt_tokens))]
            ids = self._close_prompt(ids)
        if len(ids) <= 1:
            raise ValueError(f"{path}: the prompt holds no events after cutting it")
        return ids

    def _close_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        """Cut a prompt back to the last position where the grammar allows a note to start."""
        while len(ids) > 1 and not self.allowed_next(ids[None])[0, self._type_ids.get("NoteOn", self._type_ids.get("Pitch"))].any():
            ids = ids[:-1]
        self._cache = None
        return ids

    # -- augmentation ---------------------------------------------------------------------
    def transpose_ids(self, ids: np.ndarray, shift: int) -> np.ndarray | None:
        """Shift every pitch token by ``shift`` semitones; None when a pitch would leave the range."""
        if shift == 0:
            return ids
        table = self._transpose_cache.get(shift)
        if table is None:
            table = np.arange(self.vocab_size)
            vocab = self.tok.vocab
            for i, t in enumerate(self.id_type):
                if t in ("NoteOn", "NoteOff", "Pitch"):
                    table[i] = vocab.get(f"{t}_{int(self.id_value[i]) + shift}", -1)
            self._transpose_cache[shift] = table
        out = table[ids]
        return None if (out < 0).any() else out

    # -- grammar ----------------------------------------------------------------------------
    def _new_state(self) -> dict:
        return {"last": None, "active": Counter(), "pos": -1, "errors": 0}

    def _step(self, st: dict, i: int, count: bool = False) -> None:
        """Advance a row's grammar state by token ``i`` (counting violations when ``count``)."""
        if count and st["last"] is not None and not self._allowed[st["last"], i]:
            st["errors"] += 1
        t = self.id_type[i]
        if t == "NoteOn":
            st["active"][self._pitch_of[i]] += 1
        elif t == "NoteOff":
            p = self._pitch_of[i]
            if st["active"][p] > 0:
                st["active"][p] -= 1
            elif count:
                st["errors"] += 1
        elif t == "Bar":
            st["pos"] = -1
        elif t == "Position":
            v = int(self.id_value[i])
            if count and v <= st["pos"]:
                st["errors"] += 1
            st["pos"] = v
        st["last"] = i

    def _row_mask(self, st: dict) -> torch.Tensor:
        if st["last"] is None:  # nothing yet: the row must start with BOS
            m = torch.zeros(self.vocab_size, dtype=torch.bool)
            m[self.bos_id] = True
            return m
        m = self._allowed[st["last"]].clone()
        if self.kind == "midilike" and "NoteOff" in self._type_ids:
            m[self._type_ids["NoteOff"]] = False
            for p, c in st["active"].items():
                if c > 0 and p in self._noteoff_ids and self._allowed[st["last"], self._noteoff_ids[p]]:
                    m[self._noteoff_ids[p]] = True
            if any(c > 0 for c in st["active"].values()):
                m[self.eos_id] = False  # close every note before the end
        if self.kind == "remi" and len(self._position_ids):
            m[self._position_ids[self._position_val <= st["pos"]]] = False
        if st["last"] == self.bos_id:
            m[self.eos_id] = False
        if not m.any():  # cannot happen with miditok's graphs; keep decoding alive regardless
            m[self.eos_id] = True
        return m

    def allowed_next(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, t] -> bool [B, V] allowed next tokens (type graph + value rules); incremental per call."""
        b, t = ids.shape
        cpu = ids.detach().cpu()
        cached = self._cache
        if cached is not None and cached[0].shape == (b, t - 1) and torch.equal(cached[0], cpu[:, :-1]):
            states = cached[1]
            for r in range(b):
                self._step(states[r], int(cpu[r, -1]))
        else:
            states = [self._new_state() for _ in range(b)]
            for r in range(b):
                for i in cpu[r].tolist():
                    if i == self.pad_id:
                        continue
                    self._step(states[r], i)
        self._cache = (cpu.clone(), states)
        return torch.stack([self._row_mask(s) for s in states]).to(ids.device)

    def grammar_errors(self, ids: torch.Tensor) -> int:
        """Violations of the grammar in one sequence (types, NoteOff without NoteOn, positions going
        back, notes left open at EOS); 0 for every constrained sample."""
        ids = [int(i) for i in torch.as_tensor(ids).reshape(-1).tolist()]
        st = self._new_state()
        for k, i in enumerate(ids):
            if i == self.pad_id:
                continue
            if i == self.bos_id:
                st["errors"] += int(k != 0)
                st["last"] = i
                continue
            if i == self.eos_id:
                if self.kind == "midilike":
                    st["errors"] += sum(st["active"].values())
                break
            self._step(st, i, count=True)
        return int(st["errors"])

    # -- persistence -------------------------------------------------------------------------
    def state(self) -> dict:
        return {"kind": self.kind, "params": json.loads(json.dumps(self.tok.to_dict(), default=str))}

    def save_extra(self, directory: Path) -> None:
        self.tok.save(Path(directory) / MIDITOK_FILE)

    @property
    def registry_name(self) -> str:
        return f"music.{self.kind}"  # music.midilike | music.remi

    @classmethod
    def from_state(cls, state: dict, directory: Path) -> "MidiTokenizer":
        path = Path(directory) / MIDITOK_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the miditok parameters saved with this tokenizer are missing")
        return cls(kind=state["kind"], params=path)


# ----------------------------------------------------------------------------- JSB grid tokenizer
@register_tokenizer("music.jsb")
class JSBTokenizer(Tokenizer):
    """Grid ``[T, 4]`` (MIDI pitch or NaN) <-> ids ``BOS s a t b s a t b ... EOS``.

    Ids: 0 PAD, 1 BOS, 2 EOS, 3 REST, then one id per pitch in ``[low, high]``.
    ``types`` gives each token its voice (0..3); BOS counts as the bass of step -1,
    so the type of position ``i`` is ``(i + 3) % 4`` for sequences that start
    with BOS.  With ``beat_types=True`` the type also carries the 16th-note position
    inside the beat (``voice + 4 * (step % 4)``, 16 types).  With ``hold_types=K > 0``
    it also carries how many steps this voice has already held its current token
    (``0`` = it changed at this step, capped at ``K - 1``); that is a function of the
    tokens up to and including this one, so the model stays a proper autoregressive
    model, and it is the repetition feature of TonicNet (Peracha 2019): it tells the
    model where the sounding note began without a multi-hop attention search.
    """

    modality = "music"
    pad_id, bos_id, eos_id, rest_id = 0, 1, 2, 3
    num_specials = 4

    def __init__(self, low: int = JSB_LOW, high: int = JSB_HIGH, beat_types: bool = False,
                 hold_types: int = 0) -> None:
        if not 0 <= low <= high <= 127:
            raise ValueError(f"pitch range must satisfy 0 <= low <= high <= 127, got [{low}, {high}]")
        if int(hold_types) < 0 or int(hold_types) == 1:
            raise ValueError(f"hold_types must be 0 (off) or >= 2 buckets, got {hold_types}")
        self.low, self.high, self.beat_types = int(low), int(high), bool(beat_types)
        self.hold_types = int(hold_types)

    # -- sizes -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.num_specials + self.high - self.low + 1

    @property
    def num_types(self) -> int:
        return NUM_VOICES * (4 if self.beat_types else 1) * max(1, self.hold_types)

    # -- encode / decode ---------------------------------------------------------------
    def pitch_to_id(self, grid: np.ndarray) -> np.ndarray:
        """Float grid [T, 4] -> int ids [T, 4] (NaN -> REST)."""
        grid = np.asarray(grid, dtype=np.float64)
        rest = np.isnan(grid)
        pitches = np.where(rest, self.low, grid)
        if (pitches != np.round(pitches)).any():
            raise ValueError("JSB grid holds non-integer pitches")
        bad = (~rest) & ((pitches < self.low) | (pitches > self.high))
        if bad.any():
            raise ValueError(
                f"pitch {int(grid[bad][0])} outside the tokenizer range [{self.low}, {self.high}]"
            )
        return np.where(rest, self.rest_id, pitches.astype(np.int64) - self.low + self.num_specials)

    def encode(self, item: Any, bos: bool = True, eos: bool = True) -> torch.Tensor:
        """Grid [T, 4] -> LongTensor [1 + 4T + 1] (``BOS``, voice-steps row by row, ``EOS``)."""
        grid = np.asarray(item)
        if grid.ndim != 2 or grid.shape[1] != NUM_VOICES:
            raise ValueError(f"a JSB piece is a [T, {NUM_VOICES}] grid, got shape {grid.shape}")
        body = self.pitch_to_id(grid).reshape(-1)
        parts = ([self.bos_id] if bos else []) + body.tolist() + ([self.eos_id] if eos else [])
        return torch.tensor(parts, dtype=torch.long)

    def body_start(self, ids: torch.Tensor) -> torch.Tensor:
        """[B] index of the first voice-step token of each row (after BOS, when there is one)."""
        return (ids[:, 0] == self.bos_id).long() if ids.shape[1] else torch.zeros(
            ids.shape[0], dtype=torch.long, device=ids.device)

    def id_pitch(self, ids: torch.Tensor) -> torch.Tensor:
        """ids -> float MIDI pitch of each pitch id, NaN for every other id (rests, specials)."""
        rel = ids - self.num_specials
        ok = (rel >= 0) & (rel <= self.high - self.low)
        return torch.where(ok, (rel + self.low).double(), torch.full(ids.shape, float("nan"), dtype=torch.float64, device=ids.device))

    def _piece_ids(self, ids: torch.Tensor) -> list[int]:
        """ids -> list without the leading BOS, without PAD, up to the first EOS."""
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return [i for i in ids if i != self.pad_id]

    def decode(self, ids: torch.Tensor) -> np.ndarray:
        """ids [T] -> grid [steps, 4] (float, NaN = rest).

        Specials are dropped, decoding stops at the first EOS and an incomplete last
        step is dropped (it cannot come out of constrained decoding).
        """
        ids = self._piece_ids(ids)
        if any(i < self.num_specials and i != self.rest_id for i in ids):
            raise ValueError("JSB ids hold a BOS/PAD inside the piece: not a valid sequence")
        steps = len(ids) // NUM_VOICES
        arr = np.array(ids[: steps * NUM_VOICES], dtype=np.int64).reshape(steps, NUM_VOICES)
        grid = (arr - self.num_specials + self.low).astype(np.float64)
        grid[arr == self.rest_id] = np.nan
        return grid

    # -- type stream and grammar --------------------------------------------------------
    def types(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T] voice of each position.

        A row starting with BOS has BOS at voice 3 (the bass of step -1) and S1 at
        position 1; a row without BOS (a window inside a piece) starts on a soprano
        token.  Windows always start on a beat, so the beat phase is known too.
        """
        pos = torch.arange(ids.shape[-1], device=ids.device)[None, :]  # [1, T]
        rel = pos - JSBTokenizer.body_start(self, ids)[:, None]  # index of the token inside the body; -1 for BOS
        voice = rel % NUM_VOICES
        if self.beat_types:
            step = torch.div(rel, NUM_VOICES, rounding_mode="floor").clamp_min(0)
            voice = voice + NUM_VOICES * (step % 4)
        voice = voice.expand(ids.shape[0], -1)
        if self.hold_types:
            voice = voice + (self.num_types // self.hold_types) * self._hold_run(ids, rel)
        return voice.contiguous()

    def _hold_run(self, ids: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        """[B, T] steps for which each voice-step token repeats its voice's token (cap ``hold_types - 1``)."""
        lag = NUM_VOICES
        prev = torch.full_like(ids, -1)
        prev[:, lag:] = ids[:, :-lag]
        same = (ids == prev) & (rel >= lag) & (ids >= self.rest_id)  # [B, T] held from the step before
        run, acc = same.long(), same
        for k in range(1, min(self.hold_types - 1, (ids.shape[1] - 1) // lag + 1)):
            shifted = torch.zeros_like(same)  # run >= k + 1 when the k steps before were held too
            shifted[:, lag * k :] = same[:, : -lag * k]
            acc = acc & shifted
            run = run + acc.long()
        return run

    def allowed_next(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, t] -> bool [B, V]: a rest or an in-range pitch for the next voice; EOS only
        after a complete step (and at least one step); never PAD or BOS."""
        b, t = ids.shape
        mask = torch.zeros(b, self.vocab_size, dtype=torch.bool, device=ids.device)
        mask[:, self.rest_id] = True
        mask[:, self.num_specials :] = True
        n_body = t - JSBTokenizer.body_start(self, ids)  # [B] voice-step tokens so far
        mask[:, self.eos_id] = (n_body > 0) & (n_body % NUM_VOICES == 0)
        return mask

    style_rules = AVOID_RULES  # parallel fifths / octaves with a voice above; crossing the voice just above

    def flagged_next(self, ids: torch.Tensor, rule: str) -> torch.Tensor:
        """[B, t] -> bool [B, V]: the pitches the next voice would write in breach of ``rule``
        (:func:`armodal.modalities.music.avoid.next_flags`; ``rule_penalty`` lowers their logits)."""
        return next_flags(self, ids.cpu(), rule).to(ids.device)

    def grammar_errors(self, ids: torch.Tensor) -> int:
        """Grammar violations in one sequence: no BOS first, BOS/PAD inside the piece, tokens
        after EOS, an EOS that ends an incomplete step.  A sequence cut by the length limit
        (no EOS) is not an error: its incomplete last step is dropped when decoding."""
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        errors = 0
        if not ids or ids[0] != self.bos_id:
            errors += 1
        body = ids[1:] if ids and ids[0] == self.bos_id else ids
        if self.eos_id in body:
            end = body.index(self.eos_id)
            errors += sum(1 for i in body[end + 1 :] if i != self.pad_id)  # tokens after EOS
            body = body[:end]
            errors += int(len(body) % NUM_VOICES != 0)  # EOS inside a step
        else:
            body = [i for i in body if i != self.pad_id]
        errors += sum(1 for i in body if i < self.num_specials and i != self.rest_id)
        return errors

    def prefix_len(self, bos: bool) -> int:
        """Tokens in front of the first voice-step token: BOS or nothing."""
        return int(bos)

    def to_chorale(self, ids: torch.Tensor) -> Chorale:
        """ids -> :class:`Chorale` for the chorale metrics: 4/4 from step 0, no fermatas, the key from
        music21's key profiles (the JSB grid stores none of the three)."""
        from armodal.modalities.music.analysis import _pc_weights, key_of

        grid = self.decode(ids)
        tonic, mode = key_of(_pc_weights(grid).sum(0)) or (0, "major")
        return Chorale("sample", grid, np.zeros(len(grid), dtype=bool), tonic, mode, 16, 0)

    # -- MIDI views (used by the sampler and the evaluator) ------------------------------
    def to_score(self, ids: torch.Tensor, qpm: float = 80.0) -> "Score":
        """ids [T] -> 4-track :class:`symusic.Score`."""
        return grid_to_score(self.decode(ids), qpm=qpm)

    def prompt_ids(self, score: "Score", path: str, prompt_tokens: int | None = None,
                   prompt_bars: float | None = None) -> torch.Tensor:
        """A 4-voice MIDI prompt -> ids [1 + 4 * steps] (BOS first), cut to whole steps."""
        grid = score_to_grid(score, path)
        if prompt_bars is not None:
            grid = grid[: int(round(prompt_bars * 16))]
        ids = self.encode(grid, bos=True, eos=False)
        if prompt_tokens is not None:
            keep = 1 + NUM_VOICES * max(1, (int(prompt_tokens) - 1) // NUM_VOICES)
            ids = ids[:keep]
        if len(ids) <= 1:
            raise ValueError(f"{path}: the prompt holds no notes after cutting it to {prompt_tokens or prompt_bars}")
        return ids

    def max_new_for(self, steps: int) -> int:
        """Tokens needed for ``steps`` more grid steps (plus EOS)."""
        return NUM_VOICES * steps + 1

    # -- persistence ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"low": self.low, "high": self.high, "beat_types": self.beat_types, "hold_types": self.hold_types}

    @classmethod
    def from_state(cls, state: dict, directory: Path) -> "JSBTokenizer":
        return cls(**state)


HEADER_LEN = 3  # KEY METER POS after BOS
METERS = (12, 16, 24)  # bar lengths in 16ths the corpus holds: 3/4, 4/4, 3/2


@register_tokenizer("music.chorales")
class ChoraleTokenizer(JSBTokenizer):
    """A :class:`Chorale` <-> ids ``BOS KEY METER POS s a t b s a t b ... EOS``.

    Ids: 0 PAD, 1 BOS, 2 EOS, 3 REST; one id per pitch in ``[low, high]``; the same
    pitches again for a soprano note under a fermata; 24 keys (tonic pitch class x
    major/minor); one id per meter (bar length in 16ths, :data:`METERS`); one id per
    bar position of the first step (the pickup).  A window cut from inside a piece
    starts with the header but no BOS: ``KEY METER POS`` give the key, the meter and
    the bar position of the window's first step.

    Types: ``voice + 4 * (16th position inside the bar)``, times the hold length
    (``hold_types``) as in :class:`JSBTokenizer`.  The bar position follows from the
    header, so the type stream stays a function of the tokens so far.  Header tokens
    (BOS KEY METER POS) take the types of the four voices at bar position 0, whatever
    the header says: a token's type never changes when later tokens arrive.
    """

    def __init__(self, low: int = 36, high: int = 81, hold_types: int = 0, meters: tuple[int, ...] = METERS) -> None:
        super().__init__(low=low, high=high, beat_types=False, hold_types=hold_types)
        self.meters = tuple(int(m) for m in meters)
        if not self.meters or min(self.meters) < 1:
            raise ValueError(f"meters must be bar lengths in 16ths (>= 1), got {meters}")
        self.max_bar = max(self.meters)
        p = high - low + 1
        self.pitch0, self.fermata0 = self.num_specials, self.num_specials + p
        self.key0 = self.fermata0 + p
        self.meter0 = self.key0 + 24
        self.pos0 = self.meter0 + len(self.meters)

    # -- sizes -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.pos0 + self.max_bar

    @property
    def num_types(self) -> int:
        return NUM_VOICES * self.max_bar * max(1, self.hold_types)

    # -- ids of header values -------------------------------------------------------------
    def key_id(self, tonic: int, mode: str) -> int:
        return self.key0 + 2 * (int(tonic) % 12) + (mode == "minor")

    def meter_id(self, bar_len: int) -> int:
        if int(bar_len) not in self.meters:
            raise ValueError(f"a bar of {bar_len} 16ths ({_meter_name(bar_len)}) is not a meter this tokenizer "
                             f"holds ({', '.join(_meter_name(m) for m in self.meters)})")
        return self.meter0 + self.meters.index(int(bar_len))

    def id_pitch(self, ids: torch.Tensor) -> torch.Tensor:
        """ids -> float MIDI pitch of each pitch id (a fermata pitch too), NaN for every other id."""
        plain = super().id_pitch(ids)
        rel = ids - self.fermata0
        ferm = (rel >= 0) & (rel <= self.high - self.low)
        return torch.where(ferm, (rel + self.low).double(), plain)

    # the grid's voice-leading rules, and phrase endings on a cadence (armodal.modalities.music.cadence)
    style_rules = AVOID_RULES + ("cadences",)

    def flagged_next(self, ids: torch.Tensor, rule: str) -> torch.Tensor:
        if rule == "cadences":
            return cadence_flags(self, ids.cpu()).to(ids.device)
        return super().flagged_next(ids, rule)

    def body_start(self, ids: torch.Tensor) -> torch.Tensor:
        """[B] index of the first voice-step token (after ``[BOS] KEY METER POS``)."""
        return (ids[:, 0] == self.bos_id).long() + HEADER_LEN if ids.shape[1] else torch.zeros(
            ids.shape[0], dtype=torch.long, device=ids.device)

    def _header_values(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] bar length and [B] bar position of the first step, read from the header (defaults
        16 / 0 while the header is still being written)."""
        b, t = ids.shape
        start = self.body_start(ids) - HEADER_LEN  # index of KEY
        meters = torch.tensor(self.meters, device=ids.device)
        bar = torch.full((b,), 16 if 16 in self.meters else self.meters[0], dtype=torch.long, device=ids.device)
        pos = torch.zeros(b, dtype=torch.long, device=ids.device)
        rows = torch.arange(b, device=ids.device)
        has_meter = start + 1 < t
        if has_meter.any():
            m = ids[rows, (start + 1).clamp(max=t - 1)] - self.meter0
            ok = has_meter & (m >= 0) & (m < len(self.meters))
            bar = torch.where(ok, meters[m.clamp(0, len(self.meters) - 1)], bar)
        has_pos = start + 2 < t
        if has_pos.any():
            q = ids[rows, (start + 2).clamp(max=t - 1)] - self.pos0
            ok = has_pos & (q >= 0) & (q < self.max_bar)
            pos = torch.where(ok, q, pos)
        return bar, pos

    # -- encode / decode ---------------------------------------------------------------
    def encode(self, item: Any, bos: bool = True, eos: bool = True) -> torch.Tensor:
        """Chorale -> LongTensor ``[BOS] KEY METER POS`` + 4 ids per step + ``[EOS]``."""
        if not isinstance(item, Chorale):
            raise TypeError(f"ChoraleTokenizer encodes a Chorale (grid, fermatas, key, meter), got {type(item).__name__}")
        if not 0 <= item.first_pos < item.bar_len:
            raise ValueError(f"{item.name}: bar position {item.first_pos} outside a bar of {item.bar_len} 16ths")
        body = self.pitch_to_id(item.grid)  # [T, 4]
        ferm = np.asarray(item.fermata, dtype=bool) & (body[:, 0] >= self.pitch0)
        body[ferm, 0] += self.fermata0 - self.pitch0
        head = [self.key_id(item.tonic, item.mode), self.meter_id(item.bar_len), self.pos0 + int(item.first_pos)]
        parts = ([self.bos_id] if bos else []) + head + body.reshape(-1).tolist() + ([self.eos_id] if eos else [])
        return torch.tensor(parts, dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> Chorale:
        """ids -> :class:`Chorale` (stops at EOS; an incomplete last step is dropped)."""
        ids = self._piece_ids(ids)
        if len(ids) < HEADER_LEN:
            raise ValueError(f"chorale ids hold no complete header (KEY METER POS): {ids}")
        k, m, p = ids[0] - self.key0, ids[1] - self.meter0, ids[2] - self.pos0
        if not (0 <= k < 24 and 0 <= m < len(self.meters) and 0 <= p < self.meters[m]):
            raise ValueError(f"chorale ids start with {ids[:3]}, not a KEY METER POS header")
        body = ids[HEADER_LEN:]
        steps = len(body) // NUM_VOICES
        arr = np.array(body[: steps * NUM_VOICES], dtype=np.int64).reshape(steps, NUM_VOICES)
        if (arr < self.rest_id).any() or (arr >= self.key0).any() or (arr[:, 1:] >= self.fermata0).any():
            raise ValueError("chorale ids hold a header or special id inside the piece: not a valid sequence")
        fermata = arr[:, 0] >= self.fermata0
        arr[:, 0] = np.where(fermata, arr[:, 0] - (self.fermata0 - self.pitch0), arr[:, 0])
        grid = (arr - self.pitch0 + self.low).astype(np.float64)
        grid[arr == self.rest_id] = np.nan
        return Chorale("sample", grid, fermata, k // 2, "minor" if k % 2 else "major", self.meters[m], p)

    def to_chorale(self, ids: torch.Tensor) -> Chorale:
        return self.decode(ids)

    def prefix_len(self, bos: bool) -> int:
        """Tokens in front of the first voice-step token: ``[BOS] KEY METER POS``."""
        return int(bos) + HEADER_LEN

    # -- type stream and grammar --------------------------------------------------------
    def types(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T]: voice + 4 * bar position (+ hold length)."""
        pos = torch.arange(ids.shape[-1], device=ids.device)[None, :]  # [1, T]
        rel = pos - self.body_start(ids)[:, None]  # [B, T] index inside the body; < 0 in the header
        bar, pos0 = self._header_values(ids)
        step = torch.div(rel, NUM_VOICES, rounding_mode="floor")  # header: step -1
        voice = rel % NUM_VOICES
        in_bar = torch.where(rel >= 0, (pos0[:, None] + step) % bar[:, None], 0)  # header: fixed, known up front
        out = voice + NUM_VOICES * in_bar
        if self.hold_types:
            out = out + NUM_VOICES * self.max_bar * self._hold_run(ids, rel)
        return out.contiguous()

    def allowed_next(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, t] -> bool [B, V]: the header in order (POS inside the bar of METER), then per step a
        rest or pitch for each voice (fermata pitches for the soprano only), EOS after a whole step."""
        b, t = ids.shape
        mask = torch.zeros(b, self.vocab_size, dtype=torch.bool, device=ids.device)
        if t == 0:
            mask[:, self.bos_id] = True
            return mask
        n = t - self.body_start(ids) + HEADER_LEN  # tokens after [BOS]
        bar, _ = self._header_values(ids)
        mask[:, self.key0 : self.key0 + 24] = (n == 0)[:, None]
        mask[:, self.meter0 : self.pos0] = (n == 1)[:, None]
        positions = torch.arange(self.max_bar, device=ids.device)[None, :]
        mask[:, self.pos0 :] = (n == 2)[:, None] & (positions < bar[:, None])
        k = n - HEADER_LEN  # voice-step tokens so far
        body = k >= 0
        mask[:, self.rest_id] = body
        mask[:, self.pitch0 : self.fermata0] = body[:, None]
        mask[:, self.fermata0 : self.key0] = (body & (k % NUM_VOICES == 0))[:, None]
        mask[:, self.eos_id] = body & (k > 0) & (k % NUM_VOICES == 0)
        return mask

    def grammar_errors(self, ids: torch.Tensor) -> int:
        """Grammar violations in one sequence, by the rules of :meth:`allowed_next` (vectorised):
        BOS first, the header in order, per-voice ids, EOS only after a whole step and nothing but
        PAD after it.  A sequence cut by the length limit is not an error."""
        ids = torch.as_tensor(ids).reshape(-1).cpu()
        eos = (ids == self.eos_id).nonzero()
        end = int(eos[0]) + 1 if len(eos) else len(ids)
        errors = int((ids[end:] != self.pad_id).sum())
        x = ids[:end]
        n = torch.arange(len(x)) - 1  # index after BOS
        errors += int(len(x) > 0 and x[0] != self.bos_id)
        bar = 0
        if len(x) > 2 and 0 <= int(x[2]) - self.meter0 < len(self.meters):
            bar = self.meters[int(x[2]) - self.meter0]
        k = n - HEADER_LEN
        is_pitch = (x >= self.pitch0) & (x < self.fermata0)
        ok = torch.zeros(len(x), dtype=torch.bool)
        ok |= (n == -1) & (x == self.bos_id)
        ok |= (n == 0) & (x >= self.key0) & (x < self.meter0)
        ok |= (n == 1) & (x >= self.meter0) & (x < self.pos0)
        ok |= (n == 2) & (x >= self.pos0) & (x < self.pos0 + bar)
        body = k >= 0
        ok |= body & ((x == self.rest_id) | is_pitch)
        ok |= body & (k % NUM_VOICES == 0) & (x >= self.fermata0) & (x < self.key0)
        ok |= body & (k > 0) & (k % NUM_VOICES == 0) & (x == self.eos_id)
        return errors + int((~ok[1:]).sum())

    # -- MIDI views ---------------------------------------------------------------------------
    def to_score(self, ids: torch.Tensor, qpm: float = 80.0) -> "Score":
        """ids -> 4-track :class:`symusic.Score` in the chorale's meter."""
        from symusic import TimeSignature

        ch = self.decode(ids)
        score = grid_to_score(ch.grid, qpm=qpm)
        num, den = _meter_fraction(ch.bar_len)
        score.time_signatures[0] = TimeSignature(0, num, den)
        return score

    def prompt_ids(self, score: "Score", path: str, prompt_tokens: int | None = None,
                   prompt_bars: float | None = None) -> torch.Tensor:
        """A 4-voice MIDI prompt -> ids (BOS and header first; key from music21's analysis of the prompt,
        meter from its time signature, bar position 0)."""
        from armodal.modalities.music.analysis import _pc_weights, key_of

        grid = score_to_grid(score, path)
        bar_len = 16
        if len(score.time_signatures):
            ts = score.time_signatures[0]
            bar_len = 16 * ts.numerator // ts.denominator
        if prompt_bars is not None:
            grid = grid[: int(round(prompt_bars * bar_len))]
        key = key_of(_pc_weights(grid).sum(0)) or (0, "major")
        try:
            ids = self.encode(Chorale(Path(path).stem, grid, np.zeros(len(grid), bool), key[0], key[1], bar_len, 0),
                              bos=True, eos=False)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if prompt_tokens is not None:
            keep = 1 + HEADER_LEN + NUM_VOICES * max(1, (int(prompt_tokens) - 1 - HEADER_LEN) // NUM_VOICES)
            ids = ids[:keep]
        if len(ids) <= 1 + HEADER_LEN:
            raise ValueError(f"{path}: the prompt holds no notes after cutting it to {prompt_tokens or prompt_bars}")
        return ids

    # -- persistence ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"low": self.low, "high": self.high, "hold_types": self.hold_types, "meters": list(self.meters)}

    @classmethod
    def from_state(cls, state: dict, directory: Path) -> "ChoraleTokenizer":
        return cls(**state)


def _meter_fraction(bar_len: int) -> tuple[int, int]:
    """Bar length in 16ths -> (numerator, denominator) of the usual time signature."""
    if bar_len % 8 == 0 and bar_len > 16:
        return bar_len // 8, 2  # 24 -> 3/2
    if bar_len % 4 == 0:
        return bar_len // 4, 4
    if bar_len % 2 == 0:
        return bar_len // 2, 8
    return bar_len, 16


def _meter_name(bar_len: int) -> str:
    num, den = _meter_fraction(int(bar_len))
    return f"{num}/{den}"
