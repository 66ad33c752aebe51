"""Reading MIDI files defensively: every failure becomes a :class:`BadMidiError` naming
the file and the reason (corrupt or truncated, empty, drum-only, too large)."""

from __future__ import annotations

from pathlib import Path

from symusic import Score

__all__ = ["BadMidiError", "read_midi", "MIDI_SUFFIXES", "DEFAULT_MAX_BYTES"]

MIDI_SUFFIXES = (".mid", ".midi")
DEFAULT_MAX_BYTES = 4 * 1024 * 1024  # a 4 MB MIDI is far beyond any chorale or piano piece


class BadMidiError(ValueError):
    """A MIDI file that cannot be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def read_midi(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, max_notes: int = 200_000) -> Score:
    """Load a MIDI file with symusic and check it holds pitched notes.

    Raises :class:`BadMidiError` for a missing, huge (over ``max_bytes`` bytes, or ``max_notes``
    notes or more), corrupt/truncated, empty or drum-only file.
    """
    path = Path(path)
    if not path.is_file():
        raise BadMidiError(path, "file not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise BadMidiError(path, f"file too large ({size:,} bytes > max_bytes={max_bytes:,})")
    if size == 0:
        raise BadMidiError(path, "empty file (0 bytes)")
    try:
        score = Score(str(path))
    except Exception as e:  # noqa: BLE001 - symusic raises plain RuntimeError/ValueError on bad bytes
        raise BadMidiError(path, f"corrupt or truncated MIDI ({str(e).strip() or type(e).__name__})") from None
    n_pitched = sum(len(t.notes) for t in score.tracks if not t.is_drum)
    n_drums = sum(len(t.notes) for t in score.tracks if t.is_drum)
    if n_pitched == 0 and n_drums > 0:
        raise BadMidiError(path, f"drum-only MIDI ({n_drums} drum notes, no pitched notes)")
    if n_pitched == 0:
        raise BadMidiError(path, "empty MIDI (no notes)")
    if n_pitched + n_drums >= max_notes:  # the limit itself is already too many (a reader may cap there)
        raise BadMidiError(path, f"too many notes ({n_pitched + n_drums:,} >= max_notes={max_notes:,})")
    return score
