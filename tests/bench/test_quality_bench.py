"""bench/quality.py's paired comparison: per-user test ranks from finished runs, checked against their results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from genrec.config import RunConfig
from genrec.train.loop import train

from ..conftest import synthetic_interactions
from . import load_bench


@pytest.fixture()
def bench(tmp_path, monkeypatch):
    module = load_bench("quality")
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results" / "quality.json")
    monkeypatch.setattr(module, "COMPARE", tmp_path / "results" / "quality_compare.json")
    return module


def _run(tmp_path: Path, name: str, seed: int, epochs: int) -> None:
    table = tmp_path / "events.csv"
    if not table.exists():
        synthetic_interactions(num_users=60, num_items=25).to_csv(table, index=False)
    cfg = RunConfig.from_dict({
        "data": {"dataset": "table", "path": str(table), "columns": {"user": "user", "item": "item", "timestamp": "timestamp"},
                 "max_len": 20},
        "model": {"name": "hstu", "embedding_dim": 8, "num_blocks": 1, "attention_dim": 8, "linear_dim": 8},
        "train": {"epochs": epochs, "batch_size": 16, "num_negatives": 8, "seed": seed, "patience": 5},
        "output_dir": str(tmp_path / "runs" / "quality" / "ml-1m" / name),
    })  # fmt: skip
    train(cfg, progress=False)


def test_compare_pairs_users_and_checks_the_stored_metrics(bench, tmp_path):
    _run(tmp_path, "a", seed=1, epochs=6)
    _run(tmp_path, "b", seed=2, epochs=1)
    rows = bench.compare_runs("ml-1m", ["a"], ["b"], ["HR@10", "NDCG@10"], None, num_resamples=200)
    assert [r["metric"] for r in rows] == ["HR@10", "NDCG@10"]
    for run in ("a", "b"):
        stored = json.loads((tmp_path / "runs/quality/ml-1m" / run / "results.json").read_text())["test"]["metrics"]
        z = np.load(tmp_path / "runs/quality/ml-1m" / run / "test_ranks.npz")
        assert len(z["ranks"]) == stored["count"]
        row = rows[1]
        per_seed = row["a_per_seed"] if run == "a" else row["b_per_seed"]
        assert per_seed[0] == pytest.approx(stored["NDCG@10"])
    assert rows[1]["diff"] == pytest.approx(rows[1]["a_per_seed"][0] - rows[1]["b_per_seed"][0])
    lo, hi = rows[1]["ci"]
    assert lo <= rows[1]["diff"] <= hi
    bench._save_compare(rows)
    assert len(json.loads((tmp_path / "results" / "quality_compare.json").read_text())) == 2

    # Training wrote the ranks; without them they are recomputed from the best checkpoint, to the same values.
    ranks_file = tmp_path / "runs/quality/ml-1m/b/test_ranks.npz"
    written = np.load(ranks_file)["ranks"]
    ranks_file.unlink()
    assert bench.compare_runs("ml-1m", ["a"], ["b"], ["NDCG@10"], None, num_resamples=200)[0] == rows[1]
    assert np.array_equal(np.load(ranks_file)["ranks"], written)

    # Ranks that do not give the run's stored test metrics are refused, not compared.
    results = tmp_path / "runs/quality/ml-1m/b/results.json"
    raw = json.loads(results.read_text())
    raw["test"]["metrics"]["NDCG@10"] += 0.01
    results.write_text(json.dumps(raw))
    with pytest.raises(SystemExit, match="do not give the test metrics of results.json"):
        bench.compare_runs("ml-1m", ["a"], ["b"], ["NDCG@10"], None, num_resamples=10)


def test_lever_table_pairs_seeds_and_marks_levers_without_ranks_unpaired(bench, tmp_path, monkeypatch):
    for name, seed, epochs in (("base-s1", 1, 1), ("base-s2", 2, 1), ("lever-s1", 1, 6), ("lever-s2", 2, 6)):
        _run(tmp_path, name, seed=seed, epochs=epochs)
    rows = []
    for name in ("base-s1", "base-s2", "lever-s1", "lever-s2"):
        res = json.loads((tmp_path / "runs/quality/ml-1m" / name / "results.json").read_text())
        secs = bench.seconds_to_best(tmp_path / "runs/quality/ml-1m" / name, res["best_epoch"])
        log_rows = [json.loads(x) for x in (tmp_path / "runs/quality/ml-1m" / name / "log.jsonl").read_text().splitlines()]
        assert secs == pytest.approx(sum(r["train_seconds"] + r["eval_seconds"] for r in log_rows[: res["best_epoch"]]))
        rows.append({"dataset": "ml-1m", "model": name, "split": "test", "protocol": res["test"]["protocol"],
                     "metrics": res["test"]["metrics"], "seconds_to_best": secs})
    # one lever whose runs are here (paired), one whose base runs are gone (rows only), one never run
    rows.append({**rows[0], "model": "old-base", "seconds_to_best": None})
    monkeypatch.setattr(bench, "LEVERS", [
        {"dataset": "ml-1m", "lever": "paired lever", "change": "x", "recipe": "r",
         "base": ["base-s1", "base-s2"], "variant": ["lever-s1", "lever-s2"]},
        {"dataset": "ml-1m", "lever": "unpaired lever", "change": "y", "recipe": "r",
         "base": ["old-base"], "variant": ["lever-s1"]},
        {"dataset": "ml-1m", "lever": "not run", "change": "z", "recipe": "r", "base": ["nope"], "variant": ["nope2"]},
    ])  # fmt: skip
    compares = bench.compare_levers(None)
    assert {tuple(c["a"]) for c in compares} == {("lever-s1", "lever-s2")}  # the unpaired lever has no runs here
    table = bench.render_levers(rows, compares)
    paired = next(line for line in table.splitlines() if "| paired lever (`x`) |" in line)
    unpaired = next(line for line in table.splitlines() if "| unpaired lever (`y`) |" in line)
    c = next(c for c in compares if c["metric"] == "NDCG@10")
    assert f"{c['diff']:+.4f} [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}]" in paired
    expected = "better" if c["ci"][0] > 0 else "worse" if c["ci"][1] < 0 else "tie"
    assert expected in paired
    base_mean = np.mean([r["metrics"]["NDCG@10"] for r in rows[:2]])
    assert f"{base_mean:.4f}" in paired
    assert "(unpaired)" in unpaired and "unpaired: no interval" in unpaired and "– →" in unpaired
    assert "not run" not in table
