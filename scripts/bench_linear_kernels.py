"""Which CPU kernel for quantised linear layers: the candidates PyTorch and torchao ship, timed side by side. Prints JSON.

One "layer stack" = ``--layers`` distinct [out, in] weights of the 124M MLP shape (768 -> 4096 by
default, 151 MB in fp32: more than the last-level cache, as in a real decode step), applied to
an activation of ``M`` rows (M = 1 is batch-1 decoding, larger M is batched decoding):

* ``fp32`` / ``fp32_io``  ``F.linear`` on row-major / [in, out]-strided fp32 weights;
* ``bf16``                bf16 weights and activations (oneDNN);
* ``int8``                ``aten._weight_int8pack_mm``: int8 weights, bf16 activations
                          (armodal ``quantize=int8``);
* ``int4``                ``aten._weight_int4pack_mm_for_cpu``, group 64, bf16 activations
                          (armodal ``quantize=int4``);
* ``int8_dynamic``        ``torch.ao`` dynamic quantised ``Linear`` (fbgemm, int8 activations)
                          (armodal ``quantize=int8_dynamic``);
* ``torchao_int8wo`` / ``torchao_int8dyn`` / ``torchao_intx8wo``: torchao's ``Int8WeightOnlyConfig``,
                          ``Int8DynamicActivationInt8WeightConfig``, ``IntxWeightOnlyConfig(int8)`` on
                          bf16 weights, ``torch.compile``-d (only if torchao is installed; its
                          ``Int4WeightOnlyConfig`` needs the CUDA-only ``mslk`` and is not tried).

Candidates are interleaved ``--repeats`` times; the best time of each is reported, with its
speed-up over ``fp32``.

    python scripts/bench_linear_kernels.py --threads 1 --out docs/bench_linear_kernels_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from bench_common import emit, environment, load_average  # scripts/ is on sys.path when a script in it runs

from armodal.generation.quantize import Int4WeightLinear, Int8WeightLinear, quantize_weights


class Stack(torch.nn.Module):
    """Independent linear layers applied to the same input (no chaining: every weight is read once)."""

    def __init__(self, weights):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for w in weights:
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data.copy_(w)
            self.layers.append(lin)

    def forward(self, x):
        return [lin(x) for lin in self.layers]


def candidates(weights, torchao_ok: bool):
    def fp32(x, ws=weights):
        return [F.linear(x, w) for w in ws]

    io = [w.t().contiguous().t() for w in weights]
    bf = [w.bfloat16() for w in weights]
    q8 = [Int8WeightLinear(w) for w in weights]
    q4 = [Int4WeightLinear(w, group_size=64) for w in weights]
    dyn = Stack(weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_weights(dyn, "int8_dynamic")
    out = {
        "fp32": fp32,
        "fp32_io": lambda x: fp32(x, io),
        "bf16": lambda x: [F.linear(x.bfloat16(), w) for w in bf],
        "int8": lambda x: [m(x) for m in q8],
        "int4": lambda x: [m(x) for m in q4],
        "int8_dynamic": dyn,
    }
    if torchao_ok:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_,
        )

        for name, cfg in (("torchao_int8wo", Int8WeightOnlyConfig()),
                          ("torchao_int8dyn", Int8DynamicActivationInt8WeightConfig()),
                          ("torchao_intx8wo", IntxWeightOnlyConfig(weight_dtype=torch.int8))):
            ao = Stack(weights).to(torch.bfloat16)
            quantize_(ao, cfg)
            out[name] = (lambda m: lambda x: m(x.bfloat16()))(torch.compile(ao))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-features", type=int, default=768)
    ap.add_argument("--out-features", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rows", default="1,16,64,256", help="comma list of M (activation rows)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import torchao  # noqa: F401  (only whether it imports)

        torchao_ok = True
    except ImportError:
        torchao_ok = False
    env = environment("cpu")
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(args.out_features, args.in_features, generator=g) * 0.02 for _ in range(args.layers)]
    cands = candidates(weights, torchao_ok)
    results = {}
    with torch.no_grad():
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, args.in_features, generator=g)
            for f in cands.values():  # warm-up (and compilation)
                f(x)
            best = {k: float("inf") for k in cands}
            for _ in range(args.repeats):
                for k, f in cands.items():
                    t = time.perf_counter()
                    f(x)
                    best[k] = min(best[k], time.perf_counter() - t)
            flops = 2 * m * args.in_features * args.out_features * args.layers
            results[str(m)] = {k: {"ms": round(v * 1e3, 3), "speedup_vs_fp32": round(best["fp32"] / v, 2),
                                   "GFLOPs": round(flops / v / 1e9, 1)} for k, v in best.items()}
            print(f"M={m}: " + "  ".join(f"{k} {v * 1e3:.1f}ms" for k, v in best.items()), file=sys.stderr, flush=True)
    report = {
        "benchmark": "linear_kernels",
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "env": env,
        "shape": {"in": args.in_features, "out": args.out_features, "layers": args.layers,
                  "fp32_MB": round(4 * args.in_features * args.out_features * args.layers / 1e6, 1)},
        "torchao": torchao_ok,
        "results": results,
        "load_average_end": load_average(),
    }
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
