"""The HTTP service through a real uvicorn server on a free loopback port: answers equal the Python API's, bounds,
fuzzing, micro-batching, metrics. (Status codes of bad requests: test_errors.py; docs: test_docs.py; processes and
signals: test_workers.py.)"""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import logging
import re
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from genrec.api import Recommender
from genrec.serve.app import create_app
from genrec.serve.batching import MicroBatcher, Overloaded
from genrec.serve.schemas import MAX_HISTORY

from .conftest import KNOWN, running


def _items(body: dict) -> tuple[list[str], list[float]]:
    return [x["item"] for x in body["items"]], [x["score"] for x in body["items"]]


HISTORIES = [
    ["i3", "i4", "i5"],
    [{"item": "i3", "ts": 1_000_000}, {"item": "i4", "ts": 1_000_900}, {"item": "i9", "ts": 1_004_000}],
    ["i1", "unknown-item", 7],
    [f"i{j % 30}" for j in range(40)],
]


@pytest.mark.parametrize("history", HISTORIES)
def test_recommend_equals_the_python_api(client, rec, history):
    r = client.post("/v1/recommend", json={"history": history, "k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    events = [(e["item"], e["ts"]) if isinstance(e, dict) else e for e in history]
    (expected,) = rec.recommend_batch([events], k=7)
    items, scores = _items(body)
    assert items == expected.items and scores == pytest.approx(expected.scores, abs=1e-5)
    assert body["unknown_items"] == expected.unknown and body["warnings"] == expected.warnings
    assert body["fallback"] is None and body["model_id"] == rec.model_id_


def test_recommend_options_match_the_python_api(client, rec):
    body = client.post("/v1/recommend", json={"history": ["i3"], "k": 4, "exclude_seen": False, "exclude": ["i4"],
                                              "query_ts": 5}).json()  # fmt: skip
    (expected,) = rec.recommend_batch([["i3"]], k=4, exclude_seen=False, exclude=["i4"], query_time=5)
    assert _items(body)[0] == expected.items and "i4" not in expected.items


def test_rank_equals_the_python_api(client, rec):
    history = [{"item": "i3", "ts": 1_000_000}, {"item": "i4", "ts": 1_000_900}]
    r = client.post("/v1/rank", json={"history": history, "candidates": ["i5", "nope", "i6", "i5"]})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = rec.rank([("i3", 1_000_000), ("i4", 1_000_900)], ["i5", "i6"])
    got = [s["score"] for s in body["scores"]]
    assert [s["item"] for s in body["scores"]] == ["i5", "nope", "i6", "i5"]
    assert got[1] is None and body["unknown_candidates"] == ["nope"] and body["task"] == "next_item"
    assert [got[0], got[2], got[3]] == pytest.approx([expected[0], expected[1], expected[0]], abs=1e-5)


def test_new_user_and_unknown_history_get_the_marked_popularity_fallback(client, rec):
    expected_items, expected_scores = rec.recommend([], k=5)
    for body in ({"k": 5}, {"history": [], "k": 5}):
        got = client.post("/v1/recommend", json=body).json()
        assert got["fallback"] == "popularity" and _items(got) == (expected_items, pytest.approx(expected_scores))
    got = client.post("/v1/recommend", json={"history": ["nope", {"item": "zz", "ts": 3}], "k": 5}).json()
    assert got["fallback"] == "popularity" and got["unknown_items"] == ["nope", "zz"]
    assert _items(got)[0] == expected_items and got["warnings"]
    ranked = client.post("/v1/rank", json={"history": [], "candidates": expected_items[:2]}).json()
    assert ranked["fallback"] == "popularity"
    assert [s["score"] for s in ranked["scores"]] == pytest.approx(expected_scores[:2])


def test_long_history_keeps_recent_items(client, rec):
    long = [f"i{j % 30}" for j in range(MAX_HISTORY)]
    got = client.post("/v1/recommend", json={"history": long, "k": 3, "exclude_seen": False}).json()
    assert _items(got)[0] == rec.recommend(long[-12:], k=3, exclude_seen=False)[0]
    assert any("most recent 12" in w for w in got["warnings"])


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_healthz_and_metrics(rec):
    with running(create_app(rec)) as url, httpx.Client(base_url=url, timeout=30) as client:
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["model_id"] == rec.model_id_ and health["popularity_fallback"]
        for _ in range(3):
            assert client.post("/v1/recommend", json={"history": ["i1"]}).status_code == 200
        assert client.post("/v1/recommend", json={"k": 0}).status_code == 422
        assert client.get("/no/such/path").status_code == 404
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    info = {"model_id": rec.model_id_, "model": "hstu", "num_items": "30", "workers": "1"}
    assert _sample(text, "genrec_model_info", **info) == 1
    assert _sample(text, "genrec_requests_total", path="/v1/recommend", status="200") == 3
    assert _sample(text, "genrec_requests_total", path="/v1/recommend", status="422") == 1
    assert _sample(text, "genrec_requests_total", path="/healthz", status="200") == 1
    assert _sample(text, "genrec_requests_total", path="other", status="404") == 1  # not one series per path
    assert _sample(text, "genrec_request_duration_seconds_count", path="/v1/recommend") == 4
    assert _sample(text, "genrec_request_duration_seconds_bucket", path="/v1/recommend", le="+Inf") == 4
    assert _sample(text, "genrec_batch_size_count") == 3 and _sample(text, "genrec_batch_size_sum") == 3
    assert "# TYPE genrec_batch_size histogram" in text
    for line in text.splitlines():  # every sample line is `name{labels} value`
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{[^}]*\})? [0-9.e+-]+', line), line


# Property-based fuzzing: no request body may produce a 5xx.
_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))  # fmt: skip
_json = st.recursive(
    _scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
)
_ids = st.one_of(st.sampled_from(KNOWN), st.text(max_size=300), st.integers(min_value=-(2**70), max_value=2**70))
_ts = st.one_of(st.none(), st.integers(min_value=-(2**60), max_value=2**60), _json)
_events = st.one_of(_ids, _json, st.fixed_dictionaries({"item": _ids}, optional={"ts": _ts}))
_bodies = st.one_of(
    _json,
    st.fixed_dictionaries({}, optional={
        "history": st.one_of(st.lists(_events, max_size=20), _json),
        "k": st.one_of(st.integers(min_value=-3, max_value=1100), _json),
        "exclude_seen": st.one_of(st.booleans(), _json),
        "exclude": st.one_of(st.lists(_ids, max_size=4), _json),
        "candidates": st.one_of(st.lists(_ids, max_size=8), _json),
        "query_ts": _ts,
    }),
)  # fmt: skip


FUZZ = settings(
    deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@settings(FUZZ, max_examples=150)
@given(body=_bodies, path=st.sampled_from(["/v1/recommend", "/v1/rank"]))
def test_fuzzed_json_bodies_never_get_a_5xx(client, body, path):
    r = client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code == 200:
        assert r.json()["model_id"]


@settings(FUZZ, max_examples=50)
@given(raw=st.binary(max_size=200), path=st.sampled_from(["/v1/recommend", "/v1/rank", "/healthz", "/nope"]))
def test_fuzzed_raw_bytes_never_get_a_5xx(client, raw, path):
    assert client.post(path, content=raw, headers={"content-type": "application/json"}).status_code < 500


@pytest.mark.parametrize("model_thread", [False, True], ids=["event-loop", "worker-thread"])
def test_concurrent_requests_share_forward_passes_and_match_the_api(rec, model_thread):
    histories = [[KNOWN[(s + j) % 30] for j in range(1 + s % 9)] for s in range(32)]
    expected = [r.items for r in rec.recommend_batch(histories, k=5)]

    async def fire(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as ac:
            return await asyncio.gather(*(ac.post("/v1/recommend", json={"history": h, "k": 5}) for h in histories))

    with running(create_app(rec, max_wait_ms=20, model_thread=model_thread)) as url:
        responses = asyncio.run(fire(url))
        metrics = httpx.get(f"{url}/metrics").text
    assert [_items(r.json())[0] for r in responses] == expected
    passes = int(re.search(r"^genrec_batch_size_count (\d+)", metrics, re.M).group(1))
    assert passes < len(histories)  # several requests per forward pass


def test_micro_batcher_batches_and_bounds_its_queue():
    calls: list[int] = []
    gate = threading.Event()

    def run(queries: list[int]) -> list[int]:
        gate.wait(5)
        calls.append(len(queries))
        return [2 * q for q in queries]

    async def scenario() -> None:
        batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.05, max_queue=10)
        await batcher.start()
        gate.set()
        assert await asyncio.gather(*(batcher.submit(q) for q in range(10))) == [2 * q for q in range(10)]
        assert calls == [8, 2]
        gate.clear()
        first = asyncio.ensure_future(batcher.submit(0))  # taken by the worker, which then blocks
        await asyncio.sleep(0.1)
        waiting = [asyncio.ensure_future(batcher.submit(q)) for q in range(10)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit(99)
        gate.set()
        assert await first == 0 and len(await asyncio.gather(*waiting)) == 10
        await batcher.stop()

    asyncio.run(scenario())


def test_an_internal_error_is_a_logged_500_and_the_service_survives(rec, caplog):
    broken = copy.copy(rec)

    def fail(queries):
        raise RuntimeError("boom")

    broken.execute = fail
    with caplog.at_level(logging.ERROR, logger="genrec.serve"), running(create_app(broken)) as url:
        with httpx.Client(base_url=url) as c:
            for _ in range(2):
                r = c.post("/v1/recommend", json={"history": ["i1"]})
                assert r.status_code == 500 and r.json() == {"detail": "internal error"}
            assert c.get("/healthz").status_code == 200
            assert 'status="500"} 2' in c.get("/metrics").text
    assert any("boom" in (r.exc_text or "") or "boom" in str(r.exc_info) for r in caplog.records)


def test_the_server_never_writes_to_the_model_directory(model_dir):
    def snapshot() -> dict:
        return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(model_dir.iterdir())}

    before, dir_mtime = snapshot(), model_dir.stat().st_mtime_ns
    with running(create_app(Recommender.load(model_dir))) as url, httpx.Client(base_url=url) as c:
        assert c.post("/v1/recommend", json={"history": ["i1"]}).status_code == 200
        assert c.post("/v1/rank", json={"history": [], "candidates": ["i1"]}).status_code == 200
        assert c.get("/metrics").status_code == 200
    assert snapshot() == before and model_dir.stat().st_mtime_ns == dir_mtime


def test_startup_freezes_the_long_lived_objects_out_of_the_collector(rec):
    """gc.freeze() at startup: full collections no longer walk torch, the model and the maps (they were ~100 ms
    event-loop stalls, the p99 tail); freeze_gc=False leaves the process's collector alone."""
    gc.unfreeze()
    try:
        with running(create_app(rec, freeze_gc=False)) as url:
            assert httpx.get(f"{url}/healthz").status_code == 200
            assert gc.get_freeze_count() == 0
        with running(create_app(rec)) as url:
            assert httpx.get(f"{url}/healthz").status_code == 200
            assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("settle_yields, expected", [(0, [1, 7]), (3, [8])])
def test_micro_batcher_lets_requests_on_their_way_join_the_pass(settle_yields, expected):
    """Requests still being parsed when the first one is queued (here: two event-loop steps behind it) join its
    forward pass when the worker yields to the loop before taking the queue; a lone request is not held back."""
    calls: list[int] = []

    def run(queries: list[int]) -> list[int]:
        calls.append(len(queries))
        return queries

    async def request(q: int, steps: int) -> int:
        for _ in range(steps):  # parsing, validation: awaits before the query reaches the batcher
            await asyncio.sleep(0)
        return await batcher.submit(q)

    async def scenario() -> None:
        await batcher.start()
        assert await asyncio.gather(request(0, 0), *(request(q, 2) for q in range(1, 8))) == list(range(8))
        steps = 0
        answered = False

        async def count_loop_steps() -> None:  # one event-loop step per iteration while the lone request waits
            nonlocal steps
            while not answered:
                steps += 1
                await asyncio.sleep(0)

        counter = asyncio.ensure_future(count_loop_steps())
        assert await request(9, 0) == 9
        answered = True
        await counter
        # A lone request waits for the worker's settle_yields idle steps and the hand-offs, never for a timer (a
        # 1 ms sleep would let the loop spin hundreds of steps).
        assert steps <= settle_yields + 3, steps
        await batcher.stop()

    batcher = MicroBatcher(run, max_batch=64, max_wait_s=0.0, max_queue=64, inline=True, settle_yields=settle_yields)
    asyncio.run(scenario())
    assert calls == expected + [1]
