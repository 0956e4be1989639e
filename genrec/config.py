"""Typed run configuration: one dataclass per concern, loaded from YAML, overridden with ``--set a.b=value``.

A run config has four sections::

    data:   which dataset, where, how sequences are cut          -> DataConfig
    model:  architecture and its hyper-parameters                -> ModelConfig
    train:  optimiser, loss, epochs, early stopping, seed        -> TrainConfig
    eval:   the evaluation protocol used for selection and test  -> EvalConfig

Every config is checked when it is built (from YAML, from ``--set`` overrides, from a dict or directly in Python):
unknown keys, wrongly typed values, values outside a field's choices (``typing.Literal``) and meaningless numbers
(``train.epochs=0``, ``model.dropout=1.5``) raise ``ConfigError`` naming the field, the value and what is allowed,
so a typo fails before any data is read or any run file is written. The fully resolved config is written next to
every run and inside every checkpoint (``RunConfig.to_dict``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


ColumnRole = Literal["user", "item", "timestamp", "rating", "event"]  # genrec.data.readers.read_table's arguments


@dataclass
class DataConfig:
    """Where the interactions come from and how user sequences are cut."""

    # a registry name (genrec.data.registry.DATASETS), "table"/"sequences" for own files, or "preprocessed" for a
    # directory written by ``python -m genrec.data.preprocess``
    dataset: str = "ml-1m"
    data_dir: str | None = None  # searched before $GENREC_DATA_DIR and the cache dir
    path: str | None = None  # for dataset="table" / "sequences": the file to read; "preprocessed": the directory
    timestamps_path: str | None = None  # for dataset="sequences": optional position-aligned timestamp file
    # for dataset="table": role -> source column (a header name, or a 0-based position); user and item are required
    columns: dict[ColumnRole, str | int] = field(default_factory=dict)
    sep: str | None = None
    header: bool = True
    on_bad_rows: Literal["error", "skip"] = "error"
    max_len: int = 200  # most recent items kept per sequence (history window)
    duplicates: Literal["drop", "keep"] = "drop"  # exact duplicate (user, item, timestamp) rows: drop (counted in a data note) or keep
    min_seq_len: int = 3  # users with fewer interactions cannot be split leave-one-out and are dropped (counted)
    # order of a user's interactions that share one timestamp: "file" (stable sort, file order) or "shuffle" (a
    # random order drawn with ties_seed, as an unstable sort gives; measures how much a result owes to the order)
    ties: Literal["file", "shuffle"] = "file"
    ties_seed: int = 0
    # data-parallel runs on a preprocessed directory: each process reads only its own partitions' users and draws
    # its batches from them (genrec.train.rank_local), instead of every process reading the whole data
    shard_by_rank: bool = False

    def __post_init__(self) -> None:
        _check_fields(self, "data")
        _check(self.dataset != "", "data.dataset", self.dataset, "must name a dataset")
        _at_least(self, "data", max_len=2, min_seq_len=3)
        if self.dataset == "preprocessed":
            _check(bool(self.path), "data.path", self.path, "must name the directory written by python -m "
                   "genrec.data.preprocess for data.dataset=preprocessed")
        _check(not self.shard_by_rank or self.dataset == "preprocessed", "data.shard_by_rank", self.shard_by_rank,
               f"needs data.dataset=preprocessed (a directory partitioned by user), not {self.dataset!r}: only its "
               "partitions let a process read its own users alone")
        if self.dataset == "table":
            missing = [role for role in ("user", "item") if role not in self.columns]
            _check(not missing, "data.columns", self.columns, f"must name the {' and '.join(map(repr, missing))} "
                   "column(s) for data.dataset=table, e.g. {user: user_id, item: item_id, timestamp: ts}")  # fmt: skip


@dataclass
class ModelConfig:
    """Architecture. Fields not used by a model are ignored by it (e.g. ``ffn_dim`` for HSTU)."""

    name: Literal["hstu", "sasrec", "fuxi-alpha"] = "hstu"
    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    attention_dim: int = 50  # HSTU d_qk per head (SASRec: embedding_dim // num_heads, ignored)
    linear_dim: int = 50  # HSTU d_v per head
    ffn_dim: int = 50  # SASRec point-wise feed-forward width; FuXi-α: hidden width of the SwiGLU stage of its FFN
    dropout: float = 0.2  # input (embedding) dropout
    linear_dropout: float = 0.2  # HSTU only: dropout on U * LN(AV) (SASRec uses `dropout` everywhere)
    use_time_bias: bool = True  # HSTU: log-bucketed time-gap term of the relative attention bias (FuXi-α: temporal channel)
    use_position_bias: bool = True  # HSTU: position-offset term of the relative attention bias (FuXi-α: positional channel)
    num_time_buckets: int = 128
    # HSTU: divide SiLU(QK^T + rab) by "max_len" (reference) or "length" (row's true length)
    attention_norm: Literal["max_len", "length"] = "max_len"
    # HSTU: "padded" (plain reference path) or "jagged" (genrec.ops.jagged, same math)
    attention_impl: Literal["padded", "jagged"] = "padded"

    def __post_init__(self) -> None:
        _check_fields(self, "model")
        _at_least(self, "model", embedding_dim=1, num_blocks=0, num_heads=1, attention_dim=1, linear_dim=1, ffn_dim=1,
                  num_time_buckets=1)  # fmt: skip
        for name in ("dropout", "linear_dropout"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"model.{name}", value, "must be in [0, 1)")
        if self.name == "sasrec":
            _check(self.embedding_dim % self.num_heads == 0, "model.num_heads", self.num_heads,
                   f"must divide model.embedding_dim ({self.embedding_dim}) for sasrec")  # fmt: skip


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    num_negatives: int = 128
    # "shared" | "per_sequence" | "per_position" (reference) | "full" (whole catalogue); see train/loss.py
    negatives: Literal["shared", "per_sequence", "per_position", "full"] = "per_sequence"
    # >0: every position also gets this many of the batch's target items as negatives (drawn from the batch's real
    # positions, so by popularity), with logQ correction of every negative logit; not with negatives="full"
    in_batch_negatives: int = 0
    # learning rate over training: "constant", or "cosine" (decay to lr * min_lr_ratio at train.epochs); both after a
    # linear warm-up of warmup_epochs (fractions allowed; 0 = none)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    temperature: float = 0.05
    patience: int = 20  # epochs without validation improvement before stopping
    time_budget_minutes: float = 0.0  # stop after the first epoch that ends past this wall-clock budget (0 = none)
    select_metric: str = "NDCG@10"  # validation metric for early stopping / checkpoint choice: HR@k, NDCG@k or MRR
    seed: int = 42
    num_threads: int = 0  # torch intra-op threads; 0 = leave PyTorch's default
    device: str = "cpu"  # a torch device: "cpu", "cuda", "cuda:1", "mps", ...
    eval_batch_size: int = 128
    max_steps_per_epoch: int = 0  # 0 = whole epoch; >0 only for smoke tests
    length_buckets: int = 0  # >0: sort rows by length within chunks of this many batches (faster, costs quality)
    # "bfloat16": run the encoder under torch.autocast (loss in fp32) where the device has native bf16; elsewhere the
    # run computes in fp32 with a warning (genrec.runtime.resolve_autocast)
    autocast: Literal["none", "bfloat16"] = "none"
    stochastic_length_alpha: float = 0.0  # >0: Stochastic Length (HSTU paper §3.3) on training rows, alpha in (1, 2]
    # Data-parallel runs only (torchrun, genrec train --nproc N; TorchRec installed): "row_wise" or "table_wise" splits
    # the item table over the processes with TorchRec (genrec.train.sharded), updated in the backward pass by FBGEMM's
    # fused optimizer item_table_optimizer at item_table_lr (0 = train.lr; follows train.lr_schedule); the rest of the
    # model stays replicated under AdamW. "none": every process holds the whole table, trained by AdamW with the rest.
    item_table_sharding: Literal["none", "row_wise", "table_wise"] = "none"
    item_table_optimizer: Literal["sgd", "rowwise_adagrad", "adagrad"] = "sgd"
    item_table_lr: float = 0.0

    def __post_init__(self) -> None:
        _check_fields(self, "train")
        _at_least(self, "train", epochs=1, batch_size=1, num_negatives=1, patience=1, num_threads=0, eval_batch_size=1,
                  max_steps_per_epoch=0, length_buckets=0, weight_decay=0.0, time_budget_minutes=0.0, in_batch_negatives=0,
                  warmup_epochs=0.0, min_lr_ratio=0.0, item_table_lr=0.0)  # fmt: skip
        _check(self.warmup_epochs <= self.epochs, "train.warmup_epochs", self.warmup_epochs,
               f"must be <= train.epochs ({self.epochs})")
        _check(self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.in_batch_negatives == 0 or self.negatives != "full", "train.in_batch_negatives",
               self.in_batch_negatives, 'must be 0 with train.negatives="full" (every item is already a negative)')
        _check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _check(self.temperature > 0, "train.temperature", self.temperature, "must be > 0")
        _check(all(0.0 <= b < 1.0 for b in self.betas), "train.betas", list(self.betas), "must both be in [0, 1)")
        alpha = self.stochastic_length_alpha
        _check(alpha == 0 or 1.0 < alpha <= 2.0, "train.stochastic_length_alpha", alpha, "must be 0 (off) or in (1, 2]")
        _check(self.item_table_sharding == "none" or self.item_table_optimizer == "sgd", "train.item_table_optimizer",
               self.item_table_optimizer, "must be sgd with a sharded item table: a training step looks the table up "
               "several times (the history in the encoder, the targets and negatives in the loss) and FBGEMM's fused "
               "optimizer applies one update per lookup; for SGD these updates add up to the update of the summed "
               "gradient, for (row-wise) Adagrad they do not (its accumulator must see a row's whole gradient of the "
               "step)")  # fmt: skip
        _check(_DEVICE.fullmatch(self.device) is not None, "train.device", self.device,
               "is not a device name; expected cpu, cuda, cuda:N, mps, xpu or xpu:N")  # fmt: skip
        _check(_METRIC.fullmatch(self.select_metric) is not None, "train.select_metric", self.select_metric,
               "is not a metric; expected HR@k, NDCG@k (k among eval.hr_ks / eval.ndcg_ks) or MRR")  # fmt: skip


@dataclass
class EvalConfig:
    # "valid": train on s[:-2], select the epoch on the validation item, report the test item once (genrec's protocol).
    # "test-peeking": the HSTU reference code's protocol, for comparison with published numbers only: train on s[:-1]
    # and select the epoch on the test item itself (there is no validation split).
    # "refit": train on s[:-1] for exactly train.epochs epochs (a number chosen beforehand by a "valid" run), no
    # selection, and report the test item once for the last epoch (refit on train + validation).
    selection: Literal["valid", "test-peeking", "refit"] = "valid"
    candidates: Literal["full", "sampled"] = "full"
    num_negatives: int = 100
    exclude_seen: bool = True
    hr_ks: tuple[int, ...] = (1, 10, 50, 200)
    ndcg_ks: tuple[int, ...] = (10, 50, 200)
    seed: int = 0

    def __post_init__(self) -> None:
        _check_fields(self, "eval")
        _at_least(self, "eval", num_negatives=1)
        for name in ("hr_ks", "ndcg_ks"):
            ks = getattr(self, name)
            _check(all(k >= 1 for k in ks), f"eval.{name}", list(ks), "must all be >= 1")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/default"

    def __post_init__(self) -> None:
        _check_fields(self, "")
        _check(self.output_dir != "", "output_dir", self.output_dir, "must name a directory")
        metrics = [f"HR@{k}" for k in self.eval.hr_ks] + [f"NDCG@{k}" for k in self.eval.ndcg_ks] + ["MRR"]
        _check(self.train.select_metric in metrics, "train.select_metric", self.train.select_metric,
               f"is not one of {', '.join(map(repr, metrics))} (the cut-offs come from eval.hr_ks / eval.ndcg_ks)")  # fmt: skip
        _check(not (self.data.shard_by_rank and self.eval.candidates == "sampled"), "data.shard_by_rank",
               self.data.shard_by_rank, "cannot be used with eval.candidates=sampled: sampled candidates are drawn "
               "from one generator in the order of all users, which no process holding only its own users can "
               "reproduce (use eval.candidates=full)")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, where: str = "config") -> "RunConfig":
        """Build and check a config from plain data; errors are prefixed with ``where`` (e.g. the file name)."""
        try:
            return _build(cls, raw, "")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


class ConfigError(ValueError):
    """A config file or override that does not match the dataclasses."""


# Keys that configs written by earlier versions may hold: key -> the one value still accepted (it is dropped).
_RETIRED: dict[type, dict[str, Any]] = {
    ModelConfig: {"init": "reference"},  # one initialisation only: the research code's
}
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")
_METRIC = re.compile(r"(HR|NDCG)@[1-9]\d*|MRR")


def _check(ok: bool, where: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {value!r} {what}")


def _at_least(obj: Any, section: str, **minimum: float) -> None:
    for name, low in minimum.items():
        value = getattr(obj, name)
        _check(value >= low, f"{section}.{name}", value, f"must be >= {low}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_fields(obj: Any, section: str) -> None:
    """Check every field of a config dataclass against its annotation (converting lists to tuples in place)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        where = f"{section}.{f.name}" if section else f.name
        setattr(obj, f.name, _coerce(hints[f.name], getattr(obj, f.name), where))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    """A config dataclass from a mapping; ``where`` is the section's dotted name ("" for the whole config)."""
    label = where or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a mapping, got {raw!r}")
    raw = dict(raw)
    for key, accepted in _RETIRED.get(cls, {}).items():
        if key in raw:
            value = raw.pop(key)
            _check(value == accepted, f"{where}.{key}", value,
                   f"is no longer supported: {where}.{key} was removed ({accepted!r} is the only behaviour left)")  # fmt: skip
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names), key=str)
    if unknown:
        raise ConfigError(f"{label}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    return cls(**raw)  # __post_init__ checks and converts every field


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples where declared."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) or value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc).split(": expected ", 1)[-1].split(", got ", 1)[0])
        if len(errors) == 1:
            return _coerce(args[0], value, where)  # raises with the one reason
        raise ConfigError(f"{where}: expected {' or '.join(errors)}, got {value!r}")
    if tp is Any:
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {_coerce(key_type, k, where): _coerce(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict. Values are parsed as YAML (``1e-3``, ``true``, ``[1, 2]``)."""
    out = _to_plain(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=0.001")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key part")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({' '.join(str(exc).split())})") from None
    return out


def _read_yaml(path: str | Path | None, overrides: list[str] | None) -> tuple[dict[str, Any], str]:
    """(the mapping in the YAML file at ``path`` (empty when None) with ``a.b=value`` overrides applied, its name)."""
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            try:
                raw = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    return raw, "defaults" if path is None else str(path)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw, where = _read_yaml(path, overrides)
    return RunConfig.from_dict(raw, where=where)


def save_config(config: RunConfig, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config.to_dict(), fh, sort_keys=False)


# ------------------------------------------------------------------------------------------------ ranking runs
#
# A ranking run (``genrec.train.ranking.train_ranker``) has its own config with the same sections and the same
# checking as a retrieval run; it shares none of the retrieval dataclasses, so neither can change the other.

RankingModelName = Literal["hstu-ranker", "dlrm", "din", "popularity", "logreg"]
RankingSelectMetric = Literal["NE", "AUC", "GAUC", "LogLoss"]
# how the per-task losses of a multi-task ranker are combined into one update (genrec.train.multitask)
TaskBalancing = Literal["fixed", "uncertainty", "mgda", "pe-ltr"]
DistillHead = Literal["serving", "aux"]
# select metric -> (key in genrec.eval.ranking_metrics' reports, higher is better)
RANKING_SELECT_METRICS: dict[str, tuple[str, bool]] = {
    "NE": ("ne", False),
    "AUC": ("auc", True),
    "GAUC": ("gauc", True),
    "LogLoss": ("log_loss", False),
}


@dataclass
class RankingDataConfig:
    """Which ranking dataset, which time split, and how rows are cut (``genrec.data.ranking``)."""

    # a ranking dataset name: ml-1m, taobao-userbehavior-head (taobao), kuairand-27k-like-hate-subset (kuairand);
    # checked against the ranking datasets before any data is read
    dataset: str = "ml-1m"
    data_dir: str | None = None  # searched before $GENREC_DATA_DIR and the cache dir
    split: Literal["user-last", "global-time"] | None = None  # None: the dataset's default split
    n_eval: int = 10  # user-last: validation and test candidates per user
    max_history: int = 200  # most recent history events per row
    max_candidates: int = 10  # candidates per row (C)
    # domains (surfaces) of the examples: the name of one of the dataset's domain definitions (e.g. ML-1M "age" or
    # "genre"), which fills RankingBatch.cand_domains; None = no domains. Checked against the dataset when it loads.
    domains: str | None = None
    only_domain: str | None = None  # keep only this domain's candidates in every part (a per-domain model)
    # unix seconds: train only on the training rows whose earliest candidate is before it (e.g. a stale teacher
    # trained on data up to an earlier cut); validation, test and histories are unchanged. None = every row.
    train_until: int | None = None

    def __post_init__(self) -> None:
        _check_fields(self, "data")
        _check(self.dataset != "", "data.dataset", self.dataset, "must name a ranking dataset")
        _check(self.only_domain is None or self.domains is not None, "data.only_domain", self.only_domain,
               "needs data.domains (the domain definition it names a domain of)")
        _at_least(self, "data", n_eval=1, max_history=1, max_candidates=1)


@dataclass
class RankingModelConfig:
    """Which ranker and its hyper-parameters.

    ``params`` go to the model's own config dataclass (``HSTURankerConfig``, ``DLRMRankerConfig``, ``DINConfig``) or
    to the floor's constructor (popularity: ``prior_strength``; logreg: ``num_buckets``). Their names, types and
    ranges are checked against that dataclass by ``genrec.train.ranking.build_ranker`` before any run file is written
    (an unknown name or a wrong type raises ``ConfigError`` naming ``model.params.<name>``). Task weights are not a
    model parameter: they are ``train.task_weights``.
    """

    name: RankingModelName = "hstu-ranker"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_fields(self, "model")
        for key in self.params:
            _check(isinstance(key, str) and key != "", "model.params", key, "is not a parameter name")
        _check("task_weights" not in self.params, "model.params.task_weights", self.params.get("task_weights"),
               "is set in train.task_weights (one weight per task, in the schema's task order)")  # fmt: skip


@dataclass
class RankingTrainConfig:
    epochs: int = 20
    batch_size: int = 128
    eval_batch_size: int = 256
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    patience: int = 3  # epochs without validation improvement before stopping
    # validation metric for early stopping and the kept weights, averaged over the tasks with a positive weight:
    # NE and LogLoss lower is better, AUC and GAUC higher is better
    select_metric: RankingSelectMetric = "NE"
    task_weights: tuple[float, ...] | None = None  # loss weight per task (schema order); None = all 1
    # fixed: Σ_t task_weights[t] · loss_t; uncertainty: learned per-task log-variances (Kendall et al. 2018);
    # mgda: the min-norm convex combination of the task gradients (Sener & Koltun 2018); pe-ltr: the KKT step of
    # PE-LTR with task_weights as lower bounds (Lin et al. 2019). See genrec.train.multitask.
    task_balancing: TaskBalancing = "fixed"
    # learning rate of the balancer's own parameters (uncertainty weighting's log-variances); None = train.lr.
    # They move slowly at a network's lr, so a larger one (e.g. 10-100x) lets them settle within a few epochs.
    balancer_lr: float | None = None
    seed: int = 42
    num_threads: int = 0  # torch intra-op threads; 0 = leave PyTorch's default
    device: str = "cpu"
    max_steps_per_epoch: int = 0  # 0 = whole epoch; >0 only for smoke tests
    # Distillation (genrec.train.distill): a teacher's run directory (a train-ranker output on the same data); its
    # logits on the training candidates become soft targets. distill_weight α mixes them with the labels:
    # (1 - α) · BCE(labels) + α · BCE(sigmoid(teacher / τ)), through the serving heads themselves ("serving") or
    # through one auxiliary head per task that serving never reads ("aux").
    distill_teacher: str | None = None
    distill_weight: float = 0.5
    distill_head: DistillHead = "serving"
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        _check_fields(self, "train")
        _at_least(self, "train", epochs=1, batch_size=1, eval_batch_size=1, patience=1, num_threads=0,
                  max_steps_per_epoch=0, weight_decay=0.0)  # fmt: skip
        _check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _check(all(0.0 <= b < 1.0 for b in self.betas), "train.betas", list(self.betas), "must both be in [0, 1)")
        _check(_DEVICE.fullmatch(self.device) is not None, "train.device", self.device,
               "is not a device name; expected cpu, cuda, cuda:N, mps, xpu or xpu:N")  # fmt: skip
        if self.task_weights is not None:
            w = self.task_weights
            _check(len(w) > 0 and all(0.0 <= x < float("inf") for x in w) and any(x > 0 for x in w),
                   "train.task_weights", list(w), "must be finite, non-negative and not all zero")  # fmt: skip
        _check(self.balancer_lr is None or 0.0 < self.balancer_lr < float("inf"), "train.balancer_lr",
               self.balancer_lr, "must be a positive number, or null for train.lr")  # fmt: skip
        _check(0.0 < self.distill_weight < 1.0, "train.distill_weight", self.distill_weight,
               "must be in (0, 1): the share of the loss on the teacher's targets")  # fmt: skip
        _check(0.0 < self.distill_temperature < float("inf"), "train.distill_temperature", self.distill_temperature,
               "must be a positive number")  # fmt: skip
        _check(self.distill_teacher is None or self.distill_teacher != "", "train.distill_teacher",
               self.distill_teacher, "must name a ranking run directory, or be null")  # fmt: skip
        _check(self.distill_teacher is None or self.task_balancing == "fixed", "train.task_balancing",
               self.task_balancing, "must be fixed when distilling (train.distill_teacher is set)")  # fmt: skip


@dataclass
class RankingRunConfig:
    data: RankingDataConfig = field(default_factory=RankingDataConfig)
    model: RankingModelConfig = field(default_factory=RankingModelConfig)
    train: RankingTrainConfig = field(default_factory=RankingTrainConfig)
    output_dir: str = "runs/ranking"

    def __post_init__(self) -> None:
        _check_fields(self, "")
        _check(self.output_dir != "", "output_dir", self.output_dir, "must name a directory")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, where: str = "config") -> "RankingRunConfig":
        """Build and check a ranking config from plain data; errors are prefixed with ``where``."""
        try:
            return _build(cls, raw, "")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def load_ranking_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RankingRunConfig:
    """Read a YAML ranking run config (or the defaults when ``path`` is None) and apply ``a.b=value`` overrides."""
    raw, where = _read_yaml(path, overrides)
    return RankingRunConfig.from_dict(raw, where=where)
