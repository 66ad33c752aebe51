"""Packaging: a non-editable install ships the configs, and users' own config folders join Hydra's search path.

Both run the real console scripts from a directory outside the checkout.  The wheel is installed
into a fresh virtual environment that reuses this environment's dependencies through a ``.pth``
file (no torch reinstall) and must not see the checkout's armodal.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from armodal.utils.config import ROOT_DIR

CHECKOUT_ONLY = pytest.mark.skipif(not (ROOT_DIR / "pyproject.toml").is_file(), reason="needs the source checkout")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ARMODAL_CONF_DIR", "ARMODAL_RUNS",
                                                             "ARMODAL_CACHE")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 300) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


TINY = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "callbacks.samples.num_samples=1", "callbacks.progress.refresh_rate=0", "logger=csv"]


@CHECKOUT_ONLY
def test_wheel_installs_configs_and_trains_from_another_directory(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src"  # build from a copy: the checkout gets no build/ or egg-info folders
    for name in ("armodal", "conf"):
        shutil.copytree(ROOT_DIR / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT_DIR / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
         tmp_path, _env())
    (wheel,) = (tmp_path / "dist").glob("armodal-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, _env())
    py = venv / "bin" / "python"
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, _env()).strip())
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]  # torch & co.
    (purelib / "deps.pth").write_text("\n".join(dict.fromkeys([*site.getsitepackages(), *deps])) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel], tmp_path, _env())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([py, "-c", "import armodal, armodal.utils.config as c; print(armodal.__file__); print(c.CONF_DIR)"],
                 elsewhere, _env()).split()
    assert where[0].startswith(str(purelib)), f"the checkout's armodal leaked into the fresh environment: {where[0]}"
    assert where[1] == str(purelib / "armodal" / "conf")
    assert (purelib / "armodal" / "conf" / "experiment" / "tokens_toy.yaml").is_file()

    _run([venv / "bin" / "armodal-train", "experiment=tokens_toy", *TINY], elsewhere, _env())
    assert list((elsewhere / "runs" / "tokens_toy").glob("*/checkpoints/last.ckpt")), "no run under the working directory"


MINE = """\
# @package _global_
# A user's own experiment, kept outside the package
defaults:
  - override /modality: tokens
  - override /model: tiny
name: mine
modality:
  data:
    path: ${paths.cache_dir}/mine
    seq_len: 34
    make_toy: true
"""


@CHECKOUT_ONLY
def test_user_config_folder_joins_the_search_path(tmp_path):
    """``armodal-train --config-dir my_conf experiment=mine`` (``hydra.searchpath`` is exercised by the toy
    modality's smoke test in tests/test_contract.py)."""
    conf = tmp_path / "my_conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(textwrap.dedent(MINE))
    where = ["--config-dir", conf.parent]
    env = _env(PYTHONPATH=str(ROOT_DIR), ARMODAL_RUNS=str(tmp_path / "runs"), ARMODAL_CACHE=str(tmp_path / "cache"))
    _run([sys.executable, "-m", "armodal.train", *where, "experiment=mine", *TINY], tmp_path, env)
    assert list((tmp_path / "runs" / "mine").glob("*/checkpoints/last.ckpt"))
