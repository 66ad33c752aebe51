"""Turn a :class:`symusic.Score` into files a person can look at and listen to.

* :func:`write_midi` - the ``.mid`` file;
* :func:`piano_roll_png` - a piano roll (one colour per track), matplotlib;
* :func:`render_wav` - audio through the ``fluidsynth`` command and a General MIDI
  SoundFont (Debian packages ``fluidsynth`` and ``fluid-soundfont-gm``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from symusic import Score

__all__ = ["write_midi", "piano_roll_png", "render_wav", "find_soundfont", "AUDIO_HINT", "SOUNDFONTS"]

SOUNDFONTS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/soundfonts/default.sf2",
)
AUDIO_HINT = (
    "no audio rendered: install `fluidsynth` and `fluid-soundfont-gm` (apt-get install fluidsynth "
    "fluid-soundfont-gm) to get a .wav next to every .mid"
)
_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def write_midi(score: Score, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    score.dump_midi(str(path))
    return path


def piano_roll_png(score: Score, path: str | Path, title: str = "", labels: list[str] | None = None,
                   marks: list[tuple[float, str]] | None = None) -> Path:
    """Piano roll: x in quarter notes, y in MIDI pitch, one colour per track; ``marks`` [(quarter, text)]
    are written above the notes (the chorale sampler marks its fermatas, "cad." where one closes a cadence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tpq = max(1, score.ticks_per_quarter)
    end = max(1, score.end()) / tpq
    fig, ax = plt.subplots(figsize=(min(24, max(8, end / 4)) + 1.5, 4.5), dpi=100)
    pitches = []
    for i, track in enumerate(score.tracks):
        notes = track.notes.numpy()
        if len(notes["time"]) == 0:
            continue
        colour = _COLOURS[i % len(_COLOURS)]
        label = labels[i] if labels and i < len(labels) else (track.name or f"track {i}")
        bars = [(t / tpq, max(d, 1) / tpq) for t, d in zip(notes["time"], notes["duration"])]
        for (x, w), p in zip(bars, notes["pitch"]):
            ax.add_patch(plt.Rectangle((x, p - 0.4), w, 0.8, color=colour, alpha=0.85, lw=0))
        ax.plot([], [], color=colour, lw=6, label=label)
        pitches.extend(notes["pitch"].tolist())
    if pitches:
        ax.set_ylim(min(pitches) - 2, max(pitches) + 2 + (4 if marks else 0))
        for x, text in marks or ():
            ax.text(x, max(pitches) + 3, text, fontsize=7, ha="left", va="bottom", color="0.2")
    ax.set_xlim(0, end)
    for q in np.arange(0, end + 1e-9, 4):  # a faint line every 4 quarters (a 4/4 bar)
        ax.axvline(q, color="0.85", lw=0.6, zorder=0)
    ax.set_xlabel("time (quarter notes)")
    ax.set_ylabel("MIDI pitch")
    if title:
        ax.set_title(title, fontsize=10)
    if pitches:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def find_soundfont() -> str | None:
    for sf in SOUNDFONTS:
        if Path(sf).is_file():
            return sf
    return None


def render_wav(midi_path: str | Path, wav_path: str | Path, sample_rate: int = 22050) -> Path | None:
    """Render a .mid with fluidsynth; None when fluidsynth or a GM SoundFont is missing."""
    exe, sf = shutil.which("fluidsynth"), find_soundfont()
    if exe is None or sf is None:
        return None
    wav_path = Path(wav_path)
    cmd = [exe, "-ni", "-q", "-g", "0.8", "-r", str(sample_rate), "-F", str(wav_path), sf, str(midi_path)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"fluidsynth failed on {midi_path}: {getattr(e, 'stderr', b'').decode(errors='replace')[-300:]}") from None
    return wav_path if wav_path.is_file() else None
