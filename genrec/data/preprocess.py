"""Raw interaction logs (CSV / Parquet, tens of millions of rows) -> partitioned per-user sequences, in bounded memory.

The output is what :func:`genrec.data.sequences.build_sequences` would build from the same rows, written so that each
rank of a multi-process job reads only its own users (:mod:`genrec.data.shards`), and computed without ever holding
the whole log in one process:

1. **Scan** (polars, streaming in batches of ``batch_rows``): every input file is read batch by batch, checked (ids
   present, timestamps integer Unix seconds, ratings finite), numbered with its global row position (the tie-break
   the in-memory builder uses) and appended to one of ``B`` spill buckets by a hash of the user id, so that all of a
   user's rows land in the same bucket. ``B`` is chosen so that a bucket holds about ``bucket_rows`` rows.
2. **Order** (one bucket at a time): exact duplicate (user, item, timestamp) rows are dropped or counted, each
   user's rows are stably sorted by timestamp (file order for ties, and throughout when there is no timestamp),
   users with fewer than ``min_seq_len`` rows are dropped, and each kept user's first row position and length are
   kept (two integers per user).
3. **Number**: users are numbered ``0..U-1`` in order of first appearance, items ``1..I`` in order of first
   appearance in the concatenation of the sorted sequences (0 is padding), exactly as ``build_sequences`` numbers
   them; the item vocabulary is merged bucket by bucket.
4. **Write**: user ``u`` goes to partition ``u % P`` (``part-00000.parquet`` ...), one row per user.

Memory is bounded by one scan batch, one bucket, and the per-user and per-item tables (two integers per user, one
id per item), whatever the number of rows. The spill buckets live in a temporary folder inside the output
directory (or ``work_dir``) and are removed at the end.

Output directory::

    manifest.json        format, counts, partitions (users and interactions per file), schemas, notes, config,
                         the command, polars version, creation date; written last, so its presence marks a
                         complete output
    part-00000.parquet   one row per user: user (int64 index), user_id (raw), items (list<int64>, 1..I),
    ...                  timestamps (list<int64>, Unix seconds; only with a timestamp column), ratings
                         (list<float64>) and events (list<string>) when those columns were given
    items.parquet        item (int64, 1..I), item_id (raw): the vocabulary, sorted by item
    users.parquet        user (int64), user_id (raw), partition, length: one row per user, grouped by bucket

polars is needed only here (``pip install polars``); reading the output needs only pyarrow.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shlex
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from genrec.data.readers.common import _MS_THRESHOLD, BadRowError
from genrec.io import write_json

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "ITEMS_FILE",
    "USERS_FILE",
    "part_file",
    "preprocess_interactions",
    "main",
]

FORMAT = "genrec-sequences"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
_PARQUET_EXT = (".parquet", ".pq")
_HASH_SEED = 0x5EED  # bucket assignment only; the output does not depend on it
_ROLES = ("user", "item", "timestamp", "rating", "event")


def part_file(partition: int) -> str:
    """The file name of a partition: ``part-00000.parquet``."""
    return f"part-{partition:05d}.parquet"


def _polars():
    try:
        import polars as pl
    except ImportError as exc:  # an optional dependency: the base package reads the output with pyarrow alone
        raise ImportError(
            "genrec.data.preprocess needs polars to preprocess interaction logs: pip install polars"
        ) from exc
    return pl


# --------------------------------------------------------------------------------------------------------- scanning
def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(_PARQUET_EXT)


def _separator(path: Path, sep: str | None) -> str:
    if sep is not None:
        if len(sep) != 1:
            raise ValueError(f"sep must be one character for preprocessing, got {sep!r}")
        return sep
    return "\t" if path.name.lower().endswith((".tsv", ".tab")) else ","


def _scan(pl, path: Path, sep: str | None):
    """A lazy frame over one input file, failing with the file's name when it is missing, empty or unreadable."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    try:
        if _is_parquet(path):
            lf = pl.scan_parquet(path)
        else:  # every field as a string: ids are kept exactly as written, timestamps are checked here
            lf = pl.scan_csv(path, separator=_separator(path, sep), infer_schema=False, quote_char='"')
        schema = lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ValueError(f"{path}: cannot read it as {'Parquet' if _is_parquet(path) else 'CSV'}: {exc}") from exc
    return lf, schema


def _estimate_rows(pl, path: Path, sep: str | None) -> int:
    """The number of data rows: exact for Parquet (metadata), estimated from the first MiB for text."""
    if _is_parquet(path):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    lines = max(head.count(b"\n"), 1)
    return max(int(path.stat().st_size / (len(head) / lines)) - 1, 0)  # less the header line


def _where(path: Path, parquet: bool, row: int) -> int:
    """The 1-based line (text with a header line) or row (Parquet) of 0-based data row ``row``."""
    return row + 1 if parquet else row + 2


def _first_bad(mask) -> int | None:
    idx = np.flatnonzero(mask.to_numpy())
    return int(idx[0]) if len(idx) else None


def _show(value) -> str:
    return "missing" if value is None else repr(value)


def _typed(pl, batch, path: Path, parquet: bool, roles: dict[str, str], row0: int):
    """Convert one batch to the standard columns (user, item: String; timestamp: Int64; rating: Float64; event:
    String) or raise :class:`BadRowError` for its first bad row."""
    out = {}
    bad: list[tuple[int, str]] = []
    for role in _ROLES:
        if role not in roles:
            continue
        name = roles[role]
        col = batch.get_column(name)
        dtype = col.dtype
        label = f"{'user id' if role == 'user' else 'item id' if role == 'item' else role} (column {name!r})"
        if role in ("user", "item", "event"):
            if dtype == pl.String or isinstance(dtype, (pl.Categorical, pl.Enum)):
                vals = col.cast(pl.String).str.strip_chars()
            elif dtype.is_integer():
                vals = col.cast(pl.String)
            elif dtype.is_float():
                integral = col.is_finite() & (col.floor() == col)
                vals = pl.select(pl.when(integral).then(col.cast(pl.Int64, strict=False)).otherwise(None)).to_series()
                vals = vals.cast(pl.String)
            else:
                raise ValueError(f"{path}: column {name!r} has type {dtype}, which cannot hold {label.split(' (')[0]}s")
            r = _first_bad(vals.is_null() | (vals.str.len_bytes() == 0))
            if r is not None:
                bad.append((r, f"missing or invalid {label}: {_show(col[r])}"))
        elif role == "timestamp":
            if dtype == pl.String:
                stripped = col.str.strip_chars()
                vals = stripped.cast(pl.Int64, strict=False)
            elif dtype.is_integer():
                vals = col.cast(pl.Int64, strict=False)
            elif dtype.is_float():
                integral = col.is_finite() & (col.floor() == col)
                vals = pl.select(pl.when(integral).then(col.cast(pl.Int64, strict=False)).otherwise(None)).to_series()
            elif isinstance(dtype, pl.Datetime):
                vals = col.dt.epoch("s")
            elif dtype == pl.Date:
                vals = col.cast(pl.Datetime("ms")).dt.epoch("s")
            else:
                raise ValueError(f"{path}: column {name!r} has type {dtype}; timestamps must be integer Unix seconds")
            r = _first_bad(vals.is_null())
            if r is not None:
                bad.append((r, f"missing or non-integer {label}: {_show(col[r])} (integer Unix seconds expected)"))
        else:  # rating
            if dtype.is_numeric():
                vals = col.cast(pl.Float64)
            elif dtype == pl.String:
                vals = col.str.strip_chars().cast(pl.Float64, strict=False)
            else:
                raise ValueError(f"{path}: column {name!r} has type {dtype}; ratings must be numbers")
            r = _first_bad(vals.is_null() | ~vals.is_finite().fill_null(False))
            if r is not None:
                bad.append((r, f"{label} {_show(col[r])} is not a finite number"))
        out[role] = vals.alias(role)
    if bad:
        r, reason = min(bad)
        raise BadRowError(path, _where(path, parquet, row0 + r), reason)
    return pl.DataFrame(list(out.values()))


def _scan_to_buckets(pl, paths: list[Path], roles: dict[str, str], sep, buckets: int, batch_rows: int, spill: Path):
    """Stream every file into ``buckets`` Parquet spill files (by a hash of the user id), numbering rows
    globally. Returns (rows read, rows per file, largest timestamp)."""
    import pyarrow.parquet as pq

    writers: dict[int, pq.ParquetWriter] = {}
    schema = None
    total, per_file, ts_max = 0, [], None
    try:
        for path in paths:
            lf, file_schema = _scan(pl, path, sep)
            missing = [f"{role}={name!r}" for role, name in roles.items() if name not in file_schema]
            if missing:
                raise ValueError(
                    f"{path}: no column for {', '.join(missing)}; the columns are {list(file_schema.names())}"
                )
            parquet = _is_parquet(path)
            lf = lf.select(list(dict.fromkeys(roles.values())))
            n_file = 0
            try:
                for batch in lf.collect_batches(chunk_size=batch_rows):
                    if batch.height == 0:
                        continue
                    df = _typed(pl, batch, path, parquet, roles, n_file)
                    df = df.with_columns(
                        pl.int_range(total, total + df.height, dtype=pl.Int64).alias("_row"),
                        (pl.col("user").hash(_HASH_SEED) % buckets).alias("_bucket"),
                    )
                    if "timestamp" in df.columns:
                        m = df.get_column("timestamp").abs().max()
                        ts_max = m if ts_max is None else max(ts_max, m)
                    for (b,), piece in df.partition_by("_bucket", as_dict=True, include_key=False).items():
                        table = piece.to_arrow()
                        if schema is None:
                            schema = table.schema
                        if b not in writers:
                            writers[b] = pq.ParquetWriter(spill / f"bucket-{b:05d}.parquet", schema, compression="lz4")
                        writers[b].write_table(table.cast(schema))
                    n_file += df.height
                    total += df.height
            except pl.exceptions.PolarsError as exc:
                raise ValueError(f"{path}: cannot read it: {exc}") from exc
            if n_file == 0:
                raise ValueError(f"{path}: the file has no data rows")
            per_file.append(n_file)
    finally:
        for w in writers.values():
            w.close()
    return total, per_file, ts_max


# --------------------------------------------------------------------------------------------------------- ordering
def _order_bucket(pl, bucket: Path, has_time: bool, duplicates: str, min_seq_len: int):
    """Sort one bucket into per-user sequences (rewritten in place) and return (first row, length) of its kept
    users, and the numbers of duplicate rows and dropped users."""
    df = pl.read_parquet(bucket)
    dups = 0
    if has_time:
        first = df.select(pl.struct("user", "item", "timestamp").is_first_distinct()).to_series()
        dups = df.height - int(first.sum())
        if duplicates == "drop" and dups:
            df = df.filter(first)
    df = df.sort(["user", "timestamp", "_row"] if has_time else ["user", "_row"])  # _row is unique: a stable order
    df = df.with_columns(
        pl.col("_row").min().over("user").alias("_first"),
        pl.len().over("user").alias("_n"),
        pl.int_range(pl.len(), dtype=pl.Int64).over("user").alias("_pos"),
    )
    starts = df.filter(pl.col("_pos") == 0)
    dropped = int((starts.get_column("_n") < min_seq_len).sum())
    df = df.filter(pl.col("_n") >= min_seq_len).drop("_row", "_n")
    df.write_parquet(bucket, compression="lz4")
    starts = starts.filter(pl.col("_n") >= min_seq_len)
    return (
        starts.get_column("_first").to_numpy().astype(np.int64),
        starts.get_column("_n").to_numpy().astype(np.int64),
        dups,
        dropped,
    )


def _user_index(firsts_sorted: np.ndarray, firsts: np.ndarray) -> np.ndarray:
    return np.searchsorted(firsts_sorted, firsts)


# ----------------------------------------------------------------------------------------------------------- output
def _part_schema(has_time: bool, rating: bool, event: bool):
    import pyarrow as pa

    fields = [
        pa.field("user", pa.int64(), nullable=False),
        pa.field("user_id", pa.large_string(), nullable=False),
        pa.field("items", pa.large_list(pa.int64()), nullable=False),
    ]
    if has_time:
        fields.append(pa.field("timestamps", pa.large_list(pa.int64()), nullable=False))
    if rating:
        fields.append(pa.field("ratings", pa.large_list(pa.float64()), nullable=False))
    if event:
        fields.append(pa.field("events", pa.large_list(pa.large_string()), nullable=False))
    return pa.schema(fields)


def _schema_json(schema) -> dict[str, str]:
    return {f.name: str(f.type) for f in schema}


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir():
        ours = [p for p in out.iterdir() if p.name in (MANIFEST_FILE, ITEMS_FILE, USERS_FILE)
                or (p.name.startswith("part-") and p.name.endswith(".parquet"))]
        if ours and not overwrite:
            raise FileExistsError(
                f"{out} already holds preprocessed sequences ({', '.join(sorted(p.name for p in ours)[:4])} ...); "
                "pass overwrite=True (--overwrite) to replace them"
            )
        for p in ours:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def preprocess_interactions(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    user: str,
    item: str,
    timestamp: str | None = None,
    rating: str | None = None,
    event: str | None = None,
    sep: str | None = None,
    partitions: int = 8,
    min_seq_len: int = 3,
    duplicates: str = "drop",
    bucket_rows: int = 2_000_000,
    batch_rows: int = 1_000_000,
    work_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> dict:
    """Preprocess interaction files into ``partitions`` Parquet partitions of per-user sequences (see the module
    docstring for the layout) and return the manifest, also written to ``output_dir/manifest.json``.

    ``paths``: one file or a list, read in that order (row positions, and so the order of ties, run across files).
    Parquet by extension (``.parquet``, ``.pq``), otherwise delimited text with a header line (``sep``: one
    character; tab for ``.tsv``/``.tab``, else comma). ``user``/``item``/``timestamp``/``rating``/``event`` name the
    columns; ``timestamp`` must hold integer Unix seconds (or Parquet datetimes), and without it file order is time
    order. Ids are compared as strings, stripped of surrounding whitespace, as genrec's readers do.

    ``min_seq_len`` and ``duplicates`` ("drop" | "keep" exact duplicate (user, item, timestamp) rows) mean what
    they mean for :func:`genrec.data.sequences.build_sequences`, and the sequences, user order and item numbering
    equal its output on the same rows. ``bucket_rows`` sets the memory: about that many rows are sorted at once;
    ``batch_rows`` rows are scanned at once. Raises :class:`~genrec.data.readers.BadRowError`
    (``"<file>:<line>: <reason>"``) for a malformed row and ``ValueError`` naming the file for a missing column or
    an empty file.
    """
    pl = _polars()
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("preprocess_interactions: no input files given")
    if duplicates not in ("drop", "keep"):
        raise ValueError(f"duplicates must be 'drop' or 'keep', got {duplicates!r}")
    for name, value in (("partitions", partitions), ("min_seq_len", min_seq_len), ("bucket_rows", bucket_rows),
                        ("batch_rows", batch_rows)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    roles = {role: name for role, name in zip(_ROLES, (user, item, timestamp, rating, event)) if name is not None}
    has_time = timestamp is not None
    out = Path(output_dir)
    _prepare_output(out, overwrite)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    for path in paths:  # fail on a missing or empty file before any work
        _scan(pl, path, sep)
    est_rows = sum(_estimate_rows(pl, p, sep) for p in paths)
    n_buckets = max(1, math.ceil(est_rows / bucket_rows))

    spill = Path(tempfile.mkdtemp(prefix=".preprocess-", dir=work_dir if work_dir is not None else out))
    try:
        rows_read, rows_per_file, ts_max = _scan_to_buckets(pl, paths, roles, sep, n_buckets, batch_rows, spill)
        if ts_max is not None and ts_max > _MS_THRESHOLD:
            warnings.warn(f"{', '.join(map(str, paths))}: timestamps up to {ts_max} look like milliseconds; the "
                          "timestamp column is meant to hold Unix seconds (divide by 1000)", UserWarning, stacklevel=2)
        bucket_files = sorted(spill.glob("bucket-*.parquet"))

        # 2. order each bucket; two integers per kept user
        firsts, lengths, dups, dropped = [], [], 0, 0
        for bucket in bucket_files:
            f, n, d, k = _order_bucket(pl, bucket, has_time, duplicates, min_seq_len)
            firsts.append(f)
            lengths.append(n)
            dups += d
            dropped += k
        firsts_all = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
        lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        del firsts, lengths
        if len(firsts_all) == 0:
            raise ValueError(f"{', '.join(map(str, paths))}: no user has at least {min_seq_len} interactions")
        order = np.argsort(firsts_all, kind="stable")
        firsts_sorted = firsts_all[order]
        offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(lengths_all[order], out=offsets[1:])
        del firsts_all, lengths_all, order
        num_users = len(firsts_sorted)

        # 3. item numbering: first appearance in the concatenated sorted sequences
        vocab = None
        for bucket in bucket_files:
            df = pl.read_parquet(bucket, columns=["item", "_first", "_pos"])
            uidx = _user_index(firsts_sorted, df.get_column("_first").to_numpy())
            gpos = offsets[uidx] + df.get_column("_pos").to_numpy()
            part = df.select("item").with_columns(pl.Series("_g", gpos, dtype=pl.Int64))
            part = part.group_by("item").agg(pl.col("_g").min())
            vocab = part if vocab is None else pl.concat([vocab, part]).group_by("item").agg(pl.col("_g").min())
            del df, part
        vocab = vocab.sort("_g").with_columns(pl.int_range(1, vocab.height + 1, dtype=pl.Int64).alias("_id"))
        vocab = vocab.select("item", "_id")
        num_items = vocab.height
        items_schema = pa.schema([pa.field("item", pa.int64(), nullable=False),
                                  pa.field("item_id", pa.large_string(), nullable=False)])
        pq.write_table(pa.table([vocab.get_column("_id").to_arrow(), vocab.get_column("item").to_arrow()],
                                schema=items_schema), out / ITEMS_FILE, compression="zstd")

        # 4. partitions: user u -> u % P, one row per user
        schema = _part_schema(has_time, "rating" in roles, "event" in roles)
        users_schema = pa.schema([pa.field("user", pa.int64(), nullable=False),
                                  pa.field("user_id", pa.large_string(), nullable=False),
                                  pa.field("partition", pa.int32(), nullable=False),
                                  pa.field("length", pa.int64(), nullable=False)])
        writers = [pq.ParquetWriter(out / part_file(p), schema, compression="zstd") for p in range(partitions)]
        users_writer = pq.ParquetWriter(out / USERS_FILE, users_schema, compression="zstd")
        part_users = np.zeros(partitions, dtype=np.int64)
        part_rows = np.zeros(partitions, dtype=np.int64)
        lists = [("item", "items")] + [(c, c + "s") for c in ("timestamp", "rating", "event") if c in roles]
        try:
            for bucket in bucket_files:
                df = pl.read_parquet(bucket)
                df = df.join(vocab, on="item", how="left", maintain_order="left")
                df = df.with_columns(pl.Series("_u", _user_index(firsts_sorted, df.get_column("_first").to_numpy()),
                                               dtype=pl.Int64))
                per_user = (
                    df.group_by("_u", maintain_order=True)
                    .agg(pl.col("user").first().alias("user_id"),
                         *[pl.col("_id" if src == "item" else src).alias(dst) for src, dst in lists])
                    .rename({"_u": "user"})
                    .sort("user")
                    .with_columns((pl.col("user") % partitions).cast(pl.Int32).alias("partition"),
                                  pl.col("items").list.len().cast(pl.Int64).alias("length"))
                )
                del df
                users_writer.write_table(per_user.select("user", "user_id", "partition", "length").to_arrow()
                                         .cast(users_schema))
                for (p,), piece in per_user.partition_by("partition", as_dict=True).items():
                    writers[p].write_table(piece.select(schema.names).to_arrow().cast(schema))
                    part_users[p] += piece.height
                    part_rows[p] += int(piece.get_column("length").sum())
                bucket.unlink()
        finally:
            for w in writers:
                w.close()
            users_writer.close()
    finally:
        shutil.rmtree(spill, ignore_errors=True)

    notes = []
    if has_time and dups:
        if duplicates == "drop":
            notes.append(f"dropped {dups:,} exact duplicate rows (same user, item and timestamp as an earlier row; "
                         "the first is kept; duplicates=drop)")
        else:
            notes.append(f"kept {dups:,} exact duplicate rows (same user, item and timestamp as an earlier row; "
                         "duplicates=keep): they repeat items in the histories and targets")
    if dropped:
        notes.append(f"dropped {dropped:,} users with fewer than {min_seq_len} interactions "
                     "(cannot be split leave-one-out)")
    if not has_time:
        notes.append("no timestamp column: file order is time order, and every user has has_time = False")
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "num_users": int(num_users),
        "num_items": int(num_items),
        "num_interactions": int(offsets[-1]),
        "has_time": has_time,
        "num_partitions": int(partitions),
        "partitioning": "user % num_partitions; users are numbered 0.. in order of first appearance in the input",
        "partitions": [
            {"file": part_file(p), "users": int(part_users[p]), "interactions": int(part_rows[p])}
            for p in range(partitions)
        ],
        "items_file": ITEMS_FILE,
        "users_file": USERS_FILE,
        "schema": {
            "partition": _schema_json(schema),
            "items": _schema_json(items_schema),
            "users": _schema_json(users_schema),
        },
        "source": {
            "files": [str(p) for p in paths],
            "rows": [int(n) for n in rows_per_file],
            "columns": roles,
        },
        "config": {
            "min_seq_len": int(min_seq_len),
            "duplicates": duplicates,
            "ties": "file",
            "sep": sep,
            "bucket_rows": int(bucket_rows),
            "batch_rows": int(batch_rows),
            "buckets": int(n_buckets),
        },
        "notes": notes,
        "command": command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "polars": pl.__version__,
        "created": created,
    }
    write_json(out / MANIFEST_FILE, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------------- command
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m genrec.data.preprocess INPUT... --output DIR --user COL --item COL [--timestamp COL] ...``"""
    parser = argparse.ArgumentParser(
        prog="python -m genrec.data.preprocess",
        description="Interaction logs (CSV/Parquet) -> partitioned per-user sequences (Parquet + manifest.json), "
                    "in bounded memory.",
    )
    parser.add_argument("inputs", nargs="+", help="input files, read in this order")
    parser.add_argument("--output", "-o", required=True, help="output directory")
    parser.add_argument("--user", required=True, help="user id column")
    parser.add_argument("--item", required=True, help="item id column")
    parser.add_argument("--timestamp", help="timestamp column (integer Unix seconds)")
    parser.add_argument("--rating", help="rating column (kept as a per-user list)")
    parser.add_argument("--event", help="event / action column (kept as a per-user list)")
    parser.add_argument("--sep", help="field separator of text files (default: tab for .tsv, else comma)")
    parser.add_argument("--partitions", type=int, default=8, help="number of output partitions (default 8)")
    parser.add_argument("--min-seq-len", type=int, default=3)
    parser.add_argument("--duplicates", choices=("drop", "keep"), default="drop")
    parser.add_argument("--bucket-rows", type=int, default=2_000_000, help="rows sorted at once (sets the memory)")
    parser.add_argument("--batch-rows", type=int, default=1_000_000, help="rows scanned at once")
    parser.add_argument("--work-dir", help="folder for the temporary spill files (default: inside --output)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous output in --output")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "genrec.data.preprocess",
                          *(sys.argv[1:] if argv is None else list(argv))])
    manifest = preprocess_interactions(
        args.inputs, args.output, user=args.user, item=args.item, timestamp=args.timestamp, rating=args.rating,
        event=args.event, sep=args.sep, partitions=args.partitions, min_seq_len=args.min_seq_len,
        duplicates=args.duplicates, bucket_rows=args.bucket_rows, batch_rows=args.batch_rows,
        work_dir=args.work_dir, overwrite=args.overwrite, command=command,
    )
    print(f"{args.output}: {manifest['num_users']:,} users, {manifest['num_items']:,} items, "
          f"{manifest['num_interactions']:,} interactions in {manifest['num_partitions']} partitions")
    for note in manifest["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
