"""Guards for rebuilding objects from saved configs and checkpoints."""

from __future__ import annotations

from typing import Any

__all__ = ["check_target", "check_config_targets", "UnsafeTargetError"]

ALLOWED_PREFIX = "armodal."


class UnsafeTargetError(ValueError):
    """A saved config names a ``_target_`` outside the armodal package."""


def check_target(target: Any, source: str = "config") -> None:
    from armodal.utils.registry import is_registered_target

    if is_registered_target(target):  # a registered modality part (a plugin already imported by the user)
        return
    if not isinstance(target, str) or not target.startswith(ALLOWED_PREFIX):
        raise UnsafeTargetError(
            f"{source}: refusing to instantiate _target_={target!r}; only armodal.* targets may be "
            "rebuilt from a saved config or checkpoint"
        )


def check_config_targets(cfg: Any, source: str = "config", path: str = "") -> None:
    """Walk a (plain or OmegaConf) config; every ``_target_`` must live under ``armodal.``."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            if k == "_target_":
                check_target(v, f"{source} at {path or '<root>'}")
            else:
                check_config_targets(v, source, f"{path}.{k}" if path else str(k))
    elif isinstance(cfg, (list, tuple)):
        for i, v in enumerate(cfg):
            check_config_targets(v, source, f"{path}[{i}]")
