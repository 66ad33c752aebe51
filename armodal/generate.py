"""``armodal-generate ckpt=PATH [num_samples=N] [out_dir=DIR] [SETTING=V ...] [INPUT=V ...]``.

Settings (any :class:`~armodal.generation.GenerationConfig` field: ``strategy=beam
num_beams=4``, ``temperature=0.9`` ...) go to the config's ``generation:`` node and
override the modality's defaults; other bare keys are the modality's inputs
(``prompt=song.mid``, ``classes=[0,3]`` ...) and go to ``inputs:``, which the sampler
checks.  See conf/generate.yaml.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from armodal.generation import GenerationConfig
from armodal.utils.config import CONF_DIR, main_wrapper, register_resolvers, timestamp
from armodal.utils.device import pick_device

__all__ = ["generate", "main", "route_overrides"]


def route_overrides(argv: list[str]) -> list[str]:
    """Route bare ``KEY=V`` arguments: generation settings -> ``generation.KEY``, keys of
    conf/generate.yaml stay, anything else -> ``inputs.KEY`` (a modality input)."""
    own = set(OmegaConf.load(CONF_DIR / "generate.yaml")) - {"defaults", "hydra"}
    settings = set(GenerationConfig.field_names())
    out = []
    for a in argv:
        head = a.split("=", 1)[0]
        if "=" not in a or a.startswith(("+", "~", "-")) or head in own:
            out.append(a)
        elif head.startswith(("generation.", "inputs.")):
            out.append("++" + a)
        elif "." in head or "/" in head:
            out.append(a)
        else:
            out.append(f"++{'generation' if head in settings else 'inputs'}.{a}")
    return out


def _container(node) -> dict:
    return OmegaConf.to_container(OmegaConf.create(node or {}), resolve=True)


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
    sampler = model.sampler(**_container(cfg.get("sampler")))
    settings = {k: v for k, v in _container(cfg.get("generation")).items() if v is not None}
    config = sampler.generation.replace(**settings)  # the modality's defaults, then the command line's
    inputs = _container(cfg.get("inputs"))
    if config.seed is not None:  # also what the sampler draws outside the engine (e.g. decoding noise)
        torch.manual_seed(config.seed)
    summary = sampler(model, int(cfg.num_samples), out_dir, config=config, **inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"ckpt": str(ckpt), "out_dir": str(out_dir), "generation": config.changed(), "inputs": inputs, **summary}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    print(f"[armodal] samples written to {out_dir}")
    return summary


_hydra_main = main_wrapper(generate, "generate")


def main() -> None:
    sys.argv[1:] = route_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
