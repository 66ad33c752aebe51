"""Precompute (and cache) H&E patch features for every leave-one-section-out fold.

Each fold's self-supervised backbone sees only that fold's training sections.  The
datamodule later finds the same cache (same FeatureConfig key), so training does not
redo this work.

    OMP_NUM_THREADS=1 python scripts/spatial_features.py --root ../shared/data/her2st \
        --sections C2 C3 C4 C5 --weights ssl random
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from armodal.modalities.spatial.features import FeatureConfig, FeatureExtractor
from armodal.modalities.spatial.io import read_section
from armodal.modalities.spatial.patches import extract_patches
from armodal.utils.config import load_paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    paths = load_paths()  # conf/paths (ARMODAL_SHARED_DATA / ARMODAL_CACHE apply)
    ap.add_argument("--root", default=str(paths["data_dir"] / "her2st"))
    ap.add_argument("--layout", default="her2st")
    ap.add_argument("--sections", nargs="+", default=["C2", "C3", "C4", "C5"])
    ap.add_argument("--weights", nargs="+", default=["ssl"])
    ap.add_argument("--cache-dir", default=str(paths["cache_dir"]))
    ap.add_argument("--ssl-epochs", type=int, default=FeatureConfig.ssl_epochs)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    secs = {s: read_section(args.layout, root=args.root, section=s) for s in args.sections}
    cfg0 = FeatureConfig(ssl_epochs=args.ssl_epochs)
    patches = {s: extract_patches(a, size=cfg0.patch_size, unit=cfg0.patch_unit, out_px=cfg0.patch_px, outside=cfg0.outside)[0] for s, a in secs.items()}
    for w in args.weights:
        cfg = FeatureConfig(weights=w, ssl_epochs=args.ssl_epochs)
        folds = args.sections if w == "ssl" else [None]
        for held in folds:
            train = [s for s in args.sections if s != held]
            t0 = time.time()
            import numpy as np
            fx = FeatureExtractor(cfg, args.cache_dir, train_patches=np.concatenate([patches[s] for s in train]) if w == "ssl" else None, train_sections=train)
            for s in args.sections:
                fx.features(s, patches[s], list(secs[s].obs_names))
            print(f"weights={w} held_out={held} key={fx.key} done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
