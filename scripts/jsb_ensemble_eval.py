"""JSB note-wise NLL of one checkpoint, alone and as a transposition ensemble (see
armodal/modalities/music/jsb_ensemble.py), on valid and test; prints JSON and writes it next to the run.

    python scripts/jsb_ensemble_eval.py runs/music_jsb/<time>/checkpoints/best.ckpt --shifts -2 -1 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

import armodal
from armodal.modalities.music.tokenizer import JSBTokenizer
from armodal.modalities.music.jsb_ensemble import transposition_ensemble_nll


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="a music_jsb checkpoint written by armodal-train")
    ap.add_argument("--shifts", type=int, nargs="+", default=[-2, -1, 0, 1, 2], help="semitone shifts (with 0)")
    ap.add_argument("--splits", nargs="+", default=["valid", "test"])
    ap.add_argument("--raw", action="store_true", help="raw weights instead of the EMA weights")
    ap.add_argument("--data-path", default=None, help="override the npz path saved in the checkpoint")
    ap.add_argument("--out", default=None, help="JSON path (default: <run>/eval_transpose_ensemble.json)")
    args = ap.parse_args(argv)

    ckpt = Path(args.ckpt)
    model = armodal.load(ckpt, use_ema=not args.raw, expect_modality="music")
    if not isinstance(model.tokenizer, JSBTokenizer):
        sys.exit(f"{ckpt}: not a JSB checkpoint (tokenizer {type(model.tokenizer).__name__}); "
                 "the transposition ensemble scores the JSB voice-step grid only")
    data_cfg = model.config.modality.data
    if args.data_path:
        data_cfg.path = args.data_path
    dm = instantiate(data_cfg)
    dm.setup("fit")
    net = model.net.eval()
    result: dict = {"ckpt": str(ckpt), "ema": not args.raw, "shifts": args.shifts}
    for split in args.splits:
        t0 = time.time()
        r = transposition_ensemble_nll(net, model.tokenizer, dm.eval_dataset(split), args.shifts)
        r["seconds"] = round(time.time() - t0, 1)
        result[split] = r
        print(f"[jsb-ensemble] {split}: single {r['nll_single']:.4f}  ensemble {r['nll']:.4f} nats/token "
              f"({r['tokens']} tokens, {r['seconds']} s)", file=sys.stderr)
    out = Path(args.out) if args.out else ckpt.parent.parent / "eval_transpose_ensemble.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
