"""Bach's four-part chorales from music21's corpus as 16th-note grids with fermatas, keys and meters.

:func:`convert_corpus_chorales` parses the 371 Riemenschneider chorales that music21
ships (``music21.corpus.chorales.Iterator``) once and writes one compact ``.npz``
(no pickled objects) that :func:`load_chorales` reads back as :class:`Chorale`
records:

* ``grid`` [T, 4]: MIDI pitch of soprano, alto, tenor, bass per 16th-note step,
  NaN for a rest (the JSB serialisation: a held note repeats its pitch);
* ``fermata`` [T] bool: a fermata sits on the soprano note sounding at that step;
* ``key``: music21's global key analysis (tonic pitch class 0..11, mode major/minor);
* ``bar_len`` (16ths per bar) and ``first_pos`` (bar position of step 0: a pickup
  of one quarter in 4/4 starts at position 12).

Pieces music21 cannot parse, that do not have exactly one soprano, alto, tenor and
bass part, that change meter, or that hold a note off the 16th grid (triplets)
are skipped and listed with the reason.

Splits follow the JSB chorales benchmark (``Jsb16thSeparated.npz``) when it is
given (:func:`assign_jsb_splits`): a corpus chorale whose first 8 bars agree with a
JSB piece on >= 90 % of the cells (best transposition; JSB writes repeats out, so
the corpus scores are read with their repeats expanded) takes that piece's split,
so a model trained on the corpus ``train`` split never saw a JSB ``valid`` /
``test`` chorale.  A chorale without a JSB twin goes to ``train`` unless it is close
to a JSB ``valid`` / ``test`` piece (>= 50 % of the cells, or the same tune: another
harmonisation of a held-out melody), which is left out (``split == "excluded"``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = [
    "Chorale",
    "ChoraleSkip",
    "SPLITS",
    "chorale_from_music21",
    "convert_corpus_chorales",
    "load_chorales",
    "save_chorales",
    "assign_jsb_splits",
]

SPLITS = ("train", "valid", "test")
VOICES = ("soprano", "alto", "tenor", "bass")
FORMAT_VERSION = 1
MODES = ("major", "minor")


@dataclass
class Chorale:
    """One four-part chorale on the 16th-note grid."""

    name: str  # music21 corpus name, e.g. "bach/bwv269"
    grid: np.ndarray  # [T, 4] float MIDI pitch (S, A, T, B), NaN = rest
    fermata: np.ndarray  # [T] bool: the soprano note sounding at this step carries a fermata
    tonic: int  # key tonic pitch class 0..11 (music21's key analysis)
    mode: str  # "major" | "minor"
    bar_len: int  # 16th-note steps per bar (16 in 4/4, 12 in 3/4)
    first_pos: int  # bar position (in 16ths) of step 0
    split: str = "train"  # "train" | "valid" | "test" | "excluded"

    @property
    def meter(self) -> str:
        return f"{self.bar_len // 4}/4" if self.bar_len % 4 == 0 else f"{self.bar_len}/16"

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, steps: slice) -> "Chorale":
        """Steps ``[a:b]`` of the chorale (bar position moved along), like slicing a grid."""
        if not isinstance(steps, slice) or steps.step not in (None, 1):
            raise TypeError("a Chorale is sliced by a contiguous range of steps, e.g. ch[16:80]")
        a = range(len(self.grid))[steps].start if len(range(len(self.grid))[steps]) else 0
        return Chorale(self.name, self.grid[steps], self.fermata[steps], self.tonic, self.mode, self.bar_len,
                       (self.first_pos + a) % self.bar_len, self.split)

    def transposed(self, shift: int) -> "Chorale":
        """The same chorale ``shift`` semitones higher (key moved along)."""
        return Chorale(self.name, self.grid + shift, self.fermata.copy(), (self.tonic + shift) % 12, self.mode,
                       self.bar_len, self.first_pos, self.split)


class ChoraleSkip(ValueError):
    """A corpus piece that cannot become a four-part grid (the message says why)."""


# ----------------------------------------------------------------------------- music21 -> grid
def _voice_parts(score) -> list:
    """The soprano, alto, tenor and bass parts of a music21 score, in that order."""
    parts = list(score.parts)
    named = {}
    for p in parts:
        label = (p.partName or p.id or "").strip().lower()
        for v in VOICES:
            if label.startswith(v) or label == v[0]:
                named.setdefault(v, p)
    if len(named) == 4:
        return [named[v] for v in VOICES]
    if len(parts) == 4:
        return parts
    raise ChoraleSkip(f"{len(parts)} parts, not one soprano, alto, tenor and bass "
                      f"(part names: {[p.partName for p in parts]})")


def _has_fermata(note) -> bool:
    from music21 import expressions

    return any(isinstance(e, expressions.Fermata) for e in note.expressions)


def chorale_from_music21(score, name: str = "score") -> Chorale:
    """A parsed music21 chorale -> :class:`Chorale`; :class:`ChoraleSkip` says why not."""
    from music21 import meter

    try:
        score = score.expandRepeats()  # performance order, as in the JSB grids
    except Exception:  # noqa: BLE001 - music21 cannot expand some repeat signs; keep the written order
        pass
    parts = _voice_parts(score)
    sigs = {ts.ratioString for ts in score.recurse().getElementsByClass(meter.TimeSignature)}
    if len(sigs) != 1:
        raise ChoraleSkip(f"meter changes or is missing ({sorted(sigs)})")
    ts = next(iter(score.recurse().getElementsByClass(meter.TimeSignature)))
    bar_q = float(ts.barDuration.quarterLength)
    if (bar_q * 4) % 1:
        raise ChoraleSkip(f"a bar of {bar_q} quarters is not a whole number of 16ths")
    bar_len = int(round(bar_q * 4))
    end = max(float(p.highestTime) for p in parts)
    n = int(round(end * 4))
    grid = np.full((n, 4), np.nan)
    fermata = np.zeros(n, dtype=bool)
    start_q = None
    for v, part in enumerate(parts):
        for el in part.flatten().notesAndRests:
            off, dur = float(el.offset), float(el.quarterLength)
            if (off * 4) % 1 or (dur * 4) % 1:
                raise ChoraleSkip(f"{VOICES[v]} has a note off the 16th grid at quarter {off} (length {dur})")
            if el.isRest or dur == 0:
                continue
            if el.isChord:
                raise ChoraleSkip(f"{VOICES[v]} holds a chord at quarter {off}: not one line")
            a, b = int(round(off * 4)), int(round((off + dur) * 4))
            grid[a:b, v] = el.pitch.midi
            if v == 0 and _has_fermata(el):
                fermata[a:b] = True
            start_q = off if start_q is None else min(start_q, off)
    if start_q is None:
        raise ChoraleSkip("no notes")
    first = parts[0].getElementsByClass("Measure")
    missing_q = float(first[0].paddingLeft) if len(first) else 0.0  # the empty start of a short first bar
    first_pos = int(round(missing_q * 4)) % bar_len  # a one-quarter pickup in 4/4 starts at position 12
    key = score.analyze("key")
    mode = key.mode if key.mode in MODES else "major"
    return Chorale(name=name, grid=grid, fermata=fermata, tonic=int(key.tonic.pitchClass), mode=mode,
                   bar_len=bar_len, first_pos=first_pos)


# ----------------------------------------------------------------------------- splits
def _soprano_onsets(grid: np.ndarray) -> tuple[int, ...]:
    """The soprano as a tuple of (pitch) at each note onset, held notes merged."""
    col = grid[:, 0]
    out, prev = [], None
    for p in col:
        q = None if np.isnan(p) else int(p)
        if q is not None and q != prev:
            out.append(q)
        prev = q
    return tuple(out)


def _interval_key(seq: Iterable[int]) -> tuple[int, ...]:
    seq = list(seq)
    return tuple(b - a for a, b in zip(seq, seq[1:]))


MATCH_STEPS = 128  # JSB twins are compared on their first 8 bars (all four voices, best transposition)
TWIN_SIMILARITY = 0.9  # a corpus chorale is a JSB piece's twin when >= 90 % of those cells agree
NEAR_SIMILARITY = 0.5  # ... and too close to a held-out piece for training when >= 50 % agree
MELODY_NOTES = 12  # a tune is recognised by the intervals between its first 13 soprano notes


def _similarity(grid: np.ndarray, others: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Share [N] of equal cells between ``grid``'s first steps and each of ``others`` [N, MATCH_STEPS, 4]
    (rests as -1, padding -2), maximised over transpositions of -12..12 semitones."""
    a = np.nan_to_num(grid[:MATCH_STEPS], nan=-1)
    n = np.minimum(lengths, len(a))  # [N] compared steps
    valid = np.arange(len(a))[None, :] < n[:, None]  # [N, S]
    best = np.zeros(len(others))
    for shift in range(-12, 13):
        moved = np.where(a >= 0, a + shift, a)
        eq = ((others[:, : len(a)] == moved[None]).all(-1) & valid).sum(1) / np.maximum(n, 1)
        best = np.maximum(best, eq)
    return best


def assign_jsb_splits(chorales: list[Chorale], jsb: dict[str, list[np.ndarray]]) -> dict[str, int]:
    """Give each chorale its JSB twin's split (in place); returns counts per assigned split.

    A chorale whose first 8 bars agree with a JSB piece on >= 90 % of the cells (best
    transposition) takes that piece's split.  One without a twin goes to ``train`` unless it
    is too close to a JSB ``valid`` / ``test`` piece (>= 50 % of the cells, or the same tune in
    its first 13 soprano notes): then it is ``excluded``.
    """
    names = [(split, g) for split in SPLITS for g in jsb[split]]
    stack = np.full((len(names), MATCH_STEPS, 4), -2.0)
    lengths = np.zeros(len(names), dtype=np.int64)
    for i, (_, g) in enumerate(names):
        g = np.nan_to_num(g[:MATCH_STEPS], nan=-1)
        stack[i, : len(g)], lengths[i] = g, len(g)
    held_out = np.array([split != "train" for split, _ in names])
    held_tunes = {_interval_key(_soprano_onsets(g))[:MELODY_NOTES] for split, g in names if split != "train"}
    counts: dict[str, int] = {}
    for ch in chorales:
        sim = _similarity(ch.grid, stack, lengths)
        best = int(np.argmax(sim))
        if sim[best] >= TWIN_SIMILARITY:
            ch.split = names[best][0]
        elif (sim[held_out] >= NEAR_SIMILARITY).any() or \
                _interval_key(_soprano_onsets(ch.grid))[:MELODY_NOTES] in held_tunes:
            ch.split = "excluded"
        else:
            ch.split = "train"
        counts[ch.split] = counts.get(ch.split, 0) + 1
    return counts


# ----------------------------------------------------------------------------- file format
def save_chorales(chorales: list[Chorale], path: str | Path) -> Path:
    """Write chorales to one ``.npz`` (plain arrays, loadable with ``allow_pickle=False``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(c.grid) for c in chorales], dtype=np.int64)
    grid = np.concatenate([c.grid for c in chorales]) if chorales else np.zeros((0, 4))
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        version=np.array(FORMAT_VERSION),
        names=np.array([c.name for c in chorales]),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        grid=np.where(np.isnan(grid), -1, grid).astype(np.int8),
        fermata=np.concatenate([c.fermata for c in chorales]) if chorales else np.zeros(0, bool),
        tonic=np.array([c.tonic for c in chorales], dtype=np.int8),
        minor=np.array([c.mode == "minor" for c in chorales]),
        bar_len=np.array([c.bar_len for c in chorales], dtype=np.int16),
        first_pos=np.array([c.first_pos for c in chorales], dtype=np.int16),
        split=np.array([c.split for c in chorales]),
    )
    tmp.replace(path)
    return path


def load_chorales(path: str | Path) -> list[Chorale]:
    """Read a file written by :func:`save_chorales`; a clear error names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: chorale grid file not found (build it with "
                                "`python datasets/bach_chorales/convert.py --grid`)")
    try:
        z = np.load(path, allow_pickle=False)
        version = int(z["version"])
        names, offsets, grid, fermata = z["names"], z["offsets"], z["grid"], z["fermata"]
        tonic, minor, bar_len, first_pos, split = z["tonic"], z["minor"], z["bar_len"], z["first_pos"], z["split"]
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{path}: not a chorale grid file ({type(e).__name__}: {e})") from None
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: chorale grid format version {version}, this armodal reads {FORMAT_VERSION}")
    n = len(names)
    if not (len(offsets) == n + 1 and offsets[-1] == len(grid) == len(fermata) and grid.ndim == 2
            and grid.shape[1] == 4 and len(tonic) == len(minor) == len(bar_len) == len(first_pos) == len(split) == n):
        raise ValueError(f"{path}: inconsistent array sizes (corrupt chorale grid file)")
    out = []
    for i in range(n):
        g = grid[offsets[i] : offsets[i + 1]].astype(np.float64)
        g[g < 0] = np.nan
        out.append(Chorale(str(names[i]), g, fermata[offsets[i] : offsets[i + 1]].astype(bool), int(tonic[i]),
                           "minor" if minor[i] else "major", int(bar_len[i]), int(first_pos[i]), str(split[i])))
    return out


def convert_corpus_chorales(out_path: str | Path, jsb_path: str | Path | None = None, limit: int | None = None,
                            verbose: bool = True) -> tuple[list[Chorale], list[str]]:
    """Parse music21's Riemenschneider chorales into ``out_path`` (.npz); returns (chorales, skipped lines).

    With ``jsb_path`` (``Jsb16thSeparated.npz``) the splits follow JSB's (see the module doc);
    without it every chorale is marked ``train``.
    """
    from music21 import corpus

    names = list(dict.fromkeys(corpus.chorales.Iterator(returnType="filename")))
    if limit is not None:
        names = names[:limit]
    chorales, skipped = [], []
    for i, name in enumerate(names):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                chorales.append(chorale_from_music21(corpus.parse(name), name=name))
        except ChoraleSkip as e:
            skipped.append(f"{name}: {e}")
        except Exception as e:  # noqa: BLE001 - music21 parse failures are reported, not fatal
            skipped.append(f"{name}: music21 could not read it ({type(e).__name__}: {e})")
        if verbose and (i + 1) % 50 == 0:
            print(f"[music] chorales: {i + 1}/{len(names)} parsed", flush=True)
    if jsb_path is not None:
        from armodal.modalities.music.data import load_jsb

        counts = assign_jsb_splits(chorales, load_jsb(jsb_path))
        if verbose:
            print(f"[music] splits from JSB: {counts}")
    save_chorales(chorales, out_path)
    if verbose:
        print(f"[music] {len(chorales)} chorales written to {out_path}; {len(skipped)} skipped")
    return chorales, skipped
