"""The Python API, in the scikit-learn shape: raw external ids in, raw external ids out.

    rec = Recommender(model={"name": "hstu", "embedding_dim": 50}, train={"epochs": 50}).fit(interactions)
    items, scores = rec.recommend(["1193", "661", "914"], k=10)          # one history
    items, scores = rec.recommend([["1193", "661"], ["2355"]], k=10)     # a batch: lists of lists
    scores = rec.rank([("1193", 978300760), ("661", 978302109)], candidates=["914", "3408"])
    rec.save("runs/mine")
    rec = Recommender.load("runs/ml-1m/hstu")                            # any run directory of `genrec train`

Histories
    A history is a list of events, oldest first. An event is a raw item id (``str`` or ``int``), an ``(item, ts)``
    tuple or a ``{"item": ..., "ts": ...}`` dict; ``ts`` is an integer timestamp (the unit of the training data) or
    None. A list whose elements are all lists is a batch of histories. When every known event of a history has a
    timestamp, the events are put in time order (stable, as in training) and HSTU's time term is on; otherwise the
    given order is kept and the time term is off for that history. The request time (``query_time``) defaults to
    the last event's timestamp.

    Unknown item ids are ignored and reported (``Recommendation.unknown``; ``recommend`` / ``rank`` also issue an
    ``UnknownItemWarning``). Histories longer than the model's ``max_len`` keep their most recent ``max_len`` known
    items. A history with no known item (a brand-new user) gets the popularity fallback: items ranked by their
    number of interactions in the training data (``popularity.json``), marked ``fallback="popularity"``.

Scores
    ``recommend`` and ``rank`` return the retrieval score: the dot product of the L2-normalised user vector (the
    encoder's last position) and the L2-normalised item vector, in [-1, 1]; fallback scores are interaction
    shares in [0, 1]. The retrieval model has one task (next item), so ``rank`` returns one score per candidate;
    per-task scores come with a ranking model. ``exclude_seen`` removes every known item of the whole history
    (not only of the last ``max_len``, unlike the offline protocol, which mirrors the reference).

Saved directory (``save`` / ``load``; the same files ``genrec train`` writes, so a run directory loads as is)
    config.yaml, item_ids.json, titles.json (when known), best.safetensors, popularity.json (item -> count).
    Loading reads only these with YAML ``safe_load``, JSON and safetensors: no pickle, no code execution; it never
    writes to the directory. A run directory without ``popularity.json`` loads; its empty histories are then an
    ``InvalidInputError`` (the fallback is unavailable).

Thread safety: inference runs under ``torch.inference_mode()`` and reads only state fixed at ``fit`` / ``load``
time, so one fitted Recommender may serve many threads. (The HTTP service runs the model on its event loop by
default; ``genrec serve --model-thread`` moves it to a worker thread.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from genrec.config import RunConfig, load_config, save_config
from genrec.data.batches import history_batch
from genrec.data.popularity import (
    POPULARITY_FILE,
    popularity_json,
    read_popularity,
    write_popularity,
)
from genrec.data.sequences import load_item_map
from genrec.io import atomic_write
from genrec.models import build_model

ItemId = Union[str, int]
HistoryEvent = Union[ItemId, tuple, Mapping]
History = Sequence[HistoryEvent]

MAX_ABS_TIMESTAMP = 2**53  # timestamps beyond this are rejected (their differences must fit int64 and float32 logs)
ENCODE_ROWS = 256  # histories per forward pass inside one call (bounds memory for large Python batches)
FALLBACK_POPULARITY = "popularity"


class InvalidInputError(ValueError):
    """A history, candidate list or parameter the recommender cannot serve (the service answers 422)."""


class NotFittedError(RuntimeError):
    """The Recommender was used before ``fit`` or ``load``."""


class UnknownItemWarning(UserWarning):
    """Some item ids of a history are not in the model's catalogue and were ignored."""


# ----------------------------------------------------------------------------------------------------------------
# Parsed inputs and results
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedHistory:
    """A validated history in internal ids, ready for the encoder.

    items   [n <= max_len] int64 internal ids of the most recent known events, oldest first (may be empty)
    times   [n] int64 timestamps aligned with ``items``, or None when the time term is off for this history
    query_time  the request time used by the time term (None when ``times`` is None)
    seen    int64 internal ids of every known event (for ``exclude_seen``), before the ``max_len`` cut
    """

    items: np.ndarray
    times: np.ndarray | None
    query_time: int | None
    seen: np.ndarray
    unknown: tuple[str, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class RecommendQuery:
    history: PreparedHistory
    k: int
    exclude: np.ndarray  # distinct internal ids (> 0) never to recommend
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RankQuery:
    history: PreparedHistory
    candidates: tuple[str, ...]  # as given (external)
    candidate_ids: np.ndarray  # internal ids, 0 where unknown
    warnings: tuple[str, ...] = ()


Query = Union[RecommendQuery, RankQuery]


@dataclass(frozen=True)
class Recommendation:
    """Top-k for one history. ``fallback`` is "popularity" when the history had no known item."""

    items: list[str]
    scores: list[float]
    unknown: list[str]
    fallback: str | None
    warnings: list[str]


@dataclass(frozen=True)
class Ranking:
    """Scores of the given candidates, in their order; NaN for candidates unknown to the model."""

    items: list[str]
    scores: list[float]
    unknown: list[str]
    unknown_candidates: list[str]
    fallback: str | None
    warnings: list[str]


Result = Union[Recommendation, Ranking]


# ----------------------------------------------------------------------------------------------------------------
# Input parsing (pure functions)
# ----------------------------------------------------------------------------------------------------------------


def _item_id(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
        raise InvalidInputError(f"item ids must be strings or integers, got {type(value).__name__} {value!r:.60}")
    return str(value)


def _timestamp(value: Any, what: str = "ts") -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{what} must be an integer or null, got {type(value).__name__} {value!r:.60}")
    if abs(int(value)) > MAX_ABS_TIMESTAMP:
        raise InvalidInputError(f"{what} {value} is out of range (|{what}| <= 2**53)")
    return int(value)


def _parse_event(event: Any) -> tuple[str, int | None]:
    if isinstance(event, Mapping):
        extra = sorted(str(k) for k in event if k not in ("item", "ts"))
        if "item" not in event or extra:
            keys = sorted(map(str, event))
            raise InvalidInputError(f"a history event dict has keys 'item' and optionally 'ts', got {keys}")
        return _item_id(event["item"]), _timestamp(event.get("ts"))
    if isinstance(event, tuple):
        if len(event) != 2:
            raise InvalidInputError(f"a history event tuple is (item, ts), got {len(event)} values")
        return _item_id(event[0]), _timestamp(event[1])
    return _item_id(event), None


@dataclass(frozen=True)
class Events:
    """A validated history: raw item ids (str) and their timestamps (int or None), oldest first as given."""

    ids: list[str]
    ts: list[int | None]


def parse_events(history: Any) -> Events:
    """Validate a history of events (raw ids, (item, ts) tuples or {"item", "ts"} dicts); raises InvalidInputError."""
    pairs = [_parse_event(e) for e in _as_history_list(history)]
    return Events([item for item, _ in pairs], [t for _, t in pairs])


def is_batch(histories: Any) -> bool:
    """A batch is a non-empty list (or 2-d array) whose elements are all lists / 1-d arrays (the histories)."""
    if isinstance(histories, np.ndarray):
        return histories.ndim == 2
    return (
        isinstance(histories, list)
        and len(histories) > 0
        and all(isinstance(h, (list, np.ndarray)) for h in histories)
    )


def _as_history_list(history: Any) -> list:
    if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, (Sequence, np.ndarray)):
        raise InvalidInputError(f"a history is a list of events, got {type(history).__name__}")
    return list(history)


def _id_list(values: Any, what: str) -> list[str]:
    if values is None:
        return []
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (Sequence, np.ndarray, set, frozenset)):
        raise InvalidInputError(f"{what} must be a list of item ids, got {type(values).__name__}")
    return [_item_id(v) for v in values]


def _check_k(k: Any) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k must be an integer >= 1, got {k!r:.60}")
    return int(k)


# ----------------------------------------------------------------------------------------------------------------
# The Recommender
# ----------------------------------------------------------------------------------------------------------------


class Recommender:
    """A sequence recommender on raw item ids (scikit-learn shape: parameters in ``__init__``, learned state with a
    trailing underscore after ``fit`` or ``load``).

    Args:
        config: the run configuration. Default ``RunConfig()`` (see :mod:`genrec.config`): dataset ``ml-1m``, HSTU
            with 2 blocks of width 50 and a 200-item history, trained with 128 sampled negatives shared per sequence
            (``train.negatives="per_sequence"``; the shipped configs use ``"per_position"``), selected and
            evaluated with full-catalogue leave-one-out. The files under ``configs/`` hold tuned settings.
        **overrides: per-section changes merged into ``config``: ``model={"embedding_dim": 64}``,
            ``train={"epochs": 20}``, ``data={"max_len": 50}``, ``eval={...}``, ``output_dir="runs/x"``. Unknown
            sections, keys and wrongly typed values raise ``ConfigError`` here, before any training.

    Learned attributes: ``config_`` (the resolved RunConfig), ``model_`` (the encoder, eval mode), ``item_map_``,
    ``titles_`` (dict or None), ``popularity_`` (counts per internal id, or None), ``model_id_`` (a hash of the
    weights), ``results_`` (the training results dict, after ``fit``).
    """

    def __init__(self, config: RunConfig | None = None, **overrides: Any) -> None:
        self.config = config
        self.overrides = dict(overrides)
        self.resolved_config()  # fail early on a bad override

    # -- configuration ---------------------------------------------------------------------------------------------

    def resolved_config(self) -> RunConfig:
        """``config`` with ``overrides`` applied and validated."""
        return with_overrides(self.config or RunConfig(), self.overrides, where="Recommender")

    # -- fit / save / load -----------------------------------------------------------------------------------------

    def fit(
        self,
        interactions: Any,
        output_dir: str | Path | None = None,
        *,
        columns: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        progress: bool = False,
    ) -> "Recommender":
        """Train on ``interactions`` and keep the best-validation weights (the usual leave-one-out selection).

        Args:
            interactions: a pandas DataFrame (one row per interaction) or a ``genrec.data.dataset.PreparedData``.
                Without a timestamp, row order is time order. Timestamps may be integer Unix seconds or
                ``datetime64`` values (any unit, naive = UTC, or timezone-aware); they are stored as Unix seconds,
                the unit ``recommend`` / ``rank`` then take. Exact duplicate (user, item, timestamp) rows are
                dropped and counted in the data notes.
            output_dir: where the run directory goes (checkpoint, logs, results, popularity). None: a temporary
                directory, removed afterwards (call ``save`` to keep the model).
            columns: which DataFrame column plays which role, like ``data.columns`` of a config:
                ``{"user": "uid", "item": "movie", "timestamp": "ts"}``. Roles left out default to the columns
                named ``user``, ``item`` and ``timestamp``; ``"timestamp": None`` trains without time. An unknown
                role, a column that does not exist or that appears twice, and a time-like column (datetime dtype or
                a name such as ``ts``, ``time``, ``date``) that no role uses raise ``ValueError`` before training.
                Missing ids or timestamps raise ``BadRowError`` naming the row.
            overwrite: replace a run that ``output_dir`` already holds (otherwise such a directory is refused with
                ``FileExistsError``, so two runs never mix their files).
            progress: show tqdm progress bars.
        """
        from genrec.train.loop import train

        config = self.resolved_config()
        data, config = _prepared_data(interactions, config, columns)
        if output_dir is None:
            context: Any = tempfile.TemporaryDirectory(prefix="genrec-fit-")
        else:
            context = contextlib.nullcontext(str(output_dir))
        with context as run_dir:
            config = dataclasses.replace(config, output_dir=str(run_dir))
            results = train(config, data=data, overwrite=overwrite, progress=progress)
            write_popularity(data.sequences, run_dir)
            self._load_state(Path(run_dir))
        self.results_ = results
        return self

    @classmethod
    def load(cls, directory: str | Path, *, data_dir: str | None = None) -> "Recommender":
        """A fitted Recommender from a directory written by ``save`` or ``genrec train`` (read-only, no code run).

        ``data_dir`` overrides ``data.data_dir`` (only ``evaluate`` needs the data)."""
        directory = Path(directory)
        for name in ("config.yaml", "item_ids.json", "best.safetensors"):
            if not (directory / name).exists():
                raise FileNotFoundError(
                    f"{directory / name} not found: is {directory} a run directory written by `genrec train`?"
                )
        overrides = [f"data.data_dir={data_dir}"] if data_dir else []
        rec = cls(load_config(directory / "config.yaml", overrides))
        rec._load_state(directory, overrides)
        return rec

    def _load_state(self, directory: Path, overrides: Sequence[str] = ()) -> None:
        config = load_config(directory / "config.yaml", list(overrides))
        item_map = load_item_map(directory)
        model = build_model(config.model, len(item_map), config.data.max_len)
        weights_path = directory / "best.safetensors"
        weights = weights_path.read_bytes()
        try:
            from safetensors.torch import load as load_safetensors

            model.load_state_dict(load_safetensors(weights))
        except Exception as exc:  # safetensors header errors, shape mismatches
            raise ValueError(f"{weights_path}: cannot load the weights into the configured model ({exc})") from exc
        titles = None
        if (directory / "titles.json").exists():
            titles = json.loads((directory / "titles.json").read_text(encoding="utf-8"))
        self.config_ = config
        self.item_map_ = item_map
        self.model_ = model.eval()
        self.titles_ = titles if isinstance(titles, dict) else None
        self.popularity_ = read_popularity(directory, item_map)
        self._popular_order: list[int] = []
        self._popular_share = np.zeros(len(item_map) + 1)
        if self.popularity_ is not None:
            self._popular_order = (np.argsort(-self.popularity_[1:], kind="stable") + 1).tolist()  # ties: id order
            self._popular_share = self.popularity_ / max(int(self.popularity_.sum()), 1)
        self.model_id_ = f"{config.model.name}-{hashlib.sha256(weights).hexdigest()[:12]}"
        with torch.inference_mode():
            self.item_vectors_ = self.model_.item_vectors().float().contiguous()  # [num_items + 1, d]

    def save(self, directory: str | Path) -> Path:
        """Write the fitted model as a loadable directory: config.yaml, item_ids.json, titles.json (when known),
        best.safetensors and popularity.json (when known).

        A new directory is written under a temporary name and renamed into place (all or nothing). An existing
        genrec directory (e.g. the run directory of ``fit``) gets each file replaced atomically. Any other existing,
        non-empty directory is refused."""
        self.check_fitted()
        target = Path(directory)
        writers = self._file_writers(target)
        if target.exists():
            if any(target.iterdir()) and not (target / "item_ids.json").exists():
                raise FileExistsError(f"{target} exists and is not a genrec model directory; refusing to write into it")
            for name, write in writers.items():
                atomic_write(target / name, write)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is an ordinary one
            for name, write in writers.items():
                write(str(tmp / name))
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def _file_writers(self, target: Path) -> dict[str, Callable[[str], None]]:
        from safetensors.torch import save_file

        config = dataclasses.replace(self.config_, output_dir=str(target))
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.model_.state_dict().items()}

        def json_writer(obj: Any) -> Callable[[str], None]:
            return lambda path: Path(path).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

        writers: dict[str, Callable[[str], None]] = {
            "config.yaml": lambda path: save_config(config, path),
            "item_ids.json": json_writer(self.item_map_.to_json()),
            "best.safetensors": lambda path: save_file(tensors, path),
        }
        if self.titles_:
            writers["titles.json"] = json_writer(self.titles_)
        if self.popularity_ is not None:
            writers[POPULARITY_FILE] = json_writer(popularity_json(self.popularity_, self.item_map_))
        return writers

    def check_fitted(self) -> None:
        """Raise ``NotFittedError`` unless ``fit`` or ``load`` has run."""
        if not hasattr(self, "model_"):
            raise NotFittedError("this Recommender is not fitted: call fit() or use Recommender.load(dir)")

    # -- the simple API --------------------------------------------------------------------------------------------

    def recommend(
        self,
        history: Any,
        k: int = 10,
        exclude_seen: bool = True,
        *,
        exclude: Sequence[ItemId] | None = None,
        query_time: int | Sequence[int | None] | None = None,
    ) -> tuple[list, list]:
        """Top-k ``(item_ids, scores)`` after ``history``; for a batch of histories, ``(list of lists, list of
        lists)``. ``exclude`` lists item ids never to recommend; ``query_time`` is the request time (per history
        for a batch). Unknown ids are ignored with an ``UnknownItemWarning``; see the module docstring."""
        batch = is_batch(history)
        histories = list(history) if batch else [history]
        results = self.recommend_batch(histories, k, exclude_seen, exclude=exclude, query_time=query_time)
        _warn_unknown(results)
        if batch:
            return [r.items for r in results], [r.scores for r in results]
        return results[0].items, results[0].scores

    def rank(
        self, history: Any, candidates: Sequence[ItemId], *, query_time: int | Sequence[int | None] | None = None
    ) -> list:
        """Scores of ``candidates`` (in their order; NaN for unknown ids) after ``history``. For a batch of
        histories, ``candidates`` is a list of candidate lists, one per history, and a list of score lists comes
        back. The retrieval model has one task (next item); per-task scores come with a ranking model."""
        batch = is_batch(history)
        histories = list(history) if batch else [history]
        if batch:
            if not isinstance(candidates, list) or len(candidates) != len(histories):
                raise InvalidInputError("for a batch of histories, candidates must be one list per history")
            cand_lists = candidates
        else:
            cand_lists = [candidates]
        results = self.rank_batch(histories, cand_lists, query_time=query_time)
        _warn_unknown(results)
        return [r.scores for r in results] if batch else results[0].scores

    # -- the detailed API (what the service uses) ------------------------------------------------------------------

    def recommend_batch(
        self,
        histories: Sequence[Any],
        k: int = 10,
        exclude_seen: bool = True,
        *,
        exclude: Sequence[ItemId] | None = None,
        query_time: int | Sequence[int | None] | None = None,
    ) -> list[Recommendation]:
        """One ``Recommendation`` (items, scores, unknown ids, fallback, warnings) per history, one forward pass."""
        times = _per_history(query_time, len(histories))
        queries = [
            self.prepare_recommend(h, k, exclude_seen, exclude=exclude, query_time=t) for h, t in zip(histories, times)
        ]
        return self.execute(queries)  # type: ignore[return-value]

    def rank_batch(
        self,
        histories: Sequence[Any],
        candidates: Sequence[Sequence[ItemId]],
        *,
        query_time: int | Sequence[int | None] | None = None,
    ) -> list[Ranking]:
        """One ``Ranking`` per (history, candidate list), one forward pass."""
        if len(candidates) != len(histories):
            raise InvalidInputError(f"{len(histories)} histories but {len(candidates)} candidate lists")
        times = _per_history(query_time, len(histories))
        queries = [self.prepare_rank(h, c, query_time=t) for h, c, t in zip(histories, candidates, times)]
        return self.execute(queries)  # type: ignore[return-value]

    def prepare_history(self, history: Any, query_time: int | None = None) -> PreparedHistory:
        """Validate and map one history (raises ``InvalidInputError``); see the module docstring for the rules.
        ``history`` may also be an already validated ``Events``."""
        self.check_fitted()
        events = history if isinstance(history, Events) else parse_events(history)
        query_time = _timestamp(query_time, "query_time")
        internal = self.item_map_.to_internal(events.ids)
        known = internal > 0
        ts = events.ts
        notes: list[str] = []
        unknown: tuple[str, ...] = ()
        if not known.all():
            unknown = tuple(dict.fromkeys(i for i, ok in zip(events.ids, known) if not ok))
            ts = [t for t, ok in zip(ts, known) if ok]
            internal = internal[known]
            shown = ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            notes.append(f"ignored {len(unknown)} unknown item id(s): {shown}")
        timed = len(ts) > 0 and None not in ts
        if not timed and any(t is not None for t in ts):
            notes.append("some events have no timestamp: the time term is off for this history")
        times = None
        if timed:
            times = np.asarray(ts, dtype=np.int64)
            order = np.argsort(times, kind="stable")
            internal, times = internal[order], times[order]
        max_len = self.config_.data.max_len
        if len(internal) > max_len:
            notes.append(f"history has {len(internal)} known items; the most recent {max_len} are used")
        items = internal[-max_len:]
        if times is not None:
            times = times[-max_len:]
            query_time = int(times[-1]) if query_time is None else query_time
        else:
            query_time = None
        return PreparedHistory(items, times, query_time, np.unique(internal), unknown, tuple(notes))

    def prepare_recommend(
        self,
        history: Any,
        k: int = 10,
        exclude_seen: bool = True,
        *,
        exclude: Sequence[ItemId] | None = None,
        query_time: int | None = None,
    ) -> RecommendQuery:
        """Validate a recommend request (raises ``InvalidInputError``) without running the model."""
        k = _check_k(k)
        if not isinstance(exclude_seen, (bool, np.bool_)):
            raise InvalidInputError(f"exclude_seen must be true or false, got {exclude_seen!r:.60}")
        prepared = self.prepare_history(history, query_time)
        self._check_servable(prepared)
        extra = _id_list(exclude, "exclude")
        extra_internal = self.item_map_.to_internal(extra)
        masked = [extra_internal[extra_internal > 0]]
        if exclude_seen:
            masked.append(prepared.seen)
        notes = ()
        if (extra_internal == 0).any():
            notes = (f"ignored {int((extra_internal == 0).sum())} unknown id(s) in exclude",)
        return RecommendQuery(prepared, k, np.unique(np.concatenate(masked)), notes)

    def prepare_rank(self, history: Any, candidates: Sequence[ItemId], *, query_time: int | None = None) -> RankQuery:
        """Validate a rank request (raises ``InvalidInputError``) without running the model."""
        cands = _id_list(candidates, "candidates")
        prepared = self.prepare_history(history, query_time)
        self._check_servable(prepared)
        return RankQuery(prepared, tuple(cands), self.item_map_.to_internal(cands))

    def _check_servable(self, prepared: PreparedHistory) -> None:
        if len(prepared.items) == 0 and self.popularity_ is None:
            raise InvalidInputError(
                "the history has no item known to the model, and this model directory has no popularity.json for "
                "the fallback (re-save the model with Recommender.save, or train with a genrec that writes it)"
            )

    def execute(self, queries: Sequence[Query]) -> list[Result]:
        """Answer prepared queries: one encoder pass over every history that has a known item, one score matrix
        and one top-k for all recommend queries among them."""
        self.check_fitted()
        with torch.inference_mode():
            model_rows = [i for i, q in enumerate(queries) if len(q.history.items) > 0]
            users = self._user_vectors([queries[i].history for i in model_rows])
            row_of = {query_index: row for row, query_index in enumerate(model_rows)}
            ranked = [i for i in model_rows if isinstance(queries[i], RecommendQuery)]
            tops = self._model_top_k([queries[i] for i in ranked], users[[row_of[i] for i in ranked]])  # type: ignore
            top_of = dict(zip(ranked, tops))
            results: list[Result] = []
            for i, q in enumerate(queries):
                if isinstance(q, RecommendQuery):
                    ids, scores = top_of[i] if i in top_of else self._popular_top_k(q)
                    results.append(self._recommendation(q, ids, scores, fallback=i not in top_of))
                else:
                    results.append(self._rank_one(q, users[row_of[i]] if i in row_of else None))
        return results

    # -- inference internals ---------------------------------------------------------------------------------------

    def _user_vectors(self, histories: list[PreparedHistory]) -> torch.Tensor:
        """[len(histories), d] user vectors (encoder output at each history's last position)."""
        out = torch.empty(len(histories), self.item_vectors_.shape[1])
        order = np.argsort([len(h.items) for h in histories], kind="stable")  # similar lengths share a batch
        for lo in range(0, len(order), ENCODE_ROWS):
            rows = order[lo : lo + ENCODE_ROWS]
            hs = [histories[r] for r in rows]
            has_time = [h.times is not None for h in hs]
            batch = history_batch(
                [h.items for h in hs],
                [h.times if h.times is not None else np.zeros(len(h.items), np.int64) for h in hs],
                [h.query_time if h.query_time is not None else 0 for h in hs],
                has_time,
                self.config_.data.max_len,
            )
            out[torch.as_tensor(rows)] = self.model_.encode_last(batch).float()  # [B, d]
        return out

    def _model_top_k(self, queries: list[RecommendQuery], users: torch.Tensor) -> list[tuple[list[int], list[float]]]:
        """(internal ids, scores) of each query's top-k: users [B, d] against every item, excluded items masked."""
        if not queries:
            return []
        num_items = len(self.item_map_)
        scores = users @ self.item_vectors_.T  # [B, num_items + 1]
        scores[:, 0] = float("-inf")
        counts = [len(q.exclude) for q in queries]
        if sum(counts):
            rows = torch.from_numpy(np.repeat(np.arange(len(queries)), counts))
            scores[rows, torch.from_numpy(np.concatenate([q.exclude for q in queries]))] = float("-inf")
        values, indices = torch.topk(scores, min(max(q.k for q in queries), num_items), dim=1)
        values_l, indices_l = values.tolist(), indices.tolist()
        takes = [max(0, min(q.k, num_items - n)) for q, n in zip(queries, counts)]  # exclude holds distinct real ids
        return [(indices_l[r][:t], values_l[r][:t]) for r, t in enumerate(takes)]

    def _popular_top_k(self, q: RecommendQuery) -> tuple[list[int], list[float]]:
        """The fallback: the most popular items not excluded, scored by their share of all interactions."""
        excluded = set(q.exclude.tolist())
        picked: list[int] = []
        for item in self._popular_order:
            if len(picked) == q.k:
                break
            if item not in excluded:
                picked.append(item)
        return picked, [float(self._popular_share[i]) for i in picked]

    def _recommendation(self, q: RecommendQuery, ids: list[int], scores: list[float], fallback: bool) -> Recommendation:
        h = q.history
        return Recommendation(
            items=self.item_map_.to_external(ids),
            scores=scores,
            unknown=list(h.unknown),
            fallback=FALLBACK_POPULARITY if fallback else None,
            warnings=list(h.warnings + q.warnings),
        )

    def _rank_one(self, q: RankQuery, user: torch.Tensor | None) -> Ranking:
        ids = torch.as_tensor(q.candidate_ids, dtype=torch.long)
        if user is None:
            values = torch.as_tensor(self._popular_share, dtype=torch.float64)[ids]
        else:
            values = (self.item_vectors_[ids] @ user).double()
        values = torch.where(ids > 0, values, torch.full_like(values, float("nan")))
        unknown_candidates = list(dict.fromkeys(c for c, i in zip(q.candidates, q.candidate_ids) if i == 0))
        notes = list(q.history.warnings + q.warnings)
        if unknown_candidates:
            notes.append(f"{len(unknown_candidates)} unknown candidate id(s) have no score")
        return Ranking(
            items=list(q.candidates),
            scores=values.tolist(),
            unknown=list(q.history.unknown),
            unknown_candidates=unknown_candidates,
            fallback=FALLBACK_POPULARITY if user is None else None,
            warnings=notes,
        )

    # -- offline evaluation ----------------------------------------------------------------------------------------

    def evaluate(
        self, target: str = "test", candidates: str | None = None, num_negatives: int | None = None, users: str = "all"
    ):
        """Re-run the offline protocol on the run's dataset (needs the data files); returns (protocol, metrics)."""
        from genrec.data.dataset import prepare_data
        from genrec.eval.evaluate import evaluate, model_score_fn
        from genrec.eval.protocol import protocol_from_config

        self.check_fitted()
        data = prepare_data(self.config_.data)
        if data.sequences.item_map.external != self.item_map_.external:
            raise ValueError("the dataset's item ids differ from the ones this model was trained on")
        protocol = protocol_from_config(self.config_, target)
        changes = {"candidates": candidates, "num_negatives": num_negatives, "users": users}
        protocol = dataclasses.replace(protocol, **{k: v for k, v in changes.items() if v is not None})
        score_fn = model_score_fn(self.model_, self.config_.data.max_len)
        metrics = evaluate(score_fn, data.sequences, protocol, self.config_.train.eval_batch_size)
        return protocol, metrics


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def with_overrides(config: Any, overrides: Mapping[str, Any], *, where: str) -> Any:
    """``config`` (a RunConfig or RankingRunConfig) with keyword overrides applied and validated: a mapping value
    updates that section's keys, any other value replaces the section. Raises ConfigError naming ``where``."""
    raw = config.to_dict()
    for section, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **value}
        else:
            raw[section] = value
    return type(config).from_dict(raw, where=where)


def _per_history(query_time: Any, n: int) -> list[int | None]:
    if query_time is None or isinstance(query_time, (int, np.integer)):
        return [query_time] * n
    if isinstance(query_time, Sequence) and not isinstance(query_time, str) and len(query_time) == n:
        return list(query_time)
    raise InvalidInputError(f"query_time must be an integer, None, or one value per history ({n})")


def _warn_unknown(results: Sequence[Result]) -> None:
    unknown = list(dict.fromkeys(u for r in results for u in r.unknown))
    if unknown:
        shown = ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else "")
        warnings.warn(f"ignored {len(unknown)} unknown item id(s): {shown}", UnknownItemWarning, stacklevel=3)


FRAME_ROLES = ("user", "item", "timestamp")
_TIME_LIKE_NAME = re.compile(r"(^|[_\W])(ts|time|times|timestamp|datetime|date|when)([_\W]|$)|_at$", re.IGNORECASE)


def _frame_roles(frame: Any, columns: Mapping[str, Any] | None) -> dict[str, Any]:
    """Role -> column label for ``fit`` on a DataFrame (see ``Recommender.fit``); a timestamp role of None is
    left out."""
    import pandas as pd

    if columns is None:
        columns = {}
    if not isinstance(columns, Mapping):
        raise TypeError(f"columns must be a mapping of role -> column name, got {type(columns).__name__}")
    unknown = [str(k) for k in columns if k not in FRAME_ROLES]
    if unknown:
        raise ValueError(f"columns: unknown role {unknown[0]!r}; the roles are {', '.join(FRAME_ROLES)}")
    roles = {"user": columns.get("user", "user"), "item": columns.get("item", "item")}
    for role in ("user", "item"):
        if roles[role] is None:
            raise ValueError(f"columns: the {role} role needs a column")
    if "timestamp" in columns:
        if columns["timestamp"] is not None:
            roles["timestamp"] = columns["timestamp"]
        return roles
    if "timestamp" in list(frame.columns):
        roles["timestamp"] = "timestamp"
        return roles
    used = set(map(str, roles.values()))
    for label in frame.columns:
        if str(label) in used:
            continue
        dtype = frame[label].dtype if list(frame.columns).count(label) == 1 else None
        if (dtype is not None and pd.api.types.is_datetime64_any_dtype(dtype)) or _TIME_LIKE_NAME.search(str(label)):
            raise ValueError(
                f"interactions: column {label!r} looks like a time column, but no column is used as the timestamp; "
                f"pass columns={{'timestamp': {label!r}, ...}} to use it, or columns={{'timestamp': None, ...}} to "
                "train without time (row order is then time order)"
            )
    return roles


def _prepared_data(interactions: Any, config: RunConfig, columns: Mapping[str, Any] | None = None):
    """(PreparedData, config) for ``fit``: a DataFrame becomes sequences; the config records an in-memory table."""
    import pandas as pd

    from genrec.data.dataset import PreparedData
    from genrec.data.readers import read_frame
    from genrec.data.sequences import build_sequences

    if isinstance(interactions, PreparedData):
        if columns is not None:
            raise ValueError("columns= applies to a DataFrame, not to PreparedData")
        return interactions, config
    if isinstance(interactions, pd.DataFrame):
        roles = _frame_roles(interactions, columns)
        frame = read_frame(interactions, on_bad_rows=config.data.on_bad_rows, **roles)
        notes = []
        if frame.attrs.get("bad_rows"):
            notes.append(f"skipped {frame.attrs['bad_rows']:,} malformed rows (on_bad_rows=skip)")
        seqs = build_sequences(
            frame,
            min_seq_len=config.data.min_seq_len,
            notes=notes,
            duplicates=config.data.duplicates,
            ties=config.data.ties,
            ties_seed=config.data.ties_seed,
        )
        data_cfg = dataclasses.replace(config.data, dataset="table", path=None, columns=dict(roles))
        return PreparedData(seqs, None, []), dataclasses.replace(config, data=data_cfg)
    raise TypeError(f"fit() takes a pandas DataFrame or a PreparedData, got {type(interactions).__name__}")

