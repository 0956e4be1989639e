"""Read one rank's shard of preprocessed sequences (:mod:`genrec.data.preprocess`) without reading the rest.

A directory written by :func:`genrec.data.preprocess.preprocess_interactions` holds ``P`` partitions; user ``u``
lives in partition ``u % P``. Rank ``r`` of ``world_size`` ranks owns partitions ``r, r + world_size, ...``, so the
shards of all ranks are disjoint and together hold every user; only the owned partition files are opened. With
``P`` a multiple of ``world_size`` every rank gets the same number of partitions (and, users being dealt round
robin, about the same number of users).

:meth:`ShardedSequences.read` returns the shard as :class:`~genrec.data.sequences.SequenceData`, what training
consumes (leave-one-out splits, batches), with the global item numbering (``num_items`` is the whole vocabulary, so
every rank builds the same item table) and the shard's users in increasing global user index.
:meth:`ShardedSequences.iter_users` streams the shard one Parquet row group at a time instead.

Only pyarrow is needed here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from genrec.data.sequences import IdMap, SequenceData

__all__ = ["Shard", "ShardedSequences", "UserSequence", "read_shard"]

_FORMAT = "genrec-sequences"  # genrec.data.preprocess.FORMAT (not imported: that module is the polars side)
_MANIFEST = "manifest.json"


@dataclass
class Shard:
    """One rank's users. ``user_index[k]`` is the global index (0..num_users-1) of ``sequences.users[k]``."""

    sequences: SequenceData
    user_index: np.ndarray
    partitions: list[int]


@dataclass
class UserSequence:
    """One user's chronological sequence, as streamed by :meth:`ShardedSequences.iter_users`."""

    user: int  # global index
    user_id: str  # raw id
    items: np.ndarray  # int64, 1..num_items
    timestamps: np.ndarray  # int64 Unix seconds (zeros without timestamps)


class ShardedSequences:
    """A preprocessed directory: its manifest, item vocabulary, and per-rank shards."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        path = self.directory / _MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no manifest; {self.directory} is not a complete preprocessed directory "
                "(python -m genrec.data.preprocess writes the manifest last)"
            )
        with open(path, encoding="utf-8") as fh:
            self.manifest = json.load(fh)
        if self.manifest.get("format") != _FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r}, expected {_FORMAT!r}")
        if self.manifest.get("version") != 1:
            raise ValueError(f"{path}: version {self.manifest.get('version')!r} of the format is not supported")

    @property
    def num_users(self) -> int:
        return int(self.manifest["num_users"])

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def num_partitions(self) -> int:
        return int(self.manifest["num_partitions"])

    @property
    def has_time(self) -> bool:
        return bool(self.manifest["has_time"])

    def partitions_for(self, rank: int, world_size: int) -> list[int]:
        """The partitions rank ``rank`` of ``world_size`` owns: ``rank, rank + world_size, ...``."""
        if not isinstance(world_size, (int, np.integer)) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
        if world_size > self.num_partitions:
            raise ValueError(
                f"{self.directory}: {world_size} ranks but only {self.num_partitions} partitions; preprocess again "
                f"with --partitions a multiple of {world_size}"
            )
        return list(range(int(rank), self.num_partitions, int(world_size)))

    def _part(self, p: int):
        import pyarrow.parquet as pq

        entry = self.manifest["partitions"][p]
        path = self.directory / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: partition {p} listed in {self.directory / _MANIFEST} is missing")
        pf = pq.ParquetFile(path)
        if pf.metadata.num_rows != entry["users"]:
            raise ValueError(
                f"{path}: {pf.metadata.num_rows} users, the manifest says {entry['users']}: the file was modified"
            )
        return pf

    def item_map(self) -> IdMap:
        """Internal item ids 1..num_items <-> raw ids (``items.parquet``)."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.directory / self.manifest["items_file"])
        ids = table.column("item").to_numpy()
        if len(ids) != self.num_items or not np.array_equal(ids, np.arange(1, len(ids) + 1)):
            raise ValueError(f"{self.directory / self.manifest['items_file']}: not the items 1..{self.num_items}")
        return IdMap(table.column("item_id").to_pylist())

    def _columns(self) -> list[str]:
        return ["user", "user_id", "items"] + (["timestamps"] if self.has_time else [])

    def read(self, rank: int = 0, world_size: int = 1, *, item_map: IdMap | None = None) -> Shard:
        """The users of rank ``rank`` (of ``world_size``) as :class:`SequenceData`, in increasing global user index.

        ``item_map`` (e.g. shared by several reads) saves reading ``items.parquet`` again."""
        import pyarrow as pa
        import pyarrow.compute as pc

        parts = self.partitions_for(rank, world_size)
        tables = [self._part(p).read(columns=self._columns()) for p in parts]
        table = pa.concat_tables(tables)
        del tables
        table = table.take(pc.sort_indices(table, sort_keys=[("user", "ascending")]))
        offsets, items = _jagged(table.column("items"))
        lengths = np.diff(offsets)
        if self.has_time:
            times = _jagged(table.column("timestamps"))[1]
        else:
            times = np.zeros(len(items), dtype=np.int64)
        note = (f"shard {rank} of {world_size} of {self.directory}: partitions {parts}, "
                f"{len(lengths):,} of {self.num_users:,} users")
        seqs = SequenceData(
            users=np.asarray(table.column("user_id").to_pylist(), dtype=object),
            offsets=offsets,
            items=items,
            timestamps=times,
            has_time=np.full(len(lengths), self.has_time, dtype=bool),
            item_map=item_map if item_map is not None else self.item_map(),
            notes=list(self.manifest.get("notes", [])) + [note],
        )
        return Shard(seqs, table.column("user").to_numpy(), parts)

    def iter_users(self, rank: int = 0, world_size: int = 1) -> Iterator[UserSequence]:
        """Stream rank ``rank``'s users one row group at a time (partition by partition; within a partition users
        come in increasing index per row group, not overall)."""
        for p in self.partitions_for(rank, world_size):
            pf = self._part(p)
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g, columns=self._columns())
                users = table.column("user").to_numpy()
                user_ids = table.column("user_id").to_pylist()
                offsets, items = _jagged(table.column("items"))
                times = _jagged(table.column("timestamps"))[1] if self.has_time else np.zeros(len(items), np.int64)
                for k in range(table.num_rows):
                    lo, hi = offsets[k], offsets[k + 1]
                    yield UserSequence(int(users[k]), user_ids[k], items[lo:hi], times[lo:hi])


def _jagged(column) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n+1], values) of a list column, as int64 numpy arrays."""
    import pyarrow.compute as pc

    arr = column.combine_chunks()
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # a writable copy: arrow's buffers are read-only, and torch.as_tensor on read-only memory is undefined to write
    values = np.array(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.int64, copy=True)
    return offsets, values


def read_shard(directory: str | os.PathLike, rank: int = 0, world_size: int = 1) -> SequenceData:
    """Rank ``rank``'s users of a preprocessed directory as :class:`SequenceData` (see :class:`ShardedSequences`)."""
    return ShardedSequences(directory).read(rank, world_size).sequences
