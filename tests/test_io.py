"""genrec.io: durable writes and the cache root."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from genrec.io import atomic_write, cache_dir, write_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_get_the_same_permissions_as_plain_files(tmp_path):
    """One policy: a file written atomically is as readable as one opened with open() (mkstemp alone gives 0600)."""
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "atomic.json", {"a": 1})
        atomic_write(tmp_path / "atomic.bin", lambda tmp: open(tmp, "wb").write(b"x"))
        with open(tmp_path / "plain.json", "w") as fh:
            fh.write("{}")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "plain.json") == 0o644
    assert _mode(tmp_path / "atomic.json") == _mode(tmp_path / "plain.json")
    assert _mode(tmp_path / "atomic.bin") == 0o644


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_json(tmp_path / "private.json", [])
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private.json") == 0o600


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("GENREC_CACHE_DIR", str(tmp_path / "g"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "g"
    monkeypatch.delenv("GENREC_CACHE_DIR")
    assert cache_dir() == tmp_path / "x" / "genrec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "genrec"
