"""``genrec train`` with the item table sharded by TorchRec (``train.item_table_sharding``) over 2 real gloo processes.

One spawn of two processes (``torch.multiprocessing.spawn``, gloo on CPU) trains two tiny HSTU runs of two epochs of
three steps: row-wise sharding with per-position and in-batch negatives under a cosine schedule (the loss looks up
the whole table), table-wise with per-sequence negatives. The parent checks that each process held only its rows,
that the weights equal a one-process run of the same steps with the unsharded ``nn.Embedding`` trained by
``torch.optim.SGD`` and the rest by AdamW, and that the run's files hold the full, unsharded table. Skipped when
TorchRec or FBGEMM is missing.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from genrec.config import ConfigError
from genrec.data.batches import epoch_batches, training_batch
from genrec.data.dataset import prepare_data
from genrec.data.sequences import leave_one_out
from genrec.models import build_model
from genrec.train.checkpoint import load_state, load_weights
from genrec.train.distributed import shutdown
from genrec.train.loop import RetrievalObjective, _epoch_seed, train
from genrec.train.schedule import LRSchedule
from genrec.train.sharded import parameters_but_item_table

from .test_distributed import _config, _free_port, join_process_group
from .test_sharded import needs_torchrec

WORLD_SIZE = 2
COMMON = ["train.epochs=2", "train.max_steps_per_epoch=3", "train.item_table_lr=0.5", "train.weight_decay=0.01"]
RUNS = {
    "row_wise": ["train.item_table_sharding=row_wise", "train.negatives=per_position", "train.in_batch_negatives=4",
                 "train.lr_schedule=cosine", "train.warmup_epochs=0.5", *COMMON],
    "table_wise": ["train.item_table_sharding=table_wise", "train.negatives=per_sequence", *COMMON],
}  # fmt: skip


def _worker(rank: int, world_size: int, port: int, root: str) -> None:
    from pathlib import Path

    info = join_process_group(rank, world_size, port)
    try:
        root = Path(root)
        for name, extra in RUNS.items():
            results = train(_config(root, name, extra), progress=False, dist=info)
            held = results["distributed"]["item_table"]["rows_held"]
            (root / f"{name}-rows{rank}.json").write_text(json.dumps(held))
    except BaseException:
        shutdown(info, wait=False)
        raise
    shutdown(info)


def _reference(config) -> dict[str, torch.Tensor]:
    """The same steps in one process: the unsharded model, ``torch.optim.SGD`` on its item table at
    ``train.item_table_lr`` (× the schedule's factor), AdamW on the rest, the loop's batches, seeds and loss."""
    tc = config.train
    seqs = prepare_data(config.data).sequences
    split = leave_one_out(seqs, "train")
    lengths = np.minimum(split.ends - split.starts - 1, config.data.max_len)
    normalizer = float(tc.batch_size * lengths.mean())
    steps = min(math.ceil(len(lengths) / tc.batch_size), tc.max_steps_per_epoch)
    schedule = LRSchedule.from_config(tc, steps)
    torch.manual_seed(tc.seed)
    model = build_model(config.model, seqs.num_items, config.data.max_len)
    table_opt = torch.optim.SGD([model.item_emb.weight], lr=tc.item_table_lr)
    dense_opt = torch.optim.AdamW(parameters_but_item_table(model), lr=tc.lr, betas=tuple(tc.betas),
                                  weight_decay=tc.weight_decay)  # fmt: skip
    objective = RetrievalObjective(model, seqs.num_items, tc, use_bf16=False)
    for epoch in range(1, tc.epochs + 1):
        torch.manual_seed(_epoch_seed(tc.seed, epoch))
        batches = epoch_batches(lengths, tc.batch_size, np.random.default_rng([tc.seed, epoch]), tc.length_buckets)
        model.train()
        for step, rows in enumerate(batches[:steps], start=1):
            lr = schedule.for_step((epoch - 1) * steps + step - 1)
            loss = objective(training_batch(seqs, split, rows, config.data.max_len), normalizer)
            table_opt.zero_grad(set_to_none=True)
            dense_opt.zero_grad(set_to_none=True)
            loss.backward()
            table_opt.param_groups[0]["lr"] = tc.item_table_lr * lr / tc.lr
            dense_opt.param_groups[0]["lr"] = lr
            table_opt.step()
            dense_opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_training")
    torch.multiprocessing.spawn(_worker, args=(WORLD_SIZE, _free_port(), str(root)), nprocs=WORLD_SIZE, join=True)
    return root


@needs_torchrec
@pytest.mark.parametrize("name", list(RUNS))
def test_each_process_held_only_its_rows(sharded_runs, name):
    rows = {r: json.loads((sharded_runs / f"{name}-rows{r}.json").read_text()) for r in range(WORLD_SIZE)}
    num_rows = load_file(str(sharded_runs / name / "best.safetensors"))["item_emb.weight"].shape[0]
    spans = sorted(tuple(span) for held in rows.values() for span in held)
    assert spans[0][0] == 0 and spans[-1][1] == num_rows  # together they tile the table...
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    if name == "row_wise":  # ...and neither process holds all of it
        assert all(len(held) == 1 and held[0][1] - held[0][0] < num_rows for held in rows.values())
    else:  # one process holds the whole table, the other none of it
        assert sorted(len(held) for held in rows.values()) == [0, 1]


@needs_torchrec
@pytest.mark.parametrize("name", list(RUNS))
def test_sharded_training_equals_unsharded_sgd(sharded_runs, name):
    config = _config(sharded_runs, name, RUNS[name])
    want = _reference(config)
    got = load_state(sharded_runs / name / "checkpoint.pt")
    assert got["train_state"]["epoch"] == 2
    assert got["model"].keys() == want.keys()  # the unsharded model's state dict
    for key in want:
        diff = float((got["model"][key] - want[key]).abs().max())
        assert diff < 1e-5, (key, diff)
    torch.manual_seed(config.train.seed)
    start = build_model(config.model, want["item_emb.weight"].shape[0] - 1, config.data.max_len).item_emb.weight
    assert float((want["item_emb.weight"] - start).abs().max()) > 1e-2  # the table did train


@needs_torchrec
@pytest.mark.parametrize("name", list(RUNS))
def test_best_weights_hold_the_full_table(sharded_runs, name):
    config = _config(sharded_runs, name, RUNS[name])
    tensors = load_file(str(sharded_runs / name / "best.safetensors"))
    seqs = prepare_data(config.data).sequences
    model = build_model(config.model, seqs.num_items, config.data.max_len)
    assert tuple(tensors["item_emb.weight"].shape) == (seqs.num_items + 1, config.model.embedding_dim)
    load_weights(sharded_runs / name / "best.safetensors", model)  # a one-process model loads it as it is
    results = json.loads((sharded_runs / name / "results.json").read_text())
    assert results["distributed"]["item_table"]["sharding"] == name
    best = results["best_epoch"]
    if best == 2:  # the last epoch's weights: those of the checkpoint
        last = load_state(sharded_runs / name / "checkpoint.pt")["model"]
        assert all(torch.equal(tensors[k], last[k]) for k in last)


def test_sharding_needs_a_data_parallel_run(tmp_path):
    config = _config(tmp_path, "run", ["train.item_table_sharding=row_wise"])
    with pytest.raises(ConfigError, match="data-parallel run"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_only_sgd_is_accepted_for_a_sharded_table(tmp_path):
    with pytest.raises(ConfigError, match="train.item_table_optimizer.*one update per lookup"):
        _config(tmp_path, "run", ["train.item_table_sharding=row_wise", "train.item_table_optimizer=rowwise_adagrad"])
    _config(tmp_path, "run", ["train.item_table_optimizer=rowwise_adagrad"])  # unsharded: the option is unused
