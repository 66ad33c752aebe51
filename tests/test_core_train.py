"""Training, resume after SIGKILL, generate/eval on the written checkpoint, security, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import armodal
from armodal.eval import evaluate
from armodal.generate import generate, route_overrides
from armodal.train import train
from armodal.training.checkpoint import CheckpointError, read_checkpoint
from armodal.utils.config import ROOT_DIR
from armodal.utils.safety import UnsafeTargetError
from tests.conftest import compose_cfg

SMALL_NET = ["model.n_layer=2", "model.d_model=64", "model.n_head=4"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One real training run of the toy corpus, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("toy")
    cfg = compose_cfg("train", [
        "experiment=tokens_toy", f"modality.data.path={tmp / 'data'}", "trainer.max_steps=150",
        "trainer.val_check_interval=75", "callbacks.samples.num_samples=2", "callbacks.progress.refresh_rate=0",
        "module.optimizer.lr=5e-3", *SMALL_NET,
    ], tmp)
    metrics = train(cfg)
    return Path(metrics["run_dir"]), metrics


def test_loss_goes_near_zero_and_run_folder_is_complete(trained_run):
    run_dir, metrics = trained_run
    # floor: start (log 32) and step (log 3) of each 66-token progression are unpredictable, ~0.07 nats/token
    assert metrics["best"]["val/nll"] < 0.2, metrics
    for f in ["config.yaml", "metrics.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "tokenizer/tokenizer.json"]:
        assert (run_dir / f).exists(), f
    assert list((run_dir / "samples").glob("step_*/samples.json"))
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    assert metrics["num_params"] > 0


def test_load_generate_and_eval_on_written_checkpoint(trained_run, tmp_path):
    run_dir, _ = trained_run
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    model = armodal.load(ckpt)
    assert model.tokenizer.vocab_size == 35 and model.modality == "tokens"
    out = model.generate(ids=torch.tensor([[model.tokenizer.bos_id, 3, 5]]), max_new_tokens=10, strategy="greedy")
    assert out.ids[0, 3:8].tolist() == [7, 9, 11, 13, 15]  # the learned progression
    gcfg = compose_cfg("generate", route_overrides([f"ckpt={ckpt}", "num_samples=3", f"out_dir={tmp_path / 'gen'}", "temperature=0.8"]))
    summary = generate(gcfg)
    assert summary["num_samples"] == 3 and (tmp_path / "gen" / "samples.json").is_file()
    ecfg = compose_cfg("eval", [f"ckpt={ckpt}", f"out={tmp_path / 'eval.json'}", "data.batch_size=8"])
    m = evaluate(ecfg)
    assert m["val"]["nll"] < 0.2 and json.loads((tmp_path / "eval.json").read_text())["val"]["tokens"] > 0


def _write_ckpt(path: Path, meta: dict, state: dict | None = None) -> Path:
    torch.save({"state_dict": state or {}, "armodal": meta}, path)
    return path


def test_foreign_target_in_checkpoint_is_refused(trained_run, tmp_path):
    run_dir, _ = trained_run
    ckpt = read_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    meta = ckpt["armodal"]
    meta["config"]["modality"]["sampler"]["_target_"] = "os.system"
    bad = _write_ckpt(tmp_path / "evil.ckpt", meta, ckpt["state_dict"])
    with pytest.raises(UnsafeTargetError, match="os.system"):
        armodal.load(bad)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/armodal_pwned",))


def test_pickled_code_is_never_executed(tmp_path):
    bad = tmp_path / "pickle.ckpt"
    torch.save({"armodal": _Evil()}, bad)
    with pytest.raises(CheckpointError, match="pickle.ckpt"):
        armodal.load(bad)
    assert not Path("/tmp/armodal_pwned").exists()


def test_corrupt_missing_and_other_modality_checkpoints(trained_run, tmp_path):
    run_dir, _ = trained_run
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes((run_dir / "checkpoints" / "best.ckpt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt.ckpt: not a readable checkpoint"):
        armodal.load(corrupt)
    with pytest.raises(CheckpointError, match="not found"):
        armodal.load(tmp_path / "nope.ckpt")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(CheckpointError, match="not an armodal checkpoint"):
        armodal.load(plain)
    with pytest.raises(CheckpointError, match="modality 'tokens', but 'music' was expected"):
        armodal.load(run_dir / "checkpoints" / "best.ckpt", expect_modality="music")


def test_resume_refuses_checkpoint_of_another_modality(trained_run, tmp_path):
    run_dir, _ = trained_run
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    ckpt["armodal"]["modality"] = "image"
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    cfg = compose_cfg("train", ["experiment=tokens_toy", f"modality.data.path={tmp_path / 'd'}", f"resume={other}"], tmp_path)
    with pytest.raises(CheckpointError, match="modality 'image', but 'tokens' was expected"):
        train(cfg)


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARMODAL_RUN") and k != "ARMODAL_RESUME_CKPT"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "armodal.train", *args], cwd=ROOT_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_resume_after_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    args = ["experiment=tokens_toy", f"modality.data.path={tmp_path / 'data'}", f"run_dir={run_dir}",
            "trainer.max_steps=60", "trainer.val_check_interval=30", "callbacks.last.every_n_train_steps=5",
            "callbacks.samples.enabled=false", "callbacks.progress.refresh_rate=0", "logger=csv", *SMALL_NET]
    proc = _cli(args, start_new_session=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if last.exists():
            step = read_checkpoint(last)["global_step"]
            if step >= 10:
                break
        time.sleep(0.2)
    assert proc.poll() is None, f"training ended before it could be killed:\n{proc.stdout.read()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = read_checkpoint(last)["global_step"]  # the checkpoint survived the kill intact
    assert 10 <= killed_at < 60
    out, _ = _cli([*args, "resume=true"]).communicate(timeout=300)
    assert "resuming from" in out, out[-3000:]
    assert read_checkpoint(last)["global_step"] == 60
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 60


def test_ddp_two_cpu_processes_over_gloo(tmp_path):
    run_dir = tmp_path / "ddp"
    args = ["experiment=tokens_toy", f"modality.data.path={tmp_path / 'data'}", f"run_dir={run_dir}",
            "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=6",
            "trainer.val_check_interval=3", "callbacks.samples.enabled=false", "callbacks.progress.refresh_rate=0",
            "logger=csv", *SMALL_NET]
    out, _ = _cli(args).communicate(timeout=300)
    assert "[armodal] done" in out, out[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["global_step"] == 6 and "val/nll" in m["final"]


def test_bf16_mixed_and_ema_training_on_cpu(tmp_path):
    cfg = compose_cfg("train", [
        "experiment=tokens_toy", f"modality.data.path={tmp_path / 'data'}", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "trainer.precision=bf16-mixed", "module.ema_decay=0.9",
        "callbacks.samples.num_samples=1", "callbacks.progress.refresh_rate=0", *SMALL_NET,
    ], tmp_path)
    metrics = train(cfg)
    ckpt = Path(metrics["run_dir"]) / "checkpoints" / "last.ckpt"
    state = read_checkpoint(ckpt)["state_dict"]
    assert any(k.startswith("ema.net.") for k in state)
    ema = armodal.load(ckpt)  # EMA weights by default
    raw = armodal.load(ckpt, use_ema=False)
    w = "blocks.0.attn.wqkv.weight"
    torch.testing.assert_close(ema.net.state_dict()[w], state[f"ema.net.{w}"])
    torch.testing.assert_close(raw.net.state_dict()[w], state[f"net.{w}"])


def test_unknown_config_key_is_a_clear_error(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.max_stepz"):
        compose_cfg("train", ["experiment=tokens_toy", "trainer.max_stepz=3"], tmp_path)


def test_callback_key_without_its_callback_is_a_clear_error(tmp_path):
    cfg = compose_cfg("train", [
        "experiment=tokens_toy", f"modality.data.path={tmp_path / 'data'}", "callbacks=none",
        "+callbacks.samples.every_n_val=3", "trainer.max_steps=1", *SMALL_NET,
    ], tmp_path)
    with pytest.raises(ValueError, match=r"callbacks.samples has no _target_.*~callbacks.samples"):
        train(cfg)


def test_max_time_stop_still_validates_samples_and_saves_last(tmp_path):
    cfg = compose_cfg("train", [
        "experiment=tokens_toy", f"modality.data.path={tmp_path / 'data'}", "trainer.max_steps=100000",
        "trainer.val_check_interval=100000", "trainer.max_time=00:00:00:04", "callbacks.samples.num_samples=1",
        "callbacks.progress.refresh_rate=0", "logger=csv", *SMALL_NET,
    ], tmp_path)
    metrics = train(cfg)
    run_dir = Path(metrics["run_dir"])
    step = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert 0 < step < 100000 and metrics["global_step"] == step
    assert "val/nll" in metrics["final"]
    assert list((run_dir / "samples").glob(f"step_{step:07d}/samples.json"))


def test_early_stopping_counts_step_based_validations(tmp_path):
    cfg = compose_cfg("train", [
        "experiment=tokens_toy", f"modality.data.path={tmp_path / 'data'}", "trainer.max_steps=100000",
        "trainer.val_check_interval=5", "trainer.limit_val_batches=1", "trainer.max_time=00:00:02:00",
        "callbacks.samples.enabled=false", "callbacks.progress.refresh_rate=0", "logger=csv",
        "+callbacks.early_stop._target_=armodal.training.callbacks.early_stopping", "+callbacks.early_stop.patience=1",
        "+callbacks.early_stop.min_delta=100.0", *SMALL_NET,  # no later validation can count as better
    ], tmp_path)
    metrics = train(cfg)
    assert metrics["global_step"] == 10  # best at the 1st validation, stopped at the 2nd
    assert (Path(metrics["run_dir"]) / "checkpoints" / "best.ckpt").is_file()
