from pathlib import Path

import pytest

from genrec.config import ConfigError, RunConfig, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        cfg = load_config(path)
        assert cfg.model.name in ("hstu", "sasrec"), path


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
