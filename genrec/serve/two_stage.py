"""Two-stage serving: a retrieval ``Recommender`` proposes ``retrieve_k`` items, a ``Ranker`` re-ranks them.

For one request (``POST /v1/recommend`` of ``genrec serve --ranker DIR``):

1. retrieval: ``Recommender`` top-``retrieve_k`` for the history (items and timestamps only; the events' actions are
   for the ranker), with the request's exclusions (``exclude_seen``, ``exclude``). A history with no item known to
   the retriever gets its popularity fallback, exactly as in the one-stage service.
2. ranking: ``Ranker.rank`` of those items after the same history (with actions): one probability per task and
   item, all items of one history scored in one M-FALCON pass.
3. the combined score ``Σ_t w_t · p_t`` orders the items (descending; ties keep the retrieval order; items the
   ranker does not know come last, with no score), and the top k are returned.

``TwoStage.execute`` answers a micro-batch of such queries (and of ``RankOnlyQuery``: ``POST /v1/rank``, ranker
only) with one retrieval pass over every history and one ranker call (``Ranker.execute``, the model part of
``Ranker.rank_batch``), timing each stage. Each request's ranker input (history, actions, query time, user features)
is validated and mapped once, by ``Ranker.prepare_rank`` when the request arrives, so that a bad request is refused
(422) before it joins a shared pass; the retrieved items are attached to that prepared query in the pass.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from genrec.api import Recommendation, Recommender, RecommendQuery
from genrec.serve.schemas import MAX_ABS_WEIGHT, MAX_RETRIEVE_K, BodyError

if TYPE_CHECKING:
    from genrec.ranking_api import Ranker, RankQuery, RankResult

DEFAULT_RETRIEVE_K = 200


@dataclass(frozen=True)
class RetrieveRankQuery:
    """A validated two-stage recommend request."""

    retrieval: RecommendQuery  # the retrieval request, k = retrieve_k
    ranking: RankQuery  # the ranker's prepared history, query time and user features; no candidates yet
    k: int
    weights: dict[str, float]  # one per task


@dataclass(frozen=True)
class RankOnlyQuery:
    """A validated rank request: the ranker's probabilities for the given candidates."""

    ranking: RankQuery
    weights: dict[str, float]


StageQuery = Union[RetrieveRankQuery, RankOnlyQuery]


@dataclass(frozen=True)
class RetrieveRankResult:
    """The top k after re-ranking, best first: per item its combined score (NaN when the ranker does not know it),
    its retrieval score and the per-task probabilities."""

    items: list[str]
    scores: list[float]
    retrieval_scores: list[float]
    probs: dict[str, list[float]]
    retrieved: int  # candidates the retriever returned (and the ranker scored)
    recommendation: Recommendation  # the retrieval stage's answer
    ranked: RankResult  # the ranking stage's answer, over every retrieved item


@dataclass(frozen=True)
class RankOnlyResult:
    ranked: RankResult
    scores: list[float]  # the combined score per candidate, NaN for unknown ones


StageResult = Union[RetrieveRankResult, RankOnlyResult]


def rerank_order(combined: Sequence[float]) -> list[int]:
    """Indices of ``combined`` by descending score, ties in the given (retrieval) order, NaN (unknown to the ranker)
    last."""
    scores = np.asarray(combined, dtype=np.float64)  # finite or NaN (task weights are bounded)
    return np.argsort(np.where(np.isnan(scores), np.inf, -scores), kind="stable").tolist()


class TwoStage:
    """A retrieval ``Recommender`` and a ``Ranker`` served together (see the module docstring).

    Args:
        recommender, ranker: fitted or loaded models.
        retrieve_k: candidates retrieved per request unless the request says otherwise (1..MAX_RETRIEVE_K).
        task_weights: weight of each task's probability in the combined score (|w| <= MAX_ABS_WEIGHT, so that every
            combined score is finite); tasks not named weigh 1. A name that is not one of ``ranker.tasks`` raises
            ``ValueError``.
        on_stage: called after each stage of a micro-batch with (stage, seconds, requests in the stage).
    """

    def __init__(
        self,
        recommender: Recommender,
        ranker: Ranker,
        *,
        retrieve_k: int = DEFAULT_RETRIEVE_K,
        task_weights: Mapping[str, float] | None = None,
        on_stage: Callable[[str, float, int], None] = lambda stage, seconds, n: None,
    ) -> None:
        recommender.check_fitted()
        if isinstance(retrieve_k, bool) or not isinstance(retrieve_k, int) or not 1 <= retrieve_k <= MAX_RETRIEVE_K:
            raise ValueError(f"retrieve_k must be an integer in [1, {MAX_RETRIEVE_K}], got {retrieve_k!r}")
        self.recommender, self.ranker, self.retrieve_k, self.on_stage = recommender, ranker, retrieve_k, on_stage
        self.tasks: tuple[str, ...] = tuple(ranker.tasks)
        weights = dict.fromkeys(self.tasks, 1.0)
        for task, weight in (task_weights or {}).items():
            if task not in weights:
                raise ValueError(f"task weight for {task!r}: the ranker's tasks are {', '.join(self.tasks)}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not abs(weight) <= MAX_ABS_WEIGHT:
                raise ValueError(f"task weight for {task!r} must be a number in [-{MAX_ABS_WEIGHT:g}, "
                                 f"{MAX_ABS_WEIGHT:g}], got {weight!r}")  # fmt: skip
            weights[task] = float(weight)
        self.task_weights = weights

    # -- request validation ----------------------------------------------------------------------------------------

    def weights(self, override: Mapping[str, float] | None) -> dict[str, float]:
        """The server's task weights with a request's ``task_weights`` applied; an unknown task is a 422."""
        if not override:
            return self.task_weights
        unknown = [t for t in override if t not in self.task_weights]
        if unknown:
            msg = f"unknown task {unknown[0]!r}; the ranker's tasks are {', '.join(self.tasks)}"
            errors = [{"loc": ["body", "task_weights", t], "msg": msg, "type": "unknown_task"} for t in unknown]
            raise BodyError(422, f"task_weights.{unknown[0]}: {msg}", errors)
        return {**self.task_weights, **{t: float(w) for t, w in override.items()}}

    def prepare_recommend(
        self,
        events: Any,
        ranker_history: list[Any],
        *,
        k: int,
        retrieve_k: int | None,
        exclude_seen: bool,
        exclude: Sequence[Any],
        query_time: int | None,
        task_weights: Mapping[str, float] | None,
        user_features: Mapping[str, Any] | None,
    ) -> RetrieveRankQuery:
        """Validate a two-stage recommend request (``BodyError`` 422 or ``InvalidInputError``) without running a
        model: the retrieval request, and the ranker's history, query time and user features (so that a request
        the ranker would refuse is refused here, not inside a shared micro-batch). ``events``: the history for the
        retriever (``genrec.api.Events``); ``ranker_history``: the same events with their actions, for the
        ranker."""
        retrieve_k = self.retrieve_k if retrieve_k is None else retrieve_k
        if k > retrieve_k:
            msg = f"k ({k}) must not exceed retrieve_k ({retrieve_k}): only the retrieved items are re-ranked"
            raise BodyError(422, f"k: {msg}", [{"loc": ["body", "k"], "msg": msg, "type": "k_above_retrieve_k"}])
        weights = self.weights(task_weights)
        retrieval = self.recommender.prepare_recommend(
            events, retrieve_k, exclude_seen, exclude=exclude, query_time=query_time
        )
        ranking = self.ranker.prepare_rank(ranker_history, [], query_time=query_time, user_features=user_features)
        return RetrieveRankQuery(retrieval, ranking, k, weights)

    def prepare_rank(
        self,
        ranker_history: list[Any],
        candidates: Sequence[Any],
        *,
        query_time: int | None,
        task_weights: Mapping[str, float] | None,
        user_features: Mapping[str, Any] | None,
    ) -> RankOnlyQuery:
        """Validate a rank request (``BodyError`` 422 or ``InvalidInputError``) without running a model."""
        weights = self.weights(task_weights)
        ranking = self.ranker.prepare_rank(ranker_history, candidates, query_time=query_time,
                                           user_features=user_features)  # fmt: skip
        return RankOnlyQuery(ranking, weights)

    # -- answering a micro-batch -----------------------------------------------------------------------------------

    def execute(self, queries: Sequence[StageQuery]) -> list[StageResult]:
        """Answer prepared queries: one retrieval pass for every two-stage query, then one ranker call for all."""
        two_stage = [i for i, q in enumerate(queries) if isinstance(q, RetrieveRankQuery)]
        retrieved: dict[int, Recommendation] = {}
        if two_stage:
            start = time.perf_counter()
            answers = self.recommender.execute([queries[i].retrieval for i in two_stage])  # type: ignore[union-attr]
            self.on_stage("retrieve", time.perf_counter() - start, len(two_stage))
            for i, answer in zip(two_stage, answers):
                assert isinstance(answer, Recommendation)
                retrieved[i] = answer
        start = time.perf_counter()
        rank_queries = [self._with_candidates(q.ranking, retrieved[i].items) if i in retrieved else q.ranking
                        for i, q in enumerate(queries)]  # fmt: skip
        ranked = self.ranker.execute(rank_queries)
        self.on_stage("rank", time.perf_counter() - start, len(queries))
        results: list[StageResult] = []
        for i, (q, r) in enumerate(zip(queries, ranked)):
            if isinstance(q, RetrieveRankQuery):
                results.append(self._top_k(q, retrieved[i], r))
            else:
                results.append(RankOnlyResult(r, r.combined(q.weights)))
        return results

    def _with_candidates(self, query: RankQuery, items: list[str]) -> RankQuery:
        """A prepared ranker query (its candidates empty) with the retrieved ``items`` as its candidates."""
        ids = self.ranker.state_.item_map.to_internal(items)
        notes = query.warnings
        unknown = int((ids == 0).sum())
        if unknown:
            notes = notes + (f"{unknown} retrieved item(s) unknown to the ranker have no probability",)
        return dataclasses.replace(query, candidates=tuple(items), candidate_ids=ids, warnings=notes)

    @staticmethod
    def _top_k(q: RetrieveRankQuery, retrieval: Recommendation, ranked: RankResult) -> RetrieveRankResult:
        combined = ranked.combined(q.weights)
        top = rerank_order(combined)[: q.k]
        return RetrieveRankResult(
            items=[retrieval.items[i] for i in top],
            scores=[combined[i] for i in top],
            retrieval_scores=[retrieval.scores[i] for i in top],
            probs={t: [p[i] for i in top] for t, p in ranked.probs.items()},
            retrieved=len(retrieval.items),
            recommendation=retrieval,
            ranked=ranked,
        )
