"""Jagged HSTU (genrec.ops.jagged) against the padded plain path: layout, attention, whole encoder."""

import pytest
import torch

from genrec.models.hstu import HSTURelativeBias, HSTUConfig
from genrec.ops.jagged import (
    jagged_blocks,
    jagged_encode,
    jagged_encode_batch,
    jagged_hstu_attention,
    jagged_hstu_attention_reference,
    jagged_to_padded,
    lengths_to_offsets,
    padded_to_jagged,
)
from tests.ops import assert_same_outputs_and_grads, make_batch, make_model, max_diff


def test_padded_jagged_round_trip():
    lengths = torch.tensor([3, 1, 4])
    x = torch.arange(3 * 5 * 2, dtype=torch.float32).view(3, 5, 2)
    values = padded_to_jagged(x, lengths)
    assert values.shape == (8, 2)
    assert torch.equal(values[3], x[1, 0])
    back = jagged_to_padded(values, lengths_to_offsets(lengths), 5)
    valid = (torch.arange(5).view(1, 5) < lengths.view(3, 1)).unsqueeze(-1)
    assert torch.equal(back, x * valid)


def test_attention_work_scales_with_sum_of_squares():
    # block 16: lengths 100, 3, 3, 3 -> 7·8/2 + 3 tiles; a padded batch would pay 4 rows of 100² pairs
    jb = jagged_blocks(lengths_to_offsets(torch.tensor([100, 3, 3, 3])), 16, heads=1)
    assert jb.layout.num_tiles == 28 + 3
    assert jb.layout.num_blocks == 7 + 3


def _jagged_inputs(lengths, h=2, dqk=5, dv=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k = (torch.randn(T, h, dqk, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(T, h, dv, generator=g).requires_grad_()
    times = torch.cumsum(torch.randint(0, 100_000, (T + 1,), generator=g), 0)
    torch.manual_seed(seed)
    bias = HSTURelativeBias(HSTUConfig(num_items=1, max_len=max(lengths)))
    with torch.no_grad():
        bias.pos_w.normal_(0, 0.5)
        bias.ts_w.normal_(0, 0.5)
    return q, k, v, bias, times[:-1], times[1:]


@pytest.mark.parametrize("block", [4, 16])
def test_jagged_attention_equals_per_sequence_plain(block):
    lengths = [13, 1, 6, 20]
    q, k, v, bias, t, qt = _jagged_inputs(lengths)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    has_time = torch.tensor([True, True, False, True])
    norm = torch.tensor(lengths, dtype=torch.float32)  # per-sequence normaliser
    args = (offsets, bias.pos_w, bias.ts_w, t, qt, has_time, 128, norm)
    ref = jagged_hstu_attention_reference(q, k, v, *args)
    out = jagged_hstu_attention(q, k, v, *args, block=block)
    assert max_diff(out, ref) <= 1e-5
    w = torch.randn_like(ref)
    params = [q, k, v, bias.pos_w, bias.ts_w]
    for a, b in zip(torch.autograd.grad((ref * w).sum(), params), torch.autograd.grad((out * w).sum(), params)):
        assert max_diff(a, b) <= 1e-5


CONFIGS = [{}, {"attention_norm": "length"}, {"use_time_bias": False}, {"use_position_bias": False}]


@pytest.mark.parametrize("kw", CONFIGS)
def test_jagged_encoder_equals_padded_encode(kw):
    model = make_model(max_len=40, **kw)
    batch = make_batch(B=4, N=37, lengths=[37, 5, 20, 1], has_time=[True, False, True, True])
    assert_same_outputs_and_grads(model, model.encode(batch), model, jagged_encode_batch(model, batch, block=8))


def test_jagged_encode_rows_without_any_timestamps():
    model = make_model()
    batch = make_batch(B=2, N=9, lengths=[9, 4], has_time=[False, False])
    assert max_diff(jagged_encode_batch(model, batch, block=4), model.encode(batch)) <= 1e-5
    # and the values-only call (no timestamps at all) is the same thing
    offsets = lengths_to_offsets(batch.lengths)
    out = jagged_encode(model, padded_to_jagged(batch.item_ids, batch.lengths), offsets, block=4)
    assert max_diff(jagged_to_padded(out, offsets, 9), model.encode(batch)) <= 1e-5


def test_jagged_encode_rejects_too_long_rows_and_trains_with_dropout():
    model = make_model(max_len=8, dropout=0.5, linear_dropout=0.5).train()
    with pytest.raises(ValueError):
        jagged_encode(model, torch.ones(9, dtype=torch.long), torch.tensor([0, 9]))
    out = jagged_encode(model, torch.arange(1, 12), torch.tensor([0, 8, 11]), block=4)
    out.sum().backward()
    assert out.shape == (11, 8) and model.layers[0].uvqk.grad is not None


def test_bf16_autocast_close_to_fp32():
    model = make_model(max_len=64, embedding_dim=16, attention_dim=8, linear_dim=8)
    batch = make_batch(B=3, N=60, lengths=[60, 31, 7], has_time=[True, False, True])
    ref = model.encode(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = jagged_encode_batch(model, batch, block=16)
    assert torch.isfinite(out).all()
    assert max_diff(out.float(), ref) <= 0.05  # unit vectors; bf16 has 8 mantissa bits
    cos = torch.nn.functional.cosine_similarity(out.float(), ref, dim=-1)[batch.item_ids > 0]
    assert cos.min() >= 0.99


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("block", [4, 16])
def test_split_uvqk_equals_slicing_and_to_blocks_split(block, silu):
    """Values and gradients of the single-write split against autograd through the slices (the reference),
    including a part whose gradient is None (unused) and a sequence whose last block is partly padding; with
    ``silu``, against F.silu followed by the slices."""
    from genrec.ops.jagged import jagged_blocks, split_uvqk, to_blocks_split

    torch.manual_seed(0)
    h, dv, dqk = 2, 3, 5
    offsets = lengths_to_offsets(torch.tensor([7, 1, 12]))
    jb = jagged_blocks(offsets, block, h, dqk)
    x = torch.randn(20, 2 * h * (dv + dqk), dtype=torch.float64)
    weights = [torch.randn(20, h * dv, dtype=torch.float64)]
    for d in (dv, dqk, dqk):
        weights.append(torch.randn(jb.layout.num_blocks, h, block, d, dtype=torch.float64))
    for used in ((0, 1, 2, 3), (0, 2, 3), (1, 2)):  # which outputs reach the loss
        grads = []
        for fn in ("reference", "split"):
            xx = x.clone().requires_grad_()
            if fn == "reference":
                act = torch.nn.functional.silu(xx) if silu else xx
                outs = [act[:, : h * dv], *to_blocks_split(act[:, h * dv :], jb, [(h, dv), (h, dqk), (h, dqk)])]
            else:
                outs = list(split_uvqk(xx, jb, h, dv, dqk, silu=silu))
            loss = sum((outs[i] * weights[i]).sum() for i in used)
            (g,) = torch.autograd.grad(loss, [xx])
            grads.append((outs, g))
        (ref_out, ref_g), (out, g) = grads
        for a, b in zip(ref_out, out):
            assert torch.equal(a, b)
        assert torch.allclose(g, ref_g, rtol=0, atol=1e-12)


def test_jagged_pays_for_training_many_rows_or_much_padding():
    from genrec.ops.jagged import jagged_pays

    full = torch.full((4,), 200)
    assert not jagged_pays(torch.tensor([200]), 200, grad=True)  # one row: nothing to skip
    assert jagged_pays(full, 200, grad=True)  # training: always
    assert not jagged_pays(full, 200, grad=False)  # a few equal rows at inference: the padded path
    assert jagged_pays(torch.full((8,), 200), 200, grad=False)  # many rows
    assert not jagged_pays(torch.tensor([200, 20, 30, 200]), 200, grad=False)  # 2x padding: not enough
    mixed = torch.tensor([200, 20, 30, 10])
    assert jagged_pays(mixed, 200, grad=False)  # much padding (3.9x)
    assert not jagged_pays(mixed[:2], 200, grad=False)  # but not for two rows


def test_hstu_with_jagged_impl_gives_the_same_outputs_on_both_sides_of_the_rule():
    """Inference through ``HSTU.encode_last`` with attention_impl="jagged" picks a path per batch; every path
    gives the padded path's outputs."""
    torch.manual_seed(0)
    model = make_model(attention_impl="jagged").eval()
    ref = make_model(attention_impl="padded").eval()
    ref.load_state_dict(model.state_dict())
    for lengths in ([5, 5, 5], [9, 2, 3, 1], [4] * 20):  # padded; jagged for padding (3.4x); jagged for rows
        batch = make_batch(B=len(lengths), N=max(lengths), lengths=lengths)
        with torch.no_grad():
            assert max_diff(model.encode_last(batch), ref.encode_last(batch)) <= 1e-5
