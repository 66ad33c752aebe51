"""Train (once) and cache the Fashion-MNIST evaluation classifier used by ``armodal-eval``.

    python scripts/image_train_classifier.py [--root /usr/share/datasets/fashion-mnist] [--epochs 4]

``armodal-eval`` trains it on first use anyway; this script only does it ahead of time and
prints its test accuracy.  The cache key covers the data, epochs and seed, so the evaluator
picks up exactly this model (``<cache_dir>/image_eval/classifier_<key>.safetensors``).
"""

from __future__ import annotations

import argparse
import json

import torch

from armodal.modalities.image.data import ImageDataModule, ImageSet
from armodal.modalities.image.evaluate import get_classifier
from armodal.utils.config import load_paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--cache-dir", default=str(load_paths()["cache_dir"]))  # conf/paths (ARMODAL_CACHE applies)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dm = ImageDataModule(source="fashion_mnist", root=args.root, cache_dir=args.cache_dir)
    dm.prepare_data()
    dm.setup()
    s = dm.splits  # same construction as ImageEvaluator: train + val = the 60k training images
    train = ImageSet(torch.cat([s["train"].images, s["val"].images]), torch.cat([s["train"].labels, s["val"].labels]),
                     s["train"].class_names)
    _, info = get_classifier(train, s["test"], args.cache_dir, epochs=args.epochs, seed=args.seed)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
