"""Leave-one-section-out on her2st: armodal-train then armodal-eval per held-out section.

Every fold's eval holds the AR model's metrics and, on the same folds and features, the
ST-Net-style ridge baseline; the table printed at the end (and written to
``<out>/loso.md`` / ``loso.json``) is what results/spatial.md records.

    OMP_NUM_THREADS=1 python scripts/spatial_loso.py --tag ssl
    OMP_NUM_THREADS=1 python scripts/spatial_loso.py --tag random -- modality.data.features.weights=random
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from armodal.utils.config import load_paths

ROOT = Path(__file__).resolve().parents[1]
HISTOGENE = {"C2": 0.086, "C3": 0.072, "C4": 0.052, "C5": 0.045}


def run(cmd: list[str], log: Path) -> None:
    print("$", shlex.join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode:
        sys.exit(f"command failed ({r.returncode}); see {log}")


def table(rows: list[dict]) -> str:
    head = ("| held-out | features | AR mean PCC | AR median | AR top-50 HVG | ridge mean PCC | ridge median | ridge top-50 HVG "
            "| HisToGene | 90% interval coverage | 50% coverage |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for m in rows:
        lines.append(
            f"| {m['test_section']} | {m['features']['backbone']} {m['features']['weights']} | {m['ar_pcc_mean']:.3f} | {m['ar_pcc_median']:.3f} | {m['ar_pcc_mean_hvg50']:.3f} "
            f"| {m['ridge_pcc_mean']:.3f} | {m['ridge_pcc_median']:.3f} | {m['ridge_pcc_mean_hvg50']:.3f} "
            f"| {HISTOGENE.get(m['test_section'], float('nan')):.3f} | {m['ar_coverage90']:.3f} | {m['ar_coverage50']:.3f} |")
    avg = {k: sum(m[k] for m in rows) / len(rows) for k in
           ("ar_pcc_mean", "ar_pcc_median", "ar_pcc_mean_hvg50", "ridge_pcc_mean", "ridge_pcc_median",
            "ridge_pcc_mean_hvg50", "ar_coverage90", "ar_coverage50")}
    hg = sum(HISTOGENE.get(m["test_section"], 0) for m in rows) / len(rows)
    lines.append(f"| **mean** | | **{avg['ar_pcc_mean']:.3f}** | {avg['ar_pcc_median']:.3f} | {avg['ar_pcc_mean_hvg50']:.3f} "
                 f"| {avg['ridge_pcc_mean']:.3f} | {avg['ridge_pcc_median']:.3f} | {avg['ridge_pcc_mean_hvg50']:.3f} "
                 f"| {hg:.3f} | {avg['ar_coverage90']:.3f} | {avg['ar_coverage50']:.3f} |")
    wins_r = sum(m["ar_pcc_mean"] > m["ridge_pcc_mean"] for m in rows)
    wins_h = sum(m["ar_pcc_mean"] > HISTOGENE.get(m["test_section"], 1) for m in rows)
    return head + "\n".join(lines) + f"\n\nAR > ridge on {wins_r}/{len(rows)} folds; AR > HisToGene on {wins_h}/{len(rows)} folds.\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", nargs="+", default=["C2", "C3", "C4", "C5"])
    ap.add_argument("--tag", default="main")
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--skip-train", action="store_true", help="reuse existing checkpoints")
    ap.add_argument("--ckpt", default="last.ckpt", help="checkpoint file name to evaluate (last.ckpt or best.ckpt)")
    ap.add_argument("--collect", action="store_true", help="only gather the folds already evaluated under --tag")
    ap.add_argument("overrides", nargs="*", help="extra armodal-train overrides (after --)")
    args = ap.parse_args()
    out = load_paths()["runs_dir"] / "spatial_loso" / args.tag  # conf/paths (ARMODAL_RUNS applies)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    rows = []
    for fold in [] if args.collect else args.folds:
        t0 = time.time()
        run_dir = out / fold
        if not args.skip_train:
            run(["armodal-train", "experiment=spatial_her2st", f"modality.data.test_section={fold}", f"run_dir={run_dir}",
                 "logger=csv", "callbacks.progress.refresh_rate=0", *args.overrides], log)
        metrics = run_dir / "eval" / "metrics.json"
        run(["armodal-eval", f"ckpt={run_dir / 'checkpoints' / args.ckpt}", f"out={metrics}",
             f"num_samples={args.num_samples}"], log)
        m = json.loads(metrics.read_text())
        m["seconds"] = round(time.time() - t0)
        rows.append(m)
        print(f"{fold}: AR {m['ar_pcc_mean']:.3f} ridge {m['ridge_pcc_mean']:.3f} cov90 {m['ar_coverage90']:.3f} "
              f"({m['seconds']}s)", flush=True)
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/eval/metrics.json"))]  # every fold run under this tag
    (out / "loso.json").write_text(json.dumps(rows, indent=2, default=str))
    md = table(rows)
    (out / "loso.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
