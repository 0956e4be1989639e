"""Per-user chronological events -> time-based splits -> :class:`~genrec.data.ranking_batch.RankingBatch` batches.

This module is dataset-agnostic: the dataset loaders (:mod:`genrec.data.ranking.sources`) turn raw logs into an
*event table* and call :func:`build_ranking_dataset`. Synthetic tables (tests, user code) go through the same path.

Event table (one row per logged event, in file order), columns:

    user        str    external user id
    item        str    external item id
    timestamp   int    Unix seconds
    actions     int    action bitmask of the event (bit a = ``actions[a]`` happened)
    candidate   bool   the event is an impression that can be asked about (a candidate); e.g. a Taobao page view
    task:<t>    0/1    for each task t: the event *is* an observed outcome of task t at its own time (an ML-1M
                       rating >= 4 for ``like``; a Taobao ``buy`` row for ``buy``)
    order       int    optional finer tie-break inside one second (e.g. KuaiRand milliseconds)
    domain      int    optional domain (surface) id of the event, 1..len(domains), 0 = unknown; required when
                       ``domains`` are given (the loaders compute it from a named definition,
                       :data:`genrec.data.ranking.sources.DOMAIN_DEFINITIONS`)

Ordering: each user's events are sorted by (timestamp, order, file position) with a stable sort, so equal
timestamps keep file order.

Labels of a candidate (``labels_from_later_events``):

* False (ML-1M, KuaiRand): the candidate's own ``task:<t>`` values (the rating, the click, ...).
* True (Taobao): task t is 1 when the same user has a ``task:<t>`` event on the same item at a time ``>=`` the
  candidate's time and before the end of the candidate's split part (and within ``label_window_s`` when given). The
  training part's labels therefore never look at a validation- or test-period event (pages viewed just before the
  cut are censored, as in any delayed-feedback log). A label event is never in its own candidate's history, because
  history is strictly earlier in time (below).

Splits (``split``):

* ``"user-last"``: per user, the last ``n_eval`` candidates are test, the ``n_eval`` before them validation, all
  earlier events training. Users with fewer than ``min_events`` (default ``2 * n_eval + 1``) candidates have no
  validation or test rows; all their events are training events. Other users' training events may be later in
  wall-clock time than a user's test events, so a model trained on this split has seen "the future" of other users
  (the usual leave-last-out caveat); ``"global-time"`` avoids it.
* ``"global-time"``: cuts ``T_valid < T_test``; training = events before ``T_valid``, validation = ``[T_valid,
  T_test)``, test = at or after ``T_test``. The cuts are given (``time_cuts``) or chosen as quantiles of all event
  timestamps (``quantiles``, default 0.8 and 0.9; the cut is the smallest timestamp at or above the quantile, so
  every training event time < T_valid <= every validation time < T_test <= every test time).

Rows (one :class:`RankingBatch` row = one user, one history, up to C candidates):

* Each part's candidates, per user in time order, are cut into consecutive chunks of up to C
  (``max_candidates``); each chunk is a row. Training rows come from training candidates, validation rows from
  validation candidates, test rows from test candidates.
* History of a row = the user's events (of any part and any kind, e.g. Taobao carts too) that are strictly before
  the row's earliest candidate **in time** (and therefore also in sort order); events sharing that second are left
  out, whatever their file order, because file order inside one second is not a reliable time order. The most
  recent ``max_history`` events are kept. A test row's history thus holds all earlier training and validation
  events; a validation row's history all earlier training events (and, with ``global-time``, the user's earlier
  validation events).

Domains (surfaces): with ``domains`` the schema names them and every batch carries ``cand_domains`` [B, C], each
candidate's own event's domain (0 at padding). :meth:`RankingDataset.restrict_to_domain` (``only_domain``) keeps
only one domain's candidates in every part: the rows are cut into chunks exactly as without the restriction, then
the other domains' candidates are dropped from each row (rows left empty are dropped). A kept candidate therefore
has the same row time ``t0``, the same history and the same dense features as in the unrestricted dataset, so a
per-domain model is scored on exactly the (history, candidate) pairs a consolidated model is scored on for that
domain. Nothing else changes: the split, the histories (which keep every event, of any domain) and the schema.

Dense "hand-made" features (for DLRM-style models), per (row, candidate); every statistic is computed from
**training-part events strictly before the row's earliest candidate time** (t0), so nothing at or after the
candidates' time, and no validation or test event, can reach them:

    user_count_log       log1p(#training candidates of the user before t0)
    user_rate:<task>     (s + a * p) / (n + a): s = #training task-<task> events of the user before t0, n = that
                         count, a = ``smoothing`` (10), p = the global training rate before t0, (S + 1) / (N + 2)
    item_count_log       log1p(#training candidates of the item before t0)
    item_rate:<task>     as user_rate, over the item's events
    recency_log_s        log1p(candidate time - the row's most recent history event time); 0 when the history is
                         empty (a real gap is >= 1 s, because history is strictly earlier)
    hour_sin, hour_cos   hour of day of the candidate's time (``tz_offset_s`` east of UTC), on the unit circle
    <extra item columns> per-item dense columns supplied by the loader (ML-1M: genre multi-hot), static metadata

Rates are clipped to [0, 1] (a Taobao user may buy items never viewed in the log). Using causal, time-prefix
statistics (rather than whole-training-period totals) also keeps a training row's own label out of its features.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from genrec.data.ranking_batch import RankingBatch, RankingSchema
from genrec.data.sequences import IdMap

__all__ = ["PARTS", "SPLITS", "DenseFeatureState", "RankingDataset", "RankingRows", "build_ranking_dataset"]

PARTS = ("train", "valid", "test")
SPLITS = ("user-last", "global-time")
_PART_ID = {p: i for i, p in enumerate(PARTS)}


def _id_codes(values: pd.Series) -> tuple[IdMap, np.ndarray]:
    """An :class:`IdMap` of the distinct external ids (numerically sorted when all are integers, else
    lexicographically) and the internal id (1..n) of every value, vectorised."""
    codes, uniques = pd.factorize(values, sort=False)
    names = np.asarray([str(v) for v in uniques], dtype=object)
    try:
        rank = np.argsort(np.array([int(v) for v in names], dtype=np.int64), kind="stable")
    except ValueError:
        rank = np.argsort(names.astype(str), kind="stable")
    position = np.empty(len(names), dtype=np.int64)
    position[rank] = np.arange(len(names))
    return IdMap(list(names[rank])), position[codes] + 1


@dataclass
class RankingRows:
    """The rows of one part for one candidate-chunk size C (all arrays [R] unless noted).

    cands       [K]  event indices (into the dataset's sorted event arrays) of the part's candidates, user-major
    start, size      row r's candidates are ``cands[start[r] : start[r] + size[r]]`` (1 <= size <= C)
    user             internal user id of the row
    t0               time of the row's earliest candidate (with ``only_domain``: of the row before the other
                     domains' candidates were dropped, so histories and features do not change)
    hist_end         history = sorted events ``[max(user_start, hist_end - L), hist_end)``; all have time < t0
    user_start       index of the user's first event
    """

    part: str
    max_candidates: int
    cands: np.ndarray
    start: np.ndarray
    size: np.ndarray
    user: np.ndarray
    t0: np.ndarray
    hist_end: np.ndarray
    user_start: np.ndarray

    def __len__(self) -> int:
        return len(self.start)


@dataclass(frozen=True, eq=False)
class DenseFeatureState:
    """The causal training statistics behind the dense features (see the module docstring), as plain arrays.

    Keys are ``id * M + (time - tmin)`` of training events, sorted; ``*_imp`` / ``*_task`` are the cumulative
    candidate and task counts along them ([n + 1] and [n + 1, T], starting at 0). ``g_*`` are the same along all
    training events in time order. A user or item id without training events (e.g. 0, unknown) gets count 0 and
    the smoothed global rate. Built by :meth:`RankingDataset.dense_feature_state`; :meth:`arrays` /
    :meth:`from_arrays` turn it into named arrays and back (e.g. for an ``.npz`` file).
    """

    names: tuple[str, ...]  # D feature names (the schema's dense_features)
    M: int
    tmin: int
    smoothing: float
    tz_offset_s: int
    u_key: np.ndarray
    u_imp: np.ndarray
    u_task: np.ndarray
    i_key: np.ndarray
    i_imp: np.ndarray
    i_task: np.ndarray
    g_time: np.ndarray
    g_imp: np.ndarray
    g_task: np.ndarray
    item_dense_table: np.ndarray  # [I + 1, E] float32

    ARRAYS = ("u_key", "u_imp", "u_task", "i_key", "i_imp", "i_task", "g_time", "g_imp", "g_task",
              "item_dense_table")  # fmt: skip

    def arrays(self) -> dict[str, np.ndarray]:
        """The array fields by name."""
        return {k: getattr(self, k) for k in self.ARRAYS}

    def scalars(self) -> dict:
        """The non-array fields (JSON-serialisable)."""
        return {"names": list(self.names), "M": self.M, "tmin": self.tmin, "smoothing": self.smoothing,
                "tz_offset_s": self.tz_offset_s}  # fmt: skip

    @classmethod
    def from_arrays(cls, scalars: dict, arrays: dict[str, np.ndarray]) -> "DenseFeatureState":
        """The inverse of :meth:`scalars` + :meth:`arrays`; ValueError when an array is missing or the shapes do not
        fit together."""
        missing = [k for k in cls.ARRAYS if k not in arrays]
        if missing:
            raise ValueError(f"dense feature state: missing arrays {missing}")
        state = cls(names=tuple(str(n) for n in scalars["names"]), M=int(scalars["M"]), tmin=int(scalars["tmin"]),
                    smoothing=float(scalars["smoothing"]), tz_offset_s=int(scalars["tz_offset_s"]),
                    **{k: np.asarray(arrays[k]) for k in cls.ARRAYS})  # fmt: skip
        for key, cum in (("u_key", "u_imp"), ("i_key", "i_imp"), ("g_time", "g_imp")):
            task = cum.replace("imp", "task")
            n = len(getattr(state, key))
            if getattr(state, cum).shape != (n + 1,) or getattr(state, task).shape[0] != n + 1:
                raise ValueError(f"dense feature state: {cum} / {task} do not fit {key} ({n} events)")
        T = state.g_task.shape[1]
        expected = 3 + 2 * T + 2 + state.item_dense_table.shape[1]
        if len(state.names) != expected:
            raise ValueError(f"dense feature state: {len(state.names)} names for {expected} features")
        return state

    def features(
        self, user: np.ndarray, t0: np.ndarray, item: np.ndarray, cand_time: np.ndarray, last_hist_time: np.ndarray
    ) -> np.ndarray:
        """Dense features [..., D] for aligned arrays of the same shape (``RankingDataset.dense_features_for``)."""
        shape = item.shape
        user, t0, item = user.reshape(-1), t0.reshape(-1), item.reshape(-1)
        cand_time, last_hist_time = cand_time.reshape(-1), last_hist_time.reshape(-1)
        M, tmin, a = self.M, self.tmin, self.smoothing
        rel = np.clip(t0 - tmin, 0, M - 1)
        # global prior before t0
        g = np.searchsorted(self.g_time, t0, side="left")
        prior = (self.g_task[g] + 1.0) / (self.g_imp[g, None] + 2.0)  # [n, T]
        # user: the user's training events before t0
        u_lo = np.searchsorted(self.u_key, user * M, side="left")
        u_hi = np.searchsorted(self.u_key, user * M + rel, side="left")
        u_n = self.u_imp[u_hi] - self.u_imp[u_lo]
        u_s = self.u_task[u_hi] - self.u_task[u_lo]
        # item: the item's training events before t0
        i_lo = np.searchsorted(self.i_key, item * M, side="left")
        i_hi = np.searchsorted(self.i_key, item * M + rel, side="left")
        i_n = self.i_imp[i_hi] - self.i_imp[i_lo]
        i_s = self.i_task[i_hi] - self.i_task[i_lo]
        u_rate = np.clip((u_s + a * prior) / (u_n[:, None] + a), 0.0, 1.0)
        i_rate = np.clip((i_s + a * prior) / (i_n[:, None] + a), 0.0, 1.0)
        gap = cand_time - last_hist_time
        recency = np.where(last_hist_time >= 0, np.log1p(np.maximum(gap, 0)), 0.0)
        hour = ((cand_time + self.tz_offset_s) % 86400) / 3600.0
        angle = 2.0 * math.pi * hour / 24.0
        cols = [
            np.log1p(u_n)[:, None],
            u_rate,
            np.log1p(i_n)[:, None],
            i_rate,
            recency[:, None],
            np.sin(angle)[:, None],
            np.cos(angle)[:, None],
            self.item_dense_table[item],
        ]
        out = np.concatenate(cols, axis=1).astype(np.float32)
        return out.reshape(*shape, out.shape[1])


@dataclass
class RankingDataset:
    """A ranking dataset: sorted events with split parts and labels, and the statistics behind its dense features.

    Build with :func:`build_ranking_dataset` (or :func:`genrec.data.ranking.load_ranking_dataset`). Event arrays are
    [N], sorted by (user, time, tie-break, file position); ``user_offsets`` [U + 2] gives user u's events as
    ``user_offsets[u] : user_offsets[u + 1]`` (u = 1..U; index 0 is an empty slot for the padding id).
    """

    name: str
    schema: RankingSchema
    split: str
    user_map: IdMap
    item_map: IdMap
    user_offsets: np.ndarray
    ev_user: np.ndarray  # [N] int64
    ev_item: np.ndarray  # [N] int64
    ev_time: np.ndarray  # [N] int64
    ev_actions: np.ndarray  # [N] int64
    ev_candidate: np.ndarray  # [N] bool
    ev_part: np.ndarray  # [N] int8: 0 train, 1 valid, 2 test
    ev_labels: np.ndarray  # [N, T] float32: candidate labels (0 for non-candidates)
    hist_labels_available: bool  # labels are the events' own outcomes, so history events can carry them
    time_cuts: tuple[int, int] | None
    user_feature_table: np.ndarray  # [U + 1, F] int64
    item_dense_table: np.ndarray  # [I + 1, E] float32
    smoothing: float
    tz_offset_s: int
    default_max_candidates: int
    notes: list[str] = field(default_factory=list)
    ev_domain: np.ndarray | None = None  # [N] int64 domain id of each event (1..K, 0 unknown); None without domains
    only_domain: str | None = None  # keep only this domain's candidates in every part (restrict_to_domain)
    train_until: int | None = None  # keep only training rows with t0 < train_until (restrict_training_until)
    # causal training statistics (see the module docstring); built by build_ranking_dataset
    _stats: dict = field(default_factory=dict, repr=False)
    _rows: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ rows
    def rows(self, part: str = "train", max_candidates: int | None = None) -> RankingRows:
        """The rows of ``part`` with up to ``max_candidates`` (default: the dataset's) candidates each."""
        if part not in _PART_ID:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        C = int(max_candidates or self.default_max_candidates)
        if C < 1:
            raise ValueError(f"max_candidates must be >= 1, got {C}")
        key = (part, C)
        if key not in self._rows:
            self._rows[key] = self._build_rows(part, C)
        return self._rows[key]

    def restrict_to_domain(self, name: str | None) -> RankingDataset:
        """The dataset with only domain ``name``'s candidates in every part (see the module docstring); ``None``
        gives all candidates back. The events, split, histories and schema are shared with this dataset."""
        if name is not None:
            self.domain_id(name)  # refuses an unknown name
        return dataclasses.replace(self, only_domain=name, _rows={})

    def restrict_training_until(self, cut: int | None) -> RankingDataset:
        """The dataset whose training part keeps only the rows whose earliest candidate is before ``cut`` (unix
        seconds): a model trained on it has seen nothing at or after ``cut`` (e.g. a stale teacher). The validation
        and test parts, the histories, the dense features and the schema are unchanged; ``None`` restores them."""
        if cut is not None:
            cut = int(cut)
            rows = self._chunk_rows("train", self.default_max_candidates)
            if not bool((rows.t0 < cut).any()):
                raise ValueError(f"{self.name}: no training row starts before train_until={cut} (the earliest "
                                 f"starts at {int(rows.t0.min()) if len(rows) else 'none'})")  # fmt: skip
        return dataclasses.replace(self, train_until=cut, _rows={})

    def domain_id(self, name: str) -> int:
        """The id (1..K) of domain ``name``; ValueError naming the known domains otherwise."""
        domains = self.schema.domains
        if not domains:
            raise ValueError(f"{self.name}: the dataset was built without domains, so it has no domain {name!r} "
                             "(load it with domains=<definition name>)")  # fmt: skip
        if name not in domains:
            raise ValueError(f"{self.name}: unknown domain {name!r}; the dataset's domains are {list(domains)}")
        return domains.index(name) + 1

    def _build_rows(self, part: str, C: int) -> RankingRows:
        rows = self._chunk_rows(part, C)
        if part == "train" and self.train_until is not None:
            early = rows.t0 < self.train_until  # [R]
            cands = rows.cands[np.repeat(early, rows.size)]  # a row's candidates are contiguous, rows in order
            size = rows.size[early]
            start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64) if len(size) else size
            rows = RankingRows(part, C, cands, start, size, rows.user[early], rows.t0[early], rows.hist_end[early],
                               rows.user_start[early])  # fmt: skip
        if self.only_domain is None:
            return rows
        assert self.ev_domain is not None
        keep = self.ev_domain[rows.cands] == self.domain_id(self.only_domain)  # [K]
        kept = np.add.reduceat(keep.astype(np.int64), rows.start) if len(rows.start) else rows.size  # [R]
        nonempty = kept > 0
        size = kept[nonempty]
        start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64) if len(size) else size
        return RankingRows(part, C, rows.cands[keep], start, size, rows.user[nonempty], rows.t0[nonempty],
                           rows.hist_end[nonempty], rows.user_start[nonempty])  # fmt: skip

    def _chunk_rows(self, part: str, C: int) -> RankingRows:
        cands = np.flatnonzero(self.ev_candidate & (self.ev_part == _PART_ID[part]))
        users = self.ev_user[cands]
        n = len(cands)
        pos = np.arange(n, dtype=np.int64)
        first = np.ones(n, dtype=bool)
        first[1:] = users[1:] != users[:-1]
        group_start = np.maximum.accumulate(np.where(first, pos, 0)) if n else pos
        rank = pos - group_start
        start = np.flatnonzero(rank % C == 0)
        size = np.diff(np.append(start, n))
        p0 = cands[start]
        user = self.ev_user[p0]
        t0 = self.ev_time[p0]
        key = self._stats["user_key"]
        hist_end = np.searchsorted(key, user * self._stats["M"] + (t0 - self._stats["tmin"]), side="left")
        return RankingRows(part, C, cands, start, size, user, t0, hist_end, self.user_offsets[user])

    # ------------------------------------------------------------------ features
    def dense_features_for(
        self, user: np.ndarray, t0: np.ndarray, item: np.ndarray, cand_time: np.ndarray, last_hist_time: np.ndarray
    ) -> np.ndarray:
        """Dense features [..., D] (``schema.dense_features``) for aligned arrays of the same shape.

        ``t0`` is the row's earliest candidate time; ``last_hist_time`` the row's most recent history time (< 0 when
        the history is empty). Only training events before ``t0`` are counted (see the module docstring).
        """
        return self.dense_feature_state().features(user, t0, item, cand_time, last_hist_time)

    def dense_feature_state(self, *, users: bool = True) -> "DenseFeatureState":
        """The statistics behind the dense features, detached from the events: enough to compute them for any
        (user, time, item) without the dataset. ``users=False`` leaves the per-user statistics out (much smaller);
        the state then computes every user's features as those of a user unknown to training (id 0)."""
        s = self._stats
        user_part = {"u_key": s["u_key"], "u_imp": s["u_imp"], "u_task": s["u_task"]}
        if not users:
            T = self.schema.num_tasks
            user_part = {"u_key": np.zeros(0, np.int64), "u_imp": np.zeros(1), "u_task": np.zeros((1, T))}
        return DenseFeatureState(
            names=self.schema.dense_features, M=int(s["M"]), tmin=int(s["tmin"]), smoothing=self.smoothing,
            tz_offset_s=self.tz_offset_s, item_dense_table=self.item_dense_table, **user_part,
            **{k: s[k] for k in ("i_key", "i_imp", "i_task", "g_time", "g_imp", "g_task")},
        )  # fmt: skip

    # ------------------------------------------------------------------ batches
    def make_batch(self, rows: RankingRows, which: np.ndarray, max_history: int = 256,
                   with_hist_labels: bool = False) -> RankingBatch:  # fmt: skip
        """The :class:`RankingBatch` of rows ``which`` (indices into ``rows``)."""
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        if with_hist_labels and not self.hist_labels_available:
            raise ValueError(
                f"{self.name}: history labels are not available (a candidate's labels come from later events, "
                "which may lie after a row's candidates)"
            )
        which = np.asarray(which, dtype=np.int64)
        B = len(which)
        user, t0 = rows.user[which], rows.t0[which]
        hist_end, ustart = rows.hist_end[which], rows.user_start[which]
        avail = hist_end - ustart
        hist_len = np.minimum(avail, max_history)
        L = max(1, int(hist_len.max()) if B else 1)
        pos = np.arange(L)
        hmask = pos[None, :] < hist_len[:, None]  # [B, L]
        hidx = np.where(hmask, (hist_end - hist_len)[:, None] + pos[None, :], 0)
        last_hist_time = np.where(avail > 0, self.ev_time[np.maximum(hist_end - 1, 0)], -1)

        cidx, cmask = self.candidate_events(rows, which)  # [B, C], [B, C]
        C = cmask.shape[1]
        cand_items = np.where(cmask, self.ev_item[cidx], 0)
        cand_times = np.where(cmask, self.ev_time[cidx], 0)
        dense = self.dense_features_for(
            np.broadcast_to(user[:, None], (B, C)),
            np.broadcast_to(t0[:, None], (B, C)),
            cand_items,
            cand_times,
            np.broadcast_to(last_hist_time[:, None], (B, C)),
        )
        dense = dense * cmask[:, :, None]
        labels = self.ev_labels[cidx] * cmask[:, :, None]
        hist_labels = None
        if with_hist_labels:
            hist_labels = torch.from_numpy(self.ev_labels[hidx] * hmask[:, :, None])
        return RankingBatch(
            user_ids=torch.from_numpy(user.astype(np.int64)),
            hist_items=torch.from_numpy(np.where(hmask, self.ev_item[hidx], 0)),
            hist_actions=torch.from_numpy(np.where(hmask, self.ev_actions[hidx], 0)),
            hist_times=torch.from_numpy(np.where(hmask, self.ev_time[hidx], 0)),
            hist_lengths=torch.from_numpy(hist_len.astype(np.int64)),
            cand_items=torch.from_numpy(cand_items),
            cand_times=torch.from_numpy(cand_times),
            cand_mask=torch.from_numpy(cmask),
            user_features=torch.from_numpy(self.user_feature_table[user]),
            dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
            labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)),
            hist_labels=hist_labels,
            cand_domains=None if self.ev_domain is None else torch.from_numpy(
                np.where(cmask, self.ev_domain[cidx], 0).astype(np.int64)),
        )

    @staticmethod
    def candidate_events(rows: RankingRows, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(event index [B, C] of each candidate of rows ``which``, real-candidate mask [B, C]); C is the largest
        row's candidate count (at least 1) and padding positions hold event 0. An event index names one candidate
        whatever the row chunking, so per-candidate data (e.g. a teacher's logits) can be looked up by it."""
        which = np.asarray(which, dtype=np.int64)
        size, start = rows.size[which], rows.start[which]
        C = max(1, int(size.max()) if len(which) else 1)
        cpos = np.arange(C)
        cmask = cpos[None, :] < size[:, None]  # [B, C]
        return rows.cands[np.where(cmask, start[:, None] + cpos[None, :], 0)], cmask

    def batch_rows(self, part: str = "train", batch_size: int = 128, *, shuffle: bool | None = None, seed: int = 0,
                   max_candidates: int | None = None, drop_last: bool = False) -> Iterator[np.ndarray]:  # fmt: skip
        """The row indices (into ``rows(part, max_candidates)``) of each batch :meth:`batches` yields, in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self.rows(part, max_candidates))
        order = np.arange(n)
        if shuffle if shuffle is not None else part == "train":
            order = np.random.default_rng(seed).permutation(n)
        stop = n - (n % batch_size if drop_last else 0)
        for i in range(0, stop, batch_size):
            yield order[i : i + batch_size]

    def batches(
        self,
        part: str = "train",
        batch_size: int = 128,
        *,
        shuffle: bool | None = None,
        seed: int = 0,
        max_history: int = 256,
        max_candidates: int | None = None,
        with_hist_labels: bool = False,
        drop_last: bool = False,
    ) -> Iterator[RankingBatch]:
        """Batches of ``part``'s rows. ``shuffle`` defaults to True for ``"train"`` (a permutation from ``seed``)
        and False otherwise (user order, then time). Each batch is padded to its own longest history (at most
        ``max_history``, at least 1) and its own largest candidate count (at most ``max_candidates``)."""
        rows = self.rows(part, max_candidates)
        for which in self.batch_rows(part, batch_size, shuffle=shuffle, seed=seed, max_candidates=max_candidates,
                                     drop_last=drop_last):  # fmt: skip
            yield self.make_batch(rows, which, max_history, with_hist_labels)

    # ------------------------------------------------------------------ summaries
    def counts(self, part: str, max_candidates: int | None = None) -> dict:
        """Rows, candidates, users with rows, rows with an empty history, and the base rate of every task."""
        rows = self.rows(part, max_candidates)
        labels = self.ev_labels[rows.cands]
        rates = labels.mean(axis=0) if len(labels) else np.full(self.schema.num_tasks, np.nan)
        out = {
            "rows": len(rows),
            "candidates": len(rows.cands),
            "users": len(np.unique(rows.user)),
            "empty_history_rows": int((rows.hist_end == rows.user_start).sum()),
            "base_rates": {t: float(r) for t, r in zip(self.schema.tasks, rates)},
        }
        if self.ev_domain is not None:  # candidates per domain (and per unknown domain, id 0)
            per = np.bincount(self.ev_domain[rows.cands], minlength=len(self.schema.domains) + 1)
            out["domain_candidates"] = {"unknown": int(per[0]),
                                        **{d: int(per[k + 1]) for k, d in enumerate(self.schema.domains)}}
        return out

    def describe(self, max_candidates: int | None = None) -> str:
        """A human summary: sizes, split, per-part counts and base rates, and the data notes."""
        s = self.schema
        lines = [
            f"{self.name}: {s.num_users:,} users, {s.num_items:,} items, {len(self.ev_item):,} events "
            f"({int(self.ev_candidate.sum()):,} candidates); split {self.split!r}"
            + (f", cuts T_valid={self.time_cuts[0]}, T_test={self.time_cuts[1]}" if self.time_cuts else ""),
            (f"tasks {', '.join(s.tasks)}; actions {', '.join(s.actions)}; "
            f"{len(s.user_features)} user features; {len(s.dense_features)} dense features"),
        ]
        for part in PARTS:
            c = self.counts(part, max_candidates)
            rates = ", ".join(f"{t} {r:.4f}" for t, r in c["base_rates"].items())
            lines.append(
                f"  {part}: {c['rows']:,} rows, {c['candidates']:,} candidates, {c['users']:,} users, "
                f"{c['empty_history_rows']:,} rows with empty history; base rates: {rates}"
                + ("" if "domain_candidates" not in c else "; candidates per domain: "
                   + ", ".join(f"{d} {n:,}" for d, n in c["domain_candidates"].items()))
            )
        if self.train_until is not None:
            lines.append(f"training rows restricted to those starting before {self.train_until} (unix seconds)")
        if self.only_domain is not None:
            lines.append(f"only domain {self.only_domain!r}: the other domains' candidates are dropped from every row")
        lines += [f"note: {n}" for n in self.schema.notes]
        return "\n".join(lines)


def _check_events(events: pd.DataFrame, tasks: Sequence[str]) -> None:
    need = ["user", "item", "timestamp", "actions", "candidate"] + [f"task:{t}" for t in tasks]
    missing = [c for c in need if c not in events.columns]
    if missing:
        raise ValueError(f"event table lacks columns {missing}; it has {list(events.columns)}")
    if len(events) == 0:
        raise ValueError("event table is empty")
    for col in ["timestamp", "actions"] + [f"task:{t}" for t in tasks]:
        if not pd.api.types.is_integer_dtype(events[col].dtype) or events[col].isna().any():
            raise ValueError(f"event table column {col!r} must be integers without missing values")
    if (events["timestamp"] < 0).any():
        raise ValueError("event table: timestamps must be non-negative Unix seconds")
    for t in tasks:
        bad = ~events[f"task:{t}"].isin((0, 1))
        if bad.any():
            raise ValueError(f"event table column 'task:{t}' must be 0/1 (row {int(np.flatnonzero(bad)[0])})")


def _sample_users(events: pd.DataFrame, max_users: int, seed: int, notes: list[str]) -> pd.DataFrame:
    """The events of ``max_users`` users drawn uniformly without replacement (see ``build_ranking_dataset``)."""
    if max_users < 1:
        raise ValueError(f"max_users must be >= 1, got {max_users}")
    users = np.sort(events["user"].astype(str).unique())
    if max_users >= len(users):
        return events
    chosen = np.random.default_rng(seed).choice(users, size=max_users, replace=False)
    kept = events[events["user"].astype(str).isin(set(chosen.tolist()))]
    notes.append(f"a random sample of {max_users:,} of the {len(users):,} users (seed {seed}), all their events: "
                 f"{len(kept):,} of {len(events):,} events")  # fmt: skip
    return kept


def _check_domains(events: pd.DataFrame, domains: tuple[str, ...]) -> np.ndarray | None:
    """The event table's ``domain`` column as int64 [N] (None without domains), checked against ``domains``."""
    if not domains:
        if "domain" in events.columns:
            raise ValueError("event table has a 'domain' column but no domain names were given (domains=...)")
        return None
    if len(set(domains)) != len(domains) or any(not d for d in domains):
        raise ValueError(f"domain names must be distinct and non-empty, got {list(domains)}")
    if "domain" not in events.columns:
        raise ValueError(f"domains {list(domains)} given, but the event table has no 'domain' column")
    col = events["domain"]
    if not pd.api.types.is_integer_dtype(col.dtype) or col.isna().any():
        raise ValueError("event table column 'domain' must be integers without missing values")
    values = col.to_numpy(dtype=np.int64)
    bad = (values < 0) | (values > len(domains))
    if bad.any():
        raise ValueError(f"event table column 'domain': value {int(values[bad][0])} (row {int(np.flatnonzero(bad)[0])})"
                         f" is not in 0..{len(domains)} for the domains {list(domains)}")  # fmt: skip
    return values


def build_ranking_dataset(
    events: pd.DataFrame,
    *,
    name: str,
    tasks: Sequence[str],
    actions: Sequence[str],
    split: str = "global-time",
    n_eval: int = 10,
    min_events: int | None = None,
    time_cuts: tuple[int, int] | None = None,
    quantiles: tuple[float, float] = (0.8, 0.9),
    labels_from_later_events: bool = False,
    label_window_s: int | None = None,
    max_candidates: int = 10,
    user_features: pd.DataFrame | None = None,
    user_feature_sizes: Sequence[int] = (),
    item_dense: pd.DataFrame | None = None,
    smoothing: float = 10.0,
    tz_offset_s: int = 0,
    notes: Sequence[str] = (),
    domains: Sequence[str] = (),
    max_users: int | None = None,
    user_sample_seed: int = 0,
) -> RankingDataset:
    """Sort, split, label and index an event table (see the module docstring for every rule).

    ``user_features``: indexed by external user id, one integer column per feature with ids 1..size (0 = unknown),
    sizes in ``user_feature_sizes``; users missing from it get 0. ``item_dense``: indexed by external item id, float
    columns appended to the dense features (items missing from it get 0). ``max_candidates`` is the default C of
    :meth:`RankingDataset.rows` / :meth:`RankingDataset.batches`. ``domains``: the names of the domain ids in the
    event table's ``domain`` column (id k names ``domains[k - 1]``, 0 = unknown); empty = no domains.
    ``max_users``: keep only a uniform random sample of this many users (all their events), drawn with
    ``user_sample_seed`` from the distinct user ids in sorted order, before anything else (a smaller dataset for
    quick benchmarks; the note says so); None or at least the number of users keeps everyone.
    """
    tasks, actions, notes, domains = tuple(tasks), tuple(actions), list(notes), tuple(str(d) for d in domains)
    _check_events(events, tasks)
    if max_users is not None:
        events = _sample_users(events, int(max_users), int(user_sample_seed), notes)
    ev_domain_raw = _check_domains(events, domains)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n_eval < 1 or max_candidates < 1:
        raise ValueError("n_eval and max_candidates must be >= 1")

    user_map, u = _id_codes(events["user"])
    item_map, it = _id_codes(events["item"])
    t = events["timestamp"].to_numpy(dtype=np.int64)
    tie = events["order"].to_numpy(dtype=np.int64) if "order" in events.columns else np.zeros(len(t), np.int64)
    order = np.lexsort((np.arange(len(t)), tie, t, u))  # stable: equal times keep file order
    u, it, t = u[order], it[order], t[order]
    acts = events["actions"].to_numpy(dtype=np.int64)[order]
    ev_domain = None if ev_domain_raw is None else ev_domain_raw[order]
    cand = events["candidate"].to_numpy(dtype=bool)[order]
    task_ev = np.stack([events[f"task:{x}"].to_numpy(dtype=np.int64)[order] for x in tasks], axis=1)  # [N, T]
    N, U, I = len(t), len(user_map), len(item_map)
    offsets = np.searchsorted(u, np.arange(U + 2), side="left").astype(np.int64)

    # ---------------------------------------------------------------- split parts
    part = np.zeros(N, dtype=np.int8)
    cuts: tuple[int, int] | None = None
    if split == "user-last":
        if labels_from_later_events or not cand.all():
            raise ValueError(
                f"{name}: the 'user-last' split needs every event to be a candidate with its own labels; "
                "use split='global-time'"
            )
        min_events = 2 * n_eval + 1 if min_events is None else int(min_events)
        if min_events < 2 * n_eval + 1:
            raise ValueError(f"min_events must be >= 2 * n_eval + 1 = {2 * n_eval + 1}")
        n_user = np.diff(offsets)[u]  # events of the event's user
        from_end = offsets[u + 1] - 1 - np.arange(N)  # 0 for the user's last event
        eligible = n_user >= min_events
        part[eligible & (from_end < 2 * n_eval)] = 1
        part[eligible & (from_end < n_eval)] = 2
        n_short = int((np.diff(offsets)[1:] < min_events).sum())
        notes.append(
            f"split 'user-last': per user (time order, ties in file order) the last {n_eval} events are test "
            f"candidates, the {n_eval} before them validation candidates, all earlier ones training; "
            f"{n_short:,} users with fewer than {min_events} events have training events only"
        )
    else:
        if time_cuts is None:
            q1, q2 = quantiles
            if not 0.0 < q1 < q2 < 1.0:
                raise ValueError(f"quantiles must satisfy 0 < q_valid < q_test < 1, got {quantiles}")
            cuts = (int(np.quantile(t, q1, method="higher")), int(np.quantile(t, q2, method="higher")))
            how = f"the {q1:g} and {q2:g} quantiles of all {N:,} event timestamps"
        else:
            cuts = (int(time_cuts[0]), int(time_cuts[1]))
            how = "given"
        if not cuts[0] < cuts[1]:
            raise ValueError(f"{name}: time cuts must satisfy T_valid < T_test, got {cuts}")
        part[t >= cuts[0]] = 1
        part[t >= cuts[1]] = 2
        notes.append(
            f"split 'global-time': training events have time < T_valid={cuts[0]}, validation events "
            f"T_valid <= time < T_test={cuts[1]}, test events time >= T_test ({how})"
        )

    # ---------------------------------------------------------------- labels
    if labels_from_later_events:
        labels = _later_event_labels(u, it, t, cand, task_ev, part, cuts, label_window_s)
    else:
        labels = (task_ev * cand[:, None]).astype(np.float32)

    # ---------------------------------------------------------------- causal training statistics
    tmin = int(t.min())
    M = int(t.max()) - tmin + 2
    if max(U, I) + 2 >= (2**62) // M:
        raise ValueError(f"{name}: time span too long to index ({M} s)")
    train = part == 0
    imp = (train & cand).astype(np.float64)
    tsk = (task_ev * train[:, None]).astype(np.float64)
    rel = t - tmin

    def cum(x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x) + 1,) + x.shape[1:], dtype=np.float64)
        np.cumsum(x, axis=0, out=out[1:])
        return out

    tr = np.flatnonzero(train)
    i_order = tr[np.lexsort((rel[tr], it[tr]))]
    g_order = tr[np.argsort(t[tr], kind="stable")]
    stats = {
        "M": M,
        "tmin": tmin,
        "user_key": u * M + rel,  # all events, sorted (history lookup)
        "u_key": u[tr] * M + rel[tr],  # training events, sorted by (user, time)
        "u_imp": cum(imp[tr]),
        "u_task": cum(tsk[tr]),
        "i_key": it[i_order] * M + rel[i_order],
        "i_imp": cum(imp[i_order]),
        "i_task": cum(tsk[i_order]),
        "g_time": t[g_order],
        "g_imp": cum(imp[g_order]),
        "g_task": cum(tsk[g_order]),
    }

    # ---------------------------------------------------------------- side tables
    F = len(user_feature_sizes)
    uf_table = np.zeros((U + 1, F), dtype=np.int64)
    uf_names: tuple[str, ...] = ()
    if user_features is not None:
        uf_names = tuple(str(c) for c in user_features.columns)
        if len(uf_names) != F:
            raise ValueError("user_features must have one column per entry of user_feature_sizes")
        idx = user_map.to_internal(user_features.index.astype(str))
        vals = user_features.to_numpy(dtype=np.int64)
        if (vals < 0).any() or (vals > np.asarray(user_feature_sizes)[None, :]).any():
            raise ValueError("user feature ids must lie in 0..size")
        uf_table[idx[idx > 0]] = vals[idx > 0]
    elif F:
        raise ValueError("user_feature_sizes given without user_features")
    extra_names: tuple[str, ...] = ()
    item_table = np.zeros((I + 1, 0), dtype=np.float32)
    if item_dense is not None:
        extra_names = tuple(str(c) for c in item_dense.columns)
        item_table = np.zeros((I + 1, len(extra_names)), dtype=np.float32)
        idx = item_map.to_internal(item_dense.index.astype(str))
        item_table[idx[idx > 0]] = item_dense.to_numpy(dtype=np.float32)[idx > 0]
    dense_names = (
        ("user_count_log",)
        + tuple(f"user_rate:{x}" for x in tasks)
        + ("item_count_log",)
        + tuple(f"item_rate:{x}" for x in tasks)
        + ("recency_log_s", "hour_sin", "hour_cos")
        + extra_names
    )
    notes.append(
        "dense features use training-part events strictly before each row's earliest candidate only "
        f"(rates smoothed towards the global training rate with strength {smoothing:g}); hour of day at UTC"
        + (f"{tz_offset_s / 3600:+g} h" if tz_offset_s else "")
    )
    notes.append(
        "a row's history holds the user's events strictly earlier in time than its earliest candidate; "
        "events in the same second are left out whatever their file order"
    )
    schema = RankingSchema(
        num_items=I,
        num_users=U,
        tasks=tasks,
        actions=actions,
        user_features=uf_names,
        user_feature_sizes=tuple(int(x) for x in user_feature_sizes),
        dense_features=dense_names,
        domains=domains,
        notes=tuple(notes),
    )
    return RankingDataset(
        name=name,
        schema=schema,
        split=split,
        user_map=user_map,
        item_map=item_map,
        user_offsets=offsets,
        ev_user=u,
        ev_item=it,
        ev_time=t,
        ev_actions=acts,
        ev_candidate=cand,
        ev_part=part,
        ev_labels=labels,
        hist_labels_available=not labels_from_later_events,
        time_cuts=cuts,
        user_feature_table=uf_table,
        item_dense_table=item_table,
        smoothing=float(smoothing),
        tz_offset_s=int(tz_offset_s),
        default_max_candidates=int(max_candidates),
        notes=notes,
        ev_domain=ev_domain,
        _stats=stats,
    )


def _later_event_labels(
    u: np.ndarray,
    it: np.ndarray,
    t: np.ndarray,
    cand: np.ndarray,
    task_ev: np.ndarray,
    part: np.ndarray,
    cuts: tuple[int, int] | None,
    window: int | None,
) -> np.ndarray:
    """[N, T] labels: candidate i has task k when the same (user, item) has a task-k event at a time in
    ``[t_i, end of i's part)`` (and ``< t_i + window`` when given); 0 for non-candidates."""
    assert cuts is not None
    N, T = task_ev.shape
    pair = pd.factorize(pd.MultiIndex.from_arrays([u, it]))[0].astype(np.int64)
    tmin = int(t.min())
    M = int(t.max()) - tmin + 2
    key = pair * M + (t - tmin)
    end = np.where(part == 0, cuts[0], np.where(part == 1, cuts[1], np.iinfo(np.int64).max))
    if window is not None:
        end = np.minimum(end, t + int(window))
    labels = np.zeros((N, T), dtype=np.float32)
    ci = np.flatnonzero(cand)
    for k in range(T):
        ev = np.flatnonzero(task_ev[:, k] == 1)
        ev = ev[np.argsort(key[ev], kind="stable")]
        ek = key[ev]
        j = np.searchsorted(ek, key[ci], side="left")  # first task-k event of the pair at time >= t_i
        ok = j < len(ev)
        jj = np.where(ok, j, 0)
        hit = ok & (pair[ev[jj]] == pair[ci]) & (t[ev[jj]] < end[ci]) if len(ev) else np.zeros(len(ci), bool)
        labels[ci, k] = hit
    return labels
