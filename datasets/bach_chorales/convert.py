"""Convert the Bach chorales of music21's built-in corpus into a folder of MIDI files.

    python datasets/bach_chorales/convert.py [OUT_DIR]   (default: datasets/bach_chorales/midi)

Resumes: files already written are kept.  Unparseable pieces are listed and counted.
"""

from __future__ import annotations

import sys
from pathlib import Path

from armodal.modalities.music.bach import convert_bach_chorales

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "midi"
    n, failed = convert_bach_chorales(out)
    for f in failed:
        print(f"skipped {f}")

