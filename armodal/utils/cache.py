"""Caches that never go stale, and never stop a run.

* :func:`content_key` keys a cache entry on what went into it: the resolved data root,
  each input file's relative path, size, mtime and SHA-256, plus any parameters.  A
  replaced input (even with the same name and size) gives a new key.
* :func:`writable_dir` checks a cache folder can be written; a read-only one gives a
  warning and ``None``: the caller runs without the cache.
* :func:`atomic_write` / :func:`mark_complete` / :func:`is_complete`: an entry (or a
  converted folder) is only used once it was completely written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["file_sha256", "fingerprint", "content_key", "writable_dir", "atomic_write", "mark_complete",
           "is_complete", "COMPLETE_MARKER"]

COMPLETE_MARKER = ".complete"
_SHA_MEMO: dict[tuple, str] = {}  # (path, inode, size, mtime_ns, ctime_ns) -> sha256, within one process


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (memoised per process on path, inode, size, mtime and ctime: any write
    changes the ctime, which ``touch``/``utime`` cannot set back)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def fingerprint(files: Iterable[str | Path], root: str | Path | None = None) -> list[list]:
    """``[relative path, size, mtime_ns, sha256]`` per file (paths relative to ``root`` when given)."""
    out = []
    for f in files:
        f = Path(f)
        st = f.stat()
        rel = f.resolve().relative_to(Path(root).resolve()).as_posix() if root is not None else str(f.resolve())
        out.append([rel, st.st_size, st.st_mtime_ns, file_sha256(f)])
    return out


def content_key(root: str | Path | None, files: Iterable[str | Path], n: int = 16, **params: Any) -> str:
    """A hex key of the data root, every input file's content fingerprint and ``params``."""
    payload = {
        "root": str(Path(root).resolve()) if root is not None else None,
        "files": fingerprint(files, root),
        "params": params,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:n]


def writable_dir(path: str | Path | None, what: str = "cache") -> Path | None:
    """``path`` created and writable, else a warning and ``None`` (run without the cache)."""
    if path is None:
        return None
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        warnings.warn(f"{path}: {what} folder is not writable ({type(e).__name__}: {e.strerror or e}); "
                      f"running without the {what}", stacklevel=2)
        return None
    return path


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path in the same folder, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def mark_complete(directory: str | Path, **info: Any) -> None:
    """Mark a folder as completely written (the last step of a conversion)."""
    atomic_write(Path(directory) / COMPLETE_MARKER, lambda p: p.write_text(json.dumps(info, default=str)))


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / COMPLETE_MARKER).is_file()
