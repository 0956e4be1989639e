"""Readers for raw interaction logs.

Every interaction reader returns a :class:`pandas.DataFrame` **in file order** with

* ``user`` and ``item`` (``str``): the raw external ids, exactly as written in the file;
* ``timestamp`` (nullable ``Int64``, Unix seconds): when the source has times;
* ``rating`` (``float64``): when the source has ratings;
* ``event`` (``str``): when the source has an event / behaviour type;

in that column order, with ``df.attrs["source"]`` (the path read) and
``df.attrs["bad_rows"]`` (the number of rows skipped, 0 normally).

Malformed input is never turned into a silently wrong dataset.  A row with the wrong
number of fields, a non-integer id or timestamp where an integer is required, a
non-numeric rating, an empty line in the middle of the file, bytes that are not valid
UTF-8, ... raises :class:`BadRowError`, whose message reads ``"<file>:<line>: <reason>"``
with the 1-based physical line number.  With ``on_bad_rows="skip"`` such rows are dropped
instead, their number is stored in ``df.attrs["bad_rows"]`` and a
:class:`SkippedRowsWarning` says how many rows of which file were skipped.  Problems that
make the whole file unusable (a missing or wrong header line, an unknown column, a corrupt
gzip stream) always raise.

Speed: the files are parsed with pandas' C tokenizer and validated with vectorised string
checks.  Only when that fast path sees a problem is the file re-scanned line by line, to
find the exact line numbers and reasons (the line scan is authoritative; the fast path is
accepted only when it provably saw exactly one well-formed record per line).  ML-1M's
``ratings.dat`` (1M rows) loads in about a second.

Gzip-compressed input is recognised by its magic bytes, whatever the file name.
"""

from __future__ import annotations

import collections
import csv
import gzip
import io
import os
import re
import warnings
import zlib
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import pandas as pd

__all__ = [
    "BadRowError",
    "SkippedRowsWarning",
    "read_movielens_dat",
    "read_ml100k",
    "read_movielens_csv",
    "read_table",
    "read_sequences",
    "read_titles",
]

PathLike = Union[str, "os.PathLike[str]"]

_POLICIES = ("error", "skip")
_ML_CSV_HEADER = ("userId", "movieId", "rating", "timestamp")

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


# --------------------------------------------------------------------------------------
# delimited text: fast path (pandas C tokenizer) and line scan


def _fast_split(text: str, sep: str, n_fields: int | None) -> list[pd.Series] | None:
    """Split ``text`` into string columns with pandas' C tokenizer, or return None when the
    exact line scan is needed.  Accepted only if every physical line is one record with
    exactly ``n`` fields (``n`` = ``n_fields`` or the first line's field count)."""
    t = text.rstrip("\r\n")
    if not t:
        return None
    if t.count("\r") != t.count("\r\n"):  # a bare CR: the C tokenizer would split there
        return None
    if len(sep) != 1:
        if _PLACEHOLDER_SEP in t:
            return None
        t = t.replace(sep, _PLACEHOLDER_SEP)
        sep = _PLACEHOLDER_SEP
    n_lines = t.count("\n") + 1
    if n_fields is None:
        nl = t.find("\n")
        n_fields = (t if nl < 0 else t[:nl]).count(sep) + 1
    # Every line has exactly n-1 separators: lines with more would make pandas raise
    # (it takes the column count from the first line), so equal totals imply equal counts.
    if t.count(sep) != (n_fields - 1) * n_lines:
        return None
    try:
        df = pd.read_csv(
            io.StringIO(t),
            sep=sep,
            header=None,
            dtype=str,
            quoting=csv.QUOTE_NONE,
            skip_blank_lines=False,
            keep_default_na=False,
            na_filter=False,
            index_col=False,
            engine="c",
        )
    except (pd.errors.ParserError, ValueError):
        return None
    if df.shape != (n_lines, n_fields):
        return None
    return [df[c] for c in df.columns]


def _scan_records(
    text: str, sep: str, quoting: bool
) -> tuple[list[int], list[list[str]], list[tuple[int, str]]]:
    """Line-by-line split.  Returns (record line numbers, records, bad (line, reason))."""
    lines = _physical_lines(text)
    rec_lines: list[int] = []
    recs: list[list[str]] = []
    bad: list[tuple[int, str]] = []
    if not quoting or len(sep) != 1:
        for i, line in enumerate(lines, 1):
            if not line.strip():
                bad.append((i, "empty line"))
            elif _SURROGATE_RE.search(line):
                bad.append((i, "invalid UTF-8 byte(s)"))
            else:
                rec_lines.append(i)
                recs.append(line.split(sep))
        return rec_lines, recs, bad

    reader = csv.reader((ln + "\n" for ln in lines), delimiter=sep, strict=True)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            bad.append((start, f"CSV syntax error: {exc}"))
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            bad.append((start, "empty line"))
        elif any(_SURROGATE_RE.search(f) for f in row):
            bad.append((start, "invalid UTF-8 byte(s)"))
        else:
            rec_lines.append(start)
            recs.append(row)
    return rec_lines, recs, bad


def _sep_name(sep: str) -> str:
    return repr(sep)


def _read_delimited(
    path: PathLike,
    cols: Sequence[_Col],
    *,
    sep: str | None,
    on_bad_rows: str,
    header: bool = False,
    expected_header: Sequence[str] | None = None,
    n_fields: int | None = None,
    quoting: bool = False,
    strip: bool = False,
) -> pd.DataFrame:
    _check_policy(on_bad_rows)
    raw = _read_bytes(path)
    text, utf8_ok = _decode(raw)
    del raw
    if sep is None:
        sep = _sniff_sep(path, text)

    bad: list[tuple[int, str]] = []
    hdr: list[str] | None = None
    hdr_line = 1
    fast = None
    if utf8_ok and not (quoting and '"' in text):
        fast = _fast_split(text, sep, n_fields)

    if fast is not None:
        n = len(fast)
        line_no = np.arange(1, len(fast[0]) + 1)
        if header:
            hdr = [c.iloc[0] for c in fast]
            fast = [c.iloc[1:] for c in fast]
            line_no = line_no[1:]

        def column(j: int) -> pd.Series:
            return fast[j]

    else:
        rec_lines, recs, bad = _scan_records(text, sep, quoting)
        if header:
            if not recs:
                first = bad[0] if bad else (1, "empty file")
                raise BadRowError(path, first[0], f"{first[1]}; expected a header line")
            if bad and bad[0][0] < rec_lines[0]:
                raise BadRowError(path, bad[0][0], f"{bad[0][1]}; expected a header line")
            hdr_line, hdr = rec_lines[0], recs[0]
            rec_lines, recs = rec_lines[1:], recs[1:]
        if n_fields is not None:
            n = n_fields
        elif hdr is not None:
            n = len(hdr)
        elif recs:
            n = collections.Counter(len(r) for r in recs).most_common(1)[0][0]
        else:
            n = 0
        keep = []
        for k, (ln, r) in enumerate(zip(rec_lines, recs)):
            if len(r) == n:
                keep.append(k)
            else:
                bad.append((ln, f"expected {n} fields separated by {_sep_name(sep)}, got {len(r)}"))
        line_no = np.asarray([rec_lines[k] for k in keep], dtype=np.int64)
        kept_recs = [recs[k] for k in keep]
        del recs

        def column(j: int) -> pd.Series:
            return _str_series([r[j] for r in kept_recs])

    # header checks / column resolution
    names: list[str] | None = None
    if header:
        assert hdr is not None
        names = [h.strip() for h in hdr] if strip else list(hdr)
        if expected_header is not None and tuple(names) != tuple(expected_header):
            raise BadRowError(
                path,
                hdr_line,
                f"expected header {sep.join(expected_header)!r}, got {sep.join(hdr)!r}",
            )
    positions: dict[str, int] = {}
    for col in cols:
        if isinstance(col.key, (int, np.integer)) and not isinstance(col.key, bool):
            j = int(col.key)
            if j < 0 or (n > 0 and j >= n):
                raise ValueError(
                    f"{path}: column position {j} for {col.out!r} is out of range "
                    f"(the file has {n} fields per line)"
                )
        else:
            if names is None:
                raise ValueError(
                    f"{path}: column {col.key!r} for {col.out!r} is a name, but header=False; "
                    "use 0-based integer positions"
                )
            hits = [j for j, nm in enumerate(names) if nm == col.key]
            if not hits:
                raise ValueError(f"{path}: column {col.key!r} not found in header {names}")
            if len(hits) > 1:
                raise ValueError(f"{path}: column {col.key!r} appears {len(hits)} times in the header")
            j = hits[0]
        positions[col.out] = j

    if n == 0 or len(line_no) == 0:
        series = {c.out: _str_series([]) for c in cols}
    else:
        series = {}
        for col in cols:
            s = column(positions[col.out])
            if strip:
                s = s.str.strip()
            series[col.out] = s.reset_index(drop=True)

    # value validation
    kinds = {}
    oks = {}
    n_rows = len(line_no)
    bad_mask = np.zeros(n_rows, dtype=bool)
    for col in cols:
        s = series[col.out]
        kind = col.kind
        if kind == "ts" and _ts_mode(s) == "iso":
            kind = "ts-iso"
        kinds[col.out] = kind
        ok = _validate(kind, s) if n_rows else np.zeros(0, dtype=bool)
        oks[col.out] = ok
        bad_mask |= ~ok
    if bad_mask.any():
        rows = np.flatnonzero(bad_mask)
        r0 = int(rows[0])
        for col in cols:
            if not oks[col.out][r0]:
                reason = _reason(kinds[col.out], col.label, series[col.out].iloc[r0])
                break
        value_bad = [(int(line_no[r0]), reason)] + [(int(line_no[r]), "") for r in rows[1:]]
        bad = sorted(bad + value_bad, key=lambda b: b[0])
    else:
        bad = sorted(bad, key=lambda b: b[0])
    _report_bad(path, bad, on_bad_rows)

    keep_mask = ~bad_mask
    out = {}
    for col in _ordered(cols):
        s = series[col.out]
        if bad_mask.any():
            s = s[keep_mask]
        out[col.out] = _convert(kinds[col.out], s) if len(s) else _empty(kinds[col.out])
    df = pd.DataFrame(out)
    if "timestamp" in df:
        _warn_if_ms(path, df["timestamp"])
    return _finish(df, path, len(bad))


def _empty(kind: str):
    if kind in ("int", "ts", "ts-iso"):
        return pd.array([], dtype="Int64")
    if kind == "float":
        return np.zeros(0, dtype="float64")
    return _str_series([])


# --------------------------------------------------------------------------------------
# MovieLens formats


def _ml_cols() -> list[_Col]:
    return [
        _Col("user", 0, "uint", "user id"),
        _Col("item", 1, "uint", "movie id"),
        _Col("rating", 2, "float", "rating"),
        _Col("timestamp", 3, "int", "timestamp"),
    ]


def read_movielens_dat(path: PathLike, on_bad_rows: str = "error") -> pd.DataFrame:
    """ML-1M / ML-10M ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, no header.

    Plain or gzip.  Returns ``user, item, timestamp, rating`` in file order (ML's
    ``ratings.dat`` is grouped by user but *not* time-ordered within a user).
    """
    return _read_delimited(path, _ml_cols(), sep="::", n_fields=4, on_bad_rows=on_bad_rows)


def read_ml100k(path: PathLike, on_bad_rows: str = "error") -> pd.DataFrame:
    """ML-100K ``u.data``: ``user \\t item \\t rating \\t timestamp``, no header.

    Returns ``user, item, timestamp, rating`` in file order (neither by user nor by time).
    """
    return _read_delimited(path, _ml_cols(), sep="\t", n_fields=4, on_bad_rows=on_bad_rows)


def read_movielens_csv(path: PathLike, on_bad_rows: str = "error") -> pd.DataFrame:
    """ML-20M / ml-latest(-small) ``ratings.csv``: header ``userId,movieId,rating,timestamp``.

    The header line is required and must be exactly that.  LF or CRLF line endings.
    Returns ``user, item, timestamp, rating`` in file order.
    """
    return _read_delimited(
        path,
        _ml_cols(),
        sep=",",
        n_fields=4,
        header=True,
        expected_header=_ML_CSV_HEADER,
        on_bad_rows=on_bad_rows,
    )


# --------------------------------------------------------------------------------------
# generic tables


_PARQUET_EXT = (".parquet", ".pq")


def _suffixes(path: PathLike) -> str:
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name


def _sniff_sep(path: PathLike, text: str) -> str:
    """Separator from the extension (.tsv/.tab) or from the first lines: the first candidate
    that splits (nearly) all sampled lines into the same number (> 1) of fields.  A few
    deviating lines are tolerated here: they are reported as bad rows afterwards."""
    name = _suffixes(path)
    if name.endswith((".tsv", ".tab")):
        return "\t"
    if name.endswith(".csv"):
        candidates, default = [",", ";", "\t", "|"], ","
    else:
        candidates, default = ["::", "\t", ",", ";", "|", " "], None
    chunk = text[: 1 << 16]
    lines = chunk.split("\n")
    if len(text) > len(chunk) and len(lines) > 1:
        lines = lines[:-1]  # cut in the middle
    sample = [ln.rstrip("\r") for ln in lines[:50] if ln.strip()]
    for cand in candidates:
        counts = []
        for ln in sample:
            if len(cand) == 1 and cand != " ":
                try:
                    counts.append(len(next(csv.reader([ln], delimiter=cand))) - 1)
                except csv.Error:
                    counts.append(-1)
            else:
                counts.append(ln.count(cand))
        if not counts:
            break
        mode, agree = collections.Counter(counts).most_common(1)[0]
        if mode > 0 and len(counts) - agree <= max(1, len(counts) // 10):
            return cand
    if default is not None:
        return default
    raise ValueError(
        f"{path}: could not detect the field separator (tried {candidates!r} on the first "
        f"{len(sample)} lines); pass sep= explicitly"
    )


def _parquet_table(path: PathLike, cols: Sequence[_Col], header: bool, on_bad_rows: str):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(str(path))
    names = list(pf.schema_arrow.names)
    chosen = {}
    for col in cols:
        if isinstance(col.key, (int, np.integer)) and not isinstance(col.key, bool):
            j = int(col.key)
            if not 0 <= j < len(names):
                raise ValueError(f"{path}: column position {j} out of range ({len(names)} columns)")
            chosen[col.out] = names[j]
        else:
            if col.key not in names:
                raise ValueError(f"{path}: column {col.key!r} not found; columns are {names}")
            chosen[col.out] = col.key
    table = pf.read(columns=sorted(set(chosen.values()), key=names.index))
    n_rows = table.num_rows
    bad_mask = np.zeros(n_rows, dtype=bool)  # updated in place by flag()
    first: tuple[int, str] | None = None
    out = {}

    def flag(ok: np.ndarray, reason_of) -> None:
        nonlocal first
        newbad = ~ok
        if newbad.any():
            r = int(np.flatnonzero(newbad)[0])
            if first is None or r + 1 < first[0]:
                first = (r + 1, f"{reason_of(r)} (Parquet row {r + 1})")
        np.logical_or(bad_mask, newbad, out=bad_mask)

    for col in _ordered(cols):
        arr = table.column(chosen[col.out]).to_pandas()
        label = f"{col.label} (column {chosen[col.out]!r})"
        null = arr.isna().to_numpy()
        if pd.api.types.is_bool_dtype(arr.dtype) and col.kind != "str":
            raise ValueError(f"{path}: column {chosen[col.out]!r} is boolean; expected {col.label}")
        if col.kind in ("id", "str"):
            if pd.api.types.is_integer_dtype(arr.dtype):
                vals = arr.astype("Int64").astype(str)
                ok = ~null
            elif pd.api.types.is_float_dtype(arr.dtype):
                f = arr.to_numpy(dtype="float64", na_value=np.nan)
                ok = np.isfinite(f) & (np.floor(f) == f)
                vals = _str_series(
                    [str(int(v)) if good else "" for v, good in zip(f, ok)]
                )
            else:
                vals = arr.astype(str).str.strip()
                ok = ~null & (vals.str.len() > 0).to_numpy(dtype=bool, na_value=False)
            flag(ok, lambda r, a=arr, lab=label: f"missing or invalid {lab}: {a.iloc[r]!r}")
            out[col.out] = vals.reset_index(drop=True)
        elif col.kind == "float":
            if pd.api.types.is_numeric_dtype(arr.dtype):
                f = arr.to_numpy(dtype="float64", na_value=np.nan)
            else:
                s = arr.astype(str)
                okf = ~null & _fullmatch(s, _FLOAT_PATTERN)
                f = np.full(n_rows, np.nan)
                f[okf] = s[okf].astype("float64").to_numpy()
            ok = np.isfinite(f)
            flag(ok, lambda r, a=arr, lab=label: f"{lab} {a.iloc[r]!r} is not a finite number")
            out[col.out] = f
        else:  # timestamp
            if pd.api.types.is_datetime64_any_dtype(arr.dtype):
                ok = ~null
                dt = arr.dt.tz_localize("UTC") if arr.dt.tz is None else arr.dt.tz_convert("UTC")
                secs = np.zeros(n_rows, dtype=np.int64)
                if ok.any():
                    secs[ok] = (
                        (dt[ok] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
                    ).to_numpy(dtype="int64")
            elif pd.api.types.is_integer_dtype(arr.dtype):
                ok = ~null
                secs = arr.astype("Int64").to_numpy(dtype="int64", na_value=0)
            elif pd.api.types.is_float_dtype(arr.dtype):
                f = arr.to_numpy(dtype="float64", na_value=np.nan)
                ok = np.isfinite(f) & (np.floor(f) == f)
                secs = np.where(ok, np.nan_to_num(f), 0).astype(np.int64)
            else:
                s = arr.astype(str).str.strip()
                s = s.where(~null, "")
                kind = "ts-iso" if _ts_mode(s) == "iso" else "ts"
                ok = _validate(kind, s)
                secs = np.zeros(n_rows, dtype=np.int64)
                if ok.any():
                    secs[ok] = np.asarray(_convert(kind, s[ok]), dtype=np.int64)
            flag(ok, lambda r, a=arr, lab=label: f"missing or non-integer {lab}: {a.iloc[r]!r}")
            out[col.out] = pd.array(secs, dtype="Int64")

    n_bad = int(bad_mask.sum())
    if n_bad:
        _report_bad(path, [first] + [(0, "")] * (n_bad - 1), on_bad_rows)
        keep = ~bad_mask
        out = {k: (v[keep] if not isinstance(v, pd.Series) else v[keep].reset_index(drop=True)) for k, v in out.items()}
    df = pd.DataFrame(out)
    if "timestamp" in df:
        _warn_if_ms(path, df["timestamp"])
    return _finish(df, path, n_bad)


def read_table(
    path: PathLike,
    *,
    user,
    item,
    timestamp=None,
    rating=None,
    event=None,
    sep: str | None = None,
    header: bool = True,
    on_bad_rows: str = "error",
) -> pd.DataFrame:
    """Read interactions from a generic delimited text file (plain or gzip) or Parquet.

    ``user``/``item``/``timestamp``/``rating``/``event`` name the source columns: header
    names (``header=True``; integer positions are accepted too) or 0-based positions
    (``header=False``).  ``sep=None`` sniffs the separator: Parquet by extension
    (``.parquet``/``.pq``); ``.tsv``/``.tab`` → tab; ``.csv`` → the first of ``, ; \\t |``
    that splits the first lines consistently; other names try ``:: \\t , ; |`` and space.
    Any single- or multi-character ``sep`` may be given.  Double-quoted fields (RFC 4180)
    are understood for single-character separators, including quoted line breaks.

    Field values are stripped of surrounding whitespace.  Every line must have the same
    number of fields as the header (or, without a header, as most lines).  ``user`` and
    ``item`` must be non-empty; ``rating`` a finite number; ``event`` non-empty.
    ``timestamp`` must be integer Unix seconds, or, if the column's first value is an
    ISO-8601 date/time (``2017-11-26 09:00:00``, with optional offset; naive means UTC),
    ISO-8601 throughout; it is converted to Unix seconds.  Values are not rescaled: a
    warning is given if they look like milliseconds.  Parquet integer, float (integral),
    string and timestamp columns are accepted; nulls are bad rows.

    Without ``timestamp`` the output has no timestamp column and file order is time order.
    """
    _check_policy(on_bad_rows)
    cols = [_Col("user", user, "id", "user id"), _Col("item", item, "id", "item id")]
    if timestamp is not None:
        cols.append(_Col("timestamp", timestamp, "ts", "timestamp"))
    if rating is not None:
        cols.append(_Col("rating", rating, "float", "rating"))
    if event is not None:
        cols.append(_Col("event", event, "str", "event"))
    for col in cols:
        if isinstance(col.key, bool) or not isinstance(col.key, (str, int, np.integer)):
            raise TypeError(f"{col.out}= must be a column name or a 0-based position, got {col.key!r}")
        if not header and isinstance(col.key, str):
            raise ValueError(
                f"{col.out}={col.key!r}: with header=False columns are 0-based integer positions"
            )

    if sep is None and _suffixes(path).endswith(_PARQUET_EXT):
        return _parquet_table(path, cols, header, on_bad_rows)
    if sep is not None and (not isinstance(sep, str) or not sep or any(c in sep for c in '\r\n"')):
        raise ValueError(f"invalid separator {sep!r}")
    return _read_delimited(
        path,
        cols,
        sep=sep,
        header=bool(header),
        quoting=True,
        strip=True,
        on_bad_rows=on_bad_rows,
    )


# --------------------------------------------------------------------------------------
# sequence files


def _text_lines(path: PathLike) -> list[str]:
    text, _ = _decode(_read_bytes(path))
    return _physical_lines(text)


def read_sequences(
    path: PathLike, timestamps_path: PathLike | None = None, on_bad_rows: str = "error"
) -> pd.DataFrame:
    """Per-user item sequences, one line ``user item_1 item_2 ...``, oldest first.

    The SASRec / S3-Rec format; whitespace-separated, plain or gzip.  A user may appear on
    several lines (SASRec's one-pair-per-line files): their items are concatenated in
    file order.  Returns ``user, item`` (and ``timestamp``) in file order.

    ``timestamps_path``: a position-aligned file ``user t_1 t_2 ...`` (integer Unix
    seconds): line ``k`` must hold the same user and as many values as line ``k`` of the
    sequence file, non-decreasing along the line; otherwise :class:`BadRowError` names the
    timestamp file and line (with ``on_bad_rows="skip"`` the line is dropped from both).
    """
    _check_policy(on_bad_rows)
    seq_lines = _text_lines(path)
    bad: dict[int, tuple[PathLike, str]] = {}  # 0-based line index -> (file, reason)
    parts: list[list[str] | None] = [None] * len(seq_lines)
    for i, line in enumerate(seq_lines):
        toks = line.split()
        if not toks:
            bad[i] = (path, "empty line")
        elif not line.isascii() and _SURROGATE_RE.search(line):
            bad[i] = (path, "invalid UTF-8 byte(s)")
        elif len(toks) < 2:
            bad[i] = (path, f"user {_short(toks[0])} has no items")
        else:
            parts[i] = toks

    ts_values: dict[int, np.ndarray] = {}
    extra_ts_lines: list[int] = []
    if timestamps_path is not None:
        ts_lines = _text_lines(timestamps_path)
        seq_name = Path(path).name
        cand = []
        ts_parts: dict[int, list[str]] = {}
        for i in range(max(len(seq_lines), len(ts_lines))):
            if i >= len(ts_lines):
                bad.setdefault(
                    i,
                    (
                        timestamps_path,
                        f"missing line: the timestamp file has {len(ts_lines)} lines, "
                        f"{seq_name} has {len(seq_lines)}",
                    ),
                )
                continue
            if i >= len(seq_lines):
                extra_ts_lines.append(i)
                continue
            if i in bad:
                continue
            toks = ts_lines[i].split()
            seq = parts[i]
            assert seq is not None
            if not toks:
                bad[i] = (timestamps_path, "empty line")
            elif toks[0] != seq[0]:
                bad[i] = (
                    timestamps_path,
                    f"user {_short(toks[0])} does not match user {_short(seq[0])} "
                    f"on line {i + 1} of {seq_name} (files not aligned)",
                )
            elif len(toks) != len(seq):
                bad[i] = (
                    timestamps_path,
                    f"{len(toks) - 1} timestamps for user {_short(seq[0])}, but line {i + 1} "
                    f"of {seq_name} has {len(seq) - 1} items",
                )
            else:
                cand.append(i)
                ts_parts[i] = toks
        if extra_ts_lines:
            first_extra = extra_ts_lines[0]
            bad[first_extra] = (
                timestamps_path,
                f"extra line: the timestamp file has {len(ts_lines)} lines, "
                f"{seq_name} has {len(seq_lines)}",
            )
            for i in extra_ts_lines[1:]:
                bad[i] = (timestamps_path, "extra line")
        if cand:
            lens = np.array([len(ts_parts[i]) - 1 for i in cand])
            s = _str_series(list(chain.from_iterable(ts_parts[i][1:] for i in cand)))
            ok = _fullmatch(s, _INT_PATTERN)
            owner = np.repeat(np.arange(len(cand)), lens)
            vals = np.zeros(len(s), dtype=np.int64)
            vals[ok] = s[ok].astype("int64").to_numpy()
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            dec = np.zeros(len(s), dtype=bool)
            dec[1:] = (vals[1:] < vals[:-1]) & (owner[1:] == owner[:-1])
            for tok in np.flatnonzero(~ok | dec):
                i = cand[owner[tok]]
                if i in bad:
                    continue
                pos = int(tok - starts[owner[tok]])
                if not ok[tok]:
                    reason = f"timestamp {_short(s.iloc[tok])} (position {pos + 1}) is not an integer"
                elif not ok[tok - 1]:
                    continue  # reported via the previous token
                else:
                    reason = (
                        f"timestamps decrease at position {pos + 1} "
                        f"({vals[tok]} after {vals[tok - 1]}); lines must be oldest first"
                    )
                bad[i] = (timestamps_path, reason)
            for k, i in enumerate(cand):
                if i not in bad:
                    ts_values[i] = vals[starts[k] : starts[k] + lens[k]]

    if bad:
        first = min(bad)
        fpath, reason = bad[first]
        if on_bad_rows == "error":
            raise BadRowError(fpath, first + 1, reason)
        warnings.warn(
            f"skipped {len(bad)} malformed line(s) of {path}"
            + (f" / {timestamps_path}" if timestamps_path is not None else "")
            + f" (first: {fpath}:{first + 1}: {reason})",
            SkippedRowsWarning,
            stacklevel=2,
        )

    good = [i for i in range(len(seq_lines)) if i not in bad]
    lens = np.array([len(parts[i]) - 1 for i in good], dtype=np.int64)
    users = np.array([parts[i][0] for i in good], dtype=object)
    out = {
        "user": _str_series(np.repeat(users, lens) if len(good) else []),
        "item": _str_series(list(chain.from_iterable(parts[i][1:] for i in good))),
    }
    if timestamps_path is not None:
        ts = np.concatenate([ts_values[i] for i in good]) if good else np.zeros(0, np.int64)
        out["timestamp"] = pd.array(ts, dtype="Int64")
    df = pd.DataFrame(out)
    if timestamps_path is not None:
        df.attrs["timestamps_source"] = str(timestamps_path)
        _warn_if_ms(timestamps_path, df["timestamp"], stacklevel=3)
    return _finish(df, path, len(bad))


# --------------------------------------------------------------------------------------
# titles


def _decode_latin1_fallback(raw: bytes) -> str:
    """UTF-8 if the bytes are valid UTF-8, else Latin-1 (ML-1M movies.dat, ML-100K u.item)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_titles(path: PathLike) -> dict[str, str]:
    """Item id -> title, in file order.

    Formats (detected from the first line):

    * ML-1M ``movies.dat``: ``MovieID::Title::Genres``;
    * ML-100K ``u.item``: ``id|title|release date|...``;
    * ml-latest / ML-20M ``movies.csv``: header ``movieId,title,genres``, titles may be
      double-quoted and contain commas.

    ``.dat`` / ``u.item`` files are Latin-1 in the GroupLens releases; they are decoded as
    UTF-8 when that is valid (later releases) and as Latin-1 otherwise.  Malformed lines,
    empty lines in the middle and ids given twice with different titles raise
    :class:`BadRowError`.
    """
    raw = _read_bytes(path)
    head = raw[:4096].split(b"\n", 1)[0].strip().lstrip(b"\xef\xbb\xbf")
    titles: dict[str, str] = {}
    first_line: dict[str, int] = {}

    def add(line: int, item: str, title: str) -> None:
        if not item.strip():
            raise BadRowError(path, line, "empty item id")
        if item in titles and titles[item] != title:
            raise BadRowError(
                path,
                line,
                f"item {_short(item)} already has title {titles[item]!r} (line {first_line[item]})",
            )
        titles.setdefault(item, title)
        first_line.setdefault(item, line)

    if head.lower().startswith(b"movieid,title"):
        text, ok = _decode(raw)
        if not ok:
            raise BadRowError(path, _first_bad_utf8_line(raw), "invalid UTF-8 byte(s)")
        lines = _physical_lines(text)
        reader = csv.reader((ln + "\n" for ln in lines), strict=True)
        try:
            header = next(reader)
        except StopIteration:
            return {}
        n = len(header)
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise BadRowError(path, start, f"CSV syntax error: {exc}") from None
            if not row or (len(row) == 1 and not row[0].strip()):
                raise BadRowError(path, start, "empty line")
            if len(row) != n:
                raise BadRowError(path, start, f"expected {n} fields separated by ',', got {len(row)}")
            add(start, row[0], row[1])
        return titles

    text = _decode_latin1_fallback(raw)
    lines = _physical_lines(text)
    if b"::" in head:
        sep, n_exact = "::", 3
    elif b"|" in head:
        sep, n_exact = "|", None
    else:
        raise ValueError(
            f"{path}: unrecognised titles format (expected movies.dat 'MovieID::Title::Genres', "
            "u.item 'id|title|...' or movies.csv with header 'movieId,title,genres')"
        )
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise BadRowError(path, i, "empty line")
        fields = line.split(sep)
        if (n_exact is not None and len(fields) != n_exact) or len(fields) < 2:
            want = n_exact if n_exact is not None else "at least 2"
            raise BadRowError(path, i, f"expected {want} fields separated by {sep!r}, got {len(fields)}")
        add(i, fields[0], fields[1])
    return titles


def _first_bad_utf8_line(raw: bytes) -> int:
    try:
        raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return raw[: exc.start].count(b"\n") + 1
    return 1
