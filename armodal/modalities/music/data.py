"""A datamodule over any folder of MIDI files (searched recursively), tokenized once and cached.

* Files are split by piece, deterministically (a hash of the path relative to the
  root), into train / val / test.
* Bad files (corrupt or truncated, empty, drum-only, too large, nothing in the
  pitch range) are skipped with a :class:`MidiSkipWarning` naming the file and the
  reason; a summary with the count is printed at the end.
* Training windows of ``max_seq_len`` tokens are cut at random from
  ``BOS events EOS`` sequences, transposed by a random shift in
  ``[-max_transpose, max_transpose]`` (shifts that would push a pitch out of the
  tokenizer's range are not drawn) and taken from a randomly time-stretched
  version of the piece (``time_stretch`` factors, tokenized once and cached).
* Validation / test windows tile every sequence with a one-token overlap, so every
  token after the piece's BOS is scored exactly once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from symusic import Note, Score, Track
from torch.utils.data import DataLoader, Dataset

from armodal.modalities.base import register_datamodule
from armodal.modalities.music.avoid import AVOID_RULES, avoid_sets
from armodal.modalities.music.chorales import Chorale, load_chorales
from armodal.modalities.music.grid import NUM_VOICES, transpose_grid
from armodal.modalities.music.midi_io import DEFAULT_MAX_BYTES, MIDI_SUFFIXES, BadMidiError, read_midi
from armodal.modalities.music.tokenizer import HEADER_LEN, ChoraleTokenizer, JSBTokenizer, MidiTokenizer
from armodal.utils.cache import atomic_write, content_key, is_complete, mark_complete, writable_dir
from armodal.utils.safety import UnsafeTargetError, load_npz_arrays
from armodal.training.resume import ResumableLoader

__all__ = [
    "MidiDataModule",
    "MidiSkipWarning",
    "find_midi_files",
    "split_of",
    "time_stretch",
    "random_transpose",
    "JSBDataModule",
    "ChoraleDataModule",
    "load_jsb",
    "JSB_FILE",
    "grids_fingerprint",
    "load_soft_targets",
    "transpose_soft_rows",
]

log = logging.getLogger(__name__)
CACHE_VERSION = 1


class MidiSkipWarning(UserWarning):
    """A MIDI file was skipped while building a dataset (the message names it and says why)."""


def find_midi_files(root: str | Path) -> list[Path]:
    """Every ``.mid`` / ``.midi`` file under ``root`` (recursive, case-insensitive), sorted."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MIDI_SUFFIXES)


def split_of(rel_path: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """Deterministic split of one piece from a hash of its relative path."""
    h = int(hashlib.sha1(f"{seed}:{rel_path}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if h < test_fraction:
        return "test"
    if h < test_fraction + val_fraction:
        return "val"
    return "train"


def time_stretch(score: Score, factor: float) -> Score:
    """Every onset and duration multiplied by ``factor`` (in ticks; tempo kept, so it plays
    ``factor`` times slower).  ``factor=2`` turns quarters into halves."""
    if factor == 1.0:
        return score
    out = Score(score.ticks_per_quarter)
    for t in score.tracks:
        track = Track(t.name, t.program, t.is_drum)
        for n in t.notes:
            track.notes.append(Note(int(round(n.time * factor)), max(1, int(round(n.duration * factor))), n.pitch, n.velocity))
        out.tracks.append(track)
    for tempo in score.tempos:
        out.tempos.append(type(tempo)(int(round(tempo.time * factor)), tempo.qpm))
    return out


def random_transpose(tok: MidiTokenizer, ids: np.ndarray, max_transpose: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn shift in [-k, k] among those that keep every pitch in range."""
    for s in rng.permutation(np.arange(-max_transpose, max_transpose + 1)):
        out = tok.transpose_ids(ids, int(s))
        if out is not None:  # shift 0 always fits
            return out
    return ids


def seeded_rng() -> np.random.Generator:
    """A NumPy generator drawn from torch's RNG, which ``seed_everything`` (main process) and the
    DataLoader (each worker) seed from the run seed: two runs with the same seed draw the same windows."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


class _TrainWindows(Dataset):
    def __init__(self, pieces: list[list[np.ndarray]], tok: MidiTokenizer, seq_len: int, max_transpose: int) -> None:
        self.pieces, self.tok, self.seq_len, self.max_transpose = pieces, tok, seq_len, max_transpose
        # one entry per window's worth of tokens, so long pieces are seen proportionally more often
        self.index = [i for i, p in enumerate(pieces) for _ in range(max(1, int(np.ceil(len(p[0]) / seq_len))))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> torch.Tensor:
        rng = seeded_rng()
        versions = self.pieces[self.index[k]]
        ids = versions[int(rng.integers(len(versions)))]  # a random time-stretched version
        if len(ids) > self.seq_len:
            start = int(rng.integers(0, len(ids) - self.seq_len + 1))
            ids = ids[start : start + self.seq_len]
        if self.max_transpose > 0:
            ids = random_transpose(self.tok, ids, self.max_transpose, rng)
        return torch.from_numpy(np.asarray(ids, dtype=np.int64))


class _EvalWindows(Dataset):
    """Windows with a one-token overlap: every token after BOS is a target exactly once."""

    def __init__(self, pieces: list[list[np.ndarray]], seq_len: int) -> None:
        self.items = []
        for versions in pieces:
            ids = versions[0]  # the unstretched version
            start = 0
            while True:
                self.items.append(torch.from_numpy(np.asarray(ids[start : start + seq_len], dtype=np.int64)))
                if start + seq_len >= len(ids):
                    break
                start += seq_len - 1

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.items[k]


@register_datamodule("music.midi")
class MidiDataModule(pl.LightningDataModule):
    """Tokenized MIDI folder.  Batches: ``ids`` [B, T] and ``loss_mask`` [B, T] (non-pad).

    ``tokenizer`` holds :class:`MidiTokenizer` kwargs (``kind``, ``beat_res``,
    ``num_velocities``, ``pitch_range``).  Tokenized pieces are cached under
    ``cache_dir`` keyed on the data root, every file's size, mtime and SHA-256, the
    tokenizer parameters and the stretch factors (a read-only cache folder: a warning,
    then no cache).  ``root`` must exist and is never written to; with ``root=None`` and
    ``convert_music21_bach=True`` the data is music21's Bach chorales, converted once into
    ``<cache_dir>/music/bach_chorales_midi`` (used only once the conversion completed).
    Files with ``max_notes`` notes or more are skipped.
    """

    def __init__(
        self,
        root: str | None,
        tokenizer: dict | None = None,
        cache_dir: str | None = None,
        max_seq_len: int = 512,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        max_transpose: int = 5,
        time_stretch: list[float] | tuple[float, ...] = (1.0,),
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_notes: int = 200_000,
        num_workers: int = 0,
        convert_music21_bach: bool = False,
    ) -> None:
        super().__init__()
        self.root = Path(root) if root else None
        self.tokenizer = MidiTokenizer(**(dict(tokenizer) if tokenizer else {}))
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_seq_len, self.batch_size = int(max_seq_len), int(batch_size)
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.max_transpose = int(max_transpose)
        self.stretch = [float(f) for f in (time_stretch or [1.0])]
        if 1.0 not in self.stretch:
            self.stretch = [1.0, *self.stretch]
        self.stretch = [1.0] + [f for f in self.stretch if f != 1.0]  # version 0 is the original
        self.max_bytes, self.max_notes, self.num_workers = max_bytes, max_notes, num_workers
        self.convert_music21_bach = convert_music21_bach
        self.splits: dict[str, list[list[np.ndarray]]] | None = None
        self.names: dict[str, list[str]] = {}
        self.skipped: list[tuple[str, str]] = []

    # -- building ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.root is None:
            if not self.convert_music21_bach:
                raise ValueError("modality.data.root is not set: give a folder of .mid files (or root=null with "
                                 "convert_music21_bach=true for music21's Bach chorales)")
            self.root = self._bach_folder()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{self.root}: MIDI folder not found (modality.data.root must be an existing folder of .mid files; "
                "nothing is converted into it. root=null with convert_music21_bach=true uses music21's Bach chorales, "
                "converted into the cache)")

    def _bach_folder(self) -> Path:
        """music21's Bach chorales as MIDI in the cache; a partial conversion is resumed, never used."""
        from armodal.modalities.music.bach import convert_bach_chorales

        base = writable_dir(self.cache_dir / "music" if self.cache_dir else None, "cache")
        if base is None:
            base = Path(tempfile.mkdtemp(prefix="armodal-bach-"))
            warnings.warn(f"converting the Bach chorales into the temporary folder {base} (no writable cache_dir)",
                          stacklevel=2)
        folder = base / "bach_chorales_midi"
        if not is_complete(folder):
            n, failed = convert_bach_chorales(folder)
            mark_complete(folder, files=n, skipped=failed)
        return folder

    def _cache_path(self, files: list[Path]) -> Path | None:
        base = writable_dir(self.cache_dir / "music" if self.cache_dir else None, "cache")
        if base is None:
            return None
        key = content_key(self.root, files, v=CACHE_VERSION, tok=self.tokenizer.state(), stretch=self.stretch,
                          max_bytes=self.max_bytes, max_notes=self.max_notes)
        return base / f"{self.root.name}_{key}.pt"

    def _tokenize(self, path: Path) -> list[np.ndarray]:
        score = read_midi(path, max_bytes=self.max_bytes, max_notes=self.max_notes)
        versions = []
        for f in self.stretch:
            ids = self.tokenizer.encode(time_stretch(score, f)).numpy().astype(np.int32)
            if len(ids) <= 2:
                if f == 1.0:
                    raise BadMidiError(path, "no notes left inside the tokenizer's pitch range "
                                             f"{self.tokenizer.pitch_range}")
                continue
            versions.append(ids)
        return versions

    def build(self) -> dict:
        """Tokenize (or load from cache) every file; returns {"pieces": {rel: [ids...]}, "skipped": [...]}."""
        files = find_midi_files(self.root)
        if not files:
            raise FileNotFoundError(f"{self.root}: no .mid / .midi files found (searched recursively)")
        cache = self._cache_path(files)
        if cache is not None and cache.is_file():
            try:  # tensors only: never unpickle arbitrary objects, even from our own cache
                saved = torch.load(cache, weights_only=True)
                data = {"pieces": {rel: [t.numpy() for t in v] for rel, v in saved["pieces"].items()},
                        "skipped": [tuple(x) for x in saved["skipped"]]}
            except Exception as e:  # noqa: BLE001 - an old or damaged cache is rebuilt, not trusted
                warnings.warn(f"{cache}: token cache unreadable ({type(e).__name__}); rebuilding it", stacklevel=2)
            else:
                for rel, reason in data["skipped"]:
                    warnings.warn(f"skipping {self.root / rel}: {reason} (cached)", MidiSkipWarning, stacklevel=2)
                return data
        pieces, skipped = {}, []
        for f in files:
            rel = str(f.relative_to(self.root))
            try:
                pieces[rel] = self._tokenize(f)
            except BadMidiError as e:
                skipped.append((rel, e.reason))
                warnings.warn(f"skipping {f}: {e.reason}", MidiSkipWarning, stacklevel=2)
            except Exception as e:  # noqa: BLE001 - miditok may fail on exotic files; never crash the run
                reason = f"tokenizer failed ({type(e).__name__}: {e})"
                skipped.append((rel, reason))
                warnings.warn(f"skipping {f}: {reason}", MidiSkipWarning, stacklevel=2)
        data = {"pieces": pieces, "skipped": skipped}
        if cache is not None:
            blob = {"pieces": {rel: [torch.from_numpy(a) for a in v] for rel, v in pieces.items()},
                    "skipped": [list(x) for x in skipped]}
            try:
                atomic_write(cache, lambda tmp: torch.save(blob, tmp))
            except OSError as e:
                warnings.warn(f"{cache}: could not write the token cache ({e}); continuing without it", stacklevel=2)
        return data

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        self.prepare_data()
        data = self.build()
        self.skipped = list(data["skipped"])
        n_files = len(data["pieces"]) + len(self.skipped)
        if self.skipped:
            reasons = Counter(r.split(" (")[0] for _, r in self.skipped)
            print(f"[music] {self.root}: skipped {len(self.skipped)} of {n_files} MIDI files "
                  f"({', '.join(f'{v} {k}' for k, v in reasons.items())})")
        if not data["pieces"]:
            raise ValueError(f"{self.root}: none of the {n_files} MIDI files could be used (all skipped)")
        self.splits = {"train": [], "val": [], "test": []}
        self.names = {"train": [], "val": [], "test": []}
        for rel in sorted(data["pieces"]):
            s = split_of(rel, self.val_fraction, self.test_fraction, self.split_seed)
            self.splits[s].append(data["pieces"][rel])
            self.names[s].append(rel)
        self._fill_empty_splits()
        self._warn_dominant_piece()
        log.info("MIDI pieces per split: %s", {k: len(v) for k, v in self.splits.items()})

    def _fill_empty_splits(self) -> None:
        """Tiny folders: an empty split takes a piece from the largest one (moved, never shared)."""
        n = sum(len(v) for v in self.names.values())
        if n < 3:
            raise ValueError(f"{self.root}: {n} usable MIDI piece(s); train, val and test need at least one distinct "
                             "piece each (3 pieces)")
        for s in ("train", "val", "test"):
            if not self.names[s]:
                donor = max(("train", "val", "test"), key=lambda k: len(self.names[k]))
                self.names[s].append(self.names[donor].pop())
                self.splits[s].append(self.splits[donor].pop())
                warnings.warn(f"{self.root}: the {s} split was empty; moved {self.names[s][0]} into it from {donor}",
                              stacklevel=3)

    def _warn_dominant_piece(self, share: float = 0.5) -> None:
        """A piece that is most of the training windows (e.g. a huge file) is worth a warning."""
        windows = [max(1, int(np.ceil(len(v[0]) / self.max_seq_len))) for v in self.splits["train"]]
        if len(windows) > 1 and max(windows) > share * sum(windows):
            i = int(np.argmax(windows))
            warnings.warn(f"{self.root / self.names['train'][i]} makes up {max(windows) / sum(windows):.1%} of the "
                          f"training windows ({max(windows)} of {sum(windows)}); check it is a normal piece "
                          "(max_notes caps file size)", stacklevel=3)

    # -- loaders ----------------------------------------------------------------------------
    def collate(self, seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), self.tokenizer.pad_id, dtype=torch.long)  # [B, T]
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        return {"ids": ids, "loss_mask": ids != self.tokenizer.pad_id}

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        loader = ResumableLoader if shuffle else DataLoader  # training: resumes mid-epoch exactly
        return loader(ds, batch_size=self.batch_size, shuffle=shuffle, collate_fn=self.collate,
                      num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(_TrainWindows(self.splits["train"], self.tokenizer, self.max_seq_len, self.max_transpose), True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(_EvalWindows(self.splits["val"], self.max_seq_len), False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(_EvalWindows(self.splits["test"], self.max_seq_len), False)

    def scores(self, split: str) -> list[Score]:
        """The held-out pieces of a split as the tokenizer represents them (for metrics)."""
        self.setup()
        return [self.tokenizer.decode(torch.from_numpy(np.asarray(v[0], dtype=np.int64))) for v in self.splits[split]]


# ----------------------------------------------------------------------------- JSB chorales
# The JSB chorales benchmark: a 4-voice 16th-note grid, one token per voice-step.
#
# ``Jsb16thSeparated.npz`` (Boulanger-Lewandowski et al. 2012, 16th-note version used
# by Coconet and Music Transformer) holds, per split, a list of float arrays
# ``[T, 4]``: MIDI pitches of soprano, alto, tenor, bass per 16th-note step, NaN for
# a rest.  A piece is serialised as ``BOS S1 A1 T1 B1 S2 A2 T2 B2 ... EOS``; the voice
# of every token goes in the type stream.  Every voice-step token is a training
# target (the BOS in front predicts S1), and ``EOS`` / ``PAD`` are excluded from the
# loss so the reported NLL is exactly the note-wise NLL of the literature.

JSB_FILE = "Jsb16thSeparated.npz"


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
        raw = load_npz_arrays(path)  # object arrays of arrays; any other pickled object is refused
        splits = {k: [np.asarray(x, dtype=np.float64) for x in raw[k]] for k in ("train", "valid", "test")}
    except UnsafeTargetError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{path}: not a readable JSB npz with train/valid/test keys ({type(e).__name__}: {e})") from None
    for name, pieces in splits.items():
        for i, g in enumerate(pieces):
            if g.ndim != 2 or g.shape[1] != NUM_VOICES:
                raise ValueError(f"{path}: {name}[{i}] has shape {g.shape}, expected [T, {NUM_VOICES}]")
    return splits


def grids_fingerprint(grids) -> str:
    """SHA-256 of a list of JSB grids (shapes and pitches, rests as -1): ties a soft-target file to the
    exact pieces it was computed on."""
    h = hashlib.sha256()
    for g in grids:
        g = np.asarray(g, dtype=np.float64)
        h.update(np.asarray(g.shape, dtype=np.int64).tobytes())
        h.update(np.nan_to_num(g, nan=-1.0).astype(np.int16).tobytes())
    return h.hexdigest()


def load_soft_targets(path: str | Path, grids, vocab_size: int) -> list[np.ndarray]:
    """Read a soft-target file written by ``scripts/jsb_distill_targets.py`` for the training pieces
    ``grids``: one float array [steps, 4, V] per piece, each row a distribution over the vocabulary of
    that voice-step token (a teacher's prediction in the piece's own key).  Everything is checked first:
    the file (no pickle), the pieces it was made for (fingerprint), shapes, and that every row is a
    distribution; each problem is a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"modality.data.soft_targets={str(path)!r}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # not a zip / a pickled member / truncated
        raise ValueError(f"{path}: not a soft-target .npz ({type(e).__name__}: {e})") from None
    if "fingerprint" not in arrays or str(arrays["fingerprint"]) != grids_fingerprint(grids):
        raise ValueError(f"{path}: its soft targets were computed for other training pieces than this data's "
                         f"{len(grids)} (fingerprint differs); recompute them for this data with "
                         "scripts/jsb_distill_targets.py")
    out = []
    for i, g in enumerate(grids):
        a = arrays.get(f"piece_{i}")
        if a is None or a.shape != (len(g), NUM_VOICES, vocab_size):
            raise ValueError(f"{path}: piece_{i} has shape {None if a is None else a.shape}, expected "
                             f"{(len(g), NUM_VOICES, vocab_size)}")
        a = a.astype(np.float32)
        sums = a.sum(-1)
        if not np.isfinite(a).all() or (a < 0).any() or np.abs(sums - 1).max() > 1e-2:
            raise ValueError(f"{path}: piece_{i} holds rows that are not distributions (negative, NaN, or not "
                             "summing to 1)")
        out.append(a / sums[..., None])
    return out


def transpose_soft_rows(rows: np.ndarray, shift: int, first: int) -> np.ndarray:
    """Distributions [N, V] over the JSB vocabulary (pitch ids from ``first`` on) moved ``shift`` semitones:
    a pitch's mass goes to the shifted pitch, specials (rest included) stay, mass shifted out of range is
    dropped and each row renormalised."""
    if shift == 0:
        return rows
    out = np.zeros_like(rows)
    out[:, :first] = rows[:, :first]
    v = rows.shape[1]
    if shift > 0:
        out[:, first + shift:] = rows[:, first: v - shift]
    else:
        out[:, first: v + shift] = rows[:, first - shift:]
    return out / np.maximum(out.sum(-1, keepdims=True), 1e-12)


def _random_transpose(piece, max_transpose: int, low: int, high: int, rng: np.random.Generator):
    """(piece moved, shift): a uniformly drawn shift in [-k, k] among those that keep the piece
    (a grid or a :class:`Chorale`) in range."""
    grid = piece.grid if isinstance(piece, Chorale) else piece
    for s in rng.permutation(np.arange(-max_transpose, max_transpose + 1)):
        moved = transpose_grid(grid, int(s), low, high)
        if moved is not None:  # shift 0 always fits, so this ends
            return (piece.transposed(int(s)) if isinstance(piece, Chorale) else moved), int(s)
    return piece, 0


class _JSBTrainWindows(Dataset):
    """One random window of up to ``window_steps`` steps per piece and epoch, randomly transposed.

    Windows start on a beat (a multiple of 4 steps); a window starting at step 0
    begins with BOS (every token a target), later ones start with the tokenizer's
    prefix without BOS (nothing for the JSB grid; the chorale header), which is
    context, not a target.  Pieces are grids or :class:`Chorale` records.
    """

    def __init__(self, grids, tok: JSBTokenizer, window_steps: int, max_transpose: int, start_prob: float,
                 untarget_when_transposed: tuple[int, ...] = (), soft: list[np.ndarray] | None = None) -> None:
        self.grids, self.tok, self.window_steps = grids, tok, window_steps
        self.max_transpose, self.start_prob = max_transpose, start_prob
        self.untarget_when_transposed = untarget_when_transposed  # positions of a piece's first window
        self.soft = soft  # per piece [steps, 4, V] soft targets in the piece's key, or None

    def __len__(self) -> int:
        return len(self.grids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, tuple[int, ...]]:
        rng = seeded_rng()
        grid, shift = self.grids[i], 0
        if self.max_transpose > 0:
            grid, shift = _random_transpose(grid, self.max_transpose, self.tok.low, self.tok.high, rng)
        n_beats = max(0, (len(grid) - self.window_steps) // 4)
        start = 0 if (n_beats == 0 or rng.random() < self.start_prob) else 4 * int(rng.integers(1, n_beats + 1))
        window = grid[start : start + self.window_steps]
        ids = self.tok.encode(window, bos=start == 0, eos=start + self.window_steps >= len(grid))
        untarget = self.untarget_when_transposed if (start == 0 and shift) else ()
        skip = 0 if start == 0 else self.tok.prefix_len(False)
        if self.soft is None:
            return ids, skip, untarget  # (ids, leading non-targets, positions that are no target)
        rows = self.soft[i][start : start + self.window_steps]  # [w, 4, V] in the original key
        rows = transpose_soft_rows(rows.reshape(-1, rows.shape[-1]), shift, self.tok.num_specials)
        soft = np.zeros((len(ids), rows.shape[1]), dtype=np.float32)  # BOS / header / EOS: no soft target
        lead = self.tok.prefix_len(start == 0)
        soft[lead : lead + len(rows)] = rows
        return ids, skip, untarget, torch.from_numpy(soft)


class _JSBEvalWindows(Dataset):
    """Sliding windows that score every voice-step token of a split exactly once.

    The first window of a piece starts with BOS and scores steps ``[0, W)``; each
    next window moves by ``stride`` steps and scores only its last ``stride`` steps,
    so every token is predicted with at least ``W - stride`` steps of context.
    """

    def __init__(self, grids, tok: JSBTokenizer, window_steps: int, stride_steps: int) -> None:
        self.items: list[tuple[torch.Tensor, int]] = []  # (ids, number of leading non-target tokens)
        self.where: list[tuple[int, int]] = []  # (piece, first step) of each window
        for p, grid in enumerate(grids):
            n = len(grid)
            self.items.append((tok.encode(grid[:window_steps], bos=True, eos=False), 0))
            self.where.append((p, 0))
            end = window_steps
            while end < n:
                new_end = min(end + stride_steps, n)
                start = max(0, new_end - window_steps)
                start += (-start) % 4  # keep windows on beats (the type stream may carry the beat)
                ids = tok.encode(grid[start:new_end], bos=start == 0, eos=False)
                skip = tok.prefix_len(start == 0) + NUM_VOICES * (end - start)  # prefix + already-scored tokens
                self.items.append((ids, skip))
                self.where.append((p, start))
                end = new_end

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.items[i]


@register_datamodule("music.jsb")
class JSBDataModule(pl.LightningDataModule):
    """JSB chorales: train on ``train``, validate on ``valid``, test on ``test``.

    Training draws one random window of ``window_steps`` 16th-note steps per piece
    and epoch, transposed by a random shift in ``[-max_transpose, max_transpose]``
    that keeps every note in 36..81.  Validation and test score every voice-step
    token exactly once with sliding windows (:class:`_JSBEvalWindows`), so the
    generic ``val/nll`` is the note-wise NLL of the benchmark.

    Batches: ``ids`` [B, T], ``types`` [B, T] (voice), ``loss_mask`` [B, T]
    (True on the scored voice-step tokens only; never BOS, EOS or PAD).  With ``avoid`` rules
    (a mapping to relative weights such as ``{parallels: 5, crossings: 1}``, 0 = off; or a list of
    rules at weight 1) the training batches also carry ``avoid`` [R, B, T, V] and
    ``avoid_weight`` [R]: for each rule and voice-step target, the pitches that would make a parallel
    fifth or octave with a voice above it, or cross the voice just above
    (:mod:`~armodal.modalities.music.avoid`), for the LightningModule's unlikelihood term
    (``module.unlikelihood_weight`` > 0 scales them all).

    ``soft_targets``: a file written by ``scripts/jsb_distill_targets.py`` (a teacher's next-token
    distribution for every voice-step token of the training pieces, e.g. the transposition ensemble of
    a trained model); training batches then also carry ``soft_targets`` [B, T, V], moved with each
    window's transposition, for the LightningModule's distillation term (``module.distill_weight``).
    Validation and test never see them: ``val/nll`` stays the model's own note-wise NLL.
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
        avoid: tuple[str, ...] | list[str] | dict[str, float] = (),
        soft_targets: str | None = None,
    ) -> None:
        super().__init__()
        self.avoid = self._avoid_rules(avoid)
        self.soft_targets = soft_targets
        if window_steps % 4 or stride_steps % 4 or not 0 < stride_steps <= window_steps:
            raise ValueError("window_steps and stride_steps must be multiples of 4 with 0 < stride <= window")
        self.path, self.batch_size, self.window_steps, self.stride_steps = path, batch_size, window_steps, stride_steps
        self.max_transpose, self.start_prob, self.num_workers = max_transpose, start_prob, num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.tokenizer = JSBTokenizer(beat_types=beat_types, hold_types=hold_types)
        self.splits: dict[str, list[np.ndarray]] | None = None

    @staticmethod
    def _avoid_rules(avoid) -> dict[str, float]:
        """``modality.data.avoid`` (rule -> relative weight, 0 = off; or a list of rules at weight 1) ->
        {rule: weight} of the rules that are on."""
        msg = (f"modality.data.avoid={avoid!r}: expected a mapping rule -> weight >= 0 (rules {AVOID_RULES}, 0 = off) "
               "or a list of distinct rules")
        if isinstance(avoid, str):
            raise ValueError(msg)
        rules = dict(avoid.items()) if hasattr(avoid, "items") else {r: 1.0 for r in avoid}
        if len(rules) != len(list(avoid)) or any(r not in AVOID_RULES for r in rules):
            raise ValueError(msg)
        for r, w in rules.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(msg)
        return {str(r): float(w) for r, w in rules.items() if w > 0}

    @property
    def max_seq_len(self) -> int:
        """Longest sequence a batch can hold: BOS + window + EOS."""
        return NUM_VOICES * self.window_steps + 2

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_jsb(self.path)
            log.info("JSB chorales: %s pieces", {k: len(v) for k, v in self.splits.items()})

    def collate(self, items: list[tuple], avoid: bool = False) -> dict[str, torch.Tensor]:
        """Items are ``(ids, leading non-target tokens)`` or ``(ids, skip, positions that are no target)``;
        ``avoid`` adds the avoid sets of the ``avoid`` rules (training batches)."""
        t = max(len(item[0]) for item in items)
        ids = torch.full((len(items), t), self.tokenizer.pad_id, dtype=torch.long)  # [B, T]
        loss_mask = torch.zeros(len(items), t, dtype=torch.bool)  # [B, T]
        soft = None
        if len(items[0]) > 3:  # training windows with soft targets [len, V]
            soft = torch.zeros(len(items), t, items[0][3].shape[1])  # [B, T, V]; zero rows = none
        for i, (s, skip, *rest) in enumerate(items):
            ids[i, : len(s)] = s
            loss_mask[i, skip : len(s)] = True
            for pos in rest[0] if rest else ():
                loss_mask[i, pos] = False
            if soft is not None:
                soft[i, : len(s)] = rest[1]
        loss_mask &= ids >= self.tokenizer.rest_id  # voice-step tokens only
        batch = {"ids": ids, "types": self.tokenizer.types(ids), "loss_mask": loss_mask}
        if soft is not None:
            batch["soft_targets"] = soft
        if avoid and self.avoid:
            batch["avoid"] = torch.stack([avoid_sets(self.tokenizer, ids, (r,)) for r in self.avoid])  # [R, B, T, V]
            batch["avoid_weight"] = torch.tensor(list(self.avoid.values()))
        return batch

    def _train_collate(self, items: list[tuple]) -> dict[str, torch.Tensor]:
        return self.collate(items, avoid=True)

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        loader = ResumableLoader if shuffle else DataLoader  # training: resumes mid-epoch exactly
        return loader(ds, batch_size=batch_size, shuffle=shuffle,
                      collate_fn=self._train_collate if shuffle else self.collate, num_workers=self.num_workers)

    def untarget_when_transposed(self) -> tuple[int, ...]:
        """Positions of a piece's first window that are no target once the piece is transposed (none here)."""
        return ()

    def train_dataloader(self) -> DataLoader:
        self.setup()
        soft = None
        if self.soft_targets:
            soft = load_soft_targets(self.soft_targets, self.splits["train"], self.tokenizer.vocab_size)
        ds = _JSBTrainWindows(self.splits["train"], self.tokenizer, self.window_steps, self.max_transpose,
                              self.start_prob, self.untarget_when_transposed(), soft)
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


@register_datamodule("music.chorales")
class ChoraleDataModule(JSBDataModule):
    """Bach's chorales from music21's corpus (:mod:`armodal.modalities.music.chorales`) on the JSB grid,
    with a key / meter / pickup header and soprano fermatas (:class:`ChoraleTokenizer`).

    ``path`` is the ``.npz`` written by :func:`~armodal.modalities.music.chorales.convert_corpus_chorales`
    (``datasets/bach_chorales/chorales.npz``); its ``split`` field (JSB-aligned) picks the pieces of
    ``train`` / ``valid`` / ``test``; ``excluded`` pieces are never used.  Windows, transposition
    and scoring are those of :class:`JSBDataModule`; the header tokens of a piece's first window
    are targets (a sample starts by choosing key, meter and pickup).

    ``key_prior``: which keys teach the model its first choice, the KEY token.  ``"original"``
    (default): only the untransposed pieces' keys are targets; a transposed piece's KEY token is
    context for the notes that follow but no target, so the key distribution of the samples stays
    Bach's (G major, G minor, A minor ... as written) while every note still learns from all
    transpositions.  ``"transposed"``: every drawn transposition's key is a target too, which
    teaches a near-uniform key prior (a model that learns the +-5 augmented data exactly writes a
    pitch-class histogram 0.34 L1 away from Bach's valid chorales, against 0.10 between Bach's
    train and valid sets).
    """

    KEY_PRIORS = ("original", "transposed")

    def __init__(self, path: str, hold_types: int = 8, meters: tuple[int, ...] | list[int] = (12, 16, 24),
                 key_prior: str = "original", **kwargs) -> None:
        if kwargs.get("soft_targets"):
            raise ValueError("modality.data.soft_targets: soft targets are made for the JSB grid "
                             "(experiment=music_jsb, scripts/jsb_distill_targets.py), not for the corpus chorales")
        super().__init__(path, hold_types=hold_types, **kwargs)
        if key_prior not in self.KEY_PRIORS:
            raise ValueError(f"modality.data.key_prior={key_prior!r}: expected one of {self.KEY_PRIORS}")
        self.key_prior = key_prior
        self.tokenizer = ChoraleTokenizer(hold_types=hold_types, meters=tuple(meters))

    def untarget_when_transposed(self) -> tuple[int, ...]:
        """The KEY token (the header's first, right after BOS) of a transposed piece, unless transposed keys
        are targets."""
        key_pos = self.tokenizer.prefix_len(True) - HEADER_LEN
        return (key_pos,) if self.key_prior == "original" else ()

    @property
    def max_seq_len(self) -> int:
        """Longest sequence a batch can hold: BOS + header + window + EOS."""
        return NUM_VOICES * self.window_steps + 2 + self.tokenizer.prefix_len(False)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            chorales = load_chorales(self.path)
            meters = set(self.tokenizer.meters)
            self.splits = {k: [c for c in chorales if c.split == k and c.bar_len in meters]
                           for k in ("train", "valid", "test")}
            if not self.splits["train"]:
                raise ValueError(f"{self.path}: no training chorales (splits: "
                                 f"{sorted({c.split for c in chorales})})")
            log.info("corpus chorales: %s pieces", {k: len(v) for k, v in self.splits.items()})
