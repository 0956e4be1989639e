"""Data-parallel training (genrec.train.distributed): N real gloo processes train the one-process model.

The two-process tests start real processes (``torch.multiprocessing.spawn``, gloo on CPU) on tiny synthetic data:
the weights after an epoch equal those of a one-process run with the same global batch, a two-process checkpoint
resumes in one process exactly, and the sharded evaluation equals the one-process one. The rest checks the pieces
in-process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from genrec.config import load_config
from genrec.data.batches import training_batch
from genrec.data.dataset import prepare_data
from genrec.data.sequences import leave_one_out
from genrec.eval.evaluate import UserRanks, evaluate_ranks, model_score_fn
from genrec.eval.protocol import protocol_from_config
from genrec.models import build_model
from genrec.train.checkpoint import load_state, load_weights
from genrec.train.distributed import (
    DistInfo,
    check_batch_size,
    global_batch_dropout,
    init_from_env,
    shard_batch,
    shard_bounds,
    shutdown,
)
from genrec.train.loop import _evaluate_ranks, train
from genrec.train.loss import sampled_softmax_loss

from ..conftest import synthetic_interactions

NUM_USERS = 41  # batch_size 8: five full batches and a last one of one row (one process gets no row of it)


def _config(root, name, extra=()):
    path = root / "inter.csv"
    if not path.exists():
        synthetic_interactions(num_users=NUM_USERS).to_csv(path, index=False)
    return load_config(None, [
        "data.dataset=table", f"data.path={path}", "data.columns={user: user, item: item, timestamp: timestamp}",
        "data.max_len=12", "model.name=hstu", "model.embedding_dim=8", "model.num_blocks=1", "model.num_heads=2",
        "model.attention_dim=4", "model.linear_dim=4", "model.dropout=0.2", "model.linear_dropout=0.2",
        "train.batch_size=8", "train.epochs=1", "train.num_negatives=16", "train.eval_batch_size=7",
        "train.lr=0.01", "train.num_threads=1", f"output_dir={root / name}", *extra,
    ])  # fmt: skip


# Two runs that cover every draw: per-position negatives with in-batch negatives and Stochastic Length, and
# per-sequence negatives with sampled-candidate evaluation (dropout 0.2 in both).
RUNS = {
    "pos": ["train.negatives=per_position", "train.in_batch_negatives=4", "train.stochastic_length_alpha=1.6"],
    "seq": ["train.negatives=per_sequence", "eval.candidates=sampled", "eval.num_negatives=10"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_process_group(rank: int, world_size: int, port: int) -> DistInfo:
    """In a spawned test process: one thread, the environment torchrun sets, and the gloo group joined."""
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # what torchrun sets; fmt: skip
    info = init_from_env("cpu")
    assert info == DistInfo(rank=rank, world_size=world_size, local_rank=rank, backend="gloo")
    return info


def _worker(rank: int, world_size: int, port: int, root: str) -> None:
    """One process of the two-process run: train every RUNS config for one epoch, then evaluate the one-process
    run's best weights sharded (process 0 writes the gathered ranks for the parent to compare)."""
    from pathlib import Path

    info = join_process_group(rank, world_size, port)
    try:
        root = Path(root)
        for name, extra in RUNS.items():
            train(_config(root, f"two-{name}", extra), progress=False, dist=info)
        config = _config(root, "unused", RUNS["seq"])
        data = prepare_data(config.data)
        model = build_model(config.model, data.sequences.num_items, config.data.max_len)
        load_weights(root / "one-seq-e1" / "best.safetensors", model)
        model.eval()
        found = {}
        for target in ("valid", "test"):
            got = _evaluate_ranks(model, data.sequences, protocol_from_config(config, target), config, torch.device("cpu"), info)
            found[target] = {"users": got.users.tolist(), "ranks": got.ranks.tolist()}
        if info.is_main:
            (root / "sharded_eval.json").write_text(json.dumps(found))
    except BaseException:
        shutdown(info, wait=False)
        raise
    shutdown(info)


def _max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts with the same keys (0 for empty ones)."""
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a), default=0.0)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One-process reference runs, then the two-process runs (one spawn for all of them)."""
    root = tmp_path_factory.mktemp("dist")
    for name, extra in RUNS.items():
        train(_config(root, f"one-{name}-e1", extra), progress=False)
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(root)), nprocs=2, join=True)
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_train_the_one_process_weights(two_process_run, name):
    root = two_process_run
    one = load_state(root / f"one-{name}-e1" / "checkpoint.pt")
    two = load_state(root / f"two-{name}" / "checkpoint.pt")
    assert _max_difference(one["model"], two["model"]) < 1e-5
    # the generator is left where one process leaves it (every draw was made for the global batch)
    assert torch.equal(one["torch_rng"], two["torch_rng"])
    log_one = [json.loads(line) for line in open(root / f"one-{name}-e1" / "log.jsonl")]
    log_two = [json.loads(line) for line in open(root / f"two-{name}" / "log.jsonl")]
    assert [r["tokens"] for r in log_one] == [r["tokens"] for r in log_two]
    assert log_two[0]["loss"] == pytest.approx(log_one[0]["loss"], rel=1e-5)  # all-reduced
    results = json.loads((root / f"two-{name}" / "results.json").read_text())
    assert results["distributed"] == {"processes": 2, "backend": "gloo"}
    assert set(load_file(str(root / f"two-{name}" / "best.safetensors"))) == set(two["model"])
    assert not list((root / f"two-{name}").glob("*.tmp"))


def test_two_process_checkpoint_resumes_in_one_process(two_process_run):
    root = two_process_run
    extra = [*RUNS["pos"], "train.epochs=2"]
    uninterrupted = train(_config(root, "one-pos-e2", extra), progress=False)
    resumed = train(_config(root, "two-pos", extra), resume=True, progress=False)
    a = load_state(root / "one-pos-e2" / "checkpoint.pt")
    b = load_state(root / "two-pos" / "checkpoint.pt")
    assert b["train_state"]["epoch"] == 2
    assert _max_difference(a["model"], b["model"]) < 1e-5
    assert resumed["test"]["metrics"].keys() == uninterrupted["test"]["metrics"].keys()


def test_sharded_evaluation_equals_one_process(two_process_run):
    root = two_process_run
    found = json.loads((root / "sharded_eval.json").read_text())
    config = _config(root, "unused", RUNS["seq"])
    data = prepare_data(config.data)
    model = build_model(config.model, data.sequences.num_items, config.data.max_len)
    load_weights(root / "one-seq-e1" / "best.safetensors", model)
    model.eval()
    for target in ("valid", "test"):
        want = evaluate_ranks(model_score_fn(model, config.data.max_len), data.sequences,
                              protocol_from_config(config, target), config.train.eval_batch_size)  # fmt: skip
        assert found[target] == {"users": want.users.tolist(), "ranks": want.ranks.tolist()}


# ---------------------------------------------------------------------------------------------- in-process pieces


def test_batch_size_must_divide_by_the_processes(tmp_path):
    assert check_batch_size(8, 4) == 2
    with pytest.raises(ValueError, match=r"train.batch_size=10 .* must divide by the 4 processes"):
        check_batch_size(10, 4)
    info = DistInfo(rank=0, world_size=3, local_rank=0, backend="gloo")
    with pytest.raises(ValueError, match="must divide by the 3 processes"):
        train(_config(tmp_path, "run"), progress=False, dist=info)  # refused before anything else happens
    assert not (tmp_path / "run").exists()


def test_shard_bounds_cover_the_batch():
    for rows in (1, 3, 8, 9):
        for world in (1, 2, 3, 4):
            bounds = [shard_bounds(rows, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert [shard_bounds(8, r, 2) for r in range(2)] == [(0, 4), (4, 8)]


def test_no_torchrun_environment_means_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert init_from_env("cpu") is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="incomplete torchrun environment"):
        init_from_env("cpu")


def _data_and_batch(tmp_path, rows=8):
    config = _config(tmp_path, "unused")
    data = prepare_data(config.data)
    split = leave_one_out(data.sequences, "train")
    batch = training_batch(data.sequences, split, np.arange(rows), config.data.max_len)
    return config, data, batch


def test_global_batch_dropout_equals_dropout_and_splits_alike(tmp_path):
    config, data, batch = _data_and_batch(tmp_path)
    model = build_model(config.model, data.sequences.num_items, config.data.max_len).train()
    torch.manual_seed(3)
    plain = model.encode(batch)
    torch.manual_seed(3)
    whole = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo")
    local, shard, _ = shard_batch(batch, whole)
    with global_batch_dropout(model, shard):
        same = model.encode(local)
    assert torch.equal(plain, same)  # bit for bit: the masks nn.Dropout draws
    parts = []
    for rank in range(2):
        torch.manual_seed(3)
        local, shard, weight = shard_batch(batch, DistInfo(rank=rank, world_size=2, local_rank=rank, backend="gloo"))
        assert weight == 1.0 and local.item_ids.shape == (4, batch.item_ids.shape[1])  # the global width
        with global_batch_dropout(model, shard):
            parts.append(model.encode(local))
    assert torch.allclose(torch.cat(parts), plain, atol=1e-6)
    assert all("forward" not in vars(m) for m in model.modules())  # the modules are restored


@pytest.mark.parametrize("mode,in_batch", [("shared", 0), ("per_sequence", 0), ("per_position", 0), ("per_position", 4),
                                           ("per_sequence", 3), ("full", 0)])  # fmt: skip
def test_sharded_loss_sums_to_the_global_loss(tmp_path, mode, in_batch):
    config, data, batch = _data_and_batch(tmp_path)
    torch.manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(data.sequences.num_items + 1, 8), dim=-1)
    user = torch.nn.functional.normalize(torch.randn(*batch.targets.shape, 8), dim=-1)

    def vectors(ids=None):
        return table if ids is None else table[ids]

    def loss(u, targets, shard=None):
        return sampled_softmax_loss(u, targets, vectors, data.sequences.num_items, 16, 0.05, mode, normalizer=10.0,
                                    in_batch_negatives=in_batch, shard=shard)  # fmt: skip

    torch.manual_seed(1)
    want = loss(user, batch.targets)
    got = 0.0
    for rank in range(2):
        torch.manual_seed(1)
        local, shard, _ = shard_batch(batch, DistInfo(rank=rank, world_size=2, local_rank=rank, backend="gloo"))
        lo = shard.row_offset
        got = got + loss(user[lo : lo + local.targets.shape[0]], local.targets, shard)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_empty_shard_of_a_short_batch_weighs_nothing(tmp_path):
    _, _, batch = _data_and_batch(tmp_path, rows=1)
    local, shard, weight = shard_batch(batch, DistInfo(rank=0, world_size=2, local_rank=0, backend="gloo"))
    assert weight == 0.0 and local.item_ids.shape[0] == 1
    local, shard, weight = shard_batch(batch, DistInfo(rank=1, world_size=2, local_rank=1, backend="gloo"))
    assert weight == 1.0 and shard.row_offset == 0 and local.item_ids.shape[0] == 1


def test_sharded_evaluation_parts_merge_to_the_whole(tmp_path):
    config = _config(tmp_path, "unused", RUNS["seq"])
    data = prepare_data(config.data)
    torch.manual_seed(0)
    model = build_model(config.model, data.sequences.num_items, config.data.max_len).eval()
    protocol = protocol_from_config(config, "valid")  # sampled candidates: the draws must stay in step
    score = model_score_fn(model, config.data.max_len)
    whole = evaluate_ranks(score, data.sequences, protocol, 5)
    for world in (2, 3):
        parts = [evaluate_ranks(score, data.sequences, protocol, 5, shard=(r, world)) for r in range(world)]
        merged = UserRanks.merge(parts)
        assert np.array_equal(merged.users, whole.users) and np.array_equal(merged.ranks, whole.ranks)
    with pytest.raises(ValueError, match="overlap"):
        UserRanks.merge([whole, whole])


def test_cli_nproc_is_taken_out_of_the_torchrun_command():
    from genrec.cli import _without_nproc

    assert _without_nproc(["train", "--config", "c.yaml", "--nproc", "2", "--resume"]) == ["train", "--config", "c.yaml", "--resume"]
    assert _without_nproc(["-v", "train", "--nproc=4", "--config", "c.yaml"]) == ["-v", "train", "--config", "c.yaml"]


@pytest.mark.slow
def test_cli_nproc_runs_torchrun(tmp_path):
    """``genrec train --nproc 2`` end to end: torchrun starts two processes, process 0 writes the run."""
    from genrec.config import save_config

    save_config(_config(tmp_path, "cli"), tmp_path / "run.yaml")
    cmd = [sys.executable, "-m", "genrec", "train", "--config", str(tmp_path / "run.yaml"), "--nproc", "2",
           "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["distributed"]["processes"] == 2
