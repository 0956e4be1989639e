"""Sequence encoders. Each model file holds one model, readable top to bottom; ``build_model`` wires a config."""

from __future__ import annotations

import dataclasses

from torch import nn

from genrec.config import ModelConfig
from genrec.models.fuxi_alpha import FuXiAlpha, FuXiAlphaConfig
from genrec.models.hstu import HSTU, HSTUConfig
from genrec.models.sasrec import SASRec, SASRecConfig

MODELS = ("hstu", "sasrec", "fuxi-alpha")


def build_model(config: ModelConfig, num_items: int, max_len: int) -> nn.Module:
    """An encoder with ``encode(batch) -> [B, N, d]``, ``encode_last(batch) -> [B, d]`` (last real position) and
    ``item_vectors(ids=None)``, all L2-normalised."""
    # Each model's config takes the ModelConfig fields it declares (its dataclass fields), plus the data's sizes.
    classes = {"hstu": (HSTU, HSTUConfig), "sasrec": (SASRec, SASRecConfig), "fuxi-alpha": (FuXiAlpha, FuXiAlphaConfig)}
    if config.name not in classes:
        raise ValueError(f"unknown model {config.name!r}; expected one of {MODELS}")
    model_cls, config_cls = classes[config.name]
    names = {f.name for f in dataclasses.fields(config_cls)} - {"num_items", "max_len"}
    return model_cls(config_cls(num_items=num_items, max_len=max_len, **{n: getattr(config, n) for n in names}))
