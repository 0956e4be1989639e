"""Ranking examples -> tensors: the only contract ranking models (HSTU ranker, DLRM, DIN, floors) see.

A ranking example is one user's history of (item, action, time) events followed by candidate items whose per-task
labels the model predicts. Every history event happened strictly before the earliest candidate of its row, so no
candidate outcome (and nothing after the candidates' time) can reach the model's input. A candidate's labels are
never an input: candidates carry no action.

A ``RankingBatch`` is left-aligned and right-padded with id 0::

    user_ids        [B]        long   internal user id (1..U; 0 = unknown user); groups rows for GAUC
    hist_items      [B, L]     long   history item ids, oldest first, 0 = padding (the most recent L events are kept)
    hist_actions    [B, L]     long   action bitmask of each history event (bit a set = action a happened), 0 = padding
    hist_times      [B, L]     long   Unix seconds of each history event (0 at padding)
    hist_lengths    [B]        long   real history events per row (may be 0)
    cand_items      [B, C]     long   candidate item ids, 0 = padding
    cand_times      [B, C]     long   Unix seconds of each candidate impression (the time it is asked about)
    cand_mask       [B, C]     bool   real candidates
    user_features   [B, F]     long   categorical user features (0 = unknown), F may be 0 (the schema names them)
    dense_features  [B, C, D]  float  hand-made per-(user, candidate) features, computed from training-period data
                                      only (counts, rates, recency, hour, ...); D may be 0 (the schema names them)
    labels          [B, C, T]  float  per-task 0/1 labels of the candidates; None at inference
    hist_labels     [B, L, T]  float  per-task labels of the history events (for training at every history
                                      position, e.g. the interleaved HSTU ranker); None when not built
    label_weights   [B, C, T]  float  weight of each candidate label in the loss (>= 0; 0 = this task has no label
                                      for this candidate, e.g. a delayed-feedback window head the example was not
                                      routed to); None = weight 1 for every real candidate and task
    cand_domains    [B, C]     long   domain (surface) id of each candidate, 1..len(schema.domains), 0 = unknown
                                      (and padding); None when the data has no domains

``RankingSchema`` names what the integer columns mean, so models size their tables from it and never from data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass(frozen=True)
class RankingSchema:
    """What a ranking dataset's tensors mean."""

    num_items: int  # item ids are 1..num_items (0 = padding)
    num_users: int  # user ids are 1..num_users (0 = unknown)
    tasks: tuple[str, ...]  # T task names, in the order of the labels' last axis, e.g. ("like", "love")
    actions: tuple[str, ...]  # action names by bit: actions[a] is bit 1 << a of hist_actions
    user_features: tuple[str, ...] = ()  # F names
    user_feature_sizes: tuple[int, ...] = ()  # F cardinalities (ids 1..size, 0 = unknown)
    dense_features: tuple[str, ...] = ()  # D names
    domains: tuple[str, ...] = ()  # domain names: cand_domains id k names domains[k - 1] (0 = unknown)
    notes: tuple[str, ...] = field(default=())  # data notes (e.g. filtered base rates) to print next to results

    def __post_init__(self) -> None:
        if len(self.user_features) != len(self.user_feature_sizes):
            raise ValueError("user_features and user_feature_sizes must have the same length")
        if not self.tasks:
            raise ValueError("a ranking schema needs at least one task")
        if len(self.actions) > 62:
            raise ValueError("at most 62 actions fit in an int64 bitmask")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_actions(self) -> int:
        return len(self.actions)


@dataclass
class RankingBatch:
    user_ids: torch.Tensor
    hist_items: torch.Tensor
    hist_actions: torch.Tensor
    hist_times: torch.Tensor
    hist_lengths: torch.Tensor
    cand_items: torch.Tensor
    cand_times: torch.Tensor
    cand_mask: torch.Tensor
    user_features: torch.Tensor
    dense_features: torch.Tensor
    labels: torch.Tensor | None = None
    hist_labels: torch.Tensor | None = None
    label_weights: torch.Tensor | None = None
    cand_domains: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "RankingBatch":
        return RankingBatch(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    def validate(self, schema: RankingSchema) -> None:
        """Shapes and ranges against ``schema`` (ids, user features, action bitmasks, finite dense features); raises
        ValueError naming the first problem. Works on any device."""
        B, L = self.hist_items.shape
        C = self.cand_items.shape[1]
        expect = {
            "user_ids": (B,),
            "hist_actions": (B, L),
            "hist_times": (B, L),
            "hist_lengths": (B,),
            "cand_times": (B, C),
            "cand_mask": (B, C),
            "user_features": (B, len(schema.user_features)),
            "dense_features": (B, C, len(schema.dense_features)),
        }
        if self.labels is not None:
            expect["labels"] = (B, C, schema.num_tasks)
        if self.hist_labels is not None:
            expect["hist_labels"] = (B, L, schema.num_tasks)
        if self.label_weights is not None:
            expect["label_weights"] = (B, C, schema.num_tasks)
        if self.cand_domains is not None:
            expect["cand_domains"] = (B, C)
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"RankingBatch.{name}: shape {got}, expected {shape}")
        if _max(self.hist_items) > schema.num_items or _max(self.cand_items) > schema.num_items:
            raise ValueError(f"RankingBatch: an item id exceeds the schema's num_items={schema.num_items}")
        if bool((self.hist_lengths < 0).any()) or bool((self.hist_lengths > L).any()):
            raise ValueError(f"RankingBatch.hist_lengths: values must be in [0, {L}]")
        positions = torch.arange(L, device=self.hist_items.device).unsqueeze(0)
        if bool((self.hist_items[positions >= self.hist_lengths.unsqueeze(1)] != 0).any()):
            raise ValueError("RankingBatch.hist_items: non-zero ids past a row's length (rows must be left-aligned)")
        if bool((self.cand_items[~self.cand_mask] != 0).any()) or bool((self.cand_items[self.cand_mask] == 0).any()):
            raise ValueError("RankingBatch.cand_mask: must be True exactly where cand_items is non-zero")
        # Ranges an embedding lookup would otherwise get wrong silently (or fail on with an index error).
        if _min(self.hist_items) < 0 or _min(self.cand_items) < 0:
            raise ValueError("RankingBatch: negative item id")
        if _min(self.user_ids) < 0 or _max(self.user_ids) > schema.num_users:
            raise ValueError(f"RankingBatch.user_ids: values must be in [0, {schema.num_users}] (0 = unknown user)")
        for f, (name, size) in enumerate(zip(schema.user_features, schema.user_feature_sizes)):
            column = self.user_features[:, f]
            if _min(column) < 0 or _max(column) > size:
                raise ValueError(f"RankingBatch.user_features[:, {f}] ({name!r}): values must be in [0, {size}]")
        limit = 1 << schema.num_actions
        if _min(self.hist_actions) < 0 or _max(self.hist_actions) >= limit:
            raise ValueError(f"RankingBatch.hist_actions: bitmasks must be in [0, {limit - 1}] for the schema's "
                             f"{schema.num_actions} actions {schema.actions}")  # fmt: skip
        if self.dense_features.numel() and not bool(torch.isfinite(self.dense_features).all()):
            raise ValueError("RankingBatch.dense_features: NaN or infinite values")
        if self.cand_domains is not None and (_min(self.cand_domains) < 0
                                              or _max(self.cand_domains) > len(schema.domains)):
            raise ValueError(f"RankingBatch.cand_domains: values must be in [0, {len(schema.domains)}] for the "
                             f"schema's domains {schema.domains}")  # fmt: skip
        w = self.label_weights
        if w is not None and w.numel() and not bool((torch.isfinite(w) & (w >= 0)).all()):
            raise ValueError("RankingBatch.label_weights: weights must be finite and >= 0")


def _max(t: torch.Tensor) -> int:
    return int(t.max()) if t.numel() else 0


def _min(t: torch.Tensor) -> int:
    return int(t.min()) if t.numel() else 0


def _to(value: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if value is None else value.to(device)
