"""``armodal-train experiment=NAME [overrides]``: train(cfg) behind a thin @hydra.main."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from armodal.modalities.base import TOKENIZER_FILE, MissingSplitError
from armodal.training import run_folder
from armodal.training.checkpoint import INTEGRITY_FORMAT, AtomicCheckpointIO, CheckpointError, file_hashes
from armodal.utils.config import is_child_rank, main_wrapper, register_resolvers, save_config, timestamp
from armodal.utils.safety import check_config_targets, check_config_types

__all__ = ["train", "main", "resolve_run_dir"]


def resolve_run_dir(cfg: DictConfig) -> tuple[Path, Path | None]:
    """Pick the run folder and the checkpoint to resume from (if any); see :mod:`armodal.training.run_folder`."""
    if is_child_rank() and os.environ.get("ARMODAL_RUN_DIR"):
        run_dir = Path(os.environ["ARMODAL_RUN_DIR"])
        ckpt = os.environ.get("ARMODAL_RESUME_CKPT") or None
        return run_dir, Path(ckpt) if ckpt else None
    return run_folder.resolve_run_dir(cfg, Path(cfg.paths.runs_dir), timestamp())


def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked before a side effect: targets, value types and choices, required data."""
    check_config_targets(cfg, source="train config", trusted=True)
    check_config_types(cfg, source="train config", extra={"trainer": pl.Trainer})
    missing = [str(p) for p in (cfg.get("requires") or []) if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"experiment {cfg.name!r} needs data that is not here: {', '.join(missing)}")
    if cfg.get("init_from") and not Path(cfg.init_from).is_file():
        raise FileNotFoundError(f"init_from={cfg.init_from!r}: no such checkpoint file")


def save_tokenizer(tok, run_dir: Path, resuming: bool) -> dict[str, str]:
    """Save the tokenizer next to the checkpoints (kept as is on resume, after checking it is the same);
    return the SHA-256 of each of its files, recorded in every checkpoint."""
    tok_dir = run_dir / "tokenizer"
    if resuming and (tok_dir / TOKENIZER_FILE).is_file():
        with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
            fresh = tok.save(Path(tmp)) / TOKENIZER_FILE
            if json.loads(fresh.read_text()) != json.loads((tok_dir / TOKENIZER_FILE).read_text()):
                raise run_folder.RunFolderError(
                    f"{tok_dir / TOKENIZER_FILE}: the data now builds a different tokenizer than the one this run "
                    "was trained with; resume with the same data and tokenizer settings, or start a new run")
    else:
        tok.save(tok_dir)
    return file_hashes(tok_dir)


def build_runtime(cfg: DictConfig, datamodule) -> dict:
    """Objects injected into ``cfg.module``: tokenizer, net, conditioner (those that exist)."""
    runtime: dict = {}
    tok = getattr(datamodule, "tokenizer", None)
    if tok is not None:
        runtime["tokenizer"] = tok
    if cfg.get("model") is not None:
        if tok is None:
            raise ValueError(f"modality {cfg.modality.name!r}: the datamodule exposes no tokenizer for the AR model")
        runtime["net"] = instantiate(cfg.model, vocab_size=tok.vocab_size, num_types=tok.num_types)
        if cfg.modality.get("conditioner") is not None:
            runtime["conditioner"] = instantiate(cfg.modality.conditioner, d_model=runtime["net"].config.d_model)
    return runtime


def init_weights(module, path: str | Path, modality: str) -> None:
    """``init_from=<ckpt>``: copy a finished run's weights into a new run's module before training (its EMA
    weights when it kept them, into both the weights and this run's EMA); the optimizer, schedule and step
    start fresh.  The checkpoint is read like any other (verified, ``weights_only``); one of another
    modality or of another model shape is a clear error naming the file."""
    from armodal.api import _sub_state, is_ar_config, load_checkpoint_meta

    path = Path(path)
    ckpt, saved = load_checkpoint_meta(path, expect_modality=modality)
    if not is_ar_config(saved):
        raise CheckpointError(f"init_from={str(path)!r}: not an autoregressive checkpoint (stage {saved.module._target_})")
    state = ckpt["state_dict"]
    prefix = "ema." if any(k.startswith("ema.") for k in state) else ""
    parts = {"net": module.net, **({"conditioner": module.conditioner} if module.conditioner is not None else {})}
    try:
        for name, part in parts.items():
            part.load_state_dict(_sub_state(state, prefix + name + "."))
    except RuntimeError as e:
        raise CheckpointError(f"init_from={str(path)!r}: its weights do not fit this run's model "
                              f"({' '.join(str(e).split())[:300]}); use the same model and tokenizer settings") from None
    if module.ema is not None:
        for name, part in parts.items():
            module.ema[name].load_state_dict(part.state_dict())
    print(f"[armodal] weights initialised from {path}" + (" (its EMA weights)" if prefix else ""))


def finish_run(trainer: pl.Trainer, module, dm, run_dir: Path) -> None:
    """After a stop that skipped the end-of-training hooks (``trainer.max_time``, interrupt), make sure the
    run still ends with a final validation (samples, metrics.json) and a ``last.ckpt`` at the final step."""
    if trainer.global_step == 0 or getattr(module, "armodal_meta", None) is None:
        return
    metrics_path = run_dir / "metrics.json"
    validated = json.loads(metrics_path.read_text()).get("global_step", -1) if metrics_path.is_file() else -1
    if validated < trainer.global_step and trainer.limit_val_batches:
        trainer.validate(module, datamodule=dm, verbose=False)
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)  # full state, atomic


def _group_entries(cfg: DictConfig, group: str) -> list:
    """The entries of a callbacks/logger group; one without ``_target_`` (an experiment set a key
    of a callback the chosen group does not define, e.g. ``callbacks=none``) is a clear error."""
    entries = []
    for key, c in (cfg.get(group) or {}).items():
        if c is None:
            continue
        if not OmegaConf.is_dict(c) or "_target_" not in c:
            raise ValueError(
                f"{group}.{key} has no _target_: the experiment sets {group}.{key} but the chosen "
                f"{group} group does not define it; drop it with '~{group}.{key}' or pick a {group} group that has it"
            )
        entries.append(c)
    return entries


def train(cfg: DictConfig) -> dict:
    """Train the configured experiment; returns the final metrics (also written to metrics.json)."""
    register_resolvers()
    run_dir, ckpt_path = resolve_run_dir(cfg)  # decides only; nothing is created yet
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    check_config(cfg)
    if ckpt_path is not None:
        from armodal.api import load_checkpoint_meta

        load_checkpoint_meta(ckpt_path, expect_modality=cfg.modality.name)  # clear error for another modality
    lock = None
    if not is_child_rank():
        lock = run_folder.claim_run_dir(run_dir, resuming=ckpt_path is not None, overwrite=bool(cfg.get("overwrite")))
    try:
        return _train(cfg, run_dir, ckpt_path)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, run_dir: Path, ckpt_path: Path | None) -> dict:
    os.environ["ARMODAL_RUN_DIR"] = str(run_dir)
    os.environ.pop("ARMODAL_RESUME_CKPT", None)  # DDP child ranks read these two
    if ckpt_path is not None:
        os.environ["ARMODAL_RESUME_CKPT"] = str(ckpt_path)
    pl.seed_everything(cfg.seed, workers=True)
    if not is_child_rank():
        save_config(cfg, run_dir / "config.yaml")
        print(f"[armodal] run folder: {run_dir}" + (f" (resuming from {ckpt_path})" if ckpt_path else ""))

    dm = instantiate(cfg.modality.data)
    dm.prepare_data()
    dm.setup("fit")
    runtime = build_runtime(cfg, dm)
    tok_hashes = None
    if "tokenizer" in runtime and not is_child_rank():
        tok_hashes = save_tokenizer(runtime["tokenizer"], run_dir, resuming=ckpt_path is not None)
    module = instantiate(cfg.module, **runtime)
    module.armodal_meta = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "modality": cfg.modality.name,
        "name": cfg.name,
        "run_dir": str(run_dir),
        "format": INTEGRITY_FORMAT,
        "tokenizer_sha256": tok_hashes,
    }
    module.run_dir = run_dir
    if cfg.get("init_from") and ckpt_path is None:  # on resume the checkpoint holds the weights
        init_weights(module, cfg.init_from, cfg.modality.name)
    if cfg.modality.get("sampler") is not None:
        module.sampler = instantiate(cfg.modality.sampler)

    callbacks = [instantiate(c) for c in _group_entries(cfg, "callbacks")]
    loggers = [instantiate(c) for c in _group_entries(cfg, "logger")]
    trainer = pl.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
    )
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
    finish_run(trainer, module, dm, run_dir)
    test_missing = None
    if cfg.get("test_after_fit"):
        try:
            trainer.test(module, datamodule=dm, verbose=False)
        except MissingSplitError as e:  # reported in metrics.json, never replaced by another split
            test_missing = str(e)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if trainer.is_global_zero:
        metrics["run_dir"] = str(run_dir)
        metrics["command"] = os.environ.get("ARMODAL_COMMAND")
        if cfg.get("test_after_fit"):
            metrics["test"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
            if test_missing:
                metrics["test"] = {"missing": test_missing}
        tmp = metrics_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(metrics, indent=2))
        tmp.replace(metrics_path)
        print(f"[armodal] done: {run_dir}  (checkpoints/, samples/, metrics.json)")
        steps = sorted((run_dir / "samples").glob("step_*"))
        if steps:  # where to look and listen: the last samples the run wrote
            kinds = {ext: len(list(steps[-1].glob(f"*.{ext}"))) for ext in ("mid", "png", "wav")}
            print(f"[armodal] latest samples: {steps[-1]}  ("
                  + ", ".join(f"{n} .{ext}" for ext, n in kinds.items() if n) + ")")
    return metrics


main = main_wrapper(train, "train")

if __name__ == "__main__":
    main()
