"""Shared parts of the readers: the errors and warnings they raise, the bad-row policy,
byte decoding, and the per-kind value validation and conversion (vectorised over pandas
string Series)."""

from __future__ import annotations

import gzip
import os
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import pandas as pd

PathLike = Union[str, "os.PathLike[str]"]

_POLICIES = ("error", "skip")

# Value patterns (matched against the whole field).
_UINT_PATTERN = r"[0-9]{1,18}"
_INT_PATTERN = r"[+-]?[0-9]{1,18}"
_FLOAT_PATTERN = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_ISO_PREFIX = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
_INT_RE = re.compile(_INT_PATTERN)
_ISO_RE = re.compile(_ISO_PREFIX)
_SURROGATE_RE = re.compile("[\udc80-\udcff]")
# A timestamp column whose values exceed this is almost certainly in milliseconds.
_MS_THRESHOLD = 10**11

# Separator tried when a multi-character separator (e.g. "::") is mapped to one character
# for pandas' C tokenizer.
_PLACEHOLDER_SEP = "\x1f"


class BadRowError(ValueError):
    """A malformed row (or line) in a data file.

    ``str(err)`` is ``"<path>:<line>: <reason>"``; ``line`` is 1-based.  For Parquet files
    ``line`` is the 1-based row number.
    """

    def __init__(self, path: PathLike, line: int, reason: str):
        self.path = str(path)
        self.line = int(line)
        self.reason = str(reason)
        super().__init__(f"{self.path}:{self.line}: {self.reason}")

    def __reduce__(self):  # keep it picklable (multiprocessing, pytest-xdist)
        return (type(self), (self.path, self.line, self.reason))


class SkippedRowsWarning(UserWarning):
    """Emitted when ``on_bad_rows="skip"`` dropped malformed rows."""


# --------------------------------------------------------------------------------------
# small helpers


def _check_policy(on_bad_rows: str) -> None:
    if on_bad_rows not in _POLICIES:
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")


def _read_bytes(path: PathLike) -> bytes:
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip data: {exc}") from exc
    return raw


def _decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 (a BOM is dropped).  Returns (text, ok); undecodable bytes become lone
    surrogates (``surrogateescape``) so that the line scan can report them."""
    try:
        return raw.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8-sig", errors="surrogateescape"), False


def _physical_lines(text: str) -> list[str]:
    """Lines split on "\\n" only (so line numbers are what editors show), one trailing
    "\\r" removed per line, trailing blank lines dropped."""
    lines = text.split("\n")
    end = len(lines)
    while end > 0 and not lines[end - 1].strip():
        end -= 1
    del lines[end:]
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _str_series(values) -> pd.Series:
    return pd.Series(values, dtype=str)


def _finish(df: pd.DataFrame, source: PathLike, bad_rows: int) -> pd.DataFrame:
    df.attrs["source"] = str(source)
    df.attrs["bad_rows"] = int(bad_rows)
    return df


def _report_bad(
    path: PathLike, bad: Sequence[tuple[int, str]], on_bad_rows: str, stacklevel: int = 4
) -> None:
    """Raise for the first bad line, or warn about all of them (``bad`` sorted by line)."""
    if not bad:
        return
    line, reason = bad[0]
    if on_bad_rows == "error":
        raise BadRowError(path, line, reason)
    warnings.warn(
        f"skipped {len(bad)} malformed row(s) in {path} (first: line {line}: {reason})",
        SkippedRowsWarning,
        stacklevel=stacklevel,
    )


def _short(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


# --------------------------------------------------------------------------------------
# value kinds: vectorised validation, conversion and per-value reasons


@dataclass
class _Col:
    out: str  # output column name
    key: Union[int, str]  # 0-based position or header name
    kind: str  # "uint" | "int" | "ts" | "float" | "id" | "str"
    label: str  # for messages


def _fullmatch(s: pd.Series, pattern: str) -> np.ndarray:
    return np.array(s.str.fullmatch(pattern).to_numpy(dtype=bool, na_value=False))  # writable


def _ts_mode(s: pd.Series) -> str:
    """"int" (Unix seconds) or "iso" (ISO-8601 dates), decided by the first non-empty value."""
    for value in s:
        if isinstance(value, str) and value.strip():
            if _INT_RE.fullmatch(value):
                return "int"
            return "iso" if _ISO_RE.match(value) else "int"
    return "int"


def _iso_parse(s: pd.Series) -> pd.Series:
    return pd.to_datetime(s, format="ISO8601", utc=True, errors="coerce")


def _validate(kind: str, s: pd.Series) -> np.ndarray:
    """Boolean mask of valid values of a ``str`` Series."""
    if kind == "uint":
        return _fullmatch(s, _UINT_PATTERN)
    if kind == "int":
        return _fullmatch(s, _INT_PATTERN)
    if kind in ("ts", "ts-iso"):
        if kind == "ts-iso":
            ok = np.array(s.str.match(_ISO_PREFIX).to_numpy(dtype=bool, na_value=False))
            if ok.any():
                ok[ok] = _iso_parse(s[ok]).notna().to_numpy()
            return ok
        return _fullmatch(s, _INT_PATTERN)
    if kind == "float":
        ok = _fullmatch(s, _FLOAT_PATTERN)
        if ok.any():
            ok[ok] = np.isfinite(s[ok].astype("float64").to_numpy())
        return ok
    if kind in ("id", "str"):
        return np.array((s.str.len() > 0).to_numpy(dtype=bool, na_value=False))
    raise AssertionError(kind)


def _reason(kind: str, label: str, value: str) -> str:
    if value == "":
        return f"empty {label}"
    if kind == "uint":
        return f"{label} {_short(value)} is not a non-negative integer"
    if kind in ("int", "ts"):
        return f"{label} {_short(value)} is not an integer"
    if kind == "ts-iso":
        return (
            f"{label} {_short(value)} is not an ISO-8601 date/time "
            "(the column's first value is one, so all must be)"
        )
    if kind == "float":
        return f"{label} {_short(value)} is not a finite number"
    return f"invalid {label} {_short(value)}"


def _convert(kind: str, s: pd.Series):
    """Convert an all-valid ``str`` Series to the output dtype."""
    if kind in ("uint", "id", "str"):
        return s.reset_index(drop=True)
    if kind in ("int", "ts"):
        return pd.array(s.astype("int64").to_numpy(), dtype="Int64")
    if kind == "ts-iso":
        secs = (_iso_parse(s) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
        return pd.array(secs.to_numpy(dtype="int64"), dtype="Int64")
    if kind == "float":
        return s.astype("float64").to_numpy()
    raise AssertionError(kind)


def _warn_if_ms(path: PathLike, ts, stacklevel: int = 4) -> None:
    arr = np.asarray(pd.array(ts, dtype="Int64").dropna(), dtype="int64")
    if arr.size and np.abs(arr).max() > _MS_THRESHOLD:
        warnings.warn(
            f"{path}: timestamps up to {int(np.abs(arr).max())} look like milliseconds; "
            "the timestamp column is meant to hold Unix seconds (divide by 1000)",
            UserWarning,
            stacklevel=stacklevel,
        )


_OUT_ORDER = ("user", "item", "timestamp", "rating", "event")


def _ordered(cols: Sequence[_Col]) -> list[_Col]:
    return sorted(cols, key=lambda c: _OUT_ORDER.index(c.out))


def _empty(kind: str):
    if kind in ("int", "ts", "ts-iso"):
        return pd.array([], dtype="Int64")
    if kind == "float":
        return np.zeros(0, dtype="float64")
    return _str_series([])

