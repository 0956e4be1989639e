"""Distillation: soft targets through the serving heads or auxiliary heads, teacher lookup by event, stale cuts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from genrec.config import ConfigError, RankingModelConfig, RankingTrainConfig, load_ranking_config
from genrec.models.dlrm import DLRMRanker, DLRMRankerConfig
from genrec.models.ranking_floors import multitask_loss_terms
from genrec.ranking_api import Ranker
from genrec.train.distill import (
    TEACHER_PREFIX,
    ServingHeads,
    aux_schema,
    aux_task_weights,
    distill_batch,
    teacher_targets,
)
from genrec.train.ranking import build_run_model, load_predictions, train_ranker
from tests.train.test_ranking import TASKS, make_config, synthetic_dataset

DLRM_PARAMS = {"embedding_dim": 8, "bottom_mlp": [8], "top_mlp": [16]}


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(num_users=60, events=20)


def dlrm_config(tmp_path, out: str, **train):
    config = make_config(tmp_path, **{"epochs": 2, "select_metric": "NE", **train})
    return dataclasses.replace(config, model=RankingModelConfig(name="dlrm", params=dict(DLRM_PARAMS)),
                               output_dir=str(tmp_path / out))  # fmt: skip


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("teacher")
    train_ranker(dlrm_config(tmp, "teacher", epochs=3), dataset=dataset, progress=False)
    return tmp / "teacher"


def first_batch(dataset):
    return next(iter(dataset.batches("train", 8, shuffle=True, seed=3, max_history=12, max_candidates=3)))


def test_serving_head_mix_equals_the_weighted_sum_of_both_losses(dataset):
    torch.manual_seed(0)
    model = DLRMRanker(dataset.schema, DLRMRankerConfig(embedding_dim=8, bottom_mlp=(8,), top_mlp=(16,)))
    batch = first_batch(dataset)
    teacher = torch.randn(batch.labels.shape) * batch.cand_mask.unsqueeze(-1)
    alpha = 0.3
    mixed = distill_batch(batch, teacher, "serving", alpha)
    p = torch.sigmoid(teacher) * batch.cand_mask.unsqueeze(-1)
    logits = model(batch)
    on_labels = multitask_loss_terms(logits, batch, (1.0, 1.0), TASKS)[0]
    on_teacher = multitask_loss_terms(logits, dataclasses.replace(batch, labels=p), (1.0, 1.0), TASKS)[0]
    got = multitask_loss_terms(logits, mixed, (1.0, 1.0), TASKS)[0]
    assert torch.allclose(got, (1 - alpha) * on_labels + alpha * on_teacher, atol=1e-6)
    assert torch.equal(batch.labels, first_batch(dataset).labels)  # the input batch is left as it was


def test_aux_head_batch_appends_the_teacher_targets(dataset):
    batch = first_batch(dataset)
    teacher = torch.full(batch.labels.shape, 2.0)
    out = distill_batch(batch, teacher, "aux", 0.5, temperature=2.0)
    T = len(TASKS)
    assert out.labels.shape[-1] == 2 * T
    assert torch.equal(out.labels[..., :T], batch.labels)
    real = batch.cand_mask
    assert torch.allclose(out.labels[..., T:][real], torch.sigmoid(torch.tensor(1.0)).expand(int(real.sum()), T))
    assert float(out.labels[..., T:][~real].abs().sum()) == 0.0
    weighted = distill_batch(dataclasses.replace(batch, label_weights=torch.zeros_like(batch.labels)), teacher,
                             "aux", 0.5)  # fmt: skip
    assert torch.equal(weighted.label_weights[..., :T], torch.zeros_like(batch.labels))
    assert torch.equal(weighted.label_weights[..., T:], torch.ones_like(batch.labels))


def test_aux_schema_and_weights():
    from genrec.data.ranking_batch import RankingSchema

    schema = RankingSchema(num_items=3, num_users=2, tasks=("a", "b"), actions=("x",))
    assert aux_schema(schema).tasks == ("a", "b", TEACHER_PREFIX + "a", TEACHER_PREFIX + "b")
    assert aux_task_weights((1.0, 2.0), 2, 0.25) == (0.75, 1.5, 0.25, 0.5)
    with pytest.raises(ValueError, match="prefix"):
        aux_schema(dataclasses.replace(schema, tasks=("teacher:a",)))


def test_teacher_targets_are_found_by_event_whatever_the_row_cut(dataset, teacher_dir):
    from genrec.train.ranking import load_teacher

    teacher, _ = load_teacher(teacher_dir, dataset)
    targets = teacher_targets(teacher, dataset, "train", batch_size=7, max_history=12, max_candidates=3)
    assert targets.events.size == dataset.counts("train", 3)["candidates"]
    rows = dataset.rows("train", 3)
    which = np.array([5, 0, 9, 2])
    batch = dataset.make_batch(rows, which, 12)
    cidx, cmask = dataset.candidate_events(rows, which)
    teacher.eval()
    with torch.no_grad():
        direct = teacher(batch)
    assert torch.allclose(targets.lookup(cidx, cmask), direct, atol=1e-5)
    # a student cutting rows into single candidates finds the same events
    rows1 = dataset.rows("train", 1)
    c1, m1 = dataset.candidate_events(rows1, np.arange(len(rows1)))
    assert np.array_equal(np.sort(c1[m1]), targets.events)
    with pytest.raises(ValueError, match="no logits"):
        targets.lookup(np.array([[10**9]]), np.array([[True]]))


def test_distilled_students_train_save_and_serve(tmp_path, dataset, teacher_dir):
    plain = train_ranker(dlrm_config(tmp_path, "plain", seed=7), dataset=dataset, progress=False)
    serving = train_ranker(dlrm_config(tmp_path, "serving", seed=7, distill_teacher=str(teacher_dir),
                                       distill_weight=0.9), dataset=dataset, progress=False)  # fmt: skip
    aux = train_ranker(dlrm_config(tmp_path, "aux", distill_teacher=str(teacher_dir), distill_head="aux"),
                       dataset=dataset, progress=False)  # fmt: skip
    assert plain["distillation"] is None
    assert serving["distillation"]["head"] == "serving" and serving["distillation"]["weight"] == 0.9
    assert aux["distillation"]["head"] == "aux"
    # the aux student has 2T heads, serves T
    stored = load_ranking_config(tmp_path / "aux" / "config.yaml")
    model = build_run_model(stored, dataset.schema)
    assert isinstance(model, ServingHeads) and model.inner.schema.num_tasks == 2 * len(TASKS)
    ranker = Ranker.load(tmp_path / "aux")
    batch = first_batch(dataset)
    with torch.no_grad():
        assert ranker.model_(batch).shape[-1] == len(TASKS)
    # with weight 0.9 the student's test predictions move toward the teacher's (the same seed without a teacher
    # stays further away)
    preds = {name: load_predictions(d / "test_predictions.npz").probs for name, d in
             (("teacher", teacher_dir), ("plain", tmp_path / "plain"), ("serving", tmp_path / "serving"))}
    gap_plain = np.abs(preds["plain"] - preds["teacher"]).mean()
    gap_distilled = np.abs(preds["serving"] - preds["teacher"]).mean()
    assert gap_distilled < gap_plain


def test_a_teacher_of_other_data_is_refused(tmp_path, dataset, teacher_dir):
    other = synthetic_dataset(num_users=50, events=20, seed=4)
    with pytest.raises(ConfigError, match="other data"):
        train_ranker(dlrm_config(tmp_path, "s", distill_teacher=str(teacher_dir)), dataset=other, progress=False)
    with pytest.raises(ConfigError, match="not found"):
        train_ranker(dlrm_config(tmp_path, "s2", distill_teacher=str(tmp_path / "nothing")), dataset=dataset,
                     progress=False)  # fmt: skip
    assert not (tmp_path / "s").exists() and not (tmp_path / "s2").exists()


@pytest.mark.parametrize("field,value,message", [
    ("distill_weight", 1.0, "in \\(0, 1\\)"),
    ("distill_weight", 0.0, "in \\(0, 1\\)"),
    ("distill_temperature", 0.0, "positive"),
    ("distill_head", "logits", "distill_head"),
])  # fmt: skip
def test_distillation_settings_are_checked(field, value, message):
    with pytest.raises(ConfigError, match=message):
        RankingTrainConfig(distill_teacher="t", **{field: value})
    with pytest.raises(ConfigError, match="must be fixed"):
        RankingTrainConfig(distill_teacher="t", task_balancing="mgda")


def test_training_until_a_cut_drops_later_training_rows_only(dataset, tmp_path):
    rows = dataset.rows("train", 3)
    cut = int(np.median(rows.t0))
    early = dataset.restrict_training_until(cut)
    kept = early.rows("train", 3)
    assert 0 < len(kept) < len(rows) and bool((kept.t0 < cut).all())
    assert kept.size.sum() == rows.size[rows.t0 < cut].sum()
    for part in ("valid", "test"):
        assert np.array_equal(early.rows(part, 3).cands, dataset.rows(part, 3).cands)
    # the kept rows are the same (history, candidates) pairs
    b_all = dataset.make_batch(rows, np.flatnonzero(rows.t0 < cut)[:4], 12)
    b_early = early.make_batch(kept, np.arange(4), 12)
    assert torch.equal(b_all.cand_items, b_early.cand_items) and torch.equal(b_all.hist_items, b_early.hist_items)
    with pytest.raises(ValueError, match="no training row"):
        dataset.restrict_training_until(int(rows.t0.min()))
    config = dlrm_config(tmp_path, "stale")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, train_until=cut))
    results = train_ranker(config, dataset=dataset, progress=False)
    assert "before" in results["data"]["summary"]


def test_teacher_targets_given_once_equal_those_computed_from_the_run(tmp_path, dataset, teacher_dir):
    from genrec.train.ranking import load_teacher

    teacher, cfg = load_teacher(teacher_dir, dataset)
    targets = teacher_targets(teacher, dataset, "train", batch_size=256, max_history=cfg.data.max_history,
                              max_candidates=cfg.data.max_candidates)  # fmt: skip
    a = train_ranker(dlrm_config(tmp_path, "a", distill_teacher=str(teacher_dir)), dataset=dataset, progress=False)
    b = train_ranker(dlrm_config(tmp_path, "b", distill_teacher=str(teacher_dir)), dataset=dataset, teacher=targets,
                     progress=False)  # fmt: skip
    assert a["test"]["metrics"] == b["test"]["metrics"]
    with pytest.raises(ValueError, match="not set"):
        train_ranker(dlrm_config(tmp_path, "c"), dataset=dataset, teacher=targets, progress=False)


def test_aux_heads_with_history_labels_are_refused_before_writing(tmp_path, dataset, teacher_dir):
    config = dlrm_config(tmp_path, "inter", distill_teacher=str(teacher_dir), distill_head="aux")
    params = {"embedding_dim": 16, "num_blocks": 1, "num_heads": 1, "attention_dim": 8, "linear_dim": 8,
              "variant": "interleaved"}  # fmt: skip
    config = dataclasses.replace(config, model=RankingModelConfig(name="hstu-ranker", params=params))
    with pytest.raises(ConfigError, match="interleaved"):
        train_ranker(config, dataset=dataset, progress=False)
    assert not (tmp_path / "inter").exists()
    serving = dataclasses.replace(config, train=dataclasses.replace(config.train, distill_head="serving"),
                                  output_dir=str(tmp_path / "inter-serving"))  # fmt: skip
    results = train_ranker(serving, dataset=dataset, progress=False)
    assert results["distillation"]["head"] == "serving"
