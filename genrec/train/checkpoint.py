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

Every file is written to a temporary name in the same directory and renamed into place, so a crash never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename tmp_path onto ``path`` (same directory, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")

    atomic_write(path, _w)


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_weights(path: str | Path, model: torch.nn.Module) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    model.load_state_dict(load_file(str(path)))
