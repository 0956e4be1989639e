"""Criteo Display Advertising Challenge rows -> dense / sparse tensors for a DLRM sanity run (no sequences).

Format (Kaggle DAC ``train.txt``): one example per line, tab-separated, 40 fields ``label, I1..I13, C1..C26``; an
empty field is missing. The ``criteo-dac-head8k`` folder holds ``train.tsv``, ``dev.tsv`` and ``test.tsv``.

Encoding (as in the DLRM reference preprocessing, Naumov et al. 2019, "Deep Learning Recommendation Model for
Personalization and Recommendation Systems"):

    dense   [N, 13] float32  log1p(max(I_j, 0)); a missing value is 0 (negative counts, e.g. I2 = -1, clamp to 0)
    sparse  [N, 26] int64    per field, ids 1..V_j of the values seen at least ``min_count`` times in the TRAINING
                             file (sorted value order); 0 = missing or not in the training vocabulary (OOV)
    labels  [N]     float32  0/1 click

The vocabulary is built from the training file only, so validation and test values never get an id of their own.
A field's embedding table needs ``vocab_sizes[j] + 1`` rows.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from genrec.data.ranking.sources import find_folder
from genrec.data.readers import BadRowError
from genrec.data.readers.common import _read_bytes

__all__ = ["CRITEO_FILES", "CriteoData", "TabularSplit", "load_criteo", "read_criteo"]

CRITEO_FOLDER = "criteo-dac-head8k"
CRITEO_FILES = {"train": "train.tsv", "valid": "dev.tsv", "test": "test.tsv"}
DENSE_NAMES = tuple(f"I{j}" for j in range(1, 14))
SPARSE_NAMES = tuple(f"C{j}" for j in range(1, 27))
_INT = re.compile(r"-?[0-9]{1,18}")


@dataclass
class TabularSplit:
    """One file's examples: dense [N, 13] float32, sparse [N, 26] int64 ids (0 = missing / OOV), labels [N]."""

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0):
        """Yield (dense, sparse, labels) slices; a seeded permutation when ``shuffle``."""
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            j = order[i : i + batch_size]
            yield self.dense[j], self.sparse[j], self.labels[j]


@dataclass
class CriteoData:
    train: TabularSplit
    valid: TabularSplit
    test: TabularSplit
    vocab_sizes: tuple[int, ...]  # V_j per categorical field (ids 1..V_j)
    vocabularies: list[dict[str, int]] = field(repr=False)
    dense_names: tuple[str, ...] = DENSE_NAMES
    sparse_names: tuple[str, ...] = SPARSE_NAMES
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [(f"criteo: dense {len(self.dense_names)}, sparse {len(self.sparse_names)} fields, "
                 f"vocabulary sizes {list(self.vocab_sizes)}")]  # fmt: skip
        for part in ("train", "valid", "test"):
            s = getattr(self, part)
            oov = float((s.sparse == 0).float().mean()) if len(s) else float("nan")
            lines.append(f"  {part}: {len(s):,} rows, click rate {float(s.labels.mean()):.4f}, id 0 share {oov:.3f}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def read_criteo(path: str | os.PathLike) -> pd.DataFrame:
    """A DAC file -> DataFrame of strings (``label, I1..I13, C1..C26``; '' = missing), checked line by line:
    wrong field counts, non-integer counts and labels other than 0/1 raise :class:`BadRowError` (file:line)."""
    path = Path(path)
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRowError(path, raw[: exc.start].count(b"\n") + 1, "invalid UTF-8 byte(s)") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows = []
    for i, line in enumerate(lines, 1):
        f = line.rstrip("\r").split("\t")
        if len(f) != 40:
            raise BadRowError(path, i, f"expected 40 tab-separated fields (label, 13 integers, 26 categories), got {len(f)}")
        if f[0] not in ("0", "1"):
            raise BadRowError(path, i, f"label {f[0]!r} is not 0 or 1")
        for j in range(1, 14):
            if f[j] and not _INT.fullmatch(f[j]):
                raise BadRowError(path, i, f"I{j} {f[j]!r} is not an integer")
        rows.append(f)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return pd.DataFrame(rows, columns=("label",) + DENSE_NAMES + SPARSE_NAMES)


def _dense(frame: pd.DataFrame) -> torch.Tensor:
    values = frame[list(DENSE_NAMES)].replace("", "0").to_numpy(dtype=np.int64)
    return torch.from_numpy(np.log1p(np.maximum(values, 0)).astype(np.float32))


def load_criteo(data_dir: str | os.PathLike | None = None, *, min_count: int = 1) -> CriteoData:
    """Load ``criteo-dac-head8k`` (found like every dataset: ``data_dir``, ``$GENREC_DATA_DIR``, the cache)."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    folder = find_folder(CRITEO_FOLDER, CRITEO_FOLDER, tuple(CRITEO_FILES.values()), data_dir)
    frames = {part: read_criteo(folder / name) for part, name in CRITEO_FILES.items()}
    train = frames["train"]
    vocabularies: list[dict[str, int]] = []
    for col in SPARSE_NAMES:
        counts = train[col][train[col] != ""].value_counts()
        kept = sorted(counts.index[counts >= min_count])
        vocabularies.append({v: i + 1 for i, v in enumerate(kept)})

    def encode(frame: pd.DataFrame) -> TabularSplit:
        sparse = np.stack(
            [frame[c].map(vocab).fillna(0).to_numpy(dtype=np.int64) for c, vocab in zip(SPARSE_NAMES, vocabularies)],
            axis=1,
        )
        return TabularSplit(
            dense=_dense(frame),
            sparse=torch.from_numpy(sparse),
            labels=torch.from_numpy(frame["label"].to_numpy(dtype=np.float32)),
        )

    notes = [
        f"vocabulary from {CRITEO_FILES['train']} only (values seen >= {min_count} time(s)); id 0 = missing or OOV",
        "dense: log1p(max(x, 0)), missing = 0",
    ]
    return CriteoData(
        train=encode(train),
        valid=encode(frames["valid"]),
        test=encode(frames["test"]),
        vocab_sizes=tuple(len(v) for v in vocabularies),
        vocabularies=vocabularies,
        notes=notes,
    )
