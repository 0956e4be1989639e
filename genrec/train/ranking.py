"""The ranking training loop: setup -> epochs (train, validate, checkpoint) -> test once at the best validation epoch.

A ranker reads :class:`~genrec.data.ranking_batch.RankingBatch` rows and returns one logit per (candidate, task),
``forward(batch) -> [B, C, T]``; ``loss(batch)`` is its training loss (a scalar, or ``(total, {task: loss})``).
:func:`build_ranker` builds one from a :class:`~genrec.config.RankingModelConfig` and the dataset's
:class:`~genrec.data.ranking_batch.RankingSchema`; :func:`train_ranker` trains it on the training part of a
:class:`~genrec.data.ranking.RankingDataset`.

Selection and test: after every epoch the validation part is scored and the selection value is the mean, over the
tasks with a positive ``train.task_weights`` entry, of ``train.select_metric`` (NE or LogLoss: lower is better;
AUC or GAUC: higher is better). Early stopping and the kept weights (``best.safetensors``) use that value only.
The test part is scored once, at the end, with the best validation epoch's weights. A selection metric that is
undefined on the validation labels (e.g. AUC of a task without a positive) is refused before training: it would
be undefined at every epoch, and averaging over the other tasks would silently change what is selected.

Every result is stored with its protocol (dataset, split, part, tasks, rows and candidates, base rates, and the
definition of every metric) in ``results.json``. The test part's predictions go to ``test_predictions.npz``::

    user_ids    [N]     int64    internal user id of each real test candidate (row-major over the test rows;
                                 rows of an unknown user 0 get their own negative id, as in flatten_candidates)
    item_ids    [N]     int64    internal item id of the candidate
    cand_times  [N]     int64    Unix seconds of the candidate
    probs       [N, T]  float32  predicted probability of each task
    labels      [N, T]  float32  observed labels
    tasks       [T]     str      task names

so that models trained on the same data can be compared afterwards with
:func:`genrec.eval.ranking_metrics.paired_bootstrap` without re-running them (:func:`load_predictions` checks that
two files hold the same candidates).

Reproducibility: the model is initialised after ``torch.manual_seed(train.seed)``; the order of the training rows
of epoch e comes from a permutation seeded with ``(seed, e)`` and the torch RNG (dropout) is re-seeded from
``(seed, e)`` at the start of every epoch, so a run resumed from the checkpoint of epoch e replays epochs e+1..
exactly as the uninterrupted run would.

Multi-objective training: ``train.task_balancing`` picks how the per-task losses of each batch become one update
(:mod:`genrec.train.multitask`: fixed weights, uncertainty weighting, MGDA, PE-LTR). ``fixed`` back-propagates the
ranker's own total, as training always did. The balancer's state (uncertainty weighting's log-variances, trained by
the same optimizer) is stored in ``checkpoint.pt`` and restored on resume; every epoch's log line records the weights
the balancer put on each task (``task_balance``).

Run directories: everything (config, data, model parameters, on resume the checkpoint against the stored config)
is checked before the first file is written; a directory that already holds a run is refused unless the call
resumes it (``resume=True``) or replaces it (``overwrite=True``). Files are written atomically
(:mod:`genrec.io`, :mod:`genrec.train.checkpoint`): weights as safetensors, the training state as plain tensors and
containers loaded with ``weights_only=True``. A run directory also holds the ranking state (:class:`RankingState`:
schema, item ids, the dense features' training statistics), so ``genrec.ranking_api.Ranker.load`` serves it as is.

Rankers without trainable parameters that are fitted by counting (the popularity floor, ``fit(batches)``) are fitted
once on the training part; that is their single "epoch".

Data-parallel training (``dist``, see :mod:`genrec.train.distributed`; ``torchrun ... -m genrec train-ranker`` or
``genrec train-ranker --nproc N``): N processes train the model one process trains with the same ``train.batch_size``
(the global batch; B / N rows per process), within float rounding. Every process builds each global batch and keeps
its rows; the rankers' only random draws are dropout masks, drawn for the global batch (``global_batch_dropout``).
A ranker's loss is a per-task mean over labelled candidates (weighted by ``label_weights``, plus the history events of
the interleaved HSTU ranker), so each process rescales its per-task losses by its share of the global batch's labels
(:class:`RankingObjective`) and DistributedDataParallel's average of the gradients is the one-process gradient.
Validation and test batches are dealt round-robin and the predictions gathered in order, so the metrics equal the
one-process ones exactly. Process 0 alone writes the run directory; its checkpoint resumes on any number of
processes. Only ``train.task_balancing=fixed`` is supported (the other balancers combine per-task losses or gradients
of the whole batch), and DIN's Dice activation normalises with each process's own batch statistics.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from genrec import __version__
from genrec.config import (
    RANKING_SELECT_METRICS,
    ConfigError,
    RankingModelConfig,
    RankingRunConfig,
    _coerce,
    load_ranking_config,
    save_config,
)
from genrec.data.ranking import RANKING_DATASETS, RankingDataset, load_ranking_dataset
from genrec.data.ranking.events import DenseFeatureState
from genrec.data.ranking_batch import RankingBatch, RankingSchema
from genrec.data.sequences import IdMap
from genrec.eval.ranking_metrics import PROB_EPS, flatten_candidates, multitask_ranking_metrics
from genrec.io import atomic_write, write_json
from genrec.models.din import DIN, DINConfig, Dice
from genrec.models.dlrm import DLRMRanker, DLRMRankerConfig
from genrec.models.hstu_ranker import HSTURanker, HSTURankerConfig
from genrec.models.ranking_floors import ItemPopularityRanker, LogisticRegressionRanker
from genrec.train.checkpoint import (
    CheckpointError,
    check_loss_finite,
    check_run_directory,
    check_shapes,
    config_differences,
    is_terminal,
    load_weights,
    remove_stale_temporaries,
    resume_state,
    save_state,
    save_weights,
    with_absolute_paths,
    write_log,
)
from genrec.train.distributed import (
    DistInfo,
    RowShard,
    all_reduce_means,
    broadcast_module,
    check_batch_size,
    gather_objects,
    global_batch_dropout,
    run_on_main,
    shard_bounds,
    training_device,
    wrap_ddp,
)
from genrec.train.distill import (
    ServingHeads,
    TeacherTargets,
    aux_schema,
    aux_task_weights,
    distilled_batches,
    teacher_targets,
)
from genrec.train.multitask import TaskBalancer, build_balancer

log = logging.getLogger("genrec.train.ranking")

# What a trained ranker needs to rank without its dataset (``RankingState``): written by train_ranker and by
# ``genrec.ranking_api.Ranker.save``, read by ``Ranker.load``.
RANKING_STATE_FILES = ("ranking_state.json", "ranking_item_ids.json", "ranking_features.npz")
RANKING_STATE_FORMAT = 1
# The files train_ranker writes into a run directory (``overwrite=True`` removes exactly these).
RANKING_RUN_FILES = (
    "config.yaml", "checkpoint.pt", "best.safetensors", "best.json", "log.jsonl", "results.json",
    "test_predictions.npz", *RANKING_STATE_FILES,
)  # fmt: skip
DATASET_ALIASES = {"taobao": "taobao-userbehavior-head", "kuairand": "kuairand-27k-like-hate-subset"}

# What every reported metric means (stored next to every result).
METRIC_DEFINITIONS = {
    "auc": "ROC AUC over every real candidate of the part (Mann-Whitney U / (P * N), a tie counts one half)",
    "gauc": "per-user AUC averaged over users with both classes, each weighted by the user's candidates "
    "(Zhou et al. 2018, eq. 1)",
    "gauc_unweighted": "per-user AUC averaged over users with both classes, every user weighing the same",
    "ne": "normalised entropy: log loss / entropy of the part's own base rate (He et al. 2014; 1 = predicting "
    "the base rate, lower is better)",
    "log_loss": f"mean binary cross-entropy, natural log, probabilities clipped into [{PROB_EPS:g}, 1 - {PROB_EPS:g}]",
    "calibration": "sum of predicted probabilities / number of positive labels (1 = calibrated in aggregate)",
}


# ------------------------------------------------------------------------------------------------ model factory
# the floors' constructor parameters {name: type} (the learned rankers' come from their config dataclasses)
_FLOOR_PARAMS: dict[str, dict[str, Any]] = {
    "popularity": {"prior_strength": float},
    "logreg": {"num_buckets": int, "task_base_rates": tuple[float, ...] | None},
}


def _rankers() -> dict[str, tuple[type[nn.Module], type | None]]:
    return {
        "hstu-ranker": (HSTURanker, HSTURankerConfig),
        "dlrm": (DLRMRanker, DLRMRankerConfig),
        "din": (DIN, DINConfig),
        "popularity": (ItemPopularityRanker, None),
        "logreg": (LogisticRegressionRanker, None),
    }


def available_rankers() -> tuple[str, ...]:
    """The ranker names :func:`build_ranker` can build."""
    return tuple(_rankers())


def build_ranker(
    model_config: RankingModelConfig,
    schema: RankingSchema,
    *,
    task_weights: tuple[float, ...] | None = None,
    seed: int = 0,
    max_history: int | None = None,
) -> nn.Module:
    """A ranker for ``schema``: ``forward(batch) -> [B, C, T]`` logits and ``loss(batch)``.

    ``model_config.params`` are checked against the model's config dataclass (names, types, and the dataclass's own
    range checks); any problem raises :class:`~genrec.config.ConfigError` naming ``model.params.<name>``.
    ``task_weights`` (one per task, ``train.task_weights``) weigh the tasks in the loss. ``seed`` fixes the
    logistic regression's hash functions. ``max_history`` is the HSTU ranker's default history window (the data's
    ``max_history``) when ``params`` do not set it.
    """
    rankers = _rankers()
    name = model_config.name
    if name not in rankers:
        raise ConfigError(
            f"model.name: {name!r} is not available in this installation; available: {', '.join(map(repr, rankers))}"
        )
    if task_weights is not None and len(task_weights) != schema.num_tasks:
        raise ConfigError(
            f"train.task_weights: {len(task_weights)} weights for the dataset's {schema.num_tasks} tasks "
            f"{list(schema.tasks)}"
        )
    cls, config_cls = rankers[name]
    params = dict(model_config.params)
    if config_cls is None:
        allowed = _FLOOR_PARAMS[name]
        kwargs = _typed_params(params, allowed, name)
        if name == "popularity":
            return _construct(cls, name, schema, task_weights=task_weights, **kwargs)
        return _construct(cls, name, schema, task_weights=task_weights, seed=seed, **kwargs)
    hints = typing.get_type_hints(config_cls)
    allowed = {f.name: hints[f.name] for f in dataclasses.fields(config_cls) if f.name != "task_weights"}
    if "max_history" in allowed and "max_history" not in params and max_history is not None:
        params["max_history"] = max_history
    kwargs = _typed_params(params, allowed, name)
    try:
        config = config_cls(**kwargs, task_weights=task_weights)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.params: {exc} (model.name={name!r})") from None
    return _construct(cls, name, schema, config)


def build_run_model(config: RankingRunConfig, schema: RankingSchema) -> nn.Module:
    """The ranker a run config trains and serves: :func:`build_ranker` for ``schema``, or, when the run distils
    through auxiliary heads (``train.distill_head=aux``), the ranker on :func:`genrec.train.distill.aux_schema` with
    loss weights ``(1 - α) · w`` and ``α · w``, wrapped in :class:`~genrec.train.distill.ServingHeads`."""
    tc, dc = config.train, config.data
    if tc.distill_teacher is None or tc.distill_head != "aux":
        return build_ranker(config.model, schema, task_weights=tc.task_weights, seed=tc.seed,
                            max_history=dc.max_history)  # fmt: skip
    params = dict(config.model.params)
    rates = params.get("task_base_rates")
    if isinstance(rates, (list, tuple)) and len(rates) == schema.num_tasks:
        params["task_base_rates"] = [*rates, *rates]  # the teacher's targets start at the labels' rates
    inner = build_ranker(dataclasses.replace(config.model, params=params), aux_schema(schema),
                         task_weights=aux_task_weights(tc.task_weights, schema.num_tasks, tc.distill_weight),
                         seed=tc.seed, max_history=dc.max_history)  # fmt: skip
    return ServingHeads(inner, schema.num_tasks)


def load_teacher(directory: str | Path, dataset: RankingDataset) -> tuple[nn.Module, RankingRunConfig]:
    """A trained ranker run (``genrec train-ranker`` output: config.yaml, best.safetensors, the ranking state) to
    teach a student on ``dataset``; ConfigError unless it was trained on the same data (dataset, split, tasks, item
    and user ids). Nothing is executed while reading it."""
    directory = Path(directory)
    for name in ("config.yaml", "best.safetensors", *RANKING_STATE_FILES):
        if not (directory / name).is_file():
            raise ConfigError(f"train.distill_teacher: {directory / name} not found (the teacher must be a finished "
                              "train-ranker run directory)")  # fmt: skip
    config = load_ranking_config(directory / "config.yaml")
    state = RankingState.load(directory)
    s, d = state.schema, dataset.schema
    problems = [what for what, same in (
        ("dataset", state.dataset == dataset.name), ("split", state.split == dataset.split),
        ("tasks", s.tasks == d.tasks), ("items", state.item_map.external == dataset.item_map.external),
        ("users", s.num_users == d.num_users), ("user features", s.user_features == d.user_features),
        ("dense features", s.dense_features == d.dense_features), ("domains", s.domains == d.domains),
    ) if not same]  # fmt: skip
    if problems:
        raise ConfigError(f"train.distill_teacher: {directory} was trained on other data than this run "
                          f"({', '.join(problems)} differ)")  # fmt: skip
    model = build_run_model(config, s)
    load_weights(directory / "best.safetensors", model)
    return model, config


def _typed_params(params: dict[str, Any], allowed: dict[str, Any], name: str) -> dict[str, Any]:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"model.params: unknown key(s) {unknown} for model.name={name!r}; allowed: {sorted(allowed)}")
    return {key: _coerce(allowed[key], value, f"model.params.{key}") for key, value in params.items()}


def _construct(cls: type[nn.Module], name: str, *args: Any, **kwargs: Any) -> nn.Module:
    try:
        return cls(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.params: {exc} (model.name={name!r})") from None


# ------------------------------------------------------------------------------------------------ serving state
@dataclass
class RankingState:
    """What ranking with a trained model needs besides its config and weights, without the dataset.

    Files (``save`` / ``load``, all written atomically, read without executing code)::

        ranking_state.json      format, dataset name and split, the schema (sizes, tasks, actions, user feature
                                names and sizes, dense feature names, data notes, domain names; a file without
                                ``domains`` has none), the raw values behind each user
                                feature's ids, and the dense features' scalars (time index base, smoothing, time zone)
        ranking_item_ids.json   external item id of internal id i at position i - 1
        ranking_features.npz    the dense features' training statistics (``DenseFeatureState`` arrays), with the
                                per-user part left out: a user asked about by raw history is unknown to training

    ``user_feature_values[name]``: the raw value of feature id i at position i - 1, or None when the values are
    not known (the dataset was given coded ids; then ids 1..size are accepted as they are).
    """

    schema: RankingSchema
    item_map: IdMap
    features: DenseFeatureState
    user_feature_values: dict[str, list[str] | None]
    dataset: str
    split: str
    time_cuts: tuple[int, int] | None = None

    @classmethod
    def from_dataset(
        cls, dataset: RankingDataset, user_feature_values: dict[str, list[str] | None] | None = None
    ) -> "RankingState":
        values = {name: None for name in dataset.schema.user_features}
        values.update(user_feature_values or {})
        return cls(dataset.schema, dataset.item_map, dataset.dense_feature_state(users=False), values, dataset.name,
                   dataset.split, dataset.time_cuts)  # fmt: skip

    def save(self, directory: str | Path) -> None:
        """Write the three state files into ``directory`` (each atomically)."""
        directory = Path(directory)
        s = self.schema
        meta = {
            "format": RANKING_STATE_FORMAT,
            "dataset": self.dataset,
            "split": self.split,
            "time_cuts": list(self.time_cuts) if self.time_cuts else None,
            "schema": {
                "num_items": s.num_items, "num_users": s.num_users, "tasks": list(s.tasks),
                "actions": list(s.actions), "user_features": list(s.user_features),
                "user_feature_sizes": list(s.user_feature_sizes), "dense_features": list(s.dense_features),
                "notes": list(s.notes), "domains": list(s.domains),
            },
            "user_feature_values": self.user_feature_values,
            "dense_feature_state": self.features.scalars(),
        }  # fmt: skip
        write_json(directory / "ranking_state.json", meta)
        write_json(directory / "ranking_item_ids.json", self.item_map.to_json())
        arrays = self.features.arrays()

        def _w(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)

        atomic_write(directory / "ranking_features.npz", _w)

    @classmethod
    def load(cls, directory: str | Path) -> "RankingState":
        """Read the state files (JSON and a pickle-free ``.npz``); ValueError naming the file when one is missing,
        malformed or inconsistent with the others."""
        directory = Path(directory)
        missing = [name for name in RANKING_STATE_FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory} lacks {', '.join(missing)}: it is not a ranking model directory (a directory written by "
                "Ranker.save, or a run directory of `genrec train-ranker` from this genrec version; re-run "
                "train-ranker to get one)"
            )
        path = directory / "ranking_state.json"
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            if meta.get("format") != RANKING_STATE_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {RANKING_STATE_FORMAT}")
            sc = meta["schema"]
            schema = RankingSchema(
                num_items=int(sc["num_items"]), num_users=int(sc["num_users"]), tasks=tuple(sc["tasks"]),
                actions=tuple(sc["actions"]), user_features=tuple(sc["user_features"]),
                user_feature_sizes=tuple(int(x) for x in sc["user_feature_sizes"]),
                dense_features=tuple(sc["dense_features"]), notes=tuple(sc["notes"]),
                domains=_domain_names(sc.get("domains", [])),  # files written before domains: none
            )  # fmt: skip
            values = {str(k): (None if v is None else [str(x) for x in v])
                      for k, v in meta["user_feature_values"].items()}  # fmt: skip
            for name, size in zip(schema.user_features, schema.user_feature_sizes):
                if name not in values or (values[name] is not None and len(values[name]) != size):
                    raise ValueError(f"user_feature_values[{name!r}] does not hold the feature's {size} values")
            scalars = meta["dense_feature_state"]
            cuts = meta.get("time_cuts")
            dataset, split = str(meta["dataset"]), str(meta["split"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a valid ranking state ({exc})") from None
        ids_path = directory / "ranking_item_ids.json"
        try:
            item_map = IdMap.from_json(json.loads(ids_path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{ids_path}: not a list of distinct item ids ({exc})") from None
        if len(item_map) != schema.num_items:
            raise ValueError(f"{ids_path}: {len(item_map)} item ids, but the schema has {schema.num_items} items")
        npz = directory / "ranking_features.npz"
        try:
            with np.load(npz, allow_pickle=False) as z:
                features = DenseFeatureState.from_arrays(scalars, {k: z[k] for k in z.files})
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"{npz}: not a valid dense feature state ({exc})") from None
        if features.names != schema.dense_features or features.item_dense_table.shape[0] != schema.num_items + 1:
            raise ValueError(f"{npz}: the dense features do not match the schema in {path}")
        return cls(schema, item_map, features, values, dataset, split, tuple(cuts) if cuts else None)


def _domain_names(value: Any) -> tuple[str, ...]:
    """A stored list of domain names -> tuple; ValueError unless they are distinct non-empty strings."""
    if not isinstance(value, list) or not all(isinstance(d, str) and d for d in value) or len(set(value)) != len(value):
        raise ValueError(f"schema.domains {value!r} is not a list of distinct non-empty names")
    return tuple(value)


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass
class Predictions:
    """Flat per-candidate predictions of one part (see the module docstring for the arrays)."""

    tasks: tuple[str, ...]
    user_ids: np.ndarray  # [N] int64
    item_ids: np.ndarray  # [N] int64
    cand_times: np.ndarray  # [N] int64
    probs: np.ndarray  # [N, T] float32
    labels: np.ndarray  # [N, T] float32

    def metrics(self) -> dict[str, dict[str, Any]]:
        """``{task: genrec.eval.ranking_metrics.ranking_metrics report}``."""
        return multitask_ranking_metrics(self.probs, self.labels, self.user_ids, self.tasks)

    def save(self, path: str | Path) -> None:
        """Write the arrays to an ``.npz`` file, atomically."""

        def _w(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, user_ids=self.user_ids, item_ids=self.item_ids, cand_times=self.cand_times,
                         probs=self.probs, labels=self.labels, tasks=np.array(self.tasks))  # fmt: skip

        atomic_write(path, _w)


def load_predictions(path: str | Path, like: Predictions | None = None) -> Predictions:
    """Predictions saved by :meth:`Predictions.save`; with ``like``, ValueError unless both hold the same candidates
    (users, items, times, labels and tasks), so a paired comparison pairs the same examples."""
    with np.load(path, allow_pickle=False) as z:
        pred = Predictions(tuple(str(t) for t in z["tasks"]), z["user_ids"], z["item_ids"], z["cand_times"],
                           z["probs"], z["labels"])  # fmt: skip
    if like is not None:
        for name in ("user_ids", "item_ids", "cand_times", "labels"):
            if not np.array_equal(getattr(pred, name), getattr(like, name)):
                raise ValueError(f"{path}: {name} differ from the predictions it is compared with (other data?)")
        if pred.tasks != like.tasks:
            raise ValueError(f"{path}: tasks {pred.tasks} differ from {like.tasks}")
    return pred


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: RankingDataset,
    part: str,
    *,
    batch_size: int,
    max_history: int,
    max_candidates: int,
    device: torch.device | str = "cpu",
    dist: DistInfo | None = None,
) -> Predictions:
    """Score every row of ``part`` (in the dataset's fixed row order) in eval mode.

    ``dist``: a data-parallel run; every process calls ``predict`` alike, scores batches ``rank, rank + N, ...`` of
    the one-process batches (same rows, same ``batch_size``) and gets all predictions, gathered in the one-process
    order: the arrays, and so the metrics, equal the one-process ones."""
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in ("probs", "labels", "users", "items", "times")}
    if dist is None:
        batches = dataset.batches(part, batch_size, shuffle=False, max_history=max_history,
                                  max_candidates=max_candidates)  # fmt: skip
    else:
        batches = _batches_of_process(dataset, part, batch_size, max_history, max_candidates, dist)
    for batch in batches:
        logits = model(batch.to(device)).float().cpu()  # [B, C, T]
        if not bool(torch.isfinite(logits[batch.cand_mask]).all()):
            raise FloatingPointError(f"the model gave NaN or infinite logits on the {part} part")
        probs, labels, users = flatten_candidates(torch.sigmoid(logits), batch.labels, batch.cand_mask, batch.user_ids)
        chunks["probs"].append(probs.astype(np.float32))
        chunks["labels"].append(labels.astype(np.float32))
        chunks["users"].append(users)
        chunks["items"].append(batch.cand_items[batch.cand_mask].numpy())
        chunks["times"].append(batch.cand_times[batch.cand_mask].numpy())
    if dist is not None:
        chunks = _gather_in_batch_order(chunks, dist)
    T = dataset.schema.num_tasks
    empty = {"probs": (0, T), "labels": (0, T)}
    cat = {k: np.concatenate(v) if v else np.zeros(empty.get(k, 0)) for k, v in chunks.items()}
    return Predictions(dataset.schema.tasks, cat["users"].astype(np.int64), cat["items"].astype(np.int64),
                       cat["times"].astype(np.int64), cat["probs"].astype(np.float32),
                       cat["labels"].astype(np.float32))  # fmt: skip


def _batches_of_process(dataset: RankingDataset, part: str, batch_size: int, max_history: int,
                        max_candidates: int, dist: DistInfo):  # fmt: skip
    """The evaluation batches process ``dist.rank`` scores: batches ``rank, rank + N, ...`` of
    ``dataset.batches(part, batch_size, shuffle=False, ...)``, the others not built at all."""
    rows = dataset.rows(part, max_candidates)
    which_all = dataset.batch_rows(part, batch_size, shuffle=False, max_candidates=max_candidates)
    for index, which in enumerate(which_all):
        if index % dist.world_size == dist.rank:
            yield dataset.make_batch(rows, which, max_history, False)


def _gather_in_batch_order(chunks: dict[str, list[np.ndarray]], dist: DistInfo) -> dict[str, list[np.ndarray]]:
    """Every process's per-batch arrays ({name: [this process's batches]}), on every process, in batch order:
    batch i is the (i // N)-th batch of process i % N."""
    parts = gather_objects(chunks, dist)
    total = sum(len(p["probs"]) for p in parts)
    N = dist.world_size
    return {k: [parts[i % N][k][i // N] for i in range(total)] for k in chunks}


def protocol(dataset: RankingDataset, part: str, config: RankingRunConfig) -> dict[str, Any]:
    """What a result was measured on: dataset, split, part, tasks, row shape, counts, base rates, metric definitions."""
    dc = config.data
    counts = dataset.counts(part, dc.max_candidates)
    return {
        "dataset": dataset.name,
        "split": dataset.split,
        "part": part,
        "tasks": list(dataset.schema.tasks),
        "n_eval": dc.n_eval if dataset.split == "user-last" else None,
        "time_cuts": list(dataset.time_cuts) if dataset.time_cuts else None,
        "max_history": dc.max_history,
        "max_candidates": dc.max_candidates,
        "rows": counts["rows"],
        "candidates": counts["candidates"],
        "users": counts["users"],
        "base_rates": counts["base_rates"],
        "unit": "every real candidate of every row of the part; GAUC and the bootstrap group by user",
        "metrics": METRIC_DEFINITIONS,
    }


# ------------------------------------------------------------------------------------------------ training
@dataclass
class RankingTrainState:
    epoch: int = 0  # epochs finished
    best_epoch: int = 0
    best_value: float | None = None  # selection value of the best epoch (None before the first)
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**63 - 1)


def selection_value(metrics: dict[str, dict[str, Any]], select_metric: str, tasks: tuple[str, ...]) -> float:
    """Mean over ``tasks`` of ``select_metric``; ValueError naming the task when it is undefined for one."""
    key, _ = RANKING_SELECT_METRICS[select_metric]
    values = []
    for task in tasks:
        value = metrics[task][key]
        if not math.isfinite(value):
            reason = metrics[task]["undefined"].get(key, "not a finite number")
            raise ValueError(
                f"train.select_metric={select_metric!r} is undefined on the validation part for task {task!r} "
                f"({reason}); choose another train.select_metric, or give the task weight 0 in train.task_weights"
            )
        values.append(value)
    return float(np.mean(values))


def train_ranker(
    config: RankingRunConfig,
    *,
    dataset: RankingDataset | None = None,
    model: nn.Module | None = None,
    teacher: TeacherTargets | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    dist: DistInfo | None = None,
) -> dict:
    """Train ``config`` into ``config.output_dir``; return the results dict (also written to ``results.json``).

    Args:
        dataset: an already built ranking dataset (``config.data.dataset`` and ``config.data.split`` must then name
            it, or the split be None, and ``config.data.domains`` / ``config.data.only_domain`` describe its domains);
            by default the dataset is loaded from ``config.data`` (with its domain definition and only_domain).
        model: a ranker following the contract (``forward``, ``loss``) to train instead of building
            ``config.model`` (results then name its class); on resume pass the same kind of model again.
        teacher: with ``train.distill_teacher`` set, that teacher's logits on this dataset's training candidates
            (:func:`genrec.train.distill.teacher_targets`), computed once and shared by several students; by default
            they are computed here from the teacher run directory.
        overwrite: replace the run in ``output_dir`` (its run files, ``RANKING_RUN_FILES``, are removed first).
        resume: continue the run in ``output_dir`` from its ``checkpoint.pt``; the stored model and data sections,
            ``train.seed``, ``train.task_weights`` and ``train.select_metric`` must equal ``config``'s.
        progress: a tqdm bar per epoch while stderr is a terminal (per-epoch log lines either way).
        dist: this process's place in a data-parallel run (``genrec.train.distributed.init_from_env``), or None
            for a one-process run. Every process calls ``train_ranker`` with the same arguments; ``train.batch_size``
            is the global batch and must divide by the number of processes, and ``train.task_balancing`` must be
            fixed. Process 0 checks and writes the run directory; every process needs the data. All return the
            results dict.
    """
    config = with_absolute_paths(config)
    if dist is not None:
        check_batch_size(config.train.batch_size, dist.world_size)
        if config.train.task_balancing != "fixed":
            raise ConfigError(f"train.task_balancing: {config.train.task_balancing!r} combines the per-task losses or "
                              "gradients of the whole batch, which data-parallel training does not support; use "
                              "fixed, or train on one process")  # fmt: skip
    is_main = dist is None or dist.is_main
    if config.train.distill_teacher is not None:  # the saved config must find the teacher from anywhere
        teacher_dir = os.path.abspath(os.path.expanduser(config.train.distill_teacher))
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, distill_teacher=teacher_dir))
    dc, tc = config.data, config.train
    out = Path(config.output_dir)
    canonical = DATASET_ALIASES.get(dc.dataset, dc.dataset)
    if dataset is None and canonical not in RANKING_DATASETS:
        known = ", ".join(repr(n) for n in [*RANKING_DATASETS, *DATASET_ALIASES])
        raise ConfigError(f"data.dataset: {dc.dataset!r} is not a ranking dataset; known: {known}")
    resumed_fields = ("seed", "task_weights", "select_metric", "task_balancing", "balancer_lr", "distill_teacher",
                      "distill_weight", "distill_head", "distill_temperature")

    def check_directory() -> tuple[list[str], dict | None]:
        existing = check_run_directory(out, RANKING_RUN_FILES, resume=resume, overwrite=overwrite)
        if not resume:
            return existing, None
        return existing, resume_state(out, lambda stored: config_differences(
            with_absolute_paths(load_ranking_config(stored)), config, ("model", "data"), resumed_fields))

    existing, saved = run_on_main(dist, check_directory)  # process 0 reads; the others get its answer
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    device = training_device(tc.device, dist)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={tc.device!r}, but this PyTorch build sees no CUDA device "
                         "(use train.device=cpu)")  # fmt: skip

    if dataset is None:
        dataset = load_ranking_dataset(canonical, data_dir=dc.data_dir, split=dc.split, n_eval=dc.n_eval,
                                       max_candidates=dc.max_candidates, domains=dc.domains,
                                       only_domain=dc.only_domain)  # fmt: skip
    else:
        _check_dataset_matches(dataset, config)
    if dc.train_until is not None:
        try:
            dataset = dataset.restrict_training_until(dc.train_until)
        except ValueError as exc:
            raise ConfigError(f"data.train_until: {exc}") from None
    schema = dataset.schema
    log.info("data: %s", dataset.describe(dc.max_candidates))
    for part in ("train", "valid", "test"):
        if len(dataset.rows(part, dc.max_candidates)) == 0:
            raise ValueError(f"{dataset.name} (split {dataset.split!r}): the {part} part has no rows")
    weights = tc.task_weights or (1.0,) * schema.num_tasks
    if len(weights) != schema.num_tasks:
        raise ConfigError(f"train.task_weights: {len(weights)} weights for the dataset's {schema.num_tasks} tasks "
                          f"{list(schema.tasks)}")  # fmt: skip
    select_tasks = tuple(t for t, w in zip(schema.tasks, weights) if w > 0)
    model_name = config.model.name if model is None else type(model).__name__

    torch.manual_seed(tc.seed)
    if model is None:
        model = build_run_model(config, schema)
    elif tc.distill_teacher is not None and tc.distill_head == "aux" and not isinstance(model, ServingHeads):
        raise ValueError("train.distill_head=aux: pass a model built by build_run_model (a ServingHeads ranker on "
                         "the schema with the teacher's tasks), or none")  # fmt: skip
    model = model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fitted_by_counting = not trainable and hasattr(model, "fit")
    if not trainable and not fitted_by_counting:
        raise ValueError(f"{model_name}: the model has no trainable parameters and no fit(batches) method")
    if fitted_by_counting and tc.task_balancing != "fixed":
        raise ConfigError(f"train.task_balancing: {tc.task_balancing!r} needs a model trained by gradient steps; "
                          f"{model_name} is fitted by counting (use fixed)")  # fmt: skip
    if isinstance(model, LogisticRegressionRanker) and tc.task_balancing in ("mgda", "pe-ltr"):
        raise ConfigError(f"train.task_balancing: {tc.task_balancing!r} balances the gradients of shared parameters, "
                          "but the logistic regression is one separate linear model per task (nothing is shared); "
                          "use fixed or uncertainty")  # fmt: skip
    try:
        balancer = build_balancer(tc.task_balancing, schema.tasks, weights, model).to(device)
    except ValueError as exc:
        raise ConfigError(f"train.task_balancing: {tc.task_balancing!r}: {exc}") from None
    optimizer = (torch.optim.AdamW(trainable, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
                 if trainable else None)  # fmt: skip
    if optimizer is not None and balancer.extra_parameters():  # uncertainty's log-variances: no weight decay
        optimizer.add_param_group({"params": balancer.extra_parameters(), "weight_decay": 0.0,
                                   "lr": tc.lr if tc.balancer_lr is None else tc.balancer_lr})  # fmt: skip
    base_model = model.inner if isinstance(model, ServingHeads) else model
    with_hist_labels = bool(getattr(getattr(base_model, "config", None), "variant", None) == "interleaved"
                            and dataset.hist_labels_available)  # fmt: skip
    if with_hist_labels and isinstance(model, ServingHeads):
        raise ConfigError("train.distill_head=aux: the interleaved HSTU ranker also learns from its history events' "
                          "labels, for which the teacher has no logits; use train.distill_head=serving")  # fmt: skip
    state = RankingTrainState()
    ckpt_path = out / "checkpoint.pt"
    if saved is not None:
        check_shapes(ckpt_path, saved["model"], model)
        try:
            model.load_state_dict(saved["model"])
            if optimizer is not None:
                optimizer.load_state_dict(saved["optimizer"])
            balancer.load_state_dict(saved.get("balancer", {}))
            torch.set_rng_state(saved["torch_rng"])
            state = RankingTrainState(**saved["train_state"])
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{ckpt_path}: cannot resume from it ({str(exc).strip().splitlines()[0]})") from None

    if tc.task_balancing != "fixed":
        _check_per_task_losses(model, dataset, config, device, with_hist_labels)
    targets: TeacherTargets | None = None
    if teacher is not None and tc.distill_teacher is None:
        raise ValueError("teacher targets were given, but train.distill_teacher is not set")
    if tc.distill_teacher is not None and fitted_by_counting:
        raise ConfigError(f"train.distill_teacher: {model_name} is fitted by counting, not by gradient steps")
    if teacher is not None:
        if teacher.tasks != schema.tasks:
            raise ValueError(f"teacher targets for tasks {teacher.tasks}, the dataset has {schema.tasks}")
        targets = teacher
    elif tc.distill_teacher is not None:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # building the teacher draws initial weights: keep the run's stream
            teacher_model, teacher_config = load_teacher(tc.distill_teacher, dataset)
            targets = teacher_targets(teacher_model.to(device), dataset, "train", batch_size=tc.eval_batch_size,
                                      max_history=teacher_config.data.max_history,
                                      max_candidates=teacher_config.data.max_candidates, device=device)  # fmt: skip
        del teacher_model
        log.info("distillation: teacher %s (%s) scored %d training candidates in %.1fs; head %s, weight %g, "
                 "temperature %g", tc.distill_teacher, teacher_config.model.name, targets.events.size,
                 time.perf_counter() - t0, tc.distill_head, tc.distill_weight, tc.distill_temperature)  # fmt: skip
    valid_protocol = protocol(dataset, "valid", config)
    # The selection metric's definedness depends on the validation labels only: check it before writing anything.
    _check_selection_defined(dataset, config, select_tasks)

    if dist is not None:
        log.info("data-parallel: process %d of %d (%s), %d rows per process of each global batch of %d", dist.rank,
                 dist.world_size, dist.backend, tc.batch_size // dist.world_size, tc.batch_size)  # fmt: skip
        if any(isinstance(m, Dice) for m in model.modules()):
            log.warning("data-parallel: DIN's Dice activation normalises with each process's batch statistics, so "
                        "this run matches a one-process run in distribution, not exactly (use activation=prelu)")

    # Everything is checked: from here on the run directory is written (by process 0 alone).
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        for name in remove_stale_temporaries(out, RANKING_RUN_FILES):
            log.info("removed %s, a temporary file left by an interrupted write", name)
        if overwrite and existing:
            for name in RANKING_RUN_FILES:
                (out / name).unlink(missing_ok=True)
            log.info("overwrite: removed the previous run's files from %s", out)
        save_config(config, out / "config.yaml")
        RankingState.from_dataset(dataset).save(out)  # what ranking with the trained model needs (genrec.ranking_api)
        if saved is not None:
            write_log(out / "log.jsonl", state.history)  # exactly the epochs the checkpoint covers
            log.info("resumed from %s after epoch %d", ckpt_path, state.epoch)
    # Data-parallel: the step's module is DistributedDataParallel around the loss (built after the resumed weights
    # are loaded, so every process starts from the same ones; DDP broadcasts process 0's anyway).
    step_module = None
    if dist is not None and not fitted_by_counting:
        step_module = wrap_ddp(RankingObjective(model), dist, device)

    epochs = 1 if fitted_by_counting else tc.epochs
    higher_better = RANKING_SELECT_METRICS[tc.select_metric][1]
    while state.epoch < epochs and state.bad_epochs < tc.patience:
        epoch = state.epoch + 1
        seed = _epoch_seed(tc.seed, epoch)
        torch.manual_seed(seed)
        if targets is None:
            batches = dataset.batches("train", tc.batch_size, shuffle=True, seed=seed, max_history=dc.max_history,
                                      max_candidates=dc.max_candidates, with_hist_labels=with_hist_labels)  # fmt: skip
        else:
            batches = distilled_batches(dataset, targets, head=tc.distill_head, weight=tc.distill_weight,
                                        temperature=tc.distill_temperature, batch_size=tc.batch_size, seed=seed,
                                        max_history=dc.max_history, max_candidates=dc.max_candidates,
                                        with_hist_labels=with_hist_labels)  # fmt: skip
        if tc.max_steps_per_epoch > 0:
            batches = itertools.islice(batches, tc.max_steps_per_epoch)
        t0 = time.perf_counter()
        if fitted_by_counting:
            model.fit(b.to(device) for b in batches)
            row_loss: dict[str, Any] = {"loss": None, "task_losses": None, "fitted_by_counting": True}
        elif dist is None:
            row_loss = _train_epoch(model, optimizer, balancer, batches, device, epoch, out, progress, schema.tasks)
        else:
            row_loss = _train_epoch_data_parallel(model, step_module, optimizer, balancer, batches, device, epoch,
                                                  out, progress and is_main, schema.tasks, dist)  # fmt: skip
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        valid = predict(model, dataset, "valid", batch_size=tc.eval_batch_size, max_history=dc.max_history,
                        max_candidates=dc.max_candidates, device=device, dist=dist).metrics()  # fmt: skip
        value = selection_value(valid, tc.select_metric, select_tasks)
        eval_seconds = time.perf_counter() - t1
        best = state.best_value
        improved = best is None or (value > best if higher_better else value < best)
        if improved:
            state.best_value, state.best_epoch, state.bad_epochs = value, epoch, 0
            if is_main:
                save_weights(out / "best.safetensors", model)
                write_json(out / "best.json", _json_safe({"epoch": epoch, "select_metric": tc.select_metric,
                                                          "select_value": value, "protocol": valid_protocol,
                                                          "metrics": valid}))  # fmt: skip
        else:
            state.bad_epochs += 1
        row = {"epoch": epoch, **row_loss, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
               "select_value": value, "valid": _json_safe(valid)}  # fmt: skip
        state.history.append(row)
        state.epoch = epoch
        if is_main:
            with open(out / "log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        log.info("epoch %d loss %s valid %s %.4f (best %.4f @ %d) %.1fs train %.1fs eval", epoch,
                 "-" if row["loss"] is None else f"{row['loss']:.4f}", tc.select_metric, value, state.best_value,
                 state.best_epoch, train_seconds, eval_seconds)  # fmt: skip
        if is_main:
            save_state(ckpt_path, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else {},
                "torch_rng": torch.get_rng_state(),
                "balancer": balancer.state_dict(),
                "train_state": dataclasses.asdict(state),
                "genrec_version": __version__,
            })  # fmt: skip

    # Test once, with the best validation epoch's weights (process 0 reads the weights it wrote and hands them on).
    if is_main:
        load_weights(out / "best.safetensors", model)
    if dist is not None:
        broadcast_module(model, dist)
    test_pred = predict(model, dataset, "test", batch_size=tc.eval_batch_size, max_history=dc.max_history,
                        max_candidates=dc.max_candidates, device=device, dist=dist)  # fmt: skip
    test = test_pred.metrics()
    if is_main:
        test_pred.save(out / "test_predictions.npz")
    log.info("test @ best epoch %d: %s", state.best_epoch, _fmt(test))
    best_row = state.history[state.best_epoch - 1]
    done = [h["train_seconds"] for h in state.history]
    results = {
        "kind": "ranking",
        "dataset": dataset.name,
        "split": dataset.split,
        "model": model_name,
        "tasks": list(schema.tasks),
        "task_weights": list(weights),
        "task_balancing": tc.task_balancing,
        "distillation": None if tc.distill_teacher is None else {
            "teacher": tc.distill_teacher, "head": tc.distill_head, "weight": tc.distill_weight,
            "temperature": tc.distill_temperature,
            "rule": "loss = (1 - weight) * BCE(labels) + weight * BCE(sigmoid(teacher logit / temperature)), through "
                    + ("the serving heads" if tc.distill_head == "serving" else "one auxiliary head per task"),
        },
        "selection": {
            "metric": tc.select_metric,
            "direction": "higher is better" if higher_better else "lower is better",
            "tasks": list(select_tasks),
            "rule": "mean over these tasks of the metric on the validation part; early stopping after "
            f"{tc.patience} epoch(s) without improvement; the test part is evaluated once, for the best epoch",
        },
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "stopped_early": state.bad_epochs >= tc.patience,
        "fitted_by_counting": fitted_by_counting,
        "seconds_per_epoch": float(np.median(done)) if done else None,
        "valid": {"protocol": valid_protocol, "select_value": best_row["select_value"], "metrics": best_row["valid"]},
        "test": {"protocol": protocol(dataset, "test", config), "metrics": test, "predictions": "test_predictions.npz"},
        "data": {"summary": dataset.describe(dc.max_candidates), "notes": list(schema.notes)},
        "config": config.to_dict(),
        "genrec_version": __version__,
    }
    if dist is not None:
        results["distributed"] = {"processes": dist.world_size, "backend": dist.backend}
    results = _json_safe(results)
    if is_main:
        write_json(out / "results.json", results)
    return results


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, balancer: TaskBalancer, batches,
                 device: torch.device, epoch: int, out: Path, progress: bool, tasks: tuple[str, ...]
                 ) -> dict[str, Any]:  # fmt: skip
    """One pass over the training batches: the candidate-weighted mean loss (Σ_t w_t · loss_t, the ranker's total),
    the per-task losses when the ranker reports them, and ``task_balance``: the balancing method, the candidate-
    weighted mean of the objective it back-propagated, the mean over steps of the weight it put on each task's loss
    (:mod:`genrec.train.multitask`) and, for uncertainty weighting, the log-variances after the epoch."""
    model.train()
    total, count = 0.0, 0
    objective_sum, weight_sum, steps = 0.0, torch.zeros(len(tasks), dtype=torch.float64), 0
    task_sums: dict[str, float] | None = None
    bar = tqdm(batches, desc=f"epoch {epoch}", disable=not (progress and is_terminal(sys.stderr)), leave=False)
    for step, batch in enumerate(bar, start=1):
        batch = batch.to(device)
        output = model.loss(batch)
        loss, per_task = output if isinstance(output, tuple) else (output, None)
        value = loss.item()
        check_loss_finite(value, epoch, step, out)
        optimizer.zero_grad(set_to_none=True)
        stacked = None if per_task is None or balancer.method == "fixed" else _stack_tasks(per_task, tasks)  # [T]
        balanced = balancer.backward(loss, stacked)
        optimizer.step()
        n = int(batch.cand_mask.sum())
        total += value * n
        count += n
        objective_sum += balanced.objective * n
        weight_sum += balanced.weights
        steps += 1
        if per_task is not None:
            task_sums = task_sums or {t: 0.0 for t in tasks}
            for t in tasks:
                if t in per_task:
                    task_sums[t] += float(torch.as_tensor(per_task[t]).detach()) * n
        bar.set_postfix(loss=f"{value:.4f}")
    if count == 0:
        raise ValueError(f"epoch {epoch}: no training candidate was seen (empty training part?)")
    task_losses = None if task_sums is None else {t: s / count for t, s in task_sums.items()}
    balance: dict[str, Any] = {"method": balancer.method, "objective": objective_sum / count,
                               "weights": dict(zip(tasks, (weight_sum / steps).tolist()))}  # fmt: skip
    if hasattr(balancer, "log_variances"):
        balance["log_variances"] = dict(zip(tasks, balancer.log_variances.detach().cpu().double().tolist()))
    return {"loss": total / count, "task_losses": task_losses, "task_balance": balance}


class RankingObjective(nn.Module):
    """A ranker's training loss as a module, so that DistributedDataParallel can wrap it (DDP reduces the gradients
    of what its ``forward`` computes; ``model.loss`` called directly would bypass it).

    ``forward(batch, scale) -> (objective, {task: scale_t · loss_t} or None)``: the ranker's ``loss(batch)`` with
    each task's loss multiplied by its ``scale``. A float scales every task alike (the total is scaled; any ranker);
    a [T] tensor, one per task of the ranker's loss, needs a ranker that reports its per-task losses and exposes
    ``schema`` and ``task_weights`` (the built-in rankers do), and gives Σ_t w_t · scale_t · loss_t.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: RankingBatch, scale: float | torch.Tensor):
        output = self.model.loss(batch)
        total, per_task = output if isinstance(output, tuple) else (output, None)
        if not torch.is_tensor(scale):
            scaled = None if per_task is None else {t: torch.as_tensor(v) * scale for t, v in per_task.items()}
            return total * scale, scaled
        names, weights = _loss_tasks(self.model, per_task)
        stacked = torch.stack([torch.as_tensor(per_task[t]).reshape(()) for t in names])  # [T]
        terms = stacked * scale.to(device=stacked.device, dtype=stacked.dtype)  # [T]
        objective = (terms * torch.as_tensor(weights).to(device=stacked.device, dtype=stacked.dtype)).sum()
        return objective, {t: terms[i] for i, t in enumerate(names)}


def _loss_tasks(model: nn.Module, per_task: dict[str, torch.Tensor] | None) -> tuple[tuple[str, ...], Any]:
    """(the task names of ``model.loss``'s per-task losses, in its schema's order, their loss weights w_t)."""
    inner = model.inner if isinstance(model, ServingHeads) else model
    schema, weights = getattr(inner, "schema", None), getattr(inner, "task_weights", None)
    if per_task is None or schema is None or weights is None or any(t not in per_task for t in schema.tasks):
        raise ValueError(f"data-parallel training on data with label weights needs a ranker whose loss reports "
                         f"every task's loss ((total, {{task: loss}})) and that has schema and task_weights "
                         f"attributes, as the built-in rankers do; {type(inner).__name__} does not")  # fmt: skip
    return tuple(schema.tasks), weights


def _label_mass(model: nn.Module, batch: RankingBatch) -> torch.Tensor:
    """What the per-task means of ``model.loss(batch)`` divide by: [1] float64, the same for every task (real
    candidates), or [T] float64 with ``label_weights`` (their sum over real candidates); plus, for the interleaved
    HSTU ranker learning from ``hist_labels``, the real history events it keeps (``keep_most_recent``)."""
    real = batch.cand_mask.to(torch.float64)  # [B, C]
    if batch.label_weights is None:
        mass = real.sum().reshape(1)  # [1]
    else:
        mass = (real.unsqueeze(-1) * batch.label_weights.to(torch.float64)).sum(dim=(0, 1))  # [T]
    inner = model.inner if isinstance(model, ServingHeads) else model
    if isinstance(inner, HSTURanker) and inner.config.variant == "interleaved" and batch.hist_labels is not None:
        mass = mass + batch.hist_lengths.clamp(max=inner.config.max_history).sum().to(torch.float64)
    return mass


def _shard_scale(model: nn.Module, batch: RankingBatch, part: RankingBatch | None, world_size: int
                 ) -> float | torch.Tensor:  # fmt: skip
    """The scale of each task's loss on this process's rows ``part`` of the global ``batch`` (None: no rows): its
    share of the batch's label mass times ``world_size``, so that the mean over the processes of
    scale_t · loss_t(part) is loss_t(batch), and DDP's average of the gradients the global batch's gradient. A float
    when every task's mass is the same (no label weights), else a [T] tensor; 0 for a task the batch has no label
    of."""
    whole = _label_mass(model, batch)
    mine = torch.zeros_like(whole) if part is None else _label_mass(model, part)
    scale = torch.where(whole > 0, world_size * mine / whole.clamp(min=1e-300), torch.zeros_like(whole))
    return float(scale[0]) if batch.label_weights is None else scale


def _ranking_rows(batch: RankingBatch, lo: int, hi: int) -> RankingBatch:
    """Rows ``[lo, hi)`` of ``batch`` (every tensor of a RankingBatch has the batch on dim 0), at its full width."""
    return RankingBatch(**{f.name: None if getattr(batch, f.name) is None else getattr(batch, f.name)[lo:hi]
                           for f in dataclasses.fields(batch)})  # fmt: skip


def _train_epoch_data_parallel(model: nn.Module, step_module: nn.Module, optimizer: torch.optim.Optimizer,
                               balancer: TaskBalancer, batches, device: torch.device, epoch: int, out: Path,
                               progress: bool, tasks: tuple[str, ...], dist: DistInfo) -> dict[str, Any]:  # fmt: skip
    """``_train_epoch`` for one process of a data-parallel run, returning what the one-process run returns.

    ``batches`` are the global batches (every process builds each); this process trains on its rows of each
    (``shard_bounds``) through ``step_module`` (DDP around :class:`RankingObjective`), with its dropout masks cut
    from the global batch's (``global_batch_dropout``) and its losses scaled by its share of the batch's labels
    (``_shard_scale``). A process with no row of a short last batch takes part with the first row and scale 0.
    The logged losses are the all-reduced ones, so every process sees (and checks) the global batch's loss; the
    check comes before the backward pass, so a non-finite loss stops every process at the same step."""
    step_module.train()
    total, count = 0.0, 0
    objective_sum, weight_sum, steps = 0.0, torch.zeros(len(tasks), dtype=torch.float64), 0
    task_sums: dict[str, float] | None = None
    bar = tqdm(batches, desc=f"epoch {epoch}", disable=not (progress and is_terminal(sys.stderr)), leave=False)
    for step, batch in enumerate(bar, start=1):
        rows = batch.cand_mask.shape[0]
        lo, hi = shard_bounds(rows, dist.rank, dist.world_size)
        part = _ranking_rows(batch, lo, hi) if hi > lo else None
        scale = _shard_scale(model, batch, part, dist.world_size)
        if part is None:
            part, lo = _ranking_rows(batch, 0, 1), 0
        with global_batch_dropout(model, RowShard(row_offset=lo, global_rows=rows)):
            objective, per_task = step_module(part.to(device), scale)
        logged = [] if per_task is None else [t for t in tasks if t in per_task]
        means = all_reduce_means([float(objective.detach()), *(float(per_task[t].detach()) for t in logged)],
                                 dist, device)  # fmt: skip
        value = means[0]
        check_loss_finite(value, epoch, step, out)
        optimizer.zero_grad(set_to_none=True)
        balanced = balancer.backward(objective, None)  # fixed balancing (train_ranker refuses the others)
        optimizer.step()
        n = int(batch.cand_mask.sum())
        total += value * n
        count += n
        objective_sum += value * n
        weight_sum += balanced.weights
        steps += 1
        if per_task is not None:
            task_sums = task_sums or {t: 0.0 for t in tasks}
            for t, mean in zip(logged, means[1:]):
                task_sums[t] += mean * n
        bar.set_postfix(loss=f"{value:.4f}")
    if count == 0:
        raise ValueError(f"epoch {epoch}: no training candidate was seen (empty training part?)")
    task_losses = None if task_sums is None else {t: s / count for t, s in task_sums.items()}
    balance: dict[str, Any] = {"method": balancer.method, "objective": objective_sum / count,
                               "weights": dict(zip(tasks, (weight_sum / steps).tolist()))}  # fmt: skip
    return {"loss": total / count, "task_losses": task_losses, "task_balance": balance}


def _stack_tasks(per_task: dict[str, torch.Tensor], tasks: tuple[str, ...]) -> torch.Tensor:
    """{task: loss_t} -> [T] in schema order (every task must be there)."""
    missing = [t for t in tasks if t not in per_task]
    if missing:
        raise ValueError(f"the ranker's loss reports no loss for task(s) {missing}; task balancing needs every task's")
    return torch.stack([torch.as_tensor(per_task[t]).reshape(()) for t in tasks])


def _check_per_task_losses(model: nn.Module, dataset: RankingDataset, config: RankingRunConfig, device: torch.device,
                           with_hist_labels: bool) -> None:  # fmt: skip
    """A balancing other than fixed reads the per-task losses: refuse, before anything is written, a ranker whose
    ``loss`` returns only a total or leaves a task out (checked on the first training batch, in eval mode, without
    gradients and without drawing random numbers)."""
    dc, tc = config.data, config.train
    batch = next(iter(dataset.batches("train", tc.batch_size, shuffle=False, max_history=dc.max_history,
                                      max_candidates=dc.max_candidates, with_hist_labels=with_hist_labels)))  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model.loss(batch.to(device))
    finally:
        model.train(was_training)
    name = type(model).__name__
    if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict)):
        raise ConfigError(f"train.task_balancing: {tc.task_balancing!r} needs the per-task losses, but "
                          f"{name}.loss returns {type(output).__name__} instead of (total, {{task: loss}})")  # fmt: skip
    try:
        _stack_tasks(output[1], dataset.schema.tasks)
    except ValueError as exc:
        raise ConfigError(f"train.task_balancing: {tc.task_balancing!r}: {exc} ({name})") from None


def _check_dataset_matches(dataset: RankingDataset, config: RankingRunConfig) -> None:
    """A dataset passed in must be the one ``config.data`` names (the results are labelled with it)."""
    dc = config.data
    if DATASET_ALIASES.get(dc.dataset, dc.dataset) != dataset.name:
        raise ConfigError(f"data.dataset: {dc.dataset!r}, but the dataset passed in is {dataset.name!r}")
    if dc.split is not None and dc.split != dataset.split:
        raise ConfigError(f"data.split: {dc.split!r}, but the dataset passed in is split {dataset.split!r}")
    _check_domains_match(dataset, dc.domains, dc.only_domain)
    if dataset.split == "user-last":  # the protocol records data.n_eval: it must be the dataset's
        per_user = np.bincount(dataset.ev_user[dataset.ev_part == 1])
        held = np.unique(per_user[per_user > 0])
        if held.size and not (held.size == 1 and int(held[0]) == dc.n_eval):
            raise ConfigError(f"data.n_eval: {dc.n_eval}, but the dataset passed in holds out {int(held.max())} "
                              "validation candidates per user")  # fmt: skip


def dataset_domain_definition(dataset: RankingDataset) -> str | None:
    """The name of the domain definition a loaded dataset was built with, as its loader records it in the schema's
    notes (``domains '<definition>': ...``); None when no note names one (no domains, or a dataset built directly
    from an event table)."""
    for note in dataset.schema.notes:
        if note.startswith("domains '"):
            name, sep, _ = note[len("domains '"):].partition("':")
            if sep:
                return name
    return None


def _check_domains_match(dataset: RankingDataset, domains: str | None, only_domain: str | None) -> None:
    """``data.domains`` / ``data.only_domain`` must describe the dataset passed in: a model trained on other domains
    (or on every domain instead of one) would be stored and reported under the wrong data."""
    has = bool(dataset.schema.domains)
    if domains is None and has:
        raise ConfigError(f"data.domains: None, but the dataset passed in has the domains {list(dataset.schema.domains)}"
                          f" (definition {dataset_domain_definition(dataset)!r}); set data.domains to its definition")
    if domains is not None and not has:
        raise ConfigError(f"data.domains: {domains!r}, but the dataset passed in was built without domains")
    recorded = dataset_domain_definition(dataset) if has else None
    if domains is not None and recorded is not None and recorded != domains:
        raise ConfigError(f"data.domains: {domains!r}, but the dataset passed in was built with the domain "
                          f"definition {recorded!r}")  # fmt: skip
    if only_domain != dataset.only_domain:
        raise ConfigError(f"data.only_domain: {only_domain!r}, but the dataset passed in keeps "
                          + ("every domain" if dataset.only_domain is None else f"only domain {dataset.only_domain!r}"))


def _check_selection_defined(dataset: RankingDataset, config: RankingRunConfig, tasks: tuple[str, ...]) -> None:
    """Refuse a selection metric that the validation labels leave undefined (constant predictions decide it)."""
    dc = config.data
    rows = dataset.rows("valid", dc.max_candidates)
    labels = dataset.ev_labels[rows.cands]  # [K, T]
    users = dataset.ev_user[rows.cands]
    probs = np.full(labels.shape, 0.5, dtype=np.float32)
    metrics = multitask_ranking_metrics(probs, labels, users, dataset.schema.tasks)
    key = RANKING_SELECT_METRICS[config.train.select_metric][0]
    for task in tasks:
        reason = metrics[task]["undefined"].get(key)
        if reason is not None:
            raise ValueError(
                f"train.select_metric={config.train.select_metric!r} is undefined on the validation part for task "
                f"{task!r} ({reason}); choose another train.select_metric, or give the task weight 0 in "
                "train.task_weights"
            )


def _json_safe(value: Any) -> Any:
    """NaN / infinity -> None (strict JSON); an undefined metric's reason is in its report's "undefined" entry."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _fmt(metrics: dict[str, dict[str, Any]]) -> str:
    return "; ".join(
        f"{task}: " + " ".join(f"{k}={r[k]:.4f}" for k in ("auc", "gauc", "ne", "log_loss", "calibration"))
        for task, r in metrics.items()
    )
