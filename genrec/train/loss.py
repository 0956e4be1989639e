"""Sampled softmax over L2-normalised vectors (the HSTU reference's ``SampledSoftmaxLoss``).

For each real position with user vector u and positive item p, with K negatives n_1..n_K drawn uniformly from the
catalogue (with replacement, no logQ correction, since sampling is uniform):

    loss = -log( exp(u·p/τ) / (exp(u·p/τ) + Σ_k exp(u·n_k/τ)) )

averaged over real positions (or, with ``normalizer``, summed and divided by that constant). A negative that happens
to equal the positive gets logit -5e4 (as in the reference).

Three ways to draw the negatives (``mode``):

- ``"per_position"``: K fresh negatives for every position, as the reference does on GPU. Gathering B·N·K embedding
  rows per step (~3M on ML-1M) dominates a CPU step, so while M × catalogue stays under ``full_logits_budget`` the
  same draws are scored by one [M, d] x [d, catalogue] product and a gather (identical values, several times faster).
- ``"per_sequence"``: K negatives per sequence, shared by that sequence's positions. B·K rows per step, scored with
  one batched matrix product; every step still touches B·K (16K on ML-1M) distinct draws.
- ``"shared"``: K negatives per batch, shared by every position: one [M, d] x [d, K] product, the cheapest, but a
  step only ever pushes K items down.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sampled_softmax_loss(
    user: torch.Tensor,
    targets: torch.Tensor,
    item_vectors,
    num_items: int,
    num_negatives: int,
    temperature: float,
    mode: str,
    generator: torch.Generator | None = None,
    normalizer: float | None = None,
    full_logits_budget: int = 2**27,
) -> torch.Tensor:
    """user [B, N, d] (normalised), targets [B, N] long (0 = padding), item_vectors(ids) -> normalised [..., d].

    ``normalizer=None`` averages over the batch's real positions. A constant ``normalizer`` (the training loop passes
    batch_size × the mean number of positions per row) gives every position the same weight whatever the batch it
    lands in, which matters when batches are grouped by length: a per-batch mean would weight a position of a
    short-sequence batch several times more than one of a long-sequence batch.
    """
    valid = targets > 0  # [B, N]
    u = user[valid]  # [M, d]
    pos_ids = targets[valid]  # [M]
    pos = item_vectors(pos_ids)  # [M, d]
    pos_logit = (u * pos).sum(-1, keepdim=True)  # [M, 1]
    if mode == "shared":
        neg_ids = torch.randint(1, num_items + 1, (num_negatives,), generator=generator, device=user.device)  # [K]
        neg_logit = u @ item_vectors(neg_ids).T  # [M, K]
        hit = pos_ids.unsqueeze(1) == neg_ids.unsqueeze(0)
    elif mode == "per_sequence":
        B = user.shape[0]
        neg_ids = torch.randint(1, num_items + 1, (B, num_negatives), generator=generator, device=user.device)  # [B, K]
        neg_logit_all = torch.bmm(user, item_vectors(neg_ids).transpose(1, 2))  # [B, N, K]
        neg_logit = neg_logit_all[valid]  # [M, K]
        hit = pos_ids.unsqueeze(1) == neg_ids.unsqueeze(1).expand(-1, targets.shape[1], -1)[valid]
    elif mode == "per_position":
        neg_ids = torch.randint(1, num_items + 1, (u.shape[0], num_negatives), generator=generator, device=user.device)
        if u.shape[0] * (num_items + 1) <= full_logits_budget:
            # Same draws, cheaper on CPU: score every position against the whole catalogue with one matrix product
            # and pick each position's K logits, instead of gathering M·K embedding rows.
            all_logit = u @ item_vectors().T  # [M, num_items + 1]
            neg_logit = all_logit.gather(1, neg_ids)  # [M, K]
        else:
            neg_logit = torch.einsum("md,mkd->mk", u, item_vectors(neg_ids))  # [M, K]
        hit = pos_ids.unsqueeze(1) == neg_ids
    else:
        raise ValueError(f"negatives must be 'shared', 'per_sequence' or 'per_position', got {mode!r}")
    logits = torch.cat([pos_logit, neg_logit], dim=1) / temperature
    logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(hit, -5e4)], dim=1)
    zeros = torch.zeros(len(u), dtype=torch.long, device=user.device)
    if normalizer is None:
        return F.cross_entropy(logits, zeros)
    return F.cross_entropy(logits, zeros, reduction="sum") / normalizer
