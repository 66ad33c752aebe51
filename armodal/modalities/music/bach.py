"""The Bach chorales of music21's built-in corpus, converted once into a MIDI folder."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

__all__ = ["convert_bach_chorales", "SCORE_SUFFIXES"]

SCORE_SUFFIXES = {".mxl", ".xml", ".musicxml", ".krn"}  # scores; the .rntxt files are harmonic analyses


def convert_bach_chorales(out_dir: str | Path, limit: int | None = None, verbose: bool = True) -> tuple[int, list[str]]:
    """Write every Bach chorale of music21's corpus as ``<corpus name>.mid`` (one track per part).

    Existing files are kept (the conversion resumes; each file is written atomically).  Returns (files present,
    skipped "path: reason" lines); pieces music21 cannot parse or write, or with
    fewer than 2 parts, are skipped and listed.
    """
    from music21 import corpus

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = sorted({str(p) for p in corpus.getComposer("bach") if Path(str(p)).suffix in SCORE_SUFFIXES})
    if limit is not None:
        paths = paths[:limit]
    written, failed, seen = 0, [], set()
    for p in paths:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(p).stem)
        if name in seen:
            continue
        seen.add(name)
        target = out_dir / f"{name}.mid"
        if target.is_file():
            written += 1
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                score = corpus.parse(p)
                if len(score.parts) < 2:  # not a chorale setting (a single line)
                    failed.append(f"{p}: {len(score.parts)} part(s)")
                    continue
                tmp = target.with_name(f".{target.name}.tmp")  # a killed write never leaves a half file
                score.write("midi", fp=str(tmp))
                tmp.replace(target)
            written += 1
        except Exception as e:  # noqa: BLE001 - report and keep going
            failed.append(f"{p}: {type(e).__name__}: {e}")
        if verbose and written % 50 == 0:
            print(f"[music] bach chorales: {written} written", flush=True)
    if verbose:
        print(f"[music] {written} Bach chorales in {out_dir}; {len(failed)} skipped")
    return written, failed
