"""Accuracy cost of quantised weights on a trained checkpoint: validation NLL and greedy agreement. Prints JSON.

For each ``--modes`` entry (``none`` = the fp32 reference, ``int8``, ``int4``, ``int8_dynamic``
from :mod:`armodal.generation.quantize`, ``bf16`` = the whole net cast to bf16), on the
checkpoint's own validation split (as ``armodal-eval`` builds it):

* ``nll``: token-weighted NLL (nats/token) and its change relative to fp32;
* ``argmax_agreement``: teacher forced, the fraction of target positions whose most likely
  next token equals fp32's;
* ``greedy_match``: free running, prompts = the first ``--prompt`` tokens of ``--prompts``
  validation sequences, ``--new`` greedy tokens each (grammar-constrained as
  ``ARModel.generate`` does it); the fraction of generated tokens equal to fp32's
  (one early difference shifts everything after it, so this is the strict measure);
* ``bytes``: the weights as stored.

    python scripts/quantize_nll.py --ckpt runs/perf_jsb/<time>/checkpoints/best.ckpt --out docs/quantize_nll_jsb.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from hydra.utils import instantiate

from bench_common import emit, load_average  # scripts/ is on sys.path when a script in it runs

from armodal.api import load
from armodal.generation.quantize import quantize_weights, weight_bytes
from armodal.training.loss import to_device, token_logits_and_targets
from armodal.utils.config import register_resolvers


def quantized_copy(net, mode: str):
    net = copy.deepcopy(net)
    if mode == "bf16":
        return net.to(torch.bfloat16)
    quantize_weights(net, mode)
    return net


@torch.no_grad()
def val_pass(net, model, batches) -> tuple[float, float, list[torch.Tensor]]:
    """(sum NLL, target count, per-batch argmax [N_targets]) over the validation batches."""
    total, count, argmaxes = 0.0, 0.0, []
    for batch in batches:
        prefix = None
        if model.conditioner is not None and batch.get("cond") is not None:
            prefix = model.conditioner(batch["cond"])
        ids = batch["ids"]
        logits = net(ids, prefix=prefix, types=batch.get("types")).float()
        p = 0 if prefix is None else prefix.shape[1]
        lg, tgt, mask = token_logits_and_targets(logits, ids, p, batch.get("loss_mask"), model.tokenizer.pad_id)
        nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none")
        m = mask.reshape(-1)
        total += float(nll[m].sum())
        count += float(m.sum())
        argmaxes.append(lg.reshape(-1, lg.shape[-1])[m].argmax(-1))
    return total, count, argmaxes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="an armodal-train checkpoint")
    ap.add_argument("--modes", default="none,int8,int4,int8_dynamic,bf16")
    ap.add_argument("--max-batches", type=int, default=None, help="validation batches (default: all)")
    ap.add_argument("--prompts", type=int, default=8, help="free-running greedy prompts")
    ap.add_argument("--prompt", type=int, default=16, help="prompt length (tokens of a validation sequence)")
    ap.add_argument("--new", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",")]
    if modes[0] != "none":
        modes = ["none"] + [m for m in modes if m != "none"]
    register_resolvers()
    load_start = load_average()
    model = load(args.ckpt, device="cpu")
    dm = instantiate(model.config.modality.data)
    dm.prepare_data()
    dm.setup("fit")
    batches = []
    for i, b in enumerate(dm.val_dataloader()):
        if args.max_batches is not None and i >= args.max_batches:
            break
        batches.append(to_device(b, "cpu"))
    seqs = torch.cat([b["ids"] for b in batches])[: args.prompts, : args.prompt]
    ref_net = model.net
    results, ref = {}, {}
    for mode in modes:
        net = ref_net if mode == "none" else quantized_copy(ref_net, mode)
        net.eval()
        t = time.perf_counter()
        total, count, argmaxes = val_pass(net, model, batches)
        model.net = net
        gen = model.generate(seqs, max_new_tokens=args.new, strategy="greedy").ids[:, args.prompt:]
        model.net = ref_net
        row = {"nll": round(total / count, 5), "tokens": int(count), "bytes": weight_bytes(net),
               "seconds": round(time.perf_counter() - t, 1)}
        if mode == "none":
            ref = {"nll": total / count, "argmax": argmaxes, "gen": gen}
        else:
            row["nll_rel_change"] = round((total / count - ref["nll"]) / ref["nll"], 5)
            same = sum(int((a == b).sum()) for a, b in zip(argmaxes, ref["argmax"]))
            row["argmax_agreement"] = round(same / count, 5)
            row["greedy_match"] = round((gen == ref["gen"]).float().mean().item(), 4)
        results[mode] = row
        print(f"{mode}: {row}", file=sys.stderr, flush=True)
    report = {
        "benchmark": "quantize_nll",
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "ckpt": args.ckpt,
        "modality": model.modality,
        "params": model.net.num_params(),
        "split": "validation",
        "greedy": {"prompts": int(seqs.shape[0]), "prompt": args.prompt, "new": args.new},
        "results": results,
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
