"""bench/config_times.py: which configs it times, where their best epochs come from, and the table it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from . import ROOT, load_bench


@pytest.fixture()
def bench():
    return load_bench("config_times")


def test_every_shipped_retrieval_config_names_its_recorded_runs(bench):
    configs = [str(p.relative_to(ROOT)) for p in bench.shipped_configs()]
    assert configs and not any(Path(c).name.startswith("ranking-") for c in configs)
    assert sorted(configs) == sorted(bench.CONFIG_RUNS), "a shipped config without recorded runs, or a stale entry"
    assert all(len(names) >= 2 for names in bench.CONFIG_RUNS.values()), "every config is measured with >= 2 seeds"


def test_best_epochs_come_from_the_configs_test_rows_and_missing_runs_say_so(bench):
    rows = [{"dataset": "ml-1m", "model": "hstu-seed42", "split": "test", "epoch": 134},
            {"dataset": "ml-1m", "model": "hstu-seed42", "split": "valid", "epoch": 999},
            {"dataset": "amazon-beauty", "model": "hstu-seed1", "split": "test", "epoch": 7}]  # fmt: skip
    assert bench.best_epochs("configs/ml-1m/hstu.yaml", rows) is None  # hstu-seed1 of ml-1m is missing
    rows.append({"dataset": "ml-1m", "model": "hstu-seed1", "split": "test", "epoch": 189})
    assert bench.best_epochs("configs/ml-1m/hstu.yaml", rows) == [134, 189]
    assert bench.best_epochs("configs/ml-1m/unknown.yaml", rows) is None


def test_table_flags_configs_over_the_limit(bench):
    machine = {"cpu": "cpu", "isa": "isa"}
    rows = [{"config": "a.yaml", "threads": 2, "train_seconds": 30.0, "eval_seconds": 10.0, "best_epochs": [150, 200],
             "minutes_to_best": 200 * 40 / 60, "machine": machine, "date": "d"},
            {"config": "b.yaml", "threads": 2, "train_seconds": 10.0, "eval_seconds": 2.0, "best_epochs": [30, 36],
             "minutes_to_best": 36 * 12 / 60, "machine": machine, "date": "d"},
            {"config": "c.yaml", "threads": 2, "train_seconds": 1.0, "eval_seconds": 1.0, "best_epochs": None,
             "minutes_to_best": None, "machine": machine, "date": "d"}]  # fmt: skip
    lines = bench.render(rows).splitlines()
    assert "| `a.yaml` | 30.0 + 10.0 | 150/200 | 133 min | **no** |" in lines
    assert "| `b.yaml` | 10.0 + 2.0 | 30/36 | 7 min | yes |" in lines
    assert "| `c.yaml` | 1.0 + 1.0 | not recorded | – | – |" in lines


def test_configs_that_differ_only_in_their_schedule_are_timed_once(bench):
    key = lambda name: bench.speed_key(ROOT / "configs" / "ml-1m" / name)  # noqa: E731
    assert key("hstu.yaml") == key("hstu-cosine.yaml")
    assert key("hstu-large.yaml") == key("hstu-large-cosine.yaml")
    assert key("hstu.yaml") != key("hstu-large.yaml") != key("fuxi-alpha.yaml")
