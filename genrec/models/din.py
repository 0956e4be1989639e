"""DIN: Deep Interest Network, target attention over the user's history, as a multi-task ranking baseline.

Paper: G. Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018 (arXiv 1706.06978), §4.3
(the local activation unit) and §4.4 (Dice). Reference code: zhougr1993/DeepInterestNetwork ``din/model.py``.

For each real candidate c of a row with history h₁..h_L (:class:`~genrec.data.ranking_batch.RankingBatch`):

    hⱼ     = ItemEmb(itemⱼ) + Σ_{a set in actionⱼ} ActionEmb[a]     [L, d]  (history events carry their actions)
    c      = ItemEmb(candidate)                                    [d]     (candidates carry no action)
    wⱼ     = AttentionMLP([hⱼ, c, hⱼ − c, hⱼ ⊙ c])                 scalar  hidden (80, 40), Dice/PReLU, linear output
    v      = Σ_j wⱼ hⱼ                                             [d]     sum over real history events only
    logits = Linear_T(MLP([v, c, UserEmb(user), FeatEmb_f(user_f)…, dense]))    hidden (200, 80), Dice/PReLU

Attention weights are NOT normalised (no softmax), as the paper argues (§4.3: the sum keeps the intensity of the
user's interest, e.g. how many related items the history holds). The authors' released code does apply a
(scaled, masked) softmax; ``attention_normalization="softmax"`` reproduces that variant. Rows with an empty history
pool to the zero vector. Event and candidate times are not read (time-aware signals come in the dense features).

Activation (``activation``): "prelu" (default; per-channel PReLU) or "dice" (§4.4: p(s) = sigmoid((s − E[s]) /
sqrt(Var[s] + ε)), f(s) = p·s + (1 − p)·α·s, E and Var over the mini-batch in training and running averages at
evaluation, α learned per channel, initialised 0). PReLU is the default because Dice's batch statistics make a
candidate's training-time output depend on the other examples of the batch; at evaluation both are per-example.
The attention MLP runs on real (candidate, history event) pairs only, so Dice's statistics never see padding.

Deliberate deviations:
- The item table is shared by history and candidates (as the paper's goods-id embedding); history events add an
  embedding per set action bit (the paper's behaviours are clicks only; here a 1-star and a 5-star rating differ).
- Attention input is [h, c, h − c, h ⊙ c] (the released code's form; the paper's figure draws the outer product).
- Multi-task: one shared MLP, T logits; the paper has a 2-way softmax for one task.
- Mini-batch aware regularisation (§4.3) is not implemented; use the optimiser's weight decay.
- ``task_base_rates`` starts each task's output bias at logit(base rate) (not in the paper; helps rare tasks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from genrec.data.ranking_batch import RankingBatch, RankingSchema
from genrec.models.ranking_floors import (
    check_task_weights,
    init_output_biases,
    multitask_loss_terms,
    real_candidates,
    scatter_candidates,
)

__all__ = ["DIN", "DINConfig", "Dice"]

ACTIVATIONS = ("prelu", "dice")
NORMALIZATIONS = ("none", "softmax")


class Dice(nn.Module):
    """Data-adaptive activation (DIN §4.4): x ↦ p(x)·x + (1 − p(x))·α·x, p(x) = sigmoid(BatchNorm(x)) without affine.

    x [N, F]. In training mode the batch needs N > 1 (batch statistics), as BatchNorm does.
    """

    def __init__(self, num_features: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(num_features, affine=False, eps=eps)
        self.alpha = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.norm(x))  # [N, F]
        return p * x + (1 - p) * self.alpha * x


def _mlp(in_dim: int, sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers of the given widths, each followed by Dice or PReLU (per channel)."""
    layers: list[nn.Module] = []
    for width in sizes:
        layers.append(nn.Linear(in_dim, width))
        layers.append(Dice(width) if activation == "dice" else nn.PReLU(width))
        in_dim = width
    return nn.Sequential(*layers)


@dataclass
class DINConfig:
    embedding_dim: int = 16  # d
    attention_mlp: tuple[int, ...] = (80, 40)  # the paper's activation unit
    mlp: tuple[int, ...] = (200, 80)  # the paper's final MLP (before the T logits)
    activation: str = "prelu"  # "prelu" | "dice"
    attention_normalization: str = "none"  # "none" (paper) | "softmax" (the authors' released code)
    use_history_actions: bool = True  # add an embedding per set action bit to history events
    task_weights: tuple[float, ...] | None = None  # loss weight per task (all 1 when None)
    task_base_rates: tuple[float, ...] | None = None  # initial output bias logit(rate) per task; None = nn.Linear's

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.attention_normalization not in NORMALIZATIONS:
            raise ValueError(f"attention_normalization must be one of {NORMALIZATIONS}, got "
                             f"{self.attention_normalization!r}")  # fmt: skip
        if self.embedding_dim < 1 or any(w < 1 for w in tuple(self.attention_mlp) + tuple(self.mlp)):
            raise ValueError("DINConfig: embedding_dim and MLP widths must be >= 1")


class DIN(nn.Module):
    """DIN over a :class:`RankingBatch`: ``forward(batch) -> [B, C, T]`` logits, ``attention_weights(batch) ->
    [B, C, L]``, ``loss(batch)`` (see the module docstring)."""

    def __init__(self, schema: RankingSchema, config: DINConfig | None = None) -> None:
        super().__init__()
        config = config or DINConfig()
        self.schema, self.config = schema, config
        self.task_weights = check_task_weights(config.task_weights, schema)
        d = config.embedding_dim
        self.item_emb = nn.Embedding(schema.num_items + 1, d, padding_idx=0)
        self.action_emb = nn.Parameter(torch.zeros(max(schema.num_actions, 1), d).normal_(0, 0.02))  # [A, d]
        self.user_emb = nn.Embedding(schema.num_users + 1, d)
        self.feature_embs = nn.ModuleList(nn.Embedding(n + 1, d) for n in schema.user_feature_sizes)
        for table in (self.item_emb, self.user_emb, *self.feature_embs):
            nn.init.normal_(table.weight, 0.0, 0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        att_sizes = tuple(config.attention_mlp)
        self.attention = _mlp(4 * d, att_sizes, config.activation)
        self.attention_out = nn.Linear(att_sizes[-1] if att_sizes else 4 * d, 1)
        mlp_in = d * (3 + len(schema.user_features)) + len(schema.dense_features)
        self.mlp = _mlp(mlp_in, tuple(config.mlp), config.activation)
        self.heads = nn.Linear(config.mlp[-1] if config.mlp else mlp_in, schema.num_tasks)
        init_output_biases(self.heads, config.task_base_rates, schema)

    def history_embeddings(self, batch: RankingBatch) -> torch.Tensor:
        """[B, L, d]: item embedding plus the embeddings of the event's action bits (0 at padding)."""
        h = self.item_emb(batch.hist_items)  # [B, L, d]
        if self.config.use_history_actions and self.schema.num_actions:
            shifts = torch.arange(self.schema.num_actions, device=batch.hist_actions.device)
            bits = ((batch.hist_actions.unsqueeze(-1) >> shifts) & 1).to(h.dtype)  # [B, L, A]
            h = h + bits @ self.action_emb  # padding has no bits set
        return h

    def _attend(self, batch: RankingBatch) -> tuple[torch.Tensor, ...]:
        """Check the batch and run the activation unit on every real (candidate, history event) pair.

        Returns flat [N], rows [N], candidate embeddings c [N, d], history embeddings h [N, L, d] and attention
        weights w [N, L] (0 at padding).
        """
        batch.validate(self.schema)
        flat, rows = real_candidates(batch)  # [N], [N]
        L = batch.hist_items.shape[1]
        c = self.item_emb(batch.cand_items.reshape(-1)[flat])  # [N, d]
        h = self.history_embeddings(batch)[rows]  # [N, L, d]
        real = torch.arange(L, device=h.device) < batch.hist_lengths[rows].unsqueeze(1)  # [N, L]
        n_idx, l_idx = real.nonzero(as_tuple=True)  # [P], [P] real pairs
        hp, cp = h[n_idx, l_idx], c[n_idx]  # [P, d] each
        scores = self.attention_out(self.attention(torch.cat([hp, cp, hp - cp, hp * cp], dim=1))).squeeze(1)  # [P]
        w = h.new_zeros(len(flat), L).index_put((n_idx, l_idx), scores)  # [N, L]
        if self.config.attention_normalization == "softmax":  # the released code: masked softmax of scores / sqrt(d)
            logits = torch.where(real, w / self.config.embedding_dim**0.5, torch.full_like(w, float("-inf")))
            logits = torch.where(real.any(1, keepdim=True), logits, torch.zeros_like(w))  # empty history: no -inf row
            w = torch.softmax(logits, dim=1) * real
        return flat, rows, c, h, w

    def attention_weights(self, batch: RankingBatch) -> torch.Tensor:
        """[B, C, L] attention weight of each history event for each candidate (0 at padding)."""
        flat, _, _, _, w = self._attend(batch)
        return scatter_candidates(w, flat, batch)

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        """[B, C, T] logits; 0 at padded candidates. Labels are never read."""
        flat, rows, c, h, w = self._attend(batch)
        v = torch.bmm(w.unsqueeze(1), h).squeeze(1)  # [N, d]  Σ_j w_j h_j
        parts = [v, c, self.user_emb(batch.user_ids[rows])]
        parts += [emb(batch.user_features[rows, f]) for f, emb in enumerate(self.feature_embs)]
        parts.append(batch.dense_features.flatten(0, 1)[flat].to(v.dtype))
        logits = self.heads(self.mlp(torch.cat(parts, dim=1)))  # [N, T]
        return scatter_candidates(logits, flat, batch)

    def loss(self, batch: RankingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(Σ_t w_t · loss_t, {task: loss_t}), loss_t the mean BCE of task t over its labelled real candidates
        (``genrec.models.ranking_floors.multitask_loss_terms``; ``batch.label_weights`` weigh the labels)."""
        return multitask_loss_terms(self(batch), batch, self.task_weights, self.schema.tasks)
