"""``armodal-export ckpt=PATH out=DIR [quantize=int8|int4]``: a checkpoint -> the shareable folder format
(safetensors, no pickle); ``quantize`` stores the network's linear weights quantised.

See :mod:`armodal.pretrained` for the layout; ``armodal.load(DIR)`` reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from armodal.api import load
from armodal.pretrained import save_pretrained
from armodal.training.checkpoint import read_checkpoint
from armodal.utils.config import main_wrapper, register_resolvers

__all__ = ["export", "main"]


def export(cfg: DictConfig) -> Path:
    """Load ``cfg.ckpt`` (verified) and write it to ``cfg.out``; returns the folder."""
    register_resolvers()
    if not cfg.get("ckpt") or not cfg.get("out"):
        raise ValueError("armodal-export needs ckpt=PATH (a checkpoint written by armodal-train) and out=DIR")
    ckpt = Path(cfg.ckpt).expanduser().resolve()
    model = load(ckpt, use_ema=cfg.use_ema)
    has_ema = any(k.startswith("ema.") for k in read_checkpoint(ckpt, verify=False)["state_dict"])
    out = save_pretrained(model, cfg.out, weights_source="ema" if cfg.use_ema and has_ema else "raw",
                          source_checkpoint=str(ckpt), overwrite=bool(cfg.overwrite),
                          quantize=str(cfg.get("quantize") or "none"))
    manifest = json.loads((out / "manifest.json").read_text())
    print(json.dumps({k: manifest[k] for k in ("name", "modality", "weights", "transform", "files")}, indent=2))
    print(f"[armodal] exported {ckpt} -> {out}  (armodal.load({str(out)!r}))")
    return out


main = main_wrapper(export, "export")

if __name__ == "__main__":
    main()
