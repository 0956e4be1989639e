"""Fixtures of the HTTP service tests: a tiny model fitted on synthetic data, served by a real uvicorn server on a
free loopback port."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from genrec.api import Recommender

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


@pytest.fixture(scope="package")
def model_dir(tmp_path_factory) -> Path:
    rec = Recommender(**TINY).fit(synthetic_interactions())
    return rec.save(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="package")
def rec(model_dir) -> Recommender:
    return Recommender.load(model_dir)


@pytest.fixture(scope="package")
def client(rec):
    from genrec.serve.app import create_app

    with running(create_app(rec)) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c
