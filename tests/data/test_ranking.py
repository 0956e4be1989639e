"""Ranking data layer: splits, labels, leak-free history and dense features, batches, real-data counts, Criteo."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from genrec.data.ranking import (
    build_ranking_dataset,
    load_criteo,
    load_ranking_dataset,
    read_criteo,
)
from genrec.data.ranking.sources import taobao_events
from genrec.data.readers import BadRowError
from genrec.data.registry import DatasetNotFoundError
from tests.conftest import real_data_or_skip

ML_ACTIONS = ("r1", "r2", "r3", "r4", "r5")


def ml_frame(rows) -> pd.DataFrame:
    """(user, item, time, rating) tuples -> an ML-style event table (like = r >= 4, love = r == 5)."""
    u, i, t, r = (np.array(x) for x in zip(*rows))
    return pd.DataFrame({
        "user": u.astype(str), "item": i.astype(str), "timestamp": t.astype(np.int64),
        "actions": np.left_shift(1, r.astype(np.int64) - 1), "candidate": True,
        "task:like": (r >= 4).astype(np.int64), "task:love": (r == 5).astype(np.int64),
    })  # fmt: skip


def ml_dataset(frame, **kw):
    return build_ranking_dataset(frame, name="synthetic", tasks=("like", "love"), actions=ML_ACTIONS, **kw)


def random_rows(n_users=6, n_items=15, seed=0, t_span=1000):
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, n_users + 1):
        n = int(rng.integers(5, 40))
        times = np.sort(rng.integers(0, t_span, n)) + 1_000_000
        for t in times:  # integer seconds in a short span: many ties
            rows.append((user, int(rng.integers(1, n_items + 1)), int(t), int(rng.integers(1, 6))))
    return rows


def ext(ds, items) -> list[int]:
    """External (integer) item ids of internal ids, padding dropped."""
    return [int(x) for x in ds.item_map.to_external([i for i in items.tolist() if i > 0])]


def all_batches(ds, part, **kw):
    return list(ds.batches(part, batch_size=1_000_000, shuffle=False, **kw))


# ------------------------------------------------------------------------------------------------ splits


def test_user_last_split_counts_on_a_synthetic_user():
    rows = [(1, 100 + k, 1000 + k, 1 + k % 5) for k in range(25)] + [(2, 200 + k, 5000 + k, 4) for k in range(20)]
    ds = ml_dataset(ml_frame(rows), split="user-last", n_eval=10, max_candidates=3)
    part = ds.ev_part[ds.ev_user == ds.user_map.get("1")]
    assert (part == 0).sum() == 5 and (part == 1).sum() == 10 and (part == 2).sum() == 10
    assert (ds.ev_part[ds.ev_user == ds.user_map.get("2")] == 0).all()  # 20 < 21 events: training only
    train, valid, test = (ds.counts(p) for p in ("train", "valid", "test"))
    assert train["rows"] == 2 + 7 and train["candidates"] == 25  # ceil(5 / 3) + ceil(20 / 3)
    assert valid["candidates"] == test["candidates"] == 10 and valid["users"] == test["users"] == 1
    assert ds.counts("test", max_candidates=10)["rows"] == 1
    # user 1's test row: the 10 last events; its history: all 15 earlier ones (training + validation)
    (b,) = all_batches(ds, "test", max_candidates=10)
    assert ext(ds, b.cand_items[0]) == [100 + k for k in range(15, 25)]
    assert b.hist_lengths.tolist() == [15]
    assert ext(ds, b.hist_items[0]) == [100 + k for k in range(15)]


def test_user_last_refuses_a_too_small_min_events():
    with pytest.raises(ValueError, match="min_events"):
        ml_dataset(ml_frame(random_rows()), split="user-last", n_eval=10, min_events=15)


def test_global_time_cuts_separate_the_parts():
    ds = ml_dataset(ml_frame(random_rows(seed=3)), split="global-time", quantiles=(0.6, 0.8))
    tv, tt = ds.time_cuts
    t = ds.ev_time
    assert t[ds.ev_part == 0].max() < tv <= t[ds.ev_part == 1].min()
    assert t[ds.ev_part == 1].max() < tt <= t[ds.ev_part == 2].min()
    for part, lo, hi in (("train", 0, tv), ("valid", tv, tt), ("test", tt, 10**12)):
        for b in all_batches(ds, part):
            times = b.cand_times[b.cand_mask]
            assert bool((times >= lo).all()) and bool((times < hi).all())


def test_time_cuts_must_be_increasing():
    with pytest.raises(ValueError, match="T_valid < T_test"):
        ml_dataset(ml_frame(random_rows()), split="global-time", time_cuts=(1_000_500, 1_000_500))


# ------------------------------------------------------------------------------------------------ no leakage


@pytest.mark.parametrize("split", ["user-last", "global-time"])
def test_history_is_every_event_strictly_before_the_earliest_candidate(split):
    rows = random_rows(seed=1, t_span=300)  # many equal timestamps
    ds = ml_dataset(ml_frame(rows), split=split, n_eval=3, max_candidates=4)
    frame = pd.DataFrame(rows, columns=["user", "item", "t", "r"])
    for part in ("train", "valid", "test"):
        for b in all_batches(ds, part, max_history=10_000):
            b.validate(ds.schema)
            t0 = torch.where(b.cand_mask, b.cand_times, torch.iinfo(torch.int64).max).min(dim=1).values
            for r in range(len(b.user_ids)):
                n = int(b.hist_lengths[r])
                assert bool((b.hist_times[r, :n] < t0[r]).all())
                user = ds.user_map.to_external([int(b.user_ids[r])])[0]
                earlier = frame[(frame.user == int(user)) & (frame.t < int(t0[r]))]
                assert n == len(earlier)  # nothing earlier is missing either


def test_max_history_keeps_the_most_recent_events():
    rows = [(1, 10 + k, 100 + k, 3) for k in range(30)]
    ds = ml_dataset(ml_frame(rows), split="user-last", n_eval=5)
    (b,) = all_batches(ds, "test", max_history=4)
    assert ext(ds, b.hist_items[0]) == [31, 32, 33, 34]  # events 21..24; the candidates are 25..29


def _row_features(ds, part, max_candidates=2):
    """(user, t0) -> (history lists, {(candidate item, time): dense features}) for every row of ``part``."""
    out = {}
    for b in all_batches(ds, part, max_history=1000, max_candidates=max_candidates):
        t0 = torch.where(b.cand_mask, b.cand_times, torch.iinfo(torch.int64).max).min(dim=1).values
        for r in range(len(b.user_ids)):
            n = int(b.hist_lengths[r])
            hist = (b.hist_items[r, :n].tolist(), b.hist_actions[r, :n].tolist(), b.hist_times[r, :n].tolist())
            dense = {
                (int(i), int(b.cand_times[r, c])): b.dense_features[r, c].tolist()
                for c, i in enumerate(b.cand_items[r])
                if i > 0
            }
            out[(int(b.user_ids[r]), int(t0[r]))] = (hist, dense)
    return out


def test_a_planted_future_event_reaches_neither_history_nor_dense_features():
    rows = [(1, 1, 100, 5), (1, 2, 200, 1), (1, 3, 300, 4), (2, 1, 150, 5), (2, 3, 250, 2), (3, 2, 120, 4)]
    rows += [(1, 4, 400, 3), (1, 5, 500, 4), (2, 4, 450, 5), (3, 5, 550, 1)]
    cuts = (1000, 2000)
    base = ml_dataset(ml_frame(rows), split="global-time", time_cuts=cuts, max_candidates=2)
    # a later rating of a candidate item by the same user (a "label event") and by other users, all training events,
    # one of them at the very second of user 1's second row's earliest candidate (300)
    planted = rows + [(1, 3, 600, 5), (2, 3, 300, 5), (3, 3, 700, 5), (3, 1, 800, 1)]
    more = ml_dataset(ml_frame(planted), split="global-time", time_cuts=cuts, max_candidates=2)
    before, after = _row_features(base, "train"), _row_features(more, "train")
    checked = 0
    for key, (hist, dense) in before.items():
        _user, t0 = key
        if t0 > 300 or key not in after:  # rows after t=300 legitimately see the event planted at t=300
            continue
        hist2, dense2 = after[key]
        assert hist2 == hist, key
        for cand, feats in dense.items():
            if cand in dense2:
                assert dense2[cand] == pytest.approx(feats), (key, cand)
                checked += 1
    assert checked == 8  # rows (1, 100), (3, 120), (2, 150), (1, 300): two candidates each
    # the planted events are real: rows after them do see them
    last = _row_features(more, "train")[(more.user_map.get("1"), 500)][0]
    assert more.item_map.get("3") in last[0] and 600 not in last[2]


def test_dense_features_count_only_training_events_before_the_row():
    # user 1: three training ratings, a validation-period rating at t=1200, then the candidate at t=1500;
    # user 2 rates item 7 in training and rates again in the test period
    rows = [(1, 7, 10, 5), (1, 8, 20, 1), (1, 9, 30, 4), (2, 7, 40, 5), (1, 9, 1200, 1), (1, 7, 1500, 4)]
    rows += [(2, 8, 2500, 5)]
    ds = ml_dataset(ml_frame(rows), split="global-time", time_cuts=(1000, 2000), smoothing=10.0)
    names = ds.schema.dense_features
    (b,) = all_batches(ds, "valid", max_candidates=1)
    assert b.cand_times[:, 0].tolist() == [1200, 1500]
    d = dict(zip(names, b.dense_features[1, 0].tolist()))
    # global training before t0=1500: 4 events, 3 likes, 2 loves -> priors (3+1)/(4+2), (2+1)/(4+2)
    p_like, p_love = 4 / 6, 3 / 6
    assert d["user_count_log"] == pytest.approx(np.log1p(3))  # the validation rating at t=1200 is not counted
    assert d["user_rate:like"] == pytest.approx((2 + 10 * p_like) / (3 + 10), rel=1e-5)
    assert d["user_rate:love"] == pytest.approx((1 + 10 * p_love) / (3 + 10), rel=1e-5)
    assert d["item_count_log"] == pytest.approx(np.log1p(2))  # item 7: users 1 and 2
    assert d["item_rate:like"] == pytest.approx((2 + 10 * p_like) / (2 + 10), rel=1e-5)
    assert d["recency_log_s"] == pytest.approx(np.log1p(1500 - 1200))  # but the history holds it
    assert b.hist_lengths.tolist() == [3, 4]
    angle = 2 * np.pi * (1500 % 86400) / 3600 / 24
    assert d["hour_sin"] == pytest.approx(np.sin(angle), abs=1e-6)
    # the test-period rating by user 2 (t=2500) changes nothing here
    other = ml_dataset(ml_frame(rows[:-1]), split="global-time", time_cuts=(1000, 2000))
    (b2,) = all_batches(other, "valid", max_candidates=1)
    assert torch.equal(b2.dense_features, b.dense_features)


def taobao_frame(rows):
    """(user, item, behaviour, time) -> a Taobao-style event table."""
    beh = ("pv", "cart", "fav", "buy")
    code = np.array([beh.index(r[2]) for r in rows])
    return pd.DataFrame({
        "user": [str(r[0]) for r in rows], "item": [str(r[1]) for r in rows],
        "timestamp": np.array([r[3] for r in rows], dtype=np.int64), "actions": np.left_shift(1, code),
        "candidate": code == 0, "task:cart": (code == 1).astype(np.int64), "task:fav": (code == 2).astype(np.int64),
        "task:buy": (code == 3).astype(np.int64),
    })  # fmt: skip


def taobao_dataset(rows, **kw):
    return build_ranking_dataset(taobao_frame(rows), name="t", tasks=("cart", "fav", "buy"),
                                 actions=("pv", "cart", "fav", "buy"), split="global-time",
                                 time_cuts=(1000, 2000), labels_from_later_events=True, **kw)  # fmt: skip


def test_a_later_conversion_labels_the_view_but_never_enters_its_history():
    rows = [(1, 5, "pv", 100), (1, 6, "pv", 200), (1, 9, "pv", 300), (1, 9, "pv", 1500)]
    plain = taobao_dataset(rows, max_candidates=1)
    bought = taobao_dataset(rows + [(1, 6, "buy", 250), (1, 5, "cart", 1200)], max_candidates=1)
    a, b = all_batches(plain, "train")[0], all_batches(bought, "train")[0]
    assert ext(bought, b.cand_items[:, 0]) == [5, 6, 9]
    buy, cart = 2, 0
    assert b.labels[:, 0, buy].tolist() == [0.0, 1.0, 0.0]  # the view of item 6 is bought at t=250
    # the cart of item 5 at t=1200 is after the training cut: a training label never looks past it
    assert b.labels[:, 0, cart].tolist() == [0.0, 0.0, 0.0]
    # the row of the view of item 6 (t0=200): history and dense features identical with and without the buy
    assert a.hist_lengths[1] == b.hist_lengths[1] == 1 and a.hist_items[1, 0] == b.hist_items[1, 0]
    assert torch.equal(a.dense_features[1], b.dense_features[1])
    # a later row (t0=300) sees the buy in its history (action bit 3), with the buy counted in the user's buy rate
    assert b.hist_actions[2, : int(b.hist_lengths[2])].tolist() == [1, 1, 8]
    with pytest.raises(ValueError, match="history labels"):
        next(bought.batches("train", 4, with_hist_labels=True))


def test_label_window_bounds_the_conversion_delay():
    rows = [(1, 5, "pv", 100), (1, 5, "buy", 700)]
    assert all_batches(taobao_dataset(rows), "train")[0].labels[0, 0, 2] == 1.0
    assert all_batches(taobao_dataset(rows, label_window_s=500), "train")[0].labels[0, 0, 2] == 0.0


def test_user_last_split_is_refused_for_labels_from_later_events():
    with pytest.raises(ValueError, match="global-time"):
        build_ranking_dataset(taobao_frame([(1, 5, "pv", 100)]), name="t", tasks=("cart", "fav", "buy"),
                              actions=("pv", "cart", "fav", "buy"), split="user-last",
                              labels_from_later_events=True)  # fmt: skip


# ------------------------------------------------------------------------------------------------ batches


def test_batches_validate_and_are_reproducible():
    ds = ml_dataset(ml_frame(random_rows(seed=4)), split="user-last", n_eval=3, max_candidates=4)
    a = list(ds.batches("train", 5, seed=7, with_hist_labels=True))
    b = list(ds.batches("train", 5, seed=7, with_hist_labels=True))
    for x, y in zip(a, b):
        x.validate(ds.schema)
        assert torch.equal(x.cand_items, y.cand_items) and torch.equal(x.hist_labels, y.hist_labels)
        n = x.hist_lengths
        like = x.hist_labels[..., 0]
        acts = x.hist_actions
        pos = torch.arange(x.hist_items.shape[1])[None, :] < n[:, None]
        # a history event's like label is its own rating >= 4 (bits r4, r5)
        assert torch.equal(like.bool(), pos & ((acts & 0b11000) > 0))
    assert sum(len(x.user_ids) for x in a) == ds.counts("train")["rows"]
    assert [x.user_ids.tolist() for x in a] != [x.user_ids.tolist() for x in ds.batches("train", 5, seed=8)]


def test_event_table_errors_are_clear():
    frame = ml_frame(random_rows()).drop(columns="task:love")
    with pytest.raises(ValueError, match="task:love"):
        ml_dataset(frame)
    frame = ml_frame(random_rows())
    frame.loc[3, "task:like"] = 2
    with pytest.raises(ValueError, match="0/1"):
        ml_dataset(frame)


def test_missing_dataset_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("GENREC_DATA_DIR", raising=False)
    monkeypatch.setenv("GENREC_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DatasetNotFoundError, match="ratings.dat"):
        load_ranking_dataset("ml-1m", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown ranking dataset"):
        load_ranking_dataset("nope", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------------ Taobao file


def test_taobao_truncated_last_line_and_last_user_are_dropped(tmp_path):
    path = tmp_path / "UserBehavior_head.csv"
    path.write_text("1,10,7,pv,1511544070\n1,10,7,buy,1511544080\n2,11,7,pv,1511544090\n2,12,7,pv")
    events, notes = taobao_events(path)
    assert events["user"].tolist() == ["1", "1"]
    assert any("truncated" in n for n in notes) and any("last user 2" in n for n in notes)
    path.write_text("1,10,7,pv,1511544070\n1,10,7,click,1511544080\n")
    with pytest.raises(BadRowError, match=r"UserBehavior_head.csv:2: behaviour 'click'"):
        taobao_events(path)


# ------------------------------------------------------------------------------------------------ Criteo


def criteo_line(label, ints, cats):
    return "\t".join([str(label)] + [str(x) for x in ints] + list(cats)) + "\n"


def test_criteo_vocabulary_comes_from_train_only(tmp_path, monkeypatch):
    folder = tmp_path / "criteo-dac-head8k"
    folder.mkdir()
    ints = [1, -1, ""] + [3] * 10
    cats = ["aaaaaaaa", ""] + ["cccccccc"] * 24
    (folder / "train.tsv").write_text(criteo_line(1, ints, cats) + criteo_line(0, ints, ["bbbbbbbb"] + cats[1:]))
    (folder / "dev.tsv").write_text(criteo_line(0, ints, ["dddddddd"] + cats[1:]))  # a dev-only value
    (folder / "test.tsv").write_text(criteo_line(1, ints, cats))
    monkeypatch.delenv("GENREC_DATA_DIR", raising=False)
    data = load_criteo(tmp_path)
    assert data.vocab_sizes[0] == 2 and "dddddddd" not in data.vocabularies[0]
    assert data.train.sparse[:, 0].tolist() == [1, 2]  # sorted value order
    assert data.valid.sparse[0, 0] == 0  # unseen in train -> OOV
    assert data.train.sparse[0, 1] == 0 and data.vocab_sizes[1] == 0  # missing -> 0
    assert data.train.dense[0, :3].tolist() == pytest.approx([np.log1p(1), 0.0, 0.0])  # -1 and missing -> 0
    assert data.test.labels.tolist() == [1.0]
    (folder / "dev.tsv").write_text(criteo_line(0, ints, cats) + criteo_line(0, ["x"] + ints[1:], cats))
    with pytest.raises(BadRowError, match=r"dev.tsv:2: I1 'x'"):
        load_criteo(tmp_path)


def test_criteo_real_files():
    folder = real_data_or_skip("criteo-dac-head8k", "train.tsv").parent
    data = load_criteo(folder)
    assert (len(data.train), len(data.valid), len(data.test)) == (7200, 409, 391)
    train_raw = read_criteo(folder / "train.tsv")
    for j, col in enumerate(data.sparse_names):
        assert data.vocab_sizes[j] == train_raw[col][train_raw[col] != ""].nunique()
        assert int(data.valid.sparse[:, j].max()) <= data.vocab_sizes[j]
    assert data.train.labels.sum() == 1549
    print(data.describe())


# ------------------------------------------------------------------------------------------------ real logs


@pytest.fixture(scope="module")
def ml1m():
    folder = real_data_or_skip("ml-1m", "ratings.dat").parent
    return load_ranking_dataset("ml-1m", data_dir=folder.parent, split="user-last")


def test_ml1m_user_last_counts(ml1m):
    raw = pd.read_csv(real_data_or_skip("ml-1m", "ratings.dat"), sep=":", header=None, usecols=[0, 2, 4, 6])
    raw.columns = [0, 1, 2, 3]
    per_user = raw.groupby(0).size()
    assert ml1m.schema.num_users == 6040 and ml1m.schema.num_items == 3706
    test = ml1m.counts("test", max_candidates=10)
    eligible = int((per_user >= 21).sum())
    assert test["rows"] == test["users"] == eligible and test["candidates"] == 10 * eligible
    rows = ml1m.rows("test", 10)
    assert (rows.size == 10).all()
    train = ml1m.counts("train", max_candidates=10)
    assert train["candidates"] == len(raw) - 20 * eligible
    assert ml1m.schema.user_features == ("sex", "age", "occupation", "zip")
    assert ml1m.schema.user_feature_sizes[:3] == (2, 7, 21)
    assert "genre:Drama" in ml1m.schema.dense_features
    likes = sum(ml1m.counts(p)["base_rates"]["like"] * ml1m.counts(p)["candidates"] for p in ("train", "valid", "test"))
    assert likes == pytest.approx(int((raw[2] >= 4).sum()))  # every rating is a candidate of exactly one part
    for part in ("train", "valid", "test"):
        c = ml1m.counts(part)
        print(part, c["rows"], c["candidates"], c["base_rates"])
        b = next(ml1m.batches(part, 64))
        b.validate(ml1m.schema)
        t0 = torch.where(b.cand_mask, b.cand_times, torch.iinfo(torch.int64).max).min(dim=1).values
        assert bool((b.hist_times < t0[:, None]).all() | (b.hist_items == 0).all())


def test_kuairand_global_time_real():
    folder = real_data_or_skip("kuairand-27k-like-hate-subset", "processed_standard_kcore_15.tsv").parent
    ds = load_ranking_dataset("kuairand", data_dir=folder)
    assert ds.schema.num_users == 664 and ds.schema.num_items == 9359 and len(ds.ev_time) == 41828
    assert any("liked-or-hated" in n for n in ds.schema.notes)
    tv, tt = ds.time_cuts
    assert ds.ev_time[ds.ev_part == 0].max() < tv <= ds.ev_time[ds.ev_part == 1].min()
    assert ds.ev_time[ds.ev_part == 1].max() < tt <= ds.ev_time[ds.ev_part == 2].min()
    like, hate = ds.schema.tasks.index("like"), ds.schema.tasks.index("hate")
    assert (ds.ev_labels[:, like] + ds.ev_labels[:, hate] == 1).all()  # every row is liked or hated
    print(ds.describe())
    for part in ("train", "valid", "test"):
        next(ds.batches(part, 32, with_hist_labels=True)).validate(ds.schema)


def test_taobao_day_split_real():
    folder = real_data_or_skip("taobao-userbehavior-head", "UserBehavior_head.csv").parent
    ds = load_ranking_dataset("taobao", data_dir=folder)
    assert ds.schema.num_users == 814 and len(ds.ev_time) == 84287 and int(ds.ev_candidate.sum()) == 75693
    tv, tt = ds.time_cuts
    assert (tv + 8 * 3600) % 86400 == 0 and tt - tv == 86400  # Beijing midnights
    assert ds.ev_time[ds.ev_part == 0].max() < tv and ds.ev_time[ds.ev_part == 2].min() >= tt
    # one-hour labels: the training part's base rates are close to the test part's (with the conversion bounded
    # only by the end of each part they were 1.5-1.7 times the test rates)
    train, test = ds.counts("train")["base_rates"], ds.counts("test")["base_rates"]
    assert all(0.75 < train[t] / test[t] < 1.25 for t in ("cart", "buy")), (train, test)
    print(ds.describe())
    for part in ("train", "valid", "test"):
        next(ds.batches(part, 32)).validate(ds.schema)


def test_ml1m_global_time_real():
    folder = real_data_or_skip("ml-1m", "ratings.dat").parent
    ds = load_ranking_dataset("ml-1m", data_dir=folder, split="global-time", quantiles=(0.8, 0.9))
    tv, tt = ds.time_cuts
    t = ds.ev_time
    assert t[ds.ev_part == 0].max() < tv <= t[ds.ev_part == 1].min()
    assert t[ds.ev_part == 1].max() < tt <= t[ds.ev_part == 2].min()
    assert abs((t < tv).mean() - 0.8) < 0.01 and abs((t < tt).mean() - 0.9) < 0.01
    b = next(ds.batches("test", 256))
    b.validate(ds.schema)
    assert bool((b.cand_times[b.cand_mask] >= tt).all())
    print(ds.describe())


def test_taobao_labels_count_conversions_within_an_hour_by_default(tmp_path):
    """A page view's cart / fav / buy counts within one hour of the view unless asked otherwise: with no bound, a
    training-day view has days to convert while a view on the one-day test part has hours, and the parts' base
    rates differ for that reason alone."""
    day0 = 1511539200  # 2017-11-25 00:00 Beijing time
    rows = [
        (1, 5, 50, "pv", day0 + 3600), (1, 5, 50, "buy", day0 + 2 * 86400),  # bought two days later
        (1, 6, 60, "pv", day0 + 7200), (1, 6, 60, "cart", day0 + 7200 + 1800),  # carted after 30 minutes
        (1, 7, 70, "pv", day0 + 5 * 86400 + 100), (1, 8, 80, "pv", day0 + 6 * 86400 + 100),
    ]  # fmt: skip
    folder = tmp_path / "taobao-userbehavior-head"
    folder.mkdir()
    (folder / "UserBehavior_head.csv").write_text("".join(f"{u},{i},{c},{b},{t}\n" for u, i, c, b, t in rows))

    def train_labels(**kw) -> dict[str, list[float]]:
        ds = load_ranking_dataset("taobao", data_dir=tmp_path, **kw)
        batch = all_batches(ds, "train")[0]
        items = [ds.item_map.to_external([int(i)])[0] for i in batch.cand_items[0][batch.cand_mask[0]]]
        labels = batch.labels[0][batch.cand_mask[0]]  # [C, T] cart, fav, buy
        return {item: labels[k].tolist() for k, item in enumerate(items)}

    assert train_labels() == {"5": [0.0, 0.0, 0.0], "6": [1.0, 0.0, 0.0]}
    assert train_labels(label_window_s=None) == {"5": [0.0, 0.0, 1.0], "6": [1.0, 0.0, 0.0]}
    ds = load_ranking_dataset("taobao", data_dir=tmp_path)
    assert any("within 3600 s" in note for note in ds.schema.notes)
