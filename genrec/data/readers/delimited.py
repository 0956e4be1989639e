"""Delimited text (plain or gzip): a fast path through pandas' C tokenizer, and an exact
line-by-line scan that is authoritative whenever the fast path sees a problem (it finds
the line numbers and reasons of bad rows)."""

from __future__ import annotations

import collections
import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from genrec.data.readers.common import (
    _PLACEHOLDER_SEP,
    _SURROGATE_RE,
    BadRowError,
    PathLike,
    _check_policy,
    _Col,
    _convert,
    _decode,
    _empty,
    _finish,
    _ordered,
    _physical_lines,
    _read_bytes,
    _reason,
    _report_bad,
    _str_series,
    _ts_mode,
    _validate,
    _warn_if_ms,
)


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

