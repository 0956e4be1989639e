"""Sharded embedding tables with TorchRec: the item table split over the processes of a distributed run.

With a large catalogue the item table dominates a retrieval model's parameters, and data parallelism keeps a full
copy of it (and of its optimizer state) on every process. Here the table becomes a TorchRec ``EmbeddingCollection``
under ``DistributedModelParallel`` (DMP): each process holds only its shard of the rows, a lookup sends every id to
the process that owns its row and the embeddings back (all-to-all), and the rows are updated in the backward pass by
FBGEMM's fused optimizer, so no dense gradient of the table is ever built. The rest of the model stays replicated
(DMP wraps it in DistributedDataParallel).

- **Sharding.** ``row_wise``: every process holds a contiguous block of about num_rows / world_size rows (the one
  that scales the table); ``table_wise``: the whole table lives on one process (balances several tables, e.g. the
  ranker's sparse features). ``sharding_plan`` asks TorchRec's planner for that type and the fused compute kernel.
- **Optimizer.** ``FUSED_OPTIMIZERS``: ``sgd`` (FBGEMM ``EXACT_SGD``), ``rowwise_adagrad`` (``EXACT_ROWWISE_ADAGRAD``,
  one accumulator per row, the usual choice for large tables), ``adagrad`` (``EXACT_ADAGRAD``). Each updates the
  rows a step looked up, their duplicates' gradients summed first ("exact"), and leaves the others as they are,
  which is what the plain-PyTorch equivalents do on an unsharded table: ``torch.optim.SGD``,
  ``torchrec.optim.RowWiseAdagrad`` and ``torch.optim.Adagrad`` (same ``eps``). FBGEMM's Adam is left out: it too
  skips the rows not looked up, so its moments and bias correction differ from ``torch.optim.Adam``'s.
- **Gradient convention.** TorchRec's all-to-all divides the rows' gradients by the number of processes on the way
  back (``torchrec.distributed.comm_ops`` gradient division, on by default and required here), as
  DistributedDataParallel averages the dense ones. With genrec's data-parallel loss, N × (the process's share of
  the global loss) (see ``genrec.train.distributed``), both averages give the global gradient, and a sharded run
  trains the one-process model (float rounding apart).

The ``genrec[distributed]`` extra installs TorchRec's dependencies; the FBGEMM build must match the PyTorch build (CPU here), so
TorchRec goes in without its declared CUDA dependency (``INSTALL_HINT``). TorchRec is imported inside the functions:
genrec imports without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from genrec.train.distributed import DistInfo

if TYPE_CHECKING:  # only for annotations; never imported at run time here
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingPlan

INSTALL_HINT = 'pip install "genrec[distributed]" && pip install --no-deps torchrec==1.8.0'

SHARDING_TYPES = ("row_wise", "table_wise")
FUSED_OPTIMIZERS = ("sgd", "rowwise_adagrad", "adagrad")


def require_torchrec() -> None:
    """``ImportError`` naming the install lines unless TorchRec and a working FBGEMM can be imported."""
    try:
        import fbgemm_gpu  # noqa: F401  (registers the torch.ops.fbgemm kernels TorchRec runs)
        import torchrec  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: an FBGEMM build that does not match this PyTorch
        raise ImportError(
            f"sharded embedding tables need TorchRec and FBGEMM ({type(exc).__name__}: {exc}). On CPU install them "
            f"with: {INSTALL_HINT} (torchrec's declared dependency is the CUDA build of FBGEMM; on CUDA machines "
            "install the fbgemm-gpu build that matches your PyTorch instead)"
        ) from exc


class ItemTable(nn.Module):
    """An embedding table as a TorchRec ``EmbeddingCollection`` with one table and one feature: ``ItemTable(ids)``
    looks up ids of any shape ``[...]`` and returns ``[..., embedding_dim]``, like ``nn.Embedding``.

    Unsharded it is an ordinary module (one process, or the reference a sharded run must match); under
    ``shard_item_table`` its collection becomes a ``ShardedEmbeddingCollection`` and the same ``forward`` runs
    the distributed lookup.

    Look all of a step's ids up in one call (concatenate the history's and the candidates' ids): under a fused
    optimizer the backward of each call is one optimizer update, so two calls would update the rows twice with
    partial gradients (the same for SGD, not for the adagrads, whose accumulators must see the row's whole gradient).
    There is no ``padding_idx``: a model that must keep row 0 fixed masks the padded positions' outputs (genrec's
    models do), so row 0 gets no gradient. TorchRec initialises the rows uniformly in ±1/sqrt(num_embeddings);
    ``load_full_table`` puts in other rows once sharded.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        name: str = "item",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        require_torchrec()
        from torchrec import EmbeddingCollection, EmbeddingConfig

        self.name = name
        self.feature = f"{name}_id"
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.collection = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=name, num_embeddings=num_embeddings, embedding_dim=embedding_dim, feature_names=[self.feature]
                )
            ],
            device=torch.device(device) if device is not None else None,
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        flat = ids.reshape(-1).long()  # [M]
        # One id per sample: the collection returns the M embeddings in input order whatever the sharding.
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[self.feature], values=flat, lengths=torch.ones_like(flat, dtype=torch.int32)
        )
        out = self.collection(kjt)[self.feature].values()  # [M, d]
        return out.view(*ids.shape, self.embedding_dim)  # [..., d]


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what}={value!r}: expected one of {', '.join(choices)}")


def fuse_optimizer(table: ItemTable, optimizer: str, lr: float, eps: float = 1e-8, **kwargs: Any) -> None:
    """Mark ``table``'s weights to be updated in the backward pass by FBGEMM's fused ``optimizer`` (one of
    ``FUSED_OPTIMIZERS``) with learning rate ``lr``; ``eps`` is the adagrads' epsilon (FBGEMM's default; PyTorch's
    Adagrad defaults to 1e-10, so give a reference optimizer this one), ``kwargs`` go to the optimizer
    (``weight_decay``...).

    Call before ``shard_item_table``: the sharder reads the marks and builds the fused kernels. Afterwards
    ``dmp.fused_optimizer`` holds the tables' learning rate in its ``param_groups``: a schedule sets it there, and
    the optimizer's ``step`` (which updates nothing, the rows were updated in ``backward``) hands it to the kernels
    for the next step."""
    require_torchrec()
    _check_choice("optimizer", optimizer, FUSED_OPTIMIZERS)
    import torchrec.optim as trec_optim
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    cls = {"sgd": torch.optim.SGD, "rowwise_adagrad": trec_optim.RowWiseAdagrad, "adagrad": torch.optim.Adagrad}
    options = {"lr": lr, **kwargs} if optimizer == "sgd" else {"lr": lr, "eps": eps, **kwargs}
    apply_optimizer_in_backward(cls[optimizer], table.collection.parameters(), options)


def sharding_plan(
    module: nn.Module, tables: list[ItemTable], sharding: str, info: DistInfo, batch_size: int = 512
) -> "ShardingPlan":
    """TorchRec's plan for ``module`` with every table of ``tables`` sharded ``sharding`` (``row_wise`` or
    ``table_wise``) with the fused CPU kernel, computed on process 0 and broadcast (``collective_plan``), so every
    process shards alike. ``batch_size`` (ids per process and step) only informs the planner's cost estimates."""
    require_torchrec()
    _check_choice("sharding", sharding, SHARDING_TYPES)
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingType

    sharding_type = {"row_wise": ShardingType.ROW_WISE, "table_wise": ShardingType.TABLE_WISE}[sharding]
    compute_device = "cuda" if info.backend == "nccl" else "cpu"
    constraints = {
        table.name: ParameterConstraints(
            sharding_types=[sharding_type.value], compute_kernels=[EmbeddingComputeKernel.FUSED.value]
        )
        for table in tables
    }
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=info.world_size, compute_device=compute_device),
        batch_size=batch_size,
        constraints=constraints,
    )
    return planner.collective_plan(module, [EmbeddingCollectionSharder()], dist.GroupMember.WORLD)


@dataclass(frozen=True)
class LocalShard:
    """The rows ``[row_offset, row_offset + num_rows)`` of table ``table`` that this process holds (and all
    ``embedding_dim`` columns: row-wise and table-wise shards keep whole rows)."""

    table: str
    row_offset: int
    num_rows: int
    embedding_dim: int


def shard_item_table(
    model: nn.Module,
    info: DistInfo,
    sharding: str = "row_wise",
    batch_size: int = 512,
    find_unused_parameters: bool = False,
) -> "DistributedModelParallel":
    """``model`` under DistributedModelParallel: its ``ItemTable`` modules sharded ``sharding``, every other
    parameter replicated by DistributedDataParallel (gradients averaged).

    Every process must call it with the same model (same tables, same order); mark the tables' optimizer with
    ``fuse_optimizer`` first. The tables' initial rows are TorchRec's (random): copy the unsharded model's in with
    ``load_full_table``. ``find_unused_parameters``: for models that leave some dense parameters out of a step."""
    require_torchrec()
    from torchrec.distributed.comm_ops import get_gradient_division
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel

    if not get_gradient_division():
        raise RuntimeError(
            "shard_item_table: TorchRec's gradient division is off (torchrec.distributed.comm_ops."
            "set_gradient_division(False)); the tables' gradients would be N times the dense ones'"
        )
    tables = [m for m in model.modules() if isinstance(m, ItemTable)]
    if not tables:
        raise ValueError("shard_item_table: the model has no ItemTable to shard")
    unfused = [t.name for t in tables if not any(hasattr(p, "_optimizer_classes") for p in t.collection.parameters())]
    if unfused:
        raise ValueError(f"shard_item_table: table(s) {unfused} have no fused optimizer: call fuse_optimizer first")
    device = torch.device("cuda", info.local_rank) if info.backend == "nccl" else torch.device("cpu")
    plan = sharding_plan(model, tables, sharding, info, batch_size)
    wrapper = DefaultDataParallelWrapper(
        static_graph=not find_unused_parameters, find_unused_parameters=find_unused_parameters
    )
    return DistributedModelParallel(
        model, device=device, plan=plan, sharders=[EmbeddingCollectionSharder()], data_parallel_wrapper=wrapper
    )


def dense_parameters(dmp: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``dmp`` that an ordinary optimizer must step: all but the tables' (their fused
    optimizer updates them during ``backward``)."""
    require_torchrec()
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    return [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]


def _sharded_weights(dmp: nn.Module) -> dict[str, Any]:
    """{table name: its ShardedTensor weight} of every sharded collection in ``dmp``."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = {}
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            # "...collection.embeddings.<table>.weight"
            out[key.split(".")[-2]] = value
    return out


def local_shards(dmp: nn.Module) -> list[LocalShard]:
    """The rows of each sharded table that this process holds (none for a table another process holds whole)."""
    shards = []
    for name, weight in _sharded_weights(dmp).items():
        for shard in weight.local_shards():
            meta = shard.metadata
            if meta.shard_offsets[1] != 0 or meta.shard_sizes[1] != weight.size(1):
                raise RuntimeError(f"table {name}: a shard with a column split ({meta}); expected whole rows")
            if tuple(shard.tensor.shape) != tuple(meta.shard_sizes):
                raise RuntimeError(f"table {name}: local shard of shape {tuple(shard.tensor.shape)}, metadata {meta}")
            shards.append(LocalShard(name, meta.shard_offsets[0], meta.shard_sizes[0], meta.shard_sizes[1]))
    return shards


def load_full_table(dmp: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Copy the full ``weight`` [num_rows, d] (the same on every process, e.g. the unsharded model's) into this
    process's shard of table ``name``."""
    weights = _sharded_weights(dmp)
    if name not in weights:
        raise KeyError(f"no sharded table {name!r}; tables: {sorted(weights)}")
    target = weights[name]
    if tuple(target.size()) != tuple(weight.shape):
        raise ValueError(f"table {name}: shape {tuple(target.size())}, got a weight of shape {tuple(weight.shape)}")
    with torch.no_grad():
        for shard in target.local_shards():
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(weight[r0 : r0 + nr, c0 : c0 + nc])


def gather_full_table(dmp: nn.Module, name: str) -> torch.Tensor:
    """[num_rows, d] the whole of table ``name``, assembled from every process's shard, on every process.

    Every row is held by exactly one process, so a sum over the processes of zero-filled copies is the table.
    For evaluation or export of moderate tables: it materialises the whole table on each process."""
    weights = _sharded_weights(dmp)
    if name not in weights:
        raise KeyError(f"no sharded table {name!r}; tables: {sorted(weights)}")
    sharded = weights[name]
    shards = sharded.local_shards()
    if shards:
        device = shards[0].tensor.device
    else:  # a table another process holds whole; NCCL reduces CUDA tensors only
        on_cuda = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    full = torch.zeros(tuple(sharded.size()), dtype=torch.float32, device=device)  # [num_rows, d]
    for shard in shards:
        (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        full[r0 : r0 + nr, c0 : c0 + nc] = shard.tensor.float()
    dist.all_reduce(full, op=dist.ReduceOp.SUM)
    return full


# ------------------------------------------------------------------------------------ the item table of a training run

# The attribute under which genrec's retrieval models (HSTU, SASRec, FuXi-α) keep their item table, an nn.Embedding
# of num_items + 1 rows (row 0 the padding id).
ITEM_TABLE_ATTRIBUTE = "item_emb"
ITEM_TABLE_NAME = "item"


def swappable_item_table(model: nn.Module) -> nn.Embedding:
    """The ``nn.Embedding`` item table of ``model`` that ``ShardedItemTraining`` replaces; ``ValueError`` for a model
    that keeps none under ``ITEM_TABLE_ATTRIBUTE``, or uses it other than through lookups and ``item_vectors``."""
    table = getattr(model, ITEM_TABLE_ATTRIBUTE, None)
    if not isinstance(table, nn.Embedding):
        raise ValueError(
            f"{type(model).__name__} has no nn.Embedding item table `{ITEM_TABLE_ATTRIBUTE}`, so it cannot be replaced "
            "by a sharded one"
        )
    if table.max_norm is not None or table.sparse or table.scale_grad_by_freq:
        raise ValueError(f"{type(model).__name__}.{ITEM_TABLE_ATTRIBUTE}: max_norm, sparse and scale_grad_by_freq "
                         "have no sharded equivalent")  # fmt: skip
    return table


def parameters_but_item_table(model: nn.Module) -> list[nn.Parameter]:
    """``model``'s parameters but its ``nn.Embedding`` item table's, in ``model.parameters()`` order: what the
    loop's optimizer steps when ``ShardedItemTraining`` takes the table over (the same objects before and after
    sharding: DistributedModelParallel keeps them)."""
    table = swappable_item_table(model)
    return [p for p in model.parameters() if p is not table.weight]


class ShardedItemTraining:
    """A data-parallel training step whose model's item table is sharded by TorchRec.

    ``model``'s ``nn.Embedding`` item table (``swappable_item_table``) is replaced by an ``ItemTable`` of the same
    shape, marked for FBGEMM's fused ``optimizer`` and sharded ``sharding``; ``objective`` (the module whose forward
    computes the step's loss, ``model`` inside it) goes under DistributedModelParallel, ``self.module``, which the
    loop calls instead of a DistributedDataParallel wrapper. The table's rows start as the replaced table's (so a
    run starts from the unsharded model's initialisation, or from a resumed checkpoint's weights loaded before).

    Every other parameter stays replicated (DistributedDataParallel) and is stepped by the loop's own optimizer, over
    ``parameters_but_item_table(model)``; DDP finds unused parameters, as ``genrec.train.distributed.wrap_ddp`` does
    (a model may leave some out of a step).

    Files stay those of an unsharded run: ``full_state_dict`` assembles the unsharded model's state dict (the table
    gathered from every process), which checkpoints and ``best.safetensors`` hold, so serving and one-process
    evaluation read them as ever. Every process must make the same calls in the same order (they are collectives).
    """

    def __init__(
        self,
        objective: nn.Module,
        model: nn.Module,
        info: DistInfo,
        sharding: str,
        optimizer: str,
        lr: float,
        batch_size: int = 512,
    ) -> None:
        require_torchrec()
        old = swappable_item_table(model)
        self.model = model
        self.lr = lr
        weight = old.weight.detach().to("cpu", torch.float32, copy=True)  # [num_items + 1, d]
        table = ItemTable(old.num_embeddings, old.embedding_dim, name=ITEM_TABLE_NAME)
        setattr(model, ITEM_TABLE_ATTRIBUTE, table)
        fuse_optimizer(table, optimizer, lr=lr)
        self.module = shard_item_table(objective, info, sharding=sharding, batch_size=batch_size,
                                       find_unused_parameters=True)  # fmt: skip
        load_full_table(self.module, ITEM_TABLE_NAME, weight)
        self._prefix = f"{ITEM_TABLE_ATTRIBUTE}."

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """``RuntimeError`` unless ``optimizer`` steps exactly the parameters DistributedModelParallel replicates."""
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        replicated = {id(p) for p in dense_parameters(self.module)}
        if stepped != replicated:
            raise RuntimeError(
                f"sharded item table: the optimizer steps {len(stepped)} parameter(s), DistributedModelParallel "
                f"replicates {len(replicated)}; they must be the same"
            )

    def set_lr(self, factor: float) -> None:
        """The table's learning rate for the coming step: ``lr`` × ``factor`` (the schedule's factor of the step).

        Set before the step's forward: the rows are updated in its backward pass, with the rate the kernels hold
        then (``zero_grad`` hands it to them; it clears nothing, a fused table keeps no gradient)."""
        fused = self.module.fused_optimizer
        for group in fused.param_groups:
            group["lr"] = self.lr * factor
        fused.zero_grad()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded model's state dict: the replicated tensors as they are, the item table gathered whole
        (``gather_full_table``, a collective) under the ``nn.Embedding``'s key."""
        out = {k: v for k, v in self.model.state_dict().items() if not k.startswith(self._prefix)}
        out[f"{self._prefix}weight"] = gather_full_table(self.module, ITEM_TABLE_NAME)
        return out

    def local_shards(self) -> list[LocalShard]:
        """The rows of the item table this process holds."""
        return local_shards(self.module)
