"""Config helpers: resolvers, config folder, run folders."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["CONF_DIR", "ROOT_DIR", "register_resolvers", "force_add_overrides", "save_config", "timestamp"]

ROOT_DIR = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT_DIR / "conf"


# config -> override groups whose keys may be added from the command line (data.batch_size=8 ...)
OPEN_GROUPS = {"generate": ("sampler", "generation", "inputs"), "eval": ("data", "evaluator", "generation")}


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("armodal_root"):
        OmegaConf.register_new_resolver("armodal_root", lambda: str(ROOT_DIR))


def timestamp() -> str:
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def force_add_overrides(argv: list[str], groups: tuple[str, ...]) -> list[str]:
    """Let ``data.KEY=V`` style overrides add keys to open dicts (rewrites them to ``++data.KEY=V``)."""
    out = []
    for a in argv:
        head = a.split("=", 1)[0]
        if "=" in a and not a.startswith(("+", "~")) and any(head.startswith(g + ".") for g in groups):
            a = "++" + a
        out.append(a)
    return out


def save_config(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp.replace(path)


def is_child_rank() -> bool:
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def main_wrapper(fn, config_name: str):
    """Build a thin ``@hydra.main`` entry point around ``fn(cfg)``."""
    import hydra

    register_resolvers()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def _main(cfg: DictConfig) -> None:
        fn(cfg)

    def main() -> None:
        import shlex

        os.environ["ARMODAL_COMMAND"] = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        sys.argv[1:] = force_add_overrides(sys.argv[1:], OPEN_GROUPS.get(config_name, ()))
        _main()

    return main
