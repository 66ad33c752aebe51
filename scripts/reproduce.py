#!/usr/bin/env python
"""Run the experiments listed in scripts/reproduce.yaml and collect their metrics into results/RESULTS.md.

    python scripts/reproduce.py                     # everything
    python scripts/reproduce.py --only music_jsb    # a subset
    python scripts/reproduce.py --collect           # no training: re-collect the latest finished runs

Each row keeps the exact commands that produced it.  A missing metrics file, a ``show`` key that
names no metric, an unfinished run, a run started with other overrides, or an eval file older
than (or for another) checkpoint stops the script with a message: rows never vanish silently.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str]) -> str:
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # stream progress
        sys.stdout.write(line)
        lines.append(line)
    if proc.wait() != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {shlex.join(cmd)}")
    return "".join(lines)


class ReproduceError(RuntimeError):
    """A row cannot be collected as asked (missing file, unknown metric, stale run); never skipped silently."""


def entry_name(entry: dict) -> str:
    """An entry's row name: ``name`` (e.g. a second run of one experiment), else its experiment."""
    return entry.get("name") or entry["experiment"]


def expected_command(name: str, entry: dict) -> str:
    """The training command line a run of this entry records in its metrics.json."""
    return shlex.join(["armodal-train", f"experiment={name}", *entry.get("train", [])])


def same_command(command: str | None) -> str | None:
    """A command line without ``overwrite=true`` (how a run was started, not what it computes)."""
    return None if command is None else shlex.join(a for a in shlex.split(command) if a != "overwrite=true")


def latest_run(name: str, command: str | None = None) -> Path:
    """The newest finished run of ``runs/<name>/`` that was started by ``command``.

    A run counts as finished when train() completed (its metrics.json names the run_dir).  Runs left
    by a killed job, a smoke test or a probe with other overrides are listed in the error, never
    collected in place of this entry's run.
    """
    from armodal.utils.config import load_paths  # where armodal-train puts runs (conf/paths, ARMODAL_RUNS)

    runs = load_paths()["runs_dir"] / name
    found, rejected = [], []
    for path in sorted(runs.glob("*/metrics.json"), key=lambda p: p.stat().st_mtime):
        m = json.loads(path.read_text())
        if "run_dir" not in m:
            rejected.append(f"{path.parent.name} (unfinished)")
        elif command is not None and same_command(m.get("command")) != same_command(command):
            rejected.append(f"{path.parent.name} (started by {m.get('command')!r})")
        else:
            found.append(path.parent)
    if not found:
        why = f"; not these: {', '.join(rejected)}" if rejected else ""
        raise ReproduceError(f"{name}: no finished run of `{command}` under {runs}{why}")
    return found[-1]


def read_metrics(path: Path, what: str) -> dict | list:
    """A metrics JSON that must exist, and must be newer than the checkpoint it names (if any)."""
    if not path.is_file():
        raise ReproduceError(f"{what}: metrics file {path} not found")
    data = json.loads(path.read_text())
    for item in data if isinstance(data, list) else [data]:
        ckpt = Path(item["ckpt"]) if isinstance(item, dict) and item.get("ckpt") else None
        if ckpt is not None and ckpt.is_file() and ckpt.stat().st_mtime > path.stat().st_mtime:
            raise ReproduceError(f"{what}: {path} is older than the checkpoint it evaluates ({ckpt}): stale, rerun it")
    return data


def check_show(row: dict) -> None:
    """Every ``show`` key must name a metric of the row."""
    unknown = [k for k in row.get("show") or [] if k not in row["metrics"]]
    if unknown:
        hints = {k: difflib.get_close_matches(k, list(row["metrics"]), n=2) for k in unknown}
        raise ReproduceError(f"{row['name']}: show names metrics the row does not have: "
                             + "; ".join(f"{k!r} (close: {v})" for k, v in hints.items()))


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def first_command(entry: dict) -> str:
    """The command a row of this entry records first: the script, or the armodal-train line."""
    if "script" in entry:
        return entry["script"]
    shown = ["armodal-train", f"experiment={entry['experiment']}", *entry.get("train", [])]
    return shlex.join(shown + ([f"run_dir={entry['run_dir']}"] if "run_dir" in entry else []))


def do_entry(entry: dict, collect_only: bool) -> dict | list[dict]:
    name = entry_name(entry)
    row = {"name": name, "commands": [], "show": entry.get("show")}
    if "script" in entry:
        cmd = shlex.split(entry["script"])
        row["commands"].append(first_command(entry))
        if not collect_only:
            run([sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]])
        data = read_metrics(ROOT / entry["metrics"], f"{name} (`{entry['script']}`)")
        if isinstance(data, list):  # one row per item (e.g. one per held-out fold)
            label = entry.get("row_label", "")
            rows = [{**row, "name": f"{name} [{d.get(label, i)}]", "metrics": flat(d)} for i, d in enumerate(data)]
        else:
            rows = [{**row, "metrics": flat(data)}]
        for r in rows:
            check_show(r)
        return rows if isinstance(data, list) else rows[0]
    # overwrite=true: reproducing re-runs from scratch, also into a pinned run folder that already holds a run
    train_cmd = [str(BIN / "armodal-train"), f"experiment={entry['experiment']}", "overwrite=true", *entry.get("train", [])]
    if "run_dir" in entry:
        train_cmd.append(f"run_dir={ROOT / entry['run_dir']}")
    row["commands"].append(first_command(entry))
    if not collect_only:
        out = run(train_cmd)
        run_dir = Path(next(line.split("done: ")[1].split()[0] for line in out.splitlines() if "[armodal] done:" in line))
    elif "run_dir" in entry:
        run_dir = ROOT / entry["run_dir"]
        if "run_dir" not in read_metrics(run_dir / "metrics.json", name):
            raise ReproduceError(f"{name}: the run in {run_dir} did not finish (metrics.json names no run_dir)")
    else:
        run_dir = latest_run(entry.get("run_name", entry["experiment"]), expected_command(entry["experiment"], entry))
    ckpt = run_dir / "checkpoints" / entry.get("ckpt", "best.ckpt")
    eval_out = run_dir / entry.get("eval_out", "eval_metrics.json")
    eval_cmd = [str(BIN / "armodal-eval"), f"ckpt={ckpt}", f"out={eval_out}", *entry.get("eval", [])]
    where = entry.get("run_dir", f"runs/{name}/<time>")
    row["commands"].append(shlex.join(["armodal-eval", f"ckpt={where}/checkpoints/{ckpt.name}", *entry.get("eval", [])]))
    if entry.get("eval") is not None and not collect_only:
        run(eval_cmd)
    m = read_metrics(run_dir / "metrics.json", name)
    metrics = {f"train.{k}": v for k, v in flat(m.get("best", {})).items()}
    metrics["train.seconds"] = m.get("train_seconds_this_session")
    metrics["train.steps"] = m.get("global_step")
    metrics["params"] = m.get("num_params")
    if entry.get("eval") is not None:
        ev = read_metrics(eval_out, f"{name} (armodal-eval)")
        if ev.get("ckpt") != str(ckpt.resolve()):
            raise ReproduceError(f"{name}: {eval_out} evaluates {ev.get('ckpt')}, not {ckpt}: stale, rerun armodal-eval")
        metrics.update(flat(ev))
        if isinstance(ev.get("test"), dict) and ev["test"].get("missing"):
            row["test_missing"] = ev["test"]["missing"]
    row["metrics"] = metrics
    row["run_dir"] = str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir)
    check_show(row)
    return row


def render(rows: list[dict]) -> str:
    lines = [
        "# armodal results",
        "",
        f"Generated by `python scripts/reproduce.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        "Per-modality details and targets: results/music.md, results/image.md, results/spatial.md, "
        "docs/PERFORMANCE.md.",
        "",
        "| experiment | val NLL (nats/token) | val bits/token | test NLL | other metrics | commands |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r.get("metrics", {})
        val = m.get("val.nll", m.get("train.val/nll"))
        bpt = m.get("val.bpt", m.get("train.val/bpt"))
        test = m.get("test.nll", "none" if r.get("test_missing") else None)
        skip = {"val.nll", "val.bpt", "test.nll", "val.ppl", "test.ppl", "val.tokens", "test.tokens", "test.bpt",
                "train.val/nll", "train.val/bpt", "train.val/ppl", "train.val/tokens", "train.step"}
        show = r.get("show")
        other = ", ".join(f"{k}={v:.4g}" for k, v in m.items()
                          if k not in skip and isinstance(v, (int, float)) and (show is None or k in show))
        fmt = lambda x: f"{x:.4f}" if isinstance(x, (int, float)) else (x or "—")  # noqa: E731
        cmds = "<br>".join(f"`{c}`" for c in r["commands"])
        lines.append(f"| {r['name']} | {fmt(val)} | {fmt(bpt)} | {fmt(test)} | {other or '—'} | {cmds} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated experiment names")
    ap.add_argument("--collect", action="store_true", help="do not train; collect the latest finished runs")
    ap.add_argument("--out", default="results/RESULTS.md")
    args = ap.parse_args(argv)
    entries = yaml.safe_load((ROOT / "scripts" / "reproduce.yaml").read_text())
    only = {s for s in args.only.split(",") if s}
    unknown = only - {entry_name(e) for e in entries}
    if unknown:
        raise ReproduceError(f"--only names entries that scripts/reproduce.yaml does not have: {sorted(unknown)}")
    rows = []
    for e in entries:
        name = entry_name(e)
        if only and name not in only:
            continue
        r = do_entry(e, args.collect)
        rows.extend(r if isinstance(r, list) else [r])
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    old_json = out.with_suffix(".json")
    if only and old_json.is_file():  # keep the rows of experiments not rerun this time
        fresh = {r["name"].split(" [")[0] for r in rows}
        kept = [r for r in json.loads(old_json.read_text()) if r["name"].split(" [")[0] not in fresh]
        by_name = {entry_name(e): e for e in entries}
        for r in kept:  # a kept row made by today's command gets today's show list, checked
            e = by_name.get(r["name"].split(" [")[0])
            if e is not None and r["commands"][:1] == [first_command(e)]:
                r["show"] = e.get("show")
                check_show(r)
            else:
                print(f"[reproduce] note: the row {r['name']!r} was made by an older command; rerun it", flush=True)
        rows = kept + rows
        order = [entry_name(e) for e in entries]
        rows.sort(key=lambda r: order.index(r["name"].split(" [")[0]) if r["name"].split(" [")[0] in order else 99)
    out.write_text(render(rows))
    (out.with_suffix(".json")).write_text(json.dumps(rows, indent=2))
    print(f"[armodal] wrote {out}")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        main()
    except ReproduceError as e:
        sys.exit(f"[reproduce] {e}")
