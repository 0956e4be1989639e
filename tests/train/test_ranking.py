"""The ranking training loop (genrec.train.ranking) and the ranking run config, on a tiny synthetic event log."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from genrec.config import (
    ConfigError,
    RankingDataConfig,
    RankingModelConfig,
    RankingRunConfig,
    RankingTrainConfig,
    load_ranking_config,
)
from genrec.data.ranking import RankingDataset, build_ranking_dataset
from genrec.eval.ranking_metrics import paired_bootstrap
from genrec.models.ranking_floors import multitask_bce_loss
from genrec.train.checkpoint import load_state
from genrec.train.ranking import build_ranker, load_predictions, train_ranker

TASKS = ("like", "love")


def synthetic_events(num_users: int = 40, num_items: int = 30, events: int = 16, seed: int = 0,
                     love: bool = True) -> pd.DataFrame:  # fmt: skip
    """A log with a learnable signal: P(like) = sigmoid(item quality + user bias); love = like and a second draw."""
    rng = np.random.default_rng(seed)
    quality = rng.normal(0.0, 1.5, num_items + 1)
    rows = []
    for u in range(1, num_users + 1):
        bias = rng.normal(0.0, 0.5)
        t = 1_000_000 + int(rng.integers(0, 10_000))
        for _ in range(events):
            item = int(rng.integers(1, num_items + 1))
            t += int(rng.integers(60, 3600))
            p = 1.0 / (1.0 + np.exp(-(quality[item] + bias)))
            like = int(rng.random() < p)
            lv = int(love and like and rng.random() < p)
            rows.append((str(u), str(item), t, 1 | (like << 1) | (lv << 2), True, like, lv))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "actions", "candidate", "task:like", "task:love"])


def synthetic_dataset(**kw) -> RankingDataset:
    return build_ranking_dataset(synthetic_events(**kw), name="synthetic", tasks=TASKS,
                                 actions=("view", "like", "love"), split="user-last", n_eval=3,
                                 max_candidates=3)  # fmt: skip


@pytest.fixture(scope="module")
def dataset() -> RankingDataset:
    return synthetic_dataset()


def make_config(tmp_path, name: str = "logreg", **train) -> RankingRunConfig:
    params = {"num_buckets": 4096} if name == "logreg" else {}
    settings = {"epochs": 3, "batch_size": 16, "lr": 0.01, "select_metric": "AUC", "patience": 5, "num_threads": 1}
    settings.update(train)
    return RankingRunConfig(
        data=RankingDataConfig(dataset="synthetic", n_eval=3, max_history=12, max_candidates=3),
        model=RankingModelConfig(name=name, params=params),
        train=RankingTrainConfig(**settings),
        output_dir=str(tmp_path / f"run-{name}"),
    )


class TinyRanker(nn.Module):
    """A contract-following ranker with dropout (so the torch RNG matters): item embedding -> dropout -> T logits."""

    def __init__(self, num_items: int, num_tasks: int, nan_after: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(num_items + 1, 8)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, num_tasks)
        self.calls = 0
        self.nan_after = nan_after

    def forward(self, batch) -> torch.Tensor:
        logits = self.out(self.drop(self.emb(batch.cand_items)))  # [B, C, T]
        return logits * batch.cand_mask.unsqueeze(-1)

    def loss(self, batch):
        self.calls += 1
        loss = multitask_bce_loss(self(batch), batch.labels, batch.cand_mask, (1.0,) * self.out.out_features)
        if self.nan_after is not None and self.calls > self.nan_after:
            loss = loss * float("nan")
        return loss


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ training
def test_training_improves_validation_auc(tmp_path, dataset):
    config = make_config(tmp_path, epochs=4)
    results = train_ranker(config, dataset=dataset, progress=False)
    log = read_log(tmp_path / "run-logreg")
    aucs = [row["select_value"] for row in log]
    assert len(aucs) == 4
    assert max(aucs) > aucs[0] + 0.01, aucs  # learning continues past the first epoch
    assert results["best_epoch"] > 1
    assert results["valid"]["select_value"] == pytest.approx(max(aucs))
    assert results["test"]["metrics"]["like"]["auc"] > 0.6  # the item-quality signal is learned
    # selection value = mean over tasks of the validation AUC
    best = log[results["best_epoch"] - 1]
    assert best["select_value"] == pytest.approx(np.mean([best["valid"][t]["auc"] for t in TASKS]))


def test_results_store_protocol_and_test_predictions(tmp_path, dataset):
    results = train_ranker(make_config(tmp_path, epochs=1), dataset=dataset, progress=False)
    run = tmp_path / "run-logreg"
    stored = json.loads((run / "results.json").read_text())
    assert stored == results
    for part in ("valid", "test"):
        proto = stored[part]["protocol"]
        assert (proto["dataset"], proto["split"], proto["part"], proto["tasks"]) == ("synthetic", "user-last", part,
                                                                                      list(TASKS))  # fmt: skip
        assert set(proto["metrics"]) >= {"auc", "gauc", "ne", "log_loss", "calibration"}
    assert stored["selection"]["metric"] == "AUC" and stored["selection"]["tasks"] == list(TASKS)
    pred = load_predictions(run / "test_predictions.npz")
    counts = dataset.counts("test", 3)
    assert pred.probs.shape == (counts["candidates"], 2) and pred.labels.shape == pred.probs.shape
    assert pred.tasks == TASKS
    assert ((pred.probs >= 0) & (pred.probs <= 1)).all()
    # the saved predictions reproduce the stored test metrics exactly
    again = pred.metrics()
    for task in TASKS:
        for key in ("auc", "gauc", "ne", "log_loss", "calibration"):
            assert again[task][key] == pytest.approx(stored["test"]["metrics"][task][key], rel=0, abs=0)


def test_saved_predictions_give_paired_bootstrap_between_models(tmp_path, dataset):
    train_ranker(make_config(tmp_path, epochs=2), dataset=dataset, progress=False)
    train_ranker(make_config(tmp_path, name="popularity"), dataset=dataset, progress=False)
    a = load_predictions(tmp_path / "run-logreg" / "test_predictions.npz")
    b = load_predictions(tmp_path / "run-popularity" / "test_predictions.npz", like=a)
    diff = paired_bootstrap(a.probs[:, 0], b.probs[:, 0], a.labels[:, 0], a.user_ids, num_resamples=50)
    assert diff["auc"].ci_low <= diff["auc"].diff <= diff["auc"].ci_high
    # predictions of a different dataset are refused as a pair
    other = train_ranker(dataclass_replace_output(make_config(tmp_path, epochs=1), tmp_path / "other"),
                         dataset=synthetic_dataset(seed=1), progress=False)  # fmt: skip
    assert other["test"]["protocol"]["part"] == "test"
    with pytest.raises(ValueError, match="differ"):
        load_predictions(tmp_path / "other" / "test_predictions.npz", like=a)


def dataclass_replace_output(config: RankingRunConfig, path) -> RankingRunConfig:
    return dataclasses.replace(config, output_dir=str(path))


def test_popularity_floor_is_fitted_once(tmp_path, dataset):
    results = train_ranker(make_config(tmp_path, name="popularity", epochs=5), dataset=dataset, progress=False)
    assert results["fitted_by_counting"] and results["epochs_run"] == 1 and results["best_epoch"] == 1
    assert results["test"]["metrics"]["like"]["auc"] > 0.6


def test_test_part_is_evaluated_once_for_the_best_epoch(tmp_path, dataset, monkeypatch):
    parts: list[str] = []
    original = RankingDataset.batches

    def recording(self, part="train", *args, **kwargs):
        parts.append(part)
        return original(self, part, *args, **kwargs)

    monkeypatch.setattr(RankingDataset, "batches", recording)
    results = train_ranker(make_config(tmp_path, epochs=3), dataset=dataset, progress=False)
    assert parts.count("test") == 1
    assert parts.count("valid") == 3 and parts.count("train") == 3
    assert parts[-1] == "test"  # after the last epoch
    assert all("test" not in row for row in read_log(tmp_path / "run-logreg"))
    # the test metrics belong to the best validation epoch's weights
    best = load_file(str(tmp_path / "run-logreg" / "best.safetensors"))
    saved = json.loads((tmp_path / "run-logreg" / "best.json").read_text())
    assert saved["epoch"] == results["best_epoch"]
    assert set(best) >= {"bias", "hashed.weight"}


def test_resume_equals_uninterrupted_run(tmp_path, dataset):
    schema = dataset.schema

    def run(epochs: int, out: str, resume: bool = False) -> dict:
        torch.manual_seed(0)
        model = TinyRanker(schema.num_items, schema.num_tasks)
        config = make_config(tmp_path, epochs=epochs, select_metric="NE", lr=0.05)
        config = dataclass_replace_output(config, tmp_path / out)
        return train_ranker(config, dataset=dataset, model=model, resume=resume, progress=False)

    full = run(3, "full")
    run(1, "split")
    resumed = run(3, "split", resume=True)
    a = load_state(tmp_path / "full" / "checkpoint.pt")
    b = load_state(tmp_path / "split" / "checkpoint.pt")
    assert set(a["model"]) == set(b["model"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    wa = load_file(str(tmp_path / "full" / "best.safetensors"))
    wb = load_file(str(tmp_path / "split" / "best.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert full["test"]["metrics"] == resumed["test"]["metrics"]
    assert read_log(tmp_path / "full") == [
        {**row, "train_seconds": r2["train_seconds"], "eval_seconds": r2["eval_seconds"]}
        for row, r2 in zip(read_log(tmp_path / "split"), read_log(tmp_path / "full"))
    ]  # same epochs, same losses and validation metrics (only timings differ)


def test_resume_with_other_settings_is_refused(tmp_path, dataset):
    config = make_config(tmp_path, epochs=1)
    train_ranker(config, dataset=dataset, progress=False)
    changed = make_config(tmp_path, epochs=2, seed=7)
    with pytest.raises(ConfigError, match="train.seed"):
        train_ranker(changed, dataset=dataset, resume=True, progress=False)


def test_existing_run_dir_is_refused_unless_overwrite_or_resume(tmp_path, dataset):
    config = make_config(tmp_path, epochs=1)
    train_ranker(config, dataset=dataset, progress=False)
    before = (tmp_path / "run-logreg" / "results.json").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run"):
        train_ranker(config, dataset=dataset, progress=False)
    assert (tmp_path / "run-logreg" / "results.json").read_bytes() == before
    with pytest.raises(ValueError, match="exclude each other"):
        train_ranker(config, dataset=dataset, overwrite=True, resume=True, progress=False)
    train_ranker(config, dataset=dataset, overwrite=True, progress=False)
    assert len(read_log(tmp_path / "run-logreg")) == 1  # the old log was replaced, not appended to


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, dataset):
    model = TinyRanker(dataset.schema.num_items, dataset.schema.num_tasks, nan_after=2)
    with pytest.raises(FloatingPointError, match="epoch 1, step 3: the training loss is nan"):
        train_ranker(make_config(tmp_path), dataset=dataset, model=model, progress=False)
    assert not (tmp_path / "run-logreg" / "checkpoint.pt").exists()
    assert not (tmp_path / "run-logreg" / "results.json").exists()


def test_undefined_selection_metric_is_refused_before_writing(tmp_path):
    no_love = synthetic_dataset(love=False)  # the love task has no positive anywhere
    with pytest.raises(ValueError, match="undefined on the validation part for task 'love'"):
        train_ranker(make_config(tmp_path), dataset=no_love, progress=False)
    assert not (tmp_path / "run-logreg").exists()
    # with the task out of selection (weight 0) the run selects on 'like' alone
    results = train_ranker(make_config(tmp_path, epochs=1, task_weights=[1.0, 0.0]), dataset=no_love, progress=False)
    assert results["selection"]["tasks"] == ["like"]
    assert results["test"]["metrics"]["love"]["auc"] is None  # undefined is stored as null, with its reason
    assert "auc" in results["test"]["metrics"]["love"]["undefined"]


def test_dataset_must_match_the_config(tmp_path, dataset):
    config = make_config(tmp_path)
    wrong = dataclasses.replace(config, data=dataclasses.replace(config.data, dataset="ml-1m"))
    with pytest.raises(ConfigError, match="data.dataset"):
        train_ranker(wrong, dataset=dataset, progress=False)
    wrong = dataclasses.replace(config, data=dataclasses.replace(config.data, split="global-time"))
    with pytest.raises(ConfigError, match="data.split"):
        train_ranker(wrong, dataset=dataset, progress=False)
    wrong = dataclasses.replace(config, data=dataclasses.replace(config.data, n_eval=2))
    with pytest.raises(ConfigError, match="data.n_eval: 2, but the dataset passed in holds out 3"):
        train_ranker(wrong, dataset=dataset, progress=False)
    unknown = dataclasses.replace(config, data=dataclasses.replace(config.data, dataset="no-such-data"))
    with pytest.raises(ConfigError, match="not a ranking dataset"):
        train_ranker(unknown, progress=False)
    assert not (tmp_path / "run-logreg").exists()


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.name=xgboost", "model.name: 'xgboost' is not one of"),
        ("train.select_metric=NDCG@10", "train.select_metric: 'NDCG@10' is not one of"),
        ("data.split=random", "data.split: 'random' is not one of"),
        ("data.max_candidates=0", "data.max_candidates: 0 must be >= 1"),
        ("data.max_history=0", "data.max_history: 0 must be >= 1"),
        ("train.lr=0", "train.lr: 0.0 must be > 0"),
        ("train.epochs=0", "train.epochs: 0 must be >= 1"),
        ("train.task_weights=[0, 0]", "train.task_weights: [0.0, 0.0] must be finite"),
        ("train.task_weights=[1, -1]", "train.task_weights"),
        ("train.device=gpu", "train.device: 'gpu' is not a device name"),
        ("train.batchsize=3", "unknown key(s) ['batchsize']"),
        ("model.params.task_weights=[1]", "is set in train.task_weights"),
        ("train.task_balancing=pareto", "train.task_balancing"),
        ("data.only_domain=young", "data.only_domain: 'young' needs data.domains"),
    ],
)
def test_config_errors_at_load(tmp_path, override, message):
    path = tmp_path / "ranking.yaml"
    path.write_text("data:\n  dataset: ml-1m\nmodel:\n  name: dlrm\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as err:
        load_ranking_config(path, [override])
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_config_loads_and_round_trips(tmp_path):
    path = tmp_path / "ranking.yaml"
    path.write_text("data:\n  dataset: ml-1m\n  split: user-last\nmodel:\n  name: logreg\n  params:\n"
                    "    num_buckets: 1024\ntrain:\n  lr: 1e-3\n  task_weights: [1, 0.5]\n")  # fmt: skip
    config = load_ranking_config(path, ["train.select_metric=GAUC"])
    assert config.model.params == {"num_buckets": 1024}
    assert config.train.task_weights == (1.0, 0.5) and config.train.lr == 1e-3
    assert RankingRunConfig.from_dict(config.to_dict()) == config


def test_build_ranker_checks_params(dataset):
    schema = dataset.schema
    model = build_ranker(RankingModelConfig(name="logreg", params={"num_buckets": 64}), schema, seed=3)
    assert model.num_buckets == 64
    rates = (0.2, 0.05)
    started = build_ranker(RankingModelConfig(name="logreg", params={"task_base_rates": list(rates)}), schema)
    biases = next(p for n, p in started.named_parameters() if n.endswith("bias") and p.numel() == schema.num_tasks)
    assert torch.allclose(torch.sigmoid(biases.detach()), torch.tensor(rates))
    with pytest.raises(ConfigError, match="task_base_rates"):
        build_ranker(RankingModelConfig(name="logreg", params={"task_base_rates": [0.2, 1.5]}), schema)
    with pytest.raises(ConfigError, match=r"model.params: unknown key\(s\) \['buckets'\]"):
        build_ranker(RankingModelConfig(name="logreg", params={"buckets": 64}), schema)
    with pytest.raises(ConfigError, match="model.params.num_buckets: expected an integer"):
        build_ranker(RankingModelConfig(name="logreg", params={"num_buckets": "many"}), schema)
    with pytest.raises(ConfigError, match="num_buckets must be >= 1"):
        build_ranker(RankingModelConfig(name="logreg", params={"num_buckets": 0}), schema)
    with pytest.raises(ConfigError, match="prior_strength must be a positive number"):
        build_ranker(RankingModelConfig(name="popularity", params={"prior_strength": -1}), schema)
    with pytest.raises(ConfigError, match="train.task_weights: 3 weights for the dataset's 2 tasks"):
        build_ranker(RankingModelConfig(name="popularity"), schema, task_weights=(1.0, 1.0, 1.0))


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("dlrm", {"embedding_dim": 8, "bottom_mlp": [16], "top_mlp": [16], "history_pooling": "action_weighted"}),
        ("din", {"embedding_dim": 8, "attention_mlp": [8], "mlp": [16], "activation": "dice"}),
        ("hstu-ranker", {"embedding_dim": 16, "num_blocks": 1, "num_heads": 1, "attention_dim": 8, "linear_dim": 8}),
        ("hstu-ranker", {"embedding_dim": 16, "num_blocks": 1, "num_heads": 1, "attention_dim": 8, "linear_dim": 8,
                         "variant": "interleaved"}),
    ],
)
def test_learned_rankers_train_end_to_end(tmp_path, dataset, name, params):
    config = make_config(tmp_path, epochs=2, select_metric="NE")
    config = dataclasses.replace(config, model=RankingModelConfig(name=name, params=params))
    results = train_ranker(config, dataset=dataset, progress=False)
    assert results["model"] == name and results["epochs_run"] == 2
    for task in TASKS:
        assert 0.0 <= results["test"]["metrics"][task]["auc"] <= 1.0
    log = read_log(tmp_path / "run-logreg")
    if name == "hstu-ranker":  # the HSTU ranker reports its per-task losses
        assert set(log[0]["task_losses"]) == set(TASKS)
    stored = load_ranking_config(tmp_path / "run-logreg" / "config.yaml")
    assert stored.model.params == params


def test_build_ranker_checks_learned_model_params(dataset):
    schema = dataset.schema
    model = build_ranker(RankingModelConfig(name="hstu-ranker", params={"embedding_dim": 8, "attention_dim": 4,
                                                                        "linear_dim": 4}), schema, max_history=7)  # fmt: skip
    assert model.config.max_history == 7  # the data's history window unless params set one
    assert model.config.embedding_dim == 8
    with pytest.raises(ConfigError, match="variant must be one of"):
        build_ranker(RankingModelConfig(name="hstu-ranker", params={"variant": "stacked"}), schema)
    with pytest.raises(ConfigError, match="model.params.num_blocks: expected an integer, got 1.5"):
        build_ranker(RankingModelConfig(name="hstu-ranker", params={"num_blocks": 1.5}), schema)
    with pytest.raises(ConfigError, match=r"model.params: unknown key\(s\) \['ffn_dim'\] for model.name='dlrm'"):
        build_ranker(RankingModelConfig(name="dlrm", params={"ffn_dim": 8}), schema)
    with pytest.raises(ConfigError, match="activation must be one of"):
        build_ranker(RankingModelConfig(name="din", params={"activation": "relu"}), schema)
    with pytest.raises(ConfigError, match="model.params.mlp: expected a list"):
        build_ranker(RankingModelConfig(name="din", params={"mlp": 32}), schema)
    with pytest.raises(ConfigError, match="history_pooling must be one of"):
        build_ranker(RankingModelConfig(name="dlrm", params={"history_pooling": "max"}), schema)


# ------------------------------------------------------------------------------------------------ serving state
def test_run_directory_holds_the_ranking_state(tmp_path, dataset):
    from genrec.train.ranking import RANKING_RUN_FILES, RANKING_STATE_FILES, RankingState

    train_ranker(make_config(tmp_path, epochs=1), dataset=dataset, progress=False)
    run = tmp_path / "run-logreg"
    assert set(RANKING_STATE_FILES) <= set(RANKING_RUN_FILES)
    state = RankingState.load(run)
    assert state.schema == dataset.schema and state.item_map.external == dataset.item_map.external
    assert (state.dataset, state.split) == ("synthetic", "user-last")
    # the saved statistics give the dataset's dense features for a user unknown to training, at any time
    rng = np.random.default_rng(0)
    shape = (7, 5)
    items = rng.integers(0, dataset.schema.num_items + 1, shape)
    t0 = rng.integers(int(dataset.ev_time.min()) - 100, int(dataset.ev_time.max()) + 100, shape)
    last = t0 - rng.integers(-1, 5000, shape)
    users = np.zeros(shape, np.int64)
    np.testing.assert_array_equal(state.features.features(users, t0, items, t0 + 5, last),
                                  dataset.dense_features_for(users, t0, items, t0 + 5, last))
    # broken state files are refused with the file's name
    (run / "ranking_item_ids.json").write_text('["1", "1"]')
    with pytest.raises(ValueError, match="ranking_item_ids.json"):
        RankingState.load(run)
    (run / "ranking_state.json").write_text('{"format": 99}')
    with pytest.raises(ValueError, match="ranking_state.json.*format 99"):
        RankingState.load(run)


# ------------------------------------------------------------------------------------------------ task balancing
DLRM_PARAMS = {"embedding_dim": 8, "bottom_mlp": [16], "top_mlp": [16]}


def balanced_config(tmp_path, method: str, out: str, epochs: int = 2, **train) -> RankingRunConfig:
    config = make_config(tmp_path, epochs=epochs, select_metric="NE", task_balancing=method, **train)
    return dataclasses.replace(config, model=RankingModelConfig(name="dlrm", params=DLRM_PARAMS),
                               output_dir=str(tmp_path / out))  # fmt: skip


def test_fixed_balancing_trains_the_weights_of_a_plain_adamw_loop(tmp_path, dataset):
    """train.task_balancing=fixed is the training loop as it was: AdamW steps on the ranker's own total, with the
    loop's seeding and batch order, give the same weights bit for bit."""
    from genrec.train.ranking import _epoch_seed

    config = balanced_config(tmp_path, "fixed", "fixed", epochs=2, task_weights=[1.0, 0.5])
    train_ranker(config, dataset=dataset, progress=False)
    trained = load_state(tmp_path / "fixed" / "checkpoint.pt")["model"]
    # the reference: the loop written out by hand
    tc, dc = config.train, config.data
    torch.manual_seed(tc.seed)
    model = build_ranker(config.model, dataset.schema, task_weights=tc.task_weights, seed=tc.seed,
                         max_history=dc.max_history)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    for epoch in (1, 2):
        seed = _epoch_seed(tc.seed, epoch)
        torch.manual_seed(seed)
        model.train()
        for batch in dataset.batches("train", tc.batch_size, shuffle=True, seed=seed, max_history=dc.max_history,
                                     max_candidates=dc.max_candidates):  # fmt: skip
            loss, _ = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    expected = model.state_dict()
    assert set(trained) == set(expected)
    for key in expected:
        assert torch.equal(trained[key], expected[key]), key
    log = read_log(tmp_path / "fixed")
    assert log[0]["task_balance"]["method"] == "fixed"
    assert log[0]["task_balance"]["weights"] == {"like": 1.0, "love": 0.5}


def test_balancer_lr_sets_the_log_variances_own_learning_rate(tmp_path, dataset):
    slow = train_ranker(balanced_config(tmp_path, "uncertainty", "slow", epochs=1), dataset=dataset, progress=False)
    fast = train_ranker(balanced_config(tmp_path, "uncertainty", "fast", epochs=1, balancer_lr=0.5), dataset=dataset,
                        progress=False)  # fmt: skip
    a = load_state(tmp_path / "slow" / "checkpoint.pt")
    b = load_state(tmp_path / "fast" / "checkpoint.pt")
    assert a["optimizer"]["param_groups"][1]["lr"] == 0.01 and b["optimizer"]["param_groups"][1]["lr"] == 0.5
    assert b["optimizer"]["param_groups"][0]["lr"] == 0.01  # the network keeps train.lr
    # Adam moves a parameter by about lr per step: 50x the rate moves the log-variances much further
    moved_slow = a["balancer"]["log_variances"].abs().max()
    moved_fast = b["balancer"]["log_variances"].abs().max()
    assert moved_fast > 5 * moved_slow
    assert slow["config"]["train"]["balancer_lr"] is None and fast["config"]["train"]["balancer_lr"] == 0.5
    with pytest.raises(ConfigError, match="balancer_lr"):
        RankingTrainConfig(balancer_lr=0.0)


def test_uncertainty_balancing_resumes_exactly(tmp_path, dataset):
    full = train_ranker(balanced_config(tmp_path, "uncertainty", "full", epochs=3), dataset=dataset, progress=False)
    train_ranker(balanced_config(tmp_path, "uncertainty", "split", epochs=1), dataset=dataset, progress=False)
    resumed = train_ranker(balanced_config(tmp_path, "uncertainty", "split", epochs=3), dataset=dataset,
                           resume=True, progress=False)  # fmt: skip
    a = load_state(tmp_path / "full" / "checkpoint.pt")
    b = load_state(tmp_path / "split" / "checkpoint.pt")
    s = a["balancer"]["log_variances"]
    assert s.shape == (2,) and bool((s != 0).all())  # learned, and stored in the checkpoint
    assert torch.equal(s, b["balancer"]["log_variances"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # the optimizer's state of the log-variances (their own group, without weight decay) is restored too
    group = a["optimizer"]["param_groups"][1]
    assert group["weight_decay"] == 0.0
    for index in group["params"]:
        for name, value in a["optimizer"]["state"][index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][name]))
    assert full["test"]["metrics"] == resumed["test"]["metrics"]
    assert full["task_balancing"] == "uncertainty"
    log_full, log_split = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    assert [r["task_balance"] for r in log_full] == [r["task_balance"] for r in log_split]
    assert log_full[-1]["task_balance"]["log_variances"] == dict(zip(TASKS, s.double().tolist()))


@pytest.mark.parametrize("method", ["mgda", "pe-ltr"])
def test_pareto_balancing_logs_its_weights(tmp_path, dataset, method):
    results = train_ranker(balanced_config(tmp_path, method, method, epochs=1, task_weights=[1.0, 3.0]),
                           dataset=dataset, progress=False)  # fmt: skip
    assert results["task_balancing"] == method and results["epochs_run"] == 1
    balance = read_log(tmp_path / method)[0]["task_balance"]
    weights = balance["weights"]
    assert sum(weights.values()) == pytest.approx(1.0) and min(weights.values()) >= 0
    if method == "pe-ltr":  # every step's weights respect the bounds 0.5 · w / Σ w, so does their mean
        assert weights["like"] >= 0.125 - 1e-9 and weights["love"] >= 0.375 - 1e-9


def test_task_balancing_is_checked_before_writing(tmp_path, dataset):
    popularity = dataclasses.replace(make_config(tmp_path, name="popularity", task_balancing="mgda"))
    with pytest.raises(ConfigError, match="fitted by counting"):
        train_ranker(popularity, dataset=dataset, progress=False)
    # a ranker whose loss is a bare total gives nothing to balance
    tiny = TinyRanker(dataset.schema.num_items, dataset.schema.num_tasks)
    with pytest.raises(ConfigError, match="needs the per-task losses"):
        train_ranker(make_config(tmp_path, task_balancing="uncertainty"), dataset=dataset, model=tiny, progress=False)
    # the logistic regression is one linear model per task: nothing shared for MGDA to balance
    with pytest.raises(ConfigError, match="train.task_balancing: 'mgda'"):
        train_ranker(make_config(tmp_path, task_balancing="mgda"), dataset=dataset, progress=False)
    assert not (tmp_path / "run-logreg").exists() and not (tmp_path / "run-popularity").exists()
    # a run is resumed with the balancing it was trained with
    train_ranker(balanced_config(tmp_path, "fixed", "run", epochs=1), dataset=dataset, progress=False)
    with pytest.raises(ConfigError, match="train.task_balancing"):
        train_ranker(balanced_config(tmp_path, "uncertainty", "run", epochs=2), dataset=dataset, resume=True,
                     progress=False)  # fmt: skip


# ------------------------------------------------------------------------------------------------ domains
def write_tiny_ml1m(folder, num_users: int = 24, num_items: int = 12, events: int = 10, seed: int = 0) -> None:
    """A small folder in the ML-1M file formats (ratings.dat, users.dat, movies.dat), so the real loader and its
    domain definitions run on it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    ages = (1, 18, 25, 35, 45, 50, 56)
    genres = ("Action", "Comedy", "Drama", "Comedy|Romance", "Thriller|Drama", "Animation")
    (folder / "users.dat").write_text("".join(f"{u}::{'MF'[u % 2]}::{ages[u % len(ages)]}::{u % 20}::0000{u}\n"
                                              for u in range(1, num_users + 1)))  # fmt: skip
    (folder / "movies.dat").write_text("".join(f"{i}::Movie {i} (2000)::{genres[i % len(genres)]}\n"
                                               for i in range(1, num_items + 1)))  # fmt: skip
    quality = rng.normal(0.0, 1.0, num_items + 1)
    lines = []
    for u in range(1, num_users + 1):
        t = 978_300_000 + int(rng.integers(0, 10_000))
        for i in rng.permutation(np.arange(1, num_items + 1))[:events]:
            t += int(rng.integers(60, 3600))
            stars = int(np.clip(np.round(3 + quality[i] + rng.normal(0.0, 0.8)), 1, 5))
            lines.append(f"{u}::{i}::{stars}::{t}\n")
    (folder / "ratings.dat").write_text("".join(lines))


HSTU_TOWERS = {"embedding_dim": 8, "num_blocks": 1, "num_heads": 1, "attention_dim": 4, "linear_dim": 4,
               "domain_towers": True}  # fmt: skip


def domain_config(tmp_path, domains: str | None, only_domain: str | None = None, out: str = "run-domains"):
    return RankingRunConfig(
        data=RankingDataConfig(dataset="ml-1m", data_dir=str(tmp_path / "data"), n_eval=2, max_history=8,
                               max_candidates=2, domains=domains, only_domain=only_domain),
        model=RankingModelConfig(name="hstu-ranker", params=HSTU_TOWERS),
        train=RankingTrainConfig(epochs=1, batch_size=8, lr=0.01, select_metric="NE", num_threads=1),
        output_dir=str(tmp_path / out),
    )  # fmt: skip


def test_domains_from_the_config_reach_the_data_and_the_model(tmp_path):
    from genrec.data.ranking import load_ranking_dataset

    write_tiny_ml1m(tmp_path / "data" / "ml-1m")
    results = train_ranker(domain_config(tmp_path, "age"), progress=False)  # loads the data itself
    assert results["epochs_run"] == 1 and results["model"] == "hstu-ranker"
    assert any(note.startswith("domains 'age'") for note in results["data"]["notes"])
    # one domain only: every scored test candidate is of that domain
    train_ranker(domain_config(tmp_path, "age", "25-34", out="run-one"), progress=False)
    one = load_predictions(tmp_path / "run-one" / "test_predictions.npz")
    full = load_ranking_dataset("ml-1m", tmp_path / "data", n_eval=2, max_candidates=2, domains="age")
    age_group = {int(u): full.ev_domain[full.ev_user == u][0] for u in np.unique(one.user_ids)}
    assert len(one.user_ids) > 0 and set(age_group.values()) == {2}
    # without data.domains the tower option has no domains to read: refused before anything is written
    with pytest.raises(ValueError, match="domain"):
        train_ranker(domain_config(tmp_path, None, out="run-none"), progress=False)
    assert not (tmp_path / "run-none").exists()


def test_a_dataset_with_other_domains_than_the_config_is_refused(tmp_path):
    from genrec.data.ranking import load_ranking_dataset

    write_tiny_ml1m(tmp_path / "data" / "ml-1m")
    by_genre = load_ranking_dataset("ml-1m", tmp_path / "data", n_eval=2, max_candidates=2, domains="genre")
    with pytest.raises(ConfigError, match="data.domains: 'age', but .* definition 'genre'"):
        train_ranker(domain_config(tmp_path, "age"), dataset=by_genre, progress=False)
    with pytest.raises(ConfigError, match=r"data.domains: None, but .* domains \['action-thriller'"):
        train_ranker(domain_config(tmp_path, None), dataset=by_genre, progress=False)
    plain = load_ranking_dataset("ml-1m", tmp_path / "data", n_eval=2, max_candidates=2)
    with pytest.raises(ConfigError, match="data.domains: 'genre', but .* built without domains"):
        train_ranker(domain_config(tmp_path, "genre"), dataset=plain, progress=False)
    with pytest.raises(ConfigError, match="data.only_domain: 'comedy', but the dataset passed in keeps every domain"):
        train_ranker(domain_config(tmp_path, "genre", "comedy"), dataset=by_genre, progress=False)
    comedy = by_genre.restrict_to_domain("comedy")
    with pytest.raises(ConfigError, match="data.only_domain: None, but .* keeps only domain 'comedy'"):
        train_ranker(domain_config(tmp_path, "genre"), dataset=comedy, progress=False)
    assert not (tmp_path / "run-domains").exists()
    results = train_ranker(domain_config(tmp_path, "genre", "comedy"), dataset=comedy, progress=False)
    assert results["epochs_run"] == 1


def test_ranking_state_keeps_the_domains(tmp_path):
    from genrec.data.ranking import load_ranking_dataset
    from genrec.ranking_api import Ranker
    from genrec.train.ranking import RankingState

    write_tiny_ml1m(tmp_path / "data" / "ml-1m")
    by_age = load_ranking_dataset("ml-1m", tmp_path / "data", n_eval=2, max_candidates=2, domains="age")
    RankingState.from_dataset(by_age).save(tmp_path / "state")
    state = RankingState.load(tmp_path / "state")
    assert state.schema.domains == ("under-25", "25-34", "35-plus") and state.schema == by_age.schema
    # a state file written before domains were stored loads with no domains
    path = tmp_path / "state" / "ranking_state.json"
    meta = json.loads(path.read_text())
    del meta["schema"]["domains"]
    path.write_text(json.dumps(meta))
    assert RankingState.load(tmp_path / "state").schema.domains == ()
    meta["schema"]["domains"] = "age"  # a malformed entry is refused with the file's name
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="ranking_state.json.*schema.domains"):
        RankingState.load(tmp_path / "state")
    # a run trained with domain towers reloads through the ranking API with its domains
    train_ranker(domain_config(tmp_path, "age"), dataset=by_age, progress=False)
    ranker = Ranker.load(tmp_path / "run-domains")
    assert ranker.state_.schema.domains == ("under-25", "25-34", "35-plus")
