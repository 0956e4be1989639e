"""DataConfig -> SequenceData: the one entry point from a config to model-ready sequences."""

from __future__ import annotations

from dataclasses import dataclass

from genrec.config import DataConfig
from genrec.data.readers import read_sequences, read_table
from genrec.data.registry import load_dataset
from genrec.data.sequences import SequenceData, build_sequences


@dataclass
class PreparedData:
    sequences: SequenceData
    titles: dict[str, str] | None
    files: list[str]


def prepare_data(config: DataConfig) -> PreparedData:
    """Load the configured interactions and turn them into chronological per-user sequences."""
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
