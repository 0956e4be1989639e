"""HSTU ranker: multi-task candidate scoring from a user's (item, action, time) history.

Paper: J. Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers for Generative
Recommendations", ICML 2024 (arXiv 2402.17152): §2 (ranking as sequential transduction over interleaved items and
actions; the target-aware candidate setup) and §3 (the HSTU layer). Reference code: the DLRM-v3 ranker of
meta-recsys/generative-recommenders (``generative_recommenders/modules/dlrm_hstu.py`` ``DlrmHSTU``,
``modules/preprocessors.py`` / ``modules/action_encoder.py`` for the input tokens,
``modules/contextual_interleave_preprocessor.py`` for the interleaved form, ``ops/pytorch/pt_hstu_attention.py``
for the candidate mask, ``modules/multitask_module.py`` for the heads and loss).

One example is one ``RankingBatch`` row (``genrec.data.ranking_batch``). The model reads it as one sequence::

    [ prefix: one token per user feature | history tokens, oldest first | candidates ]

- Prefix: each categorical user feature has its own embedding table, and its own linear projection turns the
  embedding into a token (DLRM-v3's contextual features). ``use_contextual=False`` or a schema without user
  features gives no prefix.
- History, ``variant="summed"`` (DLRM-v3 as shipped): one token per event,
  ``(item_emb(item) + Σ_{bits a set in the action bitmask} action_emb[a]) · sqrt(d) + pos_emb[recency]``.
- History, ``variant="interleaved"`` (the paper's form): two tokens per event, ``item_emb(item) · sqrt(d) + pos``
  then ``Σ_a action_emb[a] · sqrt(d) + pos``, so the sequence reads item_1, action_1, item_2, action_2, ...
- Candidates: ``(item_emb(item) + unknown_action) · sqrt(d) + pos_emb[0]`` (summed; a learned "unknown action"
  stands where a history token has its action, so a label is never an input) or ``item_emb(item) · sqrt(d) +
  pos_emb[0]`` (interleaved: candidates are item tokens, exactly like a history event's item token).
- Positions: ``recency`` = (events in the history) - (event index), 1 for the most recent event; every candidate
  has recency 0 (DLRM-v3: all candidates share one position).
- Mask (``genrec.ops.ranking_mask.target_aware_mask``, M-FALCON form): prefix and history are causal; each
  candidate sees the prefix, the whole history and itself, never another candidate.
- Layers: ``genrec.models.hstu.HSTULayer``, i.e. the math of ``genrec.ops.hstu_math`` (SiLU projection to U, V, Q,
  K; pointwise SiLU attention with the relative bias rab; gated residual), called with this sequence's mask,
  offsets and time index. There is no second copy of the layer math.
- Relative bias: the position term uses offsets between *logical* positions (prefix f at f, history token k at
  P + k, all candidates at P + number of history tokens); the time term buckets |query time - key time| with each
  token's own time as its query time: a history event's time, a candidate's impression time (``cand_times``;
  every history event is before it, so nothing after the candidate enters), and no time term for prefix keys.
- Head (DLRM-v3's multitask module): ``logits = MLP(LN(h_c) ⊙ LN(W_i · item_emb(c)))`` with one shared tower,
  Linear -> SwishLayerNorm -> Linear to T logits (one per task). ``h_c`` is the last layer's output at the
  candidate. Each task's output bias starts at 0, or at logit(base rate) with ``task_base_rates`` (a ranker that
  starts at the base rate does not spend its first steps learning it).
- Loss: BCE-with-logits per task, averaged over real candidates, then ``Σ_t task_weights[t] · loss_t``.
  The interleaved variant also trains at every real history position that has ``hist_labels``: the item_i token,
  which sees only the prefix and the pairs before event i, predicts event i's task labels. Candidate and history
  labels of a task are averaged together (each label counts once). The summed variant cannot do this without
  leaking labels (token i contains action i), so it ignores ``hist_labels``.

Multi-domain options (one model for several domains, or surfaces: ``schema.domains``, ``batch.cand_domains``; all
off by default, and then the model, its parameters and its outputs are exactly those without them). They follow the
parameter-untying ideas of Meta's Lattice (Luo et al., "Meta Lattice: Model Space Redesign for Cost-Effective
Industry-Scale Ads Recommendations", 2025, arXiv 2512.09200: one consolidated model with domain-specific parts
instead of one model per surface) and STAR (Sheng et al., "One Model to Serve All: Star Topology Adaptive
Recommender for Multi-Domain CTR Prediction", CIKM 2021: shared plus domain-specific parameters):
- ``domain_token``: a learned per-domain vector is added to each candidate's token, inside the scaled part:
  ``(item_emb(c) + unknown_action + domain_emb[domain(c)]) · sqrt(d) + pos_emb[0]`` (a candidate-level context
  token; the domain is a property of the candidate, e.g. its genre, so it cannot be one prefix token per row).
- ``domain_towers``: one head tower per domain (Linear -> SwishLayerNorm -> Linear, as the shared one); a
  candidate's logits come from its own domain's tower only. The item side ``W_i`` stays shared.
- ``domain_ffn``: per-domain pointwise transformation for the candidate tokens: in every layer a candidate's
  residual update is ``W_o[domain] · dropout(U ⊙ LN(A·V))`` with its domain's output projection, history and prefix
  tokens keep the layer's shared ``W_o``. HSTU has no separate FFN block (paper §3.1: the gated output projection
  is its pointwise transformation), so this is the documented equivalent of per-domain FFN weights; the U, V, Q, K
  projection stays shared, so the cached history keys and values of ``rank_cached`` do not depend on the domain.
Every option needs ``cand_domains`` with a known domain (1..K) at every real candidate (ValueError otherwise).
``domain_towers`` is refused with the interleaved variant (its history positions are scored too, and a history
event has no domain in the batch). ``rank_cached`` supports every option (tested equal to ``forward``); with
``domain_token`` it does not read the candidate tables' first-layer rows (they are per item, not per domain).

Deliberate deviations from the DLRM-v3 reference:
- History truncation keeps the MOST RECENT ``max_history`` events (the reference's ``maybe_truncate_seq`` keeps
  the earliest, dropping the events closest to the candidates).
- Time enters as HSTU's relative attention bias (log buckets, ``hstu_math.time_buckets``), as in genrec's HSTU and
  the paper's §3.1, not as the reference's ⌊sqrt(minutes)⌋-bucketed input embedding; the candidate's query time is
  its own impression time rather than the last history timestamp (both are never after the candidate).
- Each action bit adds a d-dimensional learned vector (a linear map of the bitmask) instead of concatenating
  8-dimensional bit embeddings and running an MLP; items are a plain embedding table (no content MLP).
- The user state is LayerNorm(h) with no time-of-day features (the reference's
  ``TimestampLayerNormPostprocessor`` appends hour / weekday sin-cos features first); the candidate side is a
  linear map of the shared item table followed by LayerNorm (the reference runs a separate MLP on item features).
- The contextual prefix holds the schema's user features only (the reference's MovieLens configs also put the
  user id there, and zero the prefix for users with fewer than 20 events; neither is done here).
- The loss is a plain mean per task (the reference divides the BCE sum by the clamped weight sum, the same mean,
  then multiplies by a constant 0.2, which only rescales the learning rate); task weights are configurable.
- The attention normaliser N is the longest possible sequence, P + tokens_per_event · max_history + 1 (constant,
  so a row's result never depends on its batch's padding), as genrec's HSTU divides by ``max_len``.
- ``dense_features`` are not read (the reference's HSTU ranker has no per-candidate dense features either).
- Logits of padding candidates are 0. ``forward`` scores every candidate in one pass over prefix + history +
  candidates (O((P + W + C)²) attention; what training uses). ``rank_cached`` is the M-FALCON inference path
  (paper §5): prefix + history are encoded once, their per-layer keys and values cached (history tokens never see
  a candidate), and the candidates are scored in micro-batches against the cache plus themselves, with the layer
  math of ``genrec.ops.hstu_math`` through the projection / residual helpers of ``genrec.ops.mfalcon``; equal to
  ``forward`` (tested to 1e-5). ``genrec.ranking_api.Ranker`` uses it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genrec.data.ranking_batch import RankingBatch, RankingSchema
from genrec.models.hstu import HSTUConfig, HSTULayer
from genrec.models.ranking_floors import init_output_biases
from genrec.ops.hstu_math import (
    from_heads,
    gated_residual,
    hstu_attention,
    input_norm,
    project,
    split_uvqk,
    to_heads,
)
from genrec.ops.mfalcon import layer_finish, layer_uvqk
from genrec.ops.ranking_mask import (
    logical_positions,
    rab_index_per_key,
    relative_offsets,
    target_aware_mask,
    token_valid,
)

__all__ = ["CandidateTables", "HSTURanker", "HSTURankerConfig", "keep_most_recent"]

VARIANTS = ("summed", "interleaved")


@dataclass
class HSTURankerConfig:
    """Hyperparameters; the sizes of the embedding tables and the number of tasks come from the ``RankingSchema``
    given to ``HSTURanker``."""

    embedding_dim: int = 64  # d
    num_blocks: int = 2
    num_heads: int = 2  # h
    attention_dim: int = 32  # d_qk per head
    linear_dim: int = 32  # d_v per head
    dropout: float = 0.2  # on the input tokens
    linear_dropout: float = 0.1  # on U ⊙ LN(AV), inside each layer
    max_history: int = 200  # the most recent events kept
    variant: str = "summed"  # "summed" (item + action in one token) | "interleaved" (item, action tokens)
    use_contextual: bool = True  # one prefix token per user feature
    use_time_bias: bool = True
    use_position_bias: bool = True
    num_time_buckets: int = 128
    head_hidden_dim: int | None = None  # width of the shared head tower; None = embedding_dim
    task_weights: tuple[float, ...] | None = None  # loss weight per task (schema order); None = all 1
    task_base_rates: tuple[float, ...] | None = None  # initial output bias logit(rate) per task; None = bias 0
    # multi-domain options (the number of domains comes from the schema; see the module docstring)
    domain_token: bool = False  # add a learned per-domain vector to every candidate's token
    domain_towers: bool = False  # one head tower per domain
    domain_ffn: bool = False  # per-domain output projection W_o for the candidate tokens in every layer

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("embedding_dim", "num_blocks", "num_heads", "attention_dim", "linear_dim", "max_history",
                     "num_time_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_hidden_dim is not None and self.head_hidden_dim < 1:
            raise ValueError(f"head_hidden_dim must be >= 1, got {self.head_hidden_dim}")
        for name in ("dropout", "linear_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.task_weights is not None:
            self.task_weights = tuple(float(w) for w in self.task_weights)
            if any(not math.isfinite(w) or w < 0 for w in self.task_weights):
                raise ValueError(f"task_weights must be finite and >= 0, got {self.task_weights}")
        if self.task_base_rates is not None:
            self.task_base_rates = tuple(float(r) for r in self.task_base_rates)
            if any(not 0.0 < r < 1.0 for r in self.task_base_rates):
                raise ValueError(f"task_base_rates must be in (0, 1), got {self.task_base_rates}")
        if self.domain_towers and self.variant == "interleaved":
            raise ValueError("domain_towers needs variant='summed': the interleaved variant also scores history "
                             "positions, and a history event has no domain in a RankingBatch")

    @property
    def uses_domains(self) -> bool:
        return self.domain_token or self.domain_towers or self.domain_ffn

    @property
    def tokens_per_event(self) -> int:
        return 2 if self.variant == "interleaved" else 1


@dataclass(frozen=True)
class CandidateTables:
    """Per item id (row 0 = padding): what scoring a candidate computes from its item alone
    (``HSTURanker.candidate_tables``).

    first_uvqk [num_items + 1, 2h(dv + dqk)]: the first layer's SiLU(LN(token) W_uvqk) of the item's candidate
    token (without a domain vector: a model with ``domain_token`` does not read it); item_side [num_items + 1, d]:
    the head's LN(W_i · item_emb(item))."""

    first_uvqk: torch.Tensor
    item_side: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.first_uvqk, self.item_side))


def keep_most_recent(batch: RankingBatch, max_history: int) -> RankingBatch:
    """The batch with each row's history cut to its most recent ``max_history`` events, still left-aligned
    (history columns [B, L] -> [B, min(L, max_history)]); unchanged when L <= max_history."""
    L = batch.hist_items.shape[1]
    if L <= max_history:
        return batch
    device = batch.hist_items.device
    n = batch.hist_lengths  # [B]
    kept = n.clamp(max=max_history)  # [B]
    start = (n - max_history).clamp(min=0)  # [B] first kept event
    slots = torch.arange(max_history, device=device)  # [M]
    source = (start.unsqueeze(1) + slots.unsqueeze(0)).clamp(max=L - 1)  # [B, M] old column of each new slot
    real = slots.unsqueeze(0) < kept.unsqueeze(1)  # [B, M]

    def take(t: torch.Tensor) -> torch.Tensor:  # [B, L, ...] -> [B, M, ...], zero past each row's length
        index = source.view(*source.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
        mask = real.view(*real.shape, *([1] * (t.dim() - 2)))
        return torch.gather(t, 1, index) * mask.to(t.dtype)

    return dataclasses.replace(
        batch,
        hist_items=take(batch.hist_items),
        hist_actions=take(batch.hist_actions),
        hist_times=take(batch.hist_times),
        hist_lengths=kept,
        hist_labels=None if batch.hist_labels is None else take(batch.hist_labels),
    )


class SwishLayerNorm(nn.Module):
    """x · sigmoid(LayerNorm(x)), the activation of DLRM-v3's head tower."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.norm(x))


class HSTURanker(nn.Module):
    """HSTU ranker: ``forward(batch) -> logits [B, C, T]``; ``loss(batch) -> (total, {task: loss})``."""

    # ``batch.dense_features`` is never read (only validated): callers building inference batches may pass zeros of
    # the contract's shape instead of computing them (``genrec.ranking_api.Ranker.make_batch`` does).
    reads_dense_features = False

    def __init__(self, schema: RankingSchema, config: HSTURankerConfig | None = None) -> None:
        super().__init__()
        config = config or HSTURankerConfig()
        T = schema.num_tasks
        for name in ("task_weights", "task_base_rates"):
            value = getattr(config, name)
            if value is not None and len(value) != T:
                raise ValueError(f"{name} has {len(value)} values, but the schema has {T} tasks {schema.tasks}")
        if config.uses_domains and not schema.domains:
            raise ValueError("domain_token / domain_towers / domain_ffn need a schema with domains (load the data "
                             "with domains=<definition>)")  # fmt: skip
        self.schema, self.config = schema, config
        self.num_domains = len(schema.domains)  # K
        d = config.embedding_dim
        self.num_prefix = len(schema.user_features) if config.use_contextual else 0  # P
        # the longest sequence: P + tokens_per_event · max_history + one candidate position
        self.max_len = self.num_prefix + config.tokens_per_event * config.max_history + 1
        self.register_buffer("task_weights", torch.tensor(config.task_weights or (1.0,) * T), persistent=False)

        # input tokens
        self.item_emb = nn.Embedding(schema.num_items + 1, d, padding_idx=0)  # [num_items + 1, d]
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.action_emb = nn.Parameter(torch.empty(schema.num_actions, d).normal_(0, 0.02))  # [A, d], one per bit
        self.unknown_action = nn.Parameter(torch.empty(d).normal_(0, 0.02))  # [d], the candidates' action
        self.pos_emb = nn.Embedding(config.max_history + 1, d)  # [max_history + 1, d], index = recency
        nn.init.xavier_normal_(self.pos_emb.weight)
        self.feature_emb = nn.ModuleList(
            nn.Embedding(size + 1, d, padding_idx=0) for size in schema.user_feature_sizes[: self.num_prefix])
        self.feature_proj = nn.ModuleList(nn.Linear(d, d) for _ in range(self.num_prefix))
        self.input_dropout = nn.Dropout(config.dropout)

        # the HSTU layers (genrec.models.hstu, whose math is genrec.ops.hstu_math)
        layer_config = HSTUConfig(
            num_items=schema.num_items, max_len=self.max_len, embedding_dim=d, num_blocks=config.num_blocks,
            num_heads=config.num_heads, attention_dim=config.attention_dim, linear_dim=config.linear_dim,
            dropout=config.dropout, linear_dropout=config.linear_dropout, use_time_bias=config.use_time_bias,
            use_position_bias=config.use_position_bias, num_time_buckets=config.num_time_buckets)
        self.layers = nn.ModuleList(HSTULayer(layer_config) for _ in range(config.num_blocks))

        # the head: MLP(LN(user state) ⊙ LN(W_i item)) -> T logits, one shared tower (or one per domain)
        self.item_tower = nn.Linear(d, d)
        if config.domain_towers:
            self.domain_heads = nn.ModuleList(self._make_head() for _ in range(self.num_domains))
        else:
            self.head = self._make_head()

        # multi-domain parts, made after every shared part (a model without them is initialised as before)
        K = self.num_domains
        if config.domain_token:
            self.domain_emb = nn.Embedding(K + 1, d, padding_idx=0)  # [K + 1, d], row 0 = unknown (never used)
            nn.init.normal_(self.domain_emb.weight, 0.0, 0.02)
            with torch.no_grad():
                self.domain_emb.weight[0].zero_()
        if config.domain_ffn:
            hdv = config.num_heads * config.linear_dim
            self.domain_out = nn.ModuleList(nn.ModuleList(nn.Linear(hdv, d) for _ in range(K))
                                            for _ in range(config.num_blocks))  # fmt: skip
            for per_layer in self.domain_out:  # as each layer's shared W_o
                for linear in per_layer:
                    nn.init.xavier_uniform_(linear.weight)

    def _make_head(self) -> nn.Sequential:
        """One head tower: Linear -> SwishLayerNorm -> Linear to T logits, output bias 0 or logit(base rate)."""
        d, T = self.config.embedding_dim, self.schema.num_tasks
        hidden = self.config.head_hidden_dim or d
        head = nn.Sequential(nn.Linear(d, hidden), SwishLayerNorm(hidden), nn.Linear(hidden, T))
        with torch.no_grad():
            head[-1].bias.zero_()
        init_output_biases(head[-1], self.config.task_base_rates, self.schema)  # logit(rate) when rates are given
        return head

    # ------------------------------------------------------------------------------------------------- public

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        """Candidate logits [B, C, T] (0 at padding candidates)."""
        return self._logits(batch)[0]

    @torch.no_grad()
    def candidate_tables(self) -> CandidateTables:
        """What a candidate's scoring computes from its item id alone, for every item id (eval mode; a snapshot
        of the current weights: rebuild after changing them). ``rank_cached(batch, tables=...)`` reads rows of
        these instead of recomputing them for every candidate of every request."""
        if self.training:
            raise RuntimeError("HSTURanker.candidate_tables is an inference path: call model.eval() first")
        items = torch.arange(self.schema.num_items + 1, device=self.item_emb.weight.device)  # [I + 1]
        tokens = self._candidate_tokens(self.item_emb(items))  # [I + 1, d]
        first = self.layers[0]
        return CandidateTables(
            first_uvqk=project(input_norm(tokens), first.uvqk),  # [I + 1, 2h(dv + dqk)]
            item_side=self._item_side(items),  # [I + 1, d]
        )

    @torch.no_grad()
    def rank_cached(
        self, batch: RankingBatch, microbatch: int = 256, tables: CandidateTables | None = None
    ) -> torch.Tensor:
        """M-FALCON: candidate logits [B, C, T] equal to ``forward(batch)`` (eval mode), computed with the history
        encoded once and the candidates scored in micro-batches of ``microbatch`` against its cached keys/values.

        Prefix and history tokens never attend to candidates (the target-aware mask), so their per-layer keys and
        values do not depend on the candidates: one pass over prefix + history ([B, P + W], causal) keeps them for
        every layer; then each micro-batch of b candidates runs every layer for its own b tokens only, each
        candidate attending to the cached prefix + history keys and to itself (O(b·(P + W)) attention and O(b·d²)
        projections per layer, instead of O((P + W + C)²) for the whole sequence at once). The attention of a
        candidate is ``hstu_attention`` over the history keys plus the same pointwise attention over its own key
        (the sum over keys split in two; the one-key part as a row-wise dot product), with the same relative bias
        (logical positions, each token's time) and the same normaliser as ``forward``. Inference only: raises in
        training mode (dropout would differ).

        ``tables`` (``candidate_tables()`` of the same weights): the candidates' first-layer projection and the
        head's item side are read from it by item id instead of being computed (the same values up to float
        rounding)."""
        if self.training:
            raise RuntimeError("HSTURanker.rank_cached is an inference path: call model.eval() first")
        if microbatch < 1:
            raise ValueError(f"microbatch must be >= 1, got {microbatch}")
        self._check(batch)
        batch = keep_most_recent(batch, self.config.max_history)
        x, times, has_time = self._tokens(batch)  # [B, N, d], [B, N], [B, N]
        P, C = self.num_prefix, batch.cand_items.shape[1]
        B, N, _ = x.shape
        H = N - C  # prefix + history slots
        W = H - P
        device = x.device
        hist_tokens = self.config.tokens_per_event * batch.hist_lengths  # [B]
        no_cands = torch.zeros(B, 0, dtype=torch.bool, device=device)
        valid = token_valid(P, hist_tokens, W, no_cands)  # [B, H]
        positions = logical_positions(P, hist_tokens, W, 0)  # [B, H]
        offsets = relative_offsets(positions)  # [B, H, H]
        use_time = self.config.use_time_bias
        nb = self.config.num_time_buckets
        h_times, h_has_time = times[:, :H], has_time[:, :H]
        index = rab_index_per_key(offsets, h_times, h_times, h_has_time, nb) if use_time else None
        norm = torch.full((1,), float(self.max_len), device=device)
        keep = valid.unsqueeze(-1).to(x.dtype)  # [B, H, 1]
        hist_mask = target_aware_mask(valid, 0).unsqueeze(1).to(x.dtype)  # [B, 1, H, H]
        key_mask = valid.view(B, 1, 1, H).to(x.dtype)  # [B, 1, 1, H]: a candidate sees every real history key

        # 1) prefix + history, once: the per-layer keys and values of every history token
        xh = self.input_dropout(x[:, :H]) * keep  # [B, H, d]
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in self.layers:
            u, v, q, k = layer_uvqk(layer, xh)  # v [B, h, H, dv]; q, k [B, h, H, dqk]
            cache.append((k, v))
            av = hstu_attention(q, k, v, layer.rab(offsets, index), hist_mask, norm)  # [B, h, H, dv]
            xh = layer_finish(layer, xh, u, av) * keep

        # 2) candidates, micro-batch by micro-batch, against the cached keys and values
        cand_pos = (P + hist_tokens).view(B, 1, 1)  # [B, 1, 1] the shared logical position of the candidates
        # A candidate on itself: offset 0 and time gap 0, the same bias for every candidate -> [1, 1, 1].
        s_off = torch.zeros(1, 1, 1, dtype=torch.long, device=device)
        s_times = torch.zeros(1, 1, dtype=torch.long, device=device)
        s_index = (rab_index_per_key(s_off, s_times, s_times, torch.ones_like(s_times, dtype=torch.bool), nb)
                   if use_time else None)  # fmt: skip
        logits = x.new_zeros(B, C, self.schema.num_tasks)
        for lo in range(0, C, microbatch):
            hi = min(C, lo + microbatch)
            b = hi - lo
            mask_c = batch.cand_mask[:, lo:hi]  # [B, b]
            if not bool(mask_c.any()):
                continue
            keep_c = mask_c.unsqueeze(-1).to(x.dtype)  # [B, b, 1]
            xc = self.input_dropout(x[:, H + lo : H + hi]) * keep_c  # [B, b, d]
            c_times = times[:, H + lo : H + hi]  # [B, b]
            # The bias of a candidate on the history keys depends on its row and its time only (all candidates
            # share one logical position): when a row's real candidates share one time (Ranker batches do), one
            # query row [B, 1, H] stands for all of them and broadcasts in the attention (padding candidates get
            # that bias too; their outputs are zeroed).
            first = c_times.gather(1, mask_c.to(torch.int8).argmax(dim=1, keepdim=True))  # [B, 1] a real one's
            if use_time and not bool(((c_times == first) | ~mask_c).all()):
                c_off = (cand_pos - positions.view(B, 1, H)).clamp(min=0).expand(B, b, H)  # [B, b, H]
                c_index = rab_index_per_key(c_off, c_times, h_times, h_has_time, nb)
            else:
                c_off = (cand_pos - positions.view(B, 1, H)).clamp(min=0)  # [B, 1, H]
                c_index = rab_index_per_key(c_off, first, h_times, h_has_time, nb) if use_time else None
            items_c = batch.cand_items[:, lo:hi]  # [B, b]
            domains_c = None if batch.cand_domains is None else batch.cand_domains[:, lo:hi]  # [B, b]
            for depth, (layer, (k_hist, v_hist)) in enumerate(zip(self.layers, cache)):
                if depth == 0 and tables is not None and not self.config.domain_token:  # the item's token alone
                    uvqk = F.embedding(items_c, tables.first_uvqk)  # [B, b, 2h(dv + dqk)], rows by item id
                    if not bool(mask_c.all()):
                        uvqk = uvqk * keep_c  # padding candidates: 0, as their zero input token gives
                    u, v, q, k = split_uvqk(uvqk, layer.h, layer.dv, layer.dqk)
                    v, q, k = to_heads(v, layer.h), to_heads(q, layer.h), to_heads(k, layer.h)
                else:
                    u, v, q, k = layer_uvqk(layer, xc)  # v [B, h, b, dv]; q, k [B, h, b, dqk]
                hist = hstu_attention(q, k_hist, v_hist, layer.rab(c_off, c_index), key_mask, norm)  # [B, h, b, dv]
                # each candidate on itself alone: hstu_attention over one key, as a row-wise dot product (the form
                # of genrec.ops.mfalcon.score_candidates) rather than B·h·b products of 1 x 1 matrices
                w_self = F.silu((q * k).sum(-1, keepdim=True) + layer.rab(s_off, s_index).unsqueeze(1))  # [B, h, b, 1]
                own = w_self * v / norm.view(-1, 1, 1, 1)  # [B, h, b, dv]
                xc = self._finish_candidates(depth, xc, u, hist + own, domains_c) * keep_c
            item_side = None if tables is None else F.embedding(items_c, tables.item_side)  # [B, b, d]
            logits[:, lo:hi] = self._score(xc, items_c, item_side, domains_c) * mask_c.unsqueeze(-1)
        return logits

    def history_logits(self, batch: RankingBatch) -> torch.Tensor:
        """Interleaved variant only: the prediction for each history event's task labels from its item token,
        which sees only the prefix and earlier (item, action) pairs -> [B, L', T] aligned with the history kept
        (the most recent ``max_history`` events, left-aligned; L' = min(L, max_history)); 0 at padding."""
        if self.config.variant != "interleaved":
            raise ValueError("history_logits needs variant='interleaved': in the summed variant a history token "
                             "contains its own action")
        return self._logits(batch)[1]

    def loss(self, batch: RankingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(Σ_t task_weights[t] · loss_t, {task name: loss_t}) with loss_t the mean BCE-with-logits of task t over
        the real candidates (and, for the interleaved variant, the real history events when ``hist_labels`` is
        given). ``batch.label_weights`` [B, C, T] weigh the candidate labels (0 = no label for that task: the mean
        is then over the task's labelled candidates; a task without any in the batch has loss 0)."""
        if batch.labels is None:
            raise ValueError("HSTURanker.loss needs batch.labels (per-task candidate labels)")
        self._check(batch)
        _check_labels("labels", batch.labels)
        batch = keep_most_recent(batch, self.config.max_history)
        cand_logits, hist_logits = self._logits(batch, truncated=True)  # [B, C, T], [B, L, T] or None
        cand_weight = batch.cand_mask.unsqueeze(-1).to(cand_logits.dtype)  # [B, C, 1]
        if batch.label_weights is not None:
            cand_weight = cand_weight * batch.label_weights.to(cand_logits.dtype)  # [B, C, T]
        terms = [(cand_logits, batch.labels, cand_weight)]
        if hist_logits is not None and batch.hist_labels is not None:
            _check_labels("hist_labels", batch.hist_labels)
            L = batch.hist_items.shape[1]
            real = torch.arange(L, device=batch.hist_lengths.device).unsqueeze(0) < batch.hist_lengths.unsqueeze(1)
            terms.append((hist_logits, batch.hist_labels, real.unsqueeze(-1).to(hist_logits.dtype)))
        total_bce = cand_logits.new_zeros(self.schema.num_tasks)  # [T]
        count = cand_logits.new_zeros(self.schema.num_tasks)  # [T]
        for logits, labels, weight in terms:  # weight [B, ·, 1] or [B, ·, T]
            target = torch.where(weight > 0, labels.to(logits.dtype), torch.zeros_like(logits))
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # [B, ·, T]
            total_bce = total_bce + (bce * weight).sum(dim=(0, 1))
            count = count + weight.expand_as(bce).sum(dim=(0, 1))
        per_task = torch.where(count > 0, total_bce / count.clamp(min=1e-12), torch.zeros_like(count))  # [T]
        total = (per_task * self.task_weights).sum()
        return total, {name: per_task[t] for t, name in enumerate(self.schema.tasks)}

    # ------------------------------------------------------------------------------------------------- inside

    def _logits(self, batch: RankingBatch, truncated: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(candidate logits [B, C, T], history logits [B, L, T] for the interleaved variant else None)."""
        if not truncated:
            self._check(batch)
            batch = keep_most_recent(batch, self.config.max_history)
        h = self._encode(batch)  # [B, P + W + C, d], zero at padding
        P, L = self.num_prefix, batch.hist_items.shape[1]
        W = self.config.tokens_per_event * L
        cand = self._score(h[:, P + W:], batch.cand_items, domains=batch.cand_domains)  # [B, C, T]
        cand = cand * batch.cand_mask.unsqueeze(-1)
        if self.config.variant != "interleaved":
            return cand, None
        real = torch.arange(L, device=h.device).unsqueeze(0) < batch.hist_lengths.unsqueeze(1)  # [B, L]
        hist = self._score(h[:, P:P + W:2], batch.hist_items) * real.unsqueeze(-1)  # item tokens -> [B, L, T]
        return cand, hist

    def _score(self, state: torch.Tensor, items: torch.Tensor, item_side: torch.Tensor | None = None,
               domains: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The head: user state at a token [B, K, d] and the item asked about [B, K] -> logits [B, K, T].
        ``item_side``: ``_item_side(items)`` when the caller has it already. ``domains`` [B, K]: each token's
        domain (1..K'), read with ``domain_towers`` (each token through its own domain's tower)."""
        item = self._item_side(items) if item_side is None else item_side  # [B, K, d]
        z = input_norm(state) * item  # [B, K, d]
        if not self.config.domain_towers:
            return self.head(z)
        assert domains is not None
        return _select_domain(torch.stack([head(z) for head in self.domain_heads]), domains)  # [B, K, T]

    def _finish_candidates(self, depth: int, x: torch.Tensor, u: torch.Tensor, av: torch.Tensor,
                           domains: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """Layer ``depth``'s residual output for candidate tokens x [B, b, d] (u [B, b, h·dv], av [B, h, b, dv]):
        ``x + W_o · dropout(U ⊙ LN(A·V))`` with the layer's shared W_o, or (``domain_ffn``) each candidate's own
        domain's W_o (domains [B, b], 1..K; padding candidates may hold 0, their output is discarded)."""
        layer = self.layers[depth]
        if not self.config.domain_ffn:
            return layer_finish(layer, x, u, av)
        assert domains is not None
        outs = self.domain_out[depth]

        def out(z: torch.Tensor) -> torch.Tensor:  # [B, b, h·dv] -> [B, b, d]
            return _select_domain(torch.stack([linear(z) for linear in outs]), domains)

        return gated_residual(x, u, from_heads(av), out, layer.dropout)

    def _item_side(self, items: torch.Tensor) -> torch.Tensor:
        """The head's item input LN(W_i · item_emb(item)): items [...] -> [..., d]."""
        return input_norm(self.item_tower(self.item_emb(items)))

    def _candidate_tokens(self, cand_items: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        """Candidate input tokens from their item embeddings [..., d] (as ``_tokens`` builds them) -> [..., d].
        ``domains`` [...]: the candidates' domains, added as ``domain_emb`` with ``domain_token`` (None: none)."""
        scale = math.sqrt(self.config.embedding_dim)
        cand_pos = self.pos_emb.weight[0]  # [d], recency 0 shared by all candidates
        if self.config.domain_token and domains is not None:
            cand_items = cand_items + self.domain_emb(domains)  # [..., d]
        if self.config.variant == "summed":
            return (cand_items + self.unknown_action) * scale + cand_pos
        return cand_items * scale + cand_pos

    def _encode(self, batch: RankingBatch) -> torch.Tensor:
        """Tokens, then the HSTU layers with the target-aware mask -> [B, P + W + C, d] (zero at padding)."""
        x, times, has_time = self._tokens(batch)  # [B, N, d], [B, N], [B, N]
        P, C = self.num_prefix, batch.cand_items.shape[1]
        W = x.shape[1] - P - C
        hist_tokens = self.config.tokens_per_event * batch.hist_lengths  # [B] real history tokens
        valid = token_valid(P, hist_tokens, W, batch.cand_mask)  # [B, N]
        mask = target_aware_mask(valid, C).unsqueeze(1).to(x.dtype)  # [B, 1, N, N], broadcast over heads
        offsets = relative_offsets(logical_positions(P, hist_tokens, W, C))  # [B, N, N]
        index = None
        if self.config.use_time_bias:
            index = rab_index_per_key(offsets, times, times, has_time, self.config.num_time_buckets)  # [B, N, N]
        norm = torch.full((1,), float(self.max_len), device=x.device)
        keep = valid.unsqueeze(-1).to(x.dtype)  # [B, N, 1]
        x = self.input_dropout(x) * keep
        for depth, layer in enumerate(self.layers):
            if not self.config.domain_ffn:
                x = layer(x, offsets, index, mask, norm) * keep
                continue
            # the layer's math (HSTULayer.forward) with per-domain W_o for the candidate tokens (the last C)
            u, v, q, k = layer_uvqk(layer, x)  # u [B, N, h·dv]; v, q, k [B, h, N, ·]
            av = hstu_attention(q, k, v, layer.rab(offsets, index), mask, norm)  # [B, h, N, dv]
            H = x.shape[1] - C
            head = layer_finish(layer, x[:, :H], u[:, :H], av[:, :, :H])  # [B, H, d] prefix + history
            cands = self._finish_candidates(depth, x[:, H:], u[:, H:], av[:, :, H:], batch.cand_domains)  # [B, C, d]
            x = torch.cat([head, cands], dim=1) * keep
        return x

    def _tokens(self, batch: RankingBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input tokens [B, P + W + C, d], each token's time [B, N] long and whether it has one [B, N] bool."""
        d = self.config.embedding_dim
        scale = math.sqrt(d)
        B, L = batch.hist_items.shape
        device = batch.hist_items.device

        # history: recency 1 for the most recent event, n for the oldest; 0 at padding (masked anyway)
        slots = torch.arange(L, device=device).unsqueeze(0)  # [1, L]
        recency = (batch.hist_lengths.unsqueeze(1) - slots).clamp(min=0)  # [B, L]
        pos = self.pos_emb(recency)  # [B, L, d]
        bits = (batch.hist_actions.unsqueeze(-1) >> torch.arange(self.schema.num_actions, device=device)) & 1
        actions = bits.to(self.action_emb.dtype) @ self.action_emb  # [B, L, d], Σ of the set bits' vectors
        items = self.item_emb(batch.hist_items)  # [B, L, d]
        if self.config.variant == "summed":
            history = (items + actions) * scale + pos  # [B, L, d]
            hist_times = batch.hist_times  # [B, L]
        else:
            history = torch.stack([items * scale + pos, actions * scale + pos], dim=2).flatten(1, 2)  # [B, 2L, d]
            hist_times = batch.hist_times.repeat_interleave(2, dim=1)  # [B, 2L]
        candidates = self._candidate_tokens(self.item_emb(batch.cand_items), batch.cand_domains)  # [B, C, d]

        parts = [history, candidates]
        time_parts = [hist_times, batch.cand_times]
        if self.num_prefix:
            prefix = torch.stack([proj(emb(batch.user_features[:, f])) for f, (emb, proj)
                                  in enumerate(zip(self.feature_emb, self.feature_proj))], dim=1)  # [B, P, d]
            parts.insert(0, prefix)
            time_parts.insert(0, torch.zeros(B, self.num_prefix, dtype=torch.long, device=device))
        x = torch.cat(parts, dim=1)  # [B, N, d]
        times = torch.cat(time_parts, dim=1).long()  # [B, N]
        has_time = torch.ones_like(times, dtype=torch.bool)
        has_time[:, : self.num_prefix] = False  # prefix tokens have no time
        return x, times, has_time

    def _check(self, batch: RankingBatch) -> None:
        """The batch against the schema (shapes, id ranges, action bitmasks: ``RankingBatch.validate``), and with a
        domain option a known domain at every real candidate."""
        batch.validate(self.schema)
        if not self.config.uses_domains:
            return
        if batch.cand_domains is None:
            raise ValueError("this HSTU ranker has domain options (domain_token / domain_towers / domain_ffn) and "
                             "needs batch.cand_domains (load the data with domains=<definition>)")  # fmt: skip
        if bool((batch.cand_domains[batch.cand_mask] == 0).any()):
            raise ValueError("RankingBatch.cand_domains: a real candidate has domain 0 (unknown); this HSTU ranker's "
                             f"domain options need one of its domains {self.schema.domains} at every candidate")  # fmt: skip


def _select_domain(per_domain: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """per_domain [K, B, M, E] (every domain's output for every token), domains [B, M] (1..K; 0 at padding reads
    domain 1, whose value the caller discards) -> [B, M, E], each token's own domain's output."""
    index = (domains.clamp(min=1) - 1).unsqueeze(0).unsqueeze(-1)  # [1, B, M, 1]
    return per_domain.gather(0, index.expand(1, *domains.shape, per_domain.shape[-1]))[0]


def _check_labels(name: str, labels: torch.Tensor) -> None:
    if labels.numel() and bool(((labels < 0) | (labels > 1) | labels.isnan()).any()):
        raise ValueError(f"RankingBatch.{name}: labels must be in [0, 1]")
