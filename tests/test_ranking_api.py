"""The ranking API (genrec.ranking_api): fit / rank / save / load on raw ids, on tiny synthetic tables."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from genrec.api import InvalidInputError, NotFittedError
from genrec.config import ConfigError, RankingDataConfig, RankingModelConfig, RankingRunConfig, RankingTrainConfig
from genrec.data.ranking import build_ranking_dataset
from genrec.data.readers import BadRowError
from genrec.models.dlrm import DLRMRanker as DLRM_CLASS
from genrec.ranking_api import Ranker, RankResult
from genrec.train.ranking import RANKING_STATE_FILES, predict, train_ranker

TASKS = ("click", "like")
HSTU = {"name": "hstu-ranker", "params": {"embedding_dim": 16, "num_blocks": 2, "num_heads": 2, "attention_dim": 8,
                                          "linear_dim": 8, "dropout": 0.0, "linear_dropout": 0.0}}  # fmt: skip
DLRM = {"name": "dlrm", "params": {}}
TRAIN = {"epochs": 1, "batch_size": 32, "lr": 0.01, "num_threads": 1, "select_metric": "LogLoss"}
DATA = {"max_history": 12, "max_candidates": 4}


def table(num_users: int = 30, num_items: int = 25, events: int = 14, seed: int = 0) -> pd.DataFrame:
    """A log with a learnable signal, in a user's own column names: uid, movie, when (Unix s), click, like."""
    rng = np.random.default_rng(seed)
    quality = rng.normal(0.0, 1.5, num_items + 1)
    rows = []
    for u in range(1, num_users + 1):
        t = 1_000_000 + int(rng.integers(0, 10_000))
        for _ in range(events):
            item = int(rng.integers(1, num_items + 1))
            t += int(rng.integers(60, 3600))
            p = 1.0 / (1.0 + np.exp(-quality[item]))
            click = int(rng.random() < p)
            like = int(click and rng.random() < p)
            rows.append((f"u{u}", f"m{item}", t, click, like))
    return pd.DataFrame(rows, columns=["uid", "movie", "when", "click", "like"])


COLUMNS = {"user": "uid", "item": "movie", "timestamp": "when"}


def fit(model: dict, **kw) -> Ranker:
    return Ranker(model=model, train=TRAIN, data=DATA).fit(table(), tasks=TASKS, columns=COLUMNS, **kw)


@pytest.fixture(scope="module")
def hstu() -> Ranker:
    return fit(HSTU)


@pytest.fixture(scope="module")
def dlrm() -> Ranker:
    return fit(DLRM)


HISTORY = [("m3", 1_020_000), {"item": "m7", "ts": 1_020_500, "actions": ["click"]},
           {"item": "m1", "ts": 1_021_000, "actions": ["click", "like"]}]  # fmt: skip
CANDS = ["m2", "m5", "m9", "m11", "m3"]


def probs(result: RankResult) -> np.ndarray:
    return np.array([result.probs[t] for t in TASKS]).T  # [K, T]


# ------------------------------------------------------------------------------------------------ fit / rank
@pytest.mark.parametrize("which", ["hstu", "dlrm"])
def test_fit_then_rank_gives_probabilities_for_every_task(which, request):
    ranker = request.getfixturevalue(which)
    assert ranker.tasks == TASKS
    assert ranker.model_id.startswith(("hstu-ranker-", "dlrm-"))
    with pytest.warns(UserWarning, match="unknown"):
        result = ranker.rank(HISTORY + [("nope", 1_020_100)], CANDS + ["zzz"], query_time=1_021_600)
    assert result.items == CANDS + ["zzz"]
    assert set(result.probs) == set(TASKS)
    p = probs(result)
    assert p.shape == (6, 2)
    assert ((p[:5] > 0) & (p[:5] < 1)).all()
    assert np.isnan(p[5]).all()
    assert result.unknown == ["nope"] and result.unknown_candidates == ["zzz"]
    assert any("unknown candidate" in w for w in result.warnings)
    assert ranker.results_["test"]["metrics"]["click"]["auc"] is not None


def test_query_time_defaults_to_the_last_history_timestamp(hstu):
    a = hstu.rank(HISTORY, CANDS)
    b = hstu.rank(HISTORY, CANDS, query_time=1_021_000)
    assert a == b
    c = hstu.rank(HISTORY, CANDS, query_time=1_021_000 + 86_400 * 30)
    assert not np.allclose(probs(a), probs(c))  # the time bias reads the candidates' impression time


def test_history_is_put_in_time_order(hstu):
    shuffled = [HISTORY[2], HISTORY[0], HISTORY[1]]
    assert probs(hstu.rank(shuffled, CANDS)) == pytest.approx(probs(hstu.rank(HISTORY, CANDS)))


@pytest.mark.parametrize("which", ["hstu", "dlrm"])
def test_a_candidates_result_does_not_depend_on_the_other_candidates(which, request):
    ranker = request.getfixturevalue(which)
    base = probs(ranker.rank(HISTORY, CANDS, query_time=1_021_600))
    perm = [4, 2, 0, 3, 1]
    permuted = probs(ranker.rank(HISTORY, [CANDS[i] for i in perm], query_time=1_021_600))
    np.testing.assert_allclose(permuted, base[perm], rtol=0, atol=1e-6)
    more = probs(ranker.rank(HISTORY, CANDS + ["m4", "m6", "m8", "unknown", "m10"], query_time=1_021_600))
    np.testing.assert_allclose(more[:5], base, rtol=0, atol=1e-6)
    alone = np.concatenate([probs(ranker.rank(HISTORY, [c], query_time=1_021_600)) for c in CANDS])
    np.testing.assert_allclose(alone, base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("which", ["hstu", "dlrm"])
def test_rank_batch_equals_one_call_per_history(which, request):
    ranker = request.getfixturevalue(which)
    histories = [HISTORY, [], ["m4", "m8"], HISTORY[:1] + [("zz", 1_020_100)]]
    cands = [CANDS, ["m1", "m2"], ["m3"], []]
    times = [1_021_600, 5, None, 1_020_200]
    batch = ranker.rank_batch(histories, cands, query_times=times)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = [ranker.rank(h, c, query_time=t) for h, c, t in zip(histories, cands, times)]
    for b, s in zip(batch, single):
        assert b.items == s.items and b.unknown == s.unknown and b.warnings == s.warnings
        np.testing.assert_allclose(probs(b).reshape(-1, 2), probs(s).reshape(-1, 2), rtol=0, atol=1e-6)
    assert batch[3].items == [] and batch[3].probs == {"click": [], "like": []}
    assert batch[3].unknown == ["zz"]


def test_raw_ids_round_trip_strings_and_integers(tmp_path):
    frame = table()
    frame["movie"] = frame["movie"].str[1:].astype(int)  # integer item ids
    ranker = Ranker(model=DLRM, train=TRAIN, data=DATA).fit(frame, tasks=TASKS, columns=COLUMNS)
    a = ranker.rank([(3, 1_020_000), ("7", 1_020_500)], [2, "5", 9], query_time=1_021_000)
    b = ranker.rank([("3", 1_020_000), (7, 1_020_500)], ["2", 5, "9"], query_time=1_021_000)
    assert a.items == ["2", "5", "9"] and b.items == ["2", "5", "9"]
    assert a.probs == b.probs and not a.unknown_candidates
    assert ranker.state_.item_map.external[:3] == ["1", "2", "3"]  # numeric ids in numeric order


def test_combined_weights(hstu):
    result = hstu.rank(HISTORY, CANDS + ["zzz"])
    p = probs(result)
    assert result.combined() == pytest.approx(list(p[:5].sum(1)) + [math.nan], nan_ok=True)
    weighted = result.combined({"click": 0.5, "like": 2.0})
    assert weighted[:5] == pytest.approx(list(0.5 * p[:5, 0] + 2.0 * p[:5, 1]))
    assert math.isnan(weighted[5])
    assert result.combined({"like": 1})[:5] == pytest.approx(list(p[:5, 1]))
    with pytest.raises(InvalidInputError, match="unknown task 'buy'"):
        result.combined({"buy": 1.0})
    with pytest.raises(InvalidInputError, match="finite number"):
        result.combined({"click": float("nan")})


# ------------------------------------------------------------------------------------------------ dense features
def test_dense_features_are_the_datasets_for_an_unknown_user(dlrm):
    frame = table()
    events = pd.DataFrame({"user": frame["uid"], "item": frame["movie"], "timestamp": frame["when"],
                           "actions": frame["click"] + 2 * frame["like"], "candidate": True,
                           "task:click": frame["click"], "task:like": frame["like"]})  # fmt: skip
    ds = build_ranking_dataset(events, name="table", tasks=TASKS, actions=TASKS, split="global-time")
    query = dlrm.prepare_rank(HISTORY, CANDS, query_time=1_021_600)
    batch = dlrm.make_batch([query])
    cands = batch.cand_items.numpy()
    shape = cands.shape
    expected = ds.dense_features_for(np.zeros(shape, np.int64), np.full(shape, 1_021_600), cands,
                                     np.full(shape, 1_021_600), np.full(shape, 1_021_000))  # fmt: skip
    np.testing.assert_array_equal(batch.dense_features.numpy(), expected)
    assert batch.dense_features[0, :, ds.schema.dense_features.index("item_count_log")].abs().sum() > 0
    assert (batch.user_ids == 0).all()


def test_hstu_batches_carry_zero_dense_features_and_its_answers_do_not_change(hstu):
    assert not hstu.model_.reads_dense_features and getattr(DLRM_CLASS, "reads_dense_features", True)
    query = hstu.prepare_rank(HISTORY, CANDS, query_time=1_021_600)
    batch = hstu.make_batch([query])
    schema = hstu.state_.schema
    assert len(schema.dense_features) > 0
    assert batch.dense_features.shape == (1, len(CANDS), len(schema.dense_features))
    assert batch.dense_features.dtype == torch.float32 and not batch.dense_features.any()
    batch.validate(schema)
    # the same batch with the dataset's dense features: the HSTU ranker's logits are bit for bit the same
    cands = batch.cand_items.numpy()
    shape = cands.shape
    real = hstu.state_.features.features(np.zeros(shape, np.int64), np.full(shape, 1_021_600), cands,
                                         np.full(shape, 1_021_600), np.full(shape, 1_021_000))  # fmt: skip
    assert np.abs(real).sum() > 0
    with_dense = dataclasses.replace(batch, dense_features=torch.from_numpy(np.asarray(real, dtype=np.float32)))
    with torch.inference_mode():
        assert torch.equal(hstu.model_.rank_cached(batch), hstu.model_.rank_cached(with_dense))
        assert torch.equal(hstu.model_(batch), hstu.model_(with_dense))
        expected = torch.sigmoid(hstu.model_.rank_cached(with_dense)).double().numpy()[0]
    np.testing.assert_array_equal(probs(hstu.rank(HISTORY, CANDS, query_time=1_021_600)), expected)


def test_hstu_candidate_tables_are_kept_up_to_a_size_and_give_the_same_answers(hstu, dlrm, tmp_path, monkeypatch):
    import genrec.ranking_api as ranking_api

    assert hstu.candidate_tables_ is not None and dlrm.candidate_tables_ is None
    path = hstu.save(tmp_path / "model")
    monkeypatch.setattr(ranking_api, "CANDIDATE_TABLE_BYTES", 1024)
    without = Ranker.load(path)
    assert without.candidate_tables_ is None
    with_tables = probs(hstu.rank(HISTORY, CANDS, query_time=1_021_600))
    np.testing.assert_allclose(probs(without.rank(HISTORY, CANDS, query_time=1_021_600)), with_tables, rtol=0,
                               atol=1e-6)  # fmt: skip


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("which", ["hstu", "dlrm"])
def test_save_then_load_gives_identical_outputs(which, request, tmp_path):
    ranker = request.getfixturevalue(which)
    path = ranker.save(tmp_path / "model")
    assert {p.name for p in path.iterdir()} == {"config.yaml", "best.safetensors", *RANKING_STATE_FILES}
    loaded = Ranker.load(path)
    assert loaded.model_id == ranker.model_id and loaded.tasks == ranker.tasks
    for t in (None, 1_021_600, 2_000_000):
        assert loaded.rank(HISTORY, CANDS, query_time=t) == ranker.rank(HISTORY, CANDS, query_time=t)
    ranker.save(path)  # an existing ranking directory: files replaced
    assert Ranker.load(path).model_id == ranker.model_id


def test_save_refuses_a_foreign_directory(hstu, tmp_path):
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a genrec ranking directory"):
        hstu.save(tmp_path)


def test_user_features_by_raw_value(tmp_path):
    frame = table()
    users = pd.DataFrame({"age": [("young" if int(u[1:]) % 2 else "old") for u in frame["uid"].unique()],
                          "region": [int(u[1:]) % 3 for u in frame["uid"].unique()]},
                         index=frame["uid"].unique())  # fmt: skip
    ranker = Ranker(model={"name": "hstu-ranker", "params": HSTU["params"]}, train=TRAIN, data=DATA).fit(
        frame, tasks=TASKS, columns=COLUMNS, user_features=users)
    assert ranker.state_.schema.user_features == ("age", "region")
    assert ranker.state_.user_feature_values == {"age": ["old", "young"], "region": ["0", "1", "2"]}
    young = ranker.rank(HISTORY, CANDS, user_features={"age": "young", "region": 2})
    old = ranker.rank(HISTORY, CANDS, user_features={"age": "old", "region": "2"})
    assert not np.allclose(probs(young), probs(old))  # the prefix tokens reach the candidates
    unknown = ranker.rank(HISTORY, CANDS, user_features={"age": "ancient"})
    assert probs(unknown) == pytest.approx(probs(ranker.rank(HISTORY, CANDS)))
    assert any("unknown to the model" in w for w in unknown.warnings)
    with pytest.raises(InvalidInputError, match="unknown feature 'gender'"):
        ranker.rank(HISTORY, CANDS, user_features={"gender": "f"})
    loaded = Ranker.load(ranker.save(tmp_path / "m"))
    assert loaded.rank(HISTORY, CANDS, user_features={"age": "young"}) == ranker.rank(
        HISTORY, CANDS, user_features={"age": "young"})


# ------------------------------------------------------------------------------------------------ run directories
def run_config(tmp_path, model: dict) -> RankingRunConfig:
    return RankingRunConfig(
        data=RankingDataConfig(dataset="synthetic", split="user-last", n_eval=2, max_history=10, max_candidates=1),
        model=RankingModelConfig(**model),
        train=RankingTrainConfig(**TRAIN),
        output_dir=str(tmp_path / "run"),
    )


def synthetic_dataset(frame: pd.DataFrame, **kw):
    events = pd.DataFrame({"user": frame["uid"], "item": frame["movie"], "timestamp": frame["when"],
                           "actions": frame["click"] + 2 * frame["like"], "candidate": True,
                           "task:click": frame["click"], "task:like": frame["like"]})  # fmt: skip
    return build_ranking_dataset(events, name="synthetic", tasks=TASKS, actions=("clicked", "liked"),
                                 split="user-last", n_eval=2, max_candidates=1, **kw)  # fmt: skip


def _raw_history(dataset, rows, r: int, actions, max_history: int = 10) -> list[dict]:
    """Row r's most recent ``max_history`` history events as raw API events (external item id, time, actions)."""
    lo = max(rows.user_start[r], rows.hist_end[r] - max_history)
    return [{"item": dataset.item_map.external[dataset.ev_item[e] - 1], "ts": int(dataset.ev_time[e]),
             "actions": [a for b, a in enumerate(actions) if dataset.ev_actions[e] >> b & 1]}
            for e in range(lo, rows.hist_end[r])]  # fmt: skip


def test_a_train_ranker_run_directory_loads_and_ranks_like_the_trained_model(tmp_path):
    frame = table()
    dataset = synthetic_dataset(frame)
    config = run_config(tmp_path, HSTU)
    train_ranker(config, dataset=dataset, progress=False)
    run = tmp_path / "run"
    assert all((run / name).is_file() for name in RANKING_STATE_FILES)
    ranker = Ranker.load(run)
    assert ranker.state_.schema == dataset.schema
    reference = predict(ranker.model_, dataset, "test", batch_size=64, max_history=10, max_candidates=1)
    rows = dataset.rows("test", 1)
    actions = dataset.schema.actions
    got = []
    for r in range(len(rows)):
        history = _raw_history(dataset, rows, r, actions)
        cand = dataset.item_map.external[dataset.ev_item[rows.cands[rows.start[r]]] - 1]
        got.append(probs(ranker.rank(history, [cand], query_time=int(rows.t0[r])))[0])
    np.testing.assert_allclose(np.array(got), reference.probs, rtol=0, atol=2e-6)


def test_load_refuses_directories_without_the_ranking_state(tmp_path):
    frame = table()
    config = run_config(tmp_path, DLRM)
    train_ranker(config, dataset=synthetic_dataset(frame), progress=False)
    run = tmp_path / "run"
    (run / "ranking_features.npz").unlink()
    with pytest.raises(FileNotFoundError, match="lacks ranking_features.npz"):
        Ranker.load(run)
    retrieval = tmp_path / "retrieval"
    retrieval.mkdir()
    (retrieval / "item_ids.json").write_text("[]")
    (retrieval / "config.yaml").write_text("{}")
    with pytest.raises(FileNotFoundError, match="retrieval model directory"):
        Ranker.load(retrieval)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Ranker.load(tmp_path / "nothing")


def test_load_refuses_weights_of_another_model(tmp_path, dlrm, hstu):
    path = dlrm.save(tmp_path / "m")
    (path / "best.safetensors").write_bytes((hstu.save(tmp_path / "h") / "best.safetensors").read_bytes())
    with pytest.raises(ValueError, match="cannot load the weights"):
        Ranker.load(path)


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("mutate, error, message", [
    (lambda f: f.drop(columns=["like"]), ValueError, "no column 'like' for the like role"),
    (lambda f: f.assign(like=f["like"].where(f.index != 4, 2)), ValueError, r"label column 'like', row 5: 2"),
    (lambda f: f.assign(click=f["click"].astype(float).where(f.index != 2, np.nan)), ValueError,
     r"label column 'click', row 3"),
    (lambda f: f.assign(uid=f["uid"].where(f.index != 6, None)), BadRowError, r"column 'uid'.*row 7"),
    (lambda f: f.assign(movie=f["movie"].where(f.index != 1, np.nan)), BadRowError, r"column 'movie'"),
    (lambda f: f.assign(when=f["when"].astype(float).where(f.index != 3, 1.5)), BadRowError, r"column 'when'"),
    (lambda f: f.assign(when=f["when"].where(f.index != 3, -5)), ValueError, r"column 'when', row 4.*negative"),
])  # fmt: skip
def test_bad_tables_raise_clear_errors(mutate, error, message):
    with pytest.raises(error, match=message):
        Ranker(model=DLRM, train=TRAIN, data=DATA).fit(mutate(table()), tasks=TASKS, columns=COLUMNS)


def test_bad_fit_arguments():
    ranker = Ranker(model=DLRM, train=TRAIN, data=DATA)
    with pytest.raises(ValueError, match="unknown role 'rating'"):
        ranker.fit(table(), tasks=TASKS, columns={**COLUMNS, "rating": "x"})
    with pytest.raises(ValueError, match="timestamp role needs a timestamp column"):
        ranker.fit(table(), tasks=TASKS, columns={**COLUMNS, "timestamp": None})
    with pytest.raises(ValueError, match="non-empty list of task names"):
        ranker.fit(table(), tasks="click", columns=COLUMNS)
    with pytest.raises(ValueError, match="distinct"):
        ranker.fit(table(), tasks=["click", "click"], columns=COLUMNS)
    with pytest.raises(TypeError, match="DataFrame or a file path"):
        ranker.fit([1, 2], tasks=TASKS)
    with pytest.raises(ConfigError, match="Ranker"):
        Ranker(train={"epochs": 0})
    with pytest.raises(NotFittedError):
        ranker.rank([], ["a"])


def test_fit_reads_a_csv_file_with_line_numbers(tmp_path):
    frame = table()
    path = tmp_path / "log.csv"
    frame.to_csv(path, index=False)
    ranker = Ranker(model=DLRM, train=TRAIN, data=DATA).fit(path, tasks=TASKS, columns=COLUMNS)
    assert ranker.rank(HISTORY, CANDS).items == CANDS
    lines = path.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",yes"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRowError, match=r"log.csv:6: .*column 'like'"):
        Ranker(model=DLRM, train=TRAIN, data=DATA).fit(path, tasks=TASKS, columns=COLUMNS)


@pytest.mark.parametrize("history, kw, message", [
    ([{"item": "m1", "actions": ["buy"]}], {}, "unknown action 'buy'"),
    ([{"item": "m1", "actions": "click"}], {}, "actions must be a list"),
    ([{"item": "m1", "when": 5}], {}, "has keys 'item'"),
    ([("m1", "yesterday")], {}, "ts must be an integer"),
    ([("m1", 5, 6)], {}, r"\(item, ts\)"),
    ([("m1", -5)], {}, "negative"),
    ([("m1", 10), "m2"], {}, "either every event has a ts or none"),
    ([("m1", 10), ("m2", 50)], {"query_time": 20}, "event 1 has ts 50, after query_time 20"),
    ([("m1", 10)], {"query_time": 1.5}, "query_time must be an integer"),
    ("m1", {}, "a history is a list"),
    ([None], {}, "item ids must be strings or integers"),
    ([("m1", 10)], {"user_features": {"age": 3}}, "unknown feature 'age'"),
    ([("m1", 10)], {"user_features": ["age"]}, "user_features must"),
])  # fmt: skip
def test_bad_rank_inputs_raise_invalid_input(hstu, history, kw, message):
    with pytest.raises(InvalidInputError, match=message):
        hstu.rank(history, CANDS, **kw)


LONG = [{"item": f"m{1 + i % 25}", "ts": 1_000_000 + 60 * i, "actions": [["click"], ["like", "click"], [], None][i % 4]}
        for i in range(200)]  # fmt: skip


@pytest.mark.parametrize("history", [
    LONG,
    [{"item": e["item"], "ts": e["ts"]} for e in LONG],
    [{"item": e["item"]} for e in LONG],
    [{"item": 7, "ts": 0, "actions": ["like", "like"]}, {"item": "m7", "ts": 2**53, "actions": []}],
    [(e["item"], e["ts"]) for e in LONG],
    [e["item"] for e in LONG],
    [3, 8, 12],
    [],
])  # fmt: skip
def test_a_uniform_history_is_parsed_per_column_like_event_by_event(history):
    from genrec.ranking_api import _parse_history, _parse_history_events, _parse_uniform_history

    assert _parse_uniform_history(list(history), TASKS) is not None  # the per-column path takes it
    ids, timed, times, masks = _parse_history(history, TASKS)
    want_ids, want_ts, want_masks = _parse_history_events(list(history), TASKS)
    assert ids == want_ids and all(isinstance(i, str) for i in ids)
    assert timed.tolist() == [t is not None for t in want_ts]
    assert times.tolist() == [0 if t is None else t for t in want_ts]
    assert masks.dtype == np.int64 and masks.tolist() == want_masks


def bad(index: int, **event) -> list:
    return LONG[:index] + [{**LONG[index], **event}] + LONG[index + 1 :]


@pytest.mark.parametrize("history, message", [
    (bad(150, actions=["buy"]), "history event 150: unknown action 'buy'"),
    (bad(150, actions=[5]), "history event 150: unknown action 5"),
    (bad(150, actions="click"), "history event 150: actions must be a list"),
    (bad(150, ts=-1), "history event 150: ts -1 is negative"),
    (bad(150, ts=2**53 + 1), "history event 150 ts 9007199254740993 is out of range"),
    (bad(150, ts=2**70), "history event 150 ts 1180591620717411303424 is out of range"),
    (bad(150, ts=True), "history event 150 ts must be an integer or null, got bool"),
    (bad(150, ts=1.0), "history event 150 ts must be an integer or null, got float"),
    (bad(150, ts=None), "history event 150 differs from event 0 in having a timestamp"),
    (bad(150, item=None), "item ids must be strings or integers, got NoneType"),
    (bad(150, item=True), "item ids must be strings or integers, got bool"),
    (bad(150, when=3), r"history event 150: a dict has keys 'item' .*'when'"),
    (LONG[:150] + [{"ts": 5}] + LONG[151:], r"history event 150: a dict has keys 'item'"),
    (LONG[:150] + ["m1"] + LONG[151:], r"history event 150 differs from event 0 in having a timestamp"),
    ([(e["item"], e["ts"]) for e in LONG[:150]] + [("m1", 5, 6)], r"history event 150: a tuple is \(item, ts\)"),
    ([(e["item"], e["ts"]) for e in LONG[:150]] + [("m1", -5)], "history event 150: ts -5 is negative"),
])  # fmt: skip
def test_a_bad_event_deep_in_a_long_history_is_named(hstu, history, message):
    with pytest.raises(InvalidInputError, match=message):
        hstu.prepare_rank(history, CANDS)


def test_other_value_types_and_mixed_event_forms_are_accepted_as_before(hstu):
    plain = hstu.prepare_rank([(e["item"], e["ts"]) for e in LONG], CANDS)
    numpy = hstu.prepare_rank([(np.str_(e["item"]), np.int64(e["ts"])) for e in LONG], CANDS)
    mixed = hstu.prepare_rank([(e["item"], e["ts"]) if i % 2 else {"item": e["item"], "ts": e["ts"]}
                               for i, e in enumerate(LONG)], CANDS)  # fmt: skip
    for other in (numpy, mixed):
        assert np.array_equal(plain.items, other.items) and np.array_equal(plain.times, other.times)


def test_bad_rank_batch_inputs(hstu):
    with pytest.raises(InvalidInputError, match="candidate lists"):
        hstu.rank_batch([HISTORY], [CANDS, CANDS])
    with pytest.raises(InvalidInputError, match="query_time"):
        hstu.rank_batch([HISTORY], [CANDS], query_times=[1, 2])
    with pytest.raises(InvalidInputError, match="candidates must be a list"):
        hstu.rank(HISTORY, "m1")


def test_histories_without_timestamps(hstu):
    result = hstu.rank(["m3", "m7", "m1"], CANDS)
    assert any("no timestamps" in w for w in result.warnings)
    timed = hstu.rank([("m3", 0), ("m7", 0), ("m1", 0)], CANDS, query_time=0)
    assert probs(result) == pytest.approx(probs(timed))
    empty = hstu.rank([], CANDS)
    assert ((probs(empty) > 0) & (probs(empty) < 1)).all()


@pytest.mark.parametrize("model", [{"name": "din", "params": {}}, {"name": "popularity", "params": {}},
                                   {"name": "logreg", "params": {"num_buckets": 1024}}])  # fmt: skip
def test_every_ranker_kind_fits_ranks_and_round_trips(model, tmp_path):
    ranker = fit(model)
    result = ranker.rank(HISTORY, CANDS, query_time=1_021_600)
    p = probs(result)
    assert ((p > 0) & (p < 1)).all()
    loaded = Ranker.load(ranker.save(tmp_path / "m"))
    assert loaded.rank(HISTORY, CANDS, query_time=1_021_600) == result
    perm = [3, 1, 4, 0, 2]
    permuted = probs(ranker.rank(HISTORY, [CANDS[i] for i in perm], query_time=1_021_600))
    np.testing.assert_allclose(permuted, p[perm], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ domains
DOMAINS = ("even", "odd")
DOMAIN_HISTORY = [("m3", 1_020_000), {"item": "m7", "ts": 1_020_500, "actions": ["clicked", "liked"]}]


def test_candidate_domains_reach_a_model_with_domain_towers(tmp_path):
    frame = table()
    frame["domain"] = frame["movie"].str[1:].astype(int) % 2 + 1  # 1 = even movie id, 2 = odd
    events_domain = frame["domain"].to_numpy()
    events = pd.DataFrame({"user": frame["uid"], "item": frame["movie"], "timestamp": frame["when"],
                           "actions": frame["click"] + 2 * frame["like"], "candidate": True,
                           "task:click": frame["click"], "task:like": frame["like"], "domain": events_domain})  # fmt: skip
    dataset = build_ranking_dataset(events, name="synthetic", tasks=TASKS, actions=("clicked", "liked"),
                                    split="user-last", n_eval=2, max_candidates=1, domains=DOMAINS)  # fmt: skip
    config = run_config(tmp_path, {"name": "hstu-ranker", "params": {**HSTU["params"], "domain_towers": True}})
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, domains="parity"))
    train_ranker(config, dataset=dataset, progress=False)
    ranker = Ranker.load(tmp_path / "run")
    assert ranker.domains == DOMAINS and ranker.needs_domains
    # the API's answers with each candidate's domain are the trained model's on the test part
    reference = predict(ranker.model_, dataset, "test", batch_size=64, max_history=10, max_candidates=1)
    rows = dataset.rows("test", 1)
    actions = dataset.schema.actions
    got = []
    for r in range(len(rows)):
        history = _raw_history(dataset, rows, r, actions)
        e = rows.cands[rows.start[r]]
        cand, domain = dataset.item_map.external[dataset.ev_item[e] - 1], DOMAINS[dataset.ev_domain[e] - 1]
        got.append(probs(ranker.rank(history, [cand], query_time=int(rows.t0[r]), candidate_domains=[domain]))[0])
    np.testing.assert_allclose(np.array(got), reference.probs, rtol=0, atol=2e-6)
    # the domain is read: one name for all candidates fills cand_domains, and another domain's tower answers otherwise
    query = ranker.prepare_rank(DOMAIN_HISTORY, ["m2", "nope", "m5"], candidate_domains="odd")
    np.testing.assert_array_equal(ranker.make_batch([query]).cand_domains.numpy(), [[2, 2]])
    as_even, as_odd = (probs(ranker.rank(DOMAIN_HISTORY, ["m2"], candidate_domains=d)) for d in ("even", "odd"))
    assert not np.allclose(as_even, as_odd)
    # bad or missing domains are refused with the model's domains listed
    with pytest.raises(InvalidInputError, match=r"needs each candidate's domain, one of \['even', 'odd'\]"):
        ranker.rank(DOMAIN_HISTORY, ["m2"])
    with pytest.raises(InvalidInputError, match=r"candidate_domains\[1\]: unknown domain 'comedy'; .*\['even', 'odd'\]"):
        ranker.rank(DOMAIN_HISTORY, ["m2", "m5"], candidate_domains=["even", "comedy"])
    with pytest.raises(InvalidInputError, match=r"candidate_domains\[0\]: missing"):
        ranker.rank(DOMAIN_HISTORY, ["m2", "m5"], candidate_domains=[None, "odd"])
    with pytest.raises(InvalidInputError, match="1 domain.* for 2 candidates"):
        ranker.rank(DOMAIN_HISTORY, ["m2", "m5"], candidate_domains=["even"])
    with pytest.raises(InvalidInputError, match="one entry per history"):
        ranker.rank_batch([DOMAIN_HISTORY, DOMAIN_HISTORY], [["m2"], ["m5"]], candidate_domains=["even"])
    # candidates set after prepare_rank (without their domains) are refused, not scored with domain 0
    later = dataclasses.replace(ranker.prepare_rank(DOMAIN_HISTORY, []), candidates=("m2",),
                                candidate_ids=ranker.state_.item_map.to_internal(["m2"]))  # fmt: skip
    with pytest.raises(InvalidInputError, match="candidate_domains"):
        ranker.execute([later])


def test_candidate_domains_are_refused_by_a_model_without_domains(hstu):
    assert hstu.domains == () and not hstu.needs_domains
    with pytest.raises(InvalidInputError, match="trained without domains"):
        hstu.rank(HISTORY, CANDS, candidate_domains="even")
    assert hstu.make_batch([hstu.prepare_rank(HISTORY, CANDS)]).cand_domains is None
