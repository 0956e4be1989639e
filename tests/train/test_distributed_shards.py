"""Rank-local data (``data.shard_by_rank``, genrec.train.rank_local): two real gloo processes each read only their own
partitions of a tiny preprocessed directory, train, and evaluate all users together.

The processes check their own shares (disjoint, together every user, nothing of the other partitions) and write
what they saw; the parent compares the gathered evaluation with a one-process evaluation of the final weights on the
whole data, rank for rank.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("polars")

from genrec.config import ConfigError, load_config  # noqa: E402
from genrec.data.batches import training_batch  # noqa: E402
from genrec.data.dataset import prepare_data  # noqa: E402
from genrec.data.sequences import leave_one_out  # noqa: E402
from genrec.data.shards import ShardedSequences  # noqa: E402
from genrec.eval.evaluate import UserRanks, evaluate_ranks, metrics_from_user_ranks, model_score_fn  # noqa: E402
from genrec.eval.protocol import protocol_from_config  # noqa: E402
from genrec.models import build_model  # noqa: E402
from genrec.train.checkpoint import load_state, load_weights  # noqa: E402
from genrec.train.distributed import gather_objects, shutdown  # noqa: E402
from genrec.train.loop import RetrievalObjective, _evaluate_ranks, train  # noqa: E402
from genrec.train.rank_local import StepPlan, epoch_batches_local  # noqa: E402

from ..conftest import synthetic_interactions  # noqa: E402
from .test_distributed import _free_port, join_process_group  # noqa: E402

NUM_USERS = 45  # users 0, 2, 4, ... on process 0 (23), the odd ones on process 1 (22)
PARTITIONS = 4  # process r of 2 owns partitions r and r + 2
WORLD = 2
# One deterministic step (no dropout, every item a negative), to compare with one process on the union batch.
STEP = ["train.epochs=1", "train.max_steps_per_epoch=1", "train.negatives=full", "train.in_batch_negatives=0",
        "train.stochastic_length_alpha=0", "model.dropout=0", "model.linear_dropout=0"]  # fmt: skip


def _preprocessed(root):
    """The tiny preprocessed directory (written once per module)."""
    from genrec.data.preprocess import preprocess_interactions

    directory = root / "pre"
    if not (directory / "manifest.json").exists():
        synthetic_interactions(num_users=NUM_USERS).to_csv(root / "inter.csv", index=False)
        preprocess_interactions(root / "inter.csv", directory, user="user", item="item", timestamp="timestamp",
                                partitions=PARTITIONS)  # fmt: skip
    return directory


def _config(root, name, extra=()):
    return load_config(None, [
        "data.dataset=preprocessed", f"data.path={_preprocessed(root)}", "data.shard_by_rank=true",
        "data.max_len=12", "model.name=hstu", "model.embedding_dim=8", "model.num_blocks=1", "model.num_heads=2",
        "model.attention_dim=4", "model.linear_dim=4", "model.dropout=0.2", "model.linear_dropout=0.2",
        "train.batch_size=4", "train.epochs=2", "train.num_negatives=16", "train.eval_batch_size=5",
        "train.in_batch_negatives=2", "train.stochastic_length_alpha=1.6", "train.length_buckets=2",
        "train.lr=0.01", "train.num_threads=1", f"output_dir={root / name}", *extra,
    ])  # fmt: skip


def _worker(rank: int, world_size: int, port: int, root: str) -> None:
    """One process: check its share of the data, train, then evaluate the run's best weights rank-locally."""
    from pathlib import Path

    info = join_process_group(rank, world_size, port)
    try:
        root = Path(root)
        config = _config(root, "run")
        data = prepare_data(config.data, shard=(rank, world_size))
        mine = data.user_index
        # (a) only this process's partitions, and with the others' shares: disjoint, every user once
        assert set((mine % PARTITIONS).tolist()) == {rank, rank + world_size}
        shares = gather_objects(mine.tolist(), info)
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == list(range(ShardedSequences(config.data.path).num_users))
        results = train(config, progress=False, dist=info)
        train(_config(root, "step", STEP), progress=False, dist=info)
        # what train itself read: this process's partitions only (the shard reader's note names them)
        assert any(f"shard {rank} of {world_size} " in n and f"partitions [{rank}, {rank + world_size}]" in n
                   for n in results["data"]["notes"])  # fmt: skip
        model = build_model(config.model, data.sequences.num_items, config.data.max_len)
        load_weights(root / "run" / "best.safetensors", model)  # written by process 0 before the test evaluation
        model.eval()
        found = {}
        for target in ("valid", "test"):
            got = _evaluate_ranks(model, data.sequences, protocol_from_config(config, target), config,
                                  torch.device("cpu"), info, data.user_index)  # fmt: skip
            found[target] = {"users": got.users.tolist(), "ranks": got.ranks.tolist()}
        (root / f"rank{rank}.json").write_text(json.dumps({"users": mine.tolist(), "found": found,
                                                           "test": results["test"]["metrics"]}))  # fmt: skip
    except BaseException:
        shutdown(info, wait=False)
        raise
    shutdown(info)


@pytest.fixture(scope="module")
def rank_local_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    _preprocessed(root)
    torch.multiprocessing.spawn(_worker, args=(WORLD, _free_port(), str(root)), nprocs=WORLD, join=True)
    return root


def test_each_process_holds_only_its_partitions_users(rank_local_run):
    root = rank_local_run
    shares = [json.loads((root / f"rank{r}.json").read_text())["users"] for r in range(WORLD)]
    for rank, users in enumerate(shares):
        assert users and all(u % PARTITIONS in (rank, rank + WORLD) for u in users)
    assert sorted(shares[0] + shares[1]) == list(range(NUM_USERS))


def test_rank_local_run_completes(rank_local_run):
    root = rank_local_run
    results = json.loads((root / "run" / "results.json").read_text())
    assert results["epochs_run"] == 2
    local = results["distributed"]["rank_local_data"]
    # 12 and 11 local batches of 2 rows: both processes run 11 steps, process 0 leaves one row out of each epoch
    assert local == {"rows_per_process": [23, 22], "steps_per_epoch": 11, "rows_per_process_and_step": 2,
                     "rows_left_out_per_epoch_at_least": [1, 0]}  # fmt: skip
    assert results["data"]["summary"].startswith(f"{NUM_USERS:,} users")
    log = [json.loads(line) for line in open(root / "run" / "log.jsonl")]
    assert len(log) == 2 and all(np.isfinite(row["loss"]) for row in log)
    popularity = json.loads((root / "run" / "popularity.json").read_text())["counts"]
    whole = prepare_data(_config(root, "unused").data).sequences
    assert sum(popularity.values()) == len(whole.items)  # every process's interactions


def test_gathered_evaluation_equals_one_process_on_all_data(rank_local_run):
    root = rank_local_run
    config = _config(root, "unused")
    whole = prepare_data(config.data).sequences  # one process: every partition
    model = build_model(config.model, whole.num_items, config.data.max_len)
    load_weights(root / "run" / "best.safetensors", model)
    model.eval()
    saved = UserRanks.load(root / "run" / "test_ranks.npz")
    for rank in range(WORLD):
        got = json.loads((root / f"rank{rank}.json").read_text())
        for target in ("valid", "test"):
            protocol = protocol_from_config(config, target)
            want = evaluate_ranks(model_score_fn(model, config.data.max_len), whole, protocol,
                                  config.train.eval_batch_size)  # fmt: skip
            assert got["found"][target] == {"users": want.users.tolist(), "ranks": want.ranks.tolist()}
            if target == "test":
                assert got["test"] == metrics_from_user_ranks(want, protocol)  # the run's reported metrics
                assert np.array_equal(saved.users, want.users) and np.array_equal(saved.ranks, want.ranks)
    assert len(saved.users) + saved.repeat_targets == NUM_USERS  # every user ranked, or left out as a repeat


def test_shard_by_rank_needs_a_preprocessed_directory_and_full_candidates(tmp_path):
    with pytest.raises(ConfigError, match="data.shard_by_rank: True needs data.dataset=preprocessed"):
        load_config(None, ["data.dataset=ml-1m", "data.shard_by_rank=true"])
    with pytest.raises(ConfigError, match="cannot be used with eval.candidates=sampled"):
        load_config(None, ["data.dataset=preprocessed", f"data.path={tmp_path}", "data.shard_by_rank=true",
                           "eval.candidates=sampled"])  # fmt: skip
    with pytest.raises(ValueError, match="needs data.dataset=preprocessed"):
        prepare_data(load_config(None, ["data.dataset=ml-1m"]).data, shard=(0, 2))


def test_a_step_is_the_step_of_the_union_of_the_local_batches(rank_local_run):
    """The gradient DistributedDataParallel applies is that of the global batch (the union of the local ones)
    under the global loss normaliser: one process replays the step on the two local batches."""
    root = rank_local_run
    config = _config(root, "unused", STEP)
    tc = config.train
    whole = prepare_data(config.data).sequences
    split = leave_one_out(whole, "train")
    normalizer = tc.batch_size * float(np.minimum(split.ends - split.starts - 1, config.data.max_len).mean())
    torch.manual_seed(tc.seed)
    model = build_model(config.model, whole.num_items, config.data.max_len)
    objective = RetrievalObjective(model, whole.num_items, tc, use_bf16=False)
    loss = 0.0
    for rank in range(WORLD):
        share = prepare_data(config.data, shard=(rank, WORLD)).sequences
        split = leave_one_out(share, "train")
        lengths = np.minimum(split.ends - split.starts - 1, config.data.max_len)
        plan = StepPlan(batch_size=tc.batch_size // WORLD, steps_per_epoch=1, rows=[], left_out=[])
        rows = epoch_batches_local(lengths, plan, tc.seed, 1, rank, tc.length_buckets)[0]
        loss = loss + objective(training_batch(share, split, rows, config.data.max_len), normalizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    loss.backward()
    optimizer.step()
    log = [json.loads(line) for line in open(root / "step" / "log.jsonl")]
    assert log[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)  # the global batch's loss
    got = load_state(root / "step" / "checkpoint.pt")["model"]
    want = model.state_dict()
    assert got.keys() == want.keys()
    assert max(float((got[k] - want[k]).abs().max()) for k in got) < 1e-6
