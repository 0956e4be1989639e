from pathlib import Path

import pytest
import yaml

from genrec.config import ConfigError, RunConfig, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_are_typed_and_nested():
    cfg = load_config(ROOT / "configs/ml-1m/hstu.yaml", ["train.lr=2e-3", "model.num_blocks=4", "train.betas=[0.9, 0.99]"])
    assert cfg.train.lr == 0.002 and cfg.model.num_blocks == 4 and cfg.train.betas == (0.9, 0.99)


@pytest.mark.parametrize(
    "override, message",
    [("train.lrr=1", "unknown key"), ("model.num_blocks=two", "expected an integer"), ("train.lr", "key=value"),
     ("model.use_time_bias=3", "true/false")],
)
def test_bad_overrides_fail_with_reason(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/ml-1m/hstu.yaml", [override])


def test_round_trip():
    cfg = load_config(None, ["data.dataset=amazon-beauty", "eval.hr_ks=[5, 10]"])
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize(
    "override, field, allowed",
    [
        ("model.name=hstuu", "model.name", "'hstu', 'sasrec'"),
        ("model.attention_impl=flash", "model.attention_impl", "'padded', 'jagged'"),
        ("model.attention_norm=sqrt", "model.attention_norm", "'max_len', 'length'"),
        ("train.negatives=per_user", "train.negatives", "'shared', 'per_sequence', 'per_position', 'full'"),
        ("train.autocast=float16", "train.autocast", "'none', 'bfloat16'"),
        ("eval.selection=test", "eval.selection", "'valid', 'test-peeking', 'refit'"),
        ("eval.candidates=all", "eval.candidates", "'full', 'sampled'"),
        ("data.on_bad_rows=ignore", "data.on_bad_rows", "'error', 'skip'"),
    ],
)
def test_choice_fields_are_checked_at_load(override, field, allowed):
    bad = override.split("=", 1)[1]
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/ml-1m/hstu.yaml", [override])
    message = str(info.value)
    assert field in message and repr(bad) in message and allowed in message
    assert "hstu.yaml" in message  # and the file it came from


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.epochs=0", "train.epochs"), ("train.batch_size=0", "train.batch_size"), ("train.lr=0", "train.lr"),
        ("train.lr=-1e-3", "train.lr"), ("model.dropout=1.0", "model.dropout"),
        ("model.linear_dropout=-0.1", "model.linear_dropout"), ("data.max_len=1", "data.max_len"),
        ("train.stochastic_length_alpha=0.5", "train.stochastic_length_alpha"),
        ("train.stochastic_length_alpha=2.5", "train.stochastic_length_alpha"),
        ("train.stochastic_length_alpha=1.0", "train.stochastic_length_alpha"),
        ("train.num_negatives=0", "train.num_negatives"), ("train.temperature=0", "train.temperature"),
        ("train.patience=0", "train.patience"), ("train.eval_batch_size=0", "train.eval_batch_size"),
        ("data.min_seq_len=2", "data.min_seq_len"), ("model.embedding_dim=0", "model.embedding_dim"),
        ("model.num_heads=0", "model.num_heads"), ("eval.num_negatives=0", "eval.num_negatives"),
        ("eval.hr_ks=[0, 10]", "eval.hr_ks"), ("train.betas=[0.9, 1.0]", "train.betas"),
        ("train.time_budget_minutes=-1", "train.time_budget_minutes"), ("train.num_threads=-2", "train.num_threads"),
        ("train.device=gpu", "train.device"), ("train.device=cuda:x", "train.device"),
        ("train.select_metric=NDCG@5", "train.select_metric"), ("train.select_metric=AUC", "train.select_metric"),
        ("train.in_batch_negatives=-1", "train.in_batch_negatives"), ("train.warmup_epochs=-0.5", "train.warmup_epochs"),
        ("train.warmup_epochs=500", "train.warmup_epochs"), ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
        ("train.min_lr_ratio=-0.1", "train.min_lr_ratio"),
    ],
)
def test_meaningless_values_are_refused_at_load(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(ROOT / "configs/ml-1m/hstu.yaml", [override])


@pytest.mark.parametrize(
    "override",
    ["train.device=cuda", "train.device=cuda:1", "train.device=mps", "train.stochastic_length_alpha=1.8",
     "train.stochastic_length_alpha=2", "train.select_metric=HR@50", "train.select_metric=MRR", "model.dropout=0"],
)
def test_meaningful_values_still_load(override):
    load_config(ROOT / "configs/ml-1m/hstu.yaml", [override])


def test_select_metric_follows_the_configured_cut_offs():
    cfg = load_config(None, ["eval.ndcg_ks=[5]", "train.select_metric=NDCG@5"])
    assert cfg.train.select_metric == "NDCG@5"


def test_directly_built_configs_are_checked_too():
    from genrec.config import ModelConfig, TrainConfig

    with pytest.raises(ConfigError, match=r"model\.name.*'bert'"):
        ModelConfig(name="bert")
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        TrainConfig(epochs=0)


@pytest.mark.parametrize(
    "columns, message",
    [
        ("{user: user, item: item, ts: t}", r"data\.columns.*'ts'.*'user', 'item', 'timestamp', 'rating', 'event'"),
        ("{user: user, item: [a, b]}", r"data\.columns\.item"),
        ("{user: user, item: 1.5}", r"data\.columns\.item"),
        ("{user: user, item: true}", r"data\.columns\.item"),
        ("{user: user}", r"data\.columns.*'item'"),
        ("[user, item]", r"data\.columns: expected a mapping"),
    ],
)
def test_table_columns_are_checked_at_load(columns, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.dataset=table", "data.path=x.csv", f"data.columns={columns}"])


def test_table_columns_accept_names_and_positions():
    cfg = load_config(None, ["data.dataset=table", "data.path=x.csv", "data.columns={user: 0, item: 1, timestamp: ts}"])
    assert cfg.data.columns == {"user": 0, "item": 1, "timestamp": "ts"}


def test_stored_config_with_the_retired_init_option_loads(tmp_path):
    stored = load_config(ROOT / "configs/ml-1m/hstu.yaml").to_dict()
    stored["model"]["init"] = "reference"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(stored))
    cfg = load_config(path)
    assert "init" not in cfg.to_dict()["model"]
    stored["model"]["init"] = "genrec-v1"
    path.write_text(yaml.safe_dump(stored))
    with pytest.raises(ConfigError, match=r"model\.init.*'genrec-v1'"):
        load_config(path)


def test_every_shipped_config_loads_and_names_its_command():
    """Each YAML under configs/ loads with its loader (ranking configs also build their model), and its header gives
    the command that runs it and what was measured."""
    from genrec.config import load_ranking_config
    from genrec.data.ranking_batch import RankingSchema
    from genrec.train.ranking import build_ranker

    paths = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(paths) >= 8
    schema = RankingSchema(num_items=20, num_users=5, tasks=("like", "love"), actions=("r1", "r2", "r3", "r4", "r5"),
                           user_features=("age",), user_feature_sizes=(7,), dense_features=("hour",))  # fmt: skip
    for path in paths:
        header = "\n".join(ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("#"))
        assert "Command:" in header, f"{path}: the header does not give the command"
        assert "Measured:" in header or "Expected:" in header, f"{path}: the header does not give what was measured"
        assert "__" not in header, f"{path}: unfilled header"
        if path.name.startswith("ranking-"):
            cfg = load_ranking_config(path)
            build_ranker(cfg.model, schema, task_weights=None, seed=0, max_history=cfg.data.max_history)
        else:
            load_config(path)
