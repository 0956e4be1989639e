"""Two-stage serving (``genrec serve --checkpoint RETRIEVER --ranker RANKER``) through a real uvicorn server on a
loopback port: /v1/recommend equals the two Python APIs called in sequence (``Recommender`` top retrieve_k, then
``Ranker.rank`` of those items, sorted by the combined score), /v1/rank equals ``Ranker.rank``, bad task weights and
other inputs the ranker refuses get 422, concurrent requests share passes and keep their answers, and the command
line runs it with worker processes."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec.api import Recommender
from genrec.cli import main
from genrec.ranking_api import Ranker
from genrec.serve.app import create_app
from genrec.serve.schemas import MAX_RETRIEVE_K
from genrec.serve.two_stage import rerank_order

from ..conftest import synthetic_interactions
from .conftest import KNOWN, running
from .test_app import FUZZ, _sample
from .test_workers import _free_port, _healthy, _stop

pytestmark = pytest.mark.filterwarnings("ignore::genrec.api.UnknownItemWarning")  # histories with unknown ids

TASKS = ("like", "love")
WEIGHTS = {"like": 1.0, "love": 0.5}  # the server's --task-weights in these tests
RETRIEVE_K = 20
TINY_RANKER = {
    "model": {"name": "hstu-ranker", "params": {"embedding_dim": 8, "num_blocks": 1, "num_heads": 2,
                                                "attention_dim": 4, "linear_dim": 4}},
    "data": {"max_history": 12},
    "train": {"epochs": 2, "batch_size": 16, "lr": 0.01, "num_threads": 1},
}  # fmt: skip


def ranking_log() -> pd.DataFrame:
    """The serve tests' synthetic interactions with two tasks: like (items with an even number, mostly) and love
    (a subset of likes), so that the ranker has something to learn."""
    frame = synthetic_interactions()
    rng = np.random.default_rng(1)
    even = frame["item"].str[1:].astype(int) % 2 == 0
    frame["like"] = ((even & (rng.random(len(frame)) < 0.8)) | (rng.random(len(frame)) < 0.1)).astype(int)
    frame["love"] = (frame["like"].astype(bool) & (rng.random(len(frame)) < 0.4)).astype(int)
    return frame


@pytest.fixture(scope="module")
def ranker_dir(tmp_path_factory) -> Path:
    ranker = Ranker(**TINY_RANKER).fit(ranking_log(), tasks=list(TASKS))
    return ranker.save(tmp_path_factory.mktemp("two-stage") / "ranker")


@pytest.fixture(scope="module")
def ranker(ranker_dir) -> Ranker:
    return Ranker.load(ranker_dir)


@pytest.fixture(scope="module")
def url(rec, ranker):
    with running(create_app(rec, ranker=ranker, retrieve_k=RETRIEVE_K, task_weights=WEIGHTS)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


# -- the answer the service must give: the two Python APIs in sequence ------------------------------------------


def _retrieval_events(history: list) -> list:
    """A request history as ``Recommender`` takes it: (item, ts) tuples or bare ids, no actions."""
    return [(e["item"], e.get("ts")) if isinstance(e, dict) else e for e in history]


def expected_two_stage(rec: Recommender, ranker: Ranker, history: list, *, k: int = 5, retrieve_k: int = RETRIEVE_K,
                       weights: dict | None = None, exclude_seen: bool = True, exclude: list | None = None,
                       query_ts: int | None = None) -> dict:  # fmt: skip
    """Recommender top retrieve_k, then Ranker.rank of those items after the same history, then the combined score
    Σ_t w_t·p_t in descending order (ties: retrieval order; NaN last), top k."""
    (retrieved,) = rec.recommend_batch([_retrieval_events(history)], k=retrieve_k, exclude_seen=exclude_seen,
                                       exclude=exclude, query_time=query_ts)  # fmt: skip
    ranked = ranker.rank(history, retrieved.items, query_time=query_ts)
    weights = {**WEIGHTS, **(weights or {})}
    combined = ranked.combined(weights)
    order = sorted(range(len(combined)), key=lambda i: (math.isnan(combined[i]), -combined[i]))[:k]
    return {
        "items": [retrieved.items[i] for i in order],
        "scores": [combined[i] for i in order],
        "retrieval_scores": [retrieved.scores[i] for i in order],
        "probs": [{t: ranked.probs[t][i] for t in TASKS} for i in order],
        "fallback": retrieved.fallback,
        "unknown": retrieved.unknown,
        "ranker_unknown": ranked.unknown,
        "retrieved": len(retrieved.items),
    }


def assert_same_answer(body: dict, expected: dict) -> None:
    assert [x["item"] for x in body["items"]] == expected["items"]
    assert [x["score"] for x in body["items"]] == pytest.approx(expected["scores"], abs=1e-6)
    assert [x["retrieval_score"] for x in body["items"]] == pytest.approx(expected["retrieval_scores"], abs=1e-6)
    for got, want in zip(body["items"], expected["probs"]):
        assert got["probs"] == pytest.approx(want, abs=1e-6)
    assert body["fallback"] == expected["fallback"] and body["unknown_items"] == expected["unknown"]
    assert body["ranker_unknown_items"] == expected["ranker_unknown"] and body["retrieved"] == expected["retrieved"]


TIMED = [{"item": f"i{j}", "ts": 1_000_000 + 600 * j, **({"actions": ["like"]} if j % 2 == 0 else {})}
         for j in range(3, 9)]  # fmt: skip
HISTORIES = {
    "timed-with-actions": TIMED,
    "love-and-like": [{"item": "i10", "ts": 1_000_000, "actions": ["like", "love"]},
                      {"item": "i11", "ts": 1_000_500, "actions": []}, {"item": "i12", "ts": 1_000_900}],
    "bare-ids": ["i3", "i4", 5, "i6"],
    "with-unknown-items": [{"item": "i1", "ts": 1_000_000, "actions": ["like"]}, {"item": "nope", "ts": 1_000_100},
                           {"item": "i2", "ts": 1_000_200}],
    "no-known-item": [{"item": "nope", "ts": 1_000_000, "actions": ["like"]}, {"item": "zz", "ts": 1_000_050}],
    "empty": [],
    "long": [f"i{j % 20}" for j in range(45)],  # longer than both models keep; 10 items not seen
}  # fmt: skip


@pytest.mark.parametrize("history", list(HISTORIES.values()), ids=list(HISTORIES))
def test_two_stage_recommend_equals_the_python_apis_in_sequence(client, rec, ranker, history):
    r = client.post("/v1/recommend", json={"history": history, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stage"] == "two-stage" and body["tasks"] == list(TASKS) and body["task_weights"] == WEIGHTS
    assert body["retrieve_k"] == RETRIEVE_K and len(body["items"]) == 5
    assert body["model_id"] == rec.model_id_ and body["ranker_model_id"] == ranker.model_id
    assert_same_answer(body, expected_two_stage(rec, ranker, history))
    scores = [x["score"] for x in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_a_history_with_no_known_item_gets_the_popular_items_re_ranked(client, rec, ranker):
    body = client.post("/v1/recommend", json={"history": HISTORIES["no-known-item"], "k": 5}).json()
    popular, _ = rec.recommend([], k=RETRIEVE_K)
    assert body["fallback"] == "popularity" and body["unknown_items"] == ["nope", "zz"]
    assert {x["item"] for x in body["items"]} <= set(popular)
    # re-ranked, not the popularity order: the items are in the order of their combined score
    combined = ranker.rank([], popular, query_time=1_000_050).combined(WEIGHTS)
    assert [x["item"] for x in body["items"]] == [popular[i] for i in rerank_order(combined)[:5]]


def test_retrieved_items_the_ranker_does_not_know_come_last_without_a_score(rec, tmp_path):
    """A ranker trained without items i0-i4: those items, when retrieved, have no probabilities and no combined
    score, and come after every scored item (not first, as NaN would sort in a naive descending sort)."""
    log = ranking_log()
    partial = Ranker(**TINY_RANKER).fit(log[~log["item"].isin([f"i{j}" for j in range(5)])], tasks=list(TASKS))
    history = [{"item": "i20", "ts": 1_000_000, "actions": ["like"]}, {"item": "i21", "ts": 1_000_100}]
    with running(create_app(rec, ranker=partial, retrieve_k=20)) as url:
        body = httpx.post(f"{url}/v1/recommend", json={"history": history, "k": 20}, timeout=30).json()
    unknown = [x for x in body["items"] if x["item"] in {f"i{j}" for j in range(5)}]
    assert unknown and body["items"][-len(unknown):] == unknown  # all at the end
    assert all(x["score"] is None and x["probs"] == {"like": None, "love": None} for x in unknown)
    assert all(x["score"] is not None for x in body["items"][: -len(unknown)])
    assert any("unknown to the ranker" in w for w in body["warnings"])
    (retrieved,) = rec.recommend_batch([[(e["item"], e["ts"]) for e in history]], k=20)
    combined = partial.rank(history, retrieved.items).combined()
    assert [x["item"] for x in body["items"]] == [retrieved.items[i] for i in rerank_order(combined)]


@pytest.mark.parametrize(
    "options",
    [
        {"exclude": ["i9", "i10"], "exclude_seen": False},
        {"retrieve_k": 6, "k": 6},
        {"retrieve_k": 8, "task_weights": {"love": 3.0}},
        {"task_weights": {"like": 0.0, "love": 1.0}, "query_ts": 1_010_000},
        {"task_weights": {"like": -1.0}, "k": 3},
    ],
    ids=["exclusions", "retrieve-k", "retrieve-k-and-weights", "weights-and-query-ts", "negative-weight"],
)
def test_request_options_match_the_python_apis(client, rec, ranker, options):
    body = client.post("/v1/recommend", json={"history": TIMED, "k": 5, **options}).json()
    k = options.get("k", 5)
    expected = expected_two_stage(
        rec, ranker, TIMED, k=k, retrieve_k=options.get("retrieve_k", RETRIEVE_K),
        weights=options.get("task_weights"), exclude_seen=options.get("exclude_seen", True),
        exclude=options.get("exclude"), query_ts=options.get("query_ts"),
    )  # fmt: skip
    assert_same_answer(body, expected)
    assert body["task_weights"] == {**WEIGHTS, **options.get("task_weights", {})}
    assert body["retrieve_k"] == options.get("retrieve_k", RETRIEVE_K) and len(body["items"]) == k
    if "exclude" in options:
        assert not {"i9", "i10"} & {x["item"] for x in body["items"]}


def test_rank_equals_the_ranker(client, ranker):
    candidates = ["i5", "nope", "i6", "i5", 7]
    r = client.post("/v1/rank", json={"history": TIMED, "candidates": candidates, "task_weights": {"love": 2.0}})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = ranker.rank(TIMED, candidates)
    combined = expected.combined({"like": 1.0, "love": 2.0})
    assert body["tasks"] == list(TASKS) and body["model_id"] == ranker.model_id
    assert [x["item"] for x in body["items"]] == ["i5", "nope", "i6", "i5", "7"]
    assert body["unknown_candidates"] == ["nope", "7"] == expected.unknown_candidates
    assert body["task_weights"] == {"like": 1.0, "love": 2.0}
    for i, item in enumerate(body["items"]):
        if i in (1, 4):
            assert item["probs"] == {"like": None, "love": None} and item["score"] is None
        else:
            assert item["probs"] == pytest.approx({t: expected.probs[t][i] for t in TASKS}, abs=1e-6)
            assert item["score"] == pytest.approx(combined[i], abs=1e-6)


def _detail(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail.strip()
    return detail


@pytest.mark.parametrize("path", ["/v1/recommend", "/v1/rank"])
@pytest.mark.parametrize(
    "change, reason",
    [
        ({"task_weights": {"click": 1.0}},
         "task_weights.click: unknown task 'click'; the ranker's tasks are like, love"),
        ({"task_weights": {"like": 1.0, "hate": 1.0, "click": 2}}, "task_weights.hate: unknown task"),
        ({"task_weights": {"like": "1"}}, "task_weights.like: "),
        ({"task_weights": {"like": True}}, "task_weights.like: "),
        ({"task_weights": {"like": None}}, "task_weights.like: "),
        ({"task_weights": {"like": 1e308, "love": 1e308}}, "task_weights.like: Input should be less than or equal"),
        ({"task_weights": ["like"]}, "task_weights: "),
        ({"history": [{"item": "i1", "ts": 5, "actions": ["click"]}]}, "unknown action 'click'"),
        ({"history": [{"item": "i1", "actions": "like"}]}, "history[0]: a history event is"),
        ({"history": [{"item": "i1", "ts": 5}, {"item": "i2"}]}, "either every event has a ts or none has"),
        ({"history": [{"item": "i1", "ts": 500}], "query_ts": 100}, "after query_time"),
        ({"user_features": {"age": 3}}, "unknown feature 'age'"),
    ],
    ids=["unknown-task", "unknown-tasks", "string-weight", "bool-weight", "null-weight", "huge-weights", "list",
         "unknown-action", "actions-not-a-list", "mixed-timestamps", "event-after-query-ts", "unknown-user-feature"],
)  # fmt: skip
def test_inputs_the_ranker_refuses_get_422_with_a_reason(client, path, change, reason):
    body = {"history": ["i1"], **({"candidates": ["i2"]} if path == "/v1/rank" else {}), **change}
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert reason in _detail(r)
    assert r.json()["errors"]


def test_an_infinite_weight_gets_422(client):
    r = client.post("/v1/recommend", content=b'{"history": ["i1"], "task_weights": {"like": 1e999}}',
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 422 and _detail(r).startswith("task_weights.like: ")


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"k": 21}, "k: k (21) must not exceed retrieve_k (20)"),
        ({"k": 8, "retrieve_k": 5}, "k: k (8) must not exceed retrieve_k (5)"),
        ({"retrieve_k": MAX_RETRIEVE_K + 1}, "retrieve_k: "),
        ({"retrieve_k": 0}, "retrieve_k: "),
        ({"retrieve_k": 2.0}, "retrieve_k: "),
        ({"candidates": ["i2"]}, "candidates: Extra inputs are not permitted"),
    ],
)
def test_recommend_bounds_get_422(client, change, reason):
    r = client.post("/v1/recommend", json={"history": ["i1"], **change})
    assert r.status_code == 422, r.text
    assert _detail(r).startswith(reason)


def test_concurrent_requests_share_passes_and_equal_their_sequential_answers(rec, ranker):
    """32 requests at once: all 200, fewer model passes than requests, and each answer equal to the one the same
    request gets alone (and to the Python APIs in sequence)."""
    bodies = []
    for s in range(32):
        history = [{"item": KNOWN[(s + j) % 30], "ts": 1_000_000 + 300 * j, **({"actions": ["like"]} if (s + j) % 3 == 0
                    else {})} for j in range(1 + s % 9)]  # fmt: skip
        bodies.append({"history": history, "k": 4, **({"task_weights": {"love": 2.0}} if s % 4 == 0 else {})})
    bodies[5] = {"history": ["nope"], "k": 4}  # the popularity fallback in the same pass

    async def fire(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/v1/recommend", json=b) for b in bodies))

    with running(create_app(rec, ranker=ranker, retrieve_k=RETRIEVE_K, task_weights=WEIGHTS, max_wait_ms=20)) as url:
        responses = asyncio.run(fire(url))
        metrics = httpx.get(f"{url}/metrics").text
        with httpx.Client(base_url=url, timeout=30) as c:
            sequential = [c.post("/v1/recommend", json=b).json() for b in bodies]
    assert [r.status_code for r in responses] == [200] * 32
    for r, alone, b in zip(responses, sequential, bodies):
        got = r.json()
        assert [x["item"] for x in got["items"]] == [x["item"] for x in alone["items"]]
        assert [x["score"] for x in got["items"]] == pytest.approx([x["score"] for x in alone["items"]], abs=1e-6)
        expected = expected_two_stage(rec, ranker, b["history"], k=4, weights=b.get("task_weights"))
        assert_same_answer(got, expected)
    passes = _sample(metrics, "genrec_batch_size_count")
    assert 0 < passes < 32 and _sample(metrics, "genrec_batch_size_sum") == 32
    for stage in ("retrieve", "rank"):  # every request went through both stages, once each
        assert _sample(metrics, "genrec_stage_duration_seconds_count", stage=stage) == 32


def test_healthz_reports_both_models_and_metrics_time_each_stage(rec, ranker):
    with running(create_app(rec, ranker=ranker, task_weights={"love": 0.25})) as url, \
            httpx.Client(base_url=url, timeout=30) as c:  # fmt: skip
        health = c.get("/healthz").json()
        assert c.post("/v1/recommend", json={"history": ["i1"]}).status_code == 200
        assert c.post("/v1/rank", json={"history": ["i1"], "candidates": ["i2", "i3"]}).status_code == 200
        bad = {"history": ["i1"], "candidates": ["i2"], "task_weights": {"x": 1}}
        assert c.post("/v1/rank", json=bad).status_code == 422
        text = c.get("/metrics").text
    assert health["status"] == "ok" and health["stage"] == "two-stage"
    assert health["model_id"] == rec.model_id_ and health["num_items"] == 30 and health["popularity_fallback"]
    assert health["ranker"] == {"model_id": ranker.model_id, "tasks": list(TASKS), "actions": list(TASKS),
                                "task_weights": {"like": 1.0, "love": 0.25}, "retrieve_k": 200,
                                "max_retrieve_k": MAX_RETRIEVE_K}  # fmt: skip
    assert _sample(text, "genrec_ranker_info", model_id=ranker.model_id, tasks="like,love") == 1
    assert _sample(text, "genrec_stage_duration_seconds_count", stage="retrieve") == 1
    assert _sample(text, "genrec_stage_duration_seconds_count", stage="rank") == 2  # recommend and rank
    assert _sample(text, "genrec_stage_duration_seconds_bucket", stage="rank", le="+Inf") == 2
    assert _sample(text, "genrec_requests_total", path="/v1/rank", status="422") == 1


def test_the_openapi_schema_documents_the_two_stage_bodies(client):
    schema = client.get("/openapi.json").json()
    ref = schema["paths"]["/v1/recommend"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/TwoStageRecommendRequest"
    components = schema["components"]["schemas"]
    assert components["TwoStageRecommendRequest"]["properties"]["retrieve_k"]
    assert "RankerEvent" in components and "TwoStageRankRequest" in components


def test_without_a_ranker_the_service_is_unchanged(rec):
    """No stage field, no two-stage fields accepted (an event's actions, task_weights: 422 as before)."""
    with running(create_app(rec)) as url, httpx.Client(base_url=url, timeout=30) as c:
        body = c.post("/v1/recommend", json={"history": ["i1"], "k": 3}).json()
        assert set(body) == {"items", "fallback", "unknown_items", "warnings", "model_id"}
        assert c.post("/v1/recommend", json={"history": [{"item": "i1", "actions": ["like"]}]}).status_code == 422
        assert c.post("/v1/recommend", json={"history": ["i1"], "task_weights": {"like": 1}}).status_code == 422
        assert "ranker" not in c.get("/healthz").json()
        text = c.get("/metrics").text
    assert _sample(text, "genrec_stage_duration_seconds_count", stage="retrieve") == 1  # its one stage is timed
    assert _sample(text, "genrec_stage_duration_seconds_count", stage="rank") == 0
    assert "genrec_ranker_info" not in text
    with pytest.raises(ValueError, match="pass a ranker"):
        create_app(rec, task_weights={"like": 1.0})


def test_server_task_weights_naming_an_unknown_task_are_refused(rec, ranker):
    with pytest.raises(ValueError, match="the ranker's tasks are like, love"):
        create_app(rec, ranker=ranker, task_weights={"click": 1.0})
    with pytest.raises(ValueError, match="retrieve_k"):
        create_app(rec, ranker=ranker, retrieve_k=MAX_RETRIEVE_K + 1)


# Property-based fuzzing of the two-stage bodies: no request may produce a 5xx.
_names = st.one_of(st.sampled_from(["like", "love", "click", ""]), st.text(max_size=70))
_weights = st.one_of(st.floats(allow_nan=True, allow_infinity=False), st.integers(-(2**70), 2**70), st.none(),
                     st.text(max_size=3), st.booleans())  # fmt: skip
_ts = st.one_of(st.none(), st.integers(min_value=-(2**54), max_value=2**54))
_event = st.one_of(
    st.sampled_from(KNOWN + ["nope"]),
    st.fixed_dictionaries({"item": st.sampled_from(KNOWN + ["nope", 3])},
                          optional={"ts": _ts, "actions": st.one_of(st.lists(_names, max_size=3), _names)}),
)  # fmt: skip
_two_stage_bodies = st.fixed_dictionaries({}, optional={
    "history": st.lists(_event, max_size=12),
    "k": st.integers(-1, 30),
    "retrieve_k": st.one_of(st.integers(-1, 1100), st.none()),
    "candidates": st.lists(st.sampled_from(KNOWN + ["nope", 7]), max_size=6),
    "task_weights": st.one_of(st.dictionaries(_names, _weights, max_size=3), st.none()),
    "user_features": st.one_of(st.dictionaries(_names, st.one_of(st.integers(), st.text(max_size=3)), max_size=2),
                               st.none()),
    "query_ts": _ts,
    "exclude_seen": st.booleans(),
})  # fmt: skip


@settings(FUZZ, max_examples=120)
@given(body=_two_stage_bodies, path=st.sampled_from(["/v1/recommend", "/v1/rank"]))
def test_fuzzed_two_stage_bodies_never_get_a_5xx(client, body, path):
    r = client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code == 200:
        assert r.json()["model_id"]
    else:
        assert _detail(r)


# -- the command line ------------------------------------------------------------------------------------------


def test_genrec_serve_with_a_ranker_and_two_workers(model_dir, ranker_dir, rec, ranker, tmp_path):
    """``genrec serve --ranker DIR --retrieve-k N --task-weights ... --workers 2``: real worker processes answer
    like the Python APIs in sequence, and stop cleanly on SIGTERM."""
    port = _free_port()
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "genrec.cli", "serve", "--checkpoint", str(model_dir),
                                 "--ranker", str(ranker_dir), "--retrieve-k", "12", "--task-weights", "love=2",
                                 "--port", str(port), "--workers", "2", "--log-level", "warning"],
                                env={**os.environ, "TMPDIR": str(tmp_path)}, stderr=err,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"genrec serve did not start:\n{stderr.read_text()}")
            time.sleep(0.2)
        health = httpx.get(f"{url}/healthz", timeout=10).json()
        assert health["ranker"]["retrieve_k"] == 12 and health["ranker"]["task_weights"] == {"like": 1.0, "love": 2.0}
        for history in (TIMED, HISTORIES["no-known-item"]):
            body = httpx.post(f"{url}/v1/recommend", json={"history": history, "k": 4}, timeout=30).json()
            expected = expected_two_stage(rec, ranker, history, k=4, retrieve_k=12, weights={"love": 2.0})
            assert_same_answer(body, expected)
        text = httpx.get(f"{url}/metrics", timeout=10).text  # summed over both workers, whichever answers
        assert _sample(text, "genrec_stage_duration_seconds_count", stage="rank") == 2
        assert _sample(text, "genrec_ranker_info", model_id=ranker.model_id, tasks="like,love") == 1
    finally:
        code = _stop(proc, signal.SIGTERM)
    assert code == 0
    assert "Traceback" not in stderr.read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task-weights", "like=1"], "--retrieve-k and --task-weights apply to two-stage serving: add --ranker DIR"),
        (["--retrieve-k", "50"], "add --ranker DIR"),
        (["--ranker", "{ranker}", "--task-weights", "click=1"], "task weight for 'click': the ranker's tasks are"),
        (["--ranker", "{ranker}", "--task-weights", "like"], "--task-weights: expected TASK=WEIGHT, got 'like'"),
        (["--ranker", "{ranker}", "--task-weights", "like=x"], "the weight of 'like' is not a number"),
        (["--ranker", "{ranker}", "--task-weights", "like=inf"], "the weight of 'like' must be finite"),
        (["--ranker", "{ranker}", "--task-weights", "like=1,like=2"], "'like' is given twice"),
        (["--ranker", "{ranker}", "--task-weights", "like=1e7"], "task weight for 'like' must be a number in [-1e+06"),
        (["--ranker", "{ranker}", "--retrieve-k", "0"], "retrieve_k must be an integer in [1, 1000]"),
        (["--ranker", "{model}"], "is a retrieval model directory"),
    ],
    ids=["weights-without-ranker", "retrieve-k-without-ranker", "unknown-task", "no-equals", "not-a-number",
         "infinite", "twice", "too-large", "retrieve-k-0", "retrieval-dir-as-ranker"],
)  # fmt: skip
def test_genrec_serve_refuses_bad_two_stage_options(model_dir, ranker_dir, capsys, extra, message):
    extra = [a.format(ranker=ranker_dir, model=model_dir) for a in extra]
    assert main(["serve", "--checkpoint", str(model_dir), "--port", "0", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genrec: error: ") and message in err and "Traceback" not in err
