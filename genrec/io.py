"""Durable file writes shared by every layer (data, train, api, serve): nothing here imports the rest of genrec.

``atomic_write`` writes to a temporary name in the target's directory, flushes and fsyncs it, renames it onto the
target and fsyncs the directory, so neither a crash nor a power loss leaves a half-written file behind: a reader
sees the old file or the new one. Files written this way get the same permissions as any other file the process
creates (``0666`` minus the umask, usually ``0644``), not ``mkstemp``'s private ``0600``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform where directories cannot be opened: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync it, rename it onto ``path`` and fsync the directory.

    On any error (including KeyboardInterrupt) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def cache_dir() -> Path:
    """genrec's cache root: ``$GENREC_CACHE_DIR``, else ``$XDG_CACHE_HOME/genrec``, else ``~/.cache/genrec``.

    Downloaded datasets live directly under it, built native kernels under ``native/``."""
    root = os.environ.get("GENREC_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg).expanduser() / "genrec" if xdg else Path.home() / ".cache" / "genrec"


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""

    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")

    atomic_write(path, _w)
