"""bench/lattice.py gathers the studies' rows and refuses malformed ones."""

from __future__ import annotations

import json

import pytest
from . import ROOT, load_bench


def _bench():
    return load_bench("lattice")


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


def _script(name: str):
    return load_bench(name)


def test_distill_calibration_error_resamples_match_the_full_data():
    import numpy as np

    distill = _script("lattice_distill")
    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, 400)
    y = (rng.random(400) < 0.3).astype(float)
    p = np.clip(rng.random((2, 400)) * 0.8, 0, 1)
    U = np.unique(users).size
    full = distill._cal_error_samples(p, y, users, np.ones((1, U)))
    expected = np.mean([abs(ps.sum() / y.sum() - 1) for ps in p])
    assert np.isclose(full[0], expected)
    # a resample that draws one user twice counts that user's sums twice
    counts = np.ones((1, U))
    counts[0, 0] = 2
    _, uidx = np.unique(users, return_inverse=True)
    w = counts[0][uidx]
    assert np.isclose(distill._cal_error_samples(p, y, users, counts)[0],
                      np.mean([abs((w * ps).sum() / (w * y).sum() - 1) for ps in p]))  # fmt: skip


def test_distill_tables_render_tr_and_the_teacher_gap(tmp_path):
    distill = _script("lattice_distill")
    iv = {"diff": -0.01, "low": -0.02, "high": -0.005, "excludes_zero": True}
    base = {"study": "distill", "dataset": "ml-1m", "task": "like", "seeds": [0, 1], "smoke": False,
            "metrics": {"AUC": 0.78, "NE": 0.8, "calibration": 1.01}, "parameters": 1000, "latency_ms_per_1k": 2.5,
            "command": "python bench/lattice_distill.py", "settings": {"cpu": "test cpu"}}  # fmt: skip
    rows = [
        {**base, "student": "teacher", "variant": "-", "ci": None},
        {**base, "student": "dlrm", "variant": "none", "ci": {"teacher_gap": {"AUC": iv, "NE": iv}}},
        {**base, "student": "dlrm", "variant": "serving",
         "ci": {"AUC": iv, "NE": iv, "cal_error": iv, "TR": {"value": 0.4, "low": 0.2, "high": 0.6},
                "teacher_gap": {"AUC": iv, "NE": iv}}},
    ]  # fmt: skip
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    text = distill.markdown_tables(path)
    assert "| dlrm | serving |" in text and "0.40 [0.20, 0.60]" in text
    assert "-0.0100 [-0.0200, -0.0050]*" in text and "test cpu" in text


def test_readme_lattice_tables_are_generated_from_the_committed_results():
    bench = _bench()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = bench.README_MARKERS
    block = readme.split(start)[1].split(end)[0]
    assert block == "\n" + bench.readme_tables(bench.gather())


def test_readme_block_is_written_only_between_exactly_one_pair_of_markers(tmp_path):
    """The README writer the lattice bench uses (bench/readme_table.write_between_markers)."""
    _bench()  # puts bench/ on sys.path
    from readme_table import write_between_markers

    start, end = _bench().README_MARKERS
    page = tmp_path / "README.md"
    for text in ("no markers", f"a{start}x{end}b{start}y{end}c", f"a{end}x{start}b"):
        page.write_text(text)
        assert write_between_markers(page, start, end, "new") is False
        assert page.read_text() == text  # left as it was
    page.write_text(f"a{start}old{end}b")
    assert write_between_markers(page, start, end, "new") is True
    assert page.read_text() == f"a{start}\nnew\n{end}b"
    assert write_between_markers(tmp_path / "missing.md", start, end, "new") is False
