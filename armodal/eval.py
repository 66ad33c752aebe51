"""``armodal-eval ckpt=PATH [data.KEY=V ...] [generation.KEY=V ...]``: NLL on val/test plus the modality's own metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from armodal.modalities.base import MissingSplitError
from armodal.training.loss import dataset_nll
from armodal.utils.config import main_wrapper, register_resolvers
from armodal.utils.device import pick_device

__all__ = ["evaluate", "main"]


def _test_loader(dm) -> tuple[object | None, str | None]:
    """The datamodule's test loader, or (None, why there is none).  Only a datamodule that declares
    no test split counts as missing; any other error while building the loader propagates."""
    if type(dm).test_dataloader is pl.LightningDataModule.test_dataloader:
        return None, f"{type(dm).__name__} defines no test_dataloader"
    try:
        return dm.test_dataloader(), None
    except MissingSplitError as e:
        return None, str(e)


def evaluate(cfg: DictConfig) -> dict:
    from armodal.api import load_any
    from armodal.ar_model import nest_settings

    register_resolvers()
    if not cfg.get("ckpt"):
        raise ValueError("armodal-eval needs ckpt=PATH (a checkpoint written by armodal-train)")
    ckpt = Path(cfg.ckpt).resolve()
    # an AR checkpoint, a folder written by armodal-export, or another stage (e.g. the image VQ tokenizer:
    # only the modality's own metrics apply)
    model, saved, is_ar = load_any(ckpt, device=pick_device(cfg.device), use_ema=cfg.use_ema)
    data_cfg = OmegaConf.merge(saved.modality.data, cfg.get("data") or {})
    dm = instantiate(data_cfg)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    metrics: dict = {"ckpt": str(ckpt), "modality": saved.modality.name}
    if is_ar:
        mb = cfg.get("max_batches")
        metrics["val"] = dataset_nll(model, dm.val_dataloader(), mb)
        test_loader, why = _test_loader(dm)
        if test_loader is None:
            metrics["test"] = {"missing": why}
            print(f"[armodal] no test metrics: {why}")
        else:
            metrics["test"] = dataset_nll(model, test_loader, mb)
    default = ckpt.parent / f"{ckpt.name}-eval" if ckpt.is_dir() else ckpt.parent.parent  # never inside an export
    out = Path(cfg.out) if cfg.get("out") else default / "eval_metrics.json"
    if saved.modality.get("evaluator") is not None and cfg.get("domain_metrics", True):
        evaluator = instantiate(nest_settings(saved.modality.evaluator),
                                **OmegaConf.to_container(OmegaConf.create(cfg.get("evaluator") or {}), resolve=True))
        settings = OmegaConf.to_container(OmegaConf.create(cfg.get("generation") or {}), resolve=True)
        kw = {}
        if getattr(evaluator, "generation", None) is not None:  # its defaults, then the command line's settings
            kw["config"] = evaluator.generation.replace(**{k: v for k, v in settings.items() if v is not None})
        elif settings:
            raise ValueError(f"{type(evaluator).__name__} takes no generation settings (got {sorted(settings)})")
        metrics.update(evaluator(model=model, datamodule=dm, out_dir=out.parent, num_samples=cfg.num_samples, **kw))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, default=str))
    print(json.dumps(metrics, indent=2, default=str))
    print(f"[armodal] metrics written to {out}")
    return metrics


main = main_wrapper(evaluate, "eval")

if __name__ == "__main__":
    main()
