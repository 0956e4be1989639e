"""Export a trained model's encoder and scorer as ``torch.export`` programs (``.pt2``), runnable without genrec.

    genrec export --checkpoint runs/ml-1m/hstu --format torch-export --output exports/ml-1m-hstu

writes into the output directory::

    encoder.pt2     (item_ids [B, N] int64, timestamps [B, N] int64, query_times [B, N] int64, lengths [B] int64,
                     has_time [B] bool) -> user vectors [B, d] float32 (the encoder's last real position)
    scorer.pt2      user vectors [B, d] -> scores [B, num_items + 1] float32 (column = internal id; 0 is padding)
    item_ids.json   internal id i -> external id item_ids[i - 1]
    manifest.json   format, shapes and their bounds, model id, genrec and torch versions

Batches follow ``genrec.data.batches.Batch``: rows left-aligned, right-padded with 0, oldest item first, at most
``max_len`` items (keep the most recent); ``has_time`` False switches the time term off for a row. B may be
1..``max_batch`` and N 1..``max_len`` (dynamic shapes). ``check_parity`` compares both programs with the eager model
(the test suite requires a max abs difference <= 1e-5).

Why torch.export: it is PyTorch's supported path (TorchScript is in maintenance, and tracing cannot serialise HSTU's
custom autograd function), and a ``.pt2`` file loads in any Python with torch (``torch.export.load``) or compiles
ahead of time with AOTInductor. ONNX would add two dependencies for the same graph.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from genrec import __version__
from genrec.api import Recommender
from genrec.data.batches import Batch
from genrec.data.sequences import IdMap

FORMATS = ("torch-export",)
ENCODER_FILE, SCORER_FILE, MANIFEST_FILE = "encoder.pt2", "scorer.pt2", "manifest.json"
INPUT_NAMES = ("item_ids", "timestamps", "query_times", "lengths", "has_time")


class _TimeFlags:
    """``Batch.has_time`` stand-in used while tracing: ``any()`` is True and ``view`` is the tensor's.

    HSTU skips its time term with a Python ``if bool(has_time.any())``, a data-dependent branch that torch.export
    cannot trace. Taking the time branch for every batch is exact: rows whose ``has_time`` is False read the rab
    table's no-time column, which holds the position term alone, the same values the skipped branch gives (the
    parity check covers all-False batches)."""

    def __init__(self, flags: torch.Tensor) -> None:
        self.flags = flags

    def any(self) -> bool:
        return True

    def view(self, *shape: int) -> torch.Tensor:
        return self.flags.view(*shape)


class EncoderProgram(nn.Module):
    """Batch tensors -> the L2-normalised user vector at each row's last real position [B, d]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        item_ids: torch.Tensor,
        timestamps: torch.Tensor,
        query_times: torch.Tensor,
        lengths: torch.Tensor,
        has_time: torch.Tensor,
    ) -> torch.Tensor:
        batch = Batch(item_ids, timestamps, query_times, lengths, _TimeFlags(has_time))  # type: ignore[arg-type]
        emb = self.model.encode(batch)  # [B, N, d]
        return emb[torch.arange(item_ids.shape[0]), lengths - 1]


class ScorerProgram(nn.Module):
    """User vectors [B, d] -> dot products with every item vector [B, num_items + 1]."""

    def __init__(self, item_vectors: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("item_vectors", item_vectors.detach().clone())

    def forward(self, user: torch.Tensor) -> torch.Tensor:
        return user @ self.item_vectors.T


@dataclass
class ExportedModel:
    """The loaded programs: ``encoder(*batch_tensors) -> [B, d]``, ``scorer(user) -> [B, num_items + 1]``."""

    encoder: Any
    scorer: Any
    manifest: dict[str, Any]
    item_map: IdMap


def _example_inputs(max_len: int) -> tuple[torch.Tensor, ...]:
    n = min(3, max_len)  # not 1: torch.export specialises example dimensions of size 1
    ids = torch.ones(2, n, dtype=torch.long)
    times = torch.arange(2 * n, dtype=torch.long).view(2, n)
    return ids, times, times.clone(), torch.tensor([n, 1]), torch.tensor([True, False])


def _programs(rec: Recommender, max_batch: int) -> tuple[Any, Any]:
    """torch.export programs of the encoder (dynamic batch and length) and the scorer (dynamic batch)."""
    from torch.export import Dim, export

    max_len = rec.config_.data.max_len
    b = Dim("batch", min=1, max=max_batch)
    row = {0: b, 1: Dim("length", min=1, max=max_len)} if max_len >= 2 else {0: b}  # max_len 1: nothing to vary
    shapes = (row, row, row, {0: b}, {0: b})
    model = rec.model_
    if getattr(getattr(model, "config", None), "attention_impl", "padded") != "padded":
        # the jagged fast path has data-dependent block layouts; export the plain path (same weights, same math)
        model = copy.deepcopy(model)
        model.config = dataclasses.replace(model.config, attention_impl="padded")
    with torch.inference_mode():
        encoder = export(EncoderProgram(model).eval(), _example_inputs(max_len), dynamic_shapes=shapes)
        user = torch.zeros(2, rec.item_vectors_.shape[1])
        scorer = export(ScorerProgram(rec.item_vectors_).eval(), (user,), dynamic_shapes=({0: b},))
    return encoder, scorer


def export_recommender(
    rec: Recommender, output: str | Path, fmt: str = "torch-export", *, max_batch: int = 4096
) -> Path:
    """Write the encoder and scorer of ``rec`` into the new directory ``output`` (atomically: all files or none)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")
    rec.check_fitted()
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} exists; choose a new --output directory")
    encoder, scorer = _programs(rec, max_batch)
    manifest = {
        "format": fmt,
        "model": rec.config_.model.name,
        "model_id": rec.model_id_,
        "encoder": {"file": ENCODER_FILE, "inputs": list(INPUT_NAMES), "output": "user [B, d] float32"},
        "scorer": {"file": SCORER_FILE, "inputs": ["user"], "output": "scores [B, num_items + 1] float32"},
        "max_len": rec.config_.data.max_len,
        "max_batch": max_batch,
        "num_items": len(rec.item_map_),
        "embedding_dim": int(rec.item_vectors_.shape[1]),
        "genrec_version": __version__,
        "torch_version": torch.__version__,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        tmp.chmod(0o755)
        torch.export.save(encoder, str(tmp / ENCODER_FILE))
        torch.export.save(scorer, str(tmp / SCORER_FILE))
        (tmp / "item_ids.json").write_text(json.dumps(rec.item_map_.to_json()), encoding="utf-8")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def load_exported(path: str | Path) -> ExportedModel:
    """Load an export directory; the programs are returned as callable modules."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    if manifest.get("format") not in FORMATS:
        raise ValueError(f"{path / MANIFEST_FILE}: unknown format {manifest.get('format')!r}")
    encoder = torch.export.load(str(path / ENCODER_FILE)).module()
    scorer = torch.export.load(str(path / SCORER_FILE)).module()
    item_map = IdMap.from_json(json.loads((path / "item_ids.json").read_text(encoding="utf-8")))
    return ExportedModel(encoder, scorer, manifest, item_map)


def random_batch(
    num_items: int, batch: int, width: int, rng: np.random.Generator, *, timed: str = "mixed"
) -> tuple[torch.Tensor, ...]:
    """Encoder inputs for the parity check: random items, sorted timestamps, random lengths (one row full width);
    ``timed`` is "all", "none" or "mixed" (rows with and without timestamps)."""
    lengths = rng.integers(1, width + 1, size=batch)
    lengths[0] = width
    ids = rng.integers(1, num_items + 1, size=(batch, width))
    ids[np.arange(width)[None, :] >= lengths[:, None]] = 0
    times = np.sort(rng.integers(0, 10**9, size=(batch, width + 1)), axis=1)
    has_time = {"all": np.ones(batch, bool), "none": np.zeros(batch, bool)}.get(timed, rng.random(batch) < 0.5)
    as_long = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return as_long(ids), as_long(times[:, :-1]), as_long(times[:, 1:]), as_long(lengths), torch.as_tensor(has_time)


def check_parity(rec: Recommender, exported: ExportedModel, *, seed: int = 0) -> float:
    """Max abs difference between the exported programs and the eager model (user vectors and full scores) over
    random batches of several sizes and widths, with all, none and some rows timed."""
    rng = np.random.default_rng(seed)
    max_len = rec.config_.data.max_len
    worst = 0.0
    with torch.inference_mode():
        cases = ((1, 1, "all"), (3, max_len, "mixed"), (8, max(1, max_len // 2), "none"), (5, max_len, "all"))
        for batch, width, timed in cases:
            inputs = random_batch(len(rec.item_map_), batch, width, rng, timed=timed)
            ids, times, qtimes, lengths, has_time = inputs
            emb = rec.model_.encode(Batch(ids, times, qtimes, lengths, has_time))
            user = emb[torch.arange(batch), lengths - 1]
            scores = user @ rec.model_.item_vectors().T
            got_user = exported.encoder(*inputs)
            got_scores = exported.scorer(got_user)
            worst = max(worst, float((got_user - user).abs().max()), float((got_scores - scores).abs().max()))
    return worst
