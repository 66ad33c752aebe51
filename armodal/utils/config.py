"""Config helpers: resolvers, the config folder, run folders.

Where the configs are: in a checkout (editable install or ``PYTHONPATH``) the top-level ``conf/``
folder that people edit; in an installed wheel the copy shipped inside the package
(``armodal/conf``, mapped from ``conf/`` at build time by pyproject.toml).  ``ARMODAL_CONF_DIR``
overrides both.  Users add their own experiment folders through Hydra's search path
(``armodal-train --config-dir my_conf experiment=mine``, or ``hydra.searchpath``).

``paths.root_dir`` (``${armodal_root:}``) is the checkout's root, or the current directory for an
installed package (runs and caches then go under the folder the command runs in).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["CONF_DIR", "ROOT_DIR", "find_conf_dir", "load_paths", "register_resolvers", "force_add_overrides",
           "save_config", "timestamp"]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../armodal


def _is_conf_dir(path: Path) -> bool:
    return (path / "train.yaml").is_file() and (path / "modality").is_dir()


def find_conf_dir() -> tuple[Path, Path | None]:
    """(the config folder, the checkout root or None for an installed package)."""
    checkout = _PACKAGE_DIR.parent
    env = os.environ.get("ARMODAL_CONF_DIR")
    if env:
        if not _is_conf_dir(Path(env)):
            raise FileNotFoundError(f"ARMODAL_CONF_DIR={env}: not an armodal config folder (no train.yaml, modality/)")
        return Path(env).resolve(), checkout if _is_conf_dir(checkout / "conf") else None
    if _is_conf_dir(checkout / "conf") and (checkout / "pyproject.toml").is_file():
        return checkout / "conf", checkout
    if _is_conf_dir(_PACKAGE_DIR / "conf"):
        return _PACKAGE_DIR / "conf", None
    raise FileNotFoundError(f"no armodal config folder: neither {checkout / 'conf'} (a checkout) nor "
                            f"{_PACKAGE_DIR / 'conf'} (an installed package); set ARMODAL_CONF_DIR")


CONF_DIR, _CHECKOUT = find_conf_dir()
ROOT_DIR = _CHECKOUT if _CHECKOUT is not None else Path.cwd()


# config -> override groups whose keys may be added from the command line (data.batch_size=8 ...)
OPEN_GROUPS = {"generate": ("sampler", "generation", "inputs"), "eval": ("data", "evaluator", "generation")}


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("armodal_root"):
        OmegaConf.register_new_resolver("armodal_root", lambda: str(ROOT_DIR))


def load_paths(**overrides: str) -> dict[str, Path]:
    """``conf/paths/default.yaml`` resolved, for scripts: ``root_dir``, ``data_dir``, ``cache_dir``,
    ``runs_dir``, ``datasets_dir`` (the ``ARMODAL_SHARED_DATA`` / ``ARMODAL_CACHE`` / ``ARMODAL_RUNS``
    environment variables apply, as for the CLI); keyword arguments override single entries."""
    register_resolvers()
    cfg = OmegaConf.create({"paths": OmegaConf.load(CONF_DIR / "paths" / "default.yaml")})
    for k, v in overrides.items():
        cfg.paths[k] = str(v)
    return {k: Path(v) for k, v in OmegaConf.to_container(cfg.paths, resolve=True).items()}


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
