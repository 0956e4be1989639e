import numpy as np
import pytest

from genrec.data.delayed import (
    METHODS,
    NEVER,
    WindowRouting,
    hash_unit,
    pretrain_plan,
    segment_boundaries,
    segment_of,
    snapshot_labels,
    training_plan,
    window_labels,
)
from genrec.data.synthetic import SyntheticStreamConfig, generate_conversion_stream

H = 3600
WINDOWS = (1 * H, 24 * H, 72 * H)
ROUTING = WindowRouting.uniform(WINDOWS)


def stream(n=20_000, seed=0):
    return generate_conversion_stream(SyntheticStreamConfig(num_events=n, days=8.0, seed=seed))


def plan_of(method, s, b, routing=ROUTING, convert=None):
    return training_plan(method, s.click_time, s.convert_time if convert is None else convert, b, routing,
                         s.users, s.items)  # fmt: skip


# ------------------------------------------------------------------------------------------------ labels
def test_snapshot_and_window_labels():
    click = np.array([0, 0, 0, 100, 100])
    convert = np.array([50, 5000, NEVER, 100, 100 + 3 * H])
    np.testing.assert_array_equal(window_labels(click, convert, H), [True, False, False, True, False])
    np.testing.assert_array_equal(window_labels(click, convert, 72 * H), [True, True, False, True, True])
    # at t = 1000 the conversion at 5000 is pending: negative; so is the one at 100 + 3h
    np.testing.assert_array_equal(snapshot_labels(click, convert, 1000, 72 * H), [True, False, False, True, False])
    np.testing.assert_array_equal(snapshot_labels(click, convert, 5000, 72 * H), [True, True, False, True, False])
    np.testing.assert_array_equal(snapshot_labels(click, convert, 10**9, H), window_labels(click, convert, H))


def test_bad_label_input_is_refused():
    with pytest.raises(ValueError, match="before their click"):
        window_labels(np.array([10]), np.array([5]), H)
    with pytest.raises(ValueError, match="different lengths"):
        window_labels(np.array([1, 2]), np.array([5]), H)
    with pytest.raises(ValueError, match="integer"):
        window_labels(np.array([1.5]), np.array([5.0]), H)
    with pytest.raises(ValueError, match="window_s"):
        window_labels(np.array([1]), np.array([5]), 0)


# ------------------------------------------------------------------------------------------------ routing
def test_routing_is_a_deterministic_function_of_the_triple():
    rng = np.random.default_rng(0)
    u, i, t = rng.integers(1, 1000, 5000), rng.integers(1, 1000, 5000), rng.integers(0, 10**9, 5000)
    heads = ROUTING.route(u, i, t)
    np.testing.assert_array_equal(heads, ROUTING.route(u, i, t))
    perm = rng.permutation(5000)
    np.testing.assert_array_equal(heads[perm], ROUTING.route(u[perm], i[perm], t[perm]))  # order-free
    np.testing.assert_array_equal(heads[:7], ROUTING.route(u[:7], i[:7], t[:7]))  # batch-free
    x = hash_unit([1, 2], [2, 1], [3, 3])
    assert x[0] != x[1] and ((0 <= x) & (x < 1)).all()  # the fields are not interchangeable
    other = WindowRouting.uniform(WINDOWS, salt=1).route(u, i, t)
    assert (other != heads).mean() > 0.5  # another salt, another routing


def test_routing_shares_match_the_configured_probabilities():
    """Over 200k triples each window's share is within 0.01 of its probability (binomial sd < 0.0011)."""
    rng = np.random.default_rng(1)
    n = 200_000
    u, i, t = rng.integers(1, 50, n), rng.integers(1, 50, n), np.sort(rng.integers(0, 10**7, n))
    for probs in ((1 / 3, 1 / 3, 1 / 3), (0.6, 0.3, 0.1), (0.05, 0.05, 0.9)):
        heads = WindowRouting(WINDOWS, probs).route(u, i, t)
        shares = np.bincount(heads, minlength=3) / n
        assert np.abs(shares - np.array(probs)).max() < 0.01, (probs, shares)
        assert (np.bincount(heads, minlength=3) > 0).all()  # every window is covered


@pytest.mark.parametrize("kw", [dict(windows_s=(H, H), probs=(0.5, 0.5)), dict(windows_s=(2 * H, H), probs=(0.5, 0.5)),
                                dict(windows_s=(H,), probs=(0.5,)), dict(windows_s=(H, 2 * H), probs=(1.0, 0.0)),
                                dict(windows_s=(H, 2 * H), probs=(0.5,)), dict(windows_s=(), probs=())])  # fmt: skip
def test_bad_routings_are_refused(kw):
    with pytest.raises(ValueError):
        WindowRouting(**kw)


# ------------------------------------------------------------------------------------------------ segments
def test_segments():
    b = segment_boundaries(100, 350, 100)
    np.testing.assert_array_equal(b, [100, 200, 300, 400])
    np.testing.assert_array_equal(segment_of(np.array([50, 100, 199, 200, 399, 400]), b), [-1, 0, 0, 1, 2, 3])
    with pytest.raises(ValueError):
        segment_boundaries(100, 100, 10)
    with pytest.raises(ValueError):
        segment_boundaries(0, 100, 0)
    with pytest.raises(ValueError, match="increasing"):
        segment_of(np.array([1]), np.array([5, 5]))


# ------------------------------------------------------------------------------------------------ plans
def test_each_method_trains_when_and_on_what_the_protocol_says():
    s = stream()
    c, v = s.click_time, s.convert_time
    b = segment_boundaries(4 * 86400, 8 * 86400, H)
    streamed = c + 72 * H > b[0]
    for method in METHODS:
        p = plan_of(method, s, b)
        trained = p.train_at >= 0
        assert not (trained & ~streamed).any()  # Pretrain examples are never streamed again
        t = np.where(trained, b[np.maximum(p.train_at, 0)], 0)
        heads = p.weights.argmax(1)
        assert (p.weights.sum(1)[trained] == 1).all() and (p.weights.sum(1)[~trained] == 0).all()  # one head each
        assert (t[trained] >= c[trained]).all()
        if method in ("vanilla", "oracle"):
            first_after = b[np.searchsorted(b, c, side="right").clip(max=b.size - 1)]
            np.testing.assert_array_equal(t[trained], first_after[trained])  # its segment's end
            assert (heads[trained] == 2).all()
            expect = (window_labels(c, v, 72 * H) & (v <= t)) if method == "vanilla" else window_labels(c, v, 72 * H)
            np.testing.assert_array_equal(p.labels[trained, 2], expect[trained])
        elif method == "wait":
            assert (t[trained] >= c[trained] + 72 * H).all() and (t[trained] - H < c[trained] + 72 * H).all()
            np.testing.assert_array_equal(p.labels[trained, 2], window_labels(c, v, 72 * H)[trained])
        else:
            np.testing.assert_array_equal(heads[trained], ROUTING.route(s.users, s.items, c)[trained])
            w = np.array(WINDOWS)[heads]
            assert (t[trained] >= c[trained] + w[trained]).all()
            late = (t - H >= c + w) & trained  # trained later than the first boundary after its window closed ...
            assert (t[late] == b[0]).all() and late.sum() > 0  # ... only for windows closed before the stream start
            for h, win in enumerate(WINDOWS):
                on = trained & (heads == h)
                assert on.sum() > 1000
                np.testing.assert_array_equal(p.labels[on, h], window_labels(c, v, win)[on])
    # vanilla's labels really are pending-as-negative: some eventual conversions are trained as negatives
    p = plan_of("vanilla", s, b)
    assert ((p.labels[:, 2] == 0) & window_labels(c, v, 72 * H) & (p.train_at >= 0)).sum() > 100


def test_no_plan_but_the_oracle_reads_a_label_observed_after_its_training_time():
    s = stream(seed=1)
    c, v = s.click_time, s.convert_time
    b = segment_boundaries(4 * 86400, 8 * 86400, H)
    for method in ("vanilla", "wait", "window_heads"):
        p = plan_of(method, s, b)
        for h, win in enumerate(WINDOWS):
            on = (p.train_at >= 0) & (p.weights[:, h] > 0)
            seen = window_labels(c[on], v[on], win) & (v[on] <= b[p.train_at[on]])
            np.testing.assert_array_equal(p.labels[on, h], seen)
    pre = pretrain_plan(c, v, int(b[0]), WINDOWS)
    on = pre.train_at == 0
    assert (c[on] + 72 * H <= b[0]).all() and on.sum() > 1000
    for h, win in enumerate(WINDOWS):
        np.testing.assert_array_equal(pre.labels[on, h], snapshot_labels(c[on], v[on], int(b[0]), win))


def test_a_planted_late_conversion_is_seen_by_no_snapshot_before_its_time():
    s = stream(seed=2)
    c = s.click_time
    b = segment_boundaries(4 * 86400, 8 * 86400, H)
    # examples clicked early in the stream, never converting: plant a conversion 30 h after each click
    victims = np.flatnonzero((s.convert_time == NEVER) & (c >= b[0]) & (c < b[0] + 86400))[:50]
    planted = s.convert_time.copy()
    planted[victims] = c[victims] + 30 * H
    pre_a = pretrain_plan(c, s.convert_time, int(b[0]), WINDOWS)
    pre_b = pretrain_plan(c, planted, int(b[0]), WINDOWS)
    np.testing.assert_array_equal(pre_a.labels, pre_b.labels)  # the pretrain snapshot is before every plant
    for method in ("vanilla", "wait", "window_heads"):
        a, p = plan_of(method, s, b), plan_of(method, s, b, convert=planted)
        np.testing.assert_array_equal(a.train_at, p.train_at)  # when an example trains never depends on its label
        for k in range(b.size):
            rows = a.at(k)
            before = planted[rows] > b[k]  # the planted conversion is not yet observed at b_k ...
            changed = (a.labels[rows] != p.labels[rows]).any(1)
            assert not (changed & before & np.isin(rows, victims)).any()  # ... so no snapshot at b_k sees it
            assert not (changed & ~np.isin(rows, victims)).any()  # and nothing else moves
        # once observed, the planted conversion is learned by the methods whose window covers it
        seen = np.isin(victims, np.flatnonzero(p.labels.sum(1) > 0))
        if method == "vanilla":
            assert not seen.any()  # trained 1 h after the click, 29 h before the conversion
        elif method == "wait":
            assert seen.all()
        else:
            heads = ROUTING.route(s.users[victims], s.items[victims], c[victims])
            np.testing.assert_array_equal(seen, heads == 2)  # 30 h is past the 1 h and the 24 h windows
    # the oracle reads it (it is the upper bound, not a method)
    o = plan_of("oracle", s, b, convert=planted)
    assert (o.labels[victims, 2] == 1).all()


def test_plan_input_is_checked():
    s = stream(2_000)
    b = segment_boundaries(4 * 86400, 8 * 86400, H)
    with pytest.raises(ValueError, match="method"):
        plan_of("fnw", s, b)
    with pytest.raises(ValueError, match="users and items"):
        training_plan("window_heads", s.click_time, s.convert_time, b, ROUTING)
    with pytest.raises(ValueError, match="boundaries"):
        training_plan("wait", s.click_time, s.convert_time, b[:1], ROUTING)
