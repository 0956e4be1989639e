"""FuXi-α encoder: the block's math against a per-pair loop, causality, padding, channels, training, reload, export."""

import json
import math

import httpx
import pytest
import torch
import torch.nn.functional as F

from genrec.api import Recommender
from genrec.config import load_config
from genrec.data.batches import Batch
from genrec.export import check_parity, export_recommender, load_exported
from genrec.models import build_model
from genrec.models.fuxi_alpha import FuXiAlpha, FuXiAlphaConfig
from genrec.serve.app import create_app
from genrec.train.loop import train

from ..conftest import synthetic_interactions
from ..serve.conftest import running


def _batch(B=3, N=7, num_items=20, seed=0, lengths=None, has_time=None):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths or [N] * B)
    ids = torch.randint(1, num_items + 1, (B, N), generator=g)
    ids = ids * (torch.arange(N).unsqueeze(0) < lengths.unsqueeze(1))
    ts = torch.cumsum(torch.randint(0, 100_000, (B, N + 1), generator=g), dim=1)
    has_time = torch.ones(B, dtype=torch.bool) if has_time is None else torch.tensor(has_time)
    return Batch(ids, ts[:, :-1].clone(), ts[:, 1:].clone(), lengths, has_time)  # not views of one tensor


def _model(**kw) -> FuXiAlpha:
    torch.manual_seed(0)
    cfg = {"num_items": 20, "max_len": 10, "embedding_dim": 8, "num_blocks": 2, "num_heads": 2, "attention_dim": 4,
           "linear_dim": 3, "ffn_dim": 6, "dropout": 0.0, "linear_dropout": 0.0}
    return FuXiAlpha(FuXiAlphaConfig(**{**cfg, **kw})).eval()


def _naive_encode(model: FuXiAlpha, batch: Batch) -> torch.Tensor:
    """FuXi-α written as explicit per-(i, j) loops from the reference code's equations, one row at a time."""
    cfg = model.config
    B, N = batch.item_ids.shape
    d, h, dqk, dv = cfg.embedding_dim, cfg.num_heads, cfg.attention_dim, cfg.linear_dim
    out = torch.zeros(B, N, d)
    for b in range(B):
        n = int(batch.lengths[b])
        x = model.item_emb.weight[batch.item_ids[b, :n]] * math.sqrt(d) + model.pos_emb.weight[:n]
        for layer in model.layers:
            c = len(layer.channels)
            xn = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
            uvqk = F.silu(xn @ layer.uvqk)
            u, v, q, k = torch.split(uvqk, [c * h * dv, h * dv, h * dqk, h * dqk], dim=-1)
            a = torch.zeros(n, h, c, dv)  # per head: positional | temporal | semantic (those switched on)
            for head in range(h):
                qh, kh = q[:, head * dqk : (head + 1) * dqk], k[:, head * dqk : (head + 1) * dqk]
                vh = v[:, head * dv : (head + 1) * dv]
                for i in range(n):
                    for j in range(i + 1):
                        weights = []
                        if cfg.use_position_bias:
                            weights.append(layer.pos_w[i - j])
                        if cfg.use_time_bias:
                            w = torch.zeros(())
                            if batch.has_time[b]:
                                gap = abs(int(batch.query_times[b, i]) - int(batch.timestamps[b, j]))
                                bucket = min(max(math.floor(math.log(max(gap, 1)) / 0.301), 0), cfg.num_time_buckets)
                                w = layer.ts_w[bucket]
                            weights.append(w)
                        weights.append(F.silu(qh[i] @ kh[j]) / cfg.max_len)
                        for ch, w in enumerate(weights):
                            a[i, head, ch] += w * vh[j]
            a = a.reshape(n, h * c * dv)
            ams = u * (a / torch.sqrt((a * a).mean(-1, keepdim=True) + 1e-6))
            x = x + layer.out(ams)
            z = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
            x = x + layer.w2(F.silu(layer.w1(z)) * layer.w3(z))
        out[b, :n] = F.normalize(x, dim=-1, eps=1e-6)
    return out


CHANNELS = [{}, {"use_time_bias": False}, {"use_position_bias": False},
            {"use_time_bias": False, "use_position_bias": False}]  # fmt: skip


@pytest.mark.parametrize("kw", CHANNELS, ids=["all", "no-time", "no-position", "semantic-only"])
def test_block_equals_naive_per_pair_loop(kw):
    model = _model(**kw)
    batch = _batch(lengths=[7, 4, 1], has_time=[True, False, True])
    with torch.no_grad():
        got, want = model.encode(batch), _naive_encode(model, batch)
    assert got.shape == (3, 7, 8)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.all(got[1, 4:] == 0) and torch.all(got[2, 1:] == 0)  # padding rows are zero
    assert torch.allclose(got[0].norm(dim=-1), torch.ones(7), atol=1e-5)


def test_gradients_equal_naive_per_pair_loop():
    batch = _batch(lengths=[5, 3], B=2, N=5, has_time=[True, False])
    grads = []
    for fn in (lambda m: m.encode(batch), lambda m: _naive_encode(m, batch)):
        model = _model()
        (fn(model) * torch.linspace(-1, 1, 8)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_shapes_of_encode_encode_last_and_item_vectors():
    model = _model()
    batch = _batch(B=4, N=6, lengths=[6, 2, 5, 1])
    assert model.encode(batch).shape == (4, 6, 8)
    assert model.encode_last(batch).shape == (4, 8)
    assert model.item_vectors().shape == (21, 8)
    assert model.item_vectors(torch.tensor([[1, 2], [3, 4]])).shape == (2, 2, 8)
    assert torch.allclose(model.item_vectors()[1:].norm(dim=-1), torch.ones(20), atol=1e-5)
    with pytest.raises(ValueError, match="max_len"):
        model.encode(_batch(N=11))


def test_causal_later_items_do_not_change_earlier_outputs():
    model = _model()
    batch = _batch(B=2, N=8, lengths=[8, 8])
    changed = _batch(B=2, N=8, lengths=[8, 8])
    changed.item_ids[:, 5:] = (changed.item_ids[:, 5:] % 20) + 1  # different later items
    changed.timestamps[:, 6:] += 10**6  # and later timestamps
    changed.query_times[:, 5:] += 10**6  # query_times[i] is the time of item i + 1
    with torch.no_grad():
        a, b = model.encode(batch), model.encode(changed)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)


def test_row_output_does_not_depend_on_other_rows_or_padding():
    model = _model()
    alone = _batch(B=1, N=4, lengths=[4], seed=3)
    wide = _batch(B=3, N=9, lengths=[4, 9, 2], seed=4)
    wide.item_ids[0, :4], wide.timestamps[0, :4], wide.query_times[0, :4] = (
        alone.item_ids[0], alone.timestamps[0], alone.query_times[0])
    wide.item_ids[0, 4:] = 0
    wide.timestamps[0, 4:] = 123  # garbage in the padding must not matter
    with torch.no_grad():
        a, b = model.encode(alone), model.encode(wide)
        la, lb = model.encode_last(alone), model.encode_last(wide)
    assert torch.allclose(a[0], b[0, :4], atol=1e-6)
    assert torch.allclose(la[0], lb[0], atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"attention_norm": "length"}, {"use_time_bias": False}, {"num_blocks": 1},
                                {"num_blocks": 0}])
def test_encode_last_equals_last_position_of_encode(kw):
    model = _model(**kw)
    batch = _batch(B=4, N=9, lengths=[9, 3, 1, 6], has_time=[True, False, True, True])
    with torch.no_grad():
        full = model.encode(batch)[torch.arange(4), batch.lengths - 1]
        assert torch.allclose(model.encode_last(batch), full, atol=1e-6)


def test_temporal_channel_reacts_to_timestamps_and_ignores_untimed_rows():
    model = _model()
    batch = _batch(B=2, N=6, has_time=[True, False])
    later = _batch(B=2, N=6, has_time=[True, False])
    later.timestamps[:, 2:] += 10**7  # a long gap before item 2 of both rows
    later.query_times[:, 1:] += 10**7
    with torch.no_grad():
        a, b = model.encode(batch), model.encode(later)
    assert not torch.allclose(a[0, 1:], b[0, 1:], atol=1e-3)  # timed row: the gaps change its outputs
    assert torch.equal(a[1], b[1])  # untimed row: timestamps are ignored
    # an untimed row equals the same row with its temporal weights zeroed
    with torch.no_grad():
        for layer in model.layers:
            layer.ts_w.zero_()
        zeroed = model.encode(_batch(B=2, N=6, has_time=[True, True]))
    assert torch.allclose(a[1], zeroed[1], atol=1e-6)
    # a batch where no row is timed gives every row the output it has in a mixed batch
    with torch.no_grad():
        model = _model()
        none = _batch(B=2, N=6, has_time=[False, False])
        assert torch.allclose(model.encode(none)[1], a[1], atol=1e-6)


def test_switching_channels_off_removes_their_parameters_and_their_effect():
    full, no_time, no_pos = _model(), _model(use_time_bias=False), _model(use_position_bias=False)
    for model, channels, c in ((full, ("position", "time", "semantic"), 3), (no_time, ("position", "semantic"), 2),
                               (no_pos, ("time", "semantic"), 2)):  # fmt: skip
        layer = model.layers[0]
        assert layer.channels == channels
        assert layer.out.in_features == c * 2 * 3 and layer.uvqk.shape[1] == c * 2 * 3 + 2 * 3 + 2 * 2 * 4
    assert not hasattr(no_time.layers[0], "ts_w") and not hasattr(no_pos.layers[0], "pos_w")
    # without the temporal channel, timestamps change nothing
    batch, later = _batch(B=2, N=6), _batch(B=2, N=6)
    later.timestamps[:, 2:] += 10**7
    later.query_times[:, 1:] += 10**7
    with torch.no_grad():
        assert torch.equal(no_time.encode(batch), no_time.encode(later))


def test_reference_init_scales():
    model = _model(embedding_dim=50, attention_dim=50, linear_dim=50, num_heads=1, ffn_dim=50, num_items=3000,
                   max_len=200)  # fmt: skip
    layer = model.layers[0]
    assert layer.uvqk.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.w1.bias is None and layer.w2.bias is None and layer.w3.bias is None and layer.out.bias is not None
    bound = math.sqrt(6 / (150 + 50))  # xavier-uniform of W_0 [50, 3 · 50]
    assert layer.out.weight.abs().max().item() <= bound and layer.out.weight.abs().max().item() > 0.9 * bound
    assert model.item_emb.weight[1:].std().item() == pytest.approx(0.02, rel=0.05)
    assert model.pos_emb.weight.std().item() == pytest.approx(math.sqrt(2 / 250), rel=0.05)


def test_build_model_wires_the_config_including_the_jagged_path():
    cfg = load_config(None, ["model.name=fuxi-alpha", "model.ffn_dim=7", "model.use_time_bias=false"])
    model = build_model(cfg.model, num_items=30, max_len=12)
    assert isinstance(model, FuXiAlpha) and model.layers[0].w1.out_features == 7
    assert model.layers[0].channels == ("position", "semantic") and model.config.max_len == 12
    assert model.config.attention_impl == "padded"
    jagged = load_config(None, ["model.name=fuxi-alpha", "model.attention_impl=jagged"])
    assert build_model(jagged.model, num_items=30, max_len=12).config.attention_impl == "jagged"
    with pytest.raises(ValueError, match="attention_impl"):
        FuXiAlpha(FuXiAlphaConfig(num_items=3, attention_impl="ragged"))


def test_training_run_learns_reloads_recommends_and_exports(tmp_path):
    path = tmp_path / "inter.csv"
    synthetic_interactions().to_csv(path, index=False)
    config = load_config(None, [
        "data.dataset=table", f"data.path={path}", "data.columns={user: user, item: item, timestamp: timestamp}",
        "data.max_len=12", "model.name=fuxi-alpha", "model.embedding_dim=8", "model.num_blocks=2",
        "model.num_heads=2", "model.attention_dim=4", "model.linear_dim=4", "model.ffn_dim=8", "train.batch_size=8",
        "train.epochs=6", "train.lr=0.01", "train.num_negatives=16", "train.eval_batch_size=16",
        "train.num_threads=1", f"output_dir={tmp_path / 'run'}",
        "model.attention_impl=jagged",  # what the shipped configs use; the export falls back to the padded path
    ])  # fmt: skip
    res = train(config, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    assert res["test"]["metrics"]["HR@10"] > 10 / 30  # above chance on the "next = previous + 1" pattern
    assert "temporal channel on for every user" in res["data"]["notes"]  # the run says it used the timestamps

    rec = Recommender.load(tmp_path / "run")
    assert isinstance(rec.model_, FuXiAlpha) and rec.model_.config.attention_impl == "jagged"
    items, scores = rec.recommend(["i3", "i4", "i5"], k=5)
    assert len(items) == 5 and scores == sorted(scores, reverse=True)
    assert "i3" not in items and "i5" not in items  # seen items excluded

    exported = load_exported(export_recommender(rec, tmp_path / "exported"))
    assert exported.manifest["model"] == "fuxi-alpha"
    assert check_parity(rec, exported) <= 1e-5

    with running(create_app(rec)) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/recommend", json={"history": ["i3", "i4", "i5"], "k": 5})
    assert r.status_code == 200, r.text
    assert [e["item"] for e in r.json()["items"]] == items
