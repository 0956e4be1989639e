"""Jagged FuXi-α (genrec.ops.jagged) against the padded reference path of genrec.models.fuxi_alpha."""

import pytest
import torch

from genrec.models.fuxi_alpha import FuXiAlpha, FuXiAlphaConfig
from genrec.ops.hstu_math import channel_attention, time_buckets
from genrec.ops.jagged import (
    jagged_bias_channels,
    jagged_fuxi_context,
    jagged_fuxi_encode,
    jagged_fuxi_encode_batch,
    jagged_to_padded,
    lengths_to_offsets,
    padded_to_jagged,
)
from tests.ops import make_batch, max_diff, param_grads

CHANNELS = [{}, {"use_time_bias": False}, {"use_position_bias": False},
            {"use_time_bias": False, "use_position_bias": False}]  # fmt: skip
CHANNEL_IDS = ["all", "no-time", "no-position", "semantic-only"]


def make_fuxi(max_len=40, **kw) -> FuXiAlpha:
    torch.manual_seed(0)
    base = {"num_items": 20, "max_len": max_len, "embedding_dim": 8, "num_blocks": 2, "num_heads": 2,
            "attention_dim": 4, "linear_dim": 3, "ffn_dim": 6, "dropout": 0.0, "linear_dropout": 0.0}
    base.update(kw)
    model = FuXiAlpha(FuXiAlphaConfig(**base)).eval()
    with torch.no_grad():  # larger channel weights than the 0.02 init, so that a wrong weight shows up in the outputs
        for layer in model.layers:
            for name in ("pos_w", "ts_w"):
                if hasattr(layer, name):
                    getattr(layer, name).normal_(0, 0.5)
    return model


def assert_close_outputs_and_grads(model_a, out_a, model_b, out_b, tol=1e-5, unused=""):
    """Outputs within ``tol``; every parameter's gradient of a random weighting of the outputs within ``tol`` times
    the gradient's largest entry (at least 1): fp32 sums in another order differ by a few ulps of their size.
    Every gradient is nonzero, except those of parameters whose name ends with ``unused``."""
    assert out_b.shape == out_a.shape
    assert max_diff(out_a, out_b) <= tol
    w = torch.randn_like(out_a)
    g_a, g_b = param_grads(model_a, out_a, w), param_grads(model_b, out_b, w)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        scale = max(1.0, float(g_a[name].abs().max()))
        assert (float(g_a[name].abs().max()) > 0) != bool(unused and name.endswith(unused)), name
        assert max_diff(g_a[name], g_b[name]) <= tol * scale, name


def _per_sequence_channels(v, lengths, pos_w, ts_w, t, qt, has_time, num_buckets):
    """The positional and temporal channels one sequence at a time, as the padded path builds their weights (read
    with plain indexing, whose backward sums in the weights' dtype: ``bucket_lookup`` sums in fp32)."""
    outs, start = [], 0
    for s, n in enumerate(lengths):
        i = torch.arange(n)
        causal = (i.view(n, 1) >= i.view(1, n)).to(v.dtype)  # [n, n]
        vs = v[start : start + n].unsqueeze(0)  # [1, n, F]
        pos = channel_attention(pos_w[(i.view(n, 1) - i.view(1, n)).clamp(min=0)], vs, causal)
        if has_time[s]:
            index = time_buckets(qt[start : start + n].view(1, n), t[start : start + n].view(1, n), num_buckets)
            time = channel_attention(ts_w[index], vs, causal)
        else:
            time = torch.zeros_like(pos)
        outs.append(torch.stack([pos[0], time[0]]))
        start += n
    return torch.cat(outs, 1)  # [2, T, F]


@pytest.mark.parametrize("block", [4, 16])
def test_bias_channels_equal_per_sequence_reference(block):
    """Values and gradients (v and both weight tables) in fp64, with rows longer than a block, a row of length 1,
    rows with and without timestamps, and a last block that is partly padding."""
    lengths = [13, 1, 6, 20]
    model = make_fuxi(max_len=24).double()
    layer = model.layers[0]
    g = torch.Generator().manual_seed(1)
    T, width = sum(lengths), 5
    v = torch.randn(T, width, generator=g, dtype=torch.float64, requires_grad=True)
    times = torch.cumsum(torch.randint(0, 100_000, (T + 1,), generator=g), 0)
    t, qt = times[:-1], times[1:]
    has_time = torch.tensor([True, True, False, True])
    offsets = lengths_to_offsets(torch.tensor(lengths))
    ctx = jagged_fuxi_context(model, offsets, t, qt, has_time, block)
    jb = ctx.base.jb
    v_blocks = v.new_zeros(jb.num_slots, width).index_copy(0, jb.slot, v).view(jb.layout.num_blocks, block, width)
    outs = jagged_bias_channels(v_blocks, layer.pos_w, layer.ts_w, ctx)
    got = torch.stack([o.reshape(-1, width).index_select(0, jb.slot) for o in outs])  # [2, T, F]
    want = _per_sequence_channels(v, lengths, layer.pos_w, layer.ts_w, t, qt, has_time, model.config.num_time_buckets)
    assert max_diff(got, want) <= 1e-10
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    params = [v, layer.pos_w, layer.ts_w]
    for a, b in zip(torch.autograd.grad((want * w).sum(), params), torch.autograd.grad((got * w).sum(), params)):
        assert a.abs().max() > 0
        assert max_diff(a, b) <= 1e-10


@pytest.mark.parametrize("kw", [*CHANNELS, {"attention_norm": "length"}], ids=[*CHANNEL_IDS, "length-norm"])
@pytest.mark.parametrize("block", [8, None])
def test_jagged_encoder_equals_padded_encode(kw, block):
    model = make_fuxi(**kw)
    batch = make_batch(B=4, N=37, lengths=[37, 5, 20, 1], has_time=[True, False, True, True])
    assert_close_outputs_and_grads(model, model.encode(batch), model, jagged_fuxi_encode_batch(model, batch, block))


def test_jagged_encode_rows_without_any_timestamps():
    model = make_fuxi()
    batch = make_batch(B=2, N=9, lengths=[9, 4], has_time=[False, False])
    assert_close_outputs_and_grads(model, model.encode(batch), model, jagged_fuxi_encode_batch(model, batch, 4),
                                   unused="ts_w")  # no row has timestamps: the temporal weights take no part
    # and the values-only call (no timestamps at all) is the same thing
    offsets = lengths_to_offsets(batch.lengths)
    with torch.no_grad():
        out = jagged_fuxi_encode(model, padded_to_jagged(batch.item_ids, batch.lengths), offsets, block=4)
        assert max_diff(jagged_to_padded(out, offsets, 9), model.encode(batch)) <= 1e-5


@pytest.mark.parametrize("kw", CHANNELS, ids=CHANNEL_IDS)
def test_fuxi_with_jagged_impl_equals_padded_in_training_and_encode_last(kw):
    """``FuXiAlpha`` with attention_impl="jagged": training's ``encode`` (outputs and gradients) and
    ``encode_last`` on both sides of ``jagged_pays`` give the padded model's results."""
    model = make_fuxi(attention_impl="jagged", **kw)
    ref = make_fuxi(attention_impl="padded", **kw)
    ref.load_state_dict(model.state_dict())
    batch = make_batch(B=4, N=12, lengths=[12, 3, 1, 7], has_time=[True, False, True, True])
    assert_close_outputs_and_grads(ref, ref.encode(batch), model, model.encode(batch))
    for lengths in ([5, 5, 5], [9, 2, 3, 1], [4] * 20):  # padded; jagged for padding (3.4x); jagged for rows
        batch = make_batch(B=len(lengths), N=max(lengths), lengths=lengths, has_time=[True, False] * (len(lengths) // 2)
                           + [True] * (len(lengths) % 2))  # fmt: skip
        with torch.no_grad():
            assert max_diff(model.encode_last(batch), ref.encode_last(batch)) <= 1e-5


def test_jagged_encode_rejects_too_long_rows_and_trains_with_dropout():
    model = make_fuxi(max_len=8, dropout=0.5, linear_dropout=0.5).train()
    with pytest.raises(ValueError, match="max_len"):
        jagged_fuxi_encode(model, torch.ones(9, dtype=torch.long), torch.tensor([0, 9]))
    values, offsets = torch.arange(1, 12), torch.tensor([0, 8, 11])
    torch.manual_seed(3)
    out = jagged_fuxi_encode(model, values, offsets, block=4)
    out.sum().backward()
    assert out.shape == (11, 8) and model.layers[0].uvqk.grad is not None
    torch.manual_seed(3)
    assert torch.equal(jagged_fuxi_encode(model, values, offsets, block=4), out)  # same seed, same masks
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(jagged_fuxi_encode(model, values, offsets, block=4), out, atol=1e-3)  # dropout was on


def test_bf16_autocast_close_to_fp32():
    model = make_fuxi(max_len=64, embedding_dim=16, attention_dim=8, linear_dim=8)
    batch = make_batch(B=3, N=60, lengths=[60, 31, 7], has_time=[True, False, True])
    with torch.no_grad():
        ref = model.encode(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = jagged_fuxi_encode_batch(model, batch, block=16)
    assert torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out.float(), ref, dim=-1)[batch.item_ids > 0]
    assert cos.min() >= 0.98


def test_bias_channels_refuse_positional_weights_without_their_tile_index():
    """A context built for a model without the positional channel has no position index: positional weights passed
    with it are refused rather than skipped (which would shift every later channel)."""
    no_pos = make_fuxi(use_position_bias=False)
    ctx = jagged_fuxi_context(no_pos, lengths_to_offsets(torch.tensor([5, 3])), None, None, None, block=4)
    v = torch.zeros(ctx.base.jb.layout.num_blocks, 4, 6)
    with pytest.raises(ValueError, match="positional"):
        jagged_bias_channels(v, make_fuxi().layers[0].pos_w, None, ctx)
