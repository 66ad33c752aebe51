"""Convert the Bach chorales of music21's built-in corpus for armodal.

    python datasets/bach_chorales/convert.py [OUT_DIR]        MIDI files (default: datasets/bach_chorales/midi)
    python datasets/bach_chorales/convert.py --grid [OUT.npz] [--jsb Jsb16thSeparated.npz]
        the four-part chorales as 16th-note grids with fermatas, keys and meters
        (default: datasets/bach_chorales/chorales.npz; splits from the JSB file,
        default ../shared/data/jsb_chorales/Jsb16thSeparated.npz next to the repository)

The MIDI conversion resumes (files already written are kept).  Unparseable pieces are listed and counted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from armodal.modalities.music.bach import convert_bach_chorales
from armodal.modalities.music.chorales import convert_corpus_chorales

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=None)
    ap.add_argument("--grid", action="store_true", help="write the chorale grid .npz instead of MIDI files")
    ap.add_argument("--jsb", default=str(HERE.parents[1].parent / "shared" / "data" / "jsb_chorales" / "Jsb16thSeparated.npz"))
    args = ap.parse_args()
    if args.grid:
        jsb = Path(args.jsb)
        if not jsb.is_file():
            raise SystemExit(f"{jsb}: JSB file not found; the splits follow it (pass --jsb PATH)")
        _, failed = convert_corpus_chorales(args.out or HERE / "chorales.npz", jsb_path=jsb)
    else:
        _, failed = convert_bach_chorales(Path(args.out) if args.out else HERE / "midi")
    for f in failed:
        print(f"skipped {f}")
