"""Ranking domains (surfaces): definitions per dataset, cand_domains in batches, the only_domain restriction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from genrec.data.ranking import (
    DOMAIN_DEFINITIONS,
    build_ranking_dataset,
    load_ranking_dataset,
)
from tests.conftest import real_data_or_skip

ML_ACTIONS = ("r1", "r2", "r3", "r4", "r5")


def synthetic(domains=("x", "y", "z"), seed=0, n_users=5, **kw):
    """Users with 30 ratings each; every event's domain drawn at random (rows mix domains)."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, n_users + 1):
        times = np.sort(rng.choice(np.arange(10_000), 30, replace=False)) + 1_000_000
        rows += [(user, int(rng.integers(1, 20)), int(t), int(rng.integers(1, 6)), int(rng.integers(1, 4)))
                 for t in times]
    u, i, t, r, d = (np.array(x) for x in zip(*rows))
    frame = pd.DataFrame({"user": u.astype(str), "item": i.astype(str), "timestamp": t.astype(np.int64),
                          "actions": np.left_shift(1, r - 1), "candidate": True,
                          "task:like": (r >= 4).astype(np.int64), "task:love": (r == 5).astype(np.int64),
                          "domain": d.astype(np.int64)})  # fmt: skip
    kw.setdefault("split", "user-last")
    kw.setdefault("n_eval", 5)
    return build_ranking_dataset(frame, name="synthetic", tasks=("like", "love"), actions=ML_ACTIONS,
                                 domains=domains, **kw)  # fmt: skip


def every_candidate(ds, part, max_candidates=4):
    """[(user, item, time, domain, history items, dense features)] of every real candidate of ``part``."""
    out = []
    for b in ds.batches(part, 10_000, shuffle=False, max_history=1000, max_candidates=max_candidates):
        b.validate(ds.schema)
        for r, c in torch.nonzero(b.cand_mask).tolist():
            n = int(b.hist_lengths[r])
            out.append((int(b.user_ids[r]), int(b.cand_items[r, c]), int(b.cand_times[r, c]),
                        int(b.cand_domains[r, c]), tuple(b.hist_items[r, :n].tolist()),
                        tuple(np.round(b.dense_features[r, c].numpy(), 6).tolist())))  # fmt: skip
        assert bool((b.cand_domains[~b.cand_mask] == 0).all())  # padding: 0
    return out


# ------------------------------------------------------------------------------------------------ synthetic


def test_batches_carry_each_candidates_own_domain_and_the_schema_names_them():
    ds = synthetic()
    assert ds.schema.domains == ("x", "y", "z")
    by_event = {(int(u), int(i), int(t)): int(d)
                for u, i, t, d in zip(ds.ev_user, ds.ev_item, ds.ev_time, ds.ev_domain)}  # fmt: skip
    for part in ("train", "valid", "test"):
        cands = every_candidate(ds, part)
        assert cands and all(d == by_event[(u, i, t)] for u, i, t, d, _, _ in cands)
    plain = build_ranking_dataset(pd.DataFrame({"user": ["1"], "item": ["1"], "timestamp": [5], "actions": [1],
                                                "candidate": [True], "task:like": [0], "task:love": [0]}),
                                  name="p", tasks=("like", "love"), actions=ML_ACTIONS, split="global-time",
                                  time_cuts=(6, 7))  # fmt: skip
    assert plain.schema.domains == () and plain.ev_domain is None


@pytest.mark.parametrize("split", ["user-last", "global-time"])
def test_only_domain_keeps_exactly_that_domains_candidates_with_unchanged_histories(split):
    ds = synthetic(seed=1, split=split)
    for name in ds.schema.domains:
        k = ds.schema.domains.index(name) + 1
        only = ds.restrict_to_domain(name)
        assert only.schema == ds.schema  # the schema (and so a model's shape) does not change
        for part in ("train", "valid", "test"):
            full = every_candidate(ds, part)
            kept = every_candidate(only, part)
            # the same candidates, in the same order, with the same histories and dense features
            assert kept == [c for c in full if c[3] == k]
            assert only.counts(part)["candidates"] == len(kept)
            assert only.counts(part)["domain_candidates"] == {
                "unknown": 0, **{d: (len(kept) if d == name else 0) for d in ds.schema.domains}}
    assert ds.restrict_to_domain("y").restrict_to_domain(None).rows("test").cands.tolist() \
        == ds.rows("test").cands.tolist()


def test_bad_domains_are_refused_with_the_known_names():
    ds = synthetic()
    with pytest.raises(ValueError, match=r"unknown domain 'w'; the dataset's domains are \['x', 'y', 'z'\]"):
        ds.restrict_to_domain("w")
    with pytest.raises(ValueError, match="value 4 .* is not in 0..3"):
        build_ranking_dataset(pd.DataFrame({"user": ["1"], "item": ["1"], "timestamp": [5], "actions": [1],
                                            "candidate": [True], "task:like": [0], "domain": [4]}),
                              name="d", tasks=("like",), actions=("a",), split="global-time", time_cuts=(6, 7),
                              domains=("x", "y", "z"))  # fmt: skip
    with pytest.raises(ValueError, match="no 'domain' column"):
        build_ranking_dataset(pd.DataFrame({"user": ["1"], "item": ["1"], "timestamp": [5], "actions": [1],
                                            "candidate": [True], "task:like": [0]}),
                              name="d", tasks=("like",), actions=("a",), split="global-time", time_cuts=(6, 7),
                              domains=("x",))  # fmt: skip
    with pytest.raises(ValueError, match="built without domains"):
        build_ranking_dataset(pd.DataFrame({"user": ["1"], "item": ["1"], "timestamp": [5], "actions": [1],
                                            "candidate": [True], "task:like": [0]}),
                              name="d", tasks=("like",), actions=("a",), split="global-time",
                              time_cuts=(6, 7)).restrict_to_domain("x")  # fmt: skip


def test_unknown_definitions_are_refused_before_reading_any_file(tmp_path):
    with pytest.raises(ValueError, match=r"unknown domain definition 'country'; known: 'age', 'genre'"):
        load_ranking_dataset("ml-1m", data_dir=tmp_path, domains="country")
    with pytest.raises(ValueError, match="known: none .*'tab' was dropped"):
        load_ranking_dataset("kuairand", data_dir=tmp_path, domains="tab")
    with pytest.raises(ValueError, match="only_domain='comedy' needs domains="):
        load_ranking_dataset("ml-1m", data_dir=tmp_path, only_domain="comedy")
    assert set(DOMAIN_DEFINITIONS) == {"ml-1m", "taobao-userbehavior-head", "kuairand-27k-like-hate-subset"}


# ------------------------------------------------------------------------------------------------ real data


def _ml_side_tables():
    """Age code per user and genre set per movie, read from the .dat files here (not through genrec)."""
    folder = real_data_or_skip("ml-1m", "users.dat").parent
    real_data_or_skip("ml-1m", "movies.dat")
    users = pd.read_csv(folder / "users.dat", sep="::", engine="python", header=None, names=["u", "s", "a", "o", "z"])
    movies = pd.read_csv(folder / "movies.dat", sep="::", engine="python", header=None, names=["i", "t", "g"],
                         encoding="latin-1")  # fmt: skip
    return folder.parent, dict(zip(users.u.astype(str), users.a)), dict(zip(movies.i.astype(str), movies.g.str.split("|")))


def _genre_group(genres: list[str]) -> str:
    action = {"Action", "Adventure", "Crime", "Fantasy", "Film-Noir", "Horror", "Mystery", "Sci-Fi", "Thriller", "War",
              "Western"}  # fmt: skip
    return "action-thriller" if action & set(genres) else "comedy" if "Comedy" in genres else "drama-other"


def _age_group(age: int) -> str:
    return {1: "under-25", 18: "under-25", 25: "25-34"}.get(age, "35-plus")


@pytest.mark.parametrize("definition", ["age", "genre"])
def test_ml1m_cand_domains_follow_the_definition_on_real_rows(definition):
    data_dir, ages, genres = _ml_side_tables()
    ds = load_ranking_dataset("ml-1m", data_dir=data_dir, domains=definition)
    names = ds.schema.domains
    assert names == (("under-25", "25-34", "35-plus") if definition == "age" else
                     ("action-thriller", "comedy", "drama-other"))  # fmt: skip
    # every event (so every candidate of every part), vectorised over the internal ids
    if definition == "age":
        ext = ds.user_map.to_external(list(range(1, ds.schema.num_users + 1)))
        group = [_age_group(ages[u]) for u in ext]
        want = np.array([0] + [names.index(g) + 1 for g in group])[ds.ev_user]
        # the Scenario-Wise Rec user counts
        assert [group.count(n) for n in names] == [1325, 2096, 2619]
    else:
        ext = ds.item_map.to_external(list(range(1, ds.schema.num_items + 1)))
        want = np.array([0] + [names.index(_genre_group(genres[i])) + 1 for i in ext])[ds.ev_item]
    assert np.array_equal(ds.ev_domain, want)
    # batches: every test and validation candidate, and the first training rows
    for part, rows in (("test", None), ("valid", None), ("train", 2000)):
        r = ds.rows(part, 10)
        which = np.arange(len(r) if rows is None else rows)
        b = ds.make_batch(r, which, max_history=1)
        b.validate(ds.schema)
        real_users = np.repeat(ds.user_map.to_external(b.user_ids.tolist()), b.cand_mask.sum(1).numpy())
        real_items = ds.item_map.to_external(b.cand_items[b.cand_mask].tolist())
        expect = ([_age_group(ages[u]) for u in real_users] if definition == "age"
                  else [_genre_group(genres[i]) for i in real_items])  # fmt: skip
        assert [names[k - 1] for k in b.cand_domains[b.cand_mask].tolist()] == expect
        assert bool((b.cand_domains[~b.cand_mask] == 0).all())
    # only_domain on real rows (genre: rows mix domains): exactly that domain's test candidates, same histories
    only = ds.restrict_to_domain(names[1])
    full, kept = ds.rows("test", 10), only.rows("test", 10)
    assert kept.cands.tolist() == [c for c in full.cands.tolist() if ds.ev_domain[c] == 2]
    owner = np.repeat(np.arange(len(full)), full.size)  # full row of each candidate
    row_of = dict(zip(full.cands.tolist(), owner.tolist()))
    first = [row_of[c] for c in kept.cands[kept.start].tolist()]
    assert kept.hist_end.tolist() == full.hist_end[first].tolist() and kept.t0.tolist() == full.t0[first].tolist()


def test_taobao_top_categories_on_the_head_file():
    folder = real_data_or_skip("taobao-userbehavior-head", "UserBehavior_head.csv").parent
    ds = load_ranking_dataset("taobao", data_dir=folder.parent, domains="top-categories")
    assert ds.schema.domains == ("top-20-categories", "other-categories")
    raw = pd.read_csv(folder / "UserBehavior_head.csv", header=None, names=["u", "i", "c", "b", "t"], dtype=str)
    raw = raw.dropna()
    raw = raw[raw.u != raw.u.iloc[-1]]  # the loader drops the truncated last user
    t = raw.t.astype(np.int64)
    counts = raw[(raw.b == "pv") & (t < ds.time_cuts[0])].c.value_counts()
    top = {c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:20]}
    category = dict(zip(zip(raw.u, raw.i, t), raw.c))  # (user, item, time) -> category (an item has one category)
    users = ds.user_map.to_external(ds.ev_user.tolist())
    items = ds.item_map.to_external(ds.ev_item.tolist())
    want = [1 if category[(u, i, int(s))] in top else 2 for u, i, s in zip(users, items, ds.ev_time.tolist())]
    assert ds.ev_domain.tolist() == want
    test = ds.counts("test")["domain_candidates"]
    assert test["top-20-categories"] > 0 and test["other-categories"] > 0 and test["unknown"] == 0


def test_max_users_keeps_a_seeded_sample_of_whole_users():
    full = synthetic(n_users=8)
    a, b, c = (synthetic(n_users=8, max_users=3, user_sample_seed=s) for s in (0, 0, 1))
    users = lambda ds: sorted(ds.user_map.to_external(list(range(1, ds.schema.num_users + 1))))
    assert users(a) == users(b) and len(users(a)) == 3 and users(a) != users(c)
    assert len(a.ev_item) == 3 * 30  # every event of each kept user
    assert any("a random sample of 3 of the 8 users" in n for n in a.schema.notes)
    assert synthetic(n_users=8, max_users=100).schema.num_users == full.schema.num_users
    with pytest.raises(ValueError, match="max_users must be >= 1"):
        synthetic(max_users=0)
