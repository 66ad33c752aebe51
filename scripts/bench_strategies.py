"""Exact faster decoding on trained models, and the cost of the front door. Prints JSON.

Part 1 (``strategies``): the target's plain greedy decode against ``speculative``
(a small draft of the same tokenizer, ``--draft``) and ``lookahead`` (no draft), all
through the one engine, batch 1, the tokenizer's BOS as prompt, exactly ``--new``
tokens (EOS ignored so every contender does the same work), with the model's type
stream and grammar mask as ``ARModel.generate`` passes them.  Contenders run
interleaved (plain, then each strategy, ``--repeats`` times); reported per
contender: the median of the paired ratios plain time / strategy time (speed-up),
the acceptance rate, tokens per target forward, and whether the greedy tokens are
identical to plain greedy in every repeat.  ``--temperature`` adds sampled rows
(exact in distribution, tested in tests/test_generation.py; no identity check).

Part 2 (``front_door``): ``ARModel.generate`` (``compile=auto``) against
``armodal.generation.generate`` called directly with the same network, hooks and
settings, greedy, at each ``--batch`` size, interleaved; overhead = median paired
ratio - 1.

Part 3 (``--compile-check``): ``compile=true`` against ``false`` for plain greedy,
the first call (which compiles) and a later one, at batch 1 and the largest
``--batch``: the measurement behind ``compile=auto`` on this device.

    python scripts/bench_strategies.py --target runs/music_jsb/<t>/checkpoints/best.ckpt \\
        --draft runs/music_jsb_draft/<t>/checkpoints/best.ckpt --threads 1 --out docs/bench_strategies_cpu_jsb.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_common import emit, environment, load_average, median  # noqa: E402

import armodal  # noqa: E402
from armodal.generation import GenerationConfig, Tokens, generate  # noqa: E402


def ident(path) -> dict:
    """Which file state was measured (a run may still be updating best.ckpt)."""
    data = Path(path).read_bytes()
    mtime = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(Path(path).stat().st_mtime))
    return {"ckpt": str(path), "sha256": hashlib.sha256(data).hexdigest()[:16], "mtime_utc": mtime}


def shape(net) -> dict:
    return {"params": net.num_params(), **{k: getattr(net.config, k) for k in ("n_layer", "d_model", "n_head")}}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def log(msg) -> None:
    print(msg, file=sys.stderr, flush=True)


def strategies(model, draft, args) -> list[dict]:
    tok = model.tokenizer
    hooks = Tokens(None, tok.pad_id, tok.types if tok.num_types > 0 else None,
                   None if args.unconstrained else tok.allowed_next)  # no EOS: exactly --new tokens
    ids = torch.tensor([[tok.bos_id if tok.bos_id is not None else 0]])
    plain = GenerationConfig(strategy="greedy", max_new_tokens=args.new, compile="false")
    contenders = []
    for temp in [0.0] + ([args.temperature] if args.temperature else []):
        base = plain if temp == 0 else plain.replace(strategy="sample", temperature=temp)
        if draft is not None:
            for k in map(int, args.num_draft.split(",")):
                contenders.append((f"speculative k={k}", base, base.replace(strategy="speculative", num_draft=k, temperature=temp),
                                   {"draft": draft.net}))
        for n in map(int, args.lookahead.split(",")):
            contenders.append((f"lookahead n={n}", base, base.replace(strategy="lookahead", lookahead_size=n, temperature=temp), {}))
    rows = []
    for name, base, cfg, extra in contenders:
        t_plain, t_new, stats, same = [], [], [], []
        for r in range(args.repeats):
            ta, a = timed(lambda: generate(model.net, ids, base, tokens=hooks, seed=r))
            tb, b = timed(lambda: generate(model.net, ids, cfg, tokens=hooks, seed=r, **extra))
            t_plain.append(ta)
            t_new.append(tb)
            stats.append(b.stats)
            same.append(bool(torch.equal(a.ids, b.ids)))
        row = {
            "contender": name, "temperature": cfg.temperature, "new_tokens": args.new,
            "speedup": round(median([a / b for a, b in zip(t_plain, t_new)]), 3),  # median of paired ratios
            "acceptance_rate": round(median([s["acceptance_rate"] for s in stats]), 4),
            "tokens_per_target_forward": round(median([s["tokens_per_target_forward"] for s in stats]), 3),
            "plain_tokens_per_s": round(args.new / median(t_plain), 1),
            "strategy_tokens_per_s": round(args.new / median(t_new), 1),
            "plain_runs_s": [round(x, 3) for x in t_plain], "strategy_runs_s": [round(x, 3) for x in t_new],
        }
        if cfg.is_greedy:
            row["greedy_identical"] = all(same)
        log(json.dumps(row))
        rows.append(row)
    return rows


def front_door(model, args) -> list[dict]:
    tok = model.tokenizer
    cfg = GenerationConfig(strategy="greedy", max_new_tokens=args.front_new, compile="auto")
    rows = []
    for b in map(int, args.batch.split(",")):
        ids = torch.full((b, 1), tok.bos_id if tok.bos_id is not None else 0, dtype=torch.long)
        hooks = model.token_rules(cfg)
        t_front, t_engine = [], []
        for _ in range(args.repeats):
            ta, a = timed(lambda: model.generate(ids, config=cfg))
            tb, c = timed(lambda: generate(model.net, ids, cfg, tokens=hooks))
            assert torch.equal(a.ids, c.ids), "front door and engine disagree"
            t_front.append(ta)
            t_engine.append(tb)
        ratio = median([a / b for a, b in zip(t_front, t_engine)])
        row = {"batch": b, "new_tokens": args.front_new, "front_door_s": round(median(t_front), 4),
               "engine_s": round(median(t_engine), 4), "overhead": round(ratio - 1, 4),
               "front_runs_s": [round(x, 4) for x in t_front], "engine_runs_s": [round(x, 4) for x in t_engine]}
        log(json.dumps(row))
        rows.append(row)
    return rows


def compile_check(model, args) -> list[dict]:
    from armodal.generation.fast import release

    tok = model.tokenizer
    rows = []
    for b in sorted({1, max(map(int, args.batch.split(",")))}):
        ids = torch.full((b, 1), tok.bos_id if tok.bos_id is not None else 0, dtype=torch.long)
        cfg = GenerationConfig(strategy="greedy", max_new_tokens=args.new)
        torch._dynamo.reset()
        release(model.net)
        t_eager0, a = timed(lambda: model.generate(ids, config=cfg, compile="false"))
        t_first, c = timed(lambda: model.generate(ids, config=cfg, compile="true"))
        t_eager, _ = timed(lambda: model.generate(ids, config=cfg, compile="false"))
        t_later, _ = timed(lambda: model.generate(ids, config=cfg, compile="true"))
        row = {"batch": b, "new_tokens": args.new, "eager_s": round(min(t_eager0, t_eager), 3),
               "compiled_first_call_s": round(t_first, 3), "compiled_later_call_s": round(t_later, 3),
               "identical": bool(torch.equal(a.ids, c.ids))}
        log(json.dumps(row))
        rows.append(row)
        release(model.net)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="target checkpoint (.ckpt)")
    ap.add_argument("--draft", default=None, help="draft checkpoint (.ckpt), same tokenizer (speculative rows)")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--num-draft", default="2,3,4")
    ap.add_argument("--lookahead", default="2,4,6")
    ap.add_argument("--temperature", type=float, default=0.0, help="also sampled rows at this temperature (0: none)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", default="1,64", help="batch sizes of the front-door comparison")
    ap.add_argument("--front-new", type=int, default=64, help="tokens per front-door call")
    ap.add_argument("--compile-check", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--unconstrained", action="store_true", help="no grammar mask")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.threads:
        torch.set_num_threads(args.threads)
    target_id = ident(args.target)
    model = armodal.load(args.target)
    draft = None
    if args.draft:
        draft = armodal.load(args.draft)
        model.check_draft(draft, args.draft)
    log(f"target {shape(model.net)}" + (f", draft {shape(draft.net)}" if draft else ""))
    report = {
        "benchmark": "strategies",
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "env": environment("cpu"),
        "started_utc": started,
        "target": {**target_id, **shape(model.net)},
        "draft": None if draft is None else {**ident(args.draft), **shape(draft.net)},
        "constrained": not args.unconstrained,
        "strategies": strategies(model, draft, args),
        "front_door": front_door(model, args),
    }
    if args.compile_check:
        report["compile_check"] = compile_check(model, args)
    report["load_average_end"] = load_average()
    emit(report, args.out)


if __name__ == "__main__":
    main()
