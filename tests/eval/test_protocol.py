"""EvalProtocol: names, validation, JSON round trip, sequence splitting."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from genrec.eval.metrics import sample_candidates
from genrec.eval.protocol import EvalProtocol


def test_default_is_hstu_reference_protocol() -> None:
    p = EvalProtocol()
    assert p.name == "loo-test/full/exclude-seen/hist200"
    assert (p.split, p.target, p.candidates, p.exclude_seen, p.max_history) == (
        "leave-one-out", "test", "full", True, 200,
    )
    assert p.hr_ks == (1, 10, 50, 200) and p.ndcg_ks == (10, 50, 200)
    assert p.ties == "pessimistic"


def test_names() -> None:
    assert EvalProtocol(target="valid", candidates="sampled").name == (
        "loo-valid/sampled100/exclude-seen/hist200"
    )
    keep = EvalProtocol(exclude_seen=False, max_history=50)
    assert keep.name == "loo-test/full/keep-seen/hist50"
    sampled = EvalProtocol(candidates="sampled", num_negatives=99)
    assert sampled.name.startswith("loo-test/sampled99/")


def test_describe_mentions_the_essentials() -> None:
    text = EvalProtocol().describe()
    for needle in ("loo-test/full/exclude-seen/hist200", "last item", "full item catalogue",
                   "removed", "200", "pessimistic"):
        assert needle in text
    sampled = EvalProtocol(target="valid", candidates="sampled", seed=3).describe()
    assert "second-to-last" in sampled and "100 negatives" in sampled and "seed 3" in sampled


def test_json_round_trip() -> None:
    p = EvalProtocol(target="valid", candidates="sampled", num_negatives=50, hr_ks=(5, 10),
                     ndcg_ks=(10,), seed=4, max_history=50, exclude_seen=False)
    d = p.to_dict()
    assert d["name"] == p.name and d["hr_ks"] == [5, 10]
    restored = EvalProtocol.from_dict(json.loads(json.dumps(d)))
    assert restored == p and isinstance(restored.hr_ks, tuple)
    assert hash(restored) == hash(p)


def test_from_dict_checks_name_and_fields() -> None:
    d = EvalProtocol().to_dict()
    with pytest.raises(ValueError, match="name"):
        EvalProtocol.from_dict({**d, "name": "loo-valid/full/exclude-seen/hist200"})
    with pytest.raises(ValueError, match="unknown"):
        EvalProtocol.from_dict({**d, "bogus": 1})
    assert EvalProtocol.from_dict({"target": "valid"}) == EvalProtocol(target="valid")


def test_lists_are_normalised_to_tuples() -> None:
    assert EvalProtocol(hr_ks=[1, 10]) == EvalProtocol(hr_ks=(1, 10))  # type: ignore[arg-type]


def test_with_target() -> None:
    p = EvalProtocol(candidates="sampled", seed=2)
    v = p.with_target("valid")
    assert v.target == "valid" and v.candidates == "sampled" and v.seed == 2
    assert p.target == "test"
    with pytest.raises(ValueError):
        p.with_target("train")


def test_replace_is_validated_like_the_constructor() -> None:
    # Recommender.evaluate / the CLI change a stored protocol with dataclasses.replace: a bad value must not slip in
    p = EvalProtocol(candidates="sampled")
    with pytest.raises(ValueError, match="num_negatives"):
        dataclasses.replace(p, num_negatives=0)
    with pytest.raises(ValueError, match="candidates"):
        dataclasses.replace(p, candidates="popular")
    assert dataclasses.replace(p, hr_ks=[5]).hr_ks == (5,)


def test_repeat_consumption_rule_is_stated() -> None:
    excluded, kept = EvalProtocol(), EvalProtocol(exclude_seen=False)
    assert excluded.to_dict()["repeat_targets"] == "left-out" and kept.to_dict()["repeat_targets"] == "ranked"
    assert "also occurs in the history (repeat consumption) are left out" in excluded.describe()
    assert "are ranked like the others" in kept.describe()
    with pytest.raises(ValueError, match="repeat_targets"):
        EvalProtocol.from_dict({**excluded.to_dict(), "repeat_targets": "ranked"})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "random"},
        {"target": "train"},
        {"candidates": "popular"},
        {"ties": "optimistic"},
        {"num_negatives": 0},
        {"max_history": 0},
        {"seed": -1},
        {"hr_ks": ()},
        {"hr_ks": (0, 10)},
        {"ndcg_ks": (10, 10)},
        {"ndcg_ks": (2.5,)},
        {"hr_ks": "10"},
        {"exclude_seen": "yes"},
        {"num_negatives": True},
    ],
)
def test_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        EvalProtocol(**kwargs)


def test_split_sequence_test_and_valid() -> None:
    seq = np.array([5, 6, 7, 8, 9])
    hist, target = EvalProtocol().split_sequence(seq)
    assert hist.tolist() == [5, 6, 7, 8] and target == 9
    hist, target = EvalProtocol(target="valid").split_sequence(seq)
    assert hist.tolist() == [5, 6, 7] and target == 8


def test_split_sequence_truncates_history() -> None:
    seq = np.arange(1, 11)
    hist, target = EvalProtocol(max_history=3).split_sequence(seq)
    assert hist.tolist() == [7, 8, 9] and target == 10
    hist, target = EvalProtocol(max_history=3, target="valid").split_sequence(seq)
    assert hist.tolist() == [6, 7, 8] and target == 9


def test_split_sequence_too_short() -> None:
    with pytest.raises(ValueError):  # the history must hold at least one item
        EvalProtocol().split_sequence(np.array([1]))
    with pytest.raises(ValueError):
        EvalProtocol(target="valid").split_sequence(np.array([1, 2]))
    hist, target = EvalProtocol().split_sequence(np.array([1, 2]))
    assert hist.tolist() == [1] and target == 2


def test_rng_is_seeded() -> None:
    histories = [np.array([1, 2, 3]), np.array([4, 5])]
    targets = [3, 5]

    def negatives(seed: int) -> list[list[int]]:
        mask = sample_candidates(histories, targets, 500, 20, EvalProtocol(seed=seed).rng())
        return [np.flatnonzero(row).tolist() for row in mask.numpy()]

    assert negatives(5) == negatives(5)  # one seed: the same negatives
    assert negatives(5) != negatives(6)  # another seed: other negatives
