"""Evaluation protocol: one frozen, serialisable description of *how* a number was measured.

Every reported metric is tied to an :class:`EvalProtocol`.  Its :attr:`EvalProtocol.name` is a
short stable key (``"loo-test/full/exclude-seen/hist200"``) and :meth:`EvalProtocol.describe`
is the plain-English sentence printed next to every result, so that numbers measured under
different protocols (full vs sampled candidates, valid vs test target, ...) are never mixed.

The default protocol reproduces the HSTU reference evaluation: leave-one-out on the last item,
full-catalogue ranking, items of the (truncated) history removed from the candidates, history
window 200.

Repeat consumption (a target that also occurs in the history the protocol sees): with
``exclude_seen`` the history's items are not candidates, so such a target could only be ranked by
breaking that rule; those users are left out of the metrics and counted as ``repeat_targets``.
Without ``exclude_seen`` they are ranked like any other user (and still counted).  Either way a
model cannot gain by echoing the history, and duplicating rows cannot inflate a metric (exact
duplicate rows are also dropped when the sequences are built, see :mod:`genrec.data.sequences`).

Conventions shared with :mod:`genrec.eval.metrics`: item ids are contiguous ints
``1..num_items``; 0 is padding and is never a candidate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from genrec.config import RunConfig

SPLITS: tuple[str, ...] = ("leave-one-out",)
TARGETS: tuple[str, ...] = ("valid", "test")
CANDIDATES: tuple[str, ...] = ("full", "sampled")
TIES: tuple[str, ...] = ("pessimistic",)
USERS: tuple[str, ...] = ("all", "with-timestamps", "without-timestamps")

# How many items at the end of a sequence are held out for each target under leave-one-out:
# "test" predicts seq[-1] from seq[:-1]; "valid" predicts seq[-2] from seq[:-2].
_HELD_OUT: dict[str, int] = {"test": 1, "valid": 2}


def _check_ks(field: str, ks: Any) -> tuple[int, ...]:
    """Validate a cut-off list and return it as a tuple of ints (lists are accepted)."""
    if isinstance(ks, (str, bytes)) or not hasattr(ks, "__iter__"):
        raise ValueError(f"{field} must be a sequence of positive ints, got {ks!r}")
    out = tuple(ks)
    if not out:
        raise ValueError(f"{field} must not be empty")
    for k in out:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{field} must contain positive ints, got {k!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{field} contains duplicates: {out}")
    return tuple(int(k) for k in out)


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{field} must be an int >= {minimum}, got {value!r}")


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class EvalProtocol:
    """How a next-item recommender is evaluated.

    Attributes:
        split: only ``"leave-one-out"`` (by position, per user).
        target: ``"test"`` = last item, history = every item before it;
            ``"valid"`` = second-to-last item, history = every item before it.
        candidates: ``"full"`` = the whole catalogue ``1..num_items``; ``"sampled"`` = the target
            plus ``num_negatives`` items drawn uniformly *without replacement* from the items the
            user never interacted with (anywhere in the whole sequence), seeded by ``seed``.
        num_negatives: negatives per user for ``candidates="sampled"`` (ignored otherwise).
        exclude_seen: remove the items of the truncated history from the candidates. A user
            whose target also occurs in that history (a repeat target) is then left out of the
            metrics and counted in ``repeat_targets``; without ``exclude_seen`` such users are
            ranked like the others (and counted too).
        max_history: the history is truncated to its most recent ``max_history`` items (this
            is both the model input window and the exclusion window).
        hr_ks: cut-offs for HR@k (hit rate = recall@k with one relevant item).
        ndcg_ks: cut-offs for NDCG@k.
        seed: seed of the negative sampler (sampled protocol only).
        ties: only ``"pessimistic"``: rank = number of candidates whose score is >= the
            target's score (the target counts itself), so ties never flatter a model.
        users: ``"all"``, or only the users whose interactions all have timestamps
            (``"with-timestamps"``) or not (``"without-timestamps"``), for ablations on partly
            timestamped data such as sequence files read without a timestamp file.
    """

    split: str = "leave-one-out"
    target: str = "test"
    candidates: str = "full"
    num_negatives: int = 100
    exclude_seen: bool = True
    max_history: int = 200
    hr_ks: tuple[int, ...] = (1, 10, 50, 200)
    ndcg_ks: tuple[int, ...] = (10, 50, 200)
    seed: int = 0
    ties: str = "pessimistic"
    users: str = "all"

    def __post_init__(self) -> None:
        _check_choice("split", self.split, SPLITS)
        _check_choice("target", self.target, TARGETS)
        _check_choice("candidates", self.candidates, CANDIDATES)
        _check_choice("ties", self.ties, TIES)
        _check_choice("users", self.users, USERS)
        _check_int("num_negatives", self.num_negatives, 1)
        _check_int("max_history", self.max_history, 1)
        _check_int("seed", self.seed, 0)
        if not isinstance(self.exclude_seen, (bool, np.bool_)):
            raise ValueError(f"exclude_seen must be a bool, got {self.exclude_seen!r}")
        # Normalise (frozen dataclass: bypass __setattr__) so lists from JSON become tuples.
        object.__setattr__(self, "hr_ks", _check_ks("hr_ks", self.hr_ks))
        object.__setattr__(self, "ndcg_ks", _check_ks("ndcg_ks", self.ndcg_ks))
        object.__setattr__(self, "exclude_seen", bool(self.exclude_seen))
        for field in ("num_negatives", "max_history", "seed"):
            object.__setattr__(self, field, int(getattr(self, field)))

    # ------------------------------------------------------------------ naming / reporting
    @property
    def name(self) -> str:
        """Short stable key, e.g. ``"loo-test/full/exclude-seen/hist200"``."""
        cands = "full" if self.candidates == "full" else f"sampled{self.num_negatives}"
        seen = "exclude-seen" if self.exclude_seen else "keep-seen"
        users = "" if self.users == "all" else f"/users-{self.users}"
        return f"loo-{self.target}/{cands}/{seen}/hist{self.max_history}{users}"

    @property
    def repeat_targets(self) -> str:
        """How a target that also occurs in the history is treated: ``"left-out"`` (with
        ``exclude_seen``) or ``"ranked"``."""
        return "left-out" if self.exclude_seen else "ranked"

    def describe(self) -> str:
        """One plain-English paragraph stating exactly what the metrics measure."""
        which = (
            "the last item of each user's time-ordered sequence (test), predicted from all "
            "earlier items"
            if self.target == "test"
            else "the second-to-last item of each user's time-ordered sequence (validation), "
            "predicted from all earlier items (the last item is not seen)"
        )
        if self.candidates == "full":
            cands = "The target is ranked against the full item catalogue"
        else:
            cands = (
                f"The target is ranked against {self.num_negatives} negatives sampled uniformly "
                "without replacement from the items the user never interacted with "
                f"(seed {self.seed})"
            )
        seen = (
            ", with the items of the history removed from the candidates; users whose target also "
            "occurs in the history (repeat consumption) are left out and counted as repeat_targets."
            if self.exclude_seen
            else ", history items included; users whose target also occurs in the history (repeat "
            "consumption) are ranked like the others and counted as repeat_targets."
        )
        users = "" if self.users == "all" else f" Only users {self.users.replace('-', ' ')} are evaluated."
        return (
            f"Leave-one-out evaluation [{self.name}]:{users} the target is {which}; the history is "
            f"truncated to the most recent {self.max_history} items. {cands}{seen} "
            "Rank is pessimistic: 1 + the number of other candidates scoring >= the target. "
            f"HR@k = share of users with rank <= k (k in {list(self.hr_ks)}); NDCG@k = mean of "
            f"1/log2(rank+1) when rank <= k, else 0 (k in {list(self.ndcg_ks)}); MRR = mean "
            "1/rank over all ranks (uncapped)."
        )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists) including the derived ``"name"`` and
        ``"repeat_targets"`` (the repeat-consumption rule)."""
        d: dict[str, Any] = dataclasses.asdict(self)
        d["hr_ks"] = list(self.hr_ks)
        d["ndcg_ks"] = list(self.ndcg_ks)
        d["name"] = self.name
        d["repeat_targets"] = self.repeat_targets
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalProtocol:
        """Inverse of :meth:`to_dict`; ``"name"`` is checked against the fields if present."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"name", "repeat_targets"}
        if unknown:
            raise ValueError(f"unknown EvalProtocol fields: {sorted(unknown)}")
        proto = cls(**{k: v for k, v in d.items() if k in known})
        if "name" in d and d["name"] != proto.name:
            raise ValueError(f"name {d['name']!r} does not match the fields ({proto.name!r})")
        if "repeat_targets" in d and d["repeat_targets"] != proto.repeat_targets:
            raise ValueError(
                f"repeat_targets {d['repeat_targets']!r} does not match exclude_seen ({proto.repeat_targets!r})"
            )
        return proto

    def with_target(self, target: str) -> EvalProtocol:
        """The same protocol for another target (``"valid"`` or ``"test"``)."""
        return dataclasses.replace(self, target=target)

    # ------------------------------------------------------------------ helpers
    @property
    def held_out(self) -> int:
        """Number of trailing items not visible to the history (1 for test, 2 for valid)."""
        return _HELD_OUT[self.target]

    def split_sequence(self, sequence: np.ndarray) -> tuple[np.ndarray, int]:
        """Split one whole user sequence into ``(history, target)`` under this protocol.

        Args:
            sequence: [T] item ids, oldest first, the user's whole sequence.

        Returns:
            history: [min(T - held_out, max_history)] the most recent items before the target.
            target: the held-out item id.
        """
        seq = np.asarray(sequence)
        if seq.ndim != 1 or seq.shape[0] < self.held_out + 1:
            raise ValueError(
                f"{self.target} target needs a 1-D sequence of >= {self.held_out + 1} items, "
                f"got shape {seq.shape}"
            )
        end = seq.shape[0] - self.held_out
        return seq[max(0, end - self.max_history) : end], int(seq[end])

    def rng(self) -> np.random.Generator:
        """A fresh generator for :func:`genrec.eval.metrics.sample_candidates`.

        Create it once per evaluation pass and consume it in a fixed user order; the sampled
        candidates are then independent of the batch size.
        """
        return np.random.default_rng(self.seed)


def protocol_from_config(config: "RunConfig", target: str) -> EvalProtocol:
    """The evaluation protocol a run config names, for ``target`` "valid" or "test"."""
    e = config.eval
    return EvalProtocol(
        target=target,
        candidates=e.candidates,
        num_negatives=e.num_negatives,
        exclude_seen=e.exclude_seen,
        max_history=config.data.max_len,
        hr_ks=tuple(e.hr_ks),
        ndcg_ks=tuple(e.ndcg_ks),
        seed=e.seed,
    )
