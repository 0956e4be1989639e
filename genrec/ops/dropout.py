"""Dropout with a counter-based random stream: one definition, computed by the native kernel or by PyTorch.

Same distribution as ``torch.nn.functional.dropout`` (each element kept with probability 1 - p and scaled by
1 / (1 - p)); a different random stream, defined as (like the Philox streams of GPU dropout)::

    seed       = torch.randint(2**63 - 1, (1,))          one draw from torch's default generator per call
    u(i)       = top 24 bits of splitmix64(seed + (i + 1) · 0x9E3779B97F4A7C15)     i = flat index in x
    keep(i)    = u(i) >= round(p · 2^24)
    out[i]     = x[i] · (keep(i) ? 1 / (1 - p) : 0)         in fp32 (bf16 / fp16 inputs: rounded back once)

The mask depends only on the seed and the element index, so the backward pass regenerates it from the seed instead
of storing it, and the result does not depend on the thread count. ``genrec_dropout`` in ``hstu_tiles.c`` computes it
vectorised across torch's threads (torch's CPU ``bernoulli_`` draws every element serially from one Mersenne
Twister, which makes it a visible share of a training step); ``_torch_dropout`` below computes the same bits with
int64 tensor operations wherever the kernel is not used (``GENREC_NATIVE=0``, no C compiler, ``native=False``,
other devices or dtypes). A run therefore draws the same masks, bit for bit, on a machine with a compiler and on one
without (tested), and ``torch.manual_seed`` / a checkpoint's saved RNG state reproduce it either way.
"""

from __future__ import annotations

import torch

from genrec.ops import native as native_lib

_SEED_HIGH = 2**63 - 1
_MASK64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """A 64-bit constant as the signed int64 with the same bits (torch has no general uint64 arithmetic)."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic: sign bits are masked off)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def keep_mask(seed: int, n: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """keep(i) for i = 0 .. n-1 as a bool tensor [n]: the PyTorch twin of the kernel's stream. int64 arithmetic wraps
    modulo 2^64 like the kernel's uint64; the steps run in place on two [n] buffers."""
    z = torch.arange(1, n + 1, dtype=torch.int64, device=device)  # the counter i + 1
    z.mul_(_GOLDEN).add_(_i64(seed & _MASK64))
    t = torch.empty_like(z)
    for shift, mix in ((30, _MIX1), (27, _MIX2), (31, None)):  # z ^= z >> shift (logical); z *= mix
        torch.bitwise_right_shift(z, shift, out=t)
        t.bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(t)
        if mix is not None:
            z.mul_(mix)
    return _shr(z, 40) >= _threshold(p)  # the top 24 bits


def _threshold(p: float) -> int:
    """round(p · 2^24) as the kernel computes it: in fp32, from p rounded to fp32."""
    return int((torch.tensor(p, dtype=torch.float32) * 16777216.0 + 0.5).item())


def _scale(p: float) -> torch.Tensor:
    """1 / (1 - p) in fp32, as the kernel computes it."""
    one = torch.tensor(1.0, dtype=torch.float32)
    return one / (one - torch.tensor(p, dtype=torch.float32))


def _torch_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The stream applied with PyTorch operations: the same bits as the kernel for fp32 and bf16."""
    x = x.contiguous()
    factor = (keep_mask(seed, x.numel(), p, x.device) * _scale(p).to(x.device)).view(x.shape)  # 1 / (1 - p) or 0
    if x.dtype == torch.float64:
        return x * factor.to(torch.float64)
    return (x.to(torch.float32) * factor).to(x.dtype)  # fp32 math, one rounding back for bf16 / fp16


def _native_dropout(lib, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.dropout(x, out, p, seed)
    return out


class _CounterDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int, lib) -> torch.Tensor:
        ctx.p, ctx.seed, ctx.lib = p, seed, lib
        return _native_dropout(lib, x, p, seed) if lib is not None else _torch_dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # d out / d x = the same mask · 1 / (1 - p): the mask is regenerated from the seed
        lib = ctx.lib if ctx.lib is not None and _kernel_takes(grad) else None
        g = _native_dropout(lib, grad, ctx.p, ctx.seed) if lib is not None else _torch_dropout(grad, ctx.p, ctx.seed)
        return g, None, None, None


def _kernel_takes(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in native_lib.DROPOUT_DTYPES


def dropout(x: torch.Tensor, p: float, training: bool, native: bool | None = None) -> torch.Tensor:
    """Counter-based dropout of x (any shape; see the module docstring). ``native``: None = the C kernel for CPU
    fp32 / bf16 tensors when it loads, False = the PyTorch twin (the same bits)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    if not x.is_floating_point():
        raise TypeError(f"dropout needs a floating-point tensor, got {x.dtype}")
    seed = int(torch.randint(_SEED_HIGH, (1,)).item())  # drawn the same way whichever path runs
    lib = native_lib.load() if native is not False and _kernel_takes(x) else None
    return _CounterDropout.apply(x, p, seed, lib)
