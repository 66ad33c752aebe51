"""Chorale grid tokenizer: the JSB voice-step serialisation plus a key / meter / pickup header
and soprano fermatas, for music21's corpus chorales (:mod:`armodal.modalities.music.chorales`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from armodal.modalities.music import JSBTokenizer
from armodal.modalities.music.chorales import Chorale

if TYPE_CHECKING:  # pragma: no cover
    from symusic import Score

__all__ = ["ChoraleTokenizer", "HEADER_LEN", "METERS"]

NUM_VOICES = 4
HEADER_LEN = 3  # KEY METER POS after BOS
METERS = (12, 16, 24)  # bar lengths in 16ths the corpus holds: 3/4, 4/4, 3/2


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
    take the type of the bass of the step before the first one.
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

    def _body_start(self, ids: torch.Tensor) -> torch.Tensor:
        """[B] index of the first voice-step token (after ``[BOS] KEY METER POS``)."""
        return (ids[:, 0] == self.bos_id).long() + HEADER_LEN if ids.shape[1] else torch.zeros(
            ids.shape[0], dtype=torch.long, device=ids.device)

    def _header_values(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] bar length and [B] bar position of the first step, read from the header (defaults
        16 / 0 while the header is still being written)."""
        b, t = ids.shape
        start = self._body_start(ids) - HEADER_LEN  # index of KEY
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
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        ids = [i for i in ids if i != self.pad_id]
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

    # -- type stream and grammar --------------------------------------------------------
    def types(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T]: voice + 4 * bar position (+ hold length)."""
        pos = torch.arange(ids.shape[-1], device=ids.device)[None, :]  # [1, T]
        rel = pos - self._body_start(ids)[:, None]  # [B, T] index inside the body; < 0 in the header
        bar, pos0 = self._header_values(ids)
        step = torch.div(rel, NUM_VOICES, rounding_mode="floor")  # header: step -1
        voice = rel % NUM_VOICES
        in_bar = (pos0[:, None] + step) % bar[:, None]
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
        n = t - self._body_start(ids) + HEADER_LEN  # tokens after [BOS]
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

        from armodal.modalities.music import grid_to_score

        ch = self.decode(ids)
        score = grid_to_score(ch.grid, qpm=qpm)
        num, den = _meter_fraction(ch.bar_len)
        score.time_signatures[0] = TimeSignature(0, num, den)
        return score

    def prompt_ids(self, score: "Score", path: str, prompt_tokens: int | None = None,
                   prompt_bars: float | None = None) -> torch.Tensor:
        """A 4-voice MIDI prompt -> ids (BOS and header first; key from music21's analysis of the prompt,
        meter from its time signature, bar position 0)."""
        from armodal.modalities.music import score_to_grid
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
