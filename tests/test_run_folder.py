"""Run folders are never clobbered: non-empty rule, lock, stale lock, best only improves, resume rules, .tmp clean-up."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from armodal.train import train
from armodal.training.checkpoint import read_checkpoint
from armodal.training.run_folder import LOCK_NAME, RunFolderError
from armodal.utils.safety import ConfigValueError

SMALL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "callbacks.samples.enabled=false", "logger=csv"]


def _snapshot(run_dir: Path) -> dict:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def _best_step(run_dir: Path) -> int:
    return read_checkpoint(run_dir / "checkpoints" / "best.ckpt")["global_step"]


def test_non_empty_run_dir_is_refused_unless_resume_or_overwrite(toy_cfg, tmp_path):
    run = tmp_path / "run"
    train(toy_cfg(f"run_dir={run}", *SMALL))
    (run / "notes.txt").write_text("mine")
    before = _snapshot(run)
    with pytest.raises(RunFolderError, match=r"is not empty.*resume=true to continue.*overwrite=true to replace"):
        train(toy_cfg(f"run_dir={run}", *SMALL, "trainer.max_steps=2"))
    assert _snapshot(run) == before  # nothing replaced: checkpoints, metrics.json, config.yaml, notes
    with pytest.raises(RunFolderError, match="contradict"):
        train(toy_cfg(f"run_dir={run}", *SMALL, "resume=true", "overwrite=true"))
    with pytest.warns(UserWarning, match="overwrite=true: replacing the run"):
        m = train(toy_cfg(f"run_dir={run}", *SMALL, "trainer.max_steps=2", "overwrite=true"))
    assert m["global_step"] == 2 and not (run / "notes.txt").exists()
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(RunFolderError, match="does not look like an armodal run folder"):
        train(toy_cfg(f"run_dir={other}", *SMALL, "overwrite=true"))
    assert (other / "thesis.tex").read_text() == "precious" and not (other / LOCK_NAME).exists()


def test_lock_stops_a_second_concurrent_run(toy_cfg, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(["sleep", "60"])  # a live process owning the folder
    try:
        import socket

        (run / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "now"}))
        with pytest.raises(RunFolderError, match=rf"in use by another training \(pid {holder.pid}"):
            train(toy_cfg(f"run_dir={run}", *SMALL))
        assert not (run / "config.yaml").exists()  # the second run wrote nothing
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_with_a_warning(toy_cfg, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid no longer exists
    (run / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "started": "earlier"}))
    with pytest.warns(UserWarning, match=rf"stale lock \(process {gone.pid} no longer exists\); taking it over"):
        m = train(toy_cfg(f"run_dir={run}", *SMALL))
    assert m["global_step"] == 4
    assert not (run / LOCK_NAME).exists()  # released at the end


def _recorded_best(path: Path) -> float:
    states = torch.load(path, weights_only=True)["callbacks"].values()
    return next(float(v["best_model_score"]) for v in states if v.get("monitor") == "val/nll")


def test_best_ckpt_only_improves_across_resume(toy_cfg, tmp_path):
    """The score inside best.ckpt is a floor for every later run in the folder.  A resume restores the
    best score from last.ckpt, which can be behind best.ckpt (last.ckpt is written before the best callback
    sees the same validation; a kill between the two): Lightning alone then replaces best.ckpt with a model
    that is only better than the stale score."""
    run = tmp_path / "run"
    best = run / "checkpoints" / "best.ckpt"
    args = [f"run_dir={run}", *SMALL, "trainer.val_check_interval=2", "callbacks.last.every_n_train_steps=2",
            "module.optimizer.lr=3e-3"]
    train(toy_cfg(*args, "trainer.max_steps=4"))
    first = _recorded_best(best)
    train(toy_cfg(*args, "trainer.max_steps=8", "resume=true"))
    assert _best_step(run) == 8 and _recorded_best(best) < first  # a better model does replace it
    # best.ckpt now records a better score than anything the resumed run will reach
    ckpt = torch.load(best, weights_only=True)
    for state in ckpt["callbacks"].values():
        if state.get("monitor") == "val/nll":
            state["best_model_score"] = torch.tensor(0.5)
    torch.save(ckpt, best)
    before = best.read_bytes()
    train(toy_cfg(*args, "trainer.max_steps=12", "resume=true"))
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert best.read_bytes() == before, "best.ckpt was replaced by a model that is not better"


def test_resume_without_last_ckpt_is_an_error(toy_cfg, tmp_path):
    with pytest.raises(RunFolderError, match=r"resume=true but .*last.ckpt does not exist: nothing to resume"):
        train(toy_cfg(f"run_dir={tmp_path / 'empty'}", *SMALL, "resume=true"))
    with pytest.raises(RunFolderError, match=r"no run of 'tokens_toy' under .* has a checkpoints/last.ckpt"):
        train(toy_cfg(*SMALL, "resume=true"))
    assert not (tmp_path / "empty").exists() and not (tmp_path / "toy").exists()  # nothing created


def test_orphaned_tmp_files_are_removed_on_next_start(toy_cfg, tmp_path):
    run = tmp_path / "run"
    train(toy_cfg(f"run_dir={run}", *SMALL))
    leftovers = [run / "checkpoints" / ".last.ckpt.k1ll3d.tmp", run / "metrics.tmp", run / "tokenizer" / "tokenizer.json.tmp"]
    for p in leftovers:
        p.write_bytes(b"half a write")
    with pytest.warns(UserWarning, match="removed 3 temporary file"):
        train(toy_cfg(f"run_dir={run}", *SMALL, "resume=true", "trainer.max_steps=6"))
    assert not any(p.exists() for p in leftovers)


def test_typed_override_is_checked_before_any_side_effect(toy_cfg, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigValueError, match=r"trainer.max_steps='abc' is not valid for Trainer: expected int"):
        train(toy_cfg(f"run_dir={run}", *SMALL, "trainer.max_steps=abc"))
    with pytest.raises(ConfigValueError, match=r"module.optimizer.lr='fast'.*expected float"):
        train(toy_cfg(f"run_dir={run}", *SMALL, "module.optimizer.lr=fast"))
    assert not run.exists() and not (tmp_path / "toy").exists()  # no config.yaml, no data written
