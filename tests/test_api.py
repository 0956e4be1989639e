"""The Python API on raw ids: fit / recommend / rank / save / load, and its input rules."""

from __future__ import annotations

import json
import math
import threading
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from genrec.api import (
    POPULARITY_FILE,
    InvalidInputError,
    NotFittedError,
    Recommender,
    UnknownItemWarning,
)
from genrec.config import ConfigError, RunConfig
from genrec.data.sequences import build_sequences
from genrec.eval.evaluate import model_score_fn

from .conftest import synthetic_interactions

TINY = {
    "data": {"max_len": 12},
    "model": {"embedding_dim": 8, "num_blocks": 1, "num_heads": 2, "attention_dim": 4, "linear_dim": 4, "ffn_dim": 8},
    "train": {"epochs": 3, "batch_size": 8, "num_negatives": 16, "eval_batch_size": 16, "lr": 0.01, "num_threads": 1},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("api") / "run"


@pytest.fixture(scope="module")
def rec(run_dir) -> Recommender:
    return Recommender(**TINY).fit(synthetic_interactions(), output_dir=run_dir)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownItemWarning)
        return fn(*args, **kwargs)


def test_fit_returns_self_with_learned_state_and_a_run_directory(rec, run_dir):
    assert rec.model_ is not None and len(rec.item_map_) == 30 and rec.model_id_.startswith("hstu-")
    assert rec.config_.model.embedding_dim == 8 and rec.config is None  # parameters untouched, resolved copy learned
    assert rec.results_["best_epoch"] >= 1 and not rec.model_.training
    for name in ("config.yaml", "item_ids.json", "best.safetensors", "checkpoint.pt", "results.json", POPULARITY_FILE):
        assert (run_dir / name).exists(), name


def test_bad_overrides_fail_before_training():
    with pytest.raises(ConfigError):
        Recommender(model={"embeding_dim": 8})
    with pytest.raises(ConfigError):
        Recommender(RunConfig(), train={"epochs": "many"})
    with pytest.raises(NotFittedError):
        Recommender().recommend(["1"])


def test_recommend_one_and_batch_agree_and_match_the_offline_scorer(rec):
    items, scores = rec.recommend(["i3", "i4", "i5"], k=5)
    assert len(items) == 5 and scores == sorted(scores, reverse=True)
    assert not {"i3", "i4", "i5"} & set(items)  # seen items excluded
    batch_items, batch_scores = rec.recommend([["i3", "i4", "i5"], ["i7"]], k=5)
    assert batch_items[0] == items and np.allclose(batch_scores[0], scores, atol=1e-6)
    # without exclusion, the top-k is the top-k of the evaluation scorer's row
    hist = rec.item_map_.to_internal(["i3", "i4", "i5"])
    row = model_score_fn(rec.model_, rec.config_.data.max_len)([hist], None, None, [False])[0]
    row[0] = float("-inf")
    top = torch.topk(row, 5)
    items, scores = rec.recommend(["i3", "i4", "i5"], k=5, exclude_seen=False)
    assert items == rec.item_map_.to_external(top.indices.tolist())
    assert np.allclose(scores, top.values.numpy(), atol=1e-6)


def test_exclude_list_and_k_larger_than_catalogue(rec):
    items, _ = rec.recommend(["i3"], k=5, exclude=["i4", "i5", "nope"])
    assert not {"i3", "i4", "i5"} & set(items)
    items, _ = rec.recommend(["i3"], k=1000)
    assert len(items) == 29 and len(set(items)) == 29  # whole catalogue minus the seen item


def test_timestamps_events_forms_and_time_order(rec):
    pairs = [("i3", 1_000_000), ("i4", 1_000_500), ("i5", 1_002_000)]
    as_dicts = [{"item": i, "ts": t} for i, t in pairs]
    a = rec.recommend(pairs, k=5, exclude_seen=False)
    assert rec.recommend(as_dicts, k=5, exclude_seen=False) == a
    assert rec.recommend(pairs[::-1], k=5, exclude_seen=False) == a  # timed events are put in time order
    untimed = rec.recommend(["i3", "i4", "i5"], k=5, exclude_seen=False)
    (mixed,) = rec.recommend_batch([[("i3", 1_000_000), "i4", "i5"]], k=5, exclude_seen=False)
    assert (mixed.items, mixed.scores) == untimed and any("time term is off" in w for w in mixed.warnings)
    # a later request time changes HSTU's time term, hence the scores
    _, later = rec.recommend(pairs, k=5, exclude_seen=False, query_time=1_000_000 + 10**8)
    assert not np.allclose(later, a[1])


def test_unknown_items_are_ignored_and_reported(rec):
    with pytest.warns(UnknownItemWarning, match="nope"):
        items, scores = rec.recommend(["i3", "nope", "i4", 12345], k=5)
    assert (items, scores) == rec.recommend(["i3", "i4"], k=5)
    (r,) = _quiet(rec.recommend_batch, [["i3", "nope"]], k=3)
    assert r.unknown == ["nope"] and r.fallback is None


def test_empty_or_unknown_history_gets_the_popularity_fallback(rec):
    seqs = build_sequences(synthetic_interactions())
    counts = np.bincount(seqs.items, minlength=seqs.num_items + 1)
    expected = [seqs.item_map.external[i - 1] for i in np.argsort(-counts[1:], kind="stable")[:3] + 1]
    (empty,) = rec.recommend_batch([[]], k=3)
    assert empty.fallback == "popularity" and empty.items == expected
    assert np.allclose(empty.scores, np.sort(counts)[::-1][:3] / counts.sum())
    (unknown,) = _quiet(rec.recommend_batch, [["x", "y"]], k=3)
    assert unknown.fallback == "popularity" and unknown.items == expected and unknown.unknown == ["x", "y"]
    assert rec.recommend([], k=3) == (empty.items, empty.scores)
    assert rec.rank([], ["i1", "i2"]) == pytest.approx([counts[rec.item_map_.get("i1")] / counts.sum(),
                                                        counts[rec.item_map_.get("i2")] / counts.sum()])  # fmt: skip


def test_long_history_keeps_the_most_recent_max_len_items(rec):
    long = [f"i{j % 30}" for j in range(100)]
    (r,) = rec.recommend_batch([long], k=5, exclude_seen=False)
    assert (r.items, r.scores) == rec.recommend(long[-12:], k=5, exclude_seen=False)
    assert any("most recent 12" in w for w in r.warnings)


def test_rank_scores_equal_recommend_scores(rec):
    items, scores = rec.recommend(["i3", "i4"], k=5)
    ranked = rec.rank(["i3", "i4"], items[::-1])
    assert np.allclose(ranked, scores[::-1], atol=1e-6)
    with pytest.warns(UnknownItemWarning):
        both = rec.rank([["i3", "i4"], ["x"]], [["i5", "zz"], ["i5"]])
    assert both[0][0] == pytest.approx(rec.rank(["i3", "i4"], ["i5"])[0]) and math.isnan(both[0][1])
    assert len(both[1]) == 1
    with pytest.raises(InvalidInputError):
        rec.rank([["i3"], ["i4"]], ["i5"])  # a batch needs one candidate list per history


@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.recommend(["i3"], k=0),
        lambda r: r.recommend(["i3"], k="5"),
        lambda r: r.recommend(["i3"], k=True),
        lambda r: r.recommend([1.5]),
        lambda r: r.recommend([("i3", 1.5)]),
        lambda r: r.recommend([("i3", 1, 2)]),
        lambda r: r.recommend([{"item": "i3", "when": 1}]),
        lambda r: r.recommend([("i3", 2**60)]),
        lambda r: r.recommend("i3"),
        lambda r: r.recommend(["i3"], exclude="i4"),
        lambda r: r.recommend(["i3"], exclude_seen="no"),
        lambda r: r.rank(["i3"], [None]),
    ],
)
def test_invalid_input_is_an_invalid_input_error(rec, call):
    with pytest.raises(InvalidInputError):
        call(rec)


def test_save_load_roundtrip_and_load_never_writes(rec, tmp_path):
    out = rec.save(tmp_path / "saved")
    files = ["best.safetensors", "config.yaml", "item_ids.json", "popularity.json"]
    assert sorted(p.name for p in out.iterdir()) == files
    assert not list(tmp_path.glob(".*"))  # no temporary directory left behind
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()}
    loaded = Recommender.load(out)
    hist = [("i3", 1_000_000), ("i4", 1_000_100)]
    assert loaded.recommend(hist, k=5) == rec.recommend(hist, k=5)
    assert loaded.recommend([], k=5) == rec.recommend([], k=5)
    assert loaded.model_id_ == rec.model_id_
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()} == before
    rec.save(out)  # an existing model directory: files replaced in place
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        rec.save(tmp_path / "other")


def test_run_directory_without_popularity_loads_but_has_no_fallback(rec, tmp_path):
    out = rec.save(tmp_path / "m")
    (out / "popularity.json").unlink()
    loaded = Recommender.load(out)
    assert loaded.recommend(["i3"], k=3) == rec.recommend(["i3"], k=3)
    with pytest.raises(InvalidInputError, match="popularity"):
        loaded.recommend([], k=3)


def test_loading_never_executes_code(rec, tmp_path):
    out = rec.save(tmp_path / "m")
    marker = tmp_path / "pwned"
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n" + text)
    with pytest.raises(Exception):
        Recommender.load(out)
    assert not marker.exists()
    (out / "config.yaml").write_text(text)
    (out / "best.safetensors").write_bytes(b"\x80\x04not safetensors")  # a pickle header is refused, not unpickled
    with pytest.raises(ValueError, match="best.safetensors"):
        Recommender.load(out)


def test_popularity_file_is_checked(rec, tmp_path):
    out = rec.save(tmp_path / "m")
    (out / "popularity.json").write_text(json.dumps({"format": "genrec-popularity-v1", "counts": {"zz": 3}}))
    with pytest.raises(ValueError, match="popularity"):
        Recommender.load(out)


def test_concurrent_calls_from_threads_give_the_sequential_results(rec):
    histories = [[f"i{(s + j) % 30}" for j in range(1 + s % 7)] for s in range(16)]
    expected = [rec.recommend(h, k=5) for h in histories]
    got: dict[int, tuple] = {}

    def work(i: int) -> None:
        for _ in range(3):
            got[i] = rec.recommend(histories[i], k=5)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(histories))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(histories))] == expected


def test_fit_without_output_dir_then_save(tmp_path):
    frame = synthetic_interactions(num_users=20, seed=1).drop(columns="timestamp")
    rec = Recommender(**{**TINY, "train": {**TINY["train"], "epochs": 1}}).fit(frame)
    assert rec.config_.data.dataset == "table" and rec.config_.data.path is None
    out = rec.save(tmp_path / "m")
    assert Recommender.load(out).recommend(["i1"], k=3) == rec.recommend(["i1"], k=3)
    with pytest.raises(ValueError, match="columns"):
        Recommender(**TINY).fit(frame.rename(columns={"item": "sku"}))


# -- fit on a DataFrame: timestamps, column mapping, missing ids ------------------------------------------------------

ONE_EPOCH = {**TINY, "train": {**TINY["train"], "epochs": 1}}


@pytest.fixture(scope="module")
def seconds_model():
    frame = synthetic_interactions(num_users=20, seed=1)
    return frame, Recommender(**ONE_EPOCH).fit(frame)


@pytest.mark.parametrize("unit", ["ns", "us", "s"])
@pytest.mark.parametrize("tz", [None, "Asia/Tokyo"])
def test_fit_stores_datetime_timestamps_as_unix_seconds(seconds_model, unit, tz):
    frame, expected = seconds_model
    dated = frame.assign(timestamp=pd.to_datetime(frame["timestamp"], unit="s").dt.as_unit(unit))
    if tz is not None:
        dated["timestamp"] = dated["timestamp"].dt.tz_localize("UTC").dt.tz_convert(tz)
    rec = Recommender(**ONE_EPOCH).fit(dated)
    assert rec.model_id_ == expected.model_id_  # the same weights: the same sequences, times and time gaps
    # the model takes timestamps in the unit it was trained in: seconds
    history = [(i, int(t)) for i, t in zip(frame["item"][:3], frame["timestamp"][:3])]
    assert rec.recommend(history, k=3) == expected.recommend(history, k=3)


def test_fit_with_a_column_mapping_equals_the_renamed_frame(seconds_model):
    frame, expected = seconds_model
    renamed = frame.rename(columns={"user": "uid", "item": "movie", "timestamp": "ts"})
    rec = Recommender(**ONE_EPOCH).fit(renamed, columns={"user": "uid", "item": "movie", "timestamp": "ts"})
    assert rec.model_id_ == expected.model_id_
    assert rec.config_.data.columns == {"user": "uid", "item": "movie", "timestamp": "ts"}


def test_fit_column_errors_are_raised_before_training(seconds_model):
    frame, _ = seconds_model
    renamed = frame.rename(columns={"user": "uid", "item": "movie", "timestamp": "ts"})
    rec = Recommender(**ONE_EPOCH)
    with pytest.raises(ValueError, match="'ts' looks like a time column"):  # a time column is never ignored silently
        rec.fit(renamed.rename(columns={"uid": "user", "movie": "item"}))
    with pytest.raises(ValueError, match="unknown role 'time'"):
        rec.fit(renamed, columns={"user": "uid", "item": "movie", "time": "ts"})
    with pytest.raises(ValueError, match="no column 'timestamp' for timestamp"):
        rec.fit(renamed, columns={"user": "uid", "item": "movie", "timestamp": "timestamp"})
    with pytest.raises(ValueError, match="no column 'user' for user"):
        rec.fit(renamed, columns={"item": "movie", "timestamp": "ts"})
    doubled = pd.concat([renamed, renamed[["ts"]]], axis=1)
    with pytest.raises(ValueError, match="'ts' for timestamp is ambiguous: 2 columns"):
        rec.fit(doubled, columns={"user": "uid", "item": "movie", "timestamp": "ts"})
    with pytest.raises(ValueError, match="given for both user and item"):
        rec.fit(renamed, columns={"user": "uid", "item": "uid", "timestamp": "ts"})
    # an explicit None trains without time
    untimed = rec.fit(renamed, columns={"user": "uid", "item": "movie", "timestamp": None})
    assert untimed.config_.data.columns == {"user": "uid", "item": "movie"}


@pytest.mark.parametrize("column, value, row", [("item", float("nan"), 4), ("user", None, 2), ("item", "", 7)])
def test_fit_rejects_missing_ids_with_the_row_number(column, value, row):
    frame = synthetic_interactions(num_users=20, seed=1).astype({"item": object, "user": object})
    frame.loc[row - 1, column] = value
    with pytest.raises(ValueError, match=rf"DataFrame:{row}: missing or invalid {column} id .*row {row} of the DataFrame"):
        Recommender(**ONE_EPOCH).fit(frame)


def test_fit_on_a_table_with_every_row_duplicated_equals_the_original(seconds_model):
    frame, expected = seconds_model
    doubled = frame.loc[frame.index.repeat(2)].reset_index(drop=True)
    rec = Recommender(**ONE_EPOCH).fit(doubled)
    assert rec.model_id_ == expected.model_id_
    assert rec.results_["test"]["metrics"] == expected.results_["test"]["metrics"]
    assert rec.results_["valid"]["metrics"] == expected.results_["valid"]["metrics"]
    assert any(f"dropped {len(frame):,} exact duplicate rows" in n for n in rec.results_["data"]["notes"])
