"""scripts/reproduce.py collects what it is asked to, or stops with a message: a missing metrics file,
a ``show`` key naming no metric, an unfinished or foreign run, or a stale eval file never turn into a
silently missing row.  Runs here are folders written the way armodal-train / armodal-eval write them."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from armodal.utils.config import ROOT_DIR


@pytest.fixture
def rp(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("reproduce_under_test", ROOT_DIR / "scripts" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    monkeypatch.setenv("ARMODAL_RUNS", str(tmp_path / "runs"))  # where conf/paths puts runs
    (tmp_path / "scripts").mkdir()
    return mod


def _run(root: Path, name: str, stamp: str, command: str | None, finished: bool = True, age: float = 10.0,
         nll: float = 1.0) -> Path:
    """A run folder as train() leaves it; ``age`` seconds in the past."""
    d = root / "runs" / name / stamp
    (d / "checkpoints").mkdir(parents=True)
    ckpt = d / "checkpoints" / "best.ckpt"
    ckpt.write_bytes(b"weights")
    m = {"global_step": 10, "best": {"val/nll": nll}, "num_params": 5, "train_seconds_this_session": 1.0}
    if finished:
        m |= {"run_dir": str(d), "command": command}
    (d / "metrics.json").write_text(json.dumps(m))
    ev = {"ckpt": str(ckpt.resolve()), "val": {"nll": nll, "bpt": 1.0}, "test": {"nll": nll + 0.1}}
    (d / "eval_metrics.json").write_text(json.dumps(ev))
    t = time.time() - age
    for f in (ckpt, d / "eval_metrics.json", d / "metrics.json"):
        os.utime(f, (t, t))
        t += 1  # eval after the checkpoint
    return d


def test_collect_takes_the_newest_finished_run_of_the_entrys_command(rp, tmp_path):
    good = _run(tmp_path, "toy", "a", "armodal-train experiment=toy", age=300, nll=0.5)
    _run(tmp_path, "toy", "b", "armodal-train experiment=toy trainer.max_steps=4", age=200, nll=9.0)  # a probe
    _run(tmp_path, "toy", "c", None, finished=False, age=100, nll=8.0)  # killed mid-run
    row = rp.do_entry({"experiment": "toy", "train": [], "eval": [], "show": ["train.steps"]}, collect_only=True)
    assert row["run_dir"] == str(good.relative_to(tmp_path)) and row["metrics"]["val.nll"] == 0.5
    with pytest.raises(rp.ReproduceError, match=r"no finished run of `armodal-train experiment=toy x=1`.*"
                                                r"a \(started by .*b \(started by .*c \(unfinished\)"):
        rp.do_entry({"experiment": "toy", "train": ["x=1"], "eval": []}, collect_only=True)


def test_a_named_entry_is_a_second_run_of_its_experiment(rp, tmp_path):
    """``name`` + ``experiment`` (e.g. the distilled JSB student beside music_jsb): the row carries the name,
    the run is the experiment's, with the entry's overrides."""
    _run(tmp_path, "toy", "a", "armodal-train experiment=toy", age=300, nll=0.5)
    _run(tmp_path, "toy", "b", "armodal-train experiment=toy x=1", age=200, nll=0.4)
    row = rp.do_entry({"name": "toy_x", "experiment": "toy", "train": ["x=1"], "eval": []}, collect_only=True)
    assert row["name"] == "toy_x" and row["metrics"]["val.nll"] == 0.4
    assert row["commands"][0] == "armodal-train experiment=toy x=1"


def test_unknown_show_key_stops_with_a_hint(rp, tmp_path):
    _run(tmp_path, "toy", "a", "armodal-train experiment=toy")
    with pytest.raises(rp.ReproduceError, match=r"toy: show names .*'val.nl' \(close: \['val.nll'"):
        rp.do_entry({"experiment": "toy", "train": [], "eval": [], "show": ["val.nl"]}, collect_only=True)


def test_missing_and_stale_metrics_files_stop_the_script(rp, tmp_path):
    d = _run(tmp_path, "toy", "a", "armodal-train experiment=toy")
    entry = {"experiment": "toy", "train": [], "eval": []}
    ckpt = d / "checkpoints" / "best.ckpt"
    later = time.time() + 60
    os.utime(ckpt, (later, later))  # the checkpoint changed after the eval: its numbers describe older weights
    with pytest.raises(rp.ReproduceError, match="eval_metrics.json is older than the checkpoint"):
        rp.do_entry(entry, collect_only=True)
    ev = json.loads((d / "eval_metrics.json").read_text())
    (d / "eval_metrics.json").write_text(json.dumps(ev | {"ckpt": "/elsewhere/last.ckpt"}))
    with pytest.raises(rp.ReproduceError, match="evaluates /elsewhere/last.ckpt"):
        rp.do_entry(entry, collect_only=True)
    (d / "eval_metrics.json").unlink()
    with pytest.raises(rp.ReproduceError, match=r"toy \(armodal-eval\): metrics file .*eval_metrics.json not found"):
        rp.do_entry(entry, collect_only=True)
    script = {"name": "ens", "script": "python scripts/x.py", "metrics": "runs/ens/out.json"}
    with pytest.raises(rp.ReproduceError, match=r"ens \(`python scripts/x.py`\): metrics file .*out.json not found"):
        rp.do_entry(script, collect_only=True)


def test_main_reports_a_missing_test_split_and_refuses_unknown_names(rp, tmp_path):
    d = _run(tmp_path, "toy", "a", "armodal-train experiment=toy")
    ev = json.loads((d / "eval_metrics.json").read_text())
    (d / "eval_metrics.json").write_text(json.dumps(ev | {"test": {"missing": "no test.npy"}}))
    (tmp_path / "scripts" / "reproduce.yaml").write_text(yaml.safe_dump([{"experiment": "toy", "train": [], "eval": []}]))
    rp.main(["--collect", "--out", "results/R.md"])
    table = (tmp_path / "results" / "R.md").read_text()
    assert "| toy | 1.0000 | 1.0000 | none |" in table
    with pytest.raises(rp.ReproduceError, match="does not have: \\['tokens_toi'\\]"):
        rp.main(["--collect", "--only", "tokens_toi"])


def test_reproduce_yaml_show_keys_name_recorded_metrics(rp):
    """Each ``show`` key of scripts/reproduce.yaml is a metric of the rows results/RESULTS.json holds for
    that entry (rows made by an older command of the entry are its owner's to regenerate)."""
    entries = yaml.safe_load((ROOT_DIR / "scripts" / "reproduce.yaml").read_text())
    rows = json.loads((ROOT_DIR / "results" / "RESULTS.json").read_text())
    checked = 0
    for e in entries:
        name = rp.entry_name(e)
        for r in rows:
            if r["name"].split(" [")[0] == name and r["commands"][:1] == [rp.first_command(e)]:
                missing = [k for k in e.get("show") or [] if k not in r["metrics"]]
                assert not missing, f"{r['name']}: show keys {missing} are not among its metrics"
                checked += 1
    assert checked >= 4, checked  # tokens_toy, music_bach, music_jsb, the ensemble, the image stages
