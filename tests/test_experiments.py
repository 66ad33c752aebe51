"""Every experiment config composes and trains for a few steps with a shrunk budget.

Experiments list the data they need under ``requires`` (skipped cleanly when absent), may add
``smoke_overrides`` to shrink themselves further (e.g. fewer files), and name under ``smoke_after``
the experiments whose runs they read (smoke-trained first, into the same runs folder).  Every file
the training-time sampler says it wrote must exist and be non-empty.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from armodal.train import train
from armodal.utils.config import CONF_DIR
from tests.conftest import SHRINK, compose_cfg

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_config_composes(experiment, tmp_path):
    cfg = compose_cfg("train", [f"experiment={experiment}"], tmp_path)
    assert cfg.name and cfg.modality.name
    assert cfg.modality.data._target_.startswith("armodal.")


def _sampler_files(run_dir: Path) -> list[Path]:
    """Every file the training-time sampler says it wrote (summary.json of each samples/step_*)."""
    summaries = sorted(run_dir.glob("samples/step_*/summary.json"))
    assert summaries, f"{run_dir}: the sampler wrote no samples/step_*/summary.json"
    files = []

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str) and str(run_dir / "samples") in v:
            files.append(Path(v))

    for s in summaries:
        walk(json.loads(s.read_text()))
    return files


def smoke_train(experiment: str, tmp_path: Path) -> dict:
    """Train ``experiment`` with the shrunk budget under tmp_path; ``smoke_after`` experiments (a
    tokenizer stage the experiment reads from the runs folder) are smoke-trained there first."""
    cfg = compose_cfg("train", [f"experiment={experiment}"], tmp_path)
    for before in cfg.get("smoke_after") or []:
        smoke_train(before, tmp_path)
    missing = [str(p) for p in cfg.get("requires") or [] if not Path(p).exists()]
    if missing:
        pytest.skip(f"{experiment}: data not available here: {missing}")
    cfg = compose_cfg("train", [f"experiment={experiment}", *SHRINK, *cfg.get("smoke_overrides", [])], tmp_path)
    metrics = train(cfg)
    run_dir = Path(metrics["run_dir"])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert metrics["global_step"] == cfg.trainer.max_steps
    if cfg.modality.get("sampler") is not None and cfg.callbacks.samples.enabled:
        files = _sampler_files(run_dir)
        assert files, f"{experiment}: the sampler's summaries name no file"
        for f in files:
            assert f.is_file() and f.stat().st_size > 0, f"{experiment}: sampler file {f} is missing or empty"
    return metrics


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_smoke_trains(experiment, tmp_path):
    smoke_train(experiment, tmp_path)
