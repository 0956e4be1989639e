import math

import pytest
import torch
import torch.nn.functional as F

from genrec.data.batches import Batch
from genrec.models.hstu import HSTU, HSTUConfig, bucket_lookup, time_buckets


def _batch(B=3, N=7, num_items=20, seed=0, lengths=None, has_time=None):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths or [N] * B)
    ids = torch.randint(1, num_items + 1, (B, N), generator=g)
    ids = ids * (torch.arange(N).unsqueeze(0) < lengths.unsqueeze(1))
    ts = torch.cumsum(torch.randint(0, 100_000, (B, N + 1), generator=g), dim=1)
    has_time = torch.ones(B, dtype=torch.bool) if has_time is None else torch.tensor(has_time)
    return Batch(ids, ts[:, :-1], ts[:, 1:], lengths, has_time)


def _model(**kw):
    torch.manual_seed(0)
    cfg = HSTUConfig(num_items=20, max_len=10, embedding_dim=8, num_blocks=2, num_heads=2, attention_dim=4, linear_dim=3,
                     dropout=0.0, linear_dropout=0.0, **kw)
    return HSTU(cfg).eval()


def _naive_encode(model: HSTU, batch: Batch) -> torch.Tensor:
    """HSTU written as explicit per-(i, j) loops from the paper's equations, for one batch."""
    cfg = model.config
    B, N = batch.item_ids.shape
    out = torch.zeros(B, N, cfg.embedding_dim)
    for b in range(B):
        n = int(batch.lengths[b])
        x = model.item_emb.weight[batch.item_ids[b, :n]] * math.sqrt(cfg.embedding_dim) + model.pos_emb.weight[:n]
        for layer in model.layers:
            xn = F.layer_norm(x, (cfg.embedding_dim,), eps=1e-6)
            uvqk = F.silu(xn @ layer.uvqk)
            h, dqk, dv = cfg.num_heads, cfg.attention_dim, cfg.linear_dim
            u, v, q, k = torch.split(uvqk, [h * dv, h * dv, h * dqk, h * dqk], dim=-1)
            av = torch.zeros(n, h * dv)
            for head in range(h):
                qh, kh, vh = (t[:, head * s : (head + 1) * s] for t, s in ((q, dqk), (k, dqk), (v, dv)))
                for i in range(n):
                    for j in range(i + 1):
                        rab = layer.rab.pos_w[i - j]
                        if batch.has_time[b]:
                            gap = abs(int(batch.query_times[b, i]) - int(batch.timestamps[b, j]))
                            bucket = min(max(math.floor(math.log(max(gap, 1)) / 0.301), 0), cfg.num_time_buckets)
                            rab = rab + layer.rab.ts_w[bucket]
                        a = F.silu(qh[i] @ kh[j] + rab) / cfg.max_len
                        av[i, head * dv : (head + 1) * dv] += a * vh[j]
            x = x + layer.out(u * F.layer_norm(av, (h * dv,), eps=1e-6))
        out[b, :n] = F.normalize(x, dim=-1, eps=1e-6)
    return out


def test_attention_equals_naive_per_pair_loop():
    model = _model()
    batch = _batch(lengths=[7, 4, 1], has_time=[True, False, True])
    with torch.no_grad():
        fast = model.encode(batch)
        slow = _naive_encode(model, batch)
    assert torch.allclose(fast, slow, atol=1e-5), (fast - slow).abs().max()


def test_causal_later_items_do_not_change_earlier_outputs():
    model = _model()
    batch = _batch(B=2, N=8)
    changed = Batch(batch.item_ids.clone(), batch.timestamps.clone(), batch.query_times.clone(), batch.lengths, batch.has_time)
    changed.item_ids[:, 5:] = (changed.item_ids[:, 5:] % 20) + 1
    changed.timestamps[:, 5:] += 12345
    changed.query_times[:, 5:] += 12345
    with torch.no_grad():
        a, b = model.encode(batch), model.encode(changed)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)


def test_row_output_does_not_depend_on_batch_padding():
    model = _model()
    batch = _batch(B=1, N=5)
    wide = Batch(F.pad(batch.item_ids, (0, 4)), F.pad(batch.timestamps, (0, 4)), F.pad(batch.query_times, (0, 4)),
                 batch.lengths, batch.has_time)
    with torch.no_grad():
        assert torch.allclose(model.encode(batch), model.encode(wide)[:, :5], atol=1e-6)


def test_time_term_off_without_timestamps():
    model = _model()
    batch = _batch(B=1, N=6, has_time=[False])
    shifted = Batch(batch.item_ids, batch.timestamps * 3, batch.query_times * 5, batch.lengths, batch.has_time)
    with torch.no_grad():
        assert torch.allclose(model.encode(batch), model.encode(shifted))
    timed = Batch(batch.item_ids, batch.timestamps, batch.query_times, batch.lengths, torch.tensor([True]))
    with torch.no_grad():
        assert not torch.allclose(model.encode(batch), model.encode(timed))


def test_bucket_lookup_matches_autograd_gather():
    w = torch.randn(9, requires_grad=True)
    w2 = w.detach().clone().requires_grad_(True)
    idx = torch.randint(0, 9, (4, 5, 5))
    g = torch.randn(4, 5, 5)
    (bucket_lookup(w, idx) * g).sum().backward()
    (w2[idx] * g).sum().backward()
    assert torch.allclose(w.grad, w2.grad, atol=1e-6)


def test_time_buckets_formula():
    q = torch.tensor([[0, 10, 1000]])
    t = torch.tensor([[0, 0, 0]])
    b = time_buckets(q, t, 128)
    assert b[0, 0, 0] == 0  # gap 0 -> clamp to 1 -> log 0
    assert b[0, 1, 0] == math.floor(math.log(10) / 0.301)
    assert b[0, 2, 0] == math.floor(math.log(1000) / 0.301)


def test_gradients_equal_naive_per_pair_loop():
    model = _model()
    batch = _batch(B=2, N=5, lengths=[5, 3], has_time=[True, False])
    fast = model.encode(batch)
    w = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * w).sum(), list(model.parameters()), allow_unused=True)
    slow = _naive_encode(model, batch)
    grads_slow = torch.autograd.grad((slow * w).sum(), list(model.parameters()), allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), grads_fast, grads_slow):
        if a is None or b is None:
            assert a is None or torch.count_nonzero(a) == 0 or b is not None, name
            continue
        assert torch.allclose(a, b, atol=1e-5), name


@pytest.mark.parametrize("use_time_bias", [True, False])
def test_jagged_attention_impl_equals_padded_reference(use_time_bias):
    """model.attention_impl="jagged" (the fast path used in training) gives the padded path's outputs and gradients."""
    from tests.ops import assert_same_outputs_and_grads, make_batch, make_model

    ref = make_model(max_len=40, use_time_bias=use_time_bias)
    fast = make_model(max_len=40, use_time_bias=use_time_bias, attention_impl="jagged")
    fast.load_state_dict(ref.state_dict())
    batch = make_batch(B=4, N=33, lengths=[33, 2, 17, 1], has_time=[True, False, True, True])
    assert_same_outputs_and_grads(ref, ref.encode(batch), fast, fast.encode(batch))


def test_unknown_attention_impl_is_rejected():
    from tests.ops import make_model

    with pytest.raises(ValueError, match="attention_impl"):
        make_model(attention_impl="flash")


@pytest.mark.parametrize("kw", [{}, {"attention_impl": "jagged"}, {"attention_norm": "length"}, {"use_time_bias": False},
                                {"use_position_bias": False}, {"num_blocks": 1}])
def test_encode_last_equals_last_position_of_encode(kw):
    from tests.ops import make_batch, make_model, max_diff

    model = make_model(max_len=40, **kw)
    batch = make_batch(B=5, N=31, lengths=[31, 1, 17, 9, 2], has_time=[True, False, True, True, False])
    full = model.encode(batch)[torch.arange(5), batch.lengths - 1]
    assert max_diff(model.encode_last(batch), full) <= 1e-5
    one = make_batch(B=1, N=12, lengths=[12])  # one row: the plain path whatever attention_impl says
    assert max_diff(model.encode_last(one), model.encode(one)[:, -1]) <= 1e-5


def test_reference_init_matches_the_research_code_scales():
    torch.manual_seed(0)
    cfg = HSTUConfig(num_items=500, max_len=200, embedding_dim=50, num_blocks=2)
    model = HSTU(cfg)
    # the reference's reset_params: xavier-normal position table, std sqrt(2 / (rows + d))
    assert model.pos_emb.weight.std().item() == pytest.approx(math.sqrt(2 / 250), rel=0.05)
    # W_o keeps nn.Linear's default bias, U(±1/sqrt(h·dv)): not zero
    bias = model.layers[0].out.bias
    assert bias.abs().max().item() > 0.05 and bias.abs().max().item() <= 1 / math.sqrt(50)
    with pytest.raises(TypeError, match="init"):  # one initialisation only: no option to select another
        HSTUConfig(num_items=5, init="reference")
