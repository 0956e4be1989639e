"""The Python API over a trained run directory: raw external ids in, raw external ids out.

    rec = Recommender.load("runs/ml-1m/hstu")
    items, scores, unknown = rec.recommend_one(["1193", "661", "914"], k=10)

The CLI's ``evaluate`` and ``recommend`` are thin layers over this class. Loading reads only ``config.yaml``,
``item_ids.json``, ``titles.json`` and ``best.safetensors`` (no pickle, no code execution) and never writes to the
directory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from genrec.config import RunConfig, load_config
from genrec.data.batches import history_batch
from genrec.data.sequences import IdMap, load_item_map
from genrec.models import build_model
from genrec.train.checkpoint import load_weights


class Recommender:
    """A trained sequence recommender bound to its id maps."""

    def __init__(self, config: RunConfig, model: torch.nn.Module, item_map: IdMap, titles: dict[str, str] | None):
        self.config = config
        self.model = model.eval()
        self.item_map = item_map
        self.titles = titles

    @classmethod
    def load(cls, directory: str | Path, *, data_dir: str | None = None) -> "Recommender":
        directory = Path(directory)
        for name in ("config.yaml", "item_ids.json", "best.safetensors"):
            if not (directory / name).exists():
                raise FileNotFoundError(f"{directory / name} not found: is {directory} a run directory written by `genrec train`?")
        overrides = [f"data.data_dir={data_dir}"] if data_dir else []
        config = load_config(directory / "config.yaml", overrides)
        item_map = load_item_map(directory)
        model = build_model(config.model, len(item_map), config.data.max_len)
        load_weights(directory / "best.safetensors", model)
        titles = None
        if (directory / "titles.json").exists():
            titles = json.loads((directory / "titles.json").read_text(encoding="utf-8"))
        return cls(config, model, item_map, titles)

    @torch.no_grad()
    def recommend_one(
        self, history: list[str], k: int = 10, exclude_seen: bool = True, timestamps: list[int] | None = None
    ) -> tuple[list[str], list[float], list[str]]:
        """Top-k raw item ids and scores after ``history`` (raw ids, oldest first). Unknown ids are ignored and
        returned as the third value. Without timestamps the time term of HSTU is off for this request."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        internal = self.item_map.to_internal(history)
        known = internal > 0
        unknown = [str(h) for h, ok in zip(history, known) if not ok]
        internal = internal[known]
        if len(internal) == 0:
            raise ValueError("none of the history's items is known to the model")
        times = None
        if timestamps is not None:
            if len(timestamps) != len(history):
                raise ValueError("timestamps must be as long as history")
            times = [np.asarray(timestamps, dtype=np.int64)[known]]
        batch = history_batch([internal], times, None, [times is not None], self.config.data.max_len)
        emb = self.model.encode(batch)
        user = emb[0, int(batch.lengths[0]) - 1]
        scores = self.model.item_vectors() @ user  # [num_items + 1]
        scores[0] = float("-inf")
        if exclude_seen:
            scores[torch.as_tensor(internal[-self.config.data.max_len :])] = float("-inf")
        k = min(k, int(torch.isfinite(scores).sum()))
        top = torch.topk(scores, k)
        return self.item_map.to_external(top.indices.tolist()), top.values.tolist(), unknown

    def evaluate(
        self, target: str = "test", candidates: str | None = None, num_negatives: int | None = None, users: str = "all"
    ):
        """Re-run the offline protocol on the run's dataset (needs the data files); returns (protocol, metrics)."""
        from genrec.data.dataset import prepare_data
        from genrec.eval.evaluate import evaluate, model_score_fn
        from genrec.train.loop import protocol_from_config

        data = prepare_data(self.config.data)
        if data.sequences.item_map.external != self.item_map.external:
            raise ValueError("the dataset's item ids differ from the ones this model was trained on")
        protocol = protocol_from_config(self.config, target)
        changes = {"candidates": candidates, "num_negatives": num_negatives, "users": users}
        protocol = dataclasses.replace(protocol, **{k: v for k, v in changes.items() if v is not None})
        metrics = evaluate(model_score_fn(self.model, self.config.data.max_len), data.sequences, protocol, self.config.train.eval_batch_size)
        return protocol, metrics
