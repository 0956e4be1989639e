"""Sequence encoders. Each model file holds one model, readable top to bottom; ``build_model`` wires a config."""

from __future__ import annotations

from torch import nn

from genrec.config import ModelConfig
from genrec.models.fuxi_alpha import FuXiAlpha, FuXiAlphaConfig
from genrec.models.hstu import HSTU, HSTUConfig
from genrec.models.sasrec import SASRec, SASRecConfig

MODELS = ("hstu", "sasrec", "fuxi-alpha")


def build_model(config: ModelConfig, num_items: int, max_len: int) -> nn.Module:
    """An encoder with ``encode(batch) -> [B, N, d]``, ``encode_last(batch) -> [B, d]`` (last real position) and
    ``item_vectors(ids=None)``, all L2-normalised."""
    if config.name == "hstu":
        return HSTU(
            HSTUConfig(
                num_items=num_items,
                max_len=max_len,
                embedding_dim=config.embedding_dim,
                num_blocks=config.num_blocks,
                num_heads=config.num_heads,
                attention_dim=config.attention_dim,
                linear_dim=config.linear_dim,
                dropout=config.dropout,
                linear_dropout=config.linear_dropout,
                use_time_bias=config.use_time_bias,
                use_position_bias=config.use_position_bias,
                num_time_buckets=config.num_time_buckets,
                attention_norm=config.attention_norm,
                attention_impl=config.attention_impl,
            )
        )
    if config.name == "sasrec":
        return SASRec(
            SASRecConfig(
                num_items=num_items,
                max_len=max_len,
                embedding_dim=config.embedding_dim,
                num_blocks=config.num_blocks,
                num_heads=config.num_heads,
                ffn_dim=config.ffn_dim,
                dropout=config.dropout,
            )
        )
    if config.name == "fuxi-alpha":
        return FuXiAlpha(
            FuXiAlphaConfig(
                num_items=num_items,
                max_len=max_len,
                embedding_dim=config.embedding_dim,
                num_blocks=config.num_blocks,
                num_heads=config.num_heads,
                attention_dim=config.attention_dim,
                linear_dim=config.linear_dim,
                ffn_dim=config.ffn_dim,
                dropout=config.dropout,
                linear_dropout=config.linear_dropout,
                use_time_bias=config.use_time_bias,
                use_position_bias=config.use_position_bias,
                num_time_buckets=config.num_time_buckets,
                attention_norm=config.attention_norm,
                attention_impl=config.attention_impl,
            )
        )
    raise ValueError(f"unknown model {config.name!r}; expected one of {MODELS}")
