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
neither a crash nor a power loss leaves a half-written checkpoint behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from genrec.io import atomic_write, write_json  # noqa: F401  (write_json: re-exported for run-directory writers)


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_weights(path: str | Path, model: torch.nn.Module) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    model.load_state_dict(load_file(str(path)))
