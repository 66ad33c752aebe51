"""Run folders that are never clobbered: which folder, resume rules, a lock, leftover clean-up.

* A non-empty ``run_dir`` is refused unless ``resume=true`` (continue it) or
  ``overwrite=true`` (replace it; only a folder that holds an armodal run is emptied).
* ``resume=true`` needs a ``checkpoints/last.ckpt``; without one it is an error.
* ``.armodal.lock`` holds the pid of the training that owns the folder: a second run
  into the same folder is refused while that process lives; a lock whose process is gone
  (a killed run) is taken over with a warning.
* Temporary ``*.tmp`` files left by a killed write are removed when the next run starts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

__all__ = ["RunFolderError", "RunLock", "resolve_run_dir", "claim_run_dir", "remove_orphaned_tmp", "LOCK_NAME"]

LOCK_NAME = ".armodal.lock"
RUN_MARKERS = ("config.yaml", "checkpoints", "metrics.json", "tokenizer")  # what makes a folder an armodal run


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (occupied, locked, nothing to resume)."""


def _flag(value) -> bool:
    if isinstance(value, str):
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
    return bool(value)


def resolve_run_dir(cfg, runs_dir: Path, stamp: str) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (None: a fresh start). Touches nothing."""
    resume = cfg.get("resume", False)
    overwrite = _flag(cfg.get("overwrite", False))
    runs = Path(runs_dir) / cfg.name
    if isinstance(resume, str) and resume.lower() not in ("true", "false"):
        if overwrite:
            raise RunFolderError(f"resume={resume} and overwrite=true contradict each other; pick one")
        ckpt = Path(resume).expanduser().resolve()
        if not ckpt.is_file():
            raise RunFolderError(f"resume={resume}: checkpoint file not found")
        return ckpt.parent.parent, ckpt
    resume = _flag(resume)
    if resume and overwrite:
        raise RunFolderError("resume=true and overwrite=true contradict each other: resume continues the run in "
                             "the folder, overwrite replaces it; pick one")
    if cfg.get("run_dir"):
        run_dir = Path(cfg.run_dir).expanduser().resolve()
        if resume:
            last = run_dir / "checkpoints" / "last.ckpt"
            if not last.is_file():
                raise RunFolderError(f"resume=true but {last} does not exist: nothing to resume. Drop resume=true to "
                                     "start a new run (overwrite=true to replace what is in the folder)")
            return run_dir, last
        return run_dir, None
    if resume:
        lasts = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not lasts:
            raise RunFolderError(f"resume=true but no run of {cfg.name!r} under {runs} has a checkpoints/last.ckpt: "
                                 "nothing to resume. Drop resume=true to start a new run")
        return lasts[-1].parent.parent.resolve(), lasts[-1].resolve()
    run_dir = runs / stamp
    i = 1
    while run_dir.exists():
        run_dir = runs / f"{stamp}_{i}"
        i += 1
    return run_dir.resolve(), None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``<run_dir>/.armodal.lock``: one training per run folder."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def _payload(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    def _holder(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and host not in (None, socket.gethostname()):
                    raise RunFolderError(
                        f"{self.path.parent} is locked by a training on host {host} (pid {pid}); if that run is "
                        f"gone, delete {self.path}") from None
                if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
                    raise RunFolderError(
                        f"{self.path.parent} is in use by another training (pid {pid}, started "
                        f"{holder.get('started', '?')}); wait for it to finish or pick another run_dir") from None
                warnings.warn(f"{self.path}: stale lock (process {pid} no longer exists); taking it over",
                              stacklevel=2)
                tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
                tmp.write_text(self._payload())
                os.replace(tmp, self.path)
                if self._holder().get("pid") == os.getpid():
                    self.held = True
                    return self
                continue  # someone else took it over at the same moment: look again
            with os.fdopen(fd, "w") as f:
                f.write(self._payload())
            self.held = True
            return self
        raise RunFolderError(f"{self.path}: could not take the run-folder lock")

    def release(self) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_orphaned_tmp(run_dir: Path) -> list[Path]:
    """Delete ``*.tmp`` files a killed write left in the run folder, its checkpoints/ and tokenizer/."""
    removed = []
    for d in (run_dir, run_dir / "checkpoints", run_dir / "tokenizer"):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_file() and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        warnings.warn(f"{run_dir}: removed {len(removed)} temporary file(s) left by an interrupted write: "
                      f"{', '.join(p.name for p in removed[:5])}", stacklevel=2)
    return removed


def claim_run_dir(run_dir: Path, resuming: bool, overwrite: bool) -> RunLock:
    """Lock the run folder, enforce the non-empty rule, clear it for ``overwrite``, drop leftovers."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    lock = RunLock(run_dir).acquire()
    try:
        content = [p for p in run_dir.iterdir() if p.name != LOCK_NAME]
        if content and not resuming:
            if not overwrite:
                names = ", ".join(sorted(p.name for p in content)[:6])
                raise RunFolderError(
                    f"run_dir {run_dir} is not empty ({names}); pass resume=true to continue the run in it, or "
                    "overwrite=true to replace it (or pick another run_dir)")
            if not any((run_dir / m).exists() for m in RUN_MARKERS):
                raise RunFolderError(
                    f"overwrite=true: {run_dir} does not look like an armodal run folder (no "
                    f"{', '.join(RUN_MARKERS)}); refusing to delete its contents. Pick an empty or new run_dir")
            warnings.warn(f"overwrite=true: replacing the run in {run_dir}", stacklevel=2)
            for p in content:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        remove_orphaned_tmp(run_dir)
    except BaseException:
        lock.release()
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise
    return lock
