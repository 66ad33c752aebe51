"""Chorale analysis on the four-voice 16th-note grid: the statistics that tell a chorale from notes.

Every function takes a :class:`~armodal.modalities.music.chorales.Chorale` (a grid
``[T, 4]`` of S, A, T, B MIDI pitches with NaN for rests, soprano fermatas when
known, the bar length and the bar position of step 0), so generated pieces and
Bach's are measured by the same code.

Definitions (a *sonority* is the 4-tuple sounding at a step where some voice
starts a note; a *voice-leading step* is a move between two consecutive
sonorities in which all four voices sound):

* ``polyphony``: mean number of sounding voices over the steps where any sounds;
* ``note_density``: note onsets per quarter note (a held pitch is one note);
* ``pitch_class_hist_l1``: L1 distance (0..2) between pooled pitch-class
  histograms, each note counted once;
* ``key_stability``: share of bars whose local key equals the piece's global
  key (tonic and mode).  Keys come from music21's default key analysis
  (Aarden-Essen profiles, :class:`music21.analysis.discrete.AardenEssen`):
  :func:`key_of` correlates the duration-weighted pitch-class distribution with
  music21's profiles exactly as ``Stream.analyze("key")`` does (checked against it
  in the tests), without building a music21 stream per bar;
* ``voice_crossing_per_100``: sonorities (all four voices sounding) in which a
  lower voice sits above its upper neighbour, per 100 such sonorities;
* ``parallel_fifths_per_100`` / ``parallel_octaves_per_100``: voice-leading steps
  in which some pair of voices moves in the same direction from a perfect fifth
  (or octave / unison, compound intervals included) to the same perfect
  interval, per 100 voice-leading steps;
* ``cadence_share``: share of phrase endings (the first step of each run of soprano
  fermata steps) that are a V-I or IV-I cadence in the phrase's key: the fermata
  chord has its root ``r`` in the bass, ``r`` is the tonic of the phrase (the key,
  found as above, of the steps since the previous fermata), and the chord one
  quarter before has root ``r + 7`` and holds the leading tone (V-I) or has root
  ``r + 5`` (IV-I).  A phrase ending on the dominant (a half cadence) is not a
  cadence here.  Roots come from :meth:`music21.chord.Chord.root`.  Pieces without
  fermata information do not count (NaN when none has any).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np

from armodal.modalities.music.chorales import Chorale
from armodal.modalities.music.grid import voice_notes

__all__ = [
    "CHORALE_RATES",
    "chorale_counts",
    "chorale_metrics",
    "compare_chorales",
    "key_of",
    "sonorities",
    "cadences",
    "phrase_endings",
    "cadential_approach",
]

# the rates compared against Bach's (the "within 25 %" targets)
CHORALE_RATES = ("polyphony", "note_density", "key_stability", "voice_crossing_per_100",
                 "parallel_fifths_per_100", "parallel_octaves_per_100", "cadence_share")


# ----------------------------------------------------------------------------- notes and sonorities
def onset_steps(grid: np.ndarray) -> np.ndarray:
    """Steps [K] at which some voice starts a note (its pitch differs from the step before)."""
    g = np.nan_to_num(grid, nan=-1)
    change = np.ones(len(g), dtype=bool)
    change[1:] = (g[1:] != g[:-1]).any(1)
    starts = change & (g >= 0).any(1)
    return np.flatnonzero(starts)


def sonorities(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(steps [K], pitches [K, 4]) of the sonorities in which all four voices sound."""
    steps = onset_steps(grid)
    chords = grid[steps]
    full = ~np.isnan(chords).any(1)
    return steps[full], chords[full].astype(np.int64)


# ----------------------------------------------------------------------------- keys
@lru_cache(maxsize=1)
def _profiles() -> np.ndarray:
    """[2, 12, 12] music21's default key profiles (Aarden-Essen), rotated to every tonic, centred."""
    from music21.analysis.discrete import AardenEssen

    a = AardenEssen()
    out = np.zeros((2, 12, 12))
    for m, mode in enumerate(("major", "minor")):
        w = np.asarray(a.getWeights(mode), dtype=np.float64)
        for tonic in range(12):
            out[m, tonic] = np.roll(w, tonic) - w.mean()
    return out


def key_of(pcs: np.ndarray) -> tuple[int, str] | None:
    """Duration-weighted pitch-class distribution [12] -> (tonic pitch class, mode) as music21's
    ``analyze("key")`` finds it (Pearson correlation with each rotated profile; best wins);
    None for an empty distribution."""
    pcs = np.asarray(pcs, dtype=np.float64)
    if pcs.sum() <= 0:
        return None
    x = pcs - pcs.mean()
    prof = _profiles()
    den = np.sqrt((prof**2).sum(-1) * (x**2).sum())
    corr = np.where(den > 0, (prof * x).sum(-1) / np.where(den > 0, den, 1.0), 0.0)  # [2, 12]
    m, tonic = np.unravel_index(int(np.argmax(corr)), corr.shape)
    return int(tonic), ("major", "minor")[m]


def _pc_weights(grid: np.ndarray) -> np.ndarray:
    """[T, 12] sounding duration (in 16ths) of each pitch class at each step."""
    out = np.zeros((len(grid), 12))
    for v in range(grid.shape[1]):
        ok = ~np.isnan(grid[:, v])
        np.add.at(out, (np.flatnonzero(ok), grid[ok, v].astype(np.int64) % 12), 1.0)
    return out


def bar_keys(ch: Chorale) -> tuple[tuple[int, str] | None, list[tuple[int, str] | None]]:
    """(global key, [local key of each bar]) of a chorale; bars follow ``bar_len`` / ``first_pos``."""
    w = _pc_weights(ch.grid)
    bar_of = (np.arange(len(ch.grid)) + ch.first_pos) // ch.bar_len
    keys = [key_of(w[bar_of == b].sum(0)) for b in np.unique(bar_of)]
    return key_of(w.sum(0)), [k for k in keys if k is not None]


# ----------------------------------------------------------------------------- voice leading
def crossings(chords: np.ndarray) -> np.ndarray:
    """[K, 4] sonorities -> bool [K]: some voice lies above the voice written above it."""
    return (chords[:, 1:] > chords[:, :-1]).any(1)


def parallels(chords: np.ndarray) -> tuple[int, int, int]:
    """(voice-leading steps, steps with parallel fifths, steps with parallel octaves/unisons)
    over consecutive sonorities [K, 4]."""
    if len(chords) < 2:
        return 0, 0, 0
    a, b = chords[:-1], chords[1:]  # [K-1, 4]
    fifths = octaves = np.zeros(len(a), dtype=bool)
    for i in range(4):
        for j in range(i + 1, 4):
            ia, ib = (a[:, i] - a[:, j]) % 12, (b[:, i] - b[:, j]) % 12
            mi, mj = b[:, i] - a[:, i], b[:, j] - a[:, j]
            same_dir = (mi != 0) & (mj != 0) & (np.sign(mi) == np.sign(mj))
            fifths = fifths | (same_dir & (ia == 7) & (ib == 7))
            octaves = octaves | (same_dir & (ia == 0) & (ib == 0))
    return len(a), int(fifths.sum()), int(octaves.sum())


@lru_cache(maxsize=4096)
def _root(pitches: tuple[int, ...]) -> int:
    from music21 import chord

    return int(chord.Chord(list(pitches)).root().pitchClass)


def cadential_approach(before: tuple[int, ...], tonic: int) -> bool:
    """The chord before a cadence's final tonic: V holding the leading tone, or IV, of ``tonic``."""
    rb = _root(before)
    pcs = {p % 12 for p in before}
    return (rb == (tonic + 7) % 12 and (tonic + 11) % 12 in pcs) or rb == (tonic + 5) % 12


def phrase_endings(ch: Chorale) -> list[tuple[int, bool]]:
    """[(first step of each run of soprano fermata steps, whether it is a V-I or IV-I cadence in the
    phrase's key)] of one chorale."""
    f = np.asarray(ch.fermata, dtype=bool)
    if not f.any():
        return []
    starts = np.flatnonzero(f & ~np.concatenate([[False], f[:-1]]))
    ends = np.flatnonzero(f & ~np.concatenate([f[1:], [False]]))  # last step of each fermata run
    w = _pc_weights(ch.grid)
    out = []
    for i, s in enumerate(starts):
        phrase_key = key_of(w[(ends[i - 1] + 1 if i else 0) : ends[i] + 1].sum(0))
        end, before = ch.grid[s], ch.grid[s - 4] if s >= 4 else None
        hit = False
        if before is not None and phrase_key is not None and not np.isnan(end).any() and not np.isnan(before).any():
            end_p = tuple(int(p) for p in end)
            r = _root(end_p)
            if end_p[3] % 12 == r and r == phrase_key[0]:  # the phrase's tonic chord, in root position
                hit = cadential_approach(tuple(int(p) for p in before), r)
        out.append((int(s), bool(hit)))
    return out


def cadences(ch: Chorale) -> tuple[int, int]:
    """(phrase endings at fermatas, of which V-I or IV-I cadences in the phrase's key) of one chorale."""
    ends = phrase_endings(ch)
    return len(ends), sum(hit for _, hit in ends)


# ----------------------------------------------------------------------------- per piece and pooled
def chorale_counts(ch: Chorale) -> dict[str, float]:
    """Additive counts of one chorale (pooled by :func:`chorale_metrics`)."""
    grid = ch.grid
    sounding = (~np.isnan(grid)).sum(1)
    notes = [n for v in range(grid.shape[1]) for n in voice_notes(grid[:, v])]
    steps, chords = sonorities(grid)
    vl, p5, p8 = parallels(chords)
    gkey, keys = bar_keys(ch)
    endings, hits = cadences(ch)
    return {
        "pieces": 1,
        "steps": len(grid),
        "sounding_steps": int((sounding > 0).sum()),
        "sounding_sum": int(sounding.sum()),
        "notes": len(notes),
        "sonorities": len(chords),
        "crossings": int(crossings(chords).sum()) if len(chords) else 0,
        "vl_steps": vl,
        "par5": p5,
        "par8": p8,
        "bars": len(keys),
        "bars_in_key": sum(k == gkey for k in keys),
        "fermata_pieces": int(np.asarray(ch.fermata).any()),
        "endings": endings,
        "cadences": hits,
        "range": float(np.nanmax(grid) - np.nanmin(grid)) if (~np.isnan(grid)).any() else 0.0,
    }


def _pc_hist(chorales: Iterable[Chorale]) -> np.ndarray:
    h = np.zeros(12)
    for ch in chorales:
        for v in range(ch.grid.shape[1]):
            for _, _, p in voice_notes(ch.grid[:, v]):
                h[p % 12] += 1
    return h / max(h.sum(), 1.0)


def _ratio(a: float, b: float, scale: float = 1.0) -> float:
    return scale * a / b if b else float("nan")


def chorale_metrics(chorales: Sequence[Chorale]) -> dict[str, float]:
    """Pooled chorale statistics of a set of pieces (rates over all pieces' events together)."""
    tot: dict[str, float] = {}
    for ch in chorales:
        for k, v in chorale_counts(ch).items():
            tot[k] = tot.get(k, 0) + v
    if not tot:
        return {k: float("nan") for k in (*CHORALE_RATES, "pitch_range")}
    return {
        "polyphony": _ratio(tot["sounding_sum"], tot["sounding_steps"]),
        "note_density": _ratio(tot["notes"], tot["steps"] / 4),
        "key_stability": _ratio(tot["bars_in_key"], tot["bars"]),
        "voice_crossing_per_100": _ratio(tot["crossings"], tot["sonorities"], 100),
        "parallel_fifths_per_100": _ratio(tot["par5"], tot["vl_steps"], 100),
        "parallel_octaves_per_100": _ratio(tot["par8"], tot["vl_steps"], 100),
        "cadence_share": _ratio(tot["cadences"], tot["endings"]),
        "pitch_range": tot["range"] / tot["pieces"],
        "pieces": tot["pieces"],
        "fermata_pieces": tot["fermata_pieces"],
        "phrase_endings": tot["endings"],
    }


def compare_chorales(samples: Sequence[Chorale], reference: Sequence[Chorale]) -> dict[str, float]:
    """``sample_<stat>`` / ``ref_<stat>`` for every statistic, ``<rate>_rel_err`` (|sample / ref - 1|)
    for each rate, and ``pitch_class_hist_l1`` between the two sets."""
    s, r = chorale_metrics(samples), chorale_metrics(reference)
    out = {"pitch_class_hist_l1": float(np.abs(_pc_hist(samples) - _pc_hist(reference)).sum())}
    for k in s:
        out[f"sample_{k}"], out[f"ref_{k}"] = s[k], r[k]
    for k in CHORALE_RATES:
        out[f"{k}_rel_err"] = abs(s[k] / r[k] - 1) if r[k] and np.isfinite(s[k]) and np.isfinite(r[k]) else float("nan")
    return out
