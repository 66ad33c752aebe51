"""What one sampling step costs at a batch, beside the model: the engine's processors vs top-k-restricted sampling. Prints JSON.

For logits [B, V] (V = 50257, GPT-2's vocabulary) and temperature 1 with top-k 50 (what
bench_generate.py --sample and HF use):

* ``engine``   ``sample(process(logits))`` of :mod:`armodal.generation.processors`: top-k masking
               over the whole vocabulary, softmax and ``torch.multinomial`` over all V entries
               (HF's ``TopKLogitsWarper`` + ``multinomial`` does the same work);
* ``topk_only`` the same distribution drawn inside the k kept entries: ``topk`` once, softmax and
               ``multinomial`` over k, then a gather (the change proposed for the engine).

Interleaved ``--repeats`` times; best time of each.

    python scripts/bench_sampling.py --threads 1 --out docs/bench_sampling_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench_common import emit, load_average  # scripts/ is on sys.path when a script in it runs

from armodal.generation import GenerationConfig
from armodal.generation.processors import process, sample


def topk_only(logits: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    vals, idx = logits.topk(k, dim=-1)
    pick = torch.multinomial(vals.softmax(-1), 1, generator=g)
    return idx.gather(-1, pick).squeeze(-1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="16,64,256")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = load_average()
    sp = GenerationConfig(temperature=1.0, top_k=args.top_k)
    g = torch.Generator().manual_seed(0)
    results = {}
    for b in map(int, args.batch.split(",")):
        x = torch.randn(b, args.vocab, generator=g)
        fns = {"engine": lambda: sample(process(x, sp), sp, g), "topk_only": lambda: topk_only(x, args.top_k, g)}
        best = {k: float("inf") for k in fns}
        for _ in range(args.repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t)
        results[str(b)] = {"engine_ms": round(best["engine"] * 1e3, 2), "topk_only_ms": round(best["topk_only"] * 1e3, 2),
                           "ratio": round(best["engine"] / best["topk_only"], 1)}
        print(f"B={b}: {results[str(b)]}", file=sys.stderr, flush=True)
    report = {
        "benchmark": "sampling",
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "vocab": args.vocab, "top_k": args.top_k, "threads": torch.get_num_threads(),
        "results": results, "load_average_start": start, "load_average_end": load_average(),
    }
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
