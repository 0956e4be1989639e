"""MovieLens files: ``ratings.dat`` (ML-1M / ML-10M), ``u.data`` (ML-100K), ``ratings.csv``
(ML-20M, ml-latest, ml-latest-small), and the title files next to them (``movies.dat``,
``u.item``, ``movies.csv``)."""

from __future__ import annotations

import csv

import pandas as pd

from genrec.data.readers.common import (
    BadRowError,
    PathLike,
    _Col,
    _decode,
    _physical_lines,
    _read_bytes,
    _short,
)
from genrec.data.readers.delimited import _read_delimited

_ML_CSV_HEADER = ("userId", "movieId", "rating", "timestamp")


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

