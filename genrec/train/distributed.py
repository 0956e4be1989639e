"""Multi-process data-parallel training with ``torch.distributed``: the plumbing the training loop uses.

A run on N processes (``torchrun --nproc_per_node N -m genrec train ...``, or ``genrec train --nproc N``) trains the
same model as a run on one process with the same ``train.batch_size``:

- **Same global batch.** Every process computes the epoch's batch order (``epoch_batches``, from the seed) and builds
  the whole global batch of each step, then keeps its contiguous slice of rows (``shard_bounds``): B / N rows each,
  so ``train.batch_size`` must divide by N (``check_batch_size``). The batch keeps the global batch's width, so every
  process sees tensors of the same shape.
- **Same randomness.** Negatives are drawn for the global batch on every process and sliced
  (``genrec.train.loss.GlobalBatchShard``); dropout masks likewise (``global_batch_dropout``). Every process thus
  consumes the torch generator exactly as one process would, and each example gets the mask and negatives it gets
  in a one-process run.
- **Same gradient.** The loss of a shard is its sum over positions divided by the global normaliser / N;
  DistributedDataParallel averages the N gradients, which gives the gradient of the global sum / normaliser.
- **Same evaluation.** Evaluation batches are dealt round-robin (``evaluate_ranks(..., shard=...)``) and the per-user
  ranks gathered on every process (``gather_objects``), so metrics are exactly the one-process ones.
- **One writer.** Process 0 alone checks and writes the run directory (atomic writes, as in one-process runs); its
  checks' outcome, and a resumed checkpoint, reach the other processes by broadcast (``run_on_main``). A checkpoint
  holds no trace of the process count, so a run can resume on any number of processes.

The ranking loop (``genrec.train.ranking``, ``genrec train-ranker --nproc N``) uses the same pieces: global batches cut
by rows (``RowShard`` for its dropout masks; rankers draw no negatives), each process's per-task losses scaled by its
share of the batch's labels, evaluation batches dealt round-robin and the predictions gathered in order.

The backend follows the device: NCCL for CUDA (process ``LOCAL_RANK`` takes ``cuda:LOCAL_RANK``), gloo otherwise.
Nothing here is global state: ``init_from_env`` returns a ``DistInfo`` that is passed to whatever needs it.

With ``data.shard_by_rank`` on a preprocessed directory, each process reads only its own users instead and the run
is no longer the one-process run step by step; ``genrec.train.rank_local`` describes that mode.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from genrec.data.batches import Batch
from genrec.train.loss import GlobalBatchShard

T = TypeVar("T")

# The environment torchrun gives each process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a data-parallel run: ``rank`` of ``world_size`` processes, ``local_rank`` on its
    machine, and the ``backend`` of the process group ("gloo" or "nccl")."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes files and logs."""
        return self.rank == 0


def launched_by_torchrun(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started by torchrun (``WORLD_SIZE`` and the other variables are set)."""
    return all(name in env for name in TORCHRUN_VARIABLES)


def backend_for(device: str) -> str:
    """The process-group backend for a ``train.device``: NCCL for CUDA, gloo for everything else (CPU)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: str, timeout_minutes: float = 30.0) -> DistInfo | None:
    """Join the process group described by torchrun's environment variables (``os.environ``: ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); ``None`` when not launched by torchrun.

    The backend follows ``device`` (``backend_for``); with CUDA, this process's current device becomes
    ``cuda:LOCAL_RANK`` before the group is formed (NCCL needs it). Call ``shutdown`` when done.
    """
    env = os.environ
    if not launched_by_torchrun(env):
        missing = [name for name in TORCHRUN_VARIABLES if name not in env]
        if "WORLD_SIZE" in env or "RANK" in env:
            raise ValueError(f"distributed training: incomplete torchrun environment ({', '.join(missing)} not set)")
        return None
    try:
        rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except ValueError:
        raise ValueError("distributed training: RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not (world_size >= 1 and 0 <= rank < world_size and local_rank >= 0):
        raise ValueError(f"distributed training: RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} are inconsistent")
    backend = backend_for(device)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={device!r}, but this PyTorch build sees no CUDA device (use train.device=cpu)")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank}, but this machine has {torch.cuda.device_count()} CUDA device(s): start at "
                "most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )  # fmt: skip
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def shutdown(info: DistInfo | None, wait: bool = True) -> None:
    """Leave the process group ``init_from_env`` joined (nothing when ``info`` is None).

    ``wait``: the processes first wait for each other, so none closes its connections while another still completes
    its last collective. Pass False when leaving on an error, which the other processes may not have met (they
    would never reach the barrier)."""
    if info is not None and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def training_device(device: str, info: DistInfo | None) -> torch.device:
    """The device this process trains on: ``device`` itself, or for data-parallel CUDA runs ``cuda:LOCAL_RANK``
    (each process owns one GPU; an explicit ``cuda:N`` would put every process on the same one)."""
    dev = torch.device(device)
    if info is None or dev.type != "cuda":
        return dev
    if dev.index is not None and info.world_size > 1:
        raise ValueError(
            f"train.device={device!r} with {info.world_size} processes: use train.device=cuda, and each process "
            "takes cuda:LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    return torch.device("cuda", info.local_rank)


def check_batch_size(batch_size: int, world_size: int) -> int:
    """Rows per process of a global batch of ``batch_size``; ``ValueError`` unless ``world_size`` divides it (the
    global batch, and so the model trained, must not depend on the number of processes)."""
    if batch_size % world_size:
        lower, upper = batch_size - batch_size % world_size, batch_size + world_size - batch_size % world_size
        raise ValueError(
            f"train.batch_size={batch_size} is the global batch and must divide by the {world_size} processes; "
            f"use e.g. train.batch_size={lower or upper} or {upper}, or another number of processes"
        )
    return batch_size // world_size


def shard_bounds(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a global batch of ``num_rows`` that process ``rank`` trains on.

    Contiguous slices: ``num_rows / world_size`` each for a full batch; for a shorter last batch the slices differ by
    at most one row and may be empty (``shard_batch`` handles that)."""
    return rank * num_rows // world_size, (rank + 1) * num_rows // world_size


def _rows(batch: Batch, lo: int, hi: int) -> Batch:
    """Rows ``[lo, hi)`` of ``batch``, at the batch's full width."""
    return Batch(
        *(t[lo:hi] for t in (batch.item_ids, batch.timestamps, batch.query_times, batch.lengths, batch.has_time)),
        targets=None if batch.targets is None else batch.targets[lo:hi],
    )


def shard_batch(batch: Batch, info: DistInfo) -> tuple[Batch, GlobalBatchShard, float]:
    """(this process's rows of the global training ``batch``, where they sit in it, the weight of their loss).

    A process whose slice of a short last batch is empty still has to take part in the step (DistributedDataParallel
    reduces gradients on every process): it gets the batch's first row with weight 0, so it adds nothing."""
    assert batch.targets is not None, "shard_batch needs a training batch"
    lo, hi = shard_bounds(batch.item_ids.shape[0], info.rank, info.world_size)
    weight = 1.0
    if hi == lo:
        lo, hi, weight = 0, 1, 0.0
    real = batch.targets > 0  # [B_global, N]
    shard = GlobalBatchShard(
        row_offset=lo,
        global_rows=batch.item_ids.shape[0],
        position_offset=int(real[:lo].sum()),
        global_targets=batch.targets[real],  # [M_global], row-major like the loss's targets[valid]
    )
    return _rows(batch, lo, hi), shard, weight


@dataclass(frozen=True)
class RowShard:
    """Rows ``[row_offset, row_offset + B)`` of a global batch of ``global_rows`` rows: where a process's slice sits
    when only its rows matter (``global_batch_dropout``; the ranking loop, whose rankers draw no negatives)."""

    row_offset: int
    global_rows: int


@contextlib.contextmanager
def global_batch_dropout(model: nn.Module, shard: GlobalBatchShard | RowShard) -> Iterator[None]:
    """Within the block, every ``nn.Dropout`` of ``model`` (0 < p < 1, training mode) draws the mask of the whole
    global batch and applies this process's rows of it.

    The mask is drawn as ``F.dropout`` draws it on the CPU (``bernoulli_(1 - p)`` on a tensor of the input's shape,
    scaled by 1 / (1 - p)), only with ``global_rows`` rows: one process with the whole batch draws bit for bit the
    same masks as ``nn.Dropout``, and N processes consume the generator alike and apply the same mask to each row.
    Inputs must have the batch on dim 0 (``RuntimeError`` otherwise). Dropout inside fused kernels (SDPA's
    ``dropout_p``, the jagged engine's counter-based dropout) is not covered; see ``genrec.train.loop``.
    """

    def sharded(module: nn.Dropout) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if not module.training:
                return x
            lo = shard.row_offset
            width = x.shape[0]
            if lo + width > shard.global_rows:
                raise RuntimeError(
                    f"global_batch_dropout: an input of {width} rows at offset {lo} does not fit a global batch of "
                    f"{shard.global_rows} rows (dropout inputs must have the batch on dim 0)"
                )
            keep = 1.0 - module.p
            noise = torch.empty((shard.global_rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
            noise.bernoulli_(keep).div_(keep)  # [B_global, ...]
            return x * noise[lo : lo + width]

        return forward

    patched = [m for m in model.modules() if isinstance(m, nn.Dropout) and 0.0 < m.p < 1.0]
    for module in patched:
        module.forward = sharded(module)  # an instance attribute: nn.Module.__call__ uses it
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def all_reduce_mean(value: float, info: DistInfo, device: torch.device) -> float:
    """The mean of ``value`` over the processes (a NaN anywhere makes it NaN everywhere)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / info.world_size


def all_reduce_means(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """The mean over the processes of each of ``values`` (the same length on every process), in one all-reduce."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / info.world_size).tolist()


def any_process(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Whether ``flag`` is true on any process (the same answer everywhere, so every process takes the same branch)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: T, info: DistInfo) -> list[T]:
    """[world_size] the picklable ``obj`` of every process, by rank, on every process."""
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def run_on_main(info: DistInfo | None, fn: Callable[[], T]) -> T:
    """``fn()`` on process 0 only, its result broadcast to every process; an exception it raises is raised on every
    process (so a refused run directory stops the whole run, not process 0 alone)."""
    if info is None:
        return fn()
    box: list[Any] = [None]
    if info.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001  (re-raised below, on every process)
            box[0] = ("error", exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}"))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:  # noqa: BLE001  (any pickling failure)
        return False


def broadcast_module(model: nn.Module, info: DistInfo) -> None:
    """Give every process process 0's parameters and buffers of ``model`` (in place)."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def wrap_ddp(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel (gradients averaged over the processes during backward).

    ``find_unused_parameters``: a model may leave parameters out of a step (the time-bias tables on a batch without
    timestamps); DDP then marks them itself instead of waiting for their gradients forever."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)
