"""Every experiment config composes and trains for a few steps with a shrunk budget.

Experiments list the data they need under ``requires`` (skipped cleanly when absent) and may add
``smoke_overrides`` to shrink themselves further (e.g. fewer files).
"""

from __future__ import annotations

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


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_smoke_trains(experiment, tmp_path):
    cfg = compose_cfg("train", [f"experiment={experiment}"], tmp_path)
    missing = [str(p) for p in cfg.get("requires") or [] if not Path(p).exists()]
    if missing:
        pytest.skip(f"{experiment}: data not available here: {missing}")
    cfg = compose_cfg("train", [f"experiment={experiment}", *SHRINK, *cfg.get("smoke_overrides", [])], tmp_path)
    metrics = train(cfg)
    run_dir = Path(metrics["run_dir"])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert metrics["global_step"] == cfg.trainer.max_steps
