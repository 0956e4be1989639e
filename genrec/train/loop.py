"""The training loop: setup -> epochs (train, validate, checkpoint) -> test once at the best validation epoch.

Explicit and framework-free. Model selection (early stopping and the checkpoint kept) uses the validation target
only; the test target is evaluated once, for the chosen checkpoint, at the end.

Reproducibility: the data order of epoch e comes from ``numpy.random.default_rng([seed, e])`` and the torch RNG
(dropout, negative sampling) is re-seeded from ``(seed, e)`` at the start of every epoch. A run resumed from the
checkpoint of epoch e therefore replays epochs e+1.. exactly as the uninterrupted run would. The learning rate of
every optimizer step (``train.lr_schedule``, ``warmup_epochs``, ``min_lr_ratio``; see ``genrec.train.schedule``) is a
function of the global step, (epoch - 1) × steps per epoch + step, so it resumes exactly too; each epoch's log line
records the learning rate of its last step (``"lr"``).

Run directories: everything is checked (config, data, and on resume the checkpoint against the stored config) before
the first file is written. A directory that already holds a run is refused unless the call resumes it or asks to
overwrite it, so two runs never mix in one ``log.jsonl``.

Data-parallel training (``dist``, see ``genrec.train.distributed``): N processes train the model one process trains
with the same ``train.batch_size`` (the global batch; B / N rows per process), within float rounding. Negatives,
dropout masks and Stochastic Length are drawn for the global batch on every process, so every example gets the
randomness it gets in a one-process run, with two exceptions that only change which masks are drawn (same
distribution): SASRec's attention dropout and the jagged attention engine's dropout. Process 0 alone writes the run
directory; its checkpoint resumes on any number of processes.

Sharded item table (``train.item_table_sharding=row_wise|table_wise``, data-parallel runs with TorchRec): each process
holds only its rows of the item table (``genrec.train.sharded.ShardedItemTraining``), updated in the backward pass by
FBGEMM's fused SGD at ``train.item_table_lr`` (× the schedule's factor); the rest of the model is replicated and
stepped by AdamW, so the run trains what one process trains with ``torch.optim.SGD`` on the table and AdamW on the
rest. Only SGD: a step looks the table up several times, and the fused optimizer updates once per lookup, which adds
up to the summed gradient's update for SGD only. Evaluation, ``best.safetensors`` and ``checkpoint.pt`` use the
unsharded model (the table gathered whole on every process), so the run's files are those of any run.

Rank-local data (``data.shard_by_rank=true``, ``data.dataset=preprocessed``, see ``genrec.train.rank_local``): each
process reads only its own users and draws its batches of ``train.batch_size / N`` rows from them; evaluation covers
all users. Such a run does not reproduce the one-process run step by step (the global batches hold other rows).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from genrec import __version__
from genrec.config import ConfigError, RunConfig, load_config, save_config
from genrec.data.batches import epoch_batches, training_batch
from genrec.data.dataset import PreparedData, prepare_data
from genrec.data.popularity import POPULARITY_FILE, popularity_json, write_popularity
from genrec.data.registry import DATASETS
from genrec.data.sequences import leave_one_out, load_item_map, save_id_maps
from genrec.data.stochastic_length import expected_kept, expected_sparsity
from genrec.eval.evaluate import (
    INTEGER_METRICS,
    UserRanks,
    evaluate_ranks,
    metrics_from_user_ranks,
    model_score_fn,
)
from genrec.eval.protocol import protocol_from_config
from genrec.models import build_model
from genrec.runtime import machine_info, resolve_autocast
from genrec.train.checkpoint import (
    RUN_FILES,
    CheckpointError,
    check_loss_finite,
    check_run_directory,
    check_shapes,
    config_differences,
    is_terminal,
    load_weights,
    remove_stale_temporaries,
    resume_state,
    save_state,
    save_weights,
    with_absolute_paths,
    write_json,
    write_log,
)
from genrec.train.distributed import (
    DistInfo,
    all_reduce_mean,
    any_process,
    broadcast_module,
    check_batch_size,
    gather_objects,
    global_batch_dropout,
    run_on_main,
    shard_batch,
    training_device,
    wrap_ddp,
)
from genrec.train.loss import GlobalBatchShard, sampled_softmax_loss
from genrec.train.rank_local import (
    epoch_batches_local,
    evaluate_rank_local,
    global_item_counts,
    global_mean_positions,
    global_sums,
    global_summary,
    length_rng,
    plan_steps,
    torch_seed,
)
from genrec.train.schedule import LRSchedule, check_schedule_config
from genrec.train.sharded import ShardedItemTraining, parameters_but_item_table, require_torchrec

log = logging.getLogger("genrec.train")


@dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    best_epoch: int = 0
    best_metric: float = float("-inf")
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class RetrievalObjective(torch.nn.Module):
    """The training loss of one batch as a module, so that DistributedDataParallel can wrap it (DDP reduces the
    gradients of what its ``forward`` computes; ``model.encode`` called directly would bypass it).

    ``forward(batch, normalizer, shard=None, weight=1.0)``: the encoder on ``batch`` (under bf16 autocast when
    ``use_bf16``), then the sampled softmax, summed over real positions and divided by ``normalizer``, times
    ``weight``. ``shard`` places the batch in a data-parallel global batch (``GlobalBatchShard``)."""

    def __init__(self, model: torch.nn.Module, num_items: int, train_config, use_bf16: bool) -> None:
        super().__init__()
        self.model = model
        self.num_items = num_items
        self.tc = train_config
        self.use_bf16 = use_bf16

    def forward(self, batch, normalizer: float, shard: GlobalBatchShard | None = None, weight: float = 1.0):
        tc = self.tc
        device_type = batch.item_ids.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.use_bf16):
            user = self.model.encode(batch)  # [B, N, d]
        user = user.float()
        loss = sampled_softmax_loss(
            user, batch.targets, self.model.item_vectors, self.num_items, tc.num_negatives, tc.temperature,
            tc.negatives, normalizer=normalizer, in_batch_negatives=tc.in_batch_negatives, shard=shard,
        )  # fmt: skip
        return loss if weight == 1.0 else loss * weight


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**63 - 1)


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data: PreparedData | None = None,
    progress: bool = True,
    dist: DistInfo | None = None,
) -> dict:
    """Train ``config`` into ``config.output_dir`` and return the results dict (also written to results.json).

    Args:
        resume: continue the run in ``output_dir`` from its ``checkpoint.pt``. The run's stored model and data
            sections and ``eval.selection`` must equal ``config``'s (train settings such as ``epochs`` may change).
        overwrite: replace the run in ``output_dir``: its run files (``RUN_FILES``) are removed first; other files
            in the directory are left alone. Without ``resume`` or ``overwrite``, a directory that holds a run is
            refused.
        data: already prepared data (``config.data`` is then only recorded).
        progress: tqdm bars while stderr is a terminal (per-epoch log lines either way).
        dist: this process's place in a data-parallel run (``genrec.train.distributed.init_from_env``), or None
            for a one-process run. Every process calls ``train`` with the same arguments; ``train.batch_size`` is
            the global batch and must divide by the number of processes. Process 0 checks and writes the run
            directory (the others need not see it); every process needs the data. All return the results dict.
            With ``config.data.shard_by_rank`` each process reads only its own users of the preprocessed directory
            (``genrec.train.rank_local``); ``data``, if given, must then be this process's share (``user_index``).
    """
    config = with_absolute_paths(config)
    tc = config.train
    check_schedule_config(tc)
    if dist is not None:
        check_batch_size(tc.batch_size, dist.world_size)
    if tc.item_table_sharding != "none":
        _check_item_table_sharding(config, dist)
    is_main = dist is None or dist.is_main
    rank_local = dist is not None and config.data.shard_by_rank  # each process reads and trains on its own users
    out = Path(config.output_dir)
    if data is None:
        check_dataset_name(config.data.dataset)

    def check_directory() -> tuple[list[str], dict | None]:
        existing = check_run_directory(out, RUN_FILES, resume=resume, overwrite=overwrite)
        saved = resume_state(out, lambda stored: _differences(load_config(stored), config)) if resume else None
        return existing, saved

    existing, saved = run_on_main(dist, check_directory)  # process 0 reads; the others get its answer
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
        log.info("torch.set_num_threads(%d)", tc.num_threads)
    device = training_device(tc.device, dist)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={tc.device!r}, but this PyTorch build sees no CUDA device (use train.device=cpu)")

    if data is None:
        data = prepare_data(config.data, shard=(dist.rank, dist.world_size) if rank_local else None)
    elif rank_local and data.user_index is None and dist.world_size > 1:
        raise ValueError("data.shard_by_rank: the data passed to train must be this process's share of the users, "
                         "with their global indices in user_index (prepare_data(config.data, shard=(rank, world_size)))")
    seqs = data.sequences
    user_index = data.user_index if data.user_index is not None else np.arange(seqs.num_users)
    log.info("data%s: %s", f" (process {dist.rank}'s users)" if rank_local else "", seqs.summary())
    for note in seqs.notes:
        log.info("data note: %s", note)
    if saved is not None:
        run_on_main(dist, lambda: _check_same_items(out, seqs))

    # bf16 only where the device computes it natively (genrec.runtime.resolve_autocast warns when it falls back)
    autocast = resolve_autocast(tc.autocast, device)
    use_bf16 = autocast == "bfloat16"
    if config.eval.selection == "valid":
        valid_protocol = protocol_from_config(config, "valid")
        train_split = leave_one_out(seqs, "train")
    elif config.eval.selection == "test-peeking":
        # The reference protocol, for comparison only: no validation split, the epoch is chosen on the test item.
        valid_protocol = protocol_from_config(config, "test")
        train_split = leave_one_out(seqs, "train+valid")
        log.warning("eval.selection=test-peeking: training on s[:-1] and selecting on the TEST item (reference protocol)")
    else:  # "refit": train on train + validation for a number of epochs chosen beforehand; nothing is selected here
        valid_protocol = None
        train_split = leave_one_out(seqs, "train+valid")
        log.info("eval.selection=refit: training on s[:-1] for exactly %d epochs; the last epoch is the model", tc.epochs)
    if valid_protocol is not None:
        log.info("selection protocol: %s — %s", valid_protocol.name, valid_protocol.describe())
    train_lengths = np.minimum(train_split.ends - train_split.starts - 1, config.data.max_len)
    if not rank_local or global_sums([float(train_lengths.sum())], dist, device)[0] == 0:
        _check_training_positions(train_lengths, seqs, config)  # rank-local: raises on every process, or on none
    sl_alpha = tc.stochastic_length_alpha
    if sl_alpha:
        window = train_lengths + 1  # items per training row before SL
        kept = np.array([expected_kept(int(n), config.data.max_len, sl_alpha) for n in window])
        if rank_local:  # over every process's rows
            mean_positions = global_mean_positions(kept - 1, dist, device)
            kept_all, window_all = global_sums([float(kept.sum()), float(window.sum())], dist, device)
            sparsity = 1.0 - kept_all / window_all if window_all else 0.0
        else:
            mean_positions = float((kept - 1).mean())
            sparsity = expected_sparsity(window, config.data.max_len, sl_alpha)
        sl_info = {"alpha": sl_alpha, "expected_sparsity": sparsity}
        log.info("Stochastic Length alpha=%.2f: expected %.1f%% of training items dropped", sl_alpha,
                 100 * sl_info["expected_sparsity"])  # fmt: skip
    else:
        mean_positions = global_mean_positions(train_lengths, dist, device) if rank_local else float(train_lengths.mean())
        sl_info = None
    # Every position weighs the same in every batch (see sampled_softmax_loss): sum / (B × mean positions per row).
    loss_normalizer = float(tc.batch_size * mean_positions)
    if rank_local:  # the processes agree on the fewest local batches
        plan = plan_steps(len(train_lengths), tc.batch_size, tc.max_steps_per_epoch, dist)
        steps_per_epoch = plan.steps_per_epoch
    else:
        steps_per_epoch = math.ceil(len(train_lengths) / tc.batch_size)  # as many batches as epoch_batches cuts
        if tc.max_steps_per_epoch > 0:
            steps_per_epoch = min(steps_per_epoch, tc.max_steps_per_epoch)
    schedule = LRSchedule.from_config(tc, steps_per_epoch)
    if not schedule.is_constant:
        log.info("learning rate: %s, %d warm-up step(s), %d steps in all (%d per epoch)", tc.lr_schedule,
                 schedule.warmup_steps, schedule.total_steps, steps_per_epoch)  # fmt: skip
    time_notes = _time_notes(config, seqs)
    if rank_local:
        log.info("data-parallel with rank-local data (data.shard_by_rank): process %d of %d (%s) reads and trains "
                 "on its own %d users only, %d rows per process of each global batch of %d; %s. This run does not "
                 "reproduce a one-process run step by step (its global batches hold other rows)", dist.rank,
                 dist.world_size, dist.backend, seqs.num_users, plan.batch_size, tc.batch_size, plan.describe())  # fmt: skip
    elif dist is not None:
        log.info("data-parallel: process %d of %d (%s), %d rows per process of each global batch of %d", dist.rank,
                 dist.world_size, dist.backend, tc.batch_size // dist.world_size, tc.batch_size)  # fmt: skip
        note = _world_size_dependent_randomness(config)
        if note:
            log.warning("data-parallel: %s, so this run matches a one-process run in distribution, not exactly", note)

    torch.manual_seed(tc.seed)
    model = build_model(config.model, seqs.num_items, config.data.max_len).to(device)
    params = model.parameters()
    if tc.item_table_sharding != "none":  # the table gets FBGEMM's fused optimizer instead (ShardedItemTraining)
        try:
            params = parameters_but_item_table(model)
        except ValueError as exc:
            raise ConfigError(f"train.item_table_sharding={tc.item_table_sharding}: {exc}") from None
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    objective = RetrievalObjective(model, seqs.num_items, tc, use_bf16)
    state = TrainState()
    ckpt_path = out / "checkpoint.pt"
    if saved is not None:
        check_shapes(ckpt_path, saved["model"], model)
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["torch_rng"])
            state = TrainState(**saved["train_state"])
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{ckpt_path}: cannot resume from it ({str(exc).strip().splitlines()[0]})") from None

    # The item table sharded over the processes (built after the resumed weights are loaded: its rows start as
    # the unsharded table's). A collective, like DDP below.
    sharded = None
    if tc.item_table_sharding != "none":
        table_lr = tc.item_table_lr or tc.lr
        sharded = ShardedItemTraining(objective, model, dist, tc.item_table_sharding, tc.item_table_optimizer,
                                      table_lr, batch_size=tc.batch_size // dist.world_size * config.data.max_len)
        sharded.check_optimizer(optimizer)
        log.info("item table sharded %s over %d processes (this one holds rows %s), updated in the backward pass by "
                 "fused %s at lr %g", tc.item_table_sharding, dist.world_size,
                 [(s.row_offset, s.row_offset + s.num_rows) for s in sharded.local_shards()],
                 tc.item_table_optimizer, table_lr)  # fmt: skip

    def unsharded(weights: dict[str, torch.Tensor] | None) -> torch.nn.Module:
        """The model as one process holds it (sharded item table runs), with ``weights``; built without drawing from
        the torch generator."""
        with torch.random.fork_rng(devices=[]):
            plain = build_model(config.model, seqs.num_items, config.data.max_len)
        if weights is not None:
            plain.load_state_dict(weights)
        return plain.to(device)

    # Everything is checked: from here on the run directory is written (by process 0 alone).
    popularity = global_item_counts(seqs, dist, device) if rank_local else None  # a collective: every process
    summary = global_summary(seqs, dist) if rank_local else seqs.summary()
    if is_main:
        _start_run_directory(out, config, seqs, data, state, existing, overwrite=overwrite, resumed=saved is not None,
                             popularity=popularity)  # fmt: skip
    # The step's module: the objective itself, or DDP around it (built after the resumed weights are loaded, so
    # every process starts from the same ones; DDP broadcasts process 0's anyway).
    if sharded is not None:
        step_module = sharded.module  # DistributedModelParallel: the table sharded, the rest under DDP
    else:
        step_module = objective if dist is None else wrap_ddp(objective, dist, device)
    normalizer = loss_normalizer if dist is None else loss_normalizer / dist.world_size  # DDP averages the N gradients

    started = time.monotonic()
    out_of_time = False
    while state.epoch < tc.epochs and state.bad_epochs < tc.patience and not out_of_time:
        epoch = state.epoch + 1
        if rank_local:  # this process's own rows, order and draws
            torch.manual_seed(torch_seed(tc.seed, epoch, dist.rank))
            batches = epoch_batches_local(train_lengths, plan, tc.seed, epoch, dist.rank, tc.length_buckets)
            sl_rng = length_rng(tc.seed, epoch, dist.rank) if sl_alpha else None
        else:
            torch.manual_seed(_epoch_seed(tc.seed, epoch))
            batches = epoch_batches(train_lengths, tc.batch_size, np.random.default_rng([tc.seed, epoch]),
                                    tc.length_buckets)  # fmt: skip
            if tc.max_steps_per_epoch > 0:
                batches = batches[: tc.max_steps_per_epoch]
            sl_rng = np.random.default_rng([tc.seed, epoch, 1]) if sl_alpha else None
        model.train()
        t0 = time.perf_counter()
        total, tokens, positions, epoch_rows = 0.0, 0, 0, 0
        lr = tc.lr
        show = progress and is_main and is_terminal(sys.stderr)
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=not show, leave=False)
        for step, rows in enumerate(bar, start=1):
            # The whole global batch on every process (so Stochastic Length draws alike everywhere), then its slice.
            batch = training_batch(seqs, train_split, rows, config.data.max_len, sl_alpha, sl_rng)
            step_rows, step_tokens = len(rows), int(batch.lengths.sum())
            step_positions = int(train_lengths[rows].sum())  # without Stochastic Length
            if sharded is not None:  # the table's rows are updated during backward, at the schedule's rate
                sharded.set_lr(schedule.for_step((epoch - 1) * steps_per_epoch + step - 1) / tc.lr)
            if dist is None:
                loss = step_module(batch.to(device), normalizer)
                loss_value = loss.item()
            elif rank_local:  # the local batch is this process's part of the global one, as it is
                loss = step_module(batch.to(device), normalizer)
                sums = global_sums([loss.item(), step_rows, step_tokens, step_positions], dist, device)
                loss_value = sums[0] / dist.world_size  # the global batch's loss, as all_reduce_mean gives it
                step_rows, step_tokens, step_positions = (int(v) for v in sums[1:])
            else:
                local, shard, weight = shard_batch(batch, dist)
                with global_batch_dropout(model, shard):
                    loss = step_module(local.to(device), normalizer, shard, weight)
                loss_value = all_reduce_mean(loss.item(), dist, device)  # the global batch's loss, on every process
            check_loss_finite(loss_value, epoch, step, out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # The step's learning rate from the global step number, so a resumed run follows the same schedule (and
            # the configured train.lr is used, not the one stored with the optimizer state).
            lr = schedule.for_step((epoch - 1) * steps_per_epoch + step - 1)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            total += loss_value * step_rows
            tokens += step_tokens
            positions += step_positions
            epoch_rows += step_rows
            bar.set_postfix(loss=f"{loss_value:.4f}")
        train_seconds = time.perf_counter() - t0

        model.eval()
        # Sharded item table: evaluation, best.safetensors and the checkpoint use the unsharded model, the table
        # gathered whole on every process (evaluation then needs no collective per batch).
        saved_model = model if sharded is None else unsharded(sharded.full_state_dict()).eval()
        t1 = time.perf_counter()
        if valid_protocol is None:  # refit: no evaluation, every epoch replaces the last
            valid, metric = {}, float(epoch)
        else:
            valid = metrics_from_user_ranks(
                _evaluate_ranks(saved_model, seqs, valid_protocol, config, device, dist,
                                user_index if rank_local else None),
                valid_protocol,
            )
            metric = valid[tc.select_metric]
        eval_seconds = time.perf_counter() - t1
        improved = metric > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.bad_epochs = metric, epoch, 0
            if is_main:
                save_weights(out / "best.safetensors", saved_model)
                proto = None if valid_protocol is None else valid_protocol.to_dict()
                write_json(out / "best.json", {"epoch": epoch, "protocol": proto, "metrics": valid})
        else:
            state.bad_epochs += 1
        row = {
            "epoch": epoch,
            "loss": total / max(1, epoch_rows),
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "tokens_per_second": tokens / max(train_seconds, 1e-9),
            "tokens": tokens,
            "positions": positions,
            "lr": lr,  # the learning rate of the epoch's last step
            "valid": valid,
        }
        state.history.append(row)
        state.epoch = epoch
        if is_main:
            with open(out / "log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        if valid_protocol is None:
            log.info("epoch %d/%d loss %.4f %.1fs train (refit: no evaluation)", epoch, tc.epochs, row["loss"], train_seconds)
        else:
            log.info(
                "epoch %d loss %.4f valid %s %.4f (best %.4f @ %d) %.1fs train %.1fs eval",
                epoch, row["loss"], tc.select_metric, metric, state.best_metric, state.best_epoch, train_seconds, eval_seconds,
            )  # fmt: skip
        if tc.time_budget_minutes > 0:
            out_of_time = time.monotonic() - started > 60 * tc.time_budget_minutes
            if dist is not None:  # every process stops after the same epoch
                out_of_time = any_process(out_of_time, dist, device)
            if out_of_time:
                log.warning("stopping after epoch %d: time budget of %.0f min used", epoch, tc.time_budget_minutes)
        if is_main:
            save_state(
                ckpt_path,
                {
                    "model": saved_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "train_state": state.__dict__,
                    "genrec_version": __version__,
                },
            )

    # Test once, at the best validation epoch (process 0 reads the weights it wrote and hands them on).
    if sharded is not None:
        model = unsharded(None)
    if is_main:
        load_weights(out / "best.safetensors", model)
    if dist is not None:
        broadcast_module(model, dist)
    model.eval()
    test_protocol = protocol_from_config(config, "test")
    test_ranks = _evaluate_ranks(model, seqs, test_protocol, config, device, dist, user_index if rank_local else None)
    test = metrics_from_user_ranks(test_ranks, test_protocol)
    # Every evaluated user's test rank (users ascending), for paired comparisons between runs (bench/quality.py).
    if is_main:
        test_ranks.save(out / "test_ranks.npz")
    log.info("test protocol: %s — %s", test_protocol.name, test_protocol.describe())
    log.info("test @ best epoch %d: %s", state.best_epoch, _fmt(test))
    epochs_done = state.history
    results = {
        "dataset": config.data.dataset,
        "model": config.model.name,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "stopped_early": state.bad_epochs >= tc.patience,
        "stopped_by_time_budget": out_of_time,
        "selection": config.eval.selection,
        "autocast": autocast,  # what the run computed in (train.autocast may have asked for bf16)
        "machine": machine_info(),
        "seconds_per_epoch": float(np.median([h["train_seconds"] for h in epochs_done])) if epochs_done else None,
        "stochastic_length": None
        if sl_info is None
        else {**sl_info, "measured_position_sparsity": _position_sparsity(epochs_done)},
        "valid": {"protocol": valid_protocol.to_dict(), "metrics": state.history[state.best_epoch - 1]["valid"]}
        if epochs_done and valid_protocol is not None
        else None,
        "test": {"protocol": test_protocol.to_dict(), "metrics": test},
        "data": {"summary": summary, "notes": seqs.notes + time_notes, "files": data.files},
        "config": config.to_dict(),
        "genrec_version": __version__,
    }
    if dist is not None:
        results["distributed"] = {"processes": dist.world_size, "backend": dist.backend}
        if sharded is not None:
            results["distributed"]["item_table"] = {
                "sharding": tc.item_table_sharding, "optimizer": tc.item_table_optimizer, "lr": tc.item_table_lr or tc.lr,
                # the rows [lo, hi) this process held (process 0's in results.json)
                "rows_held": [[s.row_offset, s.row_offset + s.num_rows] for s in sharded.local_shards()],
            }  # fmt: skip
        if rank_local:
            results["distributed"]["rank_local_data"] = {
                "rows_per_process": plan.rows, "steps_per_epoch": plan.steps_per_epoch,
                "rows_per_process_and_step": plan.batch_size, "rows_left_out_per_epoch_at_least": plan.left_out,
            }  # fmt: skip
    if is_main:
        write_json(out / "results.json", results)
    return results


def _start_run_directory(out: Path, config: RunConfig, seqs, data: PreparedData, state: TrainState,
                         existing: list[str], *, overwrite: bool, resumed: bool,
                         popularity: np.ndarray | None = None) -> None:
    """Create or refresh the run directory before the first epoch: stale temporaries and (``overwrite``) the previous
    run's files removed, config, id maps, popularity and titles written, and on resume ``log.jsonl`` cut back to the
    epochs the checkpoint covers. ``popularity``: the item counts to write (all processes' users, for rank-local
    data) instead of those of ``seqs``."""
    out.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temporaries(out)
    if stale:
        log.info("removed %d temporary file(s) left by an interrupted write: %s", len(stale), ", ".join(stale))
    if overwrite and existing:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        log.info("--overwrite: removed the previous run's files from %s", out)
    save_config(config, out / "config.yaml")
    save_id_maps(seqs, out)
    if popularity is None:
        write_popularity(seqs, out)  # the serving fallback for histories without a known item
    else:
        write_json(out / POPULARITY_FILE, popularity_json(popularity, seqs.item_map))
    if data.titles:
        write_json(out / "titles.json", data.titles)
    if resumed:
        # log.jsonl holds exactly the epochs the checkpoint covers (a run killed after logging an epoch but before
        # its checkpoint would otherwise log that epoch twice).
        write_log(out / "log.jsonl", state.history)
        log.info("resumed from %s after epoch %d", out / "checkpoint.pt", state.epoch)


def _evaluate_ranks(model, seqs, protocol, config: RunConfig, device: torch.device, dist: DistInfo | None,
                    user_index: np.ndarray | None = None):
    """Per-user ranks of ``protocol`` for ``model``: evaluated whole, or (data-parallel) each process scoring its
    share of the batches and the parts gathered on every process; both give the same result. ``user_index``
    (rank-local data): ``seqs`` is this process's share of the users, with these global indices; each process
    evaluates its own users and the parts are gathered under the global indices (``evaluate_rank_local``)."""
    score_fn = model_score_fn(model, config.data.max_len, device)
    batch_size = config.train.eval_batch_size
    if user_index is not None and dist is not None:
        return evaluate_rank_local(score_fn, seqs, user_index, protocol, batch_size, dist)
    if dist is None:
        return evaluate_ranks(score_fn, seqs, protocol, batch_size)
    part = evaluate_ranks(score_fn, seqs, protocol, batch_size, shard=(dist.rank, dist.world_size))
    return UserRanks.merge(gather_objects(part, dist))


def _check_item_table_sharding(config: RunConfig, dist: DistInfo | None) -> None:
    """``ConfigError`` unless ``train.item_table_sharding`` can run here: a data-parallel run (the table is split over
    its processes) with TorchRec and FBGEMM installed. The model's table is checked when it is built."""
    what = f"train.item_table_sharding={config.train.item_table_sharding}"
    if dist is None:
        raise ConfigError(f"{what} splits the item table over the processes of a data-parallel run: start the run "
                          "with genrec train --nproc N (or torchrun), or set train.item_table_sharding=none")  # fmt: skip
    try:
        require_torchrec()
    except ImportError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _world_size_dependent_randomness(config: RunConfig) -> str | None:
    """What in ``config`` draws random numbers that depend on how the global batch is split, or None."""
    m = config.model
    if m.name == "sasrec" and m.dropout > 0:
        return f"SASRec's attention dropout (model.dropout={m.dropout}) is drawn inside the attention kernel per process"
    if m.attention_impl == "jagged" and (m.dropout > 0 or m.linear_dropout > 0):
        return "the jagged attention engine draws its dropout masks per process (model.attention_impl=jagged)"
    return None


def check_dataset_name(name: str) -> None:
    """Raise ``ConfigError`` unless ``name`` is a registry dataset, "table", "sequences" or "preprocessed"."""
    own = ("table", "sequences", "preprocessed")
    if name not in DATASETS and name not in own:
        known = ", ".join(repr(n) for n in [*DATASETS, *own])
        raise ConfigError(f"data.dataset: {name!r} is not one of {known} (`genrec data list` describes them)")


def _differences(stored: RunConfig, config: RunConfig) -> list[str]:
    """What would make resuming ``stored``'s run with ``config`` train a different run."""
    found = config_differences(with_absolute_paths(stored), config, ("model", "data"))
    if stored.eval.selection != config.eval.selection:  # it decides the training split
        found.append(f"eval.selection: {stored.eval.selection!r} -> {config.eval.selection!r}")
    if (stored.train.item_table_sharding == "none") != (config.train.item_table_sharding == "none"):
        # the optimizer state differs: AdamW over the whole model, or over all but the (fused-SGD) item table
        found.append(f"train.item_table_sharding: {stored.train.item_table_sharding!r} -> "
                     f"{config.train.item_table_sharding!r}")
    return found


def _check_same_items(out: Path, seqs) -> None:
    """On resume the data must give the same item ids as the run's item_ids.json (else the weights mean nothing)."""
    path = out / "item_ids.json"
    if not path.exists():
        raise FileNotFoundError(f"--resume: {path} not found")
    if load_item_map(out).external != seqs.item_map.external:
        raise ValueError(f"--resume: the data no longer gives the item ids in {path}; the run cannot continue on it")


def _check_training_positions(train_lengths: np.ndarray, seqs, config: RunConfig) -> None:
    """Refuse data with no next-item target in any training sequence (the loss would be undefined every epoch)."""
    if int(train_lengths.sum()) > 0:
        return
    held_out = 2 if config.eval.selection == "valid" else 1  # items kept out of training per user
    need = held_out + 2  # one more than the held-out items and a single training item
    raise ValueError(
        f"no training positions: every user has at most {int(seqs.lengths.max())} interactions, so after "
        f"leave-one-out (eval.selection={config.eval.selection}, {held_out} item(s) held out per user) each training "
        f"sequence has a single item and no next item to learn. Users need at least {need} interactions: set "
        f"data.min_seq_len={need} to keep only those, or use more data"
    )


def _position_sparsity(history: list[dict]) -> float | None:
    """Fraction of training positions that Stochastic Length dropped over the logged epochs."""
    done = [h for h in history if h.get("positions")]
    if not done:
        return None
    return 1.0 - sum(h["tokens"] for h in done) / sum(h["positions"] for h in done)


# Models with a time input, and what it is called in their papers.
_TIME_INPUTS = {"hstu": "time bias", "fuxi-alpha": "temporal channel"}


def _time_notes(config: RunConfig, seqs) -> list[str]:
    what = _TIME_INPUTS.get(config.model.name)
    if what is None or not config.model.use_time_bias:
        return ["the model uses no timestamps"]
    n_time = int(seqs.has_time.sum())
    if n_time == seqs.num_users:
        return [f"{what} on for every user"]
    return [f"{what} on for {n_time:,} of {seqs.num_users:,} users; off (no timestamps) for the rest"]


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k not in INTEGER_METRICS)
