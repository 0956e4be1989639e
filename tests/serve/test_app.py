"""The HTTP service, through a real uvicorn server on a free loopback port."""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genrec.api import Recommender
from genrec.cli import build_parser, main
from genrec.serve.app import MAX_HISTORY, Metrics, MicroBatcher, Overloaded, SharedMetrics, create_app

from ..conftest import synthetic_interactions

TINY = {
    "data": {"max_len": 12},
    "model": {"embedding_dim": 8, "num_blocks": 1, "num_heads": 2, "attention_dim": 4, "linear_dim": 4},
    "train": {"epochs": 3, "batch_size": 8, "num_negatives": 16, "eval_batch_size": 16, "lr": 0.01, "num_threads": 1},
}
KNOWN = [f"i{j}" for j in range(30)]


@contextmanager
def running(app):
    """Serve ``app`` with uvicorn in a thread on a free loopback port; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    rec = Recommender(**TINY).fit(synthetic_interactions())
    return rec.save(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def rec(model_dir) -> Recommender:
    return Recommender.load(model_dir)


@pytest.fixture(scope="module")
def client(rec):
    with running(create_app(rec)) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


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


@pytest.mark.parametrize(
    "body, where",
    [
        ({"history": ["i1"], "k": 1001}, "k"),
        ({"history": ["i1"], "k": 0}, "k"),
        ({"history": ["i1"], "k": "10"}, "k"),
        ({"history": ["i1"], "k": 2.5}, "k"),
        ({"history": ["i1"] * (MAX_HISTORY + 1)}, "history"),
        ({"history": [1.5]}, "history"),
        ({"history": [{"item": "i1", "ts": "yesterday"}]}, "history"),
        ({"history": [{"item": "i1", "ts": 2**60}]}, "history"),
        ({"history": [{"item": "x" * 300}]}, "history"),
        ({"history": "i1"}, "history"),
        ({"histroy": ["i1"]}, "histroy"),
        ({"history": ["i1"], "exclude": ["i2"] * 10_001}, "exclude"),
        ({"history": ["i1"], "exclude_seen": "yes"}, "exclude_seen"),
        ([1, 2], "body"),
    ],
)
def test_bad_requests_get_422_with_the_reason(client, body, where):
    r = client.post("/v1/recommend", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail and all(d["msg"] for d in detail)
    assert any(where in [str(x) for x in d["loc"]] for d in detail), detail


def test_rank_bounds_and_malformed_json(client):
    r = client.post("/v1/rank", json={"history": [], "candidates": ["i1"] * 10_001})
    assert r.status_code == 422 and "candidates" in r.text
    assert client.post("/v1/rank", json={"history": []}).status_code == 422  # candidates are required
    r = client.post("/v1/recommend", content=b'{"history": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.text
    assert client.post("/v1/recommend", content=b"\xff\xfe\x00").status_code == 422
    assert client.get("/v1/recommend").status_code == 405


def test_oversized_bodies_get_413(client):
    big = json.dumps({"history": ["i1"] * 300_000}).encode()  # ~1.8 MB > 1 MiB
    r = client.post("/v1/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413

    def chunks():  # no content-length: the limit is enforced on the bytes received
        yield b'{"history": ['
        for _ in range(40):
            yield b'"i1",' * 10_000
        yield b'"i1"]}'

    r = client.post("/v1/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/healthz").status_code == 200  # and the server is fine


def test_healthz_docs_and_metrics(client, rec):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model_id"] == rec.model_id_ and health["popularity_fallback"]
    assert client.get("/docs").status_code == 200
    assert "/v1/recommend" in client.get("/openapi.json").json()["paths"]
    client.post("/v1/recommend", json={"history": ["i1"]})
    client.post("/v1/recommend", json={"k": 0})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert f'genrec_model_info{{model_id="{rec.model_id_}",model="hstu",num_items="30",workers="1"}} 1' in text
    assert re.search(r'genrec_requests_total\{path="/v1/recommend",status="200"\} \d+', text)
    assert re.search(r'genrec_requests_total\{path="/v1/recommend",status="422"\} \d+', text)
    assert 'genrec_request_duration_seconds_bucket{path="/v1/recommend",le="+Inf"}' in text
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


def test_genrec_serve_binds_loopback_by_default(model_dir, monkeypatch):
    assert build_parser().parse_args(["serve", "--checkpoint", "x"]).host == "127.0.0.1"
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    assert main(["serve", "--checkpoint", str(model_dir), "--port", "8123"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123 and seen["app"].title == "genrec"


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


def test_shared_metrics_sum_the_workers_snapshots(tmp_path):
    a, b = Metrics({"model_id": "m"}), Metrics({"model_id": "m"})
    for _ in range(3):
        a.observe_request("/v1/recommend", 200, 0.004)
    a.observe_batch(3)
    b.observe_request("/v1/recommend", 200, 0.2)
    b.observe_request("/v1/rank", 422, 0.001)
    b.observe_batch(1)
    mine = SharedMetrics(tmp_path, a)
    other = SharedMetrics(tmp_path, b)
    other.path = tmp_path / "999999.json"  # another worker's file
    other.write()
    mine.write()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.path.name, "999999.json"])
    text = mine.render()
    assert 'genrec_requests_total{path="/v1/recommend",status="200"} 4' in text
    assert 'genrec_requests_total{path="/v1/rank",status="422"} 1' in text
    assert 'genrec_request_duration_seconds_bucket{path="/v1/recommend",le="0.005"} 3' in text
    assert 'genrec_request_duration_seconds_bucket{path="/v1/recommend",le="0.25"} 4' in text
    assert "genrec_batch_size_count 2" in text and "genrec_batch_size_sum 4.0" in text
    (tmp_path / "bad.json").write_text("{not json")  # unreadable files are skipped, never a failed scrape
    assert 'genrec_requests_total{path="/v1/recommend",status="200"} 4' in mine.render()
    assert a.render().count("genrec_requests_total{") == 1  # alone: its own counts only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _workers(pid: int) -> list[int]:
    """The worker processes of a ``genrec serve --workers`` supervisor (multiprocessing's spawned children, not its
    resource tracker)."""
    kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    return [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def _serve_two_workers(model_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """``genrec serve --workers 2`` on a free port (temporary files under ``tmp_path``), once both workers are up
    (each has written its first metrics snapshot, which it does when its app starts) and it answers /healthz:
    (the supervisor process, its base URL)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "genrec.cli", "serve", "--checkpoint", str(model_dir), "--port",
                             str(port), "--workers", "2", "--log-level", "warning"],
                            env={**os.environ, "TMPDIR": str(tmp_path)}, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    snapshots = lambda: len(list(tmp_path.glob("genrec-serve-metrics-*/*.json")))  # noqa: E731
    while len(_workers(proc.pid)) < 2 or snapshots() < 2 or not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("genrec serve --workers 2 did not start")
        time.sleep(0.2)
    return proc, url


def test_genrec_serve_with_two_worker_processes(model_dir, rec, tmp_path):
    """``genrec serve --workers 2``: real worker processes on one port answer like the Python API, /metrics counts
    the requests of both, and the shared metrics directory goes away with the server."""
    proc, url = _serve_two_workers(model_dir, tmp_path)
    try:
        (expected,) = rec.recommend_batch([HISTORIES[0]], k=5)
        n = 12
        for _ in range(n):  # a new connection each: the kernel hands them to either worker
            body = httpx.post(f"{url}/v1/recommend", json={"history": HISTORIES[0], "k": 5}, timeout=30).json()
            items, scores = _items(body)
            assert items == expected.items and scores == pytest.approx(expected.scores, abs=1e-5)
        pattern = r'genrec_requests_total\{path="/v1/recommend",status="200"\} (\d+)'
        deadline, seen = time.monotonic() + 10, None
        while time.monotonic() < deadline:  # the other worker's counts arrive within its sharing interval
            text = httpx.get(f"{url}/metrics", timeout=5).text
            seen = int(m.group(1)) if (m := re.search(pattern, text)) else 0
            if seen == n:
                break
            time.sleep(0.2)
        assert seen == n
        assert 'workers="2"' in text
        assert len(list(tmp_path.glob("genrec-serve-metrics-*/*.json"))) == 2  # one snapshot file per worker
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0
    assert not list(tmp_path.glob("genrec-serve-metrics-*"))


def test_genrec_serve_workers_stop_together_when_one_dies(model_dir, tmp_path):
    """A worker that dies takes the service down with a nonzero exit (restarts are the process manager's job),
    rather than leaving a half-capacity server behind."""
    proc, _ = _serve_two_workers(model_dir, tmp_path)
    try:
        os.kill(_workers(proc.pid)[0], signal.SIGKILL)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not list(tmp_path.glob("genrec-serve-metrics-*"))


def test_genrec_serve_workers_need_a_free_explicit_port(model_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(model_dir), "--port", str(port), "--workers", "2"]) == 2
        assert "Address already in use" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(model_dir), "--port", "0", "--workers", "2"]) == 2
    assert "explicit --port" in capsys.readouterr().err


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
        t0 = time.perf_counter()
        assert await request(9, 0) == 9
        assert time.perf_counter() - t0 < 0.05
        await batcher.stop()

    batcher = MicroBatcher(run, max_batch=64, max_wait_s=0.0, max_queue=64, inline=True, settle_yields=settle_yields)
    asyncio.run(scenario())
    assert calls == expected + [1]
