"""Interactions table -> id maps -> chronological per-user sequences (jagged) -> leave-one-out splits.

Storage is jagged: one ``items`` array holding every user's sequence back to back, plus ``offsets`` (user ``u`` owns
``items[offsets[u]:offsets[u + 1]]``), the layout ragged attention kernels want and far smaller than a padded matrix.

Ordering rule: a user's interactions are sorted by timestamp with a *stable* sort, so interactions that share a
timestamp keep their file order (the reference preprocessing uses pandas' unstable sort, which reorders ~25% of ML
test targets). ``ties="shuffle"`` orders the interactions of one timestamp randomly instead (seeded by
``ties_seed``), to measure how much a result owes to the file order of ties. A user with any missing timestamp keeps file order, which the readers define as time order, and is
flagged ``has_time = False`` so that time-aware models switch their time term off for that user.

Duplicate rule: rows that repeat an earlier row's (user, item, timestamp) exactly are logging duplicates, not
consumptions: ``duplicates="drop"`` (the default) keeps the first and counts the rest in a data note;
``duplicates="keep"`` keeps them (also counted). The same item at another time is a repeat consumption and is always
kept. Rows without a timestamp are never treated as duplicates (nothing tells a duplicate from a repeat there).

Leave-one-out split of a user's sequence ``s`` (length n >= 3):

    train: s[:-2]                      (autoregressive next-item targets inside it)
    valid: history s[:-2], target s[-2]
    test:  history s[:-1], target s[-1]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from genrec.io import write_json

PAD = 0


@dataclass
class IdMap:
    """External id (string) <-> internal id (1..n). Internal 0 is padding and has no external id."""

    external: list[str]  # external[i - 1] is the external id of internal id i

    def __post_init__(self) -> None:
        self._index = {e: i + 1 for i, e in enumerate(self.external)}
        if len(self._index) != len(self.external):
            raise ValueError("IdMap: duplicate external ids")

    def __len__(self) -> int:
        return len(self.external)

    def to_internal(self, ids, *, missing: int = PAD) -> np.ndarray:
        """Map external ids to internal ids; unknown ids become ``missing``."""
        return np.fromiter((self._index.get(str(e), missing) for e in ids), dtype=np.int64, count=len(ids))

    def get(self, external_id) -> int | None:
        return self._index.get(str(external_id))

    def to_external(self, internal) -> list[str]:
        return [self.external[int(i) - 1] for i in internal]

    def to_json(self) -> list[str]:
        return list(self.external)

    @classmethod
    def from_json(cls, ids: list) -> "IdMap":
        return cls([str(e) for e in ids])


@dataclass
class SequenceData:
    """All users' chronological item sequences, jagged.

    Shapes: U users, T interactions in total.
        users      [U]   external user ids (str)
        offsets    [U+1] int64, user u owns rows offsets[u]:offsets[u+1]
        items      [T]   int64 internal item ids in 1..num_items
        timestamps [T]   int64 Unix seconds (0 where unknown)
        has_time   [U]   bool, every interaction of the user has a timestamp
    """

    users: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    has_time: np.ndarray
    item_map: IdMap
    notes: list[str]

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_items(self) -> int:
        return len(self.item_map)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    def times(self, u: int) -> np.ndarray:
        return self.timestamps[self.offsets[u] : self.offsets[u + 1]]

    def summary(self) -> str:
        n = self.lengths
        return (
            f"{self.num_users:,} users, {self.num_items:,} items, {int(n.sum()):,} interactions; "
            f"length min/median/max {int(n.min())}/{int(np.median(n))}/{int(n.max())}; "
            f"users with timestamps {int(self.has_time.sum()):,}/{self.num_users:,}"
        )


DUPLICATE_POLICIES = ("drop", "keep")


def build_sequences(
    interactions: pd.DataFrame,
    *,
    min_seq_len: int = 3,
    notes: list[str] | None = None,
    duplicates: str = "drop",
    ties: str = "file",
    ties_seed: int = 0,
) -> SequenceData:
    """Group an interactions table (file order; columns user, item[, timestamp]) into per-user sequences.

    Users appear in order of first appearance, items get internal ids in order of first appearance among kept
    users. Users with fewer than ``min_seq_len`` interactions are dropped and the count is recorded in ``notes``.
    ``duplicates``: "drop" (default) or "keep" rows that repeat an earlier row's (user, item, timestamp); either
    way their number is recorded in ``notes`` (see the module docstring).
    ``ties``: "file" (interactions of one timestamp keep their file order) or "shuffle" (a random order drawn from
    ``ties_seed``; users without timestamps keep file order either way).
    """
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates must be 'drop' or 'keep', got {duplicates!r}")
    if ties not in ("file", "shuffle"):
        raise ValueError(f"ties must be 'file' or 'shuffle', got {ties!r}")
    notes = list(notes or [])
    if len(interactions) == 0:
        raise ValueError("build_sequences: the interactions table is empty")
    interactions = _handle_duplicates(interactions, duplicates, notes)
    user_codes, user_ids = pd.factorize(interactions["user"].astype(str), sort=False)
    n_rows = len(interactions)
    if "timestamp" in interactions.columns:
        ts_series = pd.to_numeric(interactions["timestamp"], errors="raise").astype("Int64")
        known = ~ts_series.isna().to_numpy()
        ts = ts_series.fillna(0).to_numpy(dtype=np.int64)
    else:
        known = np.zeros(n_rows, dtype=bool)
        ts = np.zeros(n_rows, dtype=np.int64)
    counts = np.bincount(user_codes, minlength=len(user_ids))
    known_counts = np.bincount(user_codes, weights=known.astype(np.float64), minlength=len(user_ids))
    user_has_time = known_counts == counts
    # Sort key within a user: its timestamp when all of the user's times are known, else its file position.
    key = np.where(user_has_time[user_codes], ts, np.arange(n_rows, dtype=np.int64))
    if ties == "shuffle":
        # a random rank breaks ties of (user, key); untimed users' keys are unique positions, so they keep file order
        tiebreak = np.random.default_rng(ties_seed).permutation(n_rows)
        order = np.lexsort((tiebreak, key, user_codes))
        notes.append(f"interactions of a user that share a timestamp are in a random order (data.ties=shuffle, "
                     f"seed {ties_seed}), not in file order")
    else:
        order = np.lexsort((key, user_codes))  # lexsort is stable: equal timestamps keep file order

    keep_user = counts >= min_seq_len
    dropped = int((~keep_user).sum())
    if dropped:
        notes.append(f"dropped {dropped:,} users with fewer than {min_seq_len} interactions (cannot be split leave-one-out)")
    order = order[keep_user[user_codes[order]]]
    if len(order) == 0:
        raise ValueError(f"build_sequences: no user has at least {min_seq_len} interactions")

    sorted_users = user_codes[order]
    item_codes, item_ids = pd.factorize(interactions["item"].astype(str).to_numpy()[order], sort=False)
    kept_users = np.flatnonzero(keep_user)
    new_code = np.full(len(user_ids), -1, dtype=np.int64)
    new_code[kept_users] = np.arange(len(kept_users))
    lengths = np.bincount(new_code[sorted_users], minlength=len(kept_users))
    offsets = np.zeros(len(kept_users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # users appear in order of first appearance, and `order` is grouped by user code ascending = same order
    return SequenceData(
        users=np.asarray(user_ids[kept_users], dtype=object),
        offsets=offsets,
        items=item_codes.astype(np.int64) + 1,
        timestamps=ts[order],
        has_time=user_has_time[kept_users],
        item_map=IdMap([str(x) for x in item_ids]),
        notes=notes,
    )


def _handle_duplicates(interactions: pd.DataFrame, policy: str, notes: list[str]) -> pd.DataFrame:
    """Drop (or only count) rows whose (user, item, timestamp) repeats an earlier row; rows without a timestamp
    are never duplicates."""
    if "timestamp" not in interactions.columns:
        return interactions
    known = interactions["timestamp"].notna().to_numpy()
    if not known.any():
        return interactions
    key = pd.DataFrame(
        {
            "user": interactions["user"].astype(str).to_numpy(),
            "item": interactions["item"].astype(str).to_numpy(),
            "timestamp": interactions["timestamp"].to_numpy(),
        }
    )
    dup = key.duplicated().to_numpy() & known
    n = int(dup.sum())
    if n == 0:
        return interactions
    if policy == "keep":
        notes.append(
            f"kept {n:,} exact duplicate rows (same user, item and timestamp as an earlier row; duplicates=keep): "
            "they repeat items in the histories and targets"
        )
        return interactions
    notes.append(
        f"dropped {n:,} exact duplicate rows (same user, item and timestamp as an earlier row; the first is kept; "
        "duplicates=drop)"
    )
    return interactions[~dup]


@dataclass
class Split:
    """One leave-one-out view: for each user, a history (jagged) and optionally a target.

    For "train" the target is absent: every position of the history predicts the next one.
    """

    name: str  # "train" | "valid" | "test"
    users: np.ndarray  # [U] user indices into SequenceData
    starts: np.ndarray  # [U] start offset of the history in SequenceData.items
    ends: np.ndarray  # [U] end offset (exclusive) of the history
    target_pos: np.ndarray | None  # [U] offset of the target item (valid/test), None for train


def leave_one_out(data: SequenceData, name: str) -> Split:
    """The train / valid / test view of ``data`` (see module docstring)."""
    lengths = data.lengths
    if lengths.min() < 3:
        raise ValueError("leave_one_out needs every sequence to have at least 3 items")
    users = np.arange(data.num_users)
    starts = data.offsets[:-1].copy()
    if name == "train":
        return Split(name, users, starts, data.offsets[1:] - 2, None)
    if name == "train+valid":  # the reference code's training data: everything but the test item
        return Split(name, users, starts, data.offsets[1:] - 1, None)
    if name == "valid":
        return Split(name, users, starts, data.offsets[1:] - 2, data.offsets[1:] - 2)
    if name == "test":
        return Split(name, users, starts, data.offsets[1:] - 1, data.offsets[1:] - 1)
    raise ValueError(f"unknown split {name!r}; expected train, train+valid, valid or test")


def save_id_maps(data: SequenceData, directory: str | Path) -> None:
    write_json(Path(directory) / "item_ids.json", data.item_map.to_json())


def load_item_map(directory: str | Path) -> IdMap:
    with open(Path(directory) / "item_ids.json", encoding="utf-8") as fh:
        return IdMap.from_json(json.load(fh))
