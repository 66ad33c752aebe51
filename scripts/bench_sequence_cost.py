"""The cost of sequential generation: time per new token against its position, up to 2,048 tokens. Prints JSON.

For each position n (the context already generated), the time to produce token n + 1 with:

* ``no_cache``         armodal ``generate(use_cache=False)``'s step: one forward over all n tokens
                       (every position's logits, as that loop computes them);
* ``eager_kv``         the eager engine's cached step: one token attending to the n cached keys
                       (``kv_len = n + 1``);
* ``compiled_static``  :class:`FastDecoder`'s compiled step: one token attending to the whole
                       static cache of ``--max-len`` slots through its mask row (fixed shapes);
* ``hf``               HF GPT-2 with its dynamic cache: one token with ``past_key_values`` of n.

Same shapes (conf/model/<size>.yaml with ``max_seq_len = --max-len``), random weights, one
sequence.  The cached contenders prefill n tokens untimed, then time ``--steps`` single-token
steps at n, n+1, ... (median per step).  Positions, contenders and ``--repeats`` are
interleaved; the median over repeats is reported.  Each curve's growth exponent is the
least-squares slope of log time against log position, over all positions and over
positions >= ``--tail-from`` (the asymptotic regime): O(n^2) total work without a cache is a
slope near 1 per token; a cached step is weight streaming (flat) plus O(n) attention.

Writes the JSON to ``--out`` and a log-log plot to ``--plot`` (default: the JSON path with .png).

    python scripts/bench_sequence_cost.py --threads 1 --size small --out docs/sequence_cost.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from bench_common import (  # scripts/ is on sys.path when a script in it runs
    build_hf, build_ours, emit, environment, fit_exponent, load_average, median, model_shape, sync,
)

from armodal.generation.fast import FastDecoder

CONTENDERS = ("no_cache", "eager_kv", "compiled_static", "hf")
LABELS = {
    "no_cache": "no cache (full recompute)",
    "eager_kv": "eager KV cache (sliced to n)",
    "compiled_static": "compiled static cache (all slots)",
    "hf": "HF GPT-2 generate step (dynamic cache)",
}


class Timer:
    """Per-step time at a position for one contender (the state it needs is built once)."""

    def __init__(self, name, net, hf, max_len, device):
        self.name, self.net, self.hf, self.device = name, net, hf, device
        if name == "compiled_static":
            self.fast = FastDecoder(net, max_batch=1, max_len=max_len)

    @torch.no_grad()
    def per_step(self, ids: torch.Tensor, n: int, steps: int) -> float:
        net, dev = self.net, self.device
        if self.name == "no_cache":
            times = []
            for i in range(steps):
                sync(dev)
                t = time.perf_counter()
                net(ids[:, : n + i])[:, -1].argmax(-1)
                sync(dev)
                times.append(time.perf_counter() - t)
            return median(times)
        if self.name == "hf":
            out = self.hf(ids[:, :n], use_cache=True)
            pkv, times = out.past_key_values, []
            for i in range(steps):
                sync(dev)
                t = time.perf_counter()
                out = self.hf(ids[:, n + i : n + i + 1], past_key_values=pkv, use_cache=True)
                out.logits[:, -1].argmax(-1)
                sync(dev)
                times.append(time.perf_counter() - t)
                pkv = out.past_key_values
            return median(times)
        if self.name == "eager_kv":
            net.setup_caches(1, n + steps)
        net(ids[:, :n], input_pos=torch.arange(n, device=dev), kv_len=n, num_logits=1)  # prefill, untimed
        times = []
        for i in range(steps):
            pos = torch.tensor([n + i], device=dev)
            tok = ids[:, n + i : n + i + 1].clone()
            sync(dev)
            t = time.perf_counter()
            if self.name == "eager_kv":
                logits = net(tok, input_pos=pos, kv_len=n + i + 1)
            else:
                logits = self.fast.step(net, tok, None, pos)
            logits[:, -1].argmax(-1)
            sync(dev)
            times.append(time.perf_counter() - t)
        if self.name == "eager_kv":
            net.clear_caches()
        return median(times)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    styles = {"no_cache": "o-", "eager_kv": "s-", "compiled_static": "^-", "hf": "d--"}
    for name, row in report["curves"].items():
        xs = [p for p, t in zip(report["positions"], row["ms_per_token"]) if t]
        ys = [t for t in row["ms_per_token"] if t]
        k = row["exponent_tail"]
        ax.loglog(xs, ys, styles.get(name, "o-"), label=f"{LABELS[name]}: slope {k}", markersize=4)
    ax.set_xlabel("position of the new token (tokens already in context)")
    ax.set_ylabel("time per new token (ms)")
    env = report["env"]
    ax.set_title(f"{report['size']} ({report['params'] / 1e6:.0f}M params), batch 1, {env['device']}, "
                 f"{env['threads']} thread(s)\nslope = fitted exponent for positions >= {report['tail_from']}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", help="conf/model preset")
    ap.add_argument("--max-len", type=int, default=2048, help="longest context (model max_seq_len)")
    ap.add_argument("--positions", default=None,
                    help="comma list (default: powers of two from 16, then max-len - steps)")
    ap.add_argument("--steps", type=int, default=4, help="timed single-token steps per position")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tail-from", type=int, default=256, help="fit the tail exponent from this position")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for n in names:
        if n not in CONTENDERS:
            raise SystemExit(f"unknown contender {n!r}; choose from {CONTENDERS}")
    top = args.max_len - args.steps
    if args.positions:
        positions = sorted(int(p) for p in args.positions.split(","))
    else:
        positions = [2**k for k in range(4, 12) if 2**k < top] + [top]
    if positions[-1] + args.steps > args.max_len or positions[0] < 1:
        raise SystemExit(f"positions must lie in [1, {top}] (max-len {args.max_len} - steps {args.steps})")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    env = environment(device) if "hf" in names else {"device": str(device), "threads": torch.get_num_threads(),
                                                     "load_average_start": load_average()}
    torch.manual_seed(0)
    net = build_ours(args.size, device, max_seq_len=args.max_len).eval()
    hf = build_hf(args.size, device, max_seq_len=args.max_len).eval() if "hf" in names else None
    ids = torch.randint(0, net.config.vocab_size, (1, args.max_len), device=device)
    timers = {}
    for name in names:
        t = time.perf_counter()
        timers[name] = Timer(name, copy.deepcopy(net), hf, args.max_len, device)  # own caches each
        timers[name].per_step(ids, positions[0], 1)  # warm-up / compile
        log(f"warm {name}: {time.perf_counter() - t:.1f}s")
    runs = {name: {p: [] for p in positions} for name in names}
    for r in range(args.repeats):
        for p in positions:
            for name in names:
                runs[name][p].append(timers[name].per_step(ids, p, args.steps))
            log(f"rep {r} pos {p}: " + "  ".join(f"{n} {runs[n][p][-1] * 1e3:.2f}ms" for n in names))
    curves = {}
    for name in names:
        ms = [round(median(runs[name][p]) * 1e3, 4) for p in positions]
        tail = [(p, t) for p, t in zip(positions, ms) if p >= args.tail_from]
        curves[name] = {
            "ms_per_token": ms,
            "exponent_all": fit_exponent(positions, ms),
            "exponent_tail": fit_exponent([p for p, _ in tail], [t for _, t in tail]),
            "runs_ms": {str(p): [round(x * 1e3, 4) for x in runs[name][p]] for p in positions},
        }
    report = {
        "benchmark": "sequence_cost",
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "env": env,
        "size": args.size,
        "shape": {**model_shape(args.size), "max_seq_len": args.max_len},
        "params": net.num_params(),
        "positions": positions,
        "steps_per_position": args.steps,
        "repeats": args.repeats,
        "tail_from": args.tail_from,
        "curves": curves,
        "ratios_at_last_position": {
            f"{a}_over_{b}": round(curves[a]["ms_per_token"][-1] / curves[b]["ms_per_token"][-1], 3)
            for a in names for b in names if a != b and b != "no_cache"},
        "load_average_end": load_average(),
    }
    emit(report, args.out)
    if args.out or args.plot:
        png = Path(args.plot) if args.plot else Path(args.out).with_suffix(".png")
        plot(report, png)
        log(f"plot written to {png}")
    return report


if __name__ == "__main__":
    main()
