"""The JSB 4-voice 16th-note grid: constants and grid <-> MIDI conversion.

A grid is a float array ``[T, 4]``: MIDI pitches of soprano, alto, tenor, bass per
16th-note step, NaN for a rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from symusic import Score

__all__ = ["JSB_LOW", "JSB_HIGH", "NUM_VOICES", "VOICE_NAMES", "grid_to_score", "score_to_grid", "transpose_grid",
           "voice_notes"]

JSB_LOW, JSB_HIGH = 36, 81  # pitch range of the dataset (inclusive)
NUM_VOICES = 4  # soprano, alto, tenor, bass
VOICE_NAMES = ("soprano", "alto", "tenor", "bass")


def voice_notes(col: np.ndarray) -> list[tuple[int, int, int]]:
    """One voice column [T] (pitch or NaN) -> notes (start step, end step, pitch); a held pitch is one note."""
    out, t = [], 0
    while t < len(col):
        if np.isnan(col[t]):
            t += 1
            continue
        start = t
        while t + 1 < len(col) and col[t + 1] == col[start]:
            t += 1
        out.append((start, t + 1, int(col[start])))
        t += 1
    return out


def grid_to_score(grid: np.ndarray, qpm: float = 80.0, tpq: int = 480, velocity: int = 80) -> "Score":
    """Grid [T, 4] -> a 4-track :class:`symusic.Score` (S, A, T, B; repeated pitches are held notes)."""
    from symusic import Note, Score, Tempo, TimeSignature, Track

    step = tpq // 4  # ticks per 16th note
    score = Score(tpq)
    score.tempos.append(Tempo(0, qpm))
    score.time_signatures.append(TimeSignature(0, 4, 4))
    for v, name in enumerate(VOICE_NAMES):
        track = Track(name, 52 if v < 2 else 0, False)  # choir aahs / piano
        for start, end, pitch in voice_notes(grid[:, v] if len(grid) else np.zeros(0)):
            track.notes.append(Note(start * step, (end - start) * step, pitch, velocity))
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


def transpose_grid(grid: np.ndarray, shift: int, low: int = JSB_LOW, high: int = JSB_HIGH) -> np.ndarray | None:
    """Shift every pitch by ``shift`` semitones; None when a note would leave [low, high]."""
    out = grid + shift
    notes = out[~np.isnan(out)]
    if notes.size and (notes.min() < low or notes.max() > high):
        return None
    return out
