"""Per-user item sequence files (the SASRec / S3-Rec format), with an optional
position-aligned timestamp file."""

from __future__ import annotations

import warnings
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd

from genrec.data.readers.common import (
    _INT_PATTERN,
    _SURROGATE_RE,
    BadRowError,
    PathLike,
    SkippedRowsWarning,
    _check_policy,
    _decode,
    _finish,
    _fullmatch,
    _physical_lines,
    _read_bytes,
    _short,
    _str_series,
    _warn_if_ms,
)


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

