import pytest
import torch

from genrec.data.ranking_batch import RankingBatch, RankingSchema

SCHEMA = RankingSchema(num_items=9, num_users=3, tasks=("like", "love"), actions=("r1", "r2", "r3", "r4", "r5"),
                       user_features=("age",), user_feature_sizes=(7,), dense_features=("hour",))  # fmt: skip


def batch(**over):
    b = dict(
        user_ids=torch.tensor([1, 2]),
        hist_items=torch.tensor([[3, 4, 0], [5, 0, 0]]),
        hist_actions=torch.tensor([[8, 16, 0], [1, 0, 0]]),
        hist_times=torch.tensor([[10, 20, 0], [5, 0, 0]]),
        hist_lengths=torch.tensor([2, 1]),
        cand_items=torch.tensor([[6, 7], [8, 0]]),
        cand_times=torch.tensor([[30, 30], [9, 0]]),
        cand_mask=torch.tensor([[True, True], [True, False]]),
        user_features=torch.tensor([[2], [0]]),
        dense_features=torch.zeros(2, 2, 1),
        labels=torch.zeros(2, 2, 2),
    )
    b.update(over)
    return RankingBatch(**b)


def test_a_well_formed_batch_validates():
    batch().validate(SCHEMA)
    assert batch().to("cpu").hist_labels is None


@pytest.mark.parametrize("over, match", [
    ({"labels": torch.zeros(2, 2, 3)}, "labels: shape"),
    ({"cand_items": torch.tensor([[6, 10], [8, 0]])}, "exceeds"),
    ({"hist_lengths": torch.tensor([1, 1])}, "left-aligned"),
    ({"cand_mask": torch.tensor([[True, True], [True, True]])}, "cand_mask"),
    ({"dense_features": torch.zeros(2, 2, 2)}, "dense_features: shape"),
    ({"label_weights": torch.ones(2, 2, 1)}, "label_weights: shape"),
    ({"label_weights": torch.tensor([[[1.0, -1.0], [1.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])}, "finite and >= 0"),
    ({"label_weights": torch.full((2, 2, 2), float("nan"))}, "finite and >= 0"),
    ({"cand_domains": torch.tensor([[1, 1], [1, 0]])}, r"cand_domains: values must be in \[0, 0\]"),
    ({"cand_domains": torch.tensor([1, 1])}, "cand_domains: shape"),
])  # fmt: skip
def test_malformed_batches_are_refused(over, match):
    with pytest.raises(ValueError, match=match):
        batch(**over).validate(SCHEMA)


def test_domains_and_label_weights_in_range_validate():
    schema = RankingSchema(num_items=9, num_users=3, tasks=("like", "love"), actions=("r1", "r2", "r3", "r4", "r5"),
                           user_features=("age",), user_feature_sizes=(7,), dense_features=("hour",),
                           domains=("young", "old"))  # fmt: skip
    batch(cand_domains=torch.tensor([[1, 2], [2, 0]]), label_weights=torch.rand(2, 2, 2)).validate(schema)
    with pytest.raises(ValueError, match=r"cand_domains: values must be in \[0, 2\]"):
        batch(cand_domains=torch.tensor([[1, 3], [2, 0]])).validate(schema)


def test_schema_checks_itself():
    with pytest.raises(ValueError, match="at least one task"):
        RankingSchema(num_items=1, num_users=1, tasks=(), actions=())
    with pytest.raises(ValueError, match="same length"):
        RankingSchema(num_items=1, num_users=1, tasks=("a",), actions=(), user_features=("x",))
