"""Checkpoints: atomic writes, safe (``weights_only``) reads, integrity records, a best.ckpt that only improves.

Every checkpoint written through :class:`AtomicCheckpointIO` records, in its ``armodal``
metadata, the SHA-256 of its weights (``weights_sha256``, over the ``state_dict`` tensors
in key order) next to the SHA-256 of each tokenizer file (``tokenizer_sha256``, added by
``armodal-train``).  :func:`read_checkpoint` verifies the weights hash and refuses
non-finite weights; :func:`verify_tokenizer_files` refuses a tokenizer folder that is not
the one the checkpoint was trained with.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

__all__ = [
    "AtomicCheckpointIO",
    "BestCheckpoint",
    "CheckpointError",
    "atomic_torch_save",
    "read_checkpoint",
    "sha256_file",
    "state_dict_sha256",
    "file_hashes",
    "verify_weights",
    "verify_tokenizer_files",
    "INTEGRITY_FORMAT",
]

INTEGRITY_FORMAT = 2  # armodal metadata "format": 2 = weights_sha256 + tokenizer_sha256 recorded


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupted, or not what the caller expects."""


# -- hashes -----------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def state_dict_sha256(state: dict) -> str:
    """SHA-256 over (name, dtype, shape, raw bytes) of every tensor, in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            h.update(f"|{v.dtype}|{tuple(v.shape)}|".encode())
            h.update(_tensor_bytes(v))
        else:
            h.update(f"|{type(v).__name__}|{v!r}|".encode())
    return h.hexdigest()


def file_hashes(directory: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory`` (temporary ``*.tmp`` files excluded)."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): sha256_file(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and not p.name.endswith(".tmp")}


def nonfinite_tensors(state: dict) -> list[str]:
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def verify_weights(state: dict, meta: dict | None, source: str | Path) -> None:
    """Refuse non-finite weights and weights whose SHA-256 differs from the recorded one."""
    bad = nonfinite_tensors(state)
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CheckpointError(f"{source}: non-finite weights (NaN/inf) in {', '.join(bad[:3])}{more}; refusing to load")
    recorded = (meta or {}).get("weights_sha256")
    if recorded is not None and state_dict_sha256(state) != recorded:
        raise CheckpointError(
            f"{source}: the weights do not match their recorded SHA-256 (the file was corrupted or edited "
            "after it was written); refusing to load")


def verify_tokenizer_files(directory: str | Path, recorded: dict | None, source: str | Path) -> None:
    """Refuse a tokenizer folder whose files are not the ones recorded in the checkpoint."""
    if recorded is None:
        warnings.warn(f"{source}: no tokenizer hashes recorded (a checkpoint from before integrity records); "
                      f"the tokenizer in {directory} is not verified", stacklevel=2)
        return
    got = file_hashes(directory)
    diff = sorted(k for k in set(got) | set(recorded) if got.get(k) != recorded.get(k))
    if diff:
        what = []
        for k in diff[:3]:
            what.append(f"{k} missing" if k not in got else f"{k} not in the checkpoint's tokenizer" if k not in recorded
                        else f"{k} differs")
        raise CheckpointError(
            f"{source}: the tokenizer in {directory} does not belong to this checkpoint ({'; '.join(what)}); "
            "it was edited or comes from another run")


# -- write / read --------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def with_integrity(checkpoint: dict) -> dict:
    """A shallow copy whose ``armodal`` metadata records the SHA-256 of ``state_dict``."""
    meta = checkpoint.get("armodal")
    if not isinstance(meta, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        return checkpoint
    meta = {**meta, "weights_sha256": state_dict_sha256(checkpoint["state_dict"]), "format": INTEGRITY_FORMAT}
    return {**checkpoint, "armodal": meta}


def read_checkpoint(path: str | Path, map_location: Any = "cpu", verify: bool = True) -> dict:
    """Load with ``weights_only=True``; every failure becomes a :class:`CheckpointError` naming the file.

    ``verify``: check the recorded weights SHA-256 and refuse non-finite weights.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt zip, pickle refusing a global, truncated file...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint dictionary")
    if verify and isinstance(ckpt.get("state_dict"), dict):
        meta = ckpt.get("armodal")
        verify_weights(ckpt["state_dict"], meta if isinstance(meta, dict) else None, path)
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: integrity record + atomic rename on save; ``weights_only=True`` + verify on load."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(with_integrity(checkpoint), path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(path, map_location=map_location or "cpu")


# -- best.ckpt -------------------------------------------------------------------------------
class BestCheckpoint(ModelCheckpoint):
    """``best.ckpt`` that only ever improves.

    Lightning keeps the best score in memory, restored on resume from ``last.ckpt`` -- which
    is written before the best-checkpoint callback sees the same validation, so after a
    resume its score can be one validation behind.  Here the score recorded inside the
    ``best.ckpt`` on disk is a floor: a new one is written only when strictly better.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._disk: tuple[tuple, float | None] | None = None

    def _best_path(self) -> Path | None:
        if not self.dirpath or not self.filename:
            return None
        return Path(self.dirpath) / f"{self.filename}{self.FILE_EXTENSION}"

    def recorded_best(self) -> float | None:
        """The monitored score stored in the ``best.ckpt`` on disk (None: no usable file)."""
        path = self._best_path()
        if path is None or not path.is_file():
            return None
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        if self._disk is not None and self._disk[0] == key:
            return self._disk[1]
        score = None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for state in (ckpt.get("callbacks") or {}).values():
                if (isinstance(state, dict) and state.get("monitor") == self.monitor
                        and Path(str(state.get("best_model_path") or "")).name == path.name):
                    v = state.get("best_model_score")
                    v = float(v) if v is not None else None
                    score = v if v is not None and not math.isnan(v) else None
            if score is None:
                warnings.warn(f"{path}: no recorded {self.monitor!r} score; it will be replaced by the next best")
        except Exception as e:  # noqa: BLE001 - an unreadable best.ckpt is replaced, with a warning
            warnings.warn(f"{path}: unreadable ({type(e).__name__}); it will be replaced by the next best")
        self._disk = (key, score)
        return score

    def check_monitor_top_k(self, trainer, current: torch.Tensor | None = None) -> bool:
        if not super().check_monitor_top_k(trainer, current):
            return False
        floor = self.recorded_best()
        if floor is None:
            return True
        op = torch.lt if self.mode == "min" else torch.gt
        better = bool(op(current.detach().double().cpu(), torch.tensor(floor, dtype=torch.float64)))
        return trainer.strategy.reduce_boolean_decision(better)
