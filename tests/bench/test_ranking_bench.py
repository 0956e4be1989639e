"""bench/ranking.py's bookkeeping: run directories per split, recorded commands, the generated tables."""

from __future__ import annotations

from argparse import Namespace

import pytest
from . import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("ranking")


def test_two_splits_never_share_a_run_directory(bench, tmp_path):
    def root(dataset, split):
        return bench.run_root(Namespace(runs=str(tmp_path), dataset=dataset, split=split))

    assert root("ml-1m", "user-last") == tmp_path / "ml-1m"  # the default split keeps the plain layout
    assert root("ml-1m", "global-time") == tmp_path / "ml-1m" / "global-time"
    assert root("taobao-userbehavior-head", "global-time") == tmp_path / "taobao-userbehavior-head"
    assert root("kuairand-27k-like-hate-subset", "user-last") != root("kuairand-27k-like-hate-subset", "global-time")


def test_recorded_commands_leave_out_the_data_directory(bench):
    clean = bench._clean_command
    assert clean("python bench/ranking.py --data-dir /some/where --seeds 0 1") == "python bench/ranking.py --seeds 0 1"
    assert clean("python bench/ranking.py --data-dir=/x --resume") == "python bench/ranking.py --resume"


def _row(model, task, seed, auc, ci=None, variant="default"):
    return {"dataset": "ml-1m", "model": model, "variant": variant, "task": task, "split": "user-last", "seed": seed,
            "metrics": {"AUC": auc, "GAUC": 0.6, "NE": 0.8, "LogLoss": 0.5, "calibration": 1.0}, "ci": ci,
            "seconds": 10.0, "epochs": 3, "smoke": False, "command": "python bench/ranking.py --seeds 0 1"}  # fmt: skip


def test_summary_takes_the_seed_mean_or_the_only_seed(bench):
    ci = {"baseline": "dlrm", "variant": "default", "AUC": {"diff": -0.01, "low": -0.02, "high": 0.001,
                                                            "excludes_zero": False}}  # fmt: skip
    rows = [_row("dlrm", "like", 0, 0.7), _row("dlrm", "like", 1, 0.8), _row("dlrm", "like", "mean", 0.75),
            _row("popularity", "like", 0, 0.6, ci)]  # fmt: skip
    summary = {(r["model"], r["seed"]): r for r in bench._summary_rows(rows)}
    assert set(summary) == {("dlrm", "mean"), ("popularity", 0)}
    assert summary[("dlrm", "mean")]["n_seeds"] == 2
    assert bench._seconds_per_run(summary[("dlrm", "mean")]) == 5.0  # the mean row's seconds are the sum
    assert bench._ci(summary[("popularity", 0)], "AUC") == "\u22120.0100 [\u22120.0200, +0.0010] (n.s.)"
