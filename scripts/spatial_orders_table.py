"""One nested-LOSO table with a column per model, from finished ``scripts/spatial_loso.py`` tables (``loso.json`` of
an invocation or of a ``--combine``): each fold's AR PCC (mean ± sd over its seeds) per model, the ridge baseline,
the best AR / ridge, and per model the stain drop at medium, Moran's I ratio and the 90 % coverage.  The mean row is
the mean over the folds of each fold's mean (folds may have other seed counts).  Every model must cover the same folds.

    python scripts/spatial_orders_table.py "per-spot=runs/spatial_loso/seeds/combined_spot_raster:spot" \\
        "raster slot=runs/spatial_loso/spotkey/combined:raster_key" "Hilbert slot=runs/spatial_loso/hilbertkey/combined:hilbert_key"
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("spatial_loso", Path(__file__).with_name("spatial_loso.py"))
loso = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loso)


def load(columns: list[str]) -> dict[str, dict]:
    """``NAME=FOLDER:VARIANT`` -> {name: {fold: [metrics of each seed]}}."""
    out = {}
    for c in columns:
        name, _, src = c.partition("=")
        folder, _, variant = src.rpartition(":")
        if not (name and folder and variant):
            sys.exit(f"{c!r}: expected NAME=FOLDER:VARIANT")
        res = json.loads((Path(folder) / "loso.json").read_text())
        try:
            out[name] = {f: r[variant]["runs"] for f, r in res["folds"].items()}
        except KeyError:
            sys.exit(f"{folder}/loso.json has no variant {variant!r} on every fold")
    folds = [sorted(v) for v in out.values()]
    if any(f != folds[0] for f in folds):
        sys.exit(f"the models cover other folds: {dict(zip(out, folds))}")
    return out


def render(cols: dict[str, dict]) -> str:
    names = list(cols)
    folds = sorted(next(iter(cols.values())))
    per = lambda n, f, k: [loso._get(m, k) for m in cols[n][f]]  # noqa: E731
    mean = lambda vals: statistics.fmean(vals)  # noqa: E731
    lines = ["| held-out | " + " | ".join(f"{n} AR PCC" for n in names) + " | ridge PCC | best AR / ridge | stain drop at medium ("
             + " / ".join(names) + ") | Moran's I ratio (" + " / ".join(names) + " / ridge) | coverage 90 % (" + " / ".join(names) + ") |",
             "|" + "---|" * (len(names) + 6)]
    acc: dict[str, list] = {}
    for f in folds:
        ridge = per(names[0], f, "ridge_pcc_mean")
        best = max(mean(per(n, f, "ar_pcc_mean")) for n in names) / mean(ridge)
        cells = {"pcc": [loso._ms(per(n, f, "ar_pcc_mean")) for n in names],
                 "drop": " / ".join(loso._ms(per(n, f, "ar_stain_drop_medium")) for n in names),
                 "moran": " / ".join(loso._ms(per(n, f, "ar_moran_ratio"), 2) for n in names) + " / " + loso._ms(per(names[0], f, "ridge_moran_ratio"), 2),
                 "cov": " / ".join(loso._ms(per(n, f, "ar_coverage90")) for n in names)}
        lines.append(f"| {f} | " + " | ".join(cells["pcc"]) + f" | {loso._ms(ridge)} | {best:.2f} | {cells['drop']} | {cells['moran']} | {cells['cov']} |")
        for n in names:
            for k in ("ar_pcc_mean", "ar_stain_drop_medium", "ar_moran_ratio", "ar_coverage90"):
                acc.setdefault((n, k), []).append(mean(per(n, f, k)))
        acc.setdefault(("ridge", "pcc"), []).append(mean(ridge))
        acc.setdefault(("ridge", "moran"), []).append(mean(per(names[0], f, "ridge_moran_ratio")))
        acc.setdefault(("best", ""), []).append(best)
    m = {k: mean(v) for k, v in acc.items()}
    lines.append("| **mean** | " + " | ".join(f"**{m[n, 'ar_pcc_mean']:.3f}**" for n in names) + f" | {m['ridge', 'pcc']:.3f} | {m['best', '']:.2f} | "
                 + " / ".join(f"{m[n, 'ar_stain_drop_medium']:.3f}" for n in names) + " | "
                 + " / ".join(f"{m[n, 'ar_moran_ratio']:.2f}" for n in names) + f" / {m['ridge', 'moran']:.2f} | "
                 + " / ".join(f"{m[n, 'ar_coverage90']:.3f}" for n in names) + " |")
    seeds = "; ".join(f"{n}: " + ", ".join(f"{f} {len(cols[n][f])}" for f in folds) for n in names)
    return "\n".join(lines) + f"\n\nSeeds per fold — {seeds}.  Mean row: the mean over the folds of each fold's mean.\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("columns", nargs="+", help="NAME=FOLDER:VARIANT (FOLDER holds loso.json)")
    print(render(load(ap.parse_args().columns)))


if __name__ == "__main__":
    main()
