"""genrec.ops.dropout: the counter-based dropout has F.dropout's distribution, a backward that reuses the forward's
mask, runs reproduce under torch.manual_seed at any thread count, and the same seed gives the same masks with the
native kernel and with its PyTorch twin (a machine without a C compiler trains the same model)."""

import contextlib

import pytest
import torch

from genrec.ops import native as native_mod
from genrec.ops.dropout import dropout


@pytest.fixture
def lib():
    if native_mod.load() is None:
        pytest.skip("native kernels unavailable (GENREC_NATIVE=0 or no C compiler): see the genrec.native log")
    return native_mod.load()


@pytest.fixture(params=["pytorch", "native"])
def native(request):
    """``dropout``'s ``native`` argument for each implementation of the stream (the kernel's only where it builds)."""
    if request.param == "native" and native_mod.load() is None:
        pytest.skip("native kernels unavailable (GENREC_NATIVE=0 or no C compiler): see the genrec.native log")
    return None if request.param == "native" else False


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_rate_and_scale(native, p, dtype):
    torch.manual_seed(0)
    x = (torch.rand(1000, 500) + 0.5).to(dtype)  # no zeros: a zero output means dropped
    y = dropout(x, p, training=True, native=native)
    kept = y != 0
    n = kept.numel()
    sd = ((1 - p) * p / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd
    expected = (x.float() * (1.0 / (1.0 - p))).to(dtype)
    assert torch.equal(y[kept], expected[kept])
    # no structure by row or column: every row's and column's keep rate is within 6 sd of 1 - p
    for dim, m in ((1, 500), (0, 1000)):
        rates = kept.float().mean(dim=dim)
        assert (rates - (1 - p)).abs().max().item() < 6 * ((1 - p) * p / m) ** 0.5


def test_masks_of_consecutive_calls_are_independent(native):
    torch.manual_seed(1)
    x = torch.ones(200_000)
    a, b = dropout(x, 0.5, True, native) != 0, dropout(x, 0.5, True, native) != 0
    both = (a & b).float().mean().item()  # 0.25 for independent masks
    assert abs(both - 0.25) < 0.01


def test_backward_uses_the_forward_mask(native):
    torch.manual_seed(2)
    x = (torch.rand(300, 50) + 0.5).requires_grad_()
    w = torch.randn(300, 50)
    y = dropout(x, 0.3, True, native)
    (y * w).sum().backward()
    mask = (y != 0).float()
    assert torch.allclose(x.grad, w * mask / 0.7, rtol=1e-6, atol=0)


def test_reproducible_under_manual_seed_and_thread_count(native):
    x = torch.randn(256, 1024)  # above the kernel's parallel threshold
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(7)
            outs.append(dropout(x, 0.2, True, native))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(8)
    assert not torch.equal(outs[0], dropout(x, 0.2, True, native))


def test_eval_and_edge_rates():
    x = torch.randn(64, 8)
    assert dropout(x, 0.2, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
    with pytest.raises(ValueError, match="probability"):
        dropout(x, 1.5, training=True)


def _splitmix_keep(seed: int, n: int, p: float) -> list[bool]:
    """The mask's definition in plain Python integers: element i is kept iff the top 24 bits of splitmix64 of
    counter i + 1 (seeded with ``seed``) are at least round(p · 2^24)."""
    m = (1 << 64) - 1
    threshold = int(p * (1 << 24) + 0.5)
    keep = []
    for i in range(n):
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        z ^= z >> 31
        keep.append((z >> 40) >= threshold)
    return keep


@pytest.mark.parametrize("native", [None, False])
def test_mask_follows_its_definition(native):
    """With or without the kernel, the mask is the counter-based stream of the seed drawn from torch's generator."""
    x = torch.rand(1000) + 0.5
    torch.manual_seed(5)
    seed = int(torch.randint(2**63 - 1, (1,)).item())  # what ``dropout`` draws first
    torch.manual_seed(5)
    y = dropout(x, 0.3, training=True, native=native)
    assert (y != 0).tolist() == _splitmix_keep(seed, 1000, 0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_same_seed_same_result_with_or_without_the_kernel(lib, dtype):
    """Bitwise: a machine without a C compiler draws the same masks (forward and backward) as one with it."""
    x = (torch.randn(37, 1031) * 3).to(dtype)[:, 5:]  # not contiguous, odd sizes
    outs, grads = [], []
    for ctx in (native_mod.disabled, contextlib.nullcontext, native_mod.disabled):
        with ctx():
            xi = x.clone().requires_grad_()
            torch.manual_seed(11)
            y = dropout(xi, 0.25, training=True)
            y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).to(dtype))
        outs.append(y.detach())
        grads.append(xi.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert torch.equal(grads[0], grads[1])


def test_jagged_training_step_does_not_depend_on_the_kernel(lib):
    """A training-mode forward+backward of the jagged encoder (dropout on the inputs and after every layer) gives
    the same outputs and gradients for one seed with the native kernels and with them disabled."""
    from tests.ops import make_batch, make_model, max_diff, param_grads

    model = make_model(max_len=40, dropout=0.3, linear_dropout=0.3, attention_impl="jagged").train()
    batch = make_batch(B=4, N=33, lengths=[33, 2, 17, 5], has_time=[True, False, True, True])
    w = torch.randn(4, 33, 8)
    results = []
    for ctx in (contextlib.nullcontext, native_mod.disabled):
        with ctx():
            torch.manual_seed(3)
            out = model.encode(batch)
            results.append((out, param_grads(model, out, w)))
    (out_a, g_a), (out_b, g_b) = results
    assert max_diff(out_a, out_b) <= 1e-5
    for name in g_a:
        assert max_diff(g_a[name], g_b[name]) <= 1e-5, name
