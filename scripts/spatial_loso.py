"""Nested leave-one-section-out on her2st: inner LOSO selects the settings, outer runs report.

Reads the plan from ``scripts/spatial_loso.yaml`` (sections, seeds, variants, candidates).  For every
outer fold F (the held-out section), with T its three training sections:

1. ``select`` (cheap, shared by the variants) -- every candidate of the image pipeline (e.g. the stain
   normalisation) is scored by the ridge probe on the fold's own encoder features of T only: for each v
   in T, ridge on T \ {v} (its L2 chosen inside, by leave-one-section-out on T \ {v}) predicts v; the
   candidate with the best mean PCC over the three v wins (ties: the first listed);
2. ``grid`` of a variant (optional, costly) -- each candidate AR setting is trained on T \ {v} and
   evaluated on v (``modality.data.sections`` = T only, so F is never read); best mean inner PCC wins.  The
   plan's ``inner_splits: n`` (default: all) uses only the first n sections of T as v (the budget); the
   encoder of the fold (fitted on T's images, no counts) is reused, so v's image is in it
   (``modality.data.ssl_test_image=true``, the same for every candidate);
3. outer runs -- the variant with the selected settings is trained on T with every seed and evaluated
   once on F (AR metrics, the in-run ridge baseline, coverage, Moran's I, the stain-robustness drop).

Every run is ``armodal-train`` then ``armodal-eval`` in a fresh folder under
``runs/spatial_loso/<tag>/<stamp>/``; ``manifest.json`` there lists each run with its command and
metrics file, and the table (``loso.md``, ``loso.json``) is built from that manifest only: runs of
other invocations (stale folds) are never collected.  ``--resume <stamp-folder>`` continues an
interrupted invocation; ``--collect <stamp-folder>`` rebuilds its table.

    OMP_NUM_THREADS=1 python scripts/spatial_loso.py --tag final
    OMP_NUM_THREADS=1 python scripts/spatial_loso.py --tag quick --folds C2 --variants raster --seeds 0 --dry-run
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from armodal.modalities.spatial import HISTOGENE_PCC, REG2ST_PCC  # the one place these numbers live
from armodal.utils.config import load_paths

ROOT = Path(__file__).resolve().parents[1]

BIN = Path(sys.executable).parent


def _candidates(grid: dict | list) -> list[list[str]]:
    """The candidates of a grid: a mapping config key -> values (every combination), or an explicit list of
    candidates, each a list of overrides (``[]``: the defaults), for options that go together."""
    if isinstance(grid, list):
        if not all(isinstance(c, list) for c in grid):
            raise ValueError(f"grid: an explicit list of candidates must hold lists of overrides, got {grid!r}")
        return [[str(o) for o in c] for c in grid] or [[]]
    keys = list(grid)
    if not keys:
        return [[]]
    return [[f"{k}={_fmt(v)}" for k, v in zip(keys, vals)] for vals in itertools.product(*(grid[k] for k in keys))]


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v).lower() if isinstance(v, bool) else str(v)


class Runner:
    """Runs train + eval pairs, records them in the manifest, skips those already done (resume)."""

    def __init__(self, out: Path, plan: dict, dry_run: bool, collect_only: bool = False, reuse: list | None = None) -> None:
        self.out, self.plan, self.dry_run, self.collect_only = out, plan, dry_run, collect_only
        # earlier invocations whose finished runs count as this one's when their commands are the same
        self.reuse = [(Path(r).resolve(), json.loads((Path(r) / "manifest.json").read_text())) for r in reuse or []]
        self.manifest_path = out / "manifest.json"
        self.manifest = json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else {"runs": {}}
        self.log = out / "log.txt"

    def _save(self) -> None:
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2))
        tmp.replace(self.manifest_path)

    def _call(self, cmd: list[str]) -> None:
        line = shlex.join(cmd)
        print("$", line, flush=True)
        if self.dry_run:
            return
        with open(self.log, "a") as f:
            f.write("$ " + line + "\n")
            f.flush()
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode:
            sys.exit(f"command failed ({r.returncode}); see {self.log}")

    def _reused(self, key: str, train: list[str], ev: list[str]) -> dict | None:
        """The metrics of run ``key`` of a ``--reuse`` invocation whose train and eval commands are this run's
        (up to the invocation folder), recorded in this manifest with where they came from; else None."""
        for folder, man in self.reuse:
            rec = man["runs"].get(key)
            if not rec or not Path(rec["metrics"]).is_file():
                continue
            same = [rec[k].replace(str(folder), str(self.out)) for k in ("train", "eval")] == [shlex.join(train), shlex.join(ev)]
            if not same:
                continue
            print(f"  {key}: reused from {folder}", flush=True)
            if not self.dry_run:
                self.manifest["runs"][key] = {**rec, "reused_from": str(folder)}
                self._save()
            return json.loads(Path(rec["metrics"]).read_text())
        return None

    def reused_select(self, key: str, candidates: list) -> dict | None:
        """The image-pipeline selection ``key`` of a ``--reuse`` invocation with the same candidates."""
        for folder, man in self.reuse:
            sel = man.get("select", {}).get(key)
            if sel and sel["candidates"] == candidates:
                return {**sel, "reused_from": str(folder)}
        return None

    def run(self, key: str, sections: list[str], test: str, seed: int, overrides: list[str], num_samples: int,
            eval_overrides: list[str]) -> dict | None:
        rec = self.manifest["runs"].get(key)
        if rec and Path(rec["metrics"]).is_file():
            return json.loads(Path(rec["metrics"]).read_text())
        if self.collect_only:
            sys.exit(f"{self.out}: run {key} is not finished (or its metrics file is gone); use --resume")
        run_dir = self.out / key
        metrics = run_dir / "eval" / "metrics.json"
        # overwrite=true: a run not recorded as finished (e.g. killed before its eval) is redone from scratch
        train = [str(BIN / "armodal-train"), "experiment=spatial_her2st", f"run_dir={run_dir}", "overwrite=true",
                 f"modality.data.sections=[{','.join(sections)}]", f"modality.data.test_section={test}",
                 f"seed={seed}", f"modality.data.seed={seed}", *self.plan["train"], *overrides]
        ev = [str(BIN / "armodal-eval"), f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"out={metrics}",
              f"num_samples={num_samples}", *eval_overrides]
        old = self._reused(key, train, ev)
        if old is not None:
            return old
        t0 = time.time()
        self._call(train)
        self._call(ev)
        if self.dry_run:
            return None
        if not metrics.is_file():
            sys.exit(f"{key}: armodal-eval wrote no {metrics}; see {self.log}")
        self.manifest["runs"][key] = {"train": shlex.join(train), "eval": shlex.join(ev), "metrics": str(metrics),
                                      "seconds": round(time.time() - t0)}
        self._save()
        m = json.loads(metrics.read_text())
        print(f"  {key}: AR {m['ar_pcc_mean']:.3f} ridge {m['ridge_pcc_mean']:.3f} ({round(time.time() - t0)} s)", flush=True)
        return m


def probe_select(options: dict, train_secs: list[str], data_overrides: list[str]) -> tuple[list[str], list[float]]:
    """Score every combination of ``options`` (config key -> values) by the inner-LOSO ridge probe on the
    training sections' encoder features (plain view) -> (winning overrides, mean inner PCC per candidate)."""
    import numpy as np

    from armodal.modalities.spatial import (FeatureConfig, FeatureExtractor, apply_panel, extract_patches, load_panel,
                                            normalize_log1p, pearson_per_gene, read_section, ridge_baseline)
    from armodal.modalities.spatial.features import _to_float
    from armodal.utils.config import CONF_DIR, register_resolvers

    cands = _candidates(options)
    if len(cands) == 1:
        return cands[0], [float("nan")]
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=spatial_her2st", *data_overrides])
    GlobalHydra.instance().clear()
    d = OmegaConf.to_container(cfg.modality.data, resolve=True)
    secs = {s: read_section(d["layout"], root=d["root"], section=s) for s in train_secs}
    norm, _ = apply_panel({s: normalize_log1p(a) for s, a in secs.items()}, load_panel(d["panel"]),
                          on_missing=d["on_missing_genes"])
    y = {s: np.asarray(a.X.todense() if hasattr(a.X, "todense") else a.X, np.float32) for s, a in norm.items()}
    base = FeatureConfig(**{**d["features"], "ssl_sections": train_secs})

    def cut(s):
        return extract_patches(secs[s], size=base.patch_size, unit=base.patch_unit, out_px=base.patch_px, outside=base.outside)[0]

    hires = {s: np.asarray(next(iter(a.uns["spatial"].values()))["images"]["hires"]) for s, a in secs.items()}
    enc = FeatureExtractor(base, d["cache_dir"], train_sections=train_secs,
                           train_patches=lambda: np.concatenate([cut(s) for s in train_secs]))
    patches = {s: enc.patches(s, lambda s=s: cut(s), list(secs[s].obs_names)) for s in train_secs}
    scores = []
    for cand in cands:
        fopts = {}
        for o in cand:
            k, v = o.split("=", 1)
            if not k.startswith("modality.data.features."):
                raise ValueError(f"select: {k} is not an image-pipeline setting (modality.data.features.*)")
            fopts[k.removeprefix("modality.data.features.")] = v
        fx = FeatureExtractor(FeatureConfig(**{**d["features"], "ssl_sections": train_secs, **fopts}), d["cache_dir"],
                              train_sections=train_secs, train_patches=lambda: np.concatenate([patches[s] for s in train_secs]),
                              reference_images=lambda: [hires[s] for s in train_secs])
        f = {s: fx.embed(_to_float(fx.prepare(patches[s], hires[s]))).numpy() for s in train_secs}
        inner = []
        for v in train_secs:
            rest = [s for s in train_secs if s != v]
            pred, _ = ridge_baseline(np.concatenate([f[s] for s in rest]), np.concatenate([y[s] for s in rest]),
                                     np.concatenate([[s] * len(f[s]) for s in rest]), f[v])
            inner.append(float(np.nanmean(pearson_per_gene(pred, y[v]))))
        scores.append(sum(inner) / len(inner))
        print(f"  probe {' '.join(cand)} on {train_secs}: inner PCC {[round(x, 4) for x in inner]} mean {scores[-1]:.4f}", flush=True)
    best = max(range(len(cands)), key=lambda i: (scores[i], -i))
    return cands[best], scores


def nested(runner: Runner, plan: dict, folds: list[str], variants: list[str], seeds: list[int]) -> dict:
    """Selection for every fold first, then the outer runs seed by seed (seed 0 of every fold and variant
    before seed 1), so an interrupted invocation still covers every fold."""
    sections = plan["sections"]
    result: dict = {"folds": {}, "select": {}}
    chosen: dict = {}
    for fold in folds:
        train_secs = [s for s in sections if s != fold]
        ssl = f"modality.data.features.ssl_sections=[{','.join(train_secs)}]"
        key = f"{fold}/select"
        if plan.get("select") and key not in runner.manifest.setdefault("select", {}):
            old = runner.reused_select(key, _candidates(plan["select"]))
            if old is not None:
                runner.manifest["select"][key] = old
                if not runner.dry_run:
                    runner._save()
            elif runner.dry_run or runner.collect_only:
                runner.manifest["select"][key] = {"candidates": _candidates(plan["select"]), "inner_pcc": [],
                                                  "selected": _candidates(plan["select"])[0]}
            else:
                best, scores = probe_select(plan["select"], train_secs, [*plan.get("data", [])])
                runner.manifest["select"][key] = {"candidates": _candidates(plan["select"]), "inner_pcc": scores,
                                                  "selected": best}
                runner._save()
        sel = runner.manifest.setdefault("select", {}).get(key, {"selected": [], "inner_pcc": [], "candidates": []})
        result["select"][fold] = sel
        for name in variants:
            var = plan["variants"][name]
            cands = _candidates(var.get("grid") or {})
            scores, inner_metrics = [], []
            for ci, cand in enumerate(cands):
                inner, inner_metrics_c = [], []
                for v in train_secs[: plan.get("inner_splits", len(train_secs))] if len(cands) > 1 else []:
                    m = runner.run(f"{fold}/{name}/inner_c{ci}_{v}", train_secs, v, plan["inner_seed"],
                                   [*plan.get("data", []), *sel["selected"], *var["fixed"], *cand, ssl,
                                    "modality.data.ssl_test_image=true"],
                                   plan["inner_num_samples"], plan["inner_eval"])
                    inner.append(None if m is None else m["ar_pcc_mean"])
                    inner_metrics_c.append(None if m is None else {k: m[k] for k in INNER_KEYS if k in m})
                inner_metrics.append(inner_metrics_c)
                scores.append(sum(inner) / len(inner) if inner and None not in inner else float("nan"))
            best = 0 if len(cands) == 1 else max(range(len(cands)), key=lambda i: (scores[i] if scores[i] == scores[i] else -1, -i))
            chosen[fold, name] = [*plan.get("data", []), *sel["selected"], *var["fixed"], *cands[best], ssl]
            result["folds"].setdefault(fold, {})[name] = {"candidates": cands, "inner_pcc": scores,
                                                          "selected": cands[best], "inner_metrics": inner_metrics, "runs": []}
    for seed in seeds:
        for fold in folds:
            for name in variants:
                m = runner.run(f"{fold}/{name}/seed{seed}", sections, fold, seed, chosen[fold, name], plan["num_samples"],
                               plan["eval"])
                result["folds"][fold][name]["runs"].append(m)
    return result


# ----------------------------------------------------------------------------- table
INNER_KEYS = ("ar_pcc_mean", "ridge_pcc_mean", "ar_coverage90", "ar_moran_ratio", "ar_stain_drop_low",
              "ar_stain_drop_medium", "ar_stain_drop_high", "ridge_stain_drop_medium")  # kept per inner run in loso.json


def inner_table(result: dict, variants: list[str]) -> str:
    """Every grid candidate's inner validation: mean over the inner splits of AR PCC, ridge PCC and the stain
    drops the plan's inner_eval measured (n/a where it left them out)."""
    out = ("Inner validation per candidate (mean over the inner splits; the outer fold is never read):\n\n"
           "| variant | fold | candidate | inner AR PCC | ridge PCC | AR stain drop low / medium / high "
           "| ridge stain drop medium | coverage 90 % |\n"
           "|---|---|---|---|---|---|---|---|\n")
    for v in variants:
        for f, r in result["folds"].items():
            if len(r[v]["candidates"]) < 2:
                continue
            for cand, ms in zip(r[v]["candidates"], r[v].get("inner_metrics", [])):
                ms = [m for m in ms if m is not None]

                def c(k, d=3, ms=ms):
                    vals = [m[k] for m in ms if k in m]
                    return f"{sum(vals) / len(vals):.{d}f}" if vals and len(vals) == len(ms) else "n/a"

                drops = " / ".join(c(f"ar_stain_drop_{s}") for s in ("low", "medium", "high"))
                sel = " (selected)" if cand == r[v]["selected"] else ""
                out += (f"| {v} | {f} | {' '.join(cand) or '(defaults)'}{sel} | {c('ar_pcc_mean')} | {c('ridge_pcc_mean')} "
                        f"| {drops} | {c('ridge_stain_drop_medium')} | {c('ar_coverage90')} |\n")
    return out + "\n"


def _ms(vals: list[float], digits: int = 3) -> str:
    vals = [v for v in vals if v is not None and v == v]
    if not vals:
        return "n/a"
    m = sum(vals) / len(vals)
    if len(vals) == 1:  # one seed: no spread to show
        return f"{m:.{digits}f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def _get(m: dict, key: str):
    if key not in m:
        raise KeyError(f"metrics of {m.get('test_section')} lack {key!r} (present: {sorted(m)})")
    return m[key]


def table(result: dict, variants: list[str]) -> str:
    folds = list(result["folds"])
    lines = ["| held-out | " + " | ".join(f"{v} AR PCC" for v in variants) + " | ridge PCC | best AR / ridge "
             "| HisToGene (public code, these folds) | Reg2ST (published, 31 sections) |",
             "|" + "---|" * (len(variants) + 5)]
    means = {v: [] for v in variants}
    ridge_all = []
    for f in folds:
        row = [f]
        for v in variants:
            vals = [_get(m, "ar_pcc_mean") for m in result["folds"][f][v]["runs"]]
            means[v].append(sum(vals) / len(vals))
            row.append(_ms(vals))
        ridge = [_get(m, "ridge_pcc_mean") for m in result["folds"][f][variants[0]]["runs"]]  # same features in every variant
        ridge_all.append(sum(ridge) / len(ridge))
        best = max(means[v][-1] for v in variants)
        row += [_ms(ridge), f"{best / ridge_all[-1]:.2f}", f"{HISTOGENE_PCC.get(f, float('nan')):.3f}",
                f"{REG2ST_PCC.get(f, float('nan')):.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    avg = ["**mean**"] + [f"**{sum(means[v]) / len(folds):.3f}**" for v in variants]
    hg = [HISTOGENE_PCC.get(f) for f in folds]
    rg = [REG2ST_PCC.get(f) for f in folds]
    avg += [f"{sum(ridge_all) / len(folds):.3f}", "",
            f"{sum(hg) / len(hg):.3f}" if None not in hg else "", f"{sum(rg) / len(rg):.3f}" if None not in rg else ""]
    lines.append("| " + " | ".join(avg) + " |")
    out = "\n".join(lines) + "\n\n"
    if any(sel.get("candidates") for sel in result.get("select", {}).values()):
        out += "Image pipeline selected per fold by the inner-LOSO ridge probe on the training sections:\n\n"
        out += "| held-out | candidates: mean inner PCC | selected |\n|---|---|---|\n"
        for f, sel in result["select"].items():
            cands = ", ".join(f"{' '.join(c)}: {x:.4f}" for c, x in zip(sel["candidates"], sel["inner_pcc"]))
            out += f"| {f} | {cands} | {' '.join(sel['selected'])} |\n"
        out += "\n"
    out += targets_table(result, variants)
    out += "Per variant (mean ± sd over seeds, per fold):\n\n"
    out += ("| variant | held-out | selected (inner LOSO) | inner PCC per candidate | AR PCC | ridge PCC | AR / ridge "
            "| coverage 90 % | Moran's I ratio AR (ridge) | one generated map's Moran ratio: codes only / with residual "
            "| stain drop low / medium / high |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    for v in variants:
        for f in folds:
            r = result["folds"][f][v]
            runs = r["runs"]
            ratio = [_get(m, "ar_pcc_mean") / _get(m, "ridge_pcc_mean") for m in runs]
            drops = " / ".join(_ms([m.get(f"ar_stain_drop_{s}") for m in runs], 2) for s in ("low", "medium", "high"))
            out += (f"| {v} | {f} | {' '.join(r['selected']) or '-'} | {', '.join(f'{x:.3f}' for x in r['inner_pcc'] if x == x) or '-'} "
                    f"| {_ms([_get(m, 'ar_pcc_mean') for m in runs])} | {_ms([_get(m, 'ridge_pcc_mean') for m in runs])} "
                    f"| {_ms(ratio, 2)} | {_ms([_get(m, 'ar_coverage90') for m in runs])} "
                    f"| {_ms([_get(m, 'ar_moran_ratio') for m in runs], 2)} ({_ms([_get(m, 'ridge_moran_ratio') for m in runs], 2)}) "
                    f"| {_ms([m.get('ar_generated_moran_ratio') for m in runs], 2)} / {_ms([_get(m, 'ar_sample_moran_ratio') for m in runs], 2)} "
                    f"| {drops} |\n")
    return out


def targets_table(result: dict, variants: list[str]) -> str:
    """The issue's columns in one table: AR PCC per variant, ridge, the best variant's ratio to ridge, the
    stain-robustness drop at medium, the median Moran's I ratio (predicted / measured, mean-of-K map; ridge last)
    and the 90 % coverage, per fold; the mean row over the folds.  With the same n > 1 seeds on every fold, each
    cell is mean ± sd over the seeds (the mean row: of the per-seed means over the folds)."""
    folds = list(result["folds"])

    def runs(f, v):
        return result["folds"][f][v]["runs"]

    def per_seed(v, key):
        """[seed] -> value: a fold's runs, or the mean over the folds of each seed's runs (None: not aligned)."""
        n = {len(runs(f, v)) for f in folds}
        if len(n) != 1 or any(m.get(key) is None for f in folds for m in runs(f, v)):
            return None
        return [sum(runs(f, v)[i][key] for f in folds) / len(folds) for i in range(n.pop())]

    def cell(f, v, key, digits=3):
        if f is None:  # the mean row
            vals = per_seed(v, key)
            if vals is not None:
                return _ms(vals, digits)
            per = [[m.get(key) for m in runs(g, v) if m.get(key) is not None] for g in folds]
            return f"{sum(sum(x) / len(x) for x in per) / len(per):.{digits}f}" if all(per) else "n/a"
        return _ms([m.get(key) for m in runs(f, v)], digits)

    def ratio(f):
        """The best variant's (by mean AR PCC) AR / ridge, per seed -> mean ± sd."""
        fs = folds if f is None else [f]

        def mean_over(v, key):  # the mean over the folds of each fold's mean over its seeds
            return sum(sum(m[key] for m in runs(g, v)) / len(runs(g, v)) for g in fs) / len(fs)

        best = max(variants, key=lambda v: mean_over(v, "ar_pcc_mean"))
        ar, ridge = (per_seed(best, "ar_pcc_mean"), per_seed(best, "ridge_pcc_mean")) if f is None else (
            [m["ar_pcc_mean"] for m in runs(f, best)], [m["ridge_pcc_mean"] for m in runs(f, best)])
        if ar is None:  # seeds not aligned over the folds: ratio of the means
            return f"{mean_over(best, 'ar_pcc_mean') / mean_over(best, 'ridge_pcc_mean'):.2f}"
        return _ms([a / r for a, r in zip(ar, ridge)], 2)

    vs = "/".join(variants)
    out = (f"Targets table (per fold: mean ± sd over the seeds, or the single seed; mean row: over the folds, ± sd over "
           f"the seeds; variants in the order {vs}):\n\n"
           "| held-out | " + " | ".join(f"{v} AR PCC" for v in variants) + " | ridge PCC | best AR / ridge "
           f"| stain drop at medium ({vs}) | Moran's I ratio ({vs} / ridge) | coverage 90 % ({vs}) |\n"
           "|" + "---|" * (len(variants) + 6) + "\n")
    for name, f in [(f, f) for f in folds] + [("**mean**", None)]:
        out += (f"| {name} | " + " | ".join(cell(f, v, "ar_pcc_mean") for v in variants)
                + f" | {cell(f, variants[0], 'ridge_pcc_mean')} | {ratio(f)} "
                + f"| {' / '.join(cell(f, v, 'ar_stain_drop_medium', 3) for v in variants)} "
                + f"| {' / '.join(cell(f, v, 'ar_moran_ratio', 2) for v in variants)} / {cell(f, variants[0], 'ridge_moran_ratio', 2)} "
                + f"| {' / '.join(cell(f, v, 'ar_coverage90', 3) for v in variants)} |\n")
    return out + "\n"


def summary_rows(result: dict, variants: list[str], invocation: str) -> list[dict]:
    """One row per (variant, fold) and per variant over the folds (means over seeds), for scripts/reproduce.py."""
    import statistics

    keys = {"ar_pcc_mean": "ar_pcc", "ridge_pcc_mean": "ridge_pcc", "ar_coverage90": "coverage90",
            "ar_moran_ratio": "moran_ratio", "ridge_moran_ratio": "ridge_moran_ratio",
            "ar_stain_drop_low": "stain_drop_low", "ar_stain_drop_medium": "stain_drop_medium",
            "ar_stain_drop_high": "stain_drop_high"}
    rows = []
    for v in variants:
        per_fold = []
        for f, r in result["folds"].items():
            runs = r[v]["runs"]
            row = {"row": f"{v} {f}", "invocation": invocation, "seeds": len(runs)}
            for k, name in keys.items():
                if k.startswith("ar_stain_drop_") and any(k not in m for m in runs):
                    row[name] = row[name + "_sd"] = float("nan")  # a strength the plan's robustness check left out
                    continue
                vals = [_get(m, k) for m in runs]
                row[name] = statistics.fmean(vals)
                row[name + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row["ar_over_ridge"] = row["ar_pcc"] / row["ridge_pcc"]
            per_fold.append(row)
        rows += per_fold
        names = [*keys.values(), *(n + "_sd" for n in keys.values()), "ar_over_ridge"]  # _sd: mean over folds of the seed sd
        rows.append({"row": f"{v} mean", "invocation": invocation, "seeds": per_fold[0]["seeds"],
                     **{k: statistics.fmean(r[k] for r in per_fold) for k in names}})
    return rows


def combine(folders: list[str], out: Path) -> dict:
    """One table from several finished invocations of the same plan and variants, with disjoint folds (each
    collected from its own manifest, as --collect does); with other seeds on some fold the mean row is the mean of
    the fold means, without an sd."""
    result: dict = {"folds": {}, "select": {}}
    first = None
    for folder in folders:
        inv = Path(folder).resolve()
        saved = json.loads((inv / "invocation.json").read_text())
        same = {k: saved[k] for k in ("plan", "variants")}  # seeds may differ (a fold cut by the budget)
        if first is None:
            first = same
        elif same != first:
            sys.exit(f"--combine: {inv} ran another plan or variants than {folders[0]}")
        if set(saved["folds"]) & set(result["folds"]):
            sys.exit(f"--combine: fold(s) {sorted(set(saved['folds']) & set(result['folds']))} of {inv} appear twice")
        r = nested(Runner(inv, saved["plan"], False, collect_only=True), saved["plan"], saved["folds"], saved["variants"],
                   saved["seeds"])
        result["folds"].update(r["folds"])
        result["select"].update(r["select"])
    result["combined_from"] = [str(Path(f).resolve()) for f in folders]
    out.mkdir(parents=True, exist_ok=True)
    (out / "loso.json").write_text(json.dumps(result, indent=2, default=str))
    md = table(result, first["variants"])
    (out / "loso.md").write_text(md)
    # the combined table's rows for scripts/reproduce.py (an entry whose script is this --combine command)
    (out / "rows.json").write_text(json.dumps(summary_rows(result, first["variants"], out.name), indent=2))
    print(md)
    print(f"written: {out / 'loso.md'}, {out / 'loso.json'}, {out / 'rows.json'}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default=str(ROOT / "scripts" / "spatial_loso.yaml"))
    ap.add_argument("--tag", default="main")
    ap.add_argument("--folds", nargs="+", default=None, help="outer folds (default: every section of the plan)")
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--resume", default=None, help="continue the invocation in this folder")
    ap.add_argument("--collect", default=None, help="only rebuild the table of the invocation in this folder")
    ap.add_argument("--reuse", nargs="+", default=[], help="earlier invocation folders: their finished runs whose "
                    "train and eval commands are the same (up to the folder) count as this one's, and so does their "
                    "image-pipeline selection with the same candidates")
    ap.add_argument("--combine", nargs="+", default=None, help="finished invocation folders of one plan (e.g. one per "
                    "fold): one table of all their folds, written to --out")
    ap.add_argument("--out", default=None, help="with --combine: the folder for its loso.md / loso.json")
    ap.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = ap.parse_args()
    if args.combine:
        if not args.out:
            sys.exit("--combine needs --out FOLDER")
        combine(args.combine, Path(args.out))
        return
    plan = yaml.safe_load(Path(args.plan).read_text())
    folder = args.collect or args.resume
    if folder:
        out = Path(folder).resolve()
        saved = json.loads((out / "invocation.json").read_text())
        plan, folds, variants, seeds = saved["plan"], saved["folds"], saved["variants"], saved["seeds"]
        reuse = saved.get("reuse", [])
    else:
        folds = args.folds or plan["sections"]
        variants = args.variants or list(plan["variants"])
        seeds = args.seeds if args.seeds is not None else plan["seeds"]
        reuse = [str(Path(r).resolve()) for r in args.reuse]
        unknown = [f for f in folds if f not in plan["sections"]] + [v for v in variants if v not in plan["variants"]]
        if unknown:
            sys.exit(f"unknown fold(s) / variant(s) {unknown}; the plan has sections {plan['sections']} and "
                     f"variants {list(plan['variants'])}")
        out = load_paths()["runs_dir"] / "spatial_loso" / args.tag / time.strftime("%Y%m%d-%H%M%S")  # ARMODAL_RUNS applies
        if not args.dry_run:
            out.mkdir(parents=True, exist_ok=False)
            (out / "invocation.json").write_text(json.dumps(
                {"argv": sys.argv, "plan": plan, "folds": folds, "variants": variants, "seeds": seeds, "reuse": reuse},
                indent=2))
    runner = Runner(out, plan, args.dry_run, collect_only=bool(args.collect), reuse=reuse)
    result = nested(runner, plan, folds, variants, seeds)
    if args.dry_run:
        return
    (out / "loso.json").write_text(json.dumps(result, indent=2, default=str))
    grids = any(len(r[v]["candidates"]) > 1 for r in result["folds"].values() for v in variants)
    if not seeds:  # a plan of inner validation only (e.g. measuring options on the training sections)
        md = inner_table(result, variants)
        (out / "loso.md").write_text(md)
        print(md)
        print(f"written: {out / 'loso.md'}, {out / 'loso.json'} (no outer runs: no rows.json)")
        return
    md = table(result, variants) + (inner_table(result, variants) if grids else "")
    (out / "loso.md").write_text(md)
    rows = out.parent / "rows.json"  # the tag's latest complete invocation, for scripts/reproduce.py
    rows.write_text(json.dumps(summary_rows(result, variants, out.name), indent=2))
    print(md)
    print(f"written: {out / 'loso.md'}, {out / 'loso.json'}, {rows}")


if __name__ == "__main__":
    main()
