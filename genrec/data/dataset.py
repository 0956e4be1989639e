"""DataConfig -> SequenceData: the one entry point from a config to model-ready sequences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genrec.config import DataConfig
from genrec.data.readers import read_sequences, read_table
from genrec.data.registry import load_dataset
from genrec.data.sequences import SequenceData, build_sequences


@dataclass
class PreparedData:
    sequences: SequenceData
    titles: dict[str, str] | None
    files: list[str]
    # Global user index of each of ``sequences``' users when they are one process's share of a preprocessed
    # directory (``prepare_data(..., shard=...)``); None when ``sequences`` holds every user (index = position).
    user_index: np.ndarray | None = None


def prepare_data(config: DataConfig, shard: tuple[int, int] | None = None) -> PreparedData:
    """Load the configured interactions and turn them into chronological per-user sequences.

    ``shard=(rank, world_size)``: only that rank's users of a preprocessed directory (``data.dataset=preprocessed``;
    ``genrec.data.shards``), with their global user indices in ``user_index``; the other partitions are not read.
    """
    if shard is not None and config.dataset != "preprocessed":
        raise ValueError(f"prepare_data: shard={shard} needs data.dataset=preprocessed, not {config.dataset!r}")
    if config.dataset == "preprocessed":
        return _preprocessed(config, *(shard or (0, 1)))
    if config.dataset == "table":
        if not config.path:
            raise ValueError("data.dataset=table needs data.path (and data.columns: user, item[, timestamp, ...])")
        cols = dict(config.columns)
        if "user" not in cols or "item" not in cols:
            raise ValueError("data.columns must name at least the user and item columns")
        frame = read_table(config.path, sep=config.sep, header=config.header, on_bad_rows=config.on_bad_rows, **cols)
        notes, titles, files = [], None, [config.path]
    elif config.dataset == "sequences":
        if not config.path:
            raise ValueError("data.dataset=sequences needs data.path")
        frame = read_sequences(config.path, config.timestamps_path, on_bad_rows=config.on_bad_rows)
        notes, titles = [], None
        files = [config.path] + ([config.timestamps_path] if config.timestamps_path else [])
    else:
        loaded = load_dataset(config.dataset, config.data_dir, on_bad_rows=config.on_bad_rows)
        frame, notes, titles, files = loaded.interactions, list(loaded.notes), loaded.titles, list(loaded.files)
    bad = int(frame.attrs.get("bad_rows", 0) or 0)
    if bad:
        notes.append(f"skipped {bad:,} malformed rows (on_bad_rows=skip)")
    # ``duplicates`` ("drop" | "keep"): what to do with exact duplicate (user, item, timestamp) rows.
    duplicates = config.duplicates
    seqs = build_sequences(frame, min_seq_len=config.min_seq_len, notes=notes, duplicates=duplicates,
                           ties=config.ties, ties_seed=config.ties_seed)
    return PreparedData(seqs, titles, files)


def _preprocessed(config: DataConfig, rank: int = 0, world_size: int = 1) -> PreparedData:
    """A directory written by ``python -m genrec.data.preprocess`` (``genrec.data.preprocess``): its sequences are
    read as they are, without the raw log. The choices made when it was written (``min_seq_len``, ``duplicates``,
    ties in file order) must be the config's, or the run would silently train on other sequences."""
    from genrec.data.shards import ShardedSequences

    if not config.path:
        raise ValueError("data.dataset=preprocessed needs data.path: the directory python -m genrec.data.preprocess "
                         "wrote")
    data = ShardedSequences(config.path)
    made = data.manifest.get("config", {})
    wanted = {"min_seq_len": config.min_seq_len, "duplicates": config.duplicates, "ties": config.ties}
    differ = [f"data.{k}={v!r} but {config.path} was written with {k}={made.get(k)!r}"
              for k, v in wanted.items() if made.get(k) != v]
    if differ:
        raise ValueError("data.dataset=preprocessed: " + "; ".join(differ) + " (preprocess again with the same "
                         "settings, or set them in the config)")
    if world_size == 1:
        return PreparedData(data.read(0, 1).sequences, None, [str(config.path)])
    shard = data.read(rank, world_size)
    return PreparedData(shard.sequences, None, [str(config.path)], user_index=shard.user_index)
