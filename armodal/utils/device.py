"""Device selection shared by the command-line entry points and scripts."""

from __future__ import annotations

import torch

__all__ = ["pick_device"]


def pick_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; any other name is returned as is."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
