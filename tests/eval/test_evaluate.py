import numpy as np
import pandas as pd
import pytest
import torch

from genrec.config import ConfigError, DataConfig, load_config
from genrec.data.dataset import prepare_data
from genrec.data.sequences import build_sequences
from genrec.eval.evaluate import baseline_score_fn, evaluate
from genrec.eval.protocol import EvalProtocol

from ..conftest import synthetic_interactions


class _Oracle:
    """Scores the true next item highest: every rank must be 1."""

    def __init__(self, data, split_target):
        self.next = {}
        for u in range(data.num_users):
            s = data.sequence(u)
            hist = s[:-2] if split_target == "valid" else s[:-1]
            self.next[tuple(hist.tolist())] = s[-2] if split_target == "valid" else s[-1]
        self.n = data.num_items

    def score(self, histories):
        out = torch.zeros(len(histories), self.n + 1)
        for r, h in enumerate(histories):
            out[r, self.next[tuple(np.asarray(h).tolist())]] = 1.0
        return out


def _data():
    rows = [(f"u{u}", f"i{(u + k) % 9}", (k if u < 4 else None)) for u in range(7) for k in range(5)]
    f = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    f["timestamp"] = f["timestamp"].astype("Int64")
    return build_sequences(f)


def test_oracle_gets_perfect_metrics_and_user_subsets_count():
    data = _data()
    for target in ("valid", "test"):
        m = evaluate(baseline_score_fn(_Oracle(data, target)), data, EvalProtocol(target=target, max_history=50))
        assert m["HR@1"] == 1.0 and m["MRR"] == 1.0 and m["count"] == 7
    timed = evaluate(baseline_score_fn(_Oracle(data, "test")), data, EvalProtocol(max_history=50, users="with-timestamps"))
    untimed = evaluate(baseline_score_fn(_Oracle(data, "test")), data, EvalProtocol(max_history=50, users="without-timestamps"))
    assert (timed["count"], untimed["count"]) == (4, 3)
    assert EvalProtocol(users="with-timestamps").name.endswith("/users-with-timestamps")


class _RepeatScorer:
    """A fixed scorer that favours repeating the last item of the history (what a model learns from duplicated
    rows), then the item after it, then a deterministic pseudo-random order."""

    def __init__(self, num_items: int):
        self.base = torch.from_numpy(np.random.default_rng(7).random(num_items + 1)).float()

    def score(self, histories):
        out = self.base.repeat(len(histories), 1)
        for r, h in enumerate(histories):
            last = int(np.asarray(h)[-1])
            out[r, last] = 10.0
            out[r, last % (len(self.base) - 1) + 1] = 5.0
        return out


def _with_every_row_duplicated(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.loc[frame.index.repeat(2)].reset_index(drop=True)


def _metrics(data, **protocol):
    scorer = baseline_score_fn(_RepeatScorer(data.num_items))
    return evaluate(scorer, data, EvalProtocol(max_history=50, **protocol))


@pytest.mark.parametrize("protocol", [
    {"target": "test"},
    {"target": "valid"},
    {"target": "test", "exclude_seen": False},
    {"target": "test", "candidates": "sampled", "num_negatives": 10, "seed": 3},
])
def test_every_row_duplicated_gives_the_same_metrics(protocol):
    frame = synthetic_interactions()
    original = _metrics(build_sequences(frame), **protocol)
    doubled = _metrics(build_sequences(_with_every_row_duplicated(frame)), **protocol)
    assert doubled == original


def test_duplicated_table_file_through_prepare_data(tmp_path):
    frame = synthetic_interactions()
    path = tmp_path / "log.csv"
    _with_every_row_duplicated(frame).to_csv(path, index=False)
    config = DataConfig(dataset="table", path=str(path), columns={"user": "user", "item": "item", "timestamp": "timestamp"})
    data = prepare_data(config).sequences
    assert any(f"dropped {len(frame):,} exact duplicate rows" in n for n in data.notes)
    assert _metrics(data) == _metrics(build_sequences(frame))
    # data.duplicates=keep (a config value, checked when loaded) keeps them, still counted
    kept = prepare_data(load_config(None, ["data.dataset=table", f"data.path={path}", "data.duplicates=keep",
                                           "data.columns={user: user, item: item, timestamp: timestamp}"]).data)
    assert len(kept.sequences.items) > len(data.items)
    with pytest.raises(ConfigError, match="duplicates"):
        load_config(None, ["data.duplicates=merge"])


def _repeat_data():
    """u0's test target (x) also occurs in its history; u1 and u2 have no repeat."""
    rows = [("u0", "x", 1), ("u0", "y", 2), ("u0", "x", 3)]
    rows += [(f"u{u}", f"i{u}{k}", k) for u in (1, 2) for k in range(4)]
    return build_sequences(pd.DataFrame(rows, columns=["user", "item", "timestamp"]))


def test_repeat_targets_are_left_out_under_exclude_seen_and_counted():
    data = _repeat_data()
    oracle = baseline_score_fn(_Oracle(data, "test"))
    m = evaluate(oracle, data, EvalProtocol(max_history=50))
    assert m["count"] == 2 and m["repeat_targets"] == 1 and m["HR@1"] == 1.0
    # without the exclusion every user is ranked, and the repeats are still counted
    m = evaluate(oracle, data, EvalProtocol(max_history=50, exclude_seen=False))
    assert m["count"] == 3 and m["repeat_targets"] == 1
    # a target seen only before the history window is no repeat: it was never excluded
    m = evaluate(baseline_score_fn(_RepeatScorer(data.num_items)), data, EvalProtocol(max_history=1))
    assert m["count"] == 3 and "repeat_targets" not in m


def test_only_repeat_targets_is_an_error_that_names_the_way_out():
    rows = [("u0", "x", 1), ("u0", "y", 2), ("u0", "x", 3)]
    data = build_sequences(pd.DataFrame(rows, columns=["user", "item", "timestamp"]))
    with pytest.raises(ValueError, match="every target also occurs in its history.*exclude_seen"):
        evaluate(baseline_score_fn(_Oracle(data, "test")), data, EvalProtocol(max_history=50))


def test_per_user_ranks_are_sorted_by_user_and_give_the_same_metrics():
    """evaluate_ranks returns each evaluated user's rank, users ascending; evaluate's metrics come from them."""
    from genrec.eval.evaluate import evaluate_ranks

    data = _data()
    scorer = baseline_score_fn(_RepeatScorer(data.num_items))
    protocol = EvalProtocol(max_history=50)
    result = evaluate_ranks(scorer, data, protocol)
    assert (np.diff(result.users) > 0).all() and result.ranks.min() >= 1
    # each user's rank is the one a one-user evaluation of that user gives (the batch order plays no part)
    for u, r in zip(result.users, result.ranks):
        seq = data.sequence(int(u))
        scores = scorer([seq[:-1]], None, None, None)[0]
        others = scores.clone()
        others[seq[:-1]] = float("-inf")  # the history is excluded
        others[0] = float("-inf")
        others[seq[-1]] = float("-inf")
        assert r == 1 + int((others >= scores[seq[-1]]).sum())
    m = evaluate(scorer, data, protocol)
    assert m["count"] == len(result.ranks)
    assert m["MRR"] == pytest.approx(float(np.mean(1.0 / result.ranks)))
