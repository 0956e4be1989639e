"""Token layout, attention mask and time index of a ranking sequence: prefix, history, then candidates.

A ranking sequence is laid out in one padded tensor of width N = P + W + C::

    [ prefix (P tokens, always real) | history (W slots, the first hist_lengths[b] real) | candidates (C slots) ]

History is left-aligned and right-padded, so padding can sit between a row's last history token and its first
candidate; everything below is defined on *logical* positions (the order of a row's real tokens), so a row's
result never depends on how much padding its batch has.

The mask is the target-aware (M-FALCON) form of Zhai et al., ICML 2024, §5, as in DLRM-v3's
``_get_valid_attn_mask`` with ``target_aware=True``: prefix and history tokens attend causally to the prefix and
earlier history; every candidate attends to the whole prefix, the whole history and itself, never to another
candidate. All candidates share one logical position, the slot right after the last history token, so each is
scored as if it alone followed the history.

These are pure functions of index tensors, used by ``genrec.models.hstu_ranker`` together with the layer math of
``genrec.ops.hstu_math``.
"""

from __future__ import annotations

import torch

from genrec.ops.hstu_math import rab_index, time_buckets


def token_valid(prefix_len: int, hist_lengths: torch.Tensor, hist_width: int, cand_mask: torch.Tensor) -> torch.Tensor:
    """Which slots hold a real token: hist_lengths [B] (real history tokens per row), cand_mask [B, C] ->
    valid [B, P + W + C] bool."""
    B = hist_lengths.shape[0]
    device = hist_lengths.device
    prefix = torch.ones(B, prefix_len, dtype=torch.bool, device=device)  # [B, P]
    history = torch.arange(hist_width, device=device).unsqueeze(0) < hist_lengths.unsqueeze(1)  # [B, W]
    return torch.cat([prefix, history, cand_mask.to(torch.bool)], dim=1)


def logical_positions(prefix_len: int, hist_lengths: torch.Tensor, hist_width: int, num_candidates: int) -> torch.Tensor:
    """Position of each slot in its row's sequence of real tokens -> [B, P + W + C] long.

    Prefix token f is at f, history slot k at P + k, and every candidate at P + hist_lengths[b] (the slot right
    after the row's last history token, shared by all candidates). Padding slots get a position too; the mask
    hides them."""
    B = hist_lengths.shape[0]
    device = hist_lengths.device
    prefix = torch.arange(prefix_len, device=device).expand(B, prefix_len)  # [B, P]
    history = (prefix_len + torch.arange(hist_width, device=device)).expand(B, hist_width)  # [B, W]
    candidates = (prefix_len + hist_lengths).unsqueeze(1).expand(B, num_candidates)  # [B, C]
    return torch.cat([prefix, history, candidates], dim=1).long()


def relative_offsets(positions: torch.Tensor) -> torch.Tensor:
    """positions [B, N] -> offsets i - j [B, N, N] (query i, key j), clamped at 0 (negative pairs are masked)."""
    return (positions.unsqueeze(2) - positions.unsqueeze(1)).clamp(min=0)


def target_aware_mask(valid: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """The attention mask of a layout whose last ``num_candidates`` slots are candidates.

    valid [B, N] bool -> mask [B, N, N] bool, True where query i may see key j: both real, and either j is not a
    candidate and comes no later than i (causal over prefix and history; candidates come last, so a candidate sees
    every real prefix and history token), or j is i itself."""
    N = valid.shape[1]
    idx = torch.arange(N, device=valid.device)
    causal = idx.view(1, N) <= idx.view(N, 1)  # [N, N] key j no later than query i
    is_candidate = idx >= N - num_candidates  # [N]
    allowed = causal & (~is_candidate.view(1, N) | torch.eye(N, dtype=torch.bool, device=valid.device))  # [N, N]
    return allowed.unsqueeze(0) & valid.unsqueeze(2) & valid.unsqueeze(1)


def rab_index_per_key(
    offsets: torch.Tensor, query_times: torch.Tensor, key_times: torch.Tensor, key_has_time: torch.Tensor,
    num_buckets: int,
) -> torch.Tensor:
    """``genrec.ops.hstu_math.rab_index`` with a per-key (rather than per-row) "has a timestamp" flag.

    offsets [B, Nq, Nk]; query_times [B, Nq]; key_times [B, Nk]; key_has_time [B, Nk] bool -> index [B, Nq, Nk].
    Keys without a timestamp (e.g. contextual prefix tokens) point at the bias table's last column, which carries
    no time weight (the convention of ``rab_index`` for rows without timestamps)."""
    buckets = time_buckets(query_times, key_times, num_buckets)  # [B, Nq, Nk]
    buckets = torch.where(key_has_time.unsqueeze(1), buckets, torch.full_like(buckets, num_buckets + 1))
    return rab_index(offsets, buckets, None, num_buckets)
