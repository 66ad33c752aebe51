"""Measured comparison of expression tokenizations on the her2st leave-one-section-out folds.

For every fold, each tokenizer is fitted on the training spots and applied to the held-out
section; we report what the tokenization alone can represent (its ceiling): mean Pearson r
per gene between measured and round-tripped held-out expression, RMS error in log1p units,
tokens per spot, the sequence length for a 7-spot neighbourhood, and the measured time of one
training step of the tiny transformer at that length (batch 32, one thread).

    OMP_NUM_THREADS=1 python scripts/spatial_tokenizers.py
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from armodal.models import build_transformer
from armodal.modalities.spatial import (
    BinnedExpressionTokenizer,
    RVQExpressionTokenizer,
    apply_panel,
    load_panel,
    normalize_log1p,
    pearson_per_gene,
    read_her2st,
)
from armodal.utils.config import load_paths

PATHS = load_paths()  # conf/paths (ARMODAL_SHARED_DATA / ARMODAL_RUNS apply)


def step_time(vocab: int, num_types: int, seq: int, prefix: int, reps: int = 3) -> float:
    net = build_transformer(vocab_size=vocab, num_types=num_types, max_seq_len=seq + prefix, d_model=128, n_layer=4, n_head=4)
    ids = torch.randint(1, vocab, (32, seq))
    types = torch.arange(seq).clamp(max=num_types - 1).expand(32, seq)
    pre = torch.randn(32, prefix, 128)
    net(ids, prefix=pre, types=types).sum().backward()
    t0 = time.time()
    for _ in range(reps):
        net(ids, prefix=pre, types=types).sum().backward()
    return (time.time() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(PATHS["data_dir"] / "her2st"))
    ap.add_argument("--sections", nargs="+", default=["C2", "C3", "C4", "C5"])
    ap.add_argument("--out", default=str(PATHS["runs_dir"] / "spatial_tokenizers.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        secs = {s: normalize_log1p(read_her2st(args.root, s)) for s in args.sections}
    secs, genes = apply_panel(secs, load_panel(Path(args.root) / "her_hvg_cut_1000.npy"))
    x = {s: np.asarray(a.X.todense(), np.float32) for s, a in secs.items()}
    schemes = {f"rvq Q={q} K=32": dict(kind="rvq", q=q, pca=0) for q in (1, 4, 8)}
    schemes.update({f"rvq on PCA-{d} Q={q} K=32": dict(kind="rvq", q=q, pca=d) for d, q in ((16, 4), (32, 4), (32, 8))})
    schemes["binned 8 bins/gene"] = dict(kind="binned")
    res: dict = {k: {"pcc": [], "rms": []} for k in schemes}
    for held in args.sections:
        xtr = np.concatenate([x[s] for s in args.sections if s != held])
        for name, sc in schemes.items():
            tok = (RVQExpressionTokenizer.fit(xtr, genes, n_levels=sc["q"], codebook_size=32, n_slots=7, pca_dim=sc["pca"])
                   if sc["kind"] == "rvq" else BinnedExpressionTokenizer.fit(xtr, genes, n_bins=8))
            rec = tok.decode(tok.encode(x[held]))
            res[name]["pcc"].append(float(np.nanmean(pearson_per_gene(rec, x[held]))))
            res[name]["rms"].append(float(np.sqrt(((rec - x[held]) ** 2).mean())))
            res[name]["tokens_per_spot"] = tok.tokens_per_spot
            res[name]["vocab"] = tok.vocab_size
        print(held, {k: round(v["pcc"][-1], 3) for k, v in res.items()}, flush=True)
    for name, sc in schemes.items():
        n_spots = 7 if sc["kind"] == "rvq" else 1
        seq = n_spots * res[name]["tokens_per_spot"]
        res[name]["neighbourhood_spots"] = n_spots
        res[name]["seq_len"] = seq + n_spots
        res[name]["train_step_s"] = round(step_time(res[name]["vocab"], seq if sc["kind"] == "rvq" else len(genes), seq, n_spots), 3)
    lines = ["| tokenization | tokens/spot | spots per sequence | sequence length | held-out ceiling PCC (per fold C2..C5) | mean | RMS log1p | train step (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['tokens_per_spot']} | {r['neighbourhood_spots']} | {r['seq_len']} | "
                     f"{' / '.join(f'{v:.3f}' for v in r['pcc'])} | {np.mean(r['pcc']):.3f} | {np.mean(r['rms']):.3f} | {r['train_step_s']} |")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
