"""``armodal-eval ckpt=PATH [data.KEY=V ...]``: NLL on val/test plus the modality's own metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from armodal.generate import pick_device
from armodal.utils.config import main_wrapper, register_resolvers

__all__ = ["evaluate", "dataset_nll", "main"]


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


@torch.no_grad()
def dataset_nll(model, loader, max_batches: int | None = None) -> dict:
    """Token-weighted NLL over a dataloader: nats/token, bits/token, perplexity, token count."""
    from armodal.training.lit_module import batch_nll

    total, count = 0.0, 0.0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        s, n = batch_nll(model.net, model.conditioner, _to(batch, model.device), model.tokenizer.pad_id)
        total += float(s)
        count += float(n)
    nll = total / max(count, 1.0)
    return {"nll": nll, "bpt": nll / math.log(2), "ppl": math.exp(min(nll, 50)), "tokens": count}


def evaluate(cfg: DictConfig) -> dict:
    from armodal.api import ARModel, load

    register_resolvers()
    if not cfg.get("ckpt"):
        raise ValueError("armodal-eval needs ckpt=PATH (a checkpoint written by armodal-train)")
    ckpt = Path(cfg.ckpt).resolve()
    model = load(ckpt, device=pick_device(cfg.device), use_ema=cfg.use_ema)
    saved = model.config if isinstance(model, ARModel) else None
    if saved is None:
        from armodal.api import load_checkpoint_meta

        _, saved = load_checkpoint_meta(ckpt)
    data_cfg = OmegaConf.merge(saved.modality.data, cfg.get("data") or {})
    dm = instantiate(data_cfg)
    dm.prepare_data()
    dm.setup("fit")
    if hasattr(dm, "setup"):
        try:
            dm.setup("test")
        except Exception:  # noqa: BLE001 - modalities without a test split
            pass
    metrics: dict = {"ckpt": str(ckpt), "modality": saved.modality.name}
    if isinstance(model, ARModel):
        mb = cfg.get("max_batches")
        metrics["val"] = dataset_nll(model, dm.val_dataloader(), mb)
        try:
            test_loader = dm.test_dataloader()
        except Exception:  # noqa: BLE001
            test_loader = None
        if test_loader is not None:
            metrics["test"] = dataset_nll(model, test_loader, mb)
    out = Path(cfg.out) if cfg.get("out") else ckpt.parent.parent / "eval_metrics.json"
    if saved.modality.get("evaluator") is not None and cfg.get("domain_metrics", True):
        evaluator = instantiate(saved.modality.evaluator, **OmegaConf.to_container(OmegaConf.create(cfg.get("evaluator") or {}), resolve=True))
        metrics.update(evaluator(model=model, datamodule=dm, out_dir=out.parent, num_samples=cfg.num_samples))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, default=str))
    print(json.dumps(metrics, indent=2, default=str))
    print(f"[armodal] metrics written to {out}")
    return metrics


main = main_wrapper(evaluate, "eval")

if __name__ == "__main__":
    main()
