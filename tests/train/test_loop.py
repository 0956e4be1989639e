import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from genrec.config import ConfigError, load_config
from genrec.train.checkpoint import load_state
from genrec.train.loop import epoch_batches, train
from genrec.train.loss import catalogue_cross_entropy, sampled_logits, sampled_softmax_loss
from genrec.train.schedule import LRSchedule

from ..conftest import synthetic_interactions


def _config(tmp_path, name, model="hstu", extra=()):
    path = tmp_path / "inter.csv"
    if not path.exists():
        synthetic_interactions().to_csv(path, index=False)
    return load_config(None, [
        "data.dataset=table", f"data.path={path}", "data.columns={user: user, item: item, timestamp: timestamp}",
        "data.max_len=12", f"model.name={model}", "model.embedding_dim=8", "model.num_blocks=1", "model.num_heads=2",
        "model.attention_dim=4", "model.linear_dim=4", "model.ffn_dim=8", "train.batch_size=8", "train.epochs=3",
        "train.num_negatives=16", "train.eval_batch_size=16", f"output_dir={tmp_path / name}", *extra,
    ])  # fmt: skip


@pytest.mark.parametrize("model", ["hstu", "sasrec"])
def test_resume_equals_uninterrupted_run(tmp_path, model):
    full = train(_config(tmp_path, "full", model), progress=False)
    part = _config(tmp_path, "part", model, ["train.epochs=2"])
    train(part, progress=False)
    assert load_state(tmp_path / "part" / "checkpoint.pt")["train_state"]["epoch"] == 2
    resumed = train(_config(tmp_path, "part", model), resume=True, progress=False)
    assert resumed["test"]["metrics"] == full["test"]["metrics"]
    assert [h["valid"] for h in json.loads("[" + ",".join(open(tmp_path / "part/log.jsonl")) + "]")] == [
        h["valid"] for h in json.loads("[" + ",".join(open(tmp_path / "full/log.jsonl")) + "]")
    ]
    a = load_state(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_state(tmp_path / "part" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_directory_contents_and_test_reported_at_best_epoch(tmp_path):
    res = train(_config(tmp_path, "run", extra=["train.epochs=4"]), progress=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "item_ids.json", "checkpoint.pt", "best.safetensors", "best.json", "log.jsonl", "results.json"):
        assert (run / name).exists(), name
    assert not list(run.glob("*.tmp"))
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    best = max(range(len(log)), key=lambda i: (log[i]["valid"]["NDCG@10"], -i))
    assert res["best_epoch"] == best + 1
    assert res["test"]["protocol"]["name"].startswith("loo-test/full")
    assert res["valid"]["protocol"]["target"] == "valid"
    assert set(load_file(str(run / "best.safetensors"))) == set(load_state(run / "checkpoint.pt")["model"])


def test_model_learns_the_synthetic_pattern(tmp_path):
    res = train(_config(tmp_path, "learn", extra=["train.epochs=15", "train.lr=0.01"]), progress=False)
    # next item = previous + 1 in 80% of steps: a learned model ranks it far above chance (HR@10 chance ~ 10/30)
    assert res["test"]["metrics"]["HR@10"] > 0.6


def test_epoch_batches_cover_every_row_once():
    lengths = np.random.default_rng(0).integers(1, 100, size=1000)
    for buckets in (0, 4):
        batches = epoch_batches(lengths, 32, np.random.default_rng(1), buckets)
        assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    b1 = epoch_batches(lengths, 32, np.random.default_rng(1), 4)
    spread = np.mean([np.ptp(lengths[b]) for b in b1])
    assert spread < 0.5 * np.mean([np.ptp(lengths[b]) for b in epoch_batches(lengths, 32, np.random.default_rng(1), 0)])


@pytest.mark.parametrize("mode", ["shared", "per_sequence", "per_position"])
def test_sampled_softmax_matches_manual(mode):
    torch.manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(11, 4), dim=-1)
    user = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    targets = torch.tensor([[1, 2, 0], [3, 4, 5]])
    g = torch.Generator().manual_seed(5)
    vectors = lambda ids=None: table if ids is None else table[ids]  # noqa: E731
    loss = sampled_softmax_loss(user, targets, vectors, 10, 6, 0.05, mode, generator=g)
    g = torch.Generator().manual_seed(5)
    m = int((targets > 0).sum())
    shape = {"shared": (6,), "per_sequence": (2, 6), "per_position": (m, 6)}[mode]
    neg = torch.randint(1, 11, shape, generator=g)
    u, t = user[targets > 0], targets[targets > 0]
    row_of = torch.arange(2).unsqueeze(1).expand(2, 3)[targets > 0]
    manual = []
    for i in range(m):
        n = neg if mode == "shared" else neg[row_of[i]] if mode == "per_sequence" else neg[i]
        logits = torch.cat([(u[i] @ table[t[i]]).view(1), table[n] @ u[i]]) / 0.05
        logits[1:][n == t[i]] = -5e4
        manual.append(-torch.log_softmax(logits, 0)[0])
    assert torch.allclose(loss, torch.stack(manual).mean(), atol=1e-5)


def test_full_catalogue_softmax_matches_manual_and_never_scores_padding():
    torch.manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(11, 4), dim=-1)
    table[0] = 10.0  # the padding row: a huge logit if it were ever a candidate
    user = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    targets = torch.tensor([[1, 2, 0], [3, 4, 10]])
    vectors = lambda ids=None: table if ids is None else table[ids]  # noqa: E731
    loss = sampled_softmax_loss(user, targets, vectors, 10, 6, 0.05, "full")
    u, t = user[targets > 0], targets[targets > 0]
    manual = [-torch.log_softmax(table[1:] @ u[i] / 0.05, 0)[t[i] - 1] for i in range(len(t))]
    assert torch.allclose(loss, torch.stack(manual).mean(), atol=1e-5)
    summed = sampled_softmax_loss(user, targets, vectors, 10, 6, 0.05, "full", normalizer=1.0)
    assert torch.allclose(summed, loss * len(t), atol=1e-4)
    with pytest.raises(ValueError, match="'full'"):
        sampled_softmax_loss(user, targets, vectors, 10, 6, 0.05, "everything")


@pytest.mark.parametrize("chunk", [1, 7, 256])  # chunk boundaries inside, at and past the positions
def test_catalogue_cross_entropy_equals_autograd_values_and_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(23, 5, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    w = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (23,), generator=g)
    (3.0 * catalogue_cross_entropy(u, torch.nn.functional.normalize(w, dim=-1), y, 0.05, chunk)).backward()
    got = (u.grad.clone(), w.grad.clone())
    u.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy(u @ torch.nn.functional.normalize(w, dim=-1).T / 0.05, y, reduction="sum")
    (3.0 * ref).backward()
    assert torch.allclose(got[0], u.grad, atol=1e-10) and torch.allclose(got[1], w.grad, atol=1e-10)


def test_training_with_full_catalogue_softmax_learns(tmp_path):
    res = train(_config(tmp_path, "full-softmax", extra=["train.epochs=15", "train.lr=0.01", "train.negatives=full"]),
                progress=False)
    assert res["test"]["metrics"]["HR@10"] > 0.6


def test_reference_test_peeking_protocol_is_labelled(tmp_path):
    res = train(_config(tmp_path, "peek", extra=["eval.selection=test-peeking"]), progress=False)
    assert res["selection"] == "test-peeking"
    assert res["valid"]["protocol"]["target"] == "test"  # selected on the test item, and says so
    assert res["valid"]["metrics"] == res["test"]["metrics"]


def test_constant_normalizer_weights_every_position_equally():
    torch.manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(11, 4), dim=-1)
    user = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    targets = torch.tensor([[1, 2, 0], [3, 4, 5]])
    args = (user, targets, lambda ids: table[ids], 10, 6, 0.05, "per_sequence")
    mean = sampled_softmax_loss(*args, generator=torch.Generator().manual_seed(1))
    summed = sampled_softmax_loss(*args, generator=torch.Generator().manual_seed(1), normalizer=1.0)
    assert torch.allclose(summed, mean * 5)


def test_per_position_sparse_full_and_gather_paths_agree():
    torch.manual_seed(0)
    targets = torch.tensor([[1, 2, 0], [3, 4, 5]])
    results = {}
    for path in ("sparse", "full", "gather"):
        table = torch.nn.functional.normalize(torch.randn(11, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
        table.requires_grad_()
        user = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
        vectors = lambda ids=None, t=table: t if ids is None else t[ids]  # noqa: E731
        loss = sampled_softmax_loss(torch.nn.functional.normalize(user, dim=-1), targets, vectors, 10, 6, 0.05,
                                    "per_position", generator=torch.Generator().manual_seed(3), per_position_path=path)
        loss.backward()
        results[path] = (loss.detach(), user.grad, table.grad)
    for path in ("full", "gather"):
        for a, b in zip(results["sparse"], results[path]):
            assert torch.allclose(a, b, atol=1e-6), path


@pytest.mark.parametrize("rows", [7, 40_000])  # 16-bit and 32-bit sort keys in the backward
def test_sampled_logits_values_and_gradients(rows):
    g = torch.Generator().manual_seed(rows)
    u = torch.randn(9, 5, generator=g, requires_grad=True)
    table = torch.randn(rows, 5, generator=g, requires_grad=True)
    ids = torch.randint(0, rows, (9, 6), generator=g)
    ids[0] = ids[0, 0]  # repeats within a row
    ids[1:3, 2] = ids[4, 1]  # and across rows
    w = torch.randn(9, 6, generator=g)
    out = sampled_logits(u, table, ids)
    ref = torch.einsum("md,mkd->mk", u, table[ids])
    assert torch.allclose(out, ref, atol=1e-5)
    gu, gt = torch.autograd.grad((out * w).sum(), (u, table))
    ru, rt = torch.autograd.grad((ref * w).sum(), (u, table))
    assert torch.allclose(gu, ru, atol=1e-5) and torch.allclose(gt, rt, atol=1e-5)


def test_stochastic_length_training_reports_sparsity(tmp_path):
    res = train(_config(tmp_path, "sl", extra=["train.epochs=2", "train.stochastic_length_alpha=1.2"]), progress=False)
    sl = res["stochastic_length"]
    assert sl["alpha"] == 1.2
    assert 0.0 < sl["expected_sparsity"] < 1.0 and 0.0 < sl["measured_position_sparsity"] < 1.0
    log = [json.loads(line) for line in open(tmp_path / "sl" / "log.jsonl")]
    assert all(h["tokens"] < h["positions"] for h in log)
    with pytest.raises(ValueError, match="stochastic_length_alpha"):
        train(_config(tmp_path, "bad", extra=["train.stochastic_length_alpha=0.5"]), progress=False)


def test_refit_trains_fixed_epochs_on_train_plus_valid_and_tests_once(tmp_path):
    res = train(_config(tmp_path, "refit", extra=["train.epochs=2", "eval.selection=refit"]), progress=False)
    assert res["selection"] == "refit" and res["valid"] is None
    assert res["best_epoch"] == res["epochs_run"] == 2  # the last epoch is the model: nothing is selected
    assert res["test"]["protocol"]["target"] == "test"
    log = [json.loads(line) for line in open(tmp_path / "refit" / "log.jsonl")]
    assert [h["valid"] for h in log] == [{}, {}]  # no evaluation during a refit
    # it trains on s[:-1]: one more position per user than the validation-selected run
    sel = train(_config(tmp_path, "sel", extra=["train.epochs=1"]), progress=False)
    assert log[0]["positions"] > json.loads(open(tmp_path / "sel" / "log.jsonl").readline())["positions"]
    assert sel["valid"] is not None


def test_data_without_training_positions_is_refused_before_training(tmp_path):
    frame = synthetic_interactions()
    frame = frame.groupby("user", sort=False).head(3)  # every user: exactly 3 events
    frame.to_csv(tmp_path / "three.csv", index=False)
    cfg = _config(tmp_path, "three", extra=[f"data.path={tmp_path / 'three.csv'}"])
    with pytest.raises(ValueError, match=r"no training positions.*data\.min_seq_len=4"):
        train(cfg, progress=False)
    assert not (tmp_path / "three").exists()  # refused before any run file


def test_non_finite_loss_stops_the_run_without_writing_its_checkpoint(tmp_path):
    # a step of size 1e30 leaves weights whose activations overflow: the second step's loss is nan
    cfg = _config(tmp_path, "diverged", extra=["train.lr=1e30"])
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 2: the training loss is nan.*train\.lr"):
        train(cfg, progress=False)
    run = tmp_path / "diverged"
    assert not (run / "checkpoint.pt").exists() and not (run / "best.safetensors").exists()


@pytest.mark.parametrize("mode", ["shared", "per_sequence", "per_position", "full"])
def test_more_negatives_than_items_trains(tmp_path, mode):
    path = tmp_path / "five.csv"
    synthetic_interactions(num_items=5).to_csv(path, index=False)
    cfg = _config(tmp_path, f"five-{mode}", extra=[f"data.path={path}", f"train.negatives={mode}",
                                                   "train.num_negatives=128", "train.epochs=1"])  # fmt: skip
    res = train(cfg, progress=False)
    assert res["data"]["summary"].split(", ")[1] == "5 items"
    log = [json.loads(line) for line in open(tmp_path / f"five-{mode}" / "log.jsonl")]
    assert np.isfinite(log[0]["loss"]) and log[0]["loss"] > 0


@pytest.mark.parametrize("draws", [5, 6, 128])  # as many draws as rows, and more
def test_sampled_logits_with_more_draws_than_rows(draws):
    g = torch.Generator().manual_seed(draws)
    u = torch.randn(7, 4, generator=g, requires_grad=True)
    table = torch.randn(5, 4, generator=g, requires_grad=True)
    ids = torch.randint(0, 5, (7, draws), generator=g)
    w = torch.randn(7, draws, generator=g)
    out = sampled_logits(u, table, ids)
    ref = torch.einsum("md,mkd->mk", u, table[ids])
    assert torch.allclose(out, ref, atol=1e-5)
    gu, gt = torch.autograd.grad((out * w).sum(), (u, table))
    ru, rt = torch.autograd.grad((ref * w).sum(), (u, table))
    assert torch.allclose(gu, ru, atol=1e-5) and torch.allclose(gt, rt, atol=1e-5)


def test_lr_schedule_values():
    cos = LRSchedule(lr=1e-3, total_steps=110, warmup_steps=10, kind="cosine", min_lr_ratio=0.1)
    assert cos.at(0) == 0.0 and cos.at(5) == pytest.approx(5e-4) and cos.at(10) == pytest.approx(1e-3)  # warm-up
    assert cos.at(60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # cosine midpoint
    assert cos.at(110) == pytest.approx(1e-4)  # the end: lr · min_lr_ratio
    assert cos.for_step(0) == pytest.approx(1e-4) and cos.for_step(109) == pytest.approx(1e-4)  # lr(1) = lr / W; lr(T)
    assert all(cos.for_step(s) > cos.for_step(s + 1) for s in range(10, 109))  # decays monotonically after warm-up
    const = LRSchedule(lr=1e-3, total_steps=110, warmup_steps=10)
    assert const.at(5) == pytest.approx(5e-4) and const.at(10) == const.at(110) == 1e-3
    assert LRSchedule(lr=1e-3, total_steps=110).for_step(0) == 1e-3 and LRSchedule(lr=1e-3, total_steps=110).is_constant
    assert LRSchedule(lr=1e-3, total_steps=4, warmup_steps=4, kind="cosine").at(4) == pytest.approx(1e-3)
    tc = _config_train(["train.epochs=10", "train.warmup_epochs=0.5", "train.lr_schedule=cosine"])
    assert LRSchedule.from_config(tc, 7).warmup_steps == 4 and LRSchedule.from_config(tc, 7).total_steps == 70
    tiny = _config_train(["train.epochs=10", "train.warmup_epochs=0.01"])
    assert LRSchedule.from_config(tiny, 7).warmup_steps == 1  # a warm-up asked for is never rounded away


def _config_train(extra):
    return load_config(None, list(extra)).train


def test_cosine_schedule_with_warmup_is_logged_per_epoch(tmp_path):
    cfg = _config(tmp_path, "cosine", extra=["train.lr=0.01", "train.lr_schedule=cosine", "train.warmup_epochs=1",
                                             "train.min_lr_ratio=0.1"])  # fmt: skip
    train(cfg, progress=False)
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "cosine" / "log.jsonl")]
    # the lr of each epoch's last step: the end of the warm-up, the cosine midpoint, the end of training
    assert lrs == pytest.approx([0.01, 0.01 * (0.1 + 0.9 * 0.5), 0.01 * 0.1])
    plain = train(_config(tmp_path, "constant", extra=["train.epochs=2"]), progress=False)
    assert [json.loads(line)["lr"] for line in open(tmp_path / "constant" / "log.jsonl")] == [1e-3, 1e-3]
    assert plain["config"]["train"]["lr_schedule"] == "constant"


def test_interrupted_scheduled_run_resumes_with_the_same_learning_rates(tmp_path):
    sched = ["train.epochs=4", "train.lr=0.01", "train.lr_schedule=cosine", "train.warmup_epochs=1.5",
             "train.min_lr_ratio=0.05"]  # fmt: skip
    full = train(_config(tmp_path, "full", extra=sched), progress=False)
    # interrupted twice (a time budget used up after one epoch), then resumed to the end: the schedule still spans the
    # 4 epochs of train.epochs and continues from the checkpoint's step
    stop = ["train.time_budget_minutes=1e-9"]
    train(_config(tmp_path, "part", extra=[*sched, *stop]), progress=False)
    assert load_state(tmp_path / "part" / "checkpoint.pt")["train_state"]["epoch"] == 1
    train(_config(tmp_path, "part", extra=[*sched, *stop]), resume=True, progress=False)
    assert load_state(tmp_path / "part" / "checkpoint.pt")["train_state"]["epoch"] == 2
    resumed = train(_config(tmp_path, "part", extra=sched), resume=True, progress=False)
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("full", "part")]
    assert [h["lr"] for h in logs[1]] == [h["lr"] for h in logs[0]] and len(logs[0]) == 4
    assert [h["loss"] for h in logs[1]] == [h["loss"] for h in logs[0]]
    assert resumed["test"]["metrics"] == full["test"]["metrics"]
    a = load_state(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_state(tmp_path / "part" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_warmup_longer_than_training_is_refused_before_any_file(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.warmup_epochs: 4(\.0)? must be <= train\.epochs \(3\)"):
        _config(tmp_path, "long-warmup", extra=["train.epochs=3", "train.warmup_epochs=4"])
    cfg = _config(tmp_path, "long-warmup", extra=["train.epochs=3"])
    cfg.train.warmup_epochs = 4.0  # changed after the config was checked: the loop refuses it too
    with pytest.raises(ConfigError, match=r"train\.warmup_epochs: 4(\.0)? is longer than train\.epochs=3"):
        train(cfg, progress=False)
    assert not (tmp_path / "long-warmup").exists()


def test_bf16_autocast_runs_only_where_the_cpu_has_native_bf16(tmp_path):
    from genrec.runtime import native_bf16

    res = train(_config(tmp_path, "bf16", extra=["train.epochs=1", "train.autocast=bfloat16"]), progress=False)
    assert res["autocast"] == ("bfloat16" if native_bf16("cpu") else "none")
    assert res["config"]["train"]["autocast"] == "bfloat16"  # what was asked stays in the saved config
    assert res["machine"]["torch"] == torch.__version__
