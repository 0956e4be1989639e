"""Tests of genrec.ops, and the small deterministic HSTU models and batches they share (as in tests/models)."""

from __future__ import annotations

import torch

from genrec.data.batches import Batch
from genrec.models.hstu import HSTU, HSTUConfig


def make_batch(B=3, N=7, num_items=20, seed=0, lengths=None, has_time=None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths or [N] * B)
    ids = torch.randint(1, num_items + 1, (B, N), generator=g)
    ids = ids * (torch.arange(N).unsqueeze(0) < lengths.unsqueeze(1))
    ts = torch.cumsum(torch.randint(0, 100_000, (B, N + 1), generator=g), dim=1)
    has_time = torch.ones(B, dtype=torch.bool) if has_time is None else torch.tensor(has_time)
    return Batch(ids, ts[:, :-1], ts[:, 1:], lengths, has_time)


def make_model(max_len=40, **kw) -> HSTU:
    torch.manual_seed(0)
    base = dict(num_items=20, max_len=max_len, embedding_dim=8, num_blocks=2, num_heads=2, attention_dim=4,
                linear_dim=3, dropout=0.0, linear_dropout=0.0)
    base.update(kw)
    model = HSTU(HSTUConfig(**base)).eval()
    with torch.no_grad():  # larger bias weights than the 0.02 init, so that a wrong bias shows up in the outputs
        for layer in model.layers:
            layer.rab.pos_w.normal_(0, 0.5)
            layer.rab.ts_w.normal_(0, 0.5)
    return model


def param_grads(model, out: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad((out * weight).sum(), list(model.parameters()), allow_unused=True)
    return {name: (torch.zeros_like(p) if g is None else g) for (name, p), g in zip(model.named_parameters(), grads)}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def assert_same_outputs_and_grads(model_a, out_a: torch.Tensor, model_b, out_b: torch.Tensor, tol: float = 1e-5) -> None:
    """out_b equals out_a, and so do the parameter gradients of a random weighting of them (same parameter names)."""
    assert out_b.shape == out_a.shape
    assert max_diff(out_b, out_a) <= tol
    w = torch.randn_like(out_a)
    g_a, g_b = param_grads(model_a, out_a, w), param_grads(model_b, out_b, w)
    for name in g_a:
        assert max_diff(g_a[name], g_b[name]) <= tol, name
