"""Run directories: refusing to mix runs, checked resumes, stale temporaries, the log after a resume, durable writes."""

import json
import os

import pytest
import torch

from genrec.config import ConfigError, load_config
from genrec.io import atomic_write
from genrec.train.checkpoint import CheckpointError, load_state, save_state
from genrec.train.loop import train

from ..conftest import synthetic_interactions


def _config(tmp_path, name, extra=()):
    path = tmp_path / "inter.csv"
    if not path.exists():
        synthetic_interactions().to_csv(path, index=False)
    return load_config(None, [
        "data.dataset=table", f"data.path={path}", "data.columns={user: user, item: item, timestamp: timestamp}",
        "data.max_len=12", "model.embedding_dim=8", "model.num_blocks=1", "model.num_heads=2", "model.attention_dim=4",
        "model.linear_dim=4", "train.batch_size=8", "train.epochs=2", "train.num_negatives=16",
        "train.eval_batch_size=16", f"output_dir={tmp_path / name}", *extra,
    ])  # fmt: skip


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _log_epochs(run):
    return [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_existing_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    train(_config(tmp_path, "run"), progress=False)
    run = tmp_path / "run"
    before = _snapshot(run)
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(_config(tmp_path, "run", ["train.epochs=1"]), progress=False)
    assert _snapshot(run) == before
    train(_config(tmp_path, "run", ["train.epochs=1"]), overwrite=True, progress=False)
    assert _log_epochs(run) == [1]
    assert load_state(run / "checkpoint.pt")["train_state"]["epoch"] == 1
    with pytest.raises(ValueError, match="exclude"):
        train(_config(tmp_path, "run"), resume=True, overwrite=True, progress=False)


@pytest.mark.parametrize(
    "change, message",
    [("model.num_blocks=2", r"model\.num_blocks: 1 -> 2"), ("model.embedding_dim=16", r"model\.embedding_dim"),
     ("data.max_len=20", r"data\.max_len"), ("eval.selection=test-peeking", r"eval\.selection")],
)
def test_resume_with_another_architecture_is_refused_before_writing(tmp_path, change, message):
    train(_config(tmp_path, "run"), progress=False)
    run = tmp_path / "run"
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=message):
        train(_config(tmp_path, "run", ["train.epochs=3", change]), resume=True, progress=False)
    assert _snapshot(run) == before  # config.yaml not rewritten: the directory still loads as the old run
    from genrec.api import Recommender

    Recommender.load(run)


def test_resume_refuses_weights_that_do_not_fit_the_stored_config(tmp_path):
    train(_config(tmp_path, "run"), progress=False)
    run = tmp_path / "run"
    state = load_state(run / "checkpoint.pt")
    state["model"]["item_emb.weight"] = state["model"]["item_emb.weight"][:, :4].clone()
    save_state(run / "checkpoint.pt", state)
    before = _snapshot(run)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*item_emb\.weight"):
        train(_config(tmp_path, "run", ["train.epochs=3"]), resume=True, progress=False)
    assert _snapshot(run) == before


def test_resume_refuses_data_with_other_item_ids(tmp_path):
    train(_config(tmp_path, "run"), progress=False)
    synthetic_interactions(seed=1).to_csv(tmp_path / "inter.csv", index=False)  # same path, other data
    before = _snapshot(tmp_path / "run")
    with pytest.raises(ValueError, match="item ids"):
        train(_config(tmp_path, "run", ["train.epochs=3"]), resume=True, progress=False)
    assert _snapshot(tmp_path / "run") == before


def test_resume_cleans_stale_temporaries_and_logs_each_epoch_once(tmp_path):
    train(_config(tmp_path, "run"), progress=False)
    run = tmp_path / "run"
    # A run killed after logging epoch 3 but before its checkpoint, and inside two atomic writes.
    with open(run / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 3, "loss": 1.0, "valid": {}}) + "\n")
    (run / ".checkpoint.pt.k2j4x9.tmp").write_bytes(b"")
    (run / ".best.safetensors.a8d7q1.tmp").write_bytes(b"")
    (run / ".notes.txt.keep.tmp").write_text("not a run file: left alone")
    train(_config(tmp_path, "run", ["train.epochs=4"]), resume=True, progress=False)
    assert _log_epochs(run) == [1, 2, 3, 4]
    assert sorted(p.name for p in run.glob(".*.tmp")) == [".notes.txt.keep.tmp"]
    train(_config(tmp_path, "full", ["train.epochs=4"]), progress=False)
    resumed = [json.loads(line)["valid"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert resumed == [json.loads(line)["valid"] for line in (tmp_path / "full/log.jsonl").read_text().splitlines()]


def test_fresh_run_removes_stale_temporaries(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".checkpoint.pt.zz81.tmp").write_bytes(b"")
    train(_config(tmp_path, "run", ["train.epochs=1"]), progress=False)
    assert not list(run.glob(".*.tmp"))


def test_tampered_checkpoint_is_a_checkpoint_error(tmp_path):
    train(_config(tmp_path, "run", ["train.epochs=1"]), progress=False)
    run = tmp_path / "run"
    torch.save({"model": _Payload()}, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*objects other than tensors") as info:
        train(_config(tmp_path, "run"), resume=True, progress=False)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
    (run / "checkpoint.pt").write_bytes(b"")  # a zero-byte file
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt"):
        train(_config(tmp_path, "run"), resume=True, progress=False)


class _Payload:
    """A custom class: torch.load(weights_only=True) refuses pickles holding one."""


def test_atomic_write_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "out.json"
    atomic_write(target, lambda tmp: open(tmp, "w").write("new"))
    assert target.read_text() == "new"
    assert target.stat().st_ino in synced  # the data reached the disk before the rename
    assert tmp_path.stat().st_ino in synced  # and the rename itself (the directory entry)
    assert synced.index(target.stat().st_ino) < synced.index(tmp_path.stat().st_ino)


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_text("old")

    def half_write(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_write)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_refused_before_reading_data(tmp_path):
    cfg = _config(tmp_path, "run", ["train.device=cuda", "data.path=/nonexistent/inter.csv"])
    with pytest.raises(ValueError, match="train.device='cuda'.*no CUDA"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
