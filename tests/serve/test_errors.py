"""The service's status codes for bad requests, through a real server on loopback: 400 for a body that is not JSON,
413 too large, 415 not declared as JSON, 422 JSON that does not match the schema (with the field's path), 503 queue
full; every error body is ``{"detail": "<reason>"}``."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time

import httpx
import pytest

from genrec.serve.app import create_app
from genrec.serve.schemas import MAX_HISTORY

from .conftest import running

JSON = {"content-type": "application/json"}


def _detail(r: httpx.Response) -> str:
    """The reason of an error answer, checking the common shape: JSON ``{"detail": "<non-empty string>", ...}``."""
    assert r.headers["content-type"].startswith("application/json"), r.headers
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail.strip(), r.text
    return detail


@pytest.mark.parametrize("path", ["/v1/recommend", "/v1/rank"])
@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b'{"history": [', "not valid JSON"),
        (b"{'history': []}", "not valid JSON"),
        (b'{"history": []} trailing', "not valid JSON"),
        (b'{"history": ["\xff\xfe"]}', "not valid UTF-8"),
        (b"\xff\xfe\x00", "not valid UTF-8"),
        (b'{"history": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        (b"[" * 100_000, "nested too deeply"),
    ],
    ids=["empty", "blank", "truncated", "single-quotes", "trailing", "bad-utf8-in-string", "bad-utf8", "deep",
         "deep-unclosed"],
)
def test_a_body_that_is_not_json_gets_400(client, path, raw, reason):
    r = client.post(path, content=raw, headers=JSON)
    assert r.status_code == 400, r.text
    assert reason in _detail(r)


@pytest.mark.parametrize(
    "headers",
    [{}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"},
     {"content-type": "application/json; charset=latin-1"}, {"content-type": "multipart/form-data; boundary=x"}],
    ids=["none", "text", "form", "latin-1", "multipart"],
)  # fmt: skip
def test_a_body_not_declared_as_json_gets_415_naming_the_expected_type(client, headers):
    r = client.post("/v1/recommend", content=json.dumps({"history": ["i1"]}).encode(), headers=headers)
    assert r.status_code == 415, r.text
    detail = _detail(r)
    assert "application/json" in detail or "UTF-8" in detail


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON;charset=UTF-8"])  # fmt: skip
def test_json_content_types_are_accepted(client, content_type):
    r = client.post("/v1/recommend", content=b'{"history": ["i1"], "k": 3}', headers={"content-type": content_type})
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == 3


@pytest.mark.parametrize(
    "body, path",
    [
        ({"history": ["i1"], "k": 1001}, "k"),
        ({"history": ["i1"], "k": 0}, "k"),
        ({"history": ["i1"], "k": "10"}, "k"),
        ({"history": ["i1"], "k": 2.5}, "k"),
        ({"history": ["i1"] * (MAX_HISTORY + 1)}, "history"),
        ({"history": ["i1", 1.5]}, "history[1]"),
        ({"history": ["i1", "i2", {"item": "i1", "ts": "yesterday"}]}, "history[2]"),
        ({"history": [{"item": "i1", "ts": 2**60}]}, "history[0]"),
        ({"history": [{"item": "x" * 300}]}, "history[0]"),
        ({"history": [{"item": "i1", "when": 3}]}, "history[0]"),
        ({"history": "i1"}, "history"),
        ({"histroy": ["i1"]}, "histroy"),
        ({"history": ["i1"], "exclude": ["i2"] * 10_001}, "exclude"),
        ({"history": ["i1"], "exclude": ["i2", None]}, "exclude[1]"),
        ({"history": ["i1"], "exclude_seen": "yes"}, "exclude_seen"),
        ({"history": ["i1"], "query_ts": 1.5}, "query_ts"),
        ([1, 2], "request body"),
        ("history", "request body"),
    ],
)
def test_json_that_does_not_match_the_schema_gets_422_with_the_field_path(client, body, path):
    r = client.post("/v1/recommend", json=body)
    assert r.status_code == 422, r.text
    detail = _detail(r)
    assert detail.startswith(f"{path}: ") or f"; {path}: " in detail, detail
    errors = r.json()["errors"]
    assert errors and all(e["msg"] and e["loc"][0] == "body" for e in errors)
    assert "x" * 300 not in r.text  # the input is not echoed back


def test_rank_schema_errors_name_the_field(client):
    r = client.post("/v1/rank", json={"history": []})
    assert r.status_code == 422 and _detail(r) == "candidates: Field required"
    r = client.post("/v1/rank", json={"history": [], "candidates": ["i1"] * 10_001})
    assert r.status_code == 422 and _detail(r).startswith("candidates: ")
    r = client.post("/v1/rank", json={"history": [], "candidates": ["i1", ["i2"]]})
    assert r.status_code == 422 and _detail(r).startswith("candidates[1]: an item id is")


def test_many_bad_fields_are_reported_in_bounded_space(client):
    r = client.post("/v1/recommend", json={"history": [1.5] * 5000})
    assert r.status_code == 422
    detail = _detail(r)
    assert detail.startswith("history[0]: ") and detail.endswith("; and 4980 more")
    assert len(r.json()["errors"]) == 20 and len(r.content) < 10_000


def test_an_oversized_body_gets_413(client):
    big = json.dumps({"history": ["i1"] * 300_000}).encode()  # ~1.8 MB > 1 MiB
    r = client.post("/v1/recommend", content=big, headers=JSON)
    assert r.status_code == 413 and "1048576 bytes" in _detail(r)

    def chunks():  # no content-length: the limit is enforced on the bytes received
        yield b'{"history": ['
        for _ in range(40):
            yield b'"i1",' * 10_000
        yield b'"i1"]}'

    r = client.post("/v1/recommend", content=chunks(), headers=JSON)
    assert r.status_code == 413 and "larger than" in _detail(r)
    assert client.get("/healthz").status_code == 200  # and the server is fine


def test_unknown_paths_and_methods_get_the_same_error_shape(client):
    assert client.get("/nope").status_code == 404 and _detail(client.get("/nope"))
    r = client.get("/v1/recommend")
    assert r.status_code == 405 and _detail(r)


def test_a_full_queue_gets_503_with_retry_after(rec):
    """One request is in the model (held there), the queue holds one more: of two further concurrent requests, one
    waits and one is refused; once the model is released, the held and the queued requests are answered."""
    entered, release = threading.Event(), threading.Event()
    held = copy.copy(rec)

    def execute(queries):
        entered.set()
        assert release.wait(30)
        return rec.execute(queries)

    held.execute = execute

    async def scenario(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as ac:
            first = asyncio.ensure_future(ac.post("/v1/recommend", json={"history": ["i1"]}))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            both = asyncio.ensure_future(asyncio.gather(
                *(ac.post("/v1/recommend", json={"history": ["i2"]}) for _ in range(2))
            ))  # fmt: skip
            deadline = time.monotonic() + 30
            while not both.done() and not _refused(url) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            release.set()
            return [await first, *await both]

    def _refused(url: str) -> bool:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        return 'genrec_requests_total{path="/v1/recommend",status="503"} 1.0' in text

    with running(create_app(held, max_queue=1, model_thread=True)) as url:
        responses = asyncio.run(scenario(url))
    assert sorted(r.status_code for r in responses) == [200, 200, 503]
    refused = next(r for r in responses if r.status_code == 503)
    assert "overloaded" in _detail(refused) and refused.headers["retry-after"] == "1"
