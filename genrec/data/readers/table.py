"""Generic interaction tables: delimited text files with named or numbered columns,
Parquet files, and in-memory pandas DataFrames."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from genrec.data.readers.common import (
    _FLOAT_PATTERN,
    PathLike,
    _check_policy,
    _Col,
    _convert,
    _finish,
    _fullmatch,
    _ordered,
    _report_bad,
    _str_series,
    _ts_mode,
    _validate,
    _warn_if_ms,
)
from genrec.data.readers.delimited import (
    _read_delimited,
    _suffixes,
)

_PARQUET_EXT = (".parquet", ".pq")


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
    arrays = {col.out: (table.column(chosen[col.out]).to_pandas(), chosen[col.out]) for col in cols}
    return _typed_table(path, arrays, cols, on_bad_rows, lambda r: f"Parquet row {r + 1}")


def _show(value) -> str:
    """A cell value for messages: plain Python repr, missing values named as such."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and np.isnan(value)):
        return f"missing ({value!r})"
    return repr(value)


def _typed_table(source, arrays: dict, cols: Sequence[_Col], on_bad_rows: str, where) -> pd.DataFrame:
    """Validate and convert typed columns (Parquet, DataFrame) to the readers' output.

    ``arrays`` maps each output name to ``(values as a pandas Series, source column label)``;
    ``where(r)`` describes 0-based row ``r`` for messages.  A bad row is reported as
    ``"<source>:<r + 1>: <reason> (<where(r)>)"``.
    """
    n_rows = len(next(iter(arrays.values()))[0]) if arrays else 0
    bad_mask = np.zeros(n_rows, dtype=bool)  # updated in place by flag()
    first: tuple[int, str] | None = None
    out = {}
    path = source

    def flag(ok: np.ndarray, reason_of) -> None:
        nonlocal first
        newbad = ~ok
        if newbad.any():
            r = int(np.flatnonzero(newbad)[0])
            if first is None or r + 1 < first[0]:
                first = (r + 1, f"{reason_of(r)} ({where(r)})")
        np.logical_or(bad_mask, newbad, out=bad_mask)

    for col in _ordered(cols):
        arr, name = arrays[col.out]
        arr = arr.reset_index(drop=True)
        label = f"{col.label} (column {name!r})"
        null = arr.isna().to_numpy()
        if pd.api.types.is_bool_dtype(arr.dtype) and col.kind != "str":
            raise ValueError(f"{path}: column {name!r} is boolean; expected {col.label}")
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
            flag(ok, lambda r, a=arr, lab=label: f"missing or invalid {lab}: {_show(a.iloc[r])}")
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
            flag(ok, lambda r, a=arr, lab=label: f"{lab} {_show(a.iloc[r])} is not a finite number")
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
            flag(ok, lambda r, a=arr, lab=label: f"missing or non-integer {lab}: {_show(a.iloc[r])}")
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



def read_frame(
    frame: pd.DataFrame,
    *,
    user,
    item,
    timestamp=None,
    rating=None,
    event=None,
    on_bad_rows: str = "error",
    source: str = "DataFrame",
) -> pd.DataFrame:
    """Interactions from an in-memory :class:`pandas.DataFrame`, checked like :func:`read_table`.

    ``user``/``item``/``timestamp``/``rating``/``event`` are column labels of ``frame``
    (``timestamp``, ``rating`` and ``event`` are optional).  A label that is not a column, that
    names more than one column, or that is given for two roles raises ``ValueError``.

    Values: ids may be strings, integers or integral floats (``3.0`` becomes ``"3"``); a
    missing id (None, NaN, empty string) is a bad row.  ``timestamp`` may be integer Unix
    seconds, integral floats, ISO-8601 strings, or ``datetime64`` values in any unit, naive
    (meaning UTC) or timezone-aware: datetimes are converted to integer Unix seconds
    (sub-second parts are floored).  A missing timestamp is a bad row: to train without time,
    leave the timestamp out.  Bad rows raise :class:`BadRowError` reading
    ``"<source>:<n>: <reason> (row <n> of the DataFrame, index <label>)"``, ``n`` being the
    1-based row position; with ``on_bad_rows="skip"`` they are dropped with a warning.

    Returns the readers' standard table (``user, item[, timestamp, rating, event]``) in row
    order, with ``attrs["source"] = source``.
    """
    _check_policy(on_bad_rows)
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"read_frame takes a pandas DataFrame, got {type(frame).__name__}")
    cols = [_Col("user", user, "id", "user id"), _Col("item", item, "id", "item id")]
    for out, key, kind, label in (
        ("timestamp", timestamp, "ts", "timestamp"),
        ("rating", rating, "float", "rating"),
        ("event", event, "str", "event"),
    ):
        if key is not None:
            cols.append(_Col(out, key, kind, label))
    names = list(frame.columns)
    used: dict = {}
    arrays = {}
    for col in cols:
        try:
            hits = [j for j, name in enumerate(names) if name == col.key]
        except (TypeError, ValueError):
            hits = []
        if not hits:
            raise ValueError(f"{source}: no column {col.key!r} for {col.out}; the columns are {names}")
        if len(hits) > 1:
            raise ValueError(
                f"{source}: column {col.key!r} for {col.out} is ambiguous: {len(hits)} columns have that name"
            )
        if hits[0] in used:
            raise ValueError(f"{source}: column {col.key!r} is given for both {used[hits[0]]} and {col.out}")
        used[hits[0]] = col.out
        arrays[col.out] = (frame.iloc[:, hits[0]], col.key)
    index = frame.index

    def where(r: int) -> str:
        return f"row {r + 1} of the DataFrame, index {_show(index[r])}"

    if len(frame) == 0:
        raise ValueError(f"{source}: the DataFrame has no rows")
    return _typed_table(source, arrays, cols, on_bad_rows, where)
