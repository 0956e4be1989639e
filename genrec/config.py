"""Typed run configuration: one dataclass per concern, loaded from YAML, overridden with ``--set a.b=value``.

A run config has four sections::

    data:   which dataset, where, how sequences are cut          -> DataConfig
    model:  architecture and its hyper-parameters                -> ModelConfig
    train:  optimiser, loss, epochs, early stopping, seed        -> TrainConfig
    eval:   the evaluation protocol used for selection and test  -> EvalConfig

Unknown keys and wrongly typed values are rejected when the config is loaded, so a typo in a YAML file or in a
``--set`` override fails before any training starts. The fully resolved config is written next to every run and
inside every checkpoint (``RunConfig.to_dict``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    """Where the interactions come from and how user sequences are cut."""

    dataset: str = "ml-1m"  # a registry name (genrec.data.registry.DATASETS) or "table"/"sequences" for own files
    data_dir: str | None = None  # searched before $GENREC_DATA_DIR and the cache dir
    path: str | None = None  # for dataset="table" / "sequences": the file to read
    timestamps_path: str | None = None  # for dataset="sequences": optional position-aligned timestamp file
    columns: dict[str, Any] = field(default_factory=dict)  # for dataset="table": user/item/timestamp/... -> column
    sep: str | None = None
    header: bool = True
    on_bad_rows: str = "error"  # "error" | "skip"
    max_len: int = 200  # most recent items kept per sequence (history window)
    min_seq_len: int = 3  # users with fewer interactions cannot be split leave-one-out and are dropped (counted)


@dataclass
class ModelConfig:
    """Architecture. Fields not used by a model are ignored by it (e.g. ``ffn_dim`` for HSTU)."""

    name: str = "hstu"  # "hstu" | "sasrec"
    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    attention_dim: int = 50  # HSTU d_qk per head (SASRec: embedding_dim // num_heads, ignored)
    linear_dim: int = 50  # HSTU d_v per head
    ffn_dim: int = 50  # SASRec point-wise feed-forward width
    dropout: float = 0.2  # input (embedding) dropout
    linear_dropout: float = 0.2  # HSTU dropout on U * LN(AV) ; SASRec dropout inside blocks
    use_time_bias: bool = True  # HSTU: log-bucketed time-gap term of the relative attention bias
    use_position_bias: bool = True  # HSTU: position-offset term of the relative attention bias
    num_time_buckets: int = 128
    attention_norm: str = "max_len"  # HSTU: divide SiLU(QK^T + rab) by "max_len" (reference) or "length" (row's true length)
    attention_impl: str = "padded"  # HSTU: "padded" (plain reference path) or "jagged" (genrec.ops.jagged, same math)
    init: str = "reference"  # HSTU: "reference" (the research code's init) or "genrec-v1" (sessions 1-2; see hstu.py)


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    num_negatives: int = 128
    negatives: str = "per_sequence"  # "shared" | "per_sequence" | "per_position" (reference) | "full"; train/loss.py
    temperature: float = 0.05
    patience: int = 20  # epochs without validation improvement before stopping
    time_budget_minutes: float = 0.0  # stop after the first epoch that ends past this wall-clock budget (0 = none)
    select_metric: str = "NDCG@10"  # validation metric for early stopping / checkpoint choice
    seed: int = 42
    num_threads: int = 0  # torch intra-op threads; 0 = leave PyTorch's default
    device: str = "cpu"
    eval_batch_size: int = 128
    max_steps_per_epoch: int = 0  # 0 = whole epoch; >0 only for smoke tests
    length_buckets: int = 0  # >0: sort rows by length within chunks of this many batches (faster, costs quality)
    autocast: str = "none"  # "none" | "bfloat16": run the encoder under torch.autocast (loss stays float32)
    stochastic_length_alpha: float = 0.0  # >0: Stochastic Length (HSTU paper §3.3) on training rows, alpha in (1, 2]


@dataclass
class EvalConfig:
    # "valid": train on s[:-2], select the epoch on the validation item, report the test item once (genrec's protocol).
    # "test-peeking": the HSTU reference code's protocol, for comparison with published numbers only: train on s[:-1]
    # and select the epoch on the test item itself (there is no validation split).
    # "refit": train on s[:-1] for exactly train.epochs epochs (a number chosen beforehand by a "valid" run), no
    # selection, and report the test item once for the last epoch (refit on train + validation).
    selection: str = "valid"
    candidates: str = "full"  # "full" | "sampled"
    num_negatives: int = 100
    exclude_seen: bool = True
    hr_ks: tuple[int, ...] = (1, 10, 50, 200)
    ndcg_ks: tuple[int, ...] = (10, 50, 200)
    seed: int = 0


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/default"

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, where: str = "config") -> "RunConfig":
        return _build(cls, raw, where)


class ConfigError(ValueError):
    """A config file or override that does not match the dataclasses."""


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples where declared."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
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
        return dict(value)
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
        node[parts[-1]] = yaml.safe_load(text)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    return RunConfig.from_dict(raw, where=where)


def save_config(config: RunConfig, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
