"""End-to-end smoke test through the real command line: train -> evaluate -> recommend, plus bad input."""

import json
import subprocess
import sys

import pytest

from genrec.cli import main

from .conftest import synthetic_interactions, write_sequences_file


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_evaluate_recommend(tmp_path, capsys):
    seq = tmp_path / "seqs.txt"
    write_sequences_file(seq, synthetic_interactions(with_time=False))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "data: {dataset: sequences, path: %s, max_len: 12}\n"
        "model: {name: hstu, embedding_dim: 8, num_blocks: 1, num_heads: 1, attention_dim: 8, linear_dim: 8}\n"
        "train: {epochs: 3, batch_size: 8, num_negatives: 16}\n" % seq
    )
    run = tmp_path / "run"
    code, out, err = _run(["train", "--config", str(cfg), "--output-dir", str(run), "--no-progress",
                           "--set", "train.lr=0.005"], capsys)  # fmt: skip
    assert code == 0, err
    assert "loo-test/full/exclude-seen/hist12" in out and "NDCG@10" in out
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["train"]["lr"] == 0.005

    code, out, err = _run(["evaluate", "--checkpoint", str(run)], capsys)
    assert code == 0, err
    shown = json.loads(out[out.index("{"):])
    assert shown["metrics"] == results["test"]["metrics"]  # same checkpoint, same protocol, same numbers

    code, out, err = _run(["recommend", "--checkpoint", str(run), "--history", "i3,i4,nope", "-k", "5"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 5 and "nope" in err
    recommended = [line.split()[1] for line in lines]
    assert "i3" not in recommended and "i4" not in recommended  # seen items excluded


def test_malformed_file_gives_file_and_line(tmp_path, capsys):
    bad = tmp_path / "ratings.csv"
    bad.write_text("user,item,timestamp\nu1,i1,10\nu1,i2,xx\nu1,i3,30\n")
    code, out, err = _run(["train", "--config", "/dev/null", "--no-progress", "--output-dir", str(tmp_path / "r"),
                           "--set", "data.dataset=table", f"data.path={bad}",
                           "data.columns={user: user, item: item, timestamp: timestamp}"], capsys)  # fmt: skip
    assert code == 2
    assert "ratings.csv:3" in err


def test_bad_config_key_is_a_clear_error(tmp_path, capsys):
    code, _, err = _run(["train", "--config", "/dev/null", "--set", "train.lrr=1"], capsys)
    assert code == 2 and "unknown key" in err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "genrec.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("genrec ")


def test_fetch_without_network_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, _, err = _run(["data", "fetch", "ml-1m", "--cache-dir", str(tmp_path)], capsys)
    assert code == 2
    assert "ml-1m.zip" in err and "--data-dir" in err
