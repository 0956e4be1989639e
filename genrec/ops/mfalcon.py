"""M-FALCON: rank m candidates for one history with an HSTU encoder, reusing the history's keys and values.

Paper: Zhai et al., ICML 2024, §5 (M-FALCON, "Microbatched-Fast Attention Leveraging Cacheable OperatioNs"); the
reference's cached path is ``STULayer.cached_forward`` / ``delta_hstu_mha`` (``modules/stu.py``,
``ops/hstu_attention.py``) and ``delta_x_offsets`` in research ``hstu.py``.

The target computation: candidate c is scored as if it were appended alone after the history, i.e. the sequence
``history (n items) + c`` through ``HSTU.encode``, and read at position n. M-FALCON gets that for m candidates at
once: b_m candidates are appended after the history, all at position n, with the attention mask changed so that
each candidate sees the history and itself but no other candidate. History positions never see candidates, so
the history's per-layer keys and values (and its outputs) do not depend on the candidates: ``HistoryCache``
computes them once, and every microbatch of b_m candidates then costs O(b_m·d² + b_m·n·d) per layer instead of
O((n + b_m)²·d). A cache is reusable across calls for the same history and request time.

Conventions (the ones that make "appended alone" well defined for this encoder; see ``genrec.data.batches``):
- The candidate sits at position n: absolute position embedding ``pos_emb[n]``, position bias offset n - j to
  history item j and 0 to itself. Histories are truncated to their most recent ``max_len - 1`` items so that
  position n exists.
- Time: the candidate's timestamp and query time are the request time; the last history item's query time is the
  request time too (as ``history_batch`` does), so history rows do not depend on which candidate follows.
- Output per candidate: the L2-normalised encoder output at its position, [m, d]. Score: that output · the
  candidate's L2-normalised item vector (``HSTU.item_vectors``), [m]. This is a choice: the retrieval HSTU has no
  ranking head yet (the paper's ranking GR reads a task head at the candidate's position); a ranker will reuse the
  same cache and microbatching and change only the last line of ``score_candidates``.
- Dropout layers are applied as in ``encode``; call with ``model.eval()`` for serving.

Public: ``HistoryCache``, ``build_history_cache``, ``score_candidates`` (cached, microbatched: M-FALCON),
``score_candidates_uncached`` (one pass per microbatch over history + candidates with the M-FALCON mask, no cache:
the paper's O((n + b_m)²d) baseline, dense plain PyTorch) and ``score_candidates_one_by_one`` (the definition:
history + one candidate through ``HSTU.encode``; the parity reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from genrec.data.batches import Batch
from genrec.ops.hstu_math import (
    from_heads,
    gated_residual,
    hstu_attention,
    input_norm,
    output_normalize,
    project,
    rab_index,
    relative_bias,
    split_uvqk,
    time_buckets,
    to_heads,
)


@dataclass
class HistoryCache:
    """One history's cacheable state. n = history length; per layer l: keys[l] [h, n, dqk], values[l] [h, n, dv],
    cand_rab[l] [n] (bias of a candidate query at position n on history key j), self_rab[l] [] (a candidate on
    itself); history_out [n, d]: the history rows' encoder outputs, L2-normalised (as in the n + 1 sequence: with
    ``attention_norm="max_len"`` these equal encoding the history alone; with "length" they use the n + 1
    normaliser)."""

    n: int
    request_time: int
    has_time: bool
    norm: float
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    cand_rab: list[torch.Tensor]
    self_rab: list[torch.Tensor]
    history_out: torch.Tensor


def _history_arrays(model, history_ids, history_times, request_time, has_time):
    """Truncate to max_len - 1 and build (ids [n], timestamps [n], query_times [n], has_time)."""
    keep = model.config.max_len - 1
    ids = torch.as_tensor(history_ids, dtype=torch.long)[-keep:]
    n = len(ids)
    if n == 0:
        raise ValueError("M-FALCON needs a history of at least one item")
    if has_time is None:
        has_time = history_times is not None
    if history_times is None:
        ts = torch.zeros(n, dtype=torch.long)
        request_time = 0 if request_time is None else int(request_time)
    else:
        ts = torch.as_tensor(history_times, dtype=torch.long)[-keep:]
        request_time = int(ts[-1]) if request_time is None else int(request_time)
    qt = torch.cat([ts[1:], torch.tensor([request_time])])  # [n]: next item's time, request time at the end
    return ids, ts, qt, request_time, bool(has_time)


def _rab(layer, offsets: torch.Tensor, buckets: torch.Tensor | None, num_buckets: int) -> torch.Tensor:
    """The layer's relative bias for given offsets and buckets (None: no time term), any shape."""
    index = rab_index(offsets, buckets, None, num_buckets) if buckets is not None else None
    return relative_bias(layer.rab.pos_w, layer.rab.ts_w, offsets, index, layer.rab.use_position)


def layer_uvqk(layer, x: torch.Tensor):
    """The projection of an HSTU layer (any module with ``uvqk``, ``h``, ``dv``, ``dqk``): x [..., M, d] ->
    u [..., M, h·dv], v [..., h, M, dv], q [..., h, M, dqk], k [..., h, M, dqk]."""
    u, v, q, k = split_uvqk(project(input_norm(x), layer.uvqk), layer.h, layer.dv, layer.dqk)
    return u, to_heads(v, layer.h), to_heads(q, layer.h), to_heads(k, layer.h)


def layer_finish(layer, x: torch.Tensor, u: torch.Tensor, av: torch.Tensor) -> torch.Tensor:
    """The layer's residual output x + W_o · dropout(U ⊙ LN(AV)): x [..., M, d], u [..., M, h·dv],
    av [..., h, M, dv] -> [..., M, d]."""
    return gated_residual(x, u, from_heads(av), layer.out, layer.dropout)


def _embed(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    d = model.config.embedding_dim
    return model.input_dropout(model.item_emb(ids) * math.sqrt(d) + model.pos_emb.weight[positions])


def build_history_cache(
    model, history_ids, history_times=None, request_time: int | None = None, has_time: bool | None = None
) -> HistoryCache:
    """Run the history (causal, alone) through every layer once and keep what candidates need.

    history_ids [n] (oldest first); history_times [n] or None; request_time (default: last history time);
    has_time (default: history_times is not None) -> HistoryCache. Cost: one encoder pass over n items.
    """
    cfg = model.config
    ids, ts, qt, request_time, has_time = _history_arrays(model, history_ids, history_times, request_time, has_time)
    n = len(ids)
    use_time = cfg.use_time_bias and has_time
    norm = float(cfg.max_len) if cfg.attention_norm == "max_len" else float(n + 1)  # "length": the n + 1 sequence
    norm_t = torch.tensor([norm])
    pos = torch.arange(n)
    hist_off = (pos.view(n, 1) - pos.view(1, n)).clamp(min=0)  # [n, n]
    hist_buckets = time_buckets(qt.view(1, n), ts.view(1, n), cfg.num_time_buckets)[0] if use_time else None
    cand_off = n - pos  # [n] offset of position n to every history item
    cand_buckets = None
    self_bucket = None
    if use_time:
        req = torch.tensor([[request_time]])
        cand_buckets = time_buckets(req, ts.view(1, n), cfg.num_time_buckets)[0, 0]  # [n]
        self_bucket = time_buckets(req, req, cfg.num_time_buckets)[0, 0, 0]  # gap 0 -> bucket 0
    causal = torch.ones(n, n).tril()
    x = _embed(model, ids, pos)  # [n, d]
    keys, values, cand_rab, self_rab = [], [], [], []
    for layer in model.layers:
        u, v, q, k = layer_uvqk(layer, x)
        rab = _rab(layer, hist_off, hist_buckets, cfg.num_time_buckets).view(1, n, n)
        x = layer_finish(layer, x, u, hstu_attention(q[None], k[None], v[None], rab, causal, norm_t)[0])  # [h, n, dv]
        keys.append(k)
        values.append(v)
        cand_rab.append(_rab(layer, cand_off, cand_buckets, cfg.num_time_buckets))
        self_rab.append(_rab(layer, torch.tensor(0), self_bucket, cfg.num_time_buckets))
    return HistoryCache(n, request_time, has_time, norm, keys, values, cand_rab, self_rab,
                        output_normalize(x))


def score_candidates(model, cache: HistoryCache, candidates, microbatch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """M-FALCON: candidates [m] item ids -> (outputs [m, d], scores [m]), in microbatches of ``microbatch``.

    Per layer and microbatch: the candidates' own projection, their scores against the cached history keys plus
    their score on themselves, and the cached values; no history recomputation.
    """
    candidates = torch.as_tensor(candidates, dtype=torch.long)
    outs = []
    for start in range(0, len(candidates), microbatch):
        ids = candidates[start : start + microbatch]  # [b]
        x = _embed(model, ids, torch.full_like(ids, cache.n))  # [b, d], all at position n
        for layer, k_hist, v_hist, c_rab, s_rab in zip(
            model.layers, cache.keys, cache.values, cache.cand_rab, cache.self_rab
        ):
            u, v, q, k = layer_uvqk(layer, x)  # v [h, b, dv]; q, k [h, b, dqk]
            w_hist = F.silu(q @ k_hist.transpose(1, 2) + c_rab)  # [h, b, n]: every candidate sees the history
            w_self = F.silu((q * k).sum(-1, keepdim=True) + s_rab)  # [h, b, 1]: ... and itself, no other candidate
            x = layer_finish(layer, x, u, (w_hist @ v_hist + w_self * v) / cache.norm)
        outs.append(output_normalize(x))
    outputs = torch.cat(outs, 0) if outs else torch.zeros(0, model.config.embedding_dim)
    scores = (outputs * model.item_vectors(candidates)).sum(-1)  # [m]; a ranking head would replace this line
    return outputs, scores


def score_candidates_uncached(
    model, history_ids, history_times, request_time, candidates, microbatch: int = 64, has_time: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-FALCON without the cache: per microbatch, one encoder pass over history + b_m candidates (n + b_m tokens)
    with the M-FALCON mask (history causal; candidate i sees the history and itself). Dense plain PyTorch; the
    history is recomputed for every microbatch. Same outputs as ``score_candidates``."""
    cfg = model.config
    ids, ts, qt, request_time, has_time = _history_arrays(model, history_ids, history_times, request_time, has_time)
    candidates = torch.as_tensor(candidates, dtype=torch.long)
    n = len(ids)
    use_time = cfg.use_time_bias and has_time
    norm_t = torch.tensor([float(cfg.max_len) if cfg.attention_norm == "max_len" else float(n + 1)])
    outs = []
    for start in range(0, len(candidates), microbatch):
        c = candidates[start : start + microbatch]
        b = len(c)
        L = n + b
        pos = torch.cat([torch.arange(n), torch.full((b,), n)])  # [L]: every candidate at position n
        t_all = torch.cat([ts, torch.full((b,), request_time)])  # [L]
        qt_all = torch.cat([qt, torch.full((b,), request_time)])
        offsets = (pos.view(L, 1) - pos.view(1, L)).clamp(min=0)  # [L, L]
        buckets = time_buckets(qt_all.view(1, L), t_all.view(1, L), cfg.num_time_buckets)[0] if use_time else None
        i = torch.arange(L)
        mask = ((i.view(L, 1) >= i.view(1, L)) & (i.view(1, L) < n)) | (i.view(L, 1) == i.view(1, L))  # [L, L]
        mask = mask.to(torch.float32)
        x = _embed(model, torch.cat([ids, c]), pos)  # [L, d]
        for layer in model.layers:
            u, v, q, k = layer_uvqk(layer, x)
            rab = _rab(layer, offsets, buckets, cfg.num_time_buckets).view(1, L, L)
            x = layer_finish(layer, x, u, hstu_attention(q[None], k[None], v[None], rab, mask, norm_t)[0])  # [h, L, dv]
        outs.append(output_normalize(x[n:]))
    outputs = torch.cat(outs, 0)
    return outputs, (outputs * model.item_vectors(candidates)).sum(-1)


def score_candidates_one_by_one(
    model, history_ids, history_times, request_time, candidates, batch_size: int = 64, has_time: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition: for each candidate, history + that candidate (n + 1 items) through ``HSTU.encode``, output read
    at the candidate's position. Candidates are batched ``batch_size`` rows at a time (each row its own sequence)."""
    ids, ts, qt, request_time, has_time = _history_arrays(model, history_ids, history_times, request_time, has_time)
    candidates = torch.as_tensor(candidates, dtype=torch.long)
    n = len(ids)
    outs = []
    for start in range(0, len(candidates), batch_size):
        c = candidates[start : start + batch_size]
        b = len(c)
        batch = Batch(
            item_ids=torch.cat([ids.expand(b, n), c.view(b, 1)], 1),  # [b, n + 1]
            timestamps=torch.cat([ts, torch.tensor([request_time])]).expand(b, n + 1),
            query_times=torch.cat([qt, torch.tensor([request_time])]).expand(b, n + 1),
            lengths=torch.full((b,), n + 1),
            has_time=torch.full((b,), has_time),
        )
        outs.append(model.encode(batch)[:, n])
    outputs = torch.cat(outs, 0)
    return outputs, (outputs * model.item_vectors(candidates)).sum(-1)
