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
from omegaconf import OmegaConf

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
    # val holds progressions never trained on: only the rule predicts them. Floor: start (log 32) and
    # step (log 3) of each 65-target progression are unpredictable, ~0.07 nats/token; ln 32 = 3.5 knows nothing
    assert metrics["best"]["val/nll"] < 0.3, metrics
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
    out = model.generate(ids=torch.tensor([[model.tokenizer.bos_id, 3, 5, 7, 9]]), max_new_tokens=10, strategy="greedy")
    assert out.ids[0, 5:10].tolist() == [11, 13, 15, 17, 19]  # start 3, step 2: a test-split progression
    gcfg = compose_cfg("generate", route_overrides([f"ckpt={ckpt}", "num_samples=3", f"out_dir={tmp_path / 'gen'}", "temperature=0.8"]))
    summary = generate(gcfg)
    assert summary["num_samples"] == 3 and (tmp_path / "gen" / "samples.json").is_file()
    ecfg = compose_cfg("eval", [f"ckpt={ckpt}", f"out={tmp_path / 'eval.json'}", "data.batch_size=8"])
    m = evaluate(ecfg)
    assert json.loads((tmp_path / "eval.json").read_text())["val"] == m["val"]
    # 12 held-out progressions in each of val and test, 64 symbols + EOS = 65 targets each (BOS predicts none)
    assert m["val"]["tokens"] == m["test"]["tokens"] == 12 * 65
    assert m["val"]["nll"] < 0.3 and m["test"]["nll"] < 0.3 and m["test"]["nll"] != m["val"]["nll"]


def test_eval_reports_why_test_metrics_are_missing(trained_run, tmp_path):
    """A corpus without test.npy has no test split: eval says so instead of scoring val twice."""
    run_dir, _ = trained_run
    trained_on = Path(OmegaConf.load(run_dir / "config.yaml").modality.data.path)
    data = tmp_path / "no_test"
    data.mkdir()
    for f in ("train.npy", "val.npy", "vocab.json"):
        (data / f).write_bytes((trained_on / f).read_bytes())
    ecfg = compose_cfg("eval", [f"ckpt={run_dir / 'checkpoints' / 'best.ckpt'}", f"out={tmp_path / 'eval.json'}",
                                f"data.path={data}", "domain_metrics=false"])
    m = evaluate(ecfg)
    assert m["test"] == {"missing": f"{data}: no test split (no test.npy or test.bin in the folder)"}
    assert m["val"]["tokens"] == 12 * 65


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


def _assert_same_state(a, b, what: str, atol: float = 1e-6) -> None:
    """Nested dicts / lists of tensors and numbers equal to tolerance."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{what}: keys differ: {set(a) ^ set(b)}"
        for k in a:
            _assert_same_state(a[k], b[k], f"{what}.{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{what}[{i}]", atol)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=lambda m: f"{what}: {m}")
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=atol, rel=1e-5), what
    else:
        assert a == b, what


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    """Kill training mid-epoch with SIGKILL, resume it, and compare with one uninterrupted run of the
    same seed: weights, EMA, optimizer moments, scheduler, loop counters and val NLL agree."""
    run_dir = tmp_path / "run"
    args = ["experiment=tokens_toy", f"modality.data.path={tmp_path / 'data'}", "trainer.max_steps=40",
            "trainer.val_check_interval=20", "callbacks.last.every_n_train_steps=5", "module.ema_decay=0.9",
            "model.dropout=0.1", "callbacks.samples.enabled=false", "callbacks.progress.refresh_rate=0", "logger=csv",
            *SMALL_NET]  # 16 batches per epoch: steps 5, 10, 15 are mid-epoch; dropout draws random numbers
    proc = _cli([*args, f"run_dir={run_dir}"], start_new_session=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and read_checkpoint(last)["global_step"] >= 10:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"training ended before it could be killed:\n{proc.stdout.read()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = read_checkpoint(last)["global_step"]  # the checkpoint survived the kill intact
    assert 10 <= killed_at < 40 and killed_at % 16, killed_at
    out, _ = _cli([*args, f"run_dir={run_dir}", "resume=true"]).communicate(timeout=600)
    assert "resuming from" in out, out[-3000:]
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["session_start_step"] == killed_at, resumed  # a restart from step 0 would say 0

    ref_dir = tmp_path / "ref"
    reference = train(compose_cfg("train", [*args, f"run_dir={ref_dir}"], tmp_path))
    a, b = read_checkpoint(ref_dir / "checkpoints" / "last.ckpt"), read_checkpoint(last)
    assert a["global_step"] == b["global_step"] == 40 and a["epoch"] == b["epoch"]
    assert any(k.startswith("ema.") for k in a["state_dict"])
    _assert_same_state(a["state_dict"], b["state_dict"], "weights and EMA")
    _assert_same_state(a["optimizer_states"], b["optimizer_states"], "optimizer")
    _assert_same_state(a["lr_schedulers"], b["lr_schedulers"], "scheduler")
    _assert_same_state(a["loops"]["fit_loop"]["epoch_progress"], b["loops"]["fit_loop"]["epoch_progress"], "epochs")
    assert reference["final"]["val/nll"] == pytest.approx(resumed["final"]["val/nll"], abs=1e-5)
    assert reference["session_start_step"] == 0 and resumed["global_step"] == 40


def test_checkpoint_at_step_t_holds_the_ema_of_step_t(tmp_path):
    """A checkpoint written mid-training (the one a killed run resumes from) holds the EMA updated
    with that step's weights: consecutive checkpoints follow ema_t = lerp(ema_{t-1}, w_t, 1 - d_t)."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import ModelCheckpoint

    from armodal.train import build_runtime

    cfg = compose_cfg("train", ["experiment=tokens_toy", f"modality.data.path={tmp_path / 'data'}",
                                "module.ema_decay=0.5", *SMALL_NET], tmp_path)
    dm = instantiate(cfg.modality.data)
    dm.prepare_data()
    dm.setup("fit")
    module = instantiate(cfg.module, **build_runtime(cfg, dm))
    every = ModelCheckpoint(tmp_path / "ck", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    pl.Trainer(max_steps=3, callbacks=[every], logger=False, enable_progress_bar=False, limit_val_batches=0,
               enable_model_summary=False, accelerator="cpu").fit(module, datamodule=dm)
    ckpts = [read_checkpoint(tmp_path / "ck" / f"step={t}.ckpt")["state_dict"] for t in (1, 2, 3)]
    w = "blocks.0.attn.wqkv.weight"
    for t in (2, 3):
        decay = min(0.5, (1 + t) / (10 + t))
        expected = ckpts[t - 2][f"ema.net.{w}"].lerp(ckpts[t - 1][f"net.{w}"], 1 - decay)
        torch.testing.assert_close(ckpts[t - 1][f"ema.net.{w}"], expected)


def test_ddp_two_cpu_processes_over_gloo(tmp_path):
    run_dir = tmp_path / "ddp"
    args = ["experiment=tokens_toy", f"modality.data.path={tmp_path / 'data'}", f"run_dir={run_dir}",
            "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=6",
            "trainer.val_check_interval=3", "callbacks.samples.enabled=false", "callbacks.progress.refresh_rate=0",
            "logger=csv", *SMALL_NET]
    out, _ = _cli(args).communicate(timeout=600)
    assert "[armodal] done" in out, out[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out, out[-3000:]  # a second process joined the group
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["global_step"] == 6 and m["world_size"] == 2
    # each rank scores half of the 12 held-out progressions; the sums are reduced over both ranks
    assert m["final"]["val/tokens"] == 12 * 65


def test_bf16_mixed_and_ema_training_on_cpu(tmp_path):
    """bf16-mixed: the training forward runs under CPU autocast (bfloat16 matmuls) while the
    weights, and the EMA copy, stay float32."""
    seen = set()

    def probe(module, args, output):
        if module.training and isinstance(module, torch.nn.Linear):
            seen.add((torch.is_autocast_enabled("cpu"), output.dtype))

    cfg = compose_cfg("train", [
        "experiment=tokens_toy", f"modality.data.path={tmp_path / 'data'}", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "trainer.precision=bf16-mixed", "module.ema_decay=0.9",
        "callbacks.samples.num_samples=1", "callbacks.progress.refresh_rate=0", *SMALL_NET,
    ], tmp_path)
    handle = torch.nn.modules.module.register_module_forward_hook(probe)
    try:
        metrics = train(cfg)
    finally:
        handle.remove()
    assert seen == {(True, torch.bfloat16)}, seen  # every training Linear ran in autocast, in bf16
    ckpt = Path(metrics["run_dir"]) / "checkpoints" / "last.ckpt"
    state = read_checkpoint(ckpt)["state_dict"]
    assert any(k.startswith("ema.net.") for k in state)
    assert {v.dtype for k, v in state.items() if v.is_floating_point()} == {torch.float32}
    ema = armodal.load(ckpt)  # EMA weights by default
    raw = armodal.load(ckpt, use_ema=False)
    w = "blocks.0.attn.wqkv.weight"
    torch.testing.assert_close(ema.net.state_dict()[w], state[f"ema.net.{w}"])
    torch.testing.assert_close(raw.net.state_dict()[w], state[f"net.{w}"])
    assert not torch.equal(state[f"ema.net.{w}"], state[f"net.{w}"])


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


def test_a_failing_sampler_stops_training_or_is_written_down(tmp_path):
    """A sampler that raises (here: a setting it does not take) is never a silent warning."""
    base = ["experiment=tokens_toy", f"modality.data.path={tmp_path / 'data'}", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "callbacks.samples.num_samples=1",
            "+callbacks.samples.no_such_setting=1", "callbacks.progress.refresh_rate=0", "logger=csv", *SMALL_NET]
    with pytest.raises(RuntimeError, match=r"sampling at step 2 failed .*no_such_setting.*on_error=warn"):
        train(compose_cfg("train", [*base, f"run_dir={tmp_path / 'a'}"], tmp_path))
    with pytest.warns(UserWarning, match=r"sampling at step 2 failed .*traceback in .*step_0000002/error.txt"):
        metrics = train(compose_cfg("train", [*base, f"run_dir={tmp_path / 'b'}", "callbacks.samples.on_error=warn"],
                                    tmp_path))
    assert metrics["global_step"] == 4
    for step in (2, 4):
        folder = tmp_path / "b" / "samples" / f"step_{step:07d}"
        assert "no_such_setting" in (folder / "error.txt").read_text() and not (folder / "summary.json").exists()

