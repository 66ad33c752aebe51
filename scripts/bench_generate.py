"""Decode benchmark: armodal vs HF GPT-2 peers, same process, same device, same shapes. Prints JSON.

Contenders (exactly ``--new`` tokens, random weights, no EOS; greedy, or with ``--sample``
temperature 1 and top-k 50 on both sides):

* ``ours``       armodal ``generate`` (eager, static KV cache sliced to the live prefix);
* ``ours_io``    ablation: the eager engine with [in, out] weight layout (``set_weight_layout``);
* ``ours_fast``  armodal :class:`FastDecoder` (static cache, compiled single-token step:
                 CUDA graphs on CUDA, inductor ``default`` mode on the CPU), eager prefill;
* ``ours[_fast]_int8`` / ``_int4`` / ``_int8dyn`` / ``_bf16``: the same with the linear weights
                 quantised by :func:`armodal.generation.quantize.quantize_weights` (``int8``,
                 ``int4``, ``int8_dynamic``; the last runs eagerly only), or the whole model in bf16;
* ``p1``         HF ``GPT2LMHeadModel.generate`` with its default (dynamic) cache;
  ``p1_bf16``    the same model in bf16;
* ``p2``         HF with ``cache_implementation="static"`` and
                 ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)``;
* ``p3``         a plain no-cache loop recomputing the whole prefix each step
                 (armodal ``generate(use_cache=False)``), timed over ``--p3-new`` tokens.

Contenders are interleaved (ours, p1, ..., ours, p1, ...) ``--repeats`` times and the
median is reported, so background load hits all of them alike.

Per contender: tokens/s (batch x new tokens / wall time), ms per decode step
((total - ttft) / (new - 1)), time to first token (prefill + first token), peak memory
(CUDA allocator peak, or sampled RSS growth on the CPU, where buffers allocated once
at warm-up, such as static caches and compiled constants, show under warmup_peak_mem_mib)
and, at batch 1, memory-bandwidth utilisation: (bytes of weights read per step, as stored,
+ KV bytes) / step time / peak bandwidth.  Greedy runs also report, per contender, the
fraction of its tokens equal to ``ours`` (same weights; exactly 1.0 for the fp32 paths;
with random weights the logits are nearly flat, so quantised paths diverge early: their
accuracy is measured on trained checkpoints by scripts/quantize_nll.py).

    python scripts/bench_generate.py --sizes small --batch 1 --prompt 16
    python scripts/bench_generate.py --sizes base --contenders ours_fast,ours_fast_int8,ours_fast_int4,p1
    python scripts/bench_generate.py --device cuda --sizes small,base,medium --batch 1,64 --prompt 16,512
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback

import torch

from bench_common import (  # scripts/ is on sys.path when a script in it runs
    PeakMemory, build_hf, build_ours, emit, environment, gpu_peaks, load_average, measure_bandwidth, median,
    model_shape, param_report, sync,
)

from armodal.generation import GenerationConfig, generate
from armodal.generation.fast import FastDecoder, set_weight_layout
from armodal.generation.quantize import quantize_weights, weight_bytes

GREEDY = GenerationConfig(strategy="greedy", compile="false")  # the eager engine; ours_fast brings its own decoder
SAMPLED = GenerationConfig(temperature=1.0, top_k=50, compile="false")
QUANT = {"int8": "int8", "int4": "int4", "int8dyn": "int8_dynamic"}


def parse_ours(name: str) -> dict:
    """``ours[_fast][_io][_int8|_int4|_int8dyn|_bf16]`` -> options."""
    opts = {"fast": False, "layout": None, "quantize": "none", "bf16": False}
    for part in name.split("_")[1:]:
        if part == "fast":
            opts["fast"] = True
        elif part == "io":
            opts["layout"] = "in_out"
        elif part in QUANT:
            opts["quantize"] = QUANT[part]
        elif part == "bf16":
            opts["bf16"] = True
        else:
            raise ValueError(f"unknown contender {name!r} (part {part!r})")
    if opts["fast"] and opts["quantize"] == "int8_dynamic":
        raise ValueError(f"{name}: int8_dynamic runs in the eager engine only")
    return opts


# ----------------------------------------------------------------------------- contenders
class Ours:
    def __init__(self, name, net, max_batch: int, max_len: int, mode: str | None, sampling, seed: int = 0):
        self.name, self.net, self.fast, self.sampling, self.seed = name, net, None, sampling, seed
        o = parse_ours(name)
        if o["bf16"]:
            net.to(torch.bfloat16)
        if o["quantize"] != "none":
            quantize_weights(net, o["quantize"])
        self.bytes = weight_bytes(net, decode_step=True)
        if o["fast"]:
            self.fast = FastDecoder(net, max_batch=max_batch, max_len=max_len, mode=mode)
        elif o["layout"]:
            set_weight_layout(net, o["layout"])

    def run(self, ids, new):
        kw = {"max_new_tokens": new, "config": self.sampling}
        if not self.sampling.is_greedy:
            kw["generator"] = torch.Generator(ids.device).manual_seed(self.seed)
        if self.fast is not None:
            return self.fast.generate(ids, **kw).ids
        return generate(self.net, ids, **kw).ids

    def close(self):
        if self.fast is not None:
            self.fast.close()


class NoCache:
    name = "p3"

    def __init__(self, net, sampling):
        self.net, self.sampling = net, sampling

    def run(self, ids, new):
        return generate(self.net, ids, max_new_tokens=new, config=self.sampling, use_cache=False,
                        generator=torch.Generator(ids.device).manual_seed(0)).ids

    def close(self):
        pass


class HF:
    def __init__(self, name, model, static: bool, sampling):
        self.model, self.static, self.name, self.sampling = model, static, name, sampling
        gc = model.generation_config
        gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, 0, 0
        if static:
            gc.cache_implementation = "static"
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    def run(self, ids, new):
        with torch.inference_mode():
            return self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                num_beams=1, **({"do_sample": False} if self.sampling.is_greedy else
                                {"do_sample": True, "temperature": 1.0, "top_k": self.sampling.top_k, "top_p": 1.0}),
            )

    def close(self):
        pass


def timed(c, ids, new, device):
    sync(device)
    t = time.perf_counter()
    out = c.run(ids, new)
    sync(device)
    return time.perf_counter() - t, out


# ----------------------------------------------------------------------------- one setting
def kv_bytes(cfg, batch: int, ctx: float, dtype_bytes: int) -> float:
    """K and V of ``ctx`` cached positions, every layer."""
    return 2 * cfg.n_layer * ctx * cfg.n_kv_head * cfg.head_dim * dtype_bytes * batch


def make_contender(name, net, hf, size, batch, prompt, args, device, dtype):
    sampling = SAMPLED if args.sample else GREEDY
    if name.startswith("ours"):
        return Ours(name, copy.deepcopy(net), batch, prompt + args.new, args.fast_mode, sampling)
    if name in ("p1", "p1_bf16"):
        m = hf if name == "p1" else copy.deepcopy(hf).to(torch.bfloat16)
        return HF(name, m, static=False, sampling=sampling)
    if name == "p2":
        hf2 = build_hf(size, device, dtype).eval()
        hf2.load_state_dict(hf.state_dict())
        return HF(name, hf2, static=True, sampling=sampling)
    if name == "p3":
        return NoCache(copy.deepcopy(net), sampling)
    raise ValueError(f"unknown contender {name!r}")


def bench_setting(size, batch, prompt, args, device, dtype, peak_bw, log):
    torch.manual_seed(0)
    net = build_ours(size, device, dtype).eval()
    hf = build_hf(size, device, dtype).eval()
    params = param_report(net, hf)
    log(f"[{size}] params ours={params['ours']:,} hf={params['hf_gpt2']:,} ratio={params['ratio_ours_over_hf']}")
    assert abs(params["ratio_ours_over_hf"] - 1) < 0.02, "contenders must have the same parameter count (2%)"
    ids = torch.randint(0, net.config.vocab_size, (batch, prompt), device=device)
    new = args.new
    contenders, errors = [], {}
    for name in args.contenders:
        try:
            contenders.append(make_contender(name, net, hf, size, batch, prompt, args, device, dtype))
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            errors[name] = f"{type(e).__name__}: {e}"
            log(f"  {name} not built: {errors[name]}")
    res = {c.name: {"total_s": [], "ttft_s": [], "peak_mib": [], "compile_s": None} for c in contenders}

    # warm-up (and compilation) outside the timed runs; first-call time recorded as compile_s
    live = []
    for c in contenders:
        n = args.p3_new if c.name == "p3" else new
        try:
            with PeakMemory(device) as pm:
                dt, _ = timed(c, ids, min(n, 8) if c.name == "p3" else n, device)
                dt1, _ = timed(c, ids, 1, device)
            res[c.name]["warmup_peak_mib"] = pm.peak_mib
            res[c.name]["compile_s"] = round(dt + dt1, 2)
            live.append(c)
            log(f"  warm {c.name}: {dt + dt1:.1f}s")
        except Exception as e:
            errors[c.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            log(f"  {c.name} failed: {errors[c.name]}")
            if args.verbose:
                traceback.print_exc()
            res.pop(c.name)

    by_name = {c.name: c for c in contenders}
    outs = {}
    for r in range(args.repeats):
        for c in live:
            n = args.p3_new if c.name == "p3" else new
            ttft, _ = timed(c, ids, 1, device)
            with PeakMemory(device) as pm:
                dt, out = timed(c, ids, n, device)
            outs[c.name] = out
            res[c.name]["ttft_s"].append(ttft)
            res[c.name]["total_s"].append(dt)
            res[c.name]["peak_mib"].append(pm.peak_mib)
            log(f"  rep {r} {c.name}: {batch * n / dt:.1f} tok/s  ttft {ttft * 1e3:.1f} ms  peak {pm.peak_mib} MiB")

    # same work: greedy tokens equal to ``ours`` (same weights; HF has other weights)
    agree, match = {}, {}
    if "ours" in outs and not args.sample:
        for k, out in outs.items():
            if k in ("ours", "p1", "p1_bf16", "p2"):
                continue
            m = min(out.shape[1], outs["ours"].shape[1])
            same = out[:, prompt:m] == outs["ours"][:, prompt:m]
            match[k] = round(same.float().mean().item(), 4)
            if k in ("ours_io", "ours_fast", "p3"):  # fp32 paths: must be identical
                agree[f"ours_vs_{k}"] = bool(same.all())

    summary = {}
    for name, r in res.items():
        n = args.p3_new if name == "p3" else new
        total, ttft = median(r["total_s"]), median(r["ttft_s"])
        step = (total - ttft) / max(n - 1, 1)
        row = {
            "new_tokens": n,
            "tokens_per_s": round(batch * n / total, 2),
            "ms_per_step": round(step * 1e3, 3),
            "ttft_ms": round(ttft * 1e3, 2),
            "peak_mem_mib": median(r["peak_mib"]),
            "warmup_compile_s": r["compile_s"],
            "warmup_peak_mem_mib": r.get("warmup_peak_mib"),
            "runs_total_s": [round(x, 3) for x in r["total_s"]],
        }
        c = by_name[name]
        if batch == 1 and hasattr(c, "bytes"):
            kv_dtype = torch.bfloat16 if parse_ours(name)["bf16"] else dtype
            b = c.bytes + kv_bytes(net.config, batch, prompt + n / 2, torch.finfo(kv_dtype).bits // 8)
            row["bytes_per_step_MB"] = round(b / 1e6, 1)
            row["achieved_GBs"] = round(b / step / 1e9, 2)
            row["bandwidth_utilisation"] = round(b / step / 1e9 / peak_bw, 4)
        summary[name] = row
    ratios = {}
    for mine in summary:
        if not mine.startswith("ours"):
            continue
        for peer in ("p1", "p1_bf16", "p2", "p3"):
            if peer in summary:
                ratios[f"{mine}_over_{peer}_tokens_per_s"] = round(
                    summary[mine]["tokens_per_s"] / summary[peer]["tokens_per_s"], 3)
    for c in contenders:
        c.close()
    return {"size": size, "shape": model_shape(size), "batch": batch, "prompt": prompt, "params": params,
            "results": summary, "ratios": ratios, "greedy_outputs_agree": agree, "greedy_match_vs_ours": match,
            "errors": errors,
            "load_average": load_average()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small", help="comma list of conf/model presets: small,base,medium")
    ap.add_argument("--batch", default="1", help="comma list of batch sizes, e.g. 1,64")
    ap.add_argument("--prompt", default="16", help="comma list of prompt lengths, e.g. 16,512")
    ap.add_argument("--new", type=int, default=256, help="new tokens per sequence")
    ap.add_argument("--p3-new", type=int, default=None, help="new tokens for the no-cache loop (default --new)")
    ap.add_argument("--contenders", default="ours,ours_fast,p1,p2,p3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--peak-bw", type=float, default=None,
                    help="peak memory bandwidth GB/s (default: the GPU's spec by name, measured on the CPU)")
    ap.add_argument("--sample", action="store_true", help="sample (temperature 1, top-k 50) instead of greedy")
    ap.add_argument("--fast-mode", default=None, help="torch.compile mode of ours_fast (default per device)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    args.p3_new = args.p3_new or args.new
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")  # TF32 on GPUs; no effect on CPU fp32
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    env = environment(device)
    bw = measure_bandwidth(device) if device.type == "cpu" and not args.peak_bw else None
    spec = gpu_peaks(device, args.dtype) if device.type == "cuda" and not args.peak_bw else None
    peak_bw = args.peak_bw or (bw["peak_GBs"] if bw else spec["bw_GBs"])
    log(f"env {env}  bandwidth {bw}  peak_bw {peak_bw} GB/s")
    runs = []
    for size in args.sizes.split(","):
        for batch in map(int, args.batch.split(",")):
            for prompt in map(int, args.prompt.split(",")):
                runs.append(bench_setting(size, batch, prompt, args, device, dtype, peak_bw, log))
    report = {
        "benchmark": "generate",
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "env": env,
        "dtype": args.dtype,
        "new_tokens": args.new,
        "memory_bandwidth": bw,
        "peak_bandwidth_GBs": peak_bw,
        "peak_bandwidth_source": "flag" if args.peak_bw else ("measured" if bw else spec["source"]),
        "sampling": "temperature 1, top-k 50" if args.sample else "greedy",
        "runs": runs,
        "load_average_end": load_average(),
    }
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
