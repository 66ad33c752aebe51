"""Render the benchmark JSONs as markdown tables (bench_generate, bench_train, bench_speculative,
bench_strategies, quantize_nll, bench_sequence_cost, bench_linear_kernels).

    python scripts/bench_report.py docs/bench_generate_cpu.json docs/bench_train_cpu.json ...
"""

from __future__ import annotations

import json
import sys


def _f(x, nd=1):
    return "–" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def generate_table(r: dict) -> str:
    out = [f"`{r['command']}`  (load average start {r['env']['load_average_start']}, end {r['load_average_end']}; "
           f"peak bandwidth {r['peak_bandwidth_GBs']} GB/s, {r['peak_bandwidth_source']})", "",
           "| size | batch | prompt | contender | new | tokens/s | ms/step | TTFT ms | peak MiB | BW util | vs P1 | vs P2 | vs P3 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        for name, row in run["results"].items():
            vs1 = run["ratios"].get(f"{name}_over_p1_tokens_per_s")
            vs2 = run["ratios"].get(f"{name}_over_p2_tokens_per_s")
            vs3 = run["ratios"].get(f"{name}_over_p3_tokens_per_s")
            bw = row.get("bandwidth_utilisation")
            out.append(
                f"| {run['size']} | {run['batch']} | {run['prompt']} | {name} | {row['new_tokens']} | {_f(row['tokens_per_s'])} | "
                f"{_f(row['ms_per_step'])} | {_f(row['ttft_ms'])} | {_f(row['peak_mem_mib'])} | "
                f"{'–' if bw is None else f'{100 * bw:.0f}%'} | {_f(vs1, 2)} | {_f(vs2, 2)} | {_f(vs3, 2)} |")
        if run["errors"]:
            out.append(f"| {run['size']} | {run['batch']} | {run['prompt']} | errors | "
                       + "; ".join(f"{k}: {v}" for k, v in run["errors"].items()) + " |||||||")
    return "\n".join(out)


def train_table(r: dict) -> str:
    out = [f"`{r['command']}`  ({r['size']}, seq {r['seq']}, batch {r['batch']}, {r['dtype']}; peak "
           f"{r['peak_TFLOPs']} TFLOP/s, {r['peak_source']}; FLOPs/token {r['flop_formula']})", "",
           "| contender | tokens/s | ms/step | TFLOP/s | MFU | peak MiB | warm-up s |", "|---|---|---|---|---|---|---|"]
    for name, row in r["results"].items():
        out.append(f"| {name} | {_f(row['tokens_per_s'])} | {_f(row['ms_per_step'])} | {row['achieved_TFLOPs']} | "
                   f"{100 * row['mfu']:.1f}% | {_f(row['peak_mem_mib'])} | {row['warmup_s']} |")
    if r["errors"]:
        out.append("errors: " + json.dumps(r["errors"]))
    return "\n".join(out)


def strategies_table(r: dict) -> str:
    t, d = r["target"], r["draft"]
    out = [f"`{r['command']}`  (target {t['params']:,} params, {t['n_layer']} layers x {t['d_model']}"
           + (f"; draft {d['params']:,} params, {d['n_layer']} layers x {d['d_model']}" if d else "")
           + f"; load average start {r['env']['load_average_start']}, end {r['load_average_end']})", "",
           "| contender | T | acceptance | tokens/target fwd | plain tok/s | strategy tok/s | speed-up | greedy identical |",
           "|---|---|---|---|---|---|---|---|"]
    for row in r["strategies"]:
        out.append(f"| {row['contender']} | {row['temperature']} | {100 * row['acceptance_rate']:.1f}% | "
                   f"{row['tokens_per_target_forward']} | {row['plain_tokens_per_s']} | {row['strategy_tokens_per_s']} | "
                   f"{row['speedup']}x | {row.get('greedy_identical', '–')} |")
    out += ["", "| front door (compile=auto) | batch | new | ARModel.generate s | engine s | overhead |", "|---|---|---|---|---|---|"]
    for row in r["front_door"]:
        out.append(f"| | {row['batch']} | {row['new_tokens']} | {row['front_door_s']} | {row['engine_s']} | "
                   f"{100 * row['overhead']:+.1f}% |")
    if r.get("compile_check"):
        out += ["", "| compile check | batch | new | eager s | compiled, 1st call s | compiled, later s | identical |",
                "|---|---|---|---|---|---|---|"]
        for row in r["compile_check"]:
            out.append(f"| | {row['batch']} | {row['new_tokens']} | {row['eager_s']} | {row['compiled_first_call_s']} | "
                       f"{row['compiled_later_call_s']} | {row['identical']} |")
    return "\n".join(out)


def speculative_table(r: dict) -> str:
    out = [f"`{r['command']}`  (target {r['target']['params']:,} params {r['target']['shape']}, draft "
           f"{r['draft']['params']:,} params {r['draft']['shape']}; one cached forward: {r.get('forward_ms')})", "",
           "| sampling | k | acceptance | tokens/target fwd | plain tok/s | speculative tok/s | speed-up | greedy identical |",
           "|---|---|---|---|---|---|---|---|"]
    for row in r["results"]:
        out.append(f"| {row['sampling']} | {row['num_draft']} | {100 * row['acceptance_rate']:.1f}% | "
                   f"{row['tokens_per_target_forward']} | {row['plain_tokens_per_s']} | "
                   f"{row['speculative_tokens_per_s']} | {row['speedup']}x | {row.get('greedy_identical', '–')} |")
    return "\n".join(out)


def quantize_table(r: dict) -> str:
    out = [f"`{r['command']}`  ({r['modality']}, {r['params']:,} params, {r['split']} split; greedy "
           f"{r['greedy']['prompts']} prompts x {r['greedy']['new']} tokens; load average start "
           f"{r['load_average_start']}, end {r['load_average_end']})", "",
           "| weights | NLL (nats/token) | vs fp32 | argmax agreement | greedy tokens equal | weight bytes |",
           "|---|---|---|---|---|---|"]
    def pct(x, fmt):
        return "–" if x is None else format(100 * x, fmt) + " %"

    for mode, row in r["results"].items():
        out.append(f"| {'fp32' if mode == 'none' else mode} | {row['nll']:.4f} | "
                   f"{pct(row.get('nll_rel_change'), '+.3f')} | {pct(row.get('argmax_agreement'), '.2f')} | "
                   f"{pct(row.get('greedy_match'), '.1f')} | {row['bytes']:,} |")
    return "\n".join(out)


def sequence_table(r: dict) -> str:
    names = list(r["curves"])
    out = [f"`{r['command']}`  ({r['size']}, {r['params'] / 1e6:.1f}M params, load average start "
           f"{r['env']['load_average_start']}, end {r['load_average_end']})", "",
           "| position | " + " | ".join(f"{n} ms" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, p in enumerate(r["positions"]):
        out.append(f"| {p} | " + " | ".join(_f(r["curves"][n]["ms_per_token"][i], 2) for n in names) + " |")
    out.append("| exponent (all) | " + " | ".join(str(r["curves"][n]["exponent_all"]) for n in names) + " |")
    out.append(f"| exponent (>= {r['tail_from']}) | "
               + " | ".join(str(r["curves"][n]["exponent_tail"]) for n in names) + " |")
    return "\n".join(out)


def kernels_table(r: dict) -> str:
    rows = list(r["results"])
    names = list(r["results"][rows[0]])
    out = [f"`{r['command']}`  ({r['shape']}; load average start {r['env']['load_average_start']}, "
           f"end {r['load_average_end']})", "",
           "| rows M | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for m in rows:
        out.append(f"| {m} | " + " | ".join(
            f"{r['results'][m][n]['ms']:.1f} ms ({r['results'][m][n]['speedup_vs_fp32']}x)" for n in names) + " |")
    return "\n".join(out)


def main(paths):
    for p in paths:
        r = json.load(open(p))
        fn = {"generate": generate_table, "train": train_table, "speculative": speculative_table,
              "strategies": strategies_table, "quantize_nll": quantize_table, "sequence_cost": sequence_table,
              "linear_kernels": kernels_table}[r["benchmark"]]
        print(f"### {p}\n\n{fn(r)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
