"""The JSB chorales benchmark: a 4-voice 16th-note grid, one token per voice-step.

``Jsb16thSeparated.npz`` (Boulanger-Lewandowski et al. 2012, 16th-note version used
by Coconet and Music Transformer) holds, per split, a list of float arrays
``[T, 4]``: MIDI pitches of soprano, alto, tenor, bass per 16th-note step, NaN for
a rest.  A piece is serialised as ``BOS S1 A1 T1 B1 S2 A2 T2 B2 ... EOS``; the voice
of every token goes in the type stream.  Every voice-step token is a training
target (the BOS in front predicts S1), and ``EOS`` / ``PAD`` are excluded from the
loss so the reported NLL is exactly the note-wise NLL of the literature.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from armodal.modalities.base import Tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from symusic import Score

__all__ = [
    "JSBTokenizer",
    "JSBDataModule",
    "load_jsb",
    "transpose_grid",
    "JSB_FILE",
    "JSB_LOW",
    "JSB_HIGH",
    "NUM_VOICES",
    "grid_to_score",
    "score_to_grid",
]

log = logging.getLogger(__name__)

JSB_FILE = "Jsb16thSeparated.npz"
JSB_LOW, JSB_HIGH = 36, 81  # pitch range of the dataset (inclusive)
NUM_VOICES = 4  # soprano, alto, tenor, bass
VOICE_NAMES = ("soprano", "alto", "tenor", "bass")


# ----------------------------------------------------------------------------- tokenizer
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

    def decode(self, ids: torch.Tensor) -> np.ndarray:
        """ids [T] -> grid [steps, 4] (float, NaN = rest).

        Specials are dropped, decoding stops at the first EOS and an incomplete last
        step is dropped (it cannot come out of constrained decoding).
        """
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        ids = [i for i in ids if i != self.pad_id]
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
        has_bos = (ids[:, :1] == self.bos_id).long()  # [B, 1]
        rel = pos - has_bos  # index of the token inside the body; -1 for BOS
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
        has_bos = (ids[:, 0] == self.bos_id).long() if t else torch.zeros(b, dtype=torch.long, device=ids.device)
        n_body = t - has_bos  # [B] voice-step tokens so far
        mask[:, self.eos_id] = (n_body > 0) & (n_body % NUM_VOICES == 0)
        return mask

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


# ----------------------------------------------------------------------------- grid <-> MIDI
def grid_to_score(grid: np.ndarray, qpm: float = 80.0, tpq: int = 480, velocity: int = 80) -> "Score":
    """Grid [T, 4] -> a 4-track :class:`symusic.Score` (S, A, T, B; repeated pitches are held notes)."""
    from symusic import Note, Score, Tempo, TimeSignature, Track

    step = tpq // 4  # ticks per 16th note
    score = Score(tpq)
    score.tempos.append(Tempo(0, qpm))
    score.time_signatures.append(TimeSignature(0, 4, 4))
    for v, name in enumerate(VOICE_NAMES):
        track = Track(name, 52 if v < 2 else 0, False)  # choir aahs / piano
        col = grid[:, v] if len(grid) else np.zeros(0)
        t = 0
        while t < len(col):
            if np.isnan(col[t]):
                t += 1
                continue
            start = t
            while t + 1 < len(col) and col[t + 1] == col[start]:
                t += 1
            track.notes.append(Note(start * step, (t + 1 - start) * step, int(col[start]), velocity))
            t += 1
        score.tracks.append(track)
    return score


def score_to_grid(score: "Score", path: str = "prompt") -> np.ndarray:
    """A 4-track MIDI (one voice per track, S A T B from the top) -> grid [T, 4] on 16th notes.

    Raises ValueError with the file name when the MIDI is not a 4-voice chorale.
    """
    tracks = [t for t in score.tracks if not t.is_drum and len(t.notes) > 0]
    if len(tracks) != NUM_VOICES:
        raise ValueError(
            f"{path}: a JSB prompt must be a 4-voice MIDI with one non-drum track per voice "
            f"(soprano, alto, tenor, bass); found {len(tracks)} non-empty tracks"
        )
    step = score.ticks_per_quarter / 4
    end = max(t.end() for t in tracks)
    n = int(np.ceil(end / step))
    grid = np.full((n, NUM_VOICES), np.nan)
    for v, track in enumerate(tracks):
        for note in track.notes:
            a, b = int(round(note.time / step)), int(round((note.time + note.duration) / step))
            grid[a : max(b, a + 1), v] = np.fmax(grid[a : max(b, a + 1), v], note.pitch)
    return grid


# ----------------------------------------------------------------------------- data
def load_jsb(path: str | Path) -> dict[str, list[np.ndarray]]:
    """Read ``Jsb16thSeparated.npz`` -> {"train"|"valid"|"test": [grid [T, 4] float64]}."""
    path = Path(path)
    if path.is_dir():
        path = path / JSB_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: JSB chorales file not found. Get Jsb16thSeparated.npz from "
            "https://github.com/czhuang/JSB-Chorales-dataset and point paths.data_dir "
            "(or data.path) at the folder holding jsb_chorales/"
        )
    try:
        raw = np.load(path, allow_pickle=True, encoding="latin1")
        splits = {k: [np.asarray(x, dtype=np.float64) for x in raw[k]] for k in ("train", "valid", "test")}
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{path}: not a readable JSB npz with train/valid/test keys ({type(e).__name__}: {e})") from None
    for name, pieces in splits.items():
        for i, g in enumerate(pieces):
            if g.ndim != 2 or g.shape[1] != NUM_VOICES:
                raise ValueError(f"{path}: {name}[{i}] has shape {g.shape}, expected [T, {NUM_VOICES}]")
    return splits


def transpose_grid(grid: np.ndarray, shift: int, low: int = JSB_LOW, high: int = JSB_HIGH) -> np.ndarray | None:
    """Shift every pitch by ``shift`` semitones; None when a note would leave [low, high]."""
    out = grid + shift
    notes = out[~np.isnan(out)]
    if notes.size and (notes.min() < low or notes.max() > high):
        return None
    return out


def _random_transpose(grid: np.ndarray, max_transpose: int, low: int, high: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn shift in [-k, k] among those that keep the piece in range."""
    for s in rng.permutation(np.arange(-max_transpose, max_transpose + 1)):
        moved = transpose_grid(grid, int(s), low, high)
        if moved is not None:  # shift 0 always fits, so this ends
            return moved
    return grid


class _JSBTrainWindows(Dataset):
    """One random window of up to ``window_steps`` steps per piece and epoch, randomly transposed.

    Windows start on a beat (a multiple of 4 steps); a window starting at step 0
    begins with BOS (every token a target), later ones start on a soprano token
    whose own prediction is masked out (it has no predictor).
    """

    def __init__(self, grids, tok: JSBTokenizer, window_steps: int, max_transpose: int, start_prob: float) -> None:
        self.grids, self.tok, self.window_steps = grids, tok, window_steps
        self.max_transpose, self.start_prob = max_transpose, start_prob

    def __len__(self) -> int:
        return len(self.grids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng()
        grid = self.grids[i]
        if self.max_transpose > 0:
            grid = _random_transpose(grid, self.max_transpose, self.tok.low, self.tok.high, rng)
        n_beats = max(0, (len(grid) - self.window_steps) // 4)
        start = 0 if (n_beats == 0 or rng.random() < self.start_prob) else 4 * int(rng.integers(1, n_beats + 1))
        window = grid[start : start + self.window_steps]
        ids = self.tok.encode(window, bos=start == 0, eos=start + self.window_steps >= len(grid))
        return ids, 0  # every token after the first is a target


class _JSBEvalWindows(Dataset):
    """Sliding windows that score every voice-step token of a split exactly once.

    The first window of a piece starts with BOS and scores steps ``[0, W)``; each
    next window moves by ``stride`` steps and scores only its last ``stride`` steps,
    so every token is predicted with at least ``W - stride`` steps of context.
    """

    def __init__(self, grids, tok: JSBTokenizer, window_steps: int, stride_steps: int) -> None:
        self.items: list[tuple[torch.Tensor, int]] = []  # (ids, number of leading non-target tokens)
        for grid in grids:
            n = len(grid)
            self.items.append((tok.encode(grid[:window_steps], bos=True, eos=False), 0))
            end = window_steps
            while end < n:
                new_end = min(end + stride_steps, n)
                start = max(0, new_end - window_steps)
                start += (-start) % 4  # keep windows on beats (the type stream may carry the beat)
                ids = tok.encode(grid[start:new_end], bos=start == 0, eos=False)
                skip = (1 if start == 0 else 0) + NUM_VOICES * (end - start)  # already-scored tokens
                self.items.append((ids, skip))
                end = new_end

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.items[i]


class JSBDataModule(pl.LightningDataModule):
    """JSB chorales: train on ``train``, validate on ``valid``, test on ``test``.

    Training draws one random window of ``window_steps`` 16th-note steps per piece
    and epoch, transposed by a random shift in ``[-max_transpose, max_transpose]``
    that keeps every note in 36..81.  Validation and test score every voice-step
    token exactly once with sliding windows (:class:`_JSBEvalWindows`), so the
    generic ``val/nll`` is the note-wise NLL of the benchmark.

    Batches: ``ids`` [B, T], ``types`` [B, T] (voice), ``loss_mask`` [B, T]
    (True on the scored voice-step tokens only; never BOS, EOS or PAD).
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 16,
        window_steps: int = 128,
        stride_steps: int = 64,
        max_transpose: int = 5,
        start_prob: float = 0.25,
        beat_types: bool = False,
        hold_types: int = 0,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if window_steps % 4 or stride_steps % 4 or not 0 < stride_steps <= window_steps:
            raise ValueError("window_steps and stride_steps must be multiples of 4 with 0 < stride <= window")
        self.path, self.batch_size, self.window_steps, self.stride_steps = path, batch_size, window_steps, stride_steps
        self.max_transpose, self.start_prob, self.num_workers = max_transpose, start_prob, num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.tokenizer = JSBTokenizer(beat_types=beat_types, hold_types=hold_types)
        self.splits: dict[str, list[np.ndarray]] | None = None

    @property
    def max_seq_len(self) -> int:
        """Longest sequence a batch can hold: BOS + window + EOS."""
        return NUM_VOICES * self.window_steps + 2

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_jsb(self.path)
            log.info("JSB chorales: %s pieces", {k: len(v) for k, v in self.splits.items()})

    def collate(self, items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        t = max(len(s) for s, _ in items)
        ids = torch.full((len(items), t), self.tokenizer.pad_id, dtype=torch.long)  # [B, T]
        loss_mask = torch.zeros(len(items), t, dtype=torch.bool)  # [B, T]
        for i, (s, skip) in enumerate(items):
            ids[i, : len(s)] = s
            loss_mask[i, skip : len(s)] = True
        loss_mask &= ids >= self.tokenizer.rest_id  # voice-step tokens only
        return {"ids": ids, "types": self.tokenizer.types(ids), "loss_mask": loss_mask}

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate,
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        ds = _JSBTrainWindows(self.splits["train"], self.tokenizer, self.window_steps, self.max_transpose,
                              self.start_prob)
        return self._loader(ds, self.batch_size, True)

    def eval_dataset(self, split: str) -> Dataset:
        self.setup()
        return _JSBEvalWindows(self.splits[split], self.tokenizer, self.window_steps, self.stride_steps)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset("valid"), self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset("test"), self.eval_batch_size, False)

    def pieces(self, split: str) -> list[np.ndarray]:
        """The raw grids of a split ("train", "valid", "test"), for evaluators and prompts."""
        self.setup()
        return self.splits[split]
