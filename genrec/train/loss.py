"""Sampled softmax over L2-normalised vectors (the HSTU reference's ``SampledSoftmaxLoss``).

For each real position with user vector u and positive item p, with K negatives n_1..n_K drawn uniformly from the
catalogue (with replacement, no logQ correction, since sampling is uniform):

    loss = -log( exp(u·p/τ) / (exp(u·p/τ) + Σ_k exp(u·n_k/τ)) )

averaged over real positions (or, with ``normalizer``, summed and divided by that constant). A negative that happens
to equal the positive gets logit -5e4 (as in the reference).

Draws are with replacement in every mode, so K may exceed the catalogue: with 5 items and K = 128 each item is drawn
about 25 times and counts in the denominator as often as it was drawn. The loss stays defined and its gradient
still pushes every drawn item down (the same estimator as for a large catalogue, only with many repeats).

Three ways to draw the negatives (``mode``):

- ``"per_position"``: K fresh negatives for every position, as the reference does on GPU. Gathering B·N·K embedding
  rows per step (~3M on ML-1M) would dominate a CPU step. On CPU the M·(K+1) logits are instead computed as a
  sampled dense-dense product over the sparse pattern of the drawn ids, and their gradients as two sparse-dense
  products (``sampled_logits``): O(M·K·d) work with the item table read from cache, no [M, K, d] tensor, no [M,
  catalogue] tensor. Elsewhere, while M × catalogue stays under ``full_logits_budget``, they are scored by one
  [M, d] x [d, catalogue] product and a gather; beyond it by gathering the rows. All three give the same values.
- ``"per_sequence"``: K negatives per sequence, shared by that sequence's positions. B·K rows per step, scored with
  one batched matrix product; every step still touches B·K (16K on ML-1M) distinct draws.
- ``"shared"``: K negatives per batch, shared by every position: one [M, d] x [d, K] product, the cheapest, but a
  step only ever pushes K items down.

In-batch negatives with logQ correction (``in_batch_negatives = K_b > 0``; mixed negative sampling, Yang et al.,
WWW 2020, with the sampling-bias correction of Yi et al., RecSys 2019). Besides its K uniform negatives, every real
position gets the same K_b extra negatives: the targets of K_b real positions of the batch drawn uniformly with
replacement, i.e. items drawn by their popularity within the batch, scored by one [M, d] x [d, K_b] product. Popular
items are now over-represented among the candidates, which would push them down too much; so every candidate
logit, the positive's included, is corrected by the log of that item's expected number of occurrences in the
candidate set of a position:

    e_i = K / N + K_b · q_i,   q_i = (real positions of the batch whose target is i) / M

(N catalogue items, M real positions; K / N for the uniform draws in every mode), and

    loss = -log( exp(s_p) / (exp(s_p) + Σ_k exp(s_{n_k}) + Σ_j exp(s_{b_j})) ),   s_i = u·i/τ - log e_i

over the uniform negatives n_k and in-batch negatives b_j. q comes from the batch itself (no dataset statistics).
Writing e_i instead of the mixture's probability e_i / (K + K_b) shifts every logit by the same constant, which the
softmax ignores. A negative equal to the position's own positive is masked (-5e4) in both sets. With K_b = 0 all
e_i are equal and no correction is applied: the loss is exactly the uniform one above. Cost: one [M, d] x [d, K_b]
product forward and two backward, and a softmax over 1 + K + K_b instead of 1 + K columns per position.

``"full"`` is not sampled: every catalogue item is a negative (``num_negatives`` is ignored), i.e. cross-entropy over
the whole catalogue, computed 256 positions at a time (``catalogue_cross_entropy``: no [M, catalogue] tensor). It is
not the reference's loss; the strong SASRec baselines of 2023 (SASRec+, gSASRec) train this way or with thousands of
negatives. It scores every position against every item, so a step costs about catalogue / K times the sampled
losses' scoring work.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the operations used here are tested below
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class _SampledLogits(torch.autograd.Function):
    """logits[m, c] = u[m] · table[ids[m, c]], without materialising table[ids] ([M, C, d]) or u·tableᵀ ([M, R]).

    The ids of row m are row m of a sparse [M, R] pattern with C entries per row (repeats allowed). Forward is a
    sampled dense-dense product on that pattern (``torch.sparse.sampled_addmm``); backward is two sparse-dense
    products: grad_u = G · table and grad_table = Gᵀ · u, with G the pattern carrying the incoming gradients and Gᵀ
    built by sorting the ids (16-bit keys when the table has < 32K rows).
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        M, C = ids.shape
        R = table.shape[0]
        crow = torch.arange(0, M * C + 1, C, device=ids.device)
        pattern = _csr(crow, ids.reshape(-1), torch.zeros(M * C, dtype=u.dtype, device=u.device), (M, R))
        out = torch.sparse.sampled_addmm(pattern, u, table.T, beta=0.0).values().view(M, C)
        ctx.save_for_backward(u, table, ids, crow)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, table, ids, crow = ctx.saved_tensors
        M, C = ids.shape
        R = table.shape[0]
        flat_ids, flat_grad = ids.reshape(-1), grad.contiguous().reshape(-1).to(u.dtype)
        grad_u = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_u = _csr(crow, flat_ids, flat_grad, (M, R)) @ table  # [M, d]
        if ctx.needs_input_grad[1]:
            key = flat_ids.to(torch.int16 if R <= 2**15 - 1 else torch.int32 if R < 2**31 else torch.int64)
            order = torch.sort(key).indices  # entries grouped by table row
            crow_t = torch.zeros(R + 1, dtype=torch.long, device=ids.device)
            torch.cumsum(torch.bincount(flat_ids, minlength=R), 0, out=crow_t[1:])
            grad_table = _csr(crow_t, order // C, flat_grad[order], (R, M)) @ u  # [R, d]
        return grad_u, grad_table, None


def sampled_logits(u: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """u [M, d], table [R, d], ids [M, C] long in 0..R-1 -> [M, C] with out[m, c] = u[m] · table[ids[m, c]] (CPU).

    With at least as many ids per row as table rows (C >= R: more negatives than the catalogue has items), the whole
    [M, R] product costs no more than the sampled one, so it is computed and gathered; the sparse pattern is only
    used for C < R (a sparse [M, R] matrix cannot hold more than R entries in a row)."""
    if ids.shape[1] >= table.shape[0]:
        return (u @ table.T).gather(1, ids)  # [M, R] -> [M, C]
    return _SampledLogits.apply(u, table, ids)


class _CatalogueCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits u · tableᵀ / τ against ``targets``, ``chunk`` positions at a time.

    The [M, R] logits are never held whole: forward keeps only each position's log-sum-exp, and backward recomputes
    one chunk of logits at a time to form softmax - onehot. One more [chunk, d] x [d, R] product than autograd's
    path, but no [M, R] tensors (200 MB each for an ML-1M batch, page-faulted in at every allocation): a chunk's
    logits (256 x 3,706 on ML-1M, 3.8 MB) stay in cache, which usually more than pays for the extra product.
    Computed in the inputs' dtype (the training loop passes fp32).
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int):
        us = u / temperature  # [M, d]: the temperature folded into the small operand
        lse = torch.empty(u.shape[0], dtype=u.dtype, device=u.device)  # [M]
        for a in range(0, u.shape[0], chunk):
            lse[a : a + chunk] = torch.logsumexp(us[a : a + chunk] @ table.T, dim=1)
        pos = (us * table[targets]).sum(-1)  # [M]
        ctx.save_for_backward(us, table, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return (lse - pos).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        us, table, targets, lse = ctx.saved_tensors
        scale = float(grad) / ctx.temperature
        grad_u = torch.empty_like(us)
        grad_table = torch.zeros_like(table)
        for a in range(0, us.shape[0], ctx.chunk):
            uc = us[a : a + ctx.chunk]
            p = torch.addmm(lse[a : a + ctx.chunk, None], uc, table.T, beta=-1).exp_()  # softmax [c, R]
            p[torch.arange(len(uc), device=us.device), targets[a : a + ctx.chunk]] -= 1.0
            torch.mm(p, table, out=grad_u[a : a + ctx.chunk]).mul_(scale)
            grad_table.addmm_(p.T, uc, alpha=scale * ctx.temperature)  # uc = u / τ
        return grad_u, grad_table, None, None, None


def catalogue_cross_entropy(
    u: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int = 256
) -> torch.Tensor:
    """u [M, d], table [R, d], targets [M] long in 0..R-1 -> Σ_m -log softmax(u[m] · tableᵀ / τ)[targets[m]]."""
    return _CatalogueCrossEntropy.apply(u, table, targets, temperature, chunk)


@dataclass(frozen=True)
class GlobalBatchShard:
    """Where one process's rows sit in the global batch of a data-parallel step (``genrec.train.distributed``).

    Every random draw of the loss is then made for the whole global batch, identically on every process, and this
    process keeps its slice: the negatives of its rows or positions, the in-batch negatives of the global batch. The
    per-example randomness, and the state of the generator afterwards, are therefore the same whatever the number
    of processes, and N processes compute the same loss terms as one process given the whole batch.

    rows: ``[row_offset, row_offset + B)`` of ``global_rows`` rows are this process's ``[B, N]`` batch.
    positions: this batch's real positions are ``[position_offset, position_offset + M)`` of the global batch's
    ``global_targets.numel()`` real positions, in row-major order; ``global_targets`` [M_global] long are their
    targets (the in-batch negatives and their logQ shares come from them).
    """

    row_offset: int
    global_rows: int
    position_offset: int
    global_targets: torch.Tensor

    @property
    def global_positions(self) -> int:
        return int(self.global_targets.numel())


def _draw(high: int, shape: tuple[int, ...], generator, device, shard_offset: int | None, global_size: int | None):
    """randint(1, high + 1) of ``shape``; with a shard, drawn for ``global_size`` leading rows and sliced."""
    if shard_offset is None:
        return torch.randint(1, high + 1, shape, generator=generator, device=device)
    full = torch.randint(1, high + 1, (global_size, *shape[1:]), generator=generator, device=device)
    return full[shard_offset : shard_offset + shape[0]]


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
    per_position_path: str = "auto",
    in_batch_negatives: int = 0,
    shard: GlobalBatchShard | None = None,
) -> torch.Tensor:
    """user [B, N, d] (normalised), targets [B, N] long (0 = padding), item_vectors(ids) -> normalised [..., d].

    ``normalizer=None`` averages over the batch's real positions. A constant ``normalizer`` (the training loop passes
    batch_size × the mean number of positions per row) gives every position the same weight whatever the batch it
    lands in, which matters when batches are grouped by length: a per-batch mean would weight a position of a
    short-sequence batch several times more than one of a long-sequence batch.

    ``per_position_path`` picks how per-position logits are computed (same values): "sparse" (``sampled_logits``,
    CPU), "full" (catalogue product + gather), "gather" (embedding rows); "auto" = sparse on CPU, else full while
    M × catalogue <= ``full_logits_budget``, else gather.

    ``in_batch_negatives = K_b > 0`` adds K_b negatives drawn from the batch's real targets, shared by all positions,
    and the logQ correction of every logit (module docstring); they are drawn after the uniform negatives, from the
    same ``generator``. Not with ``mode="full"``.

    ``shard``: this batch is a slice of a data-parallel global batch (``GlobalBatchShard``); the draws are made for
    the global batch and sliced, so the loss terms do not depend on how the global batch is split.
    """
    if in_batch_negatives < 0:
        raise ValueError(f"in_batch_negatives must be >= 0, got {in_batch_negatives}")
    valid = targets > 0  # [B, N]
    u = user[valid]  # [M, d]
    pos_ids = targets[valid]  # [M]
    if mode == "full":
        if in_batch_negatives:
            raise ValueError('in_batch_negatives must be 0 with mode="full" (every item is already a negative)')
        # Every catalogue item is a negative: a softmax over items 1..num_items (row 0 is padding), no draws.
        total = catalogue_cross_entropy(u, item_vectors()[1:], pos_ids - 1, temperature)
        return total / (normalizer if normalizer is not None else max(len(u), 1))
    pos = item_vectors(pos_ids)  # [M, d]
    pos_logit = (u * pos).sum(-1, keepdim=True)  # [M, 1]
    if mode == "shared":
        neg_ids = torch.randint(1, num_items + 1, (num_negatives,), generator=generator, device=user.device)  # [K]
        neg_logit = u @ item_vectors(neg_ids).T  # [M, K]
        hit = pos_ids.unsqueeze(1) == neg_ids.unsqueeze(0)
    elif mode == "per_sequence":
        B = user.shape[0]
        neg_ids = _draw(num_items, (B, num_negatives), generator, user.device,  # [B, K]
                        None if shard is None else shard.row_offset, None if shard is None else shard.global_rows)
        neg_logit_all = torch.bmm(user, item_vectors(neg_ids).transpose(1, 2))  # [B, N, K]
        neg_logit = neg_logit_all[valid]  # [M, K]
        hit = pos_ids.unsqueeze(1) == neg_ids.unsqueeze(1).expand(-1, targets.shape[1], -1)[valid]
    elif mode == "per_position":
        neg_ids = _draw(num_items, (u.shape[0], num_negatives), generator, user.device,  # [M, K]
                        None if shard is None else shard.position_offset,
                        None if shard is None else shard.global_positions)
        path = per_position_path
        if path == "auto":
            fits = u.shape[0] * (num_items + 1) <= full_logits_budget
            path = "sparse" if u.device.type == "cpu" else "full" if fits else "gather"
        if path == "sparse":
            neg_logit = sampled_logits(u, item_vectors(), neg_ids)  # [M, K]
        elif path == "full":
            # Same draws: score every position against the whole catalogue with one matrix product and pick each
            # position's K logits, instead of gathering M·K embedding rows.
            all_logit = u @ item_vectors().T  # [M, num_items + 1]
            neg_logit = all_logit.gather(1, neg_ids)  # [M, K]
        elif path == "gather":
            neg_logit = torch.einsum("md,mkd->mk", u, item_vectors(neg_ids))  # [M, K]
        else:
            raise ValueError(f"per_position_path must be 'auto', 'sparse', 'full' or 'gather', got {path!r}")
        hit = pos_ids.unsqueeze(1) == neg_ids
    else:
        raise ValueError(f"negatives must be 'shared', 'per_sequence', 'per_position' or 'full', got {mode!r}")
    batch_targets = pos_ids if shard is None else shard.global_targets.to(pos_ids.device)  # [M_global]
    if in_batch_negatives and len(batch_targets) > 0:
        logits = _mixed_logits(u, pos_ids, pos_logit, neg_logit, neg_ids, hit, item_vectors, num_items,
                               num_negatives, temperature, in_batch_negatives, generator, valid, mode,
                               batch_targets)  # fmt: skip
    else:
        logits = torch.cat([pos_logit, neg_logit], dim=1) / temperature
        logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(hit, -5e4)], dim=1)
    zeros = torch.zeros(len(u), dtype=torch.long, device=user.device)
    if normalizer is None:
        return F.cross_entropy(logits, zeros)
    return F.cross_entropy(logits, zeros, reduction="sum") / normalizer


def _mixed_logits(
    u: torch.Tensor,
    pos_ids: torch.Tensor,
    pos_logit: torch.Tensor,
    neg_logit: torch.Tensor,
    neg_ids: torch.Tensor,
    hit: torch.Tensor,
    item_vectors,
    num_items: int,
    num_negatives: int,
    temperature: float,
    in_batch: int,
    generator: torch.Generator | None,
    valid: torch.Tensor,
    mode: str,
    batch_targets: torch.Tensor,
) -> torch.Tensor:
    """[M, 1 + K + K_b] logQ-corrected, masked logits: the positive, the K uniform and the K_b in-batch negatives.

    u [M, d], pos_ids [M], pos_logit [M, 1], neg_logit [M, K]; neg_ids [K] ("shared"), [B, K] ("per_sequence") or
    [M, K] ("per_position"); hit [M, K]: the uniform negatives equal to the position's positive; valid [B, N];
    batch_targets [M_batch]: the real targets of the whole (global) batch, ``pos_ids`` itself unless data-parallel.
    """
    M_batch = len(batch_targets)
    # K_b targets of real positions, uniformly over positions (so by popularity in the batch), shared by all rows.
    draw = torch.randint(0, M_batch, (in_batch,), generator=generator, device=u.device)  # [K_b]
    batch_ids = batch_targets[draw]  # [K_b]
    # log of each item's expected count among a position's candidates: K/N uniform + K_b · (its share of the targets)
    share = torch.bincount(batch_targets, minlength=num_items + 1).to(u.dtype) / M_batch  # [num_items + 1]
    log_e = torch.log(num_negatives / num_items + in_batch * share)  # [num_items + 1]
    neg_corr = log_e[neg_ids]  # [K] | [B, K] | [M, K]
    if mode == "per_sequence":  # a sequence's draws for each of its real positions
        neg_corr = neg_corr.unsqueeze(1).expand(-1, valid.shape[1], -1)[valid]  # [M, K]
    # Each block is scaled, corrected and masked as it is made (in place where autograd allows), then joined once:
    # no slicing of the joined [M, 1 + K + K_b] logits, whose backward would allocate and copy full-size gradients.
    pos = pos_logit / temperature - log_e[pos_ids].unsqueeze(1)  # [M, 1]
    neg = (neg_logit / temperature).sub_(neg_corr).masked_fill_(hit, -5e4)  # [M, K]
    batch = torch.addmm(-log_e[batch_ids].unsqueeze(0), u / temperature, item_vectors(batch_ids).T)  # [M, K_b]
    batch = batch.masked_fill_(pos_ids.unsqueeze(1) == batch_ids.unsqueeze(0), -5e4)
    return torch.cat([pos, neg, batch], dim=1)  # [M, 1 + K + K_b]
