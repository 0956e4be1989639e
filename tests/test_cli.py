"""End-to-end smoke test through the real command line: train -> evaluate -> recommend, plus bad input."""

import argparse
import json
import subprocess
import sys

import torch
import yaml

from genrec.cli import build_parser, main

from .conftest import real_data_or_skip, synthetic_interactions, write_sequences_file


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


def _tiny_config(tmp_path, data_path=None, epochs=3):
    """A tiny HSTU run config on the synthetic table (returned as the path of its YAML file)."""
    if data_path is None:
        data_path = tmp_path / "inter.csv"
        synthetic_interactions().to_csv(data_path, index=False)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "data: {dataset: table, path: %s, columns: {user: user, item: item, timestamp: timestamp}, max_len: 12}\n"
        "model: {name: hstu, embedding_dim: 8, num_blocks: 1, num_heads: 1, attention_dim: 8, linear_dim: 8}\n"
        "train: {epochs: %d, batch_size: 8, num_negatives: 16, eval_batch_size: 16}\n" % (data_path, epochs)
    )
    return cfg


def _log_epochs(run):
    return [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_every_repeated_set_applies(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = _run(["train", "--config", str(_tiny_config(tmp_path)), "--output-dir", str(run), "--no-progress",
                         "--set", "train.epochs=1", "--set", "train.lr=0.005", "model.dropout=0.1"], capsys)  # fmt: skip
    assert code == 0, err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1 and saved["train"]["lr"] == 0.005 and saved["model"]["dropout"] == 0.1
    assert _log_epochs(run) == [1]


def test_existing_run_directory_needs_resume_or_overwrite(tmp_path, capsys):
    cfg, run = _tiny_config(tmp_path, epochs=2), tmp_path / "run"
    args = ["train", "--config", str(cfg), "--output-dir", str(run), "--no-progress"]
    assert _run(args, capsys)[0] == 0
    before = (run / "log.jsonl").read_text()
    code, _, err = _run(args, capsys)
    assert code == 2 and "--overwrite" in err and "--resume" in err and str(run) in err
    assert (run / "log.jsonl").read_text() == before  # nothing touched
    (run / "notes.txt").write_text("mine")
    code, _, err = _run(args + ["--overwrite", "--set", "train.epochs=1"], capsys)
    assert code == 0, err
    assert _log_epochs(run) == [1]  # one run's epochs, not two runs mixed
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are cleared


def test_config_typo_is_one_clear_line(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = _run(["train", "--config", str(_tiny_config(tmp_path)), "--output-dir", str(run),
                         "--set", "model.name=hstuu"], capsys)  # fmt: skip
    assert code == 2
    assert err.startswith("genrec: error: ") and err.count("\n") == 1
    assert "tiny.yaml" in err and "model.name" in err and "'hstuu'" in err and "'sasrec'" in err
    assert not run.exists()  # refused before anything was written


def test_unknown_dataset_is_refused_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = _run(["train", "--config", "/dev/null", "--output-dir", str(run), "--set", "data.dataset=ml-1n"],
                        capsys)  # fmt: skip
    assert code == 2 and "data.dataset" in err and "'ml-1n'" in err and "ml-1m" in err and "table" in err
    assert not run.exists()


class _Payload:
    """Not a tensor or a container: torch.load(weights_only=True) must refuse a pickle holding it."""


def test_tampered_checkpoint_is_refused_with_one_line(tmp_path, capsys):
    cfg, run = _tiny_config(tmp_path, epochs=1), tmp_path / "run"
    args = ["train", "--config", str(cfg), "--output-dir", str(run), "--no-progress"]
    assert _run(args, capsys)[0] == 0
    config_before = (run / "config.yaml").read_text()
    torch.save({"model": _Payload()}, run / "checkpoint.pt")
    code, _, err = _run(args + ["--resume", "--set", "train.epochs=2"], capsys)
    assert code == 2
    assert err.startswith("genrec: error: ") and err.count("\n") == 1, err
    assert "checkpoint.pt" in err and "weights_only" not in err
    assert (run / "config.yaml").read_text() == config_before  # refused before anything was rewritten

    (run / "best.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    code, _, err = _run(["evaluate", "--checkpoint", str(run)], capsys)
    assert code == 2 and err.startswith("genrec: error: ") and err.count("\n") == 1 and "best.safetensors" in err


def test_missing_run_directory_file_is_one_line(tmp_path, capsys):
    code, _, err = _run(["recommend", "--checkpoint", str(tmp_path), "--history", "1"], capsys)
    assert code == 2 and err.startswith("genrec: error: ") and err.count("\n") == 1 and "config.yaml" in err


def test_relative_data_path_is_stored_absolute(tmp_path, capsys, monkeypatch):
    here, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    synthetic_interactions().to_csv(here / "inter.csv", index=False)
    monkeypatch.chdir(here)
    cfg = _tiny_config(here, data_path="inter.csv", epochs=1)
    run = tmp_path / "run"
    code, out, err = _run(["train", "--config", str(cfg), "--output-dir", str(run), "--no-progress"], capsys)
    assert code == 0, err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["path"] == str(here / "inter.csv")
    results = json.loads((run / "results.json").read_text())
    monkeypatch.chdir(elsewhere)
    code, out, err = _run(["evaluate", "--checkpoint", str(run)], capsys)
    assert code == 0, err
    assert json.loads(out[out.index("{"):])["metrics"] == results["test"]["metrics"]


def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="genrec.train")
    code, _, err = _run(["train", "--config", str(_tiny_config(tmp_path, epochs=2)), "--output-dir",
                         str(tmp_path / "run")], capsys)  # fmt: skip
    assert code == 0, err
    assert "\r" not in err and "it/s" not in err
    assert [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("epoch ")] == ["1", "2"]


def _parsers(parser, path=()):
    """(command path, parser) for the top-level parser and every sub-command, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_option_has_help():
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path) or 'genrec'} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without --help text: {missing}"


def test_train_ranker_on_real_data_and_its_refusals(tmp_path, capsys):
    """genrec train-ranker: a short DLRM run on the KuaiRand subset prints per-task test metrics and the data note;
    a repeat into the same directory and a config typo are one-line errors with exit 2."""
    data = real_data_or_skip("kuairand-27k-like-hate-subset")
    config = tmp_path / "ranking.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "kuairand"}, "model": {"name": "dlrm"},
                                      "train": {"epochs": 1, "max_steps_per_epoch": 3, "num_threads": 1}}))  # fmt: skip
    args = ["train-ranker", "--config", str(config), "--data-dir", str(data.parent), "--output-dir", str(tmp_path / "run"),
            "--set", "train.batch_size=32", "--set", "train.seed=3"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "kuairand" in out and "dlrm" in out and "liked-or-hated" in out.replace("liked or hated", "liked-or-hated")
    assert "auc=" in out and " ne=" in out and "calibration=" in out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["batch_size"] == 32 and saved["train"]["seed"] == 3  # both --set groups applied
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train-ranker", "--config", str(config), "--set", "model.name=xgboost"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.name" in err and "Traceback" not in err
