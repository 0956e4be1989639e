"""The ranking API on raw ids, in the shape of :mod:`genrec.api`: fit / rank / save / load.

    ranker = Ranker(model={"name": "hstu-ranker"}, train={"epochs": 5}).fit(log, tasks=["click", "like"])
    result = ranker.rank([("i1", 1700000000), {"item": "i7", "ts": 1700000600, "actions": ["click"]}],
                         candidates=["i3", "i9", "i4"])
    result.probs["click"]             # one probability per candidate, in the given order
    result.combined({"click": 1.0, "like": 2.0})
    ranker.save("models/ranker")
    ranker = Ranker.load("runs/ranking/ml-1m-hstu")      # also any run directory of `genrec train-ranker`

Training table (``fit``)
    One row per logged event: user id, item id, integer timestamp (Unix seconds, or datetimes) and one 0/1 column
    per task (e.g. ``click``, ``like``). Every row is a candidate with its own labels; its action bitmask (what a
    history event carries into the model) is the set of its positive task labels, so the schema's actions are the
    tasks. The table is split and turned into rows by :func:`genrec.data.ranking.build_ranking_dataset`
    (``data.split``: ``"global-time"`` by default for a table, or ``"user-last"``) and the model is trained with
    :func:`genrec.train.ranking.train_ranker`, selection on the validation part and one test evaluation.
    Optional ``user_features``: a DataFrame indexed by user id with one categorical column per feature; its raw
    values become ids 1..size (values at ``rank`` time are given raw; an unseen value is unknown, id 0).

History events (``rank``)
    A history is a list of events, oldest first: a raw item id (``str`` or ``int``), an ``(item, ts)`` tuple, or a
    dict ``{"item": id, "ts": int | None, "actions": [names]}`` ("actions": the event's positive task labels,
    i.e. the schema's action names; absent = none). Either every event has a timestamp (the events are then put in
    time order, stable, as in training) or none has (the given order is kept, and every event is taken to be at
    the query time: recency features 0, time gaps 0; a warning says so). Timestamps are non-negative integers and
    never after the query time. ``query_time`` (the impression time of the candidates) defaults to the last
    history timestamp, or 0 when there is none. Unknown item ids are ignored and reported (``RankResult.unknown``);
    the most recent ``data.max_history`` known events are kept.

What the model sees
    One :class:`~genrec.data.ranking_batch.RankingBatch` row per history: user id 0 (a user asked about by history
    is unknown to training), the user features given (0 = unknown), the history, the known candidates at the query
    time, and the dense features computed exactly as the dataset computes them for a user unknown to training
    (training-period statistics before the query time, ``RankingState.features``); a model whose
    ``reads_dense_features`` is False (the HSTU ranker) gets zeros of the same shape instead, never computed. Every
    candidate is scored
    independently of the others (the models' contract; the HSTU ranker's target-aware mask), so a result never
    depends on the other candidates or histories of the call. The HSTU ranker scores a history's candidates with
    M-FALCON: the history is encoded once and the candidates attend to its cached keys and values in micro-batches
    (:meth:`genrec.models.hstu_ranker.HSTURanker.rank_cached`), equal to the one-pass forward. What a candidate's
    scoring computes from its item id alone (its first-layer projection, the head's item side) is computed once
    per item at ``fit`` / ``load`` (``HSTURanker.candidate_tables``, kept when at most ``CANDIDATE_TABLE_BYTES``)
    and read by id; the same values.

Domains (``rank(..., candidate_domains=...)``)
    A model trained on data with domains (``data.domains``; ``Ranker.domains`` names them) takes each candidate's
    domain by name, one per candidate or one for all; it fills ``RankingBatch.cand_domains``. A model with the HSTU
    ranker's domain options (``Ranker.needs_domains``) needs every candidate's domain; otherwise a domain may be
    left out (unknown, id 0). Unknown names are refused with the model's domains listed.

Probabilities
    ``probs[task]``: the sigmoid of the model's logit for every model (the learned rankers and the floors all
    return logits; the popularity floor's are logits of its smoothed rates). NaN for an unknown candidate.

Saved directory (``save`` / ``load``; ``genrec train-ranker`` writes the same files into its run directory)
    config.yaml, best.safetensors, ranking_state.json, ranking_item_ids.json, ranking_features.npz
    (:class:`genrec.train.ranking.RankingState`). Loading reads only YAML (safe_load), JSON, safetensors and a
    pickle-free ``.npz``: no code runs; it never writes to the directory.

Thread safety: inference runs under ``torch.inference_mode()`` and reads only state fixed at ``fit`` / ``load``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from itertools import chain, repeat
from operator import itemgetter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrec.api import (
    MAX_ABS_TIMESTAMP,
    InvalidInputError,
    NotFittedError,
    _as_history_list,
    _id_list,
    _item_id,
    _per_history,
    _timestamp,
    _warn_unknown,
    with_overrides,
)
from genrec.config import RankingRunConfig, load_ranking_config, save_config
from genrec.data.ranking_batch import RankingBatch
from genrec.models.hstu_ranker import HSTURanker
from genrec.train.ranking import RANKING_STATE_FILES, RankingState, build_run_model

__all__ = ["RankQuery", "RankResult", "Ranker"]

RANK_ROWS = 64  # histories per model pass inside one call (bounds memory for large batches)
CANDIDATE_MICROBATCH = 256  # candidates per M-FALCON micro-batch (HSTU ranker)
CANDIDATE_TABLE_BYTES = 256 << 20  # the HSTU ranker's per-item candidate tables are kept up to this size
TABLE_DATASET = "table"  # data.dataset of a Ranker fitted on a user's table
ROLES = ("user", "item", "timestamp")


# ----------------------------------------------------------------------------------------------------------------
# Results and prepared queries
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankResult:
    """Per-task probabilities of the given candidates, in their order; NaN for candidates unknown to the model."""

    items: list[str]
    probs: dict[str, list[float]]
    unknown: list[str]
    unknown_candidates: list[str]
    warnings: list[str]

    def combined(self, weights: Mapping[str, float] | None = None) -> list[float]:
        """Σ_t weights[t] · probs[t] per candidate (default: weight 1 for every task; tasks left out of ``weights``
        weigh 0); NaN for unknown candidates. A weight for an unknown task, or one that is not a finite number,
        raises ``InvalidInputError``."""
        if weights is None:
            weights = {t: 1.0 for t in self.probs}
        if not isinstance(weights, Mapping):
            raise InvalidInputError(f"weights must map task names to numbers, got {type(weights).__name__}")
        unknown = [str(t) for t in weights if t not in self.probs]
        if unknown:
            raise InvalidInputError(f"weights: unknown task {unknown[0]!r}; the tasks are {list(self.probs)}")
        total = np.zeros(len(self.items))
        for task, w in weights.items():
            if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(float(w)):  # fmt: skip
                raise InvalidInputError(f"weights[{task!r}] must be a finite number, got {w!r:.60}")
            total = total + float(w) * np.asarray(self.probs[task], dtype=np.float64)
        return total.tolist()


@dataclass(frozen=True)
class RankQuery:
    """A validated rank request in internal ids, ready for the model.

    items, actions, times [n] int64: the kept history (oldest first); query_time: the candidates' impression time;
    last_time: the most recent history event's time (-1 when the history is empty); user_features [F] int64;
    candidates: as given (external); candidate_ids: internal ids, 0 where unknown; candidate_domains [n] int64: each
    candidate's domain id (1..K in ``schema.domains`` order, 0 = not given), None when no domains were given."""

    items: np.ndarray
    actions: np.ndarray
    times: np.ndarray
    query_time: int
    last_time: int
    user_features: np.ndarray
    candidates: tuple[str, ...]
    candidate_ids: np.ndarray
    unknown: tuple[str, ...]
    warnings: tuple[str, ...]
    candidate_domains: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------------------------
# The Ranker
# ----------------------------------------------------------------------------------------------------------------


class Ranker:
    """A multi-task ranking model on raw ids (scikit-learn shape: parameters in ``__init__``, learned state with a
    trailing underscore after ``fit`` or ``load``).

    Args:
        config: the ranking run configuration (:class:`genrec.config.RankingRunConfig`; default: the HSTU ranker).
        **overrides: per-section changes merged into ``config``: ``model={"name": "dlrm", "params": {...}}``,
            ``train={"epochs": 3}``, ``data={"max_history": 50, "split": "user-last"}``, ``output_dir=...``.
            Unknown sections, keys and wrongly typed values raise ``ConfigError`` here, before any training.

    Learned attributes: ``config_``, ``model_`` (eval mode), ``state_`` (:class:`genrec.train.ranking.RankingState`:
    schema, item ids, dense feature statistics, user feature values), ``model_id_``, ``candidate_tables_`` (the
    HSTU ranker's :class:`~genrec.models.hstu_ranker.CandidateTables`, or None), ``results_`` (after ``fit``).
    """

    def __init__(self, config: RankingRunConfig | None = None, **overrides: Any) -> None:
        self.config = config
        self.overrides = dict(overrides)
        self.resolved_config()  # fail early on a bad override

    def resolved_config(self) -> RankingRunConfig:
        """``config`` with ``overrides`` applied and validated."""
        return with_overrides(self.config or RankingRunConfig(), self.overrides, where="Ranker")

    # -- learned state -----------------------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        """Task names, in the schema's order."""
        self.check_fitted()
        return self.state_.schema.tasks

    @property
    def domains(self) -> tuple[str, ...]:
        """The model's domain names (``candidate_domains`` of ``rank``), in the schema's order; () without domains."""
        self.check_fitted()
        return self.state_.schema.domains

    @property
    def needs_domains(self) -> bool:
        """Whether the model scores a candidate with its domain's parameters (the HSTU ranker's domain options), so
        that ``rank`` needs every candidate's domain."""
        self.check_fitted()
        return bool(getattr(getattr(self.model_, "config", None), "uses_domains", False))

    @property
    def model_id(self) -> str:
        """A stable id of the loaded weights: ``<model name>-<first 12 hex digits of their sha256>``."""
        self.check_fitted()
        return self.model_id_

    def check_fitted(self) -> None:
        """Raise ``NotFittedError`` unless ``fit`` or ``load`` has run."""
        if not hasattr(self, "model_"):
            raise NotFittedError("this Ranker is not fitted: call fit() or use Ranker.load(dir)")

    # -- fit / save / load -------------------------------------------------------------------------------------

    def fit(
        self,
        interactions: Any,
        *,
        tasks: Sequence[str],
        columns: Mapping[str, Any] | None = None,
        user_features: Any = None,
        output_dir: str | Path | None = None,
        overwrite: bool = False,
        progress: bool = False,
    ) -> "Ranker":
        """Train on a table of logged events (see the module docstring) and keep the best-validation weights.

        Args:
            interactions: a pandas DataFrame, or the path of a CSV / TSV / Parquet file (read by
                :func:`genrec.data.readers.read_table`, header names as column names).
            tasks: the task names; each is a 0/1 column (named as the task unless ``columns`` says otherwise).
            columns: role -> column name, for the roles ``user``, ``item``, ``timestamp`` and each task
                (default: the column of the role's own name).
            user_features: optional DataFrame indexed by raw user id, one categorical column per feature.
            output_dir: where the run directory goes (``train_ranker``'s files plus the ranking state). None: a
                temporary directory, removed afterwards (call ``save`` to keep the model).
            overwrite: replace a run that ``output_dir`` already holds.
            progress: tqdm progress bars.

        A missing column, a missing or non-integer timestamp, a missing id (None, NaN, empty) or a label that is not
        0/1 raises ``ValueError`` (``BadRowError`` for row-level problems) naming the column and the row.
        """
        from genrec.data.ranking.events import build_ranking_dataset
        from genrec.train.ranking import train_ranker

        config = self.resolved_config()
        tasks = _check_tasks(tasks)
        events = _event_table(interactions, tasks, columns)
        uf_table, uf_sizes, uf_values = _user_feature_table(user_features)
        split = config.data.split or "global-time"
        dataset = build_ranking_dataset(
            events, name=TABLE_DATASET, tasks=tasks, actions=tasks, split=split, n_eval=config.data.n_eval,
            max_candidates=config.data.max_candidates, user_features=uf_table, user_feature_sizes=uf_sizes,
            notes=[f"{len(events):,} events from {_describe_source(interactions)}"],
        )  # fmt: skip
        data = dataclasses.replace(config.data, dataset=TABLE_DATASET, data_dir=None, split=split)
        if output_dir is None:
            context: Any = tempfile.TemporaryDirectory(prefix="genrec-fit-ranker-")
        else:
            context = contextlib.nullcontext(str(output_dir))
        with context as run_dir:
            config = dataclasses.replace(config, data=data, output_dir=str(run_dir))
            results = train_ranker(config, dataset=dataset, overwrite=overwrite, progress=progress)
            RankingState.from_dataset(dataset, uf_values).save(run_dir)  # with the raw user feature values
            self._load_state(Path(run_dir), "cpu")
        self.results_ = results
        return self

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu") -> "Ranker":
        """A fitted Ranker from a ``Ranker.save`` directory or a ``genrec train-ranker`` run directory (read-only,
        no code run). ``device``: where the model runs ("cpu", "cuda", ...)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} is not a directory")
        if not (directory / RANKING_STATE_FILES[0]).exists() and (directory / "item_ids.json").exists():
            raise FileNotFoundError(
                f"{directory} is a retrieval model directory (genrec train / Recommender.save), not a ranking one: "
                "load it with genrec.api.Recommender.load"
            )
        for name in ("config.yaml", "best.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: is {directory} a ranking model directory "
                                        "(Ranker.save or `genrec train-ranker`)?")  # fmt: skip
        ranker = cls(load_ranking_config(directory / "config.yaml"))
        ranker._load_state(directory, device)
        return ranker

    def _load_state(self, directory: Path, device: str) -> None:
        state = RankingState.load(directory)
        config = load_ranking_config(directory / "config.yaml")
        model = build_run_model(config, state.schema)
        weights_path = directory / "best.safetensors"
        weights = weights_path.read_bytes()
        try:
            from safetensors.torch import load as load_safetensors

            model.load_state_dict(load_safetensors(weights))
        except Exception as exc:  # safetensors header errors, shape mismatches
            raise ValueError(f"{weights_path}: cannot load the weights into the configured model ({exc})") from exc
        self.config_ = config
        self.state_ = state
        self.device_ = torch.device(device)
        self.model_ = model.to(self.device_).eval()
        self.candidate_tables_ = None
        if isinstance(self.model_, HSTURanker):
            c = self.model_.config
            width = 2 * c.num_heads * (c.linear_dim + c.attention_dim) + c.embedding_dim
            if (state.schema.num_items + 1) * width * 4 <= CANDIDATE_TABLE_BYTES:
                self.candidate_tables_ = self.model_.candidate_tables()
        self.model_id_ = f"{config.model.name}-{hashlib.sha256(weights).hexdigest()[:12]}"

    def save(self, directory: str | Path) -> Path:
        """Write the fitted ranker as a loadable directory (config.yaml, best.safetensors and the ranking state).

        A new directory is written under a temporary name and renamed into place (all or nothing). An existing
        ranking directory gets each file replaced atomically. Any other existing, non-empty directory is refused."""
        self.check_fitted()
        target = Path(directory)
        if target.exists():
            if any(target.iterdir()) and not (target / RANKING_STATE_FILES[0]).exists():
                raise FileExistsError(f"{target} exists and is not a genrec ranking directory; refusing to write "
                                      "into it")  # fmt: skip
            self._write(target, atomic=True)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is an ordinary one
            self._write(tmp, atomic=False)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def _write(self, target: Path, atomic: bool) -> None:
        from safetensors.torch import save_file

        from genrec.io import atomic_write

        config = dataclasses.replace(self.config_, output_dir=str(target))
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.model_.state_dict().items()}
        writers: dict[str, Callable[[str], None]] = {
            "config.yaml": lambda path: save_config(config, path),
            "best.safetensors": lambda path: save_file(tensors, path),
        }
        for name, write in writers.items():
            if atomic:
                atomic_write(target / name, write)
            else:
                write(str(target / name))
        self.state_.save(target)  # atomic writes

    # -- ranking -----------------------------------------------------------------------------------------------

    def rank(
        self,
        history: Any,
        candidates: Sequence[Any],
        *,
        query_time: int | None = None,
        user_features: Mapping[str, int | str] | None = None,
        candidate_domains: str | Sequence[str | None] | None = None,
    ) -> RankResult:
        """Per-task probabilities of ``candidates`` (in their order; NaN for unknown ids) after ``history``.
        Unknown history ids are ignored with an ``UnknownItemWarning``; see the module docstring.

        ``candidate_domains``: for a model with domains (``domains``), each candidate's domain name, one per
        candidate, or one name for all of them; None (or a None entry) = not known. A model that scores with its
        domain's parameters (``needs_domains``) needs every candidate's domain. An unknown name, a missing domain
        when one is needed, or domains for a model without domains raise ``InvalidInputError``."""
        result = self.rank_batch([history], [candidates], query_times=[query_time], user_features=[user_features],
                                 candidate_domains=[candidate_domains])[0]  # fmt: skip
        _warn_unknown([result])
        return result

    def rank_batch(
        self,
        histories: Sequence[Any],
        candidates_list: Sequence[Sequence[Any]],
        *,
        query_times: int | Sequence[int | None] | None = None,
        user_features: Mapping[str, int | str] | Sequence[Mapping[str, int | str] | None] | None = None,
        candidate_domains: Sequence[str | Sequence[str | None] | None] | None = None,
    ) -> list[RankResult]:
        """One ``RankResult`` per (history, candidate list). ``query_times`` and ``user_features`` are one value for
        all histories or one per history; ``candidate_domains`` is None or one entry per history (each as ``rank``'s
        ``candidate_domains``). One model pass per micro-batch of histories."""
        self.check_fitted()
        if isinstance(histories, (str, bytes, Mapping)) or not isinstance(histories, (Sequence, np.ndarray)):
            raise InvalidInputError(f"histories must be a list of histories, got {type(histories).__name__}")
        if isinstance(candidates_list, (str, bytes, Mapping)) or not isinstance(candidates_list, Sequence) \
                or len(candidates_list) != len(histories):  # fmt: skip
            raise InvalidInputError(f"{len(histories)} histories need {len(histories)} candidate lists")
        times = _per_history(query_times, len(histories))
        if user_features is None or isinstance(user_features, Mapping):
            features = [user_features] * len(histories)
        elif isinstance(user_features, Sequence) and not isinstance(user_features, str) \
                and len(user_features) == len(histories):  # fmt: skip
            features = list(user_features)
        else:
            raise InvalidInputError(f"user_features must be a mapping, None, or one per history ({len(histories)})")
        if candidate_domains is None:
            domains: list[Any] = [None] * len(histories)
        elif isinstance(candidate_domains, (str, bytes, Mapping)) or not isinstance(candidate_domains, Sequence) \
                or len(candidate_domains) != len(histories):  # fmt: skip
            raise InvalidInputError(f"candidate_domains must be None or one entry per history ({len(histories)})")
        else:
            domains = list(candidate_domains)
        queries = [self.prepare_rank(h, c, query_time=t, user_features=f, candidate_domains=d)
                   for h, c, t, f, d in zip(histories, candidates_list, times, features, domains)]  # fmt: skip
        return self.execute(queries)

    def prepare_rank(
        self,
        history: Any,
        candidates: Sequence[Any],
        *,
        query_time: int | None = None,
        user_features: Mapping[str, int | str] | None = None,
        candidate_domains: str | Sequence[str | None] | None = None,
    ) -> RankQuery:
        """Validate and map one rank request (raises ``InvalidInputError``) without running the model."""
        self.check_fitted()
        schema = self.state_.schema
        cands = _id_list(candidates, "candidates")
        cand_domains = self._candidate_domains(candidate_domains, len(cands))
        ids, timed, times, acts = _parse_history(history, schema.actions)
        query_time = _timestamp(query_time, "query_time")
        if query_time is not None and query_time < 0:
            raise InvalidInputError(f"query_time {query_time} is negative; times are Unix seconds >= 0")
        notes: list[str] = []
        all_timed = bool(timed.all())
        if not all_timed and timed.any():
            first = int(np.argmin(timed)) if timed[0] else int(np.argmax(timed))
            raise InvalidInputError(f"history event {first} differs from event 0 in having a timestamp: either every "
                                    "event has a ts or none has")  # fmt: skip
        if ids and all_timed:
            order = np.argsort(times, kind="stable")
            if query_time is None:
                query_time = int(times.max())
            late = int(np.argmax(times)) if int(times.max()) > query_time else None
            if late is not None:
                raise InvalidInputError(f"history event {late} has ts {int(times[late])}, after query_time "
                                        f"{query_time}: history events happen before the candidates are shown")  # fmt: skip
        else:
            order = np.arange(len(ids))
            query_time = 0 if query_time is None else query_time
            times = np.full(len(ids), query_time, dtype=np.int64)
            if ids:
                notes.append(f"the history has no timestamps: its events are taken to be at the query time "
                             f"{query_time}")  # fmt: skip
            elif query_time == 0:
                notes.append("no query_time and no history timestamps: the time features use time 0")
        internal = self.state_.item_map.to_internal(ids)[order]
        actions = acts[order]
        times = times[order]
        known = internal > 0
        unknown: tuple[str, ...] = ()
        if not known.all():
            unknown = tuple(dict.fromkeys(ids[i] for i in order[~known]))
            shown = ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            notes.append(f"ignored {len(unknown)} unknown item id(s): {shown}")
        internal, actions, times = internal[known], actions[known], times[known]
        last_time = int(times[-1]) if len(times) else -1
        max_history = self.config_.data.max_history
        if len(internal) > max_history:
            notes.append(f"history has {len(internal)} known items; the most recent {max_history} are used")
            internal, actions, times = internal[-max_history:], actions[-max_history:], times[-max_history:]
        feats, feature_notes = self._user_features(user_features)
        notes += feature_notes
        cand_ids = self.state_.item_map.to_internal(cands)
        if (cand_ids == 0).any():
            notes.append(f"{int((cand_ids == 0).sum())} unknown candidate id(s) have no probability")
        return RankQuery(internal, actions, times, int(query_time), last_time, feats, tuple(cands), cand_ids,
                         unknown, tuple(notes), cand_domains)  # fmt: skip

    def _candidate_domains(self, given: Any, n: int) -> np.ndarray | None:
        """The [n] domain ids (1..K, 0 = not known) of a request's ``candidate_domains`` for its n candidates, or
        None when none are given; raises ``InvalidInputError`` (see ``rank``)."""
        domains = self.state_.schema.domains
        if given is None:
            if self.needs_domains and n:
                raise InvalidInputError(f"candidate_domains: this model scores every candidate with its domain's "
                                        f"parameters and needs each candidate's domain, one of {list(domains)}")  # fmt: skip
            return None
        if not domains:
            raise InvalidInputError("candidate_domains: this model was trained without domains; leave them out")
        if isinstance(given, str):
            names: list[Any] = [given] * n
        elif isinstance(given, (bytes, Mapping)) or not isinstance(given, (Sequence, np.ndarray)):
            raise InvalidInputError(f"candidate_domains must be a domain name or a list of them, one per candidate, "
                                    f"got {type(given).__name__}")  # fmt: skip
        else:
            names = list(given)
            if len(names) != n:
                raise InvalidInputError(f"candidate_domains: {len(names)} domain(s) for {n} candidates (give one per "
                                        "candidate, or one name for all)")  # fmt: skip
        index = {name: k for k, name in enumerate(domains, 1)}
        ids = np.zeros(n, dtype=np.int64)
        for i, name in enumerate(names):
            if name is None:
                if self.needs_domains:
                    raise InvalidInputError(f"candidate_domains[{i}]: missing; this model needs every candidate's "
                                            f"domain, one of {list(domains)}")  # fmt: skip
                continue
            if not isinstance(name, str) or name not in index:
                raise InvalidInputError(f"candidate_domains[{i}]: unknown domain {name!r:.60}; the model's domains: "
                                        f"{list(domains)}")  # fmt: skip
            ids[i] = index[name]
        return ids

    def _user_features(self, given: Any) -> tuple[np.ndarray, list[str]]:
        """The [F] feature ids of a request's ``user_features`` mapping (0 = unknown) and notes."""
        schema = self.state_.schema
        out = np.zeros(len(schema.user_features), dtype=np.int64)
        if given is None:
            return out, []
        if not isinstance(given, Mapping):
            raise InvalidInputError(f"user_features must map feature names to values, got {type(given).__name__}")
        notes = []
        position = {name: f for f, name in enumerate(schema.user_features)}
        for name, value in given.items():
            if name not in position:
                known = list(schema.user_features) or "none"
                raise InvalidInputError(f"user_features: unknown feature {str(name)!r}; the model's user features: "
                                        f"{known}")  # fmt: skip
            f = position[name]
            size = schema.user_feature_sizes[f]
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
                raise InvalidInputError(f"user_features[{name!r}] must be a string or an integer, got "
                                        f"{type(value).__name__} {value!r:.60}")  # fmt: skip
            values = self.state_.user_feature_values.get(name)
            if values is None:  # coded ids
                if not isinstance(value, (int, np.integer)) or not 0 <= int(value) <= size:
                    raise InvalidInputError(f"user_features[{name!r}] must be an integer id in 0..{size} (this model "
                                            f"knows the feature's ids, not its raw values), got {value!r:.60}")  # fmt: skip
                out[f] = int(value)
            else:
                index = self._value_index(name, values)
                out[f] = index.get(str(value), 0)
                if out[f] == 0:
                    notes.append(f"user_features[{name!r}]: value {str(value)!r:.60} is unknown to the model")
        return out, notes

    def _value_index(self, name: str, values: list[str]) -> dict[str, int]:
        cache = self.__dict__.setdefault("_value_indexes", {})
        if name not in cache:
            cache[name] = {v: i + 1 for i, v in enumerate(values)}
        return cache[name]

    def execute(self, queries: Sequence[RankQuery]) -> list[RankResult]:
        """Answer prepared queries: one model pass per micro-batch of ``RANK_ROWS`` histories (the HSTU ranker:
        one M-FALCON pass per history)."""
        self.check_fitted()
        tasks = self.state_.schema.tasks
        results = []
        with torch.inference_mode():
            for lo in range(0, len(queries), RANK_ROWS):
                chunk = list(queries[lo : lo + RANK_ROWS])
                probs = self._probabilities(chunk)  # one [K_q, T] array per query (known candidates)
                for q, p in zip(chunk, probs):
                    full = np.full((len(q.candidates), len(tasks)), np.nan)
                    full[q.candidate_ids > 0] = p
                    results.append(RankResult(
                        items=list(q.candidates),
                        probs={t: full[:, j].tolist() for j, t in enumerate(tasks)},
                        unknown=list(q.unknown),
                        unknown_candidates=list(dict.fromkeys(
                            q.candidates[i] for i in np.flatnonzero(q.candidate_ids == 0))),
                        warnings=list(q.warnings),
                    ))  # fmt: skip
        return results

    # -- inference internals -----------------------------------------------------------------------------------

    def make_batch(self, queries: Sequence[RankQuery]) -> RankingBatch:
        """The ``RankingBatch`` of prepared queries: one row each, its known candidates, on the model's device."""
        state = self.state_
        B = len(queries)
        L = max([1] + [len(q.items) for q in queries])
        known = [q.candidate_ids[q.candidate_ids > 0] for q in queries]
        C = max([1] + [len(k) for k in known])
        F = len(state.schema.user_features)
        hist = np.zeros((3, B, L), dtype=np.int64)  # items, actions, times
        cand = np.zeros((B, C), dtype=np.int64)
        cmask = np.zeros((B, C), dtype=bool)
        qt = np.zeros(B, dtype=np.int64)
        last = np.zeros(B, dtype=np.int64)
        feats = np.zeros((B, F), dtype=np.int64)
        domains = np.zeros((B, C), dtype=np.int64)  # 0 = unknown domain (and padding)
        for r, (q, k) in enumerate(zip(queries, known)):
            n = len(q.items)
            hist[0, r, :n], hist[1, r, :n], hist[2, r, :n] = q.items, q.actions, q.times
            cand[r, : len(k)] = k
            cmask[r, : len(k)] = True
            qt[r], last[r], feats[r] = q.query_time, q.last_time, q.user_features
            domains[r, : len(k)] = self._query_domains(q)
        cand_times = np.where(cmask, qt[:, None], 0)
        if getattr(self.model_, "reads_dense_features", True):
            dense = state.features.features(np.zeros((B, C), np.int64), np.broadcast_to(qt[:, None], (B, C)), cand,
                                            np.broadcast_to(qt[:, None], (B, C)),
                                            np.broadcast_to(last[:, None], (B, C)))  # fmt: skip
            dense = dense * cmask[:, :, None]
        else:  # the model never reads them (HSTU ranker): zeros of the contract's shape, not computed
            dense = np.zeros((B, C, len(state.schema.dense_features)), dtype=np.float32)
        batch = RankingBatch(
            user_ids=torch.zeros(B, dtype=torch.long),
            hist_items=torch.from_numpy(hist[0]),
            hist_actions=torch.from_numpy(hist[1]),
            hist_times=torch.from_numpy(hist[2]),
            hist_lengths=torch.tensor([len(q.items) for q in queries], dtype=torch.long),
            cand_items=torch.from_numpy(cand),
            cand_times=torch.from_numpy(cand_times),
            cand_mask=torch.from_numpy(cmask),
            user_features=torch.from_numpy(feats),
            dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
            cand_domains=torch.from_numpy(domains) if state.schema.domains else None,
        )
        return batch.to(self.device_)

    def _query_domains(self, query: RankQuery) -> np.ndarray:
        """[K] domain ids of a prepared query's known candidates (0 = not known); ``InvalidInputError`` when the
        model needs them and the query has none for its candidates (e.g. candidates set after ``prepare_rank``)."""
        known = query.candidate_ids > 0
        if query.candidate_domains is not None and len(query.candidate_domains) == len(query.candidate_ids):
            return query.candidate_domains[known]
        if query.candidate_domains is not None or (self.needs_domains and known.any()):
            raise InvalidInputError(f"the query's candidate_domains do not give the domain of each of its "
                                    f"{len(query.candidate_ids)} candidates, which this model needs")  # fmt: skip
        return np.zeros(int(known.sum()), dtype=np.int64)

    def _probabilities(self, queries: list[RankQuery]) -> list[np.ndarray]:
        """[K_q, T] probabilities of each query's known candidates."""
        counts = [int((q.candidate_ids > 0).sum()) for q in queries]
        if not any(counts):
            return [np.zeros((0, len(self.state_.schema.tasks))) for _ in queries]
        batch = self.make_batch(queries)
        if isinstance(self.model_, HSTURanker):
            logits = self.model_.rank_cached(batch, microbatch=CANDIDATE_MICROBATCH,
                                             tables=self.candidate_tables_)  # [B, C, T], M-FALCON  # fmt: skip
        else:
            logits = self.model_(batch)  # [B, C, T]
        probs = torch.sigmoid(logits.float()).double().cpu().numpy()
        return [probs[r, :k] for r, k in enumerate(counts)]


# ----------------------------------------------------------------------------------------------------------------
# Input parsing (pure functions)
# ----------------------------------------------------------------------------------------------------------------


def _parse_history(history: Any, actions: tuple[str, ...]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(raw item ids, has a timestamp [n] bool, timestamps [n] int64 (0 where none), action bitmasks [n] int64) of a
    history; raises ``InvalidInputError``.

    A history whose events are all of one plain form (dicts, ``(item, ts)`` tuples, or bare ids) with well-formed
    values is checked column by column (:func:`_parse_uniform_history`); anything else, and every invalid history,
    goes through the event-by-event checks of :func:`_parse_history_events`, which name the first bad event."""
    events = _as_history_list(history)
    parsed = _parse_uniform_history(events, actions)
    if parsed is not None:
        return parsed
    ids, ts, masks = _parse_history_events(events, actions)
    timed = np.fromiter((t is not None for t in ts), dtype=bool, count=len(ts))
    times = np.fromiter((0 if t is None else t for t in ts), dtype=np.int64, count=len(ts))
    return ids, timed, times, np.asarray(masks, dtype=np.int64).reshape(len(ids))


_EVENT_KEYS = frozenset(("item", "ts", "actions"))


def _parse_uniform_history(
    events: list, actions: tuple[str, ...]
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray] | None:
    """The result of :func:`_parse_history_events` for a valid history of one plain event form, computed per
    column (types of a whole column at once, timestamps and action names as arrays); None for a history this
    path does not take (another form, a mix of forms, or any value that :func:`_parse_history_events` would
    refuse), which is then checked event by event."""
    n = len(events)
    if n == 0:
        return [], np.zeros(0, bool), np.zeros(0, np.int64), np.zeros(0, np.int64)
    kinds = set(map(type, events))
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    names = None
    if kind is dict:
        if not set().union(*events) <= _EVENT_KEYS:
            return None
        items = list(map(dict.get, events, repeat("item")))
        ts = list(map(dict.get, events, repeat("ts")))
        names = list(map(dict.get, events, repeat("actions")))
    elif kind is tuple:
        if set(map(len, events)) != {2}:
            return None
        items, ts = list(map(itemgetter(0), events)), list(map(itemgetter(1), events))
    elif kind is str or kind is int:
        items, ts = events, None
    else:
        return None
    item_types = set(map(type, items))
    if not item_types <= {str, int}:  # a missing item (None) or another type: the event-by-event message
        return None
    ids = items if item_types == {str} else list(map(str, items))
    timed = np.zeros(n, dtype=bool)
    times = np.zeros(n, dtype=np.int64)
    ts_types = {type(None)} if ts is None else set(map(type, ts))
    if ts_types == {int}:
        try:
            times = np.array(ts, dtype=np.int64)
        except OverflowError:
            return None
        if times.min() < 0 or times.max() > MAX_ABS_TIMESTAMP:
            return None
        timed = np.ones(n, dtype=bool)
    elif ts_types != {type(None)}:  # bools, floats, strings, or a mix of timed and untimed events
        return None
    masks = np.zeros(n, dtype=np.int64)
    if names is not None:
        name_types = set(map(type, names))
        if not name_types <= {list, type(None)}:
            return None
        if type(None) in name_types:
            names = [() if a is None else a for a in names]
        flat = list(chain.from_iterable(names))
        if flat:
            if set(map(type, flat)) != {str}:
                return None
            bit = {name: 1 << a for a, name in enumerate(actions)}
            bits = list(map(bit.get, flat))
            if None in bits:  # an unknown action name
                return None
            counts = np.fromiter(map(len, names), dtype=np.int64, count=n)
            np.bitwise_or.at(masks, np.repeat(np.arange(n), counts), np.array(bits, dtype=np.int64))
    return ids, timed, times, masks


def _parse_history_events(events: list, actions: tuple[str, ...]) -> tuple[list[str], list[int | None], list[int]]:
    """(raw item ids, timestamps or None, action bitmasks) of a history, event by event; raises
    ``InvalidInputError`` naming the first bad event."""
    bit = {name: 1 << a for a, name in enumerate(actions)}
    ids, ts, masks = [], [], []
    for i, event in enumerate(events):
        mask = 0
        if isinstance(event, Mapping):
            extra = sorted(str(k) for k in event if k not in ("item", "ts", "actions"))
            if "item" not in event or extra:
                raise InvalidInputError(f"history event {i}: a dict has keys 'item' and optionally 'ts' and "
                                        f"'actions', got {sorted(map(str, event))}")  # fmt: skip
            item, t = _item_id(event["item"]), _timestamp(event.get("ts"), f"history event {i} ts")
            names = event.get("actions")
            if names is not None:
                if isinstance(names, (str, bytes, Mapping)) or not isinstance(names, (Sequence, set, frozenset)):
                    raise InvalidInputError(f"history event {i}: actions must be a list of action names, got "
                                            f"{type(names).__name__}")  # fmt: skip
                for name in names:
                    if not isinstance(name, str) or name not in bit:
                        raise InvalidInputError(f"history event {i}: unknown action {name!r:.60}; the model's "
                                                f"actions: {list(actions)}")  # fmt: skip
                    mask |= bit[name]
        elif isinstance(event, tuple):
            if len(event) != 2:
                raise InvalidInputError(f"history event {i}: a tuple is (item, ts), got {len(event)} values")
            item, t = _item_id(event[0]), _timestamp(event[1], f"history event {i} ts")
        else:
            item, t = _item_id(event), None
        if t is not None and t < 0:
            raise InvalidInputError(f"history event {i}: ts {t} is negative; times are Unix seconds >= 0")
        ids.append(item)
        ts.append(t)
        masks.append(mask)
    return ids, ts, masks


def _check_tasks(tasks: Any) -> tuple[str, ...]:
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r:.60}")
    out = tuple(tasks)
    if any(not isinstance(t, str) or not t for t in out) or len(set(out)) != len(out):
        raise ValueError(f"tasks must be distinct non-empty strings, got {list(out)}")
    if len(out) > 62:
        raise ValueError(f"at most 62 tasks fit in an action bitmask, got {len(out)}")
    return out


def _roles(columns: Any, tasks: tuple[str, ...]) -> dict[str, Any]:
    if columns is None:
        columns = {}
    if not isinstance(columns, Mapping):
        raise TypeError(f"columns must be a mapping of role -> column name, got {type(columns).__name__}")
    allowed = ROLES + tasks
    unknown = [str(k) for k in columns if k not in allowed]
    if unknown:
        raise ValueError(f"columns: unknown role {unknown[0]!r}; the roles are {', '.join(ROLES)} and the tasks "
                         f"{', '.join(tasks)}")  # fmt: skip
    roles = {role: columns.get(role, role) for role in allowed}
    for role, column in roles.items():
        if column is None:
            what = "a timestamp column (ranking is time-based)" if role == "timestamp" else "a column"
            raise ValueError(f"columns: the {role} role needs {what}")
    return roles


def _event_table(interactions: Any, tasks: tuple[str, ...], columns: Any):
    """The event table of :mod:`genrec.data.ranking.events` from a DataFrame or a file: every row a candidate
    whose actions are its positive task labels."""
    import pandas as pd

    from genrec.data.readers import read_frame, read_table

    roles = _roles(columns, tasks)
    if isinstance(interactions, pd.DataFrame):
        names = list(interactions.columns)
        source = "DataFrame"
        for role, column in roles.items():
            if names.count(column) != 1:
                how = "no" if column not in names else "more than one"
                raise ValueError(f"{source}: {how} column {column!r} for the {role} role; the columns are {names}")
        frame = read_frame(interactions, user=roles["user"], item=roles["item"], timestamp=roles["timestamp"])
        labels = {t: interactions[roles[t]].reset_index(drop=True) for t in tasks}
    elif isinstance(interactions, (str, os.PathLike)):
        source = str(interactions)
        frame = read_table(interactions, user=roles["user"], item=roles["item"], timestamp=roles["timestamp"])
        labels = {t: _label_column(interactions, roles, t) for t in tasks}
    else:
        raise TypeError(f"fit() takes a pandas DataFrame or a file path, got {type(interactions).__name__}")
    events = pd.DataFrame({
        "user": frame["user"].to_numpy(),
        "item": frame["item"].to_numpy(),
        "timestamp": frame["timestamp"].to_numpy(dtype=np.int64),
        "candidate": True,
    })  # fmt: skip
    if (events["timestamp"] < 0).any():
        r = int(np.flatnonzero(events["timestamp"].to_numpy() < 0)[0])
        raise ValueError(f"{source}: column {roles['timestamp']!r}, row {r + 1}: timestamp "
                         f"{int(events['timestamp'][r])} is negative (Unix seconds >= 0)")  # fmt: skip
    actions = np.zeros(len(events), dtype=np.int64)
    for j, t in enumerate(tasks):
        values = _binary(labels[t], source, roles[t])
        events[f"task:{t}"] = values
        actions |= values << j
    events["actions"] = actions
    return events


def _label_column(path: Any, roles: dict[str, Any], task: str):
    """A task's label column of a file, through the reader (numbers, errors with the file's line numbers)."""
    import pandas as pd

    from genrec.data.readers import BadRowError, read_table

    try:
        frame = read_table(path, user=roles["user"], item=roles["item"], rating=roles[task])
    except BadRowError as exc:
        reason = exc.reason.removeprefix("rating ")
        raise BadRowError(exc.path, exc.line, f"label column {roles[task]!r}: {reason}") from None
    return pd.Series(frame["rating"])


def _binary(values, source: str, column: Any) -> np.ndarray:
    """A 0/1 label column -> int64 array; ValueError naming the column and the first bad row."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(values.dtype):
        return values.to_numpy(dtype=np.int64)
    if not pd.api.types.is_numeric_dtype(values.dtype):
        bad = ~values.isin((0, 1))
    else:
        f = values.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~((f == 0) | (f == 1))
    bad = np.asarray(bad, dtype=bool)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        value = values.iloc[r]
        shown = repr(value.item() if isinstance(value, np.generic) else value)[:40]
        raise ValueError(f"{source}: label column {column!r}, row {r + 1}: {shown} is not 0 or 1 "
                         "(every task column holds 0/1 labels, without missing values)")  # fmt: skip
    return values.to_numpy(dtype=np.float64).astype(np.int64)


def _user_feature_table(features: Any):
    """(coded table indexed by user id, sizes, raw values per feature) from a DataFrame of raw categorical values;
    missing values (None, NaN) are unknown (0)."""
    import pandas as pd

    if features is None:
        return None, [], {}
    if not isinstance(features, pd.DataFrame):
        raise TypeError(f"user_features must be a pandas DataFrame indexed by user id, got {type(features).__name__}")
    index = features.index.astype(str)
    if index.has_duplicates:
        raise ValueError(f"user_features: user {index[index.duplicated()][0]!r} appears more than once in the index")
    coded, sizes, values = {}, [], {}
    for column in features.columns:
        col = features[column]
        present = col.notna().to_numpy()
        raw = np.asarray([str(v) for v in col[present]], dtype=object)
        distinct = sorted(set(raw.tolist()), key=_value_key)
        codes = np.zeros(len(col), dtype=np.int64)
        lookup = {v: i + 1 for i, v in enumerate(distinct)}
        codes[present] = [lookup[v] for v in raw]
        coded[str(column)] = codes
        sizes.append(len(distinct))
        values[str(column)] = distinct
    return pd.DataFrame(coded, index=index), sizes, values


def _value_key(value: str) -> tuple:
    """Numeric values in numeric order, then the others in string order."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _describe_source(interactions: Any) -> str:
    return "a DataFrame" if not isinstance(interactions, (str, os.PathLike)) else str(interactions)
