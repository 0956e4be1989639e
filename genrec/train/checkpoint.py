"""Atomic, code-free checkpoints.

A run directory holds everything needed to resume training or to serve without the training data::

    config.yaml         the fully resolved RunConfig
    item_ids.json       internal id i -> external id item_ids[i - 1]
    titles.json         external item id -> title (when the dataset has titles)
    checkpoint.pt       last finished epoch: model, optimiser, RNG state, early-stopping state (torch.save of plain
                        tensors/containers; always loaded with weights_only=True, so loading never executes code)
    best.safetensors    model weights of the best validation epoch
    best.json           that epoch and its validation metrics
    log.jsonl           one line per epoch
    results.json        validation history and the test metrics of the chosen checkpoint, with their protocol

Every file is written through ``genrec.io.atomic_write`` (temporary name, fsync, rename, fsync of the directory), so
neither a crash nor a power loss leaves a half-written checkpoint behind. A process killed inside a write can leave
its temporary file (``.<name>.<random>.tmp``); ``remove_stale_temporaries`` clears those when a run starts.

A file that cannot be loaded (not written by genrec, truncated, or holding objects other than tensors and plain
containers) raises ``CheckpointError`` naming the file, never a pickle traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from genrec.config import ConfigError
from genrec.io import atomic_write, write_json  # noqa: F401  (write_json: re-exported for run-directory writers)

# The files ``genrec train`` writes into a run directory (``--overwrite`` removes exactly these).
RUN_FILES = (
    "config.yaml", "item_ids.json", "titles.json", "popularity.json", "checkpoint.pt", "best.safetensors", "best.json",
    "log.jsonl", "results.json", "test_ranks.npz",
)  # fmt: skip
STATE_KEYS = ("model", "optimizer", "torch_rng", "train_state")


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be loaded; the message names the file."""


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """The training state saved by ``save_state``, loaded with ``weights_only=True`` (loading never runs code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001  (pickle, zip and EOF errors all mean: not a loadable checkpoint)
        raise CheckpointError(f"{path}: not a loadable genrec checkpoint ({_reason(exc)})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a genrec training checkpoint (missing {', '.join(missing)})")
    return state


def save_weights(path: str | Path, model: torch.nn.Module) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001  (safetensors header and I/O errors)
        raise CheckpointError(f"{path}: not a loadable safetensors file ({_reason(exc)})") from None
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the weights do not fit the configured model ({_reason(exc)})") from None


def check_shapes(path: str | Path, saved: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise ``CheckpointError`` unless ``saved`` has exactly the model's parameter names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in saved.items()}
    problems = [f"{k} missing" for k in expected if k not in got]
    problems += [f"{k} unexpected" for k in got if k not in expected]
    problems += [f"{k} {got[k]} vs {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{path}: the saved weights do not fit the configured model ({shown})")


def remove_stale_temporaries(directory: str | Path, run_files: tuple[str, ...] = RUN_FILES) -> list[str]:
    """Delete the ``.<run file>.<random>.tmp`` files a killed write left in ``directory``; return their names."""
    pattern = re.compile(r"\.(%s)\..+\.tmp" % "|".join(map(re.escape, run_files)))
    removed = []
    for entry in Path(directory).iterdir():
        if pattern.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink()
            removed.append(entry.name)
    return sorted(removed)


def _reason(exc: BaseException) -> str:
    """A one-line reason for a load failure (torch's unpickling errors span several lines and suggest unsafe flags)."""
    if isinstance(exc, pickle.UnpicklingError):
        return "it holds objects other than tensors and plain containers, so it is not loaded"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return first[:200]


def config_differences(stored: Any, config: Any, sections: tuple[str, ...], train_fields: tuple[str, ...] = ()) -> list[str]:
    """``section.field: old -> new`` for every field of ``sections`` (and of ``train_fields`` in ``train``) where a
    resumed run's ``config`` differs from the ``stored`` config of the run it continues (``data.data_dir``, where the
    files are found, may differ)."""
    differences = []
    for section in sections:
        old, new = getattr(stored, section), getattr(config, section)
        for f in dataclasses.fields(old):
            if section == "data" and f.name == "data_dir":
                continue
            a, b = getattr(old, f.name), getattr(new, f.name)
            if a != b:
                differences.append(f"{section}.{f.name}: {a!r} -> {b!r}")
    for name in train_fields:
        a, b = getattr(stored.train, name), getattr(config.train, name)
        if a != b:
            differences.append(f"train.{name}: {a!r} -> {b!r}")
    return differences


def write_log(path: str | Path, history: list[dict[str, Any]]) -> None:
    """Write one JSON line per epoch of ``history`` (``log.jsonl``), atomically."""

    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in history)

    atomic_write(path, _w)


def check_loss_finite(value: float, epoch: int, step: int, out: Path) -> None:
    """``FloatingPointError`` when a step's training loss is not finite: the loops call it before they update the
    weights, so the run directory keeps its last finished epoch."""
    if not math.isfinite(value):
        raise FloatingPointError(
            f"epoch {epoch}, step {step}: the training loss is {value}; stopped before updating the weights or "
            f"writing this epoch's checkpoint ({out} keeps the last finished epoch, if any). Lower train.lr, or check "
            "the data and the model settings"
        )


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (progress bars are drawn only there)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def with_absolute_paths(config: Any) -> Any:
    """``config`` with the data section's file locations (``path``, ``timestamps_path``, ``data_dir``, those it
    has) made absolute from the current directory, so the saved config finds the same files from anywhere."""
    changes = {}
    for name in ("path", "timestamps_path", "data_dir"):
        value = getattr(config.data, name, None)
        if value:
            changes[name] = os.path.abspath(os.path.expanduser(value))
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **changes)) if changes else config


def check_run_directory(out: Path, run_files: tuple[str, ...], *, resume: bool, overwrite: bool) -> list[str]:
    """The run files ``out`` already holds; ``FileExistsError`` when there are some and the call neither resumes
    nor overwrites (two runs must never mix their files)."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run or replace it")
    existing = [name for name in run_files if (out / name).exists()]
    if existing and not resume and not overwrite:
        raise FileExistsError(
            f"{out} already holds a run ({', '.join(existing)}): pass --resume (resume=True) to continue it or "
            "--overwrite (overwrite=True) to replace it, or choose another output directory"
        )
    return existing


def resume_state(out: Path, differences: Callable[[Path], list[str]]) -> dict[str, Any]:
    """The checkpoint of the run in ``out``, after ``differences(stored config path)`` found nothing that would make
    the resumed run a different one (raises ``ConfigError`` listing them). Nothing is written."""
    ckpt_path = out / "checkpoint.pt"
    if not ckpt_path.exists():
        raise FileNotFoundError(f"resume: no checkpoint at {ckpt_path}")
    stored_path = out / "config.yaml"
    if not stored_path.exists():
        raise FileNotFoundError(f"resume: {stored_path} not found, so the run it continues is unknown")
    found = differences(stored_path)
    if found:
        raise ConfigError(
            f"resume: {out} was trained with a different configuration ({'; '.join(found)}); resume with the run's "
            "own settings, or train into a new output directory"
        )
    return load_state(ckpt_path)
