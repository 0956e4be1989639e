"""bench/lattice.py gathers the studies' rows and refuses malformed ones."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("lattice_bench", ROOT / "bench" / "lattice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(study: str, **over) -> dict:
    row = {"study": study, "dataset": "synthetic", "variant": "v", "task": "t", "metrics": {"auc": 0.7}, "ci": None,
           "command": "python bench/x.py"}
    row.update(over)
    return row


def test_gather_keeps_every_study_row_and_skips_missing_files(tmp_path):
    bench = _bench()
    (tmp_path / "lattice_delay.json").write_text(json.dumps([_row("delay"), _row("delay", variant="w")]))
    (tmp_path / "lattice_domains.json").write_text(json.dumps([_row("domains")]))
    rows = bench.gather(tmp_path)
    assert [r["study"] for r in rows] == ["domains", "delay", "delay"]


@pytest.mark.parametrize("rows, match", [
    ([_row("objectives")], "is of study 'objectives'"),
    ([{k: v for k, v in _row("delay").items() if k != "command"}], r"lacks \['command'\]"),
    ({"rows": []}, "expected a JSON list"),
])  # fmt: skip
def test_gather_refuses_malformed_rows(tmp_path, rows, match):
    (tmp_path / "lattice_delay.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=match):
        _bench().gather(tmp_path)


def test_committed_results_gather():
    rows = _bench().gather(ROOT / "results")
    assert {r["study"] for r in rows} >= {"domains", "objectives", "delay"}
