"""Data-parallel ranking training (genrec.train.ranking with genrec.train.distributed): N real gloo processes train
the one-process ranker.

The two-process tests start real processes (``torch.multiprocessing.spawn``, gloo on CPU) on a tiny synthetic event
log: the weights after an epoch equal those of a one-process run with the same global batch, a two-process
checkpoint resumes in one process exactly like an uninterrupted one-process run, and the sharded predictions equal
the one-process ones bit for bit. The rest checks the pieces in-process.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from genrec.config import ConfigError, RankingModelConfig
from genrec.train.checkpoint import load_state, load_weights
from genrec.train.distributed import DistInfo, shutdown
from genrec.train.ranking import (
    RankingObjective,
    _ranking_rows,
    _shard_scale,
    build_ranker,
    predict,
    train_ranker,
)

from .test_ranking import make_config, synthetic_dataset
from .test_distributed import _free_port, _max_difference, join_process_group

HSTU = {"embedding_dim": 16, "num_blocks": 1, "num_heads": 1, "attention_dim": 8, "linear_dim": 8,
        "dropout": 0.2, "linear_dropout": 0.2}  # fmt: skip

# 21 users, 13 events each: 63 training rows. "summed": global batch 2, so the last batch has one row and process 1
# takes part with none; "interleaved": global batch 10 (last batch 3 rows: 1 + 2), learning from the history labels
# too. Both with dropout, so every mask must be the one-process run's. "popularity" is fitted by counting.
RUNS = {
    "summed": ("hstu-ranker", HSTU, {"batch_size": 2}),
    "interleaved": ("hstu-ranker", {**HSTU, "variant": "interleaved"}, {"batch_size": 10}),
    "popularity": ("popularity", {}, {"batch_size": 10}),
}


def _dataset():
    return synthetic_dataset(num_users=21, events=13)


def _config(root, run: str, out: str, **train):
    name, params, settings = RUNS[run]
    config = make_config(root, name, **{"epochs": 1, "select_metric": "NE", "lr": 0.01, **settings, **train})
    return dataclasses.replace(config, model=RankingModelConfig(name=name, params=params), output_dir=str(root / out))


def _worker(rank: int, world_size: int, port: int, root: str) -> None:
    """One process of the two-process run: train every RUNS config for one epoch, then predict the valid and test
    parts with the one-process "summed" run's best weights, sharded (process 0 writes them for the parent)."""
    from pathlib import Path

    info = join_process_group(rank, world_size, port)
    try:
        root = Path(root)
        dataset = _dataset()
        for run in RUNS:
            train_ranker(_config(root, run, f"two-{run}"), dataset=dataset, progress=False, dist=info)
        model = build_ranker(RankingModelConfig(name="hstu-ranker", params=HSTU), dataset.schema, max_history=12)
        load_weights(root / "one-summed-e1" / "best.safetensors", model)
        found = {}
        for part in ("valid", "test"):
            pred = predict(model, dataset, part, batch_size=7, max_history=12, max_candidates=3, dist=info)
            found[part] = {k: getattr(pred, k).tolist() for k in ("user_ids", "item_ids", "probs", "labels")}
        if info.is_main:
            (root / "sharded_predictions.json").write_text(json.dumps(found))
    except BaseException:
        shutdown(info, wait=False)
        raise
    shutdown(info)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One-process reference runs, then the two-process runs (one spawn for all of them)."""
    root = tmp_path_factory.mktemp("dist-ranking")
    dataset = _dataset()
    for run in RUNS:
        train_ranker(_config(root, run, f"one-{run}-e1"), dataset=dataset, progress=False)
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(root)), nprocs=2, join=True)
    return root


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("run", list(RUNS))
def test_two_processes_train_the_one_process_weights(two_process_run, run):
    root = two_process_run
    one = load_state(root / f"one-{run}-e1" / "checkpoint.pt")
    two = load_state(root / f"two-{run}" / "checkpoint.pt")
    assert _max_difference(one["model"], two["model"]) < 1e-5
    if one["optimizer"]:
        assert _max_difference(one["optimizer"]["state"][0], two["optimizer"]["state"][0]) < 1e-5
    # every dropout mask was drawn for the global batch: the generator is left where one process leaves it
    assert torch.equal(one["torch_rng"], two["torch_rng"])
    log_one, log_two = _log(root / f"one-{run}-e1"), _log(root / f"two-{run}")
    if log_one[0]["loss"] is not None:  # all-reduced: the global batches' losses
        assert log_two[0]["loss"] == pytest.approx(log_one[0]["loss"], rel=1e-5)
        for task, value in log_one[0]["task_losses"].items():
            assert log_two[0]["task_losses"][task] == pytest.approx(value, rel=1e-5)
    for task, metrics in log_one[0]["valid"].items():  # validation on the gathered predictions
        assert log_two[0]["valid"][task]["auc"] == pytest.approx(metrics["auc"], abs=1e-4)
    results = json.loads((root / f"two-{run}" / "results.json").read_text())
    assert results["distributed"] == {"processes": 2, "backend": "gloo"}
    assert set(load_file(str(root / f"two-{run}" / "best.safetensors"))) == set(two["model"])
    assert not list((root / f"two-{run}").glob("*.tmp"))


def test_two_process_checkpoint_resumes_in_one_process(two_process_run):
    """The two-process checkpoint of epoch 1 holds nothing of the process count: one process resumes it, keeps its
    log, and ends epoch 2 where an uninterrupted one-process run does."""
    root = two_process_run
    dataset = _dataset()
    uninterrupted = train_ranker(_config(root, "interleaved", "one-interleaved-e2", epochs=2), dataset=dataset,
                                 progress=False)  # fmt: skip
    shutil.copytree(root / "two-interleaved", root / "resumed-interleaved")  # the other tests read the original
    resumed = train_ranker(_config(root, "interleaved", "resumed-interleaved", epochs=2), dataset=dataset,
                           resume=True, progress=False)  # fmt: skip
    a = load_state(root / "one-interleaved-e2" / "checkpoint.pt")
    b = load_state(root / "resumed-interleaved" / "checkpoint.pt")
    assert b["train_state"]["epoch"] == 2
    assert _max_difference(a["model"], b["model"]) < 1e-5
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    log_a, log_b = _log(root / "one-interleaved-e2"), _log(root / "resumed-interleaved")
    assert len(log_b) == 2 and log_b[0] == _log(root / "two-interleaved")[0]
    assert log_b[1]["loss"] == pytest.approx(log_a[1]["loss"], rel=1e-5)
    assert resumed["best_epoch"] == uninterrupted["best_epoch"]
    assert resumed["test"]["metrics"].keys() == uninterrupted["test"]["metrics"].keys()


def test_sharded_predictions_equal_one_process(two_process_run):
    root = two_process_run
    found = json.loads((root / "sharded_predictions.json").read_text())
    dataset = _dataset()
    model = build_ranker(RankingModelConfig(name="hstu-ranker", params=HSTU), dataset.schema, max_history=12)
    load_weights(root / "one-summed-e1" / "best.safetensors", model)
    for part in ("valid", "test"):
        want = predict(model, dataset, part, batch_size=7, max_history=12, max_candidates=3)
        assert found[part] == {k: getattr(want, k).tolist() for k in ("user_ids", "item_ids", "probs", "labels")}


# ---------------------------------------------------------------------------------------------- in-process pieces


def test_batch_size_and_balancing_are_checked_first(tmp_path):
    info = DistInfo(rank=0, world_size=3, local_rank=0, backend="gloo")
    with pytest.raises(ValueError, match=r"train.batch_size=10 .* must divide by the 3 processes"):
        train_ranker(_config(tmp_path, "summed", "run", batch_size=10), dataset=_dataset(), progress=False, dist=info)
    with pytest.raises(ConfigError, match="task_balancing: 'uncertainty' .* data-parallel"):
        train_ranker(_config(tmp_path, "summed", "run", batch_size=9, task_balancing="uncertainty"),
                     dataset=_dataset(), progress=False, dist=info)  # fmt: skip
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("variant", ["summed", "interleaved"])
@pytest.mark.parametrize("weighted", [False, True])
def test_shard_losses_average_to_the_global_batch_gradient(variant, weighted):
    """What DDP computes, in one process: the mean over the shards of the scaled shard objectives has the gradient
    of the whole batch's loss, with and without label weights (which make each task's normaliser its own)."""
    dataset = _dataset()
    batch = next(iter(dataset.batches("train", 9, shuffle=False, max_history=12, max_candidates=3,
                                      with_hist_labels=variant == "interleaved")))  # fmt: skip
    if weighted:
        g = torch.Generator().manual_seed(0)
        w = torch.rand(batch.labels.shape, generator=g) * (torch.rand(batch.labels.shape, generator=g) > 0.3)
        w[:4, :, 1] = 0.0  # task "love" has no label in the first shard
        batch = dataclasses.replace(batch, label_weights=w)
    torch.manual_seed(0)
    model = build_ranker(RankingModelConfig(name="hstu-ranker", params={**HSTU, "variant": variant, "dropout": 0.0,
                                                                        "linear_dropout": 0.0}),
                         dataset.schema, task_weights=(1.0, 0.5), max_history=12)  # fmt: skip
    model.train()
    model.loss(batch)[0].backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    objective = RankingObjective(model)
    world = 3
    for rank, (lo, hi) in enumerate([(0, 4), (4, 7), (7, 9)]):
        part = _ranking_rows(batch, lo, hi)
        scale = _shard_scale(model, batch, part, world)
        assert isinstance(scale, torch.Tensor) == weighted
        loss, _ = objective(part, scale)
        (loss / world).backward()  # DDP averages the processes' gradients
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    assert max(float((got[n] - want[n]).abs().max()) for n in want) < 1e-6


def test_a_process_without_rows_adds_nothing():
    dataset = _dataset()
    batch = next(iter(dataset.batches("train", 3, shuffle=False, max_history=12, max_candidates=3)))
    model = build_ranker(RankingModelConfig(name="hstu-ranker", params=HSTU), dataset.schema, max_history=12)
    assert _shard_scale(model, batch, None, 2) == 0.0
    weighted = dataclasses.replace(batch, label_weights=torch.ones_like(batch.labels))
    assert torch.equal(_shard_scale(model, weighted, None, 2), torch.zeros(2, dtype=torch.float64))
    whole = _shard_scale(model, weighted, weighted, 1)
    assert torch.allclose(whole, torch.ones(2, dtype=torch.float64))
    assert np.isclose(_shard_scale(model, batch, batch, 1), 1.0)
