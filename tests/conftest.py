"""Shared fixtures: compose the real Hydra config and shrink it (lightning-hydra-template style)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from armodal.utils.config import CONF_DIR, OPEN_GROUPS, ROOT_DIR, force_add_overrides, register_resolvers

torch.set_num_threads(1)  # tiny models: threads only add overhead

SHRINK = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "callbacks.samples.num_samples=1",
    "callbacks.progress.refresh_rate=0",
]


def shared_data_dir() -> Path:
    return Path(os.environ.get("ARMODAL_SHARED_DATA", ROOT_DIR.parent / "shared" / "data"))


def compose_cfg(config_name: str = "train", overrides: list[str] | None = None, tmp_path: Path | None = None):
    """Compose conf/<config_name>.yaml with overrides; runs and caches go under tmp_path."""
    register_resolvers()
    GlobalHydra.instance().clear()
    extra = []
    if tmp_path is not None:
        extra = [f"paths.runs_dir={tmp_path / 'runs'}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=force_add_overrides([*(overrides or []), *extra], OPEN_GROUPS.get(config_name, ())), return_hydra_config=False)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def toy_cfg(tmp_path):
    def make(*overrides: str):
        return compose_cfg(
            "train",
            ["experiment=tokens_toy", f"modality.data.path={tmp_path / 'toy'}", *SHRINK, *overrides],
            tmp_path,
        )

    return make
