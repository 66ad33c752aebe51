"""Training-throughput benchmark: armodal vs HF GPT-2, same process, same device, same shapes. Prints JSON.

Each contender runs full optimisation steps (forward, next-token cross-entropy,
backward, AdamW step) on random token batches:

* ``ours``           armodal Transformer through ARLitModule's loss (``batch_nll``), eager;
* ``ours_compiled``  the same with ``torch.compile(net)`` (what ``module.compile=true`` does);
* ``hf``             HF ``GPT2LMHeadModel`` (same depth/width/heads/vocab), same loss, eager;
* ``hf_compiled``    the same with ``torch.compile``.

All use AdamW from :func:`armodal.training.optim.adamw` (fused kernel on CUDA) and, with
``--dtype bf16``, ``torch.autocast(bfloat16)`` (what Lightning's ``bf16-mixed`` does).

MFU = tokens/s x FLOPs per token / peak FLOP/s, with FLOPs per token
``6 N + 12 L d T`` (N parameters, embedding counted once as it is tied; L layers,
d width, T sequence length: the attention score and value products).  The peak is
the vendor's dense bf16 (or TF32) figure for the GPU by name (``bench_common.GPU_SPECS``:
989 TFLOP/s bf16 on an H100 or H200 SXM), measured for an unknown GPU, or ``--peak-tflops``;
on the CPU it is measured as the best dense 2048^3 matmul throughput in this process.

    python scripts/bench_train.py                      # CPU defaults: small, seq 256, batch 4, fp32
    python scripts/bench_train.py --device cuda --size base --seq 1024 --batch 16 --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from bench_common import (  # scripts/ is on sys.path when a script in it runs
    PeakMemory, build_hf, build_ours, emit, environment, gpu_peaks, load_average, measure_matmul_tflops, median,
    model_shape, num_params, param_report, sync,
)

from armodal.training import batch_nll  # noqa: E402
from armodal.training.optim import adamw  # noqa: E402


def flops_per_token(n_params: int, n_layer: int, d_model: int, seq: int) -> int:
    """6 N + 12 L d T (forward + backward; PaLM appendix B / nanoGPT's estimate_mfu)."""
    return 6 * n_params + 12 * n_layer * d_model * seq


def make_contender(name, size, device, dtype_name):
    if name.startswith("ours"):
        net = build_ours(size, device)
        fwd = torch.compile(net) if name.endswith("compiled") else net

        def loss_fn(ids):
            s, n = batch_nll(fwd, None, {"ids": ids}, None)
            return s / n

        params = net.named_parameters()
    elif name.startswith("hf"):
        net = build_hf(size, device)
        fwd = torch.compile(net) if name.endswith("compiled") else net

        def loss_fn(ids):
            logits = fwd(input_ids=ids).logits  # [B, T, V]
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

        params = net.named_parameters()
    else:
        raise ValueError(f"unknown contender {name}")
    net.train()
    opt = adamw(params, lr=1e-4, weight_decay=0.1)
    return net, loss_fn, opt


def train_steps(net, loss_fn, opt, batches, device, dtype_name):
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=dtype_name == "bf16")
    loss = None
    for ids in batches:
        with autocast:
            loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return float(loss.detach())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cpu = not torch.cuda.is_available()
    ap.add_argument("--size", default="small" if cpu else "base")
    ap.add_argument("--seq", type=int, default=256 if cpu else 1024)
    ap.add_argument("--batch", type=int, default=4 if cpu else 16)
    ap.add_argument("--steps", type=int, default=5 if cpu else 30, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=2 if cpu else 5, help="untimed steps (compilation)")
    ap.add_argument("--repeats", type=int, default=2 if cpu else 3)
    ap.add_argument("--dtype", default="fp32" if cpu else "bf16", choices=["fp32", "bf16"])
    ap.add_argument("--contenders", default="ours,ours_compiled,hf,hf_compiled")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s (default: the GPU spec by name / measured)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")
    device = torch.device(args.device)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    env = environment(device)
    if args.peak_tflops:
        peak, source = args.peak_tflops, "flag"
    elif device.type == "cuda":
        spec = gpu_peaks(device, args.dtype)
        peak, source = spec["tflops"], spec["source"]
    else:
        mm_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        peak, source = measure_matmul_tflops(device, mm_dtype), "measured 2048^3 matmul"
    log(f"env {env}  peak {peak} TFLOP/s ({source})")
    shape = model_shape(args.size)
    torch.manual_seed(0)
    params = param_report(build_ours(args.size, "cpu"), build_hf(args.size, "cpu"))  # ("meta" unties weights)
    log(f"params {params}")
    g = torch.Generator().manual_seed(0)
    total = args.warmup + args.steps
    batches = [torch.randint(0, 50257, (args.batch, args.seq), generator=g).to(device) for _ in range(total)]
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    state, errors, times, peaks, warm = {}, {}, {n: [] for n in names}, {n: [] for n in names}, {}
    for name in names:
        try:
            torch.manual_seed(0)
            net, loss_fn, opt = make_contender(name, args.size, device, args.dtype)
            t = time.perf_counter()
            train_steps(net, loss_fn, opt, batches[: args.warmup], device, args.dtype)
            warm[name] = round(time.perf_counter() - t, 2)
            state[name] = (net, loss_fn, opt)
            log(f"  warm {name}: {warm[name]}s")
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            log(f"  {name} failed: {errors[name]}")
    losses = {}
    for r in range(args.repeats):
        for name, (net, loss_fn, opt) in state.items():
            with PeakMemory(device) as pm:
                t = time.perf_counter()
                losses[name] = train_steps(net, loss_fn, opt, batches[args.warmup:], device, args.dtype)
                dt = time.perf_counter() - t
            times[name].append(dt)
            peaks[name].append(pm.peak_mib)
            log(f"  rep {r} {name}: {args.batch * args.seq * args.steps / dt:.0f} tok/s")
    results = {}
    for name in state:
        n = num_params(state[name][0])
        fpt = flops_per_token(n, shape["n_layer"], shape["d_model"], args.seq)
        tps = args.batch * args.seq * args.steps / median(times[name])
        results[name] = {
            "tokens_per_s": round(tps, 1),
            "ms_per_step": round(median(times[name]) / args.steps * 1e3, 1),
            "flops_per_token": fpt,
            "achieved_TFLOPs": round(tps * fpt / 1e12, 4),
            "mfu": round(tps * fpt / (peak * 1e12), 4),
            "peak_mem_mib": median(peaks[name]),
            "warmup_s": warm[name],
            "last_loss": round(losses[name], 4),
            "runs_s": [round(x, 3) for x in times[name]],
        }
    ratios = {}
    for a in ("ours", "ours_compiled"):
        for b in ("hf", "hf_compiled"):
            if a in results and b in results:
                ratios[f"{a}_over_{b}"] = round(results[a]["tokens_per_s"] / results[b]["tokens_per_s"], 3)
    report = {
        "benchmark": "train",
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "env": env, "size": args.size, "shape": shape, "seq": args.seq, "batch": args.batch,
        "steps": args.steps, "warmup": args.warmup, "dtype": args.dtype, "params": params,
        "flop_formula": "6N + 12*L*d*T per token (N = parameters, tied embedding once)",
        "peak_TFLOPs": peak, "peak_source": source, "results": results, "ratios": ratios, "errors": errors,
        "load_average_end": load_average(),
    }
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
