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

Modules, by format: :mod:`.movielens` (MovieLens ratings and titles), :mod:`.table`
(generic delimited / Parquet tables and in-memory DataFrames), :mod:`.sequences`
(per-user sequence files); :mod:`.delimited` holds the shared text parser and
:mod:`.common` the errors, warnings and value checks.
"""

from genrec.data.readers.common import BadRowError, SkippedRowsWarning
from genrec.data.readers.movielens import (
    read_ml100k,
    read_movielens_csv,
    read_movielens_dat,
    read_titles,
)
from genrec.data.readers.sequences import read_sequences
from genrec.data.readers.table import read_frame, read_table

__all__ = [
    "BadRowError",
    "SkippedRowsWarning",
    "read_movielens_dat",
    "read_ml100k",
    "read_movielens_csv",
    "read_table",
    "read_frame",
    "read_sequences",
    "read_titles",
]
