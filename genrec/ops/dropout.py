"""Dropout for the jagged encoder's [T, d] activations with a counter-based random stream (the native kernel).

Same distribution as ``torch.nn.functional.dropout`` (each element kept with probability 1 - p and scaled by
1 / (1 - p)); a different random stream. torch's CPU ``bernoulli_`` draws every element serially from one Mersenne
Twister: the nine dropout calls of an HSTU-large ML-1M training step (0.7 M activations each) took ~50 ms of a
~560 ms step at 2 threads. The kernel (``genrec_dropout`` in ``hstu_tiles.c``) hashes (seed, element index) with
splitmix64 instead, like the Philox streams of GPU dropout: vectorised, split across torch's threads, and the
backward pass regenerates the mask from the seed rather than storing it.

The seed of each call is drawn from torch's default generator, so ``torch.manual_seed`` and a checkpoint's saved RNG
state reproduce a run exactly. Without the kernel (``GENREC_NATIVE=0``, no compiler, ``native=False``), or for
tensors it does not take (not CPU, not fp32 / bf16), this is ``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genrec.ops import native as native_lib

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_SEED_HIGH = 2**63 - 1


class _CounterDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int, lib) -> torch.Tensor:
        ctx.p, ctx.seed, ctx.lib = p, seed, lib
        return _apply(lib, x, p, seed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # d out / d x = the same mask · 1 / (1 - p): the mask is regenerated from the seed
        return _apply(ctx.lib, grad, ctx.p, ctx.seed), None, None, None


def _apply(lib, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.genrec_dropout(x.data_ptr(), out.data_ptr(), x.numel(), _DTYPES[x.dtype], p, seed)
    return out


def dropout(x: torch.Tensor, p: float, training: bool, native: bool | None = None) -> torch.Tensor:
    """``F.dropout(x, p, training)`` in distribution; ``native``: None = the kernel when it loads, False = never."""
    if not training or p == 0.0:
        return x
    lib = native_lib.load() if native is not False else None
    if lib is None or not 0.0 < p < 1.0 or x.device.type != "cpu" or x.dtype not in _DTYPES:
        return F.dropout(x, p, training=True)
    seed = int(torch.randint(_SEED_HIGH, (1,)).item())
    return _CounterDropout.apply(x, p, seed, lib)
