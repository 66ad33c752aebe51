"""scripts/spatial_loso.py: the nesting (inner runs never see the outer fold, the best inner candidate is
the one trained on the outer fold), mean +- sd over seeds, and collection from the invocation's own
manifest only (no stale folds)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("spatial_loso", ROOT / "scripts" / "spatial_loso.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["spatial_loso"] = mod
    spec.loader.exec_module(mod)
    return mod


PLAN = {"sections": ["A", "B", "C", "D"], "seeds": [0, 1, 2], "inner_seed": 0, "num_samples": 8, "inner_num_samples": 4,
        "train": [], "eval": [], "inner_eval": [],
        "variants": {"w": {"fixed": ["modality.data.sequence=window"], "grid": {"x.k": [1, 2]}}}}


def _metrics(test, pcc, ridge=0.1):
    m = {"test_section": test, "ar_pcc_mean": pcc, "ridge_pcc_mean": ridge, "ar_coverage90": 0.9, "ar_moran_ratio": 1.1,
         "ridge_moran_ratio": 1.5, "ar_sample_moran_ratio": 0.7}
    m.update({f"ar_stain_drop_{s}": 0.05 for s in ("low", "medium", "high")})
    return m


def test_nested_selection_never_reads_the_outer_fold(tmp_path):
    mod = _script()
    calls = []

    class Fake(mod.Runner):
        def run(self, key, sections, test, seed, overrides, num_samples, eval_overrides):
            calls.append((key, tuple(sections), test, seed, tuple(overrides)))
            good = "x.k=2" in overrides
            return _metrics(test, (0.2 if good else 0.1) + 0.01 * seed)

    res = mod.nested(Fake(tmp_path, PLAN, dry_run=False), PLAN, ["A"], ["w"], [0, 1, 2])
    inner = [c for c in calls if "inner" in c[0]]
    outer = [c for c in calls if "seed" in c[0]]
    assert len(inner) == 2 * 3 and len(outer) == 3
    assert all("A" not in c[1] and c[2] != "A" for c in inner)  # the outer fold is not even in the inner section list
    assert all("modality.data.ssl_test_image=true" in c[4] for c in inner)  # the fold's encoder, reused
    assert not any("modality.data.ssl_test_image=true" in c[4] for c in outer)
    assert all(c[2] == "A" and "x.k=2" in c[4] for c in outer)  # the better inner candidate is the one run outside
    r = res["folds"]["A"]["w"]
    assert r["selected"] == ["x.k=2"] and r["inner_pcc"] == pytest.approx([0.1, 0.2])
    md = mod.table(res, ["w"])
    assert "0.210 ± 0.010" in md  # mean +- sd over the three seeds
    assert "| w | A | x.k=2 |" in md


def test_collect_reads_only_its_own_manifest(tmp_path, monkeypatch):
    mod = _script()
    plan = dict(PLAN, variants={"w": {"fixed": [], "grid": {}}}, seeds=[0])
    tag = tmp_path / "runs" / "spatial_loso" / "t"
    inv = tag / "20260101-000000"
    inv.mkdir(parents=True)
    (inv / "invocation.json").write_text(json.dumps({"plan": plan, "folds": ["A"], "variants": ["w"], "seeds": [0]}))
    stale = tag / "old" / "A" / "w" / "seed0" / "eval" / "metrics.json"  # a fold of an earlier invocation
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps(_metrics("A", 0.777)))
    monkeypatch.setattr(sys, "argv", ["spatial_loso.py", "--collect", str(inv)])
    with pytest.raises(SystemExit, match="not finished"):
        mod.main()
    mine = inv / "A" / "w" / "seed0" / "eval" / "metrics.json"
    mine.parent.mkdir(parents=True)
    mine.write_text(json.dumps(_metrics("A", 0.3)))
    (inv / "manifest.json").write_text(json.dumps({"runs": {"A/w/seed0": {"metrics": str(mine)}}}))
    mod.main()
    md = (inv / "loso.md").read_text()
    assert "| 0.300 |" in md and "0.777" not in md and "± 0.000" not in md  # one seed: the value, no made-up spread


def test_plan_file_is_consistent():
    import yaml

    mod = _script()
    plan = yaml.safe_load((ROOT / "scripts" / "spatial_loso.yaml").read_text())
    assert plan["sections"] == ["C2", "C3", "C4", "C5"] and len(plan["seeds"]) == 3
    for name, v in plan["variants"].items():
        assert mod._candidates(v.get("grid") or {}), name


def test_reduced_plan_differs_only_in_budget():
    import yaml

    full = yaml.safe_load((ROOT / "scripts" / "spatial_loso.yaml").read_text())
    red = yaml.safe_load((ROOT / "scripts" / "spatial_loso_reduced.yaml").read_text())
    for k in ("sections", "select", "data", "variants", "inner_seed", "inner_eval"):
        assert red[k] == full[k], k


def test_table_with_the_robustness_check_at_medium_only():
    mod = _script()

    def m(f, pcc):
        d = _metrics(f, pcc)
        del d["ar_stain_drop_low"], d["ar_stain_drop_high"]
        return d

    res = {"folds": {f: {"s": {"runs": [m(f, 0.1)], "selected": [], "inner_pcc": []},
                         "w": {"runs": [m(f, 0.25)], "selected": [], "inner_pcc": []}} for f in ("A", "B")}}
    md = mod.table(res, ["s", "w"])
    assert "| A | 0.100 | 0.250 | 0.100 | 2.50 | 0.050 / 0.050 | 1.10 / 1.10 / 1.50 | 0.900 / 0.900 |" in md
    assert "| **mean** | 0.100 | 0.250 | 0.100 | 2.50 |" in md
    assert "n/a / 0.05 / n/a" in md
    rows = mod.summary_rows(res, ["s", "w"], "stamp")
    assert rows[0]["stain_drop_medium"] == pytest.approx(0.05) and rows[0]["stain_drop_low"] != rows[0]["stain_drop_low"]


def test_summary_rows_for_reproduce():
    mod = _script()
    res = {"folds": {f: {"w": {"runs": [_metrics(f, 0.2 + 0.01 * s) for s in range(3)]}} for f in ("A", "B")}}
    rows = mod.summary_rows(res, ["w"], "stamp")
    assert [r["row"] for r in rows] == ["w A", "w B", "w mean"]
    assert rows[0]["ar_pcc"] == pytest.approx(0.21) and rows[0]["ar_pcc_sd"] == pytest.approx(0.01)
    assert rows[2]["ar_over_ridge"] == pytest.approx(2.1) and set(rows[0]) - {"invocation"} <= set(rows[2])


def test_inner_splits_limits_the_inner_validation_sections(tmp_path):
    mod = _script()
    calls = []

    class Fake(mod.Runner):
        def run(self, key, sections, test, seed, overrides, num_samples, eval_overrides):
            calls.append((key, tuple(sections), test))
            return _metrics(test, 0.1)

    plan = dict(PLAN, inner_splits=1)
    mod.nested(Fake(tmp_path, plan, dry_run=False), plan, ["B"], ["w"], [0])
    inner = [c for c in calls if "inner" in c[0]]
    assert [c[2] for c in inner] == ["A", "A"] and all(c[1] == ("A", "C", "D") for c in inner)  # 2 candidates x 1 split


@pytest.mark.parametrize("name, grids", [
    ("corruption", {"spot": {}, "raster": {"modality.data.neighbour_corruption": [0.0, 0.3, 0.7]}}),
    ("steps", {"spot": {"trainer.max_steps": [100, 300]}, "raster": {"trainer.max_steps": [100, 300]}}),
])
def test_session4_plans_add_only_their_grid_to_the_reduced_plan(name, grids):
    import yaml

    red = yaml.safe_load((ROOT / "scripts" / "spatial_loso_reduced.yaml").read_text())
    plan = yaml.safe_load((ROOT / "scripts" / f"spatial_loso_{name}.yaml").read_text())
    for k in ("sections", "select", "data", "seeds", "inner_seed", "num_samples", "train", "eval", "inner_eval"):
        assert plan[k] == red[k], k
    assert plan["inner_splits"] == 1 and set(plan["variants"]) == set(grids)
    for v, grid in grids.items():
        assert plan["variants"][v]["fixed"] == red["variants"][v]["fixed"] and plan["variants"][v]["grid"] == grid


def test_explicit_candidates_and_an_inner_only_plan(tmp_path):
    mod = _script()
    calls = []

    class Fake(mod.Runner):
        def run(self, key, sections, test, seed, overrides, num_samples, eval_overrides):
            calls.append((key, test, tuple(overrides)))
            m = _metrics(test, 0.2 if "p=1" in overrides else 0.1)
            m["ar_stain_drop_medium"] = 0.3 if "q=1" in overrides else 0.05
            return m

    plan = dict(PLAN, seeds=[], inner_splits=1, variants={"s": {"fixed": [], "grid": [[], ["p=1"], ["p=1", "q=1"]]}})
    assert mod._candidates(plan["variants"]["s"]["grid"]) == [[], ["p=1"], ["p=1", "q=1"]]
    with pytest.raises(ValueError, match="lists of overrides"):
        mod._candidates(["p=1"])
    res = mod.nested(Fake(tmp_path, plan, dry_run=False), plan, ["A"], ["s"], [])
    assert [c[0] for c in calls] == ["A/s/inner_c0_B", "A/s/inner_c1_B", "A/s/inner_c2_B"]  # no outer run
    assert ("p=1", "q=1") == calls[2][2][-4:-2]  # both overrides of a candidate go together
    md = mod.inner_table(res, ["s"])
    assert "| s | A | p=1 (selected) | 0.200 | 0.100 | 0.050 / 0.050 / 0.050 |" in md
    assert "| s | A | p=1 q=1 | 0.200 | 0.100 | 0.050 / 0.300 / 0.050 |" in md


def test_reuse_takes_only_runs_with_the_same_commands(tmp_path):
    mod = _script()
    plan = dict(PLAN, seeds=[0], variants={"w": {"fixed": ["a=1"], "grid": {}}, "v": {"fixed": ["a=2"], "grid": {}}})
    old = tmp_path / "old"
    dry = mod.Runner(old, plan, dry_run=True)
    cmds = {}
    dry._call = lambda cmd: cmds.setdefault(cmd[0].rsplit("/", 1)[-1], []).append(mod.shlex.join(cmd))
    dry.run("A/w/seed0", ["A", "B"], "A", 0, ["a=1"], 8, [])  # the command an earlier invocation ran
    metrics = old / "A" / "w" / "seed0" / "eval" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps(_metrics("A", 0.42)))
    man = {"runs": {k: {"train": cmds["armodal-train"][0], "eval": cmds["armodal-eval"][0], "metrics": str(metrics)}
                    for k in ("A/w/seed0", "A/v/seed0")}}  # v's recorded command differs from what v runs now
    (old / "manifest.json").write_text(json.dumps(man))
    new = tmp_path / "new"
    new.mkdir()
    ran = []
    r = mod.Runner(new, plan, dry_run=False, reuse=[old])
    r._call = lambda cmd: ran.append(cmd[0].rsplit("/", 1)[-1])
    assert r.run("A/w/seed0", ["A", "B"], "A", 0, ["a=1"], 8, [])["ar_pcc_mean"] == 0.42 and not ran
    assert json.loads((new / "manifest.json").read_text())["runs"]["A/w/seed0"]["reused_from"] == str(old.resolve())
    with pytest.raises(SystemExit, match="wrote no"):  # not reused: it is run (and here writes nothing)
        r.run("A/v/seed0", ["A", "B"], "A", 0, ["a=2"], 8, [])
    assert ran == ["armodal-train", "armodal-eval"]


def test_session5_plans_are_the_steps_plan_with_their_change():
    import yaml

    steps = yaml.safe_load((ROOT / "scripts" / "spatial_loso_steps.yaml").read_text())
    seeds = yaml.safe_load((ROOT / "scripts" / "spatial_loso_seeds.yaml").read_text())
    enc = yaml.safe_load((ROOT / "scripts" / "spatial_loso_encoder.yaml").read_text())
    for k in ("sections", "select", "data", "inner_seed", "inner_splits", "num_samples", "train", "eval"):
        assert seeds[k] == steps[k] and enc[k] == steps[k], k
    assert seeds["seeds"] == [0, 1, 2] and enc["seeds"] == []
    for v in ("spot", "raster"):  # 300 steps fixed, appended where the steps plan's grid value went: same commands
        assert seeds["variants"][v] == {"fixed": [*steps["variants"][v]["fixed"], "trainer.max_steps=300"], "grid": {}}
    assert seeds["variants"]["hilbert"]["fixed"] == ["modality.data.sequence=window", "modality.data.order=hilbert",
                                                      "trainer.max_steps=300"]
    assert enc["variants"]["spot"]["fixed"] == seeds["variants"]["spot"]["fixed"]
    assert enc["variants"]["spot"]["grid"][0] == [] and enc["inner_eval"][-1] == "evaluator.robustness=[medium]"


def test_combine_per_fold_invocations_mean_and_sd_over_seeds(tmp_path, monkeypatch):
    mod = _script()
    plan = dict(PLAN, variants={"w": {"fixed": [], "grid": {}}}, seeds=[0, 1])
    invs = []
    for fold, base in (("A", 0.2), ("B", 0.4)):
        inv = tmp_path / fold
        runs = {}
        for seed in (0, 1):
            m = inv / fold / "w" / f"seed{seed}" / "eval" / "metrics.json"
            m.parent.mkdir(parents=True)
            m.write_text(json.dumps(_metrics(fold, base + 0.02 * seed, ridge=0.2)))
            runs[f"{fold}/w/seed{seed}"] = {"metrics": str(m)}
        (inv / "manifest.json").write_text(json.dumps({"runs": runs}))
        (inv / "invocation.json").write_text(json.dumps({"plan": plan, "folds": [fold], "variants": ["w"], "seeds": [0, 1]}))
        invs.append(str(inv))
    monkeypatch.setattr(sys, "argv", ["spatial_loso.py", "--combine", *invs, "--out", str(tmp_path / "all")])
    mod.main()
    md = (tmp_path / "all" / "loso.md").read_text()
    assert "| A | 0.210 ± 0.014 | 0.200 ± 0.000 | 1.05 ± 0.07 |" in md
    # over the folds: per seed 0.30 and 0.32 -> 0.310 ± 0.014; ratio per seed 1.50, 1.60
    assert "| **mean** | 0.310 ± 0.014 | 0.200 ± 0.000 | 1.55 ± 0.07 |" in md
    rows = {r["row"]: r for r in json.loads((tmp_path / "all" / "rows.json").read_text())}  # for scripts/reproduce.py
    assert list(rows) == ["w A", "w B", "w mean"] and rows["w A"]["seeds"] == 2 and rows["w A"]["invocation"] == "all"
    assert rows["w B"]["ar_pcc"] == pytest.approx(0.41) and rows["w mean"]["ar_pcc"] == pytest.approx(0.31)
    # a fold cut to one seed: its cell is that seed, the mean row the mean of the fold means (no sd)
    (tmp_path / "B" / "invocation.json").write_text(json.dumps({"plan": plan, "folds": ["B"], "variants": ["w"], "seeds": [0]}))
    mod.combine(invs, tmp_path / "y")
    md = (tmp_path / "y" / "loso.md").read_text()
    assert "| B | 0.400 | 0.200 | 2.00 |" in md and "| **mean** | 0.305 | 0.200 | 1.53 |" in md
    other = dict(plan, eval=["x=1"])
    (tmp_path / "A" / "invocation.json").write_text(json.dumps({"plan": other, "folds": ["A"], "variants": ["w"], "seeds": [0, 1]}))
    with pytest.raises(SystemExit, match="another plan"):
        mod.combine(invs, tmp_path / "x")


def test_winsteps_plan_reruns_the_recorded_slot_runs_at_300_steps_and_600_overrides_it(tmp_path):
    """scripts/spatial_loso_winsteps.yaml: the spot-key plan's recipe; its 300-step candidate gives, key and command,
    the run the spot-key invocations recorded for spot_key=slot (so --reuse takes it over), and its 600-step candidate
    is the same command with trainer.max_steps=600 last, which the composed config then holds (schedule included)."""
    import yaml

    from conftest import compose_cfg

    plan = yaml.safe_load((ROOT / "scripts" / "spatial_loso_winsteps.yaml").read_text())
    key = yaml.safe_load((ROOT / "scripts" / "spatial_loso_spotkey.yaml").read_text())
    for k in ("sections", "select", "data", "inner_seed", "inner_splits", "num_samples", "inner_num_samples", "train",
              "eval", "inner_eval"):
        assert plan[k] == key[k], k
    mod = _script()
    r = mod.Runner(tmp_path, plan, dry_run=True)
    cmds = []
    r._call = lambda cmd: cmds.append(mod.shlex.join(cmd))
    mod.nested(r, plan, ["C2"], ["raster_key"], [])
    trains = [c for c in cmds if c.split()[0].endswith("armodal-train")]
    recorded = ("'modality.data.sections=[C3,C4,C5]' modality.data.test_section=C3 seed=0 modality.data.seed=0 logger=csv "
                "callbacks.progress.refresh_rate=0 trainer.max_steps=300 trainer.val_check_interval=50 "
                "module.scheduler.warmup_steps=10 modality.data.features.stain_norm=none modality.data.sequence=window "
                "modality.data.order=raster modality.conditioner.n_keys=81 modality.data.spot_key=slot "
                "'modality.data.features.ssl_sections=[C3,C4,C5]' modality.data.ssl_test_image=true")
    assert len(trains) == 2 and f"C2/raster_key/inner_c1_C3 overwrite=true {recorded}" in trains[1]
    assert f"C2/raster_key/inner_c0_C3 overwrite=true " in trains[0]
    assert trains[0].split(" overwrite=true ")[1] == recorded.replace("spot_key=slot", "spot_key=slot trainer.max_steps=600")
    cfg = compose_cfg("train", ["experiment=spatial_her2st", *trains[0].split(" overwrite=true ")[1].replace("'", "").split()])
    assert cfg.trainer.max_steps == 600 and cfg.module.scheduler.total_steps == 600


def test_winsteps1200_plan_reruns_the_recorded_600_step_runs_and_adds_only_the_1200_step_inner_runs(tmp_path):
    """scripts/spatial_loso_winsteps1200.yaml: every run of scripts/spatial_loso_winsteps.yaml whose 600-step runs were
    recorded (inner c0 and the outer seeds, with 600 selected), key and command, is a run of this plan (so --reuse takes
    it over); the only other runs are the 1200-step inner ones (c1), the same command with trainer.max_steps=1200, which
    the composed config then holds (LR schedule included)."""
    import yaml

    from conftest import compose_cfg

    mod = _script()

    def commands(name):
        plan = yaml.safe_load((ROOT / "scripts" / name).read_text())
        r = mod.Runner(tmp_path, plan, dry_run=True)
        cmds = {}
        r._call = lambda cmd: cmds.setdefault(cmd[2 if cmd[0].endswith("armodal-train") else 1], []).append(mod.shlex.join(cmd))
        mod.nested(r, plan, plan["sections"], ["raster_key"], [0, 1, 2])  # dry run: c0 (600) selected in both plans
        return cmds

    old, new = commands("spatial_loso_winsteps.yaml"), commands("spatial_loso_winsteps1200.yaml")
    recorded = {k: v for k, v in old.items() if "inner_c1_" not in k}  # old c1 = the 300-step runs
    assert len(recorded) == 4 * 2 + 4 * 3 * 2  # inner c0 train + eval per fold, outer train + eval per fold and seed
    assert all(new[k] == v for k, v in recorded.items())
    extra = {k: v for k, v in new.items() if k not in recorded}
    c1 = [k for k in extra if "inner_c1_" in k]
    assert len(extra) == 8 and len(c1) == 8  # the 1200-step inner train + eval of each fold, nothing else
    for k in c1:
        if k.startswith("run_dir="):
            c0 = recorded[k.replace("inner_c1_", "inner_c0_")][0].replace("inner_c1_", "inner_c0_")
            assert new[k][0].replace("inner_c1_", "inner_c0_") == c0.replace("trainer.max_steps=600", "trainer.max_steps=1200")
    train = next(v[0] for k, v in extra.items() if k.startswith("run_dir="))
    cfg = compose_cfg("train", ["experiment=spatial_her2st", *train.split(" overwrite=true ")[1].replace("'", "").split()])
    assert cfg.trainer.max_steps == 1200 and cfg.module.scheduler.total_steps == 1200


def test_hilbertkey600_plan_is_the_raster_600_step_outer_runs_with_the_hilbert_order(tmp_path):
    """scripts/spatial_loso_hilbertkey600.yaml: every outer run (fold, seed) is the raster 600-step plan's outer run of
    that fold and seed (scripts/spatial_loso_winsteps.yaml, 600 selected) with order=raster -> order=hilbert and nothing
    else, and it has no inner runs (the length and the stain selection are taken over, not re-selected)."""
    import yaml

    mod = _script()

    def commands(name, variant):
        plan = yaml.safe_load((ROOT / "scripts" / name).read_text())
        r = mod.Runner(tmp_path, plan, dry_run=True)
        cmds = []
        r._call = lambda cmd: cmds.append(mod.shlex.join(cmd))
        mod.nested(r, plan, plan["sections"], [variant], [0, 1, 2])  # dry run: c0 (600 steps) selected for raster
        return [c for c in cmds if "/inner_" not in c]

    raster, hilbert = commands("spatial_loso_winsteps.yaml", "raster_key"), commands("spatial_loso_hilbertkey600.yaml", "hilbert_key")
    assert len(hilbert) == len(raster) == 4 * 3 * 2 and all("/seed" in c for c in hilbert)
    assert hilbert == [c.replace("/raster_key/", "/hilbert_key/").replace("modality.data.order=raster", "modality.data.order=hilbert")
                       for c in raster]
    assert sum("trainer.max_steps=600" in c for c in hilbert) == 4 * 3


def test_orders_table_one_column_per_model_and_the_same_folds(tmp_path, monkeypatch):
    """scripts/spatial_orders_table.py: per fold mean ± sd over that model's seeds, best AR / ridge over the models,
    the mean row over the fold means; models covering other folds are refused."""
    spec = importlib.util.spec_from_file_location("spatial_orders_table", ROOT / "scripts" / "spatial_orders_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, pccs in (("a", {"A": [0.10, 0.12], "B": [0.20]}), ("b", {"A": [0.30, 0.30, 0.30], "B": [0.10, 0.14]})):
        (tmp_path / name).mkdir()
        folds = {f: {"v": {"runs": [_metrics(f, p, ridge=0.2) for p in ps]}} for f, ps in pccs.items()}
        (tmp_path / name / "loso.json").write_text(json.dumps({"folds": folds}))
    md = mod.render(mod.load([f"x={tmp_path / 'a'}:v", f"y={tmp_path / 'b'}:v"]))
    assert "| A | 0.110 ± 0.014 | 0.300 ± 0.000 | 0.200 ± 0.000 | 1.50 | 0.050 ± 0.000 / 0.050 ± 0.000 |" in md
    assert "| B | 0.200 | 0.120 ± 0.028 | 0.200 | 1.00 |" in md
    assert "| **mean** | **0.155** | **0.210** | 0.200 | 1.25 |" in md and "x: A 2, B 1; y: A 3, B 2" in md
    (tmp_path / "b" / "loso.json").write_text(json.dumps({"folds": {"A": {"v": {"runs": [_metrics("A", 0.3)]}}}}))
    with pytest.raises(SystemExit, match="other folds"):
        mod.load([f"x={tmp_path / 'a'}:v", f"y={tmp_path / 'b'}:v"])
