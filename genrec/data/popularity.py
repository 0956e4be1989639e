"""Item popularity: the fallback for a request whose history has no known item, saved as ``popularity.json``.

Counts cover every interaction of the training data's sequences (a served model should fall back on everything it
knows); they are not used by any offline evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from genrec.data.sequences import IdMap, SequenceData
from genrec.io import write_json

POPULARITY_FILE = "popularity.json"
POPULARITY_FORMAT = "genrec-popularity-v1"

def item_popularity(sequences: SequenceData) -> np.ndarray:
    """[num_items + 1] int64 interaction counts per internal id over all sequences (index 0 = padding = 0)."""
    counts = np.bincount(sequences.items, minlength=sequences.num_items + 1).astype(np.int64)
    counts[0] = 0
    return counts


def write_popularity(sequences: SequenceData, directory: str | Path) -> None:
    """Write ``popularity.json`` (external item id -> interaction count) atomically into ``directory``."""
    _write_popularity_counts(item_popularity(sequences), sequences.item_map, directory)


def popularity_json(counts: np.ndarray, item_map: IdMap) -> dict[str, Any]:
    return {"format": POPULARITY_FORMAT, "counts": {e: int(c) for e, c in zip(item_map.external, counts[1:])}}


def _write_popularity_counts(counts: np.ndarray, item_map: IdMap, directory: str | Path) -> None:
    write_json(Path(directory) / POPULARITY_FILE, popularity_json(counts, item_map))


def read_popularity(directory: str | Path, item_map: IdMap) -> np.ndarray | None:
    """Counts aligned with internal ids ([num_items + 1], index 0 = 0), or None when the file is absent."""
    path = Path(directory) / POPULARITY_FILE
    if not path.exists():
        return None
    raw = json.loads(path.read_text(encoding="utf-8"))
    counts_raw = raw.get("counts") if isinstance(raw, dict) else None
    if raw.get("format") != POPULARITY_FORMAT or not isinstance(counts_raw, dict):
        raise ValueError(f"{path}: expected {{'format': '{POPULARITY_FORMAT}', 'counts': {{item: count}}}}")
    counts = np.zeros(len(item_map) + 1, dtype=np.int64)
    for item, count in counts_raw.items():
        internal = item_map.get(item)
        if internal is None or isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{path}: bad entry {item!r}: {count!r} (unknown item or not a count >= 0)")
        counts[internal] = count
    return counts
