"""Speculative decoding in practice: a trained target, a small draft of the same tokenizer. Prints JSON.

For each setting (greedy, and sampling at ``--temperature``) and each draft length k
(``--num-draft``), the plain cached decode of the target and
:func:`armodal.generation.speculative_generate` run interleaved ``--repeats`` times on the
same prompt (the tokenizer's BOS), batch 1, exactly ``--new`` tokens (EOS ignored so
both do the same work), with the model's type stream and grammar mask as
``ARModel.generate`` passes them.  Reported: acceptance rate, tokens per target
forward, wall-clock tokens/s of both and the speed-up (median of the per-repeat
paired ratios plain time / speculative time); for greedy, whether the tokens
are identical (the sampled case is distribution-exact by construction: see
tests/test_generation.py's chi-square test of speculative sampling).

    python scripts/bench_speculative.py --target runs/music_jsb/<t>/checkpoints/best.ckpt \\
        --draft runs/perf_jsb_draft/<t>/checkpoints/best.ckpt
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
from armodal.generation import SamplingParams, generate, speculative_generate  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="target checkpoint (.ckpt)")
    ap.add_argument("--draft", required=True, help="draft checkpoint (.ckpt), same tokenizer")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--num-draft", default="2,3,4,6")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--unconstrained", action="store_true", help="no grammar mask")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    def ident(path):  # which file state was measured (a run may still be updating best.ckpt)
        data = Path(path).read_bytes()
        mtime = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(Path(path).stat().st_mtime))
        return {"ckpt": str(path), "sha256": hashlib.sha256(data).hexdigest()[:16], "mtime_utc": mtime}

    target_id, draft_id = ident(args.target), ident(args.draft)
    target, draft = armodal.load(args.target), armodal.load(args.draft)
    tok = target.tokenizer
    if draft.tokenizer.vocab_size != tok.vocab_size:
        raise SystemExit(f"draft vocabulary {draft.tokenizer.vocab_size} != target {tok.vocab_size}")
    tnet, dnet = target.net.eval(), draft.net.eval()
    n_t, n_d = tnet.num_params(), dnet.num_params()
    log(f"target {n_t:,} params, draft {n_d:,} params, vocab {tok.vocab_size}")
    types_fn = tok.types if tok.num_types > 0 else None
    allowed_fn = None if args.unconstrained else tok.allowed_next
    start = tok.bos_id if tok.bos_id is not None else 0

    @torch.no_grad()
    def step_ms(net, n=100):
        """Median latency of one cached single-token forward (the unit speculative decoding trades)."""
        net.setup_caches(1, n + 1)
        x = torch.tensor([[start]])
        typ = torch.zeros_like(x) if tok.num_types > 0 else None
        ts = []
        for i in range(n):
            t = time.perf_counter()
            net(x, types=typ, input_pos=torch.tensor([i]), kv_len=i + 1)
            ts.append(time.perf_counter() - t)
        net.clear_caches()
        return round(median(ts) * 1e3, 3)

    t_ms, d_ms = step_ms(tnet), step_ms(dnet)
    log(f"single-token forward: target {t_ms} ms, draft {d_ms} ms (cost ratio c = {d_ms / t_ms:.2f})")
    ids = torch.tensor([[start]])
    settings = [("greedy", SamplingParams(greedy=True)), (f"T={args.temperature}", SamplingParams(temperature=args.temperature))]
    rows = []
    for label, sp in settings:
        for k in map(int, args.num_draft.split(",")):
            plain_t, spec_t, stats, same = [], [], [], []
            for r in range(args.repeats):
                g1, g2 = torch.Generator().manual_seed(r), torch.Generator().manual_seed(r)
                t = time.perf_counter()
                a = generate(tnet, ids, max_new_tokens=args.new, sampling=sp, types_fn=types_fn,
                             allowed_fn=allowed_fn, generator=g1)
                plain_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                b = speculative_generate(tnet, dnet, ids, max_new_tokens=args.new, num_draft=k, sampling=sp,
                                         types_fn=types_fn, allowed_fn=allowed_fn, generator=g2)
                spec_t.append(time.perf_counter() - t)
                stats.append(b.stats)
                if sp.is_greedy:
                    same.append(bool(torch.equal(a.ids, b.ids)))
            tp, ts = median(plain_t), median(spec_t)
            row = {
                "sampling": label, "num_draft": k,
                "acceptance_rate": round(median([s["acceptance_rate"] for s in stats]), 4),
                "tokens_per_target_forward": round(median([s["tokens_per_target_forward"] for s in stats]), 3),
                "plain_tokens_per_s": round(args.new / tp, 1),
                "speculative_tokens_per_s": round(args.new / ts, 1),
                "speedup": round(median([a / b for a, b in zip(plain_t, spec_t)]), 3),  # median of paired ratios
                "plain_runs_s": [round(x, 3) for x in plain_t],
                "speculative_runs_s": [round(x, 3) for x in spec_t],
            }
            if sp.is_greedy:
                row["greedy_identical"] = all(same)
            log(json.dumps(row))
            rows.append(row)
    report = {
        "benchmark": "speculative",
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "env": environment("cpu"),
        "started_utc": started,
        "target": {**target_id, "params": n_t, "shape": {k: getattr(tnet.config, k) for k in ("n_layer", "d_model", "n_head")}},
        "draft": {**draft_id, "params": n_d, "shape": {k: getattr(dnet.config, k) for k in ("n_layer", "d_model", "n_head")}},
        "forward_ms": {"target": t_ms, "draft": d_ms, "cost_ratio_c": round(d_ms / t_ms, 3)},
        "new_tokens": args.new, "constrained": not args.unconstrained, "results": rows,
        "load_average_end": load_average(),
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
