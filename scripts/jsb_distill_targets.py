"""Soft targets for distillation on JSB: a trained model's transposition ensemble (the teacher,
armodal/modalities/music/jsb_ensemble.py), scored on every voice-step token of the *training* pieces with
the same sliding windows as validation (each token once, with >= window - stride steps of context).

    python scripts/jsb_distill_targets.py runs/music_jsb/<teacher>/checkpoints/best.ckpt teacher.npz
    armodal-train experiment=music_jsb modality.data.soft_targets=teacher.npz module.distill_weight=0.5 ...

The file holds ``piece_<i>`` [steps, 4, V] float16 distributions (the teacher's prediction of each token,
in the piece's own key), the ``fingerprint`` of the training pieces they belong to, and the teacher's
NLL on them (``nll_train``, ``nll_train_single``; also written beside it as ``<out>.json``).  Only training pieces are read: validation and test
stay unseen by the student, through the teacher or otherwise.  Written atomically; an existing file is
never replaced unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

import armodal
from armodal.modalities.music.data import grids_fingerprint
from armodal.modalities.music.grid import NUM_VOICES
from armodal.modalities.music.jsb_ensemble import mixture_log_probs, shifted_log_probs
from armodal.modalities.music.tokenizer import JSBTokenizer
from armodal.utils.cache import atomic_write


def soft_targets(net, tok: JSBTokenizer, dataset, grids, shifts) -> tuple[list[np.ndarray], dict]:
    """Per training piece [steps, 4, V] teacher distributions, and the teacher's NLL on those tokens."""
    out = [np.full((len(g), NUM_VOICES, tok.vocab_size), np.nan, dtype=np.float32) for g in grids]
    total = total_single = 0.0
    count = 0
    for k, (ids, skip) in enumerate(dataset.items):
        piece, start = dataset.where[k]
        logp, usable = shifted_log_probs(net, tok, ids, shifts)  # [S, T-1, V]
        mix = mixture_log_probs(logp, usable)  # [T-1, V]: row j predicts token j + 1
        lead = tok.prefix_len(start == 0)
        first = max(skip, lead, 1)  # scored tokens: from skip on, never the BOS / header
        pos = torch.arange(first, len(ids))
        step = start + (pos - lead) // NUM_VOICES
        voice = (pos - lead) % NUM_VOICES
        out[piece][step.numpy(), voice.numpy()] = mix[pos - 1].exp().numpy()
        target = ids[pos]
        total -= float(mix[pos - 1].gather(-1, target[:, None]).sum())
        total_single -= float(logp[shifts.index(0)][pos - 1].gather(-1, target[:, None]).sum())
        count += len(pos)
    missing = [i for i, a in enumerate(out) if np.isnan(a).any()]
    if missing:  # every token must be covered exactly by the eval windows
        raise RuntimeError(f"pieces {missing[:5]} have tokens without a teacher prediction")
    return out, {"nll_train": total / count, "nll_train_single": total_single / count, "tokens": count}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="the teacher: a music_jsb checkpoint written by armodal-train")
    ap.add_argument("out", help="the .npz to write")
    ap.add_argument("--shifts", type=int, nargs="+", default=[-2, -1, 0, 1, 2], help="semitone shifts (with 0)")
    ap.add_argument("--raw", action="store_true", help="raw weights instead of the EMA weights")
    ap.add_argument("--data-path", default=None, help="override the npz path saved in the checkpoint")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = ap.parse_args(argv)

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        sys.exit(f"{out}: exists; pass --overwrite to replace it")
    if 0 not in args.shifts:
        sys.exit(f"--shifts must include 0, got {args.shifts}")
    ckpt = Path(args.ckpt)
    model = armodal.load(ckpt, use_ema=not args.raw, expect_modality="music")
    if type(model.tokenizer) is not JSBTokenizer:
        sys.exit(f"{ckpt}: not a JSB grid checkpoint (tokenizer {type(model.tokenizer).__name__})")
    data_cfg = model.config.modality.data
    if args.data_path:
        data_cfg.path = args.data_path
    data_cfg.soft_targets = None
    dm = instantiate(data_cfg)
    dm.setup("fit")
    grids = dm.pieces("train")
    t0 = time.time()
    with torch.no_grad():
        rows, stats = soft_targets(model.net.eval(), model.tokenizer, dm.eval_dataset("train"), grids, args.shifts)
    stats.update(seconds=round(time.time() - t0, 1), ckpt=str(ckpt), shifts=args.shifts, ema=not args.raw)
    arrays = {f"piece_{i}": a.astype(np.float16) for i, a in enumerate(rows)}
    arrays["fingerprint"] = np.array(grids_fingerprint(grids))
    arrays["meta"] = np.array(json.dumps(stats))
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: savez would append .npz to a path
            np.savez_compressed(f, **arrays)

    atomic_write(out, write)
    atomic_write(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(stats, indent=2)))  # for reproduce.py
    print(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    main()
