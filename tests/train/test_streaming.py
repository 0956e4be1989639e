import dataclasses

import numpy as np
import pytest
import torch

from genrec.data.delayed import (
    WindowRouting,
    pretrain_plan,
    segment_boundaries,
    segment_of,
    training_plan,
)
from genrec.data.ranking_batch import RankingSchema
from genrec.data.synthetic import SyntheticStreamConfig, generate_conversion_stream
from genrec.eval.ranking_metrics import (
    _resampled_ap,  # the two forms of the resampled average precision
    auc,
    calibration,
    log_loss,
)
from genrec.models.dlrm import DLRMRanker, DLRMRankerConfig
from genrec.models.ranking_floors import multitask_loss_terms
from genrec.train.streaming import (
    StreamConfig,
    StreamData,
    StreamHistory,
    StreamTensors,
    average_precision,
    make_batch,
    predict,
    pretrain,
    resampled_stream_metrics,
    run_stream,
    stream_metrics,
    true_labels,
)

H, DAY = 3600, 86400
WINDOWS = (1 * H, 24 * H, 72 * H)
ROUTING = WindowRouting.uniform(WINDOWS)
TASKS = ("convert@1h", "convert@24h", "convert@72h")


def make_stream(n=20_000, seed=0):
    s = generate_conversion_stream(SyntheticStreamConfig(num_events=n, days=8.0, num_users=200, items_alive=40,
                                                         seed=seed))  # fmt: skip
    schema = RankingSchema(num_items=s.num_items, num_users=s.num_users, tasks=TASKS, actions=("click",),
                           user_features=("context",), user_feature_sizes=(s.num_contexts,))  # fmt: skip
    data = StreamData(users=s.users, items=s.items, features=s.contexts[:, None], click=s.click_time,
                      convert=s.convert_time, schema=schema)  # fmt: skip
    return data, segment_boundaries(4 * DAY, 8 * DAY, 2 * H)


def factory(schema):
    return DLRMRanker(schema, DLRMRankerConfig(embedding_dim=8, bottom_mlp=(8,), top_mlp=(16,),
                                               task_base_rates=(0.02, 0.03, 0.04)))  # fmt: skip


CFG = StreamConfig(batch_size=256, lr=3e-3, pretrain_epochs=1, head_weights=ROUTING.probs, seed=0)


@pytest.fixture(scope="module")
def setup():
    data, b = make_stream()
    pre = pretrain_plan(data.click, data.convert, int(b[0]), WINDOWS)
    base = pretrain(factory, data, pre, CFG)
    return data, b, base


def plan(method, data, b):
    return training_plan(method, data.click, data.convert, b, ROUTING, data.users, data.items)


# ------------------------------------------------------------------------------------------------ metrics
def test_streaming_reexports_the_evaluation_average_precision():
    from genrec.eval import ranking_metrics

    assert average_precision is ranking_metrics.average_precision


def test_resampled_metrics_equal_the_metrics_of_the_resampled_data():
    rng = np.random.default_rng(1)
    n = 2_000
    users = rng.integers(0, 40, n)
    y = (rng.random(n) < 0.1).astype(float)
    p = np.clip(0.1 + 0.3 * y * rng.random(n) + 0.05 * rng.standard_normal(n), 0.01, 0.99)
    counts = rng.integers(0, 3, (4, 40))
    got = resampled_stream_metrics(p, y, users, counts)
    for r in range(4):
        rep = np.repeat(np.arange(n), counts[r][users])
        assert got["auc"][r] == pytest.approx(auc(p[rep], y[rep]))
        assert got["log_loss"][r] == pytest.approx(log_loss(p[rep], y[rep]))
        assert got["calibration"][r] == pytest.approx(calibration(p[rep], y[rep]))
        assert got["pr_auc"][r] == pytest.approx(average_precision(p[rep], y[rep]))
    # the matrix form of the resampled average precision equals the per-example form (ties included)
    q = np.round(p, 2)
    np.testing.assert_allclose(_resampled_ap(q, y, users, counts, 2),
                               _resampled_ap(q, y, users, counts, 2, matrix_limit=0), rtol=1e-9)  # fmt: skip
    point = stream_metrics(p, y)
    assert point["auc"] == pytest.approx(auc(p, y)) and point["calibration"] == pytest.approx(calibration(p, y))


# ------------------------------------------------------------------------------------------------ the loop
def test_a_segment_is_predicted_before_anything_of_it_or_after_it_is_trained(setup):
    """Flipping every label trained after boundary k0 leaves the predictions of segments 0..k0-1 unchanged (and
    changes later ones): segment k is predicted from training at boundaries <= k only."""
    data, b, base = setup
    p = plan("vanilla", data, b)
    k0 = 10
    late = p.train_at > k0
    flipped = dataclasses.replace(p, labels=np.where(late[:, None], 1.0 - p.labels, p.labels) * p.weights)
    a = run_stream(base, data, b, p, CFG)
    f = run_stream(base, data, b, flipped, CFG)
    seg = segment_of(data.click[a.eval_index], b)
    np.testing.assert_array_equal(a.probs[seg <= k0], f.probs[seg <= k0])
    assert not np.allclose(a.probs[seg > k0 + 1], f.probs[seg > k0 + 1])
    assert a.trained == int((p.train_at >= 0).sum() - (p.train_at == b.size - 1).sum())


def test_runs_are_seeded_and_leave_the_pretrained_model_alone(setup):
    data, b, base = setup
    before = [x.clone() for x in base[0].parameters()]
    zero = run_stream(base, data, b, None, CFG)  # Pretrain: no training
    a = run_stream(base, data, b, plan("window_heads", data, b), CFG, head_weights=ROUTING.probs)
    again = run_stream(base, data, b, plan("window_heads", data, b), CFG, head_weights=ROUTING.probs)
    np.testing.assert_array_equal(a.probs, again.probs)
    for x, y in zip(before, base[0].parameters()):
        assert torch.equal(x, y)
    t = StreamTensors(data, torch.device("cpu"))
    np.testing.assert_allclose(zero.probs, predict(base[0], t, zero.eval_index))
    assert not np.allclose(zero.probs, a.probs)
    pre = pretrain_plan(data.click, data.convert, int(b[0]), WINDOWS)
    other = pretrain(factory, data, pre, dataclasses.replace(CFG, seed=1))
    assert not np.allclose(run_stream(other, data, b, None, CFG).probs, zero.probs)


def test_a_routed_example_trains_its_own_head_only(setup):
    data, b, _ = setup
    p = plan("window_heads", data, b)
    model = factory(data.schema)
    t = StreamTensors(data, torch.device("cpu"))
    for h in range(3):
        rows = np.flatnonzero((p.train_at >= 0) & (p.weights[:, h] > 0))[:64]
        model.zero_grad()
        _, per_task = model.loss(make_batch(t, rows, p.labels[rows], p.weights[rows]))
        sum(per_task.values()).backward()
        grad = model.dlrm.heads.weight.grad  # [T, hidden] one row per head
        for other in range(3):
            assert (grad[other].abs().sum() > 0) == (other == h)


def test_pending_as_negative_under_predicts_and_the_complete_label_methods_do_not(setup):
    """On the synthetic stream Vanilla is far below calibration 1; Oracle, Wait and window heads are not."""
    data, b, base = setup
    cal = {}
    for method in ("vanilla", "wait", "window_heads", "oracle"):
        hw = ROUTING.probs if method == "window_heads" else None
        r = run_stream(base, data, b, plan(method, data, b), CFG, head_weights=hw)
        cal[method] = calibration(r.probs, true_labels(data, r.eval_index, WINDOWS[-1]))
    assert cal["vanilla"] < 0.8, cal
    for method in ("oracle", "wait", "window_heads"):
        assert abs(cal[method] - 1.0) < abs(cal["vanilla"] - 1.0), cal
    assert 0.8 < cal["oracle"] < 1.25, cal


def test_bad_input_is_refused():
    data, b = make_stream(2_000)
    with pytest.raises(ValueError, match="click-time order"):
        dataclasses.replace(data, click=data.click[::-1].copy())
    with pytest.raises(ValueError, match="features"):
        dataclasses.replace(data, features=data.features[:, :0])
    with pytest.raises(ValueError, match="dense"):
        dataclasses.replace(data, dense=np.zeros((len(data), 2), np.float32))  # the schema has no dense features
    with_dense = dataclasses.replace(data, schema=dataclasses.replace(data.schema, dense_features=("x",)),
                                     dense=np.zeros((len(data), 1), np.float32))  # fmt: skip
    with pytest.raises(ValueError, match="NaN"):
        dataclasses.replace(with_dense, dense=np.full((len(data), 1), np.nan, np.float32))
    t = StreamTensors(with_dense, torch.device("cpu"))
    assert make_batch(t, np.arange(3)).dense_features.shape == (3, 1, 1)
    with pytest.raises(ValueError):
        StreamConfig(batch_size=0)
    with pytest.raises(ValueError):
        StreamConfig(lr=0.0)
    with pytest.raises(ValueError, match="pretrained"):
        run_stream(None, data, b, None, CFG)


def test_a_history_reaches_the_batch_and_must_precede_the_click():
    data, _ = make_stream(2_000)
    n = len(data)
    items = np.zeros((n, 3), np.int64)
    times = np.zeros((n, 3), np.int64)
    lengths = np.zeros(n, np.int64)
    items[5, :2], times[5, :2], lengths[5] = (7, 8), (data.click[5] - 10, data.click[5] - 1), 2
    hist = StreamHistory(items=items, actions=(items > 0).astype(np.int64), times=times, lengths=lengths)
    with_hist = dataclasses.replace(data, history=hist)
    batch = make_batch(StreamTensors(with_hist, torch.device("cpu")), np.array([4, 5]))
    assert batch.hist_items.tolist() == [[0, 0], [7, 8]] and batch.hist_lengths.tolist() == [0, 2]
    batch.validate(data.schema)
    late = times.copy()
    late[5, 1] = data.click[5]  # an event at the click's own second is not before it
    with pytest.raises(ValueError, match="strictly before"):
        dataclasses.replace(data, history=dataclasses.replace(hist, times=late))
    gap = items.copy()
    gap[5] = (7, 0, 8)
    with pytest.raises(ValueError, match="left-aligned"):
        dataclasses.replace(data, history=dataclasses.replace(hist, items=gap))


class _DroppedRanker(torch.nn.Module):
    """The DLRM ranker with dropout on its logits: a model whose training draws random numbers."""

    def __init__(self, schema):
        super().__init__()
        self.schema, self.inner = schema, factory(schema)

    def forward(self, batch):
        return torch.nn.functional.dropout(self.inner(batch), 0.5, self.training)

    def loss(self, batch):
        return multitask_loss_terms(self(batch), batch, (1.0,) * 3, self.schema.tasks)


def test_a_model_with_dropout_streams_the_same_twice_and_leaves_the_global_rng_alone():
    data, b = make_stream(4_000)
    pre = pretrain_plan(data.click, data.convert, int(b[0]), WINDOWS)
    p = plan("vanilla", data, b)
    state = torch.random.get_rng_state()
    runs = [run_stream(pretrain(_DroppedRanker, data, pre, CFG), data, b, p, CFG).probs for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert torch.equal(state, torch.random.get_rng_state())
