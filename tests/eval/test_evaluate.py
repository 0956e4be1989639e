import numpy as np
import pandas as pd
import torch

from genrec.data.sequences import build_sequences
from genrec.eval.evaluate import baseline_score_fn, evaluate
from genrec.eval.protocol import EvalProtocol


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
