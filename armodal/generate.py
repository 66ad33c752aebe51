"""``armodal-generate ckpt=PATH num_samples=N out_dir=DIR [sampler overrides]``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from armodal.utils.config import main_wrapper, register_resolvers, timestamp
from armodal.utils.device import pick_device

__all__ = ["generate", "main", "SAMPLING_KEYS"]

SAMPLING_KEYS = (
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "greedy", "cfg_scale", "max_new_tokens",
    "constrained", "prompt", "prompt_tokens", "seed", "batch_size",
)


def generate(cfg: DictConfig) -> dict:
    """Rebuild model, tokenizer and sampler from the checkpoint's run, sample, write files."""
    from armodal.api import load

    register_resolvers()
    if not cfg.get("ckpt"):
        raise ValueError("armodal-generate needs ckpt=PATH (a checkpoint written by armodal-train)")
    model = load(cfg.ckpt, device=pick_device(cfg.device), use_ema=cfg.use_ema)
    ckpt = Path(cfg.ckpt).resolve()
    base = ckpt.parent / f"{ckpt.name}-samples" if ckpt.is_dir() else ckpt.parent.parent / "samples"  # an export: beside it
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else base / f"generate_{timestamp()}"
    overrides = {k: cfg[k] for k in SAMPLING_KEYS if cfg.get(k) is not None}
    extra = OmegaConf.to_container(OmegaConf.create(cfg.get("sampler") or {}), resolve=True)
    sampler = model.sampler(**extra)
    torch.manual_seed(cfg.seed if cfg.get("seed") is not None else 0)
    summary = sampler(model, int(cfg.num_samples), out_dir, **overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"ckpt": str(ckpt), "out_dir": str(out_dir), "overrides": overrides, **summary}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    print(f"[armodal] samples written to {out_dir}")
    return summary


main = main_wrapper(generate, "generate")

if __name__ == "__main__":
    main()
