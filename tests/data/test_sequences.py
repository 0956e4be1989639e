import numpy as np
import pandas as pd
import pytest
import torch

from genrec.data.batches import history_batch, split_histories, training_batch
from genrec.data.sequences import build_sequences, leave_one_out


def _frame(rows, with_time=True):
    f = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    f["timestamp"] = f["timestamp"].astype("Int64")
    return f if with_time else f.drop(columns="timestamp")


def test_stable_sort_keeps_file_order_for_ties():
    f = _frame([("a", "x", 5), ("a", "y", 3), ("a", "z", 3), ("a", "w", 1), ("b", "x", 1), ("b", "y", 1), ("b", "z", 1)])
    d = build_sequences(f)
    assert d.item_map.to_external(d.sequence(0)) == ["w", "y", "z", "x"]  # y before z: file order within the tie
    assert d.item_map.to_external(d.sequence(1)) == ["x", "y", "z"]
    assert d.has_time.tolist() == [True, True]


def test_shuffled_ties_reorder_only_within_a_timestamp_and_are_seeded():
    rng = np.random.default_rng(0)
    rows = [("a", f"i{k}", int(t)) for k, t in enumerate(rng.integers(0, 8, 60))]
    rows += [("u", "p", None), ("u", "q", None), ("u", "r", 1)]  # a user without every timestamp keeps file order
    f = _frame(rows)
    file_order = build_sequences(f)
    orders = set()
    for seed in range(4):
        d = build_sequences(f, ties="shuffle", ties_seed=seed)
        seq = d.item_map.to_external(d.sequence(0))
        times = [int(k[1:]) for k in seq]
        stamps = [rows[t][2] for t in times]
        assert stamps == sorted(stamps)  # still time-ordered
        assert sorted(seq) == sorted(file_order.item_map.to_external(file_order.sequence(0)))
        assert d.item_map.to_external(d.sequence(1)) == ["p", "q", "r"]
        again = build_sequences(f, ties="shuffle", ties_seed=seed)
        assert again.item_map.to_external(again.sequence(0)) == seq  # the seed fixes the order
        assert any("data.ties=shuffle" in n for n in d.notes)
        orders.add(tuple(seq))
    assert len(orders) > 1 and tuple(file_order.item_map.to_external(file_order.sequence(0))) not in orders
    with pytest.raises(ValueError, match="ties must be"):
        build_sequences(f, ties="random")


def test_missing_timestamps_keep_file_order_and_flag_user():
    f = _frame([("a", "x", 5), ("a", "y", None), ("a", "z", 1), ("b", "x", 3), ("b", "y", 2), ("b", "z", 1)])
    d = build_sequences(f)
    assert d.item_map.to_external(d.sequence(0)) == ["x", "y", "z"]
    assert d.item_map.to_external(d.sequence(1)) == ["z", "y", "x"]
    assert d.has_time.tolist() == [False, True]


def test_short_users_dropped_and_noted():
    f = _frame([("a", "x", 1), ("a", "y", 2), ("b", "x", 1), ("b", "y", 2), ("b", "z", 3)])
    d = build_sequences(f)
    assert d.num_users == 1 and "dropped 1 users" in d.notes[0]
    assert len(d.item_map) == 3


def test_leave_one_out_and_no_target_leak_into_training():
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{rng.integers(50)}", t) for u in range(20) for t in range(int(rng.integers(3, 30)))]
    d = build_sequences(_frame(rows))
    train, valid, test = (leave_one_out(d, s) for s in ("train", "valid", "test"))
    all_rows = np.arange(d.num_users)
    b = training_batch(d, train, all_rows, max_len=8)
    for r in all_rows:
        seq = d.sequence(r)
        n = int(b.lengths[r])
        seen = np.concatenate([b.item_ids[r, :n].numpy(), b.targets[r, :n].numpy()])
        # training inputs and targets are exactly the most recent window of seq[:-2]
        window = seq[:-2][-(n + 1):]
        assert np.array_equal(b.item_ids[r, :n].numpy(), window[:-1])
        assert np.array_equal(b.targets[r, :n].numpy(), window[1:])
        assert len(seen) == 2 * n
    hist, _, _, _, tv = split_histories(d, valid, all_rows, max_len=8)
    hist_t, _, _, _, tt = split_histories(d, test, all_rows, max_len=8)
    for r in all_rows:
        seq = d.sequence(r)
        assert tv[r] == seq[-2] and tt[r] == seq[-1]
        assert np.array_equal(hist[r], seq[:-2][-8:]) and np.array_equal(hist_t[r], seq[:-1][-8:])


def test_history_batch_truncates_and_sets_query_time():
    b = history_batch([np.arange(1, 13)], [np.arange(100, 112)], [500], [True], max_len=5)
    assert b.item_ids.tolist() == [[8, 9, 10, 11, 12]]
    assert b.query_times.tolist() == [[108, 109, 110, 111, 500]]
    with pytest.raises(ValueError):
        history_batch([np.array([], dtype=np.int64)], None, None, None, 5)
    assert torch.equal(b.lengths, torch.tensor([5]))


def test_stochastic_length_training_rows_are_kept_items_in_order():
    rng = np.random.default_rng(1)
    rows = [(f"u{u}", f"i{rng.integers(60)}", t) for u in range(12) for t in range(int(rng.integers(3, 60)))]
    d = build_sequences(_frame(rows))
    train = leave_one_out(d, "train")
    all_rows = np.arange(d.num_users)
    with pytest.raises(ValueError, match="rng"):
        training_batch(d, train, all_rows, max_len=40, sl_alpha=1.5)
    a = training_batch(d, train, all_rows, max_len=40, sl_alpha=1.5, rng=np.random.default_rng(3))
    b = training_batch(d, train, all_rows, max_len=40, sl_alpha=1.5, rng=np.random.default_rng(3))
    assert torch.equal(a.item_ids, b.item_ids) and torch.equal(a.lengths, b.lengths)  # one seed, one batch
    k = int(np.ceil(40 ** (1.5 / 2)))  # 16: subsampled windows keep exactly k items
    full = training_batch(d, train, all_rows, max_len=40)
    cut = 0
    for r in all_rows:
        window = d.sequence(r)[:-2][-41:]
        ts_window = d.timestamps[train.starts[r] : train.ends[r]][-41:]
        n = int(a.lengths[r])
        kept = np.concatenate([a.item_ids[r, :n].numpy(), a.targets[r, n - 1 : n].numpy()])
        assert n + 1 in (len(window), k)
        if n + 1 < len(window):
            cut += 1
            assert len(window) > k
        # inputs then targets are one subsequence of the window: each kept item predicts the next kept item
        assert np.array_equal(a.targets[r, : n - 1].numpy(), a.item_ids[r, 1:n].numpy())
        it = iter(window.tolist())
        assert all(x in it for x in kept.tolist())  # order preserved
        times = np.concatenate([a.timestamps[r, :n].numpy(), a.query_times[r, n - 1 : n].numpy()])
        assert np.all(np.diff(times) >= 0) and set(times.tolist()) <= set(ts_window.tolist())
    assert cut > 0 and int(a.lengths.sum()) < int(full.lengths.sum())


def test_exact_duplicate_rows_are_dropped_by_default_and_counted():
    rows = [("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("b", "x", 1), ("b", "z", 2), ("b", "y", 3)]
    original = build_sequences(_frame(rows))
    doubled = build_sequences(_frame([r for r in rows for _ in range(2)]))
    assert doubled.items.tolist() == original.items.tolist()
    assert doubled.offsets.tolist() == original.offsets.tolist()
    assert doubled.timestamps.tolist() == original.timestamps.tolist()
    assert any("dropped 6 exact duplicate rows" in n for n in doubled.notes)
    assert not any("duplicate" in n for n in original.notes)


def test_duplicates_keep_and_repeat_consumption():
    rows = [("a", "x", 1), ("a", "y", 2), ("a", "y", 2), ("a", "x", 5)]
    kept = build_sequences(_frame(rows), duplicates="keep")
    assert kept.item_map.to_external(kept.sequence(0)) == ["x", "y", "y", "x"]
    assert any("kept 1 exact duplicate rows" in n for n in kept.notes)
    dropped = build_sequences(_frame(rows))
    # the same item at another time is a repeat consumption, not a duplicate
    assert dropped.item_map.to_external(dropped.sequence(0)) == ["x", "y", "x"]
    # without timestamps a repeated row cannot be told from a repeat consumption: nothing is dropped
    untimed = build_sequences(_frame(rows, with_time=False))
    assert untimed.lengths.tolist() == [4] and not any("duplicate" in n for n in untimed.notes)
    with pytest.raises(ValueError, match="duplicates must be 'drop' or 'keep'"):
        build_sequences(_frame(rows), duplicates="first")
