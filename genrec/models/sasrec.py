"""SASRec: self-attentive sequential recommendation, as the HSTU reference's SASRec baseline.

Paper: W.-C. Kang and J. McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018 (arXiv 1808.09781).
Baseline configuration: J. Zhai et al., "Revisiting Neural Retrieval on Accelerators", KDD 2023, as used by
meta-recsys/generative-recommenders ``research/modeling/sequential/sasrec.py``: SASRec blocks trained with sampled
softmax over L2-normalised user and item vectors (temperature 0.05) instead of the original binary cross-entropy.

Block (the original's layout, which the reference keeps):

    q   = LayerNorm(x)
    x   = q + MultiHeadAttention(query=q, key=x, value=x, causal)       (softmax attention, dropout on weights)
    x   = LayerNorm(x)
    x   = x + Dropout(W2 · Dropout(ReLU(W1 · x)))                        (point-wise feed-forward, width ffn_dim)
    x   = x · valid

Input: item_embedding · sqrt(d) + learned position embedding, dropout; output: LayerNorm, then L2-normalise.

Deviations: none in the math. Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (causal);
with left-aligned, right-padded rows the causal mask already hides every padded key from every real query.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genrec.data.batches import Batch
from genrec.models.hstu import whole_item_table


@dataclass
class SASRecConfig:
    num_items: int
    max_len: int = 200
    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    ffn_dim: int = 50
    dropout: float = 0.2


class SASRecBlock(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        d = config.embedding_dim
        if d % config.num_heads:
            raise ValueError(f"embedding_dim {d} is not divisible by num_heads {config.num_heads}")
        self.h = config.num_heads
        self.p = config.dropout
        self.attn_norm = nn.LayerNorm(d, eps=1e-8)
        self.q_proj = nn.Linear(d, d)
        self.kv_proj = nn.Linear(d, 2 * d)
        self.o_proj = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(d, config.ffn_dim),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.ffn_dim, d),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, N, d = x.shape
        h = self.h
        q_in = self.attn_norm(x)
        q = self.q_proj(q_in).view(B, N, h, d // h).transpose(1, 2)  # [B, h, N, d/h]
        k, v = self.kv_proj(x).view(B, N, 2, h, d // h).permute(2, 0, 3, 1, 4)  # each [B, h, N, d/h]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        x = q_in + self.o_proj(a.transpose(1, 2).reshape(B, N, d))
        x = self.ffn_norm(x)
        x = x + self.ffn(x)
        return x * valid


class SASRec(nn.Module):
    """SASRec encoder: item sequence -> one L2-normalised user vector per position."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embedding_dim
        self.item_emb = nn.Embedding(config.num_items + 1, d, padding_idx=0)
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.pos_emb = nn.Embedding(config.max_len, d)
        nn.init.trunc_normal_(self.pos_emb.weight, std=math.sqrt(1.0 / d))
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(d, eps=1e-8)

    def encode(self, batch: Batch) -> torch.Tensor:
        """batch.item_ids [B, N] -> L2-normalised sequence embeddings [B, N, d] (padding rows are zero)."""
        ids = batch.item_ids
        B, N = ids.shape
        if N > self.config.max_len:
            raise ValueError(f"sequence width {N} exceeds max_len {self.config.max_len}")
        valid = (torch.arange(N, device=ids.device).unsqueeze(0) < batch.lengths.unsqueeze(1)).unsqueeze(-1)
        x = self.item_emb(ids) * math.sqrt(self.config.embedding_dim) + self.pos_emb.weight[:N].unsqueeze(0)
        x = self.input_dropout(x) * valid
        for block in self.blocks:
            x = block(x, valid)
        return F.normalize(self.final_norm(x), dim=-1, eps=1e-6) * valid

    def encode_last(self, batch: Batch) -> torch.Tensor:
        """The embedding at each row's last real position [B, d] (``encode`` then a gather)."""
        rows = torch.arange(batch.item_ids.shape[0], device=batch.item_ids.device)
        return self.encode(batch)[rows, (batch.lengths - 1).clamp(min=0)]

    def item_vectors(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        w = whole_item_table(self.item_emb, self.pos_emb.weight.device) if ids is None else self.item_emb(ids)
        return F.normalize(w, dim=-1, eps=1e-6)
