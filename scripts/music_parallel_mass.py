"""Teacher-forced voice-leading diagnostic of a chorale checkpoint: on Bach's own chorales, how much probability
does the model put on the pitches that would make a parallel fifth / octave with a voice above (or cross the
voice just above), where Bach wrote something else?  Sampling turns that mass into the parallels and crossings
``armodal-eval`` counts, plus what the model's own drifting contexts add.

    python scripts/music_parallel_mass.py runs/music_chorales/<time>/checkpoints/best.ckpt [--split valid] [--steps 128]

Prints JSON: per voice (alto, tenor, bass) and rule, the mean avoid-set mass over the voice-step tokens that
have a non-empty set, the share of tokens where the model's argmax is in the set, and the token counts.
"""

from __future__ import annotations

import argparse
import json

import torch

from armodal.api import load
from armodal.modalities.music.avoid import AVOID_RULES, avoid_sets
from armodal.modalities.music.chorales import load_chorales


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--data", default="datasets/bach_chorales/chorales.npz")
    ap.add_argument("--split", default="valid", choices=("train", "valid", "test"))
    ap.add_argument("--steps", type=int, default=128, help="first N steps of each chorale (the model's window)")
    args = ap.parse_args()
    model = load(args.ckpt)
    tok, net = model.tokenizer, model.net.eval()
    pieces = [c for c in load_chorales(args.data) if c.split == args.split]
    out: dict = {"ckpt": args.ckpt, "split": args.split, "pieces": len(pieces)}
    acc = {r: torch.zeros(3, 3, dtype=torch.float64) for r in AVOID_RULES}  # [voice A/T/B, (mass, argmax, n)]
    for ch in pieces:
        ids = tok.encode(ch[: args.steps], eos=False)[None]
        with torch.no_grad():
            p = net(ids, types=tok.types(ids))[0, :-1].float().softmax(-1)  # predicts ids[1:]
        start = int(tok.body_start(ids)[0])
        voice = (torch.arange(1, ids.shape[1]) - start) % 4
        top = p.argmax(-1)
        for r in AVOID_RULES:
            av = avoid_sets(tok, ids, (r,))[0, 1:]  # [T-1, V] aligned with p
            has = av.any(-1)
            for v in (1, 2, 3):
                sel = has & (voice == v)
                acc[r][v - 1, 0] += (p[sel] * av[sel]).sum().item()
                acc[r][v - 1, 1] += av[sel].gather(-1, top[sel][:, None]).sum().item()
                acc[r][v - 1, 2] += sel.sum().item()
    for r in AVOID_RULES:
        for v, name in enumerate(("alto", "tenor", "bass")):
            n = max(acc[r][v, 2].item(), 1.0)
            out[f"{r}/{name}"] = {"mass": round(acc[r][v, 0].item() / n, 4), "argmax_in_set": round(acc[r][v, 1].item() / n, 4),
                                  "tokens": int(acc[r][v, 2].item())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
