"""Sharded item tables (genrec.train.sharded): TorchRec row-wise and table-wise sharding over 2 real gloo processes.

One spawn of two processes (``torch.multiprocessing.spawn``, gloo on CPU) runs every case on a tiny synthetic
problem: a table of 11 rows (an uneven row-wise split) that serves an example's history and target ids, like a
retrieval model's item table, a replicated dense layer, and a learning rate that decays every step. Each process
records the rows it holds, and the gathered table and dense weights after STEPS steps; the parent compares them with
the unsharded model (``nn.Embedding``, the plain PyTorch optimizer) trained on the whole global batch in one process.
Skipped, with the install lines, when TorchRec or FBGEMM is missing.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from genrec.train.distributed import DistInfo, shutdown
from genrec.train.sharded import INSTALL_HINT, require_torchrec

from .test_distributed import _free_port, join_process_group

try:
    require_torchrec()
    HAVE_TORCHREC, WHY = True, ""
except ImportError as exc:
    HAVE_TORCHREC, WHY = False, f"TorchRec/FBGEMM not installed ({exc})"

needs_torchrec = pytest.mark.skipif(not HAVE_TORCHREC, reason=WHY)

NUM_ROWS, DIM = 11, 4
GLOBAL_BATCH, HISTORY = 6, 3  # 6 examples of 3 history ids and 1 target id; 3 examples per process
STEPS = 3
WORLD_SIZE = 2
LR = {"sgd": 0.5, "rowwise_adagrad": 0.1, "adagrad": 0.1}
EPS = 1e-8  # the adagrads' epsilon, given to both the fused and the reference optimizer
CASES = [(s, o) for s in ("row_wise", "table_wise") for o in ("sgd", "rowwise_adagrad", "adagrad")]


class TinyRetriever(nn.Module):
    """score = <mean of a dense map of the history's rows, the target's row>: the table serves both sides.

    The history and target ids go through the table in one lookup: under a fused optimizer each lookup's backward
    is one optimizer update, and Adagrad must see a row's whole gradient of the step at once."""

    def __init__(self, table: nn.Module) -> None:
        super().__init__()
        self.table = table
        self.dense = nn.Linear(DIM, DIM)

    def forward(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, n = history.shape
        rows = self.table(torch.cat([history.reshape(-1), target]))  # [B * N + B, d]
        h = self.dense(rows[: b * n].view(b, n, DIM)).mean(dim=1)  # [B, d]
        return (h * rows[b * n :]).sum(dim=-1)  # [B]


def _lr(optimizer: str, step: int) -> float:
    """The table's learning rate at ``step``: a schedule, so that the test covers handing it to the fused kernels."""
    return LR[optimizer] / (1 + step)


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(history [B, HISTORY], target [B], label [B]) of the global batch of ``step``; ids repeat within a batch."""
    g = torch.Generator().manual_seed(100 + step)
    history = torch.randint(1, NUM_ROWS, (GLOBAL_BATCH, HISTORY), generator=g)
    target = torch.randint(1, NUM_ROWS, (GLOBAL_BATCH,), generator=g)
    label = torch.randn(GLOBAL_BATCH, generator=g)
    return history, target, label


def _initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "table": torch.randn(NUM_ROWS, DIM, generator=g) * 0.5,
        "dense.weight": torch.randn(DIM, DIM, generator=g) * 0.5,
        "dense.bias": torch.randn(DIM, generator=g) * 0.1,
    }


def _reference_optimizer(optimizer: str, params, lr: float) -> torch.optim.Optimizer:
    """The plain-PyTorch optimizer the fused one equals, on the unsharded table."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=EPS)
    from torchrec.optim import RowWiseAdagrad

    return RowWiseAdagrad(params, lr=lr, eps=EPS)


def _unsharded(optimizer: str) -> dict[str, torch.Tensor]:
    """The reference: one process, the whole global batch, loss = mean squared error over it."""
    init = _initial()
    model = TinyRetriever(nn.Embedding(NUM_ROWS, DIM))
    with torch.no_grad():
        model.table.weight.copy_(init["table"])
        model.dense.weight.copy_(init["dense.weight"])
        model.dense.bias.copy_(init["dense.bias"])
    table_opt = _reference_optimizer(optimizer, [model.table.weight], LR[optimizer])
    dense_opt = torch.optim.SGD(model.dense.parameters(), lr=0.1)
    for step in range(STEPS):
        history, target, label = _data(step)
        for group in table_opt.param_groups:
            group["lr"] = _lr(optimizer, step)
        loss = ((model(history, target) - label) ** 2).sum() / GLOBAL_BATCH
        table_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        table_opt.step()
        dense_opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sharded(info: DistInfo, sharding: str, optimizer: str) -> dict:
    """This process's run of one case: its shard of the table, and the gathered weights after STEPS steps."""
    from genrec.train.sharded import (
        ItemTable,
        dense_parameters,
        fuse_optimizer,
        gather_full_table,
        load_full_table,
        local_shards,
        shard_item_table,
    )

    init = _initial()
    table = ItemTable(NUM_ROWS, DIM, name="item")
    model = TinyRetriever(table)
    with torch.no_grad():
        model.dense.weight.copy_(init["dense.weight"])
        model.dense.bias.copy_(init["dense.bias"])
    fuse_optimizer(table, optimizer, lr=LR[optimizer], eps=EPS)
    dmp = shard_item_table(model, info, sharding=sharding, batch_size=GLOBAL_BATCH // info.world_size)
    load_full_table(dmp, "item", init["table"])
    dense_opt = torch.optim.SGD(dense_parameters(dmp), lr=0.1)
    rows = GLOBAL_BATCH // info.world_size
    lo, hi = info.rank * rows, (info.rank + 1) * rows
    for step in range(STEPS):
        history, target, label = _data(step)
        for group in dmp.fused_optimizer.param_groups:
            group["lr"] = _lr(optimizer, step)
        dmp.fused_optimizer.zero_grad()  # hands the learning rate to the kernels before this step's backward
        # genrec's data-parallel loss: N × this process's share of the global loss; DDP averages the dense
        # gradients and TorchRec divides the rows' gradients by N, so both get the global gradient.
        pred = dmp(history[lo:hi], target[lo:hi])  # [rows]
        loss = ((pred - label[lo:hi]) ** 2).sum() / GLOBAL_BATCH * info.world_size
        dense_opt.zero_grad()
        loss.backward()  # the table's rows are updated here, by the fused optimizer
        dense_opt.step()
        dmp.fused_optimizer.step()  # updates nothing (done in backward); the call a training loop makes anyway
    dense = {k.split("dense.")[-1]: v.detach().clone() for k, v in dmp.state_dict().items() if ".dense." in f".{k}"}
    return {
        "shards": [(s.row_offset, s.num_rows, s.embedding_dim) for s in local_shards(dmp)],
        "table": gather_full_table(dmp, "item"),
        "dense.weight": dense["weight"],
        "dense.bias": dense["bias"],
    }



def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    info = join_process_group(rank, world_size, port)
    try:
        results = {case: _sharded(info, *case) for case in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        shutdown(info, wait=False)
        raise
    shutdown(info)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """{rank: {case: result}} of one two-process spawn that runs every case."""
    out = tmp_path_factory.mktemp("sharded")
    torch.multiprocessing.spawn(_worker, args=(WORLD_SIZE, _free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    return {rank: torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)}


@needs_torchrec
@pytest.mark.parametrize("sharding", ["row_wise", "table_wise"])
def test_each_process_holds_only_its_rows(two_processes, sharding):
    shards = {rank: two_processes[rank][(sharding, "sgd")]["shards"] for rank in range(WORLD_SIZE)}
    every = sorted(s for rank in shards for s in shards[rank])
    # The shards tile the table: whole rows, no overlap, no gap.
    assert all(d == DIM for _, _, d in every)
    assert [o for o, _, _ in every] == [0] + [o + n for o, n, _ in every[:-1]]
    assert sum(n for _, n, _ in every) == NUM_ROWS
    if sharding == "row_wise":  # a contiguous block each, neither the whole table
        assert shards == {0: [(0, 6, DIM)], 1: [(6, 5, DIM)]}
    else:  # one process holds the whole table, the other nothing
        assert sorted(len(s) for s in shards.values()) == [0, 1]


@needs_torchrec
@pytest.mark.parametrize("sharding,optimizer", CASES)
def test_sharded_training_equals_unsharded(two_processes, sharding, optimizer):
    expected = _unsharded(optimizer)
    init = _initial()
    assert (expected["table.weight"] - init["table"]).abs().max() > 1e-2  # the rows did move
    for rank in range(WORLD_SIZE):
        got = two_processes[rank][(sharding, optimizer)]
        assert torch.allclose(got["table"], expected["table.weight"], atol=1e-5, rtol=1e-5), (
            rank, float((got["table"] - expected["table.weight"]).abs().max()))  # fmt: skip
        assert torch.allclose(got["dense.weight"], expected["dense.weight"], atol=1e-5, rtol=1e-5)
        assert torch.allclose(got["dense.bias"], expected["dense.bias"], atol=1e-5, rtol=1e-5)


def test_missing_torchrec_names_the_install_lines(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchrec", None)  # what Python does for a package that is not installed
    with pytest.raises(ImportError, match="pip install --no-deps torchrec") as info:
        require_torchrec()
    assert INSTALL_HINT in str(info.value)


def test_the_base_package_imports_without_torchrec():
    """genrec.train.sharded (and so genrec) imports nothing of TorchRec at import time."""
    import subprocess

    code = ("import sys; sys.modules['torchrec'] = None; sys.modules['fbgemm_gpu'] = None; "
            "import genrec.train.sharded, genrec.train.loop")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
