"""genrec.ops.dropout: the native counter-based dropout has F.dropout's distribution, a backward that reuses the
forward's mask, and runs reproduce under torch.manual_seed at any thread count; without the kernel it is F.dropout."""

import pytest
import torch
import torch.nn.functional as F

from genrec.ops import native as native_mod
from genrec.ops.dropout import dropout


@pytest.fixture
def lib():
    if native_mod.load() is None:
        pytest.skip("the native kernel could not be built here (no C compiler?): see the genrec.native log")
    return native_mod.load()


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_rate_and_scale(lib, p, dtype):
    torch.manual_seed(0)
    x = (torch.rand(1000, 500) + 0.5).to(dtype)  # no zeros: a zero output means dropped
    y = dropout(x, p, training=True)
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


def test_masks_of_consecutive_calls_are_independent(lib):
    torch.manual_seed(1)
    x = torch.ones(200_000)
    a, b = dropout(x, 0.5, True) != 0, dropout(x, 0.5, True) != 0
    both = (a & b).float().mean().item()  # 0.25 for independent masks
    assert abs(both - 0.25) < 0.01


def test_backward_uses_the_forward_mask(lib):
    torch.manual_seed(2)
    x = (torch.rand(300, 50) + 0.5).requires_grad_()
    w = torch.randn(300, 50)
    y = dropout(x, 0.3, True)
    (y * w).sum().backward()
    mask = (y != 0).float()
    assert torch.allclose(x.grad, w * mask / 0.7, rtol=1e-6, atol=0)


def test_reproducible_under_manual_seed_and_thread_count(lib):
    x = torch.randn(256, 1024)  # above the kernel's parallel threshold
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(7)
            outs.append(dropout(x, 0.2, True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(8)
    assert not torch.equal(outs[0], dropout(x, 0.2, True))


def test_eval_and_edge_rates_and_fallback():
    x = torch.randn(64, 8)
    assert dropout(x, 0.2, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
    torch.manual_seed(3)
    expected = F.dropout(x, 0.2, training=True)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.2, training=True, native=False), expected)  # native=False: exactly F.dropout
    with native_mod.disabled():
        torch.manual_seed(3)
        assert torch.equal(dropout(x, 0.2, training=True), expected)
    x64 = torch.randn(10, dtype=torch.float64)
    torch.manual_seed(3)
    expected64 = F.dropout(x64, 0.2, training=True)
    torch.manual_seed(3)
    assert torch.equal(dropout(x64, 0.2, training=True), expected64)  # dtypes the kernel does not take
