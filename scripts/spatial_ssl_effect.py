"""Effect of the self-supervised (SimCLR) stage on the H&E features, measured by the ST-Net-style
ridge probe on the same leave-one-section-out folds: random-init resnet18 vs SimCLR-trained.

Reads the features cached by scripts/spatial_features.py / the datamodule (no recomputation).

    OMP_NUM_THREADS=1 python scripts/spatial_ssl_effect.py --folds C2 C3 C4
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from armodal.modalities.spatial import (
    FeatureConfig, FeatureExtractor, apply_panel, load_panel, normalize_log1p, pearson_per_gene, read_her2st, ridge_baseline,
)
from armodal.utils.config import load_paths

PATHS = load_paths()  # conf/paths (ARMODAL_SHARED_DATA / ARMODAL_CACHE / ARMODAL_RUNS apply)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(PATHS["data_dir"] / "her2st"))
    ap.add_argument("--sections", nargs="+", default=["C2", "C3", "C4", "C5"])
    ap.add_argument("--folds", nargs="+", default=["C2", "C3", "C4", "C5"])
    ap.add_argument("--cache-dir", default=str(PATHS["cache_dir"]))
    args = ap.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        secs = {s: normalize_log1p(read_her2st(args.root, s)) for s in args.sections}
    secs, genes = apply_panel(secs, load_panel(Path(args.root) / "her_hvg_cut_1000.npy"))
    y = {s: np.asarray(a.X.todense(), np.float32) for s, a in secs.items()}

    def no_patches():
        raise RuntimeError("features are not cached for this configuration; run scripts/spatial_features.py first")

    res = {}
    for held in args.folds:
        train = [s for s in args.sections if s != held]
        for w in ("random", "ssl"):
            fx = FeatureExtractor(FeatureConfig(weights=w), args.cache_dir, train_patches=no_patches, train_sections=train)
            f = {s: fx.features(s, no_patches, list(secs[s].obs_names)).numpy() for s in args.sections}
            xs = np.concatenate([f[s].reshape(-1, f[s].shape[-1]) for s in train])
            ys = np.concatenate([np.tile(y[s], (f[s].shape[0], 1)) for s in train])
            gs = np.concatenate([np.full(f[s].shape[0] * f[s].shape[1], s) for s in train])
            pred, info = ridge_baseline(xs, ys, gs, f[held][0])
            r = float(np.nanmean(pearson_per_gene(pred, y[held])))
            res.setdefault(held, {})[w] = {"ridge_pcc_mean": r, "alpha": info["alpha"], "ssl_loss": fx.info.get("ssl_loss", [None])[-1:]}
            print(held, w, round(r, 4), info["alpha"], flush=True)
    print("| held-out | ridge PCC, random-init resnet18 | ridge PCC, SimCLR resnet18 |\n|---|---|---|")
    for held, d in res.items():
        print(f"| {held} | {d['random']['ridge_pcc_mean']:.3f} | {d['ssl']['ridge_pcc_mean']:.3f} |")
    PATHS["runs_dir"].mkdir(parents=True, exist_ok=True)
    (PATHS["runs_dir"] / "spatial_ssl_effect.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
