"""``genrec serve`` as a real process on loopback: one server, or ``--workers 2`` under a supervisor; metrics summed
over the workers; a clean stop on SIGINT / SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from genrec.cli import build_parser, main
from genrec.serve import workers

from .test_app import HISTORIES, _items, _sample


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


def _metrics_dirs(tmp_path: Path) -> list[Path]:
    return list(tmp_path.glob("genrec-serve-metrics-*"))


def _serve(model_dir: Path, tmp_path: Path, workers: int) -> tuple[subprocess.Popen, str, Path]:
    """``genrec serve`` on a free port (temporary files under ``tmp_path``, stderr into a file), once it answers
    /healthz and, with several workers, every worker is up (each worker answers /healthz only when its app has
    started): (the process, its base URL, its stderr file)."""
    port = _free_port()
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "genrec.cli", "serve", "--checkpoint", str(model_dir),
                                 "--port", str(port), "--workers", str(workers), "--log-level", "warning"],
                                env={**os.environ, "TMPDIR": str(tmp_path)}, stderr=err,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not _healthy(url) or (workers > 1 and len(_workers(proc.pid)) < workers):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"genrec serve did not start:\n{stderr.read_text()}")
        time.sleep(0.2)
    return proc, url, stderr


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT, group: bool = False) -> int:
    """Send ``sig`` to the server (or to its whole process group, as a terminal's Ctrl-C does) and wait, bounded."""
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def _wait_for_workers(url: str, tmp_path: Path, n: int) -> None:
    """Until ``n`` workers have each answered a request (each then has its own counter file), bounded."""
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("genrec-serve-metrics-*/counter_*.db"))) < n:
        assert time.monotonic() < deadline, "not every worker got a request"
        httpx.get(f"{url}/healthz", timeout=5)  # a new connection each: the kernel hands them to either worker


def _recommend_count(path: Path) -> float:
    """The /v1/recommend requests one worker counted, read from its own counter file."""
    (family,) = [m for m in MultiProcessCollector.merge([str(path)]) if m.name == "genrec_requests"]
    return sum(s.value for s in family.samples if s.labels.get("path") == "/v1/recommend")


def test_genrec_serve_with_two_worker_processes_sums_their_metrics(model_dir, rec, tmp_path):
    """``genrec serve --workers 2``: real worker processes on one port answer like the Python API, and /metrics (from
    whichever worker answers it) counts the requests, latencies and forward passes of both."""
    proc, url, stderr = _serve(model_dir, tmp_path, workers=2)
    try:
        _wait_for_workers(url, tmp_path, 2)
        (expected,) = rec.recommend_batch([HISTORIES[0]], k=5)
        (metrics_dir,) = _metrics_dirs(tmp_path)
        n, per_worker = 0, [0, 0]
        while min(per_worker) < 4:  # until each worker has answered some (a new connection each: either worker)
            assert n < 400, per_worker
            body = httpx.post(f"{url}/v1/recommend", json={"history": HISTORIES[0], "k": 5}, timeout=30).json()
            items, scores = _items(body)
            assert items == expected.items and scores == pytest.approx(expected.scores, abs=1e-5)
            n += 1
            per_worker = [_recommend_count(path) for path in sorted(metrics_dir.glob("counter_*.db"))]
        assert len(per_worker) == 2 and sum(per_worker) == n
        for _ in range(4):  # whichever worker answers the scrape reports the whole server
            text = httpx.get(f"{url}/metrics", timeout=5).text
            assert _sample(text, "genrec_requests_total", path="/v1/recommend", status="200") == n
            assert _sample(text, "genrec_request_duration_seconds_count", path="/v1/recommend") == n
            assert _sample(text, "genrec_batch_size_sum") == n  # one request per pass: they came one after another
            info = {"model_id": rec.model_id_, "model": "hstu", "num_items": "30", "workers": "2"}
            assert _sample(text, "genrec_model_info", **info) == 1 and text.count("genrec_model_info{") == 1
    finally:
        code = _stop(proc, signal.SIGTERM)  # as a process manager stops it
    assert code == 0
    assert "Traceback" not in stderr.read_text()
    assert not _metrics_dirs(tmp_path)


@pytest.mark.parametrize(
    "workers, sig, group",
    [(2, signal.SIGINT, True), (1, signal.SIGINT, True), (1, signal.SIGTERM, False)],
    ids=["2-workers-ctrl-c", "1-worker-ctrl-c", "1-worker-sigterm"],
)
def test_genrec_serve_stops_cleanly_on_a_signal(model_dir, tmp_path, workers, sig, group):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM (two workers: the test above):
    every process exits, the exit code is 0, stderr has no traceback, and the metrics directory is gone."""
    proc, url, stderr = _serve(model_dir, tmp_path, workers=workers)
    pids = _workers(proc.pid) if workers > 1 else []
    assert httpx.post(f"{url}/v1/recommend", json={"history": ["i1"]}, timeout=30).status_code == 200
    assert len(_metrics_dirs(tmp_path)) == (1 if workers > 1 else 0)
    if workers > 1:  # every worker has finished starting (a signal during a worker's startup is another case)
        _wait_for_workers(url, tmp_path, workers)
    assert _stop(proc, sig, group) == 0
    err = stderr.read_text()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert not _metrics_dirs(tmp_path)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or b"spawn_main" not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_genrec_serve_workers_stop_together_when_one_dies(model_dir, tmp_path):
    """A worker that dies takes the service down with a nonzero exit (restarts are the process manager's job),
    rather than leaving a half-capacity server behind."""
    proc, _, _ = _serve(model_dir, tmp_path, workers=2)
    try:
        os.kill(_workers(proc.pid)[0], signal.SIGKILL)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not _metrics_dirs(tmp_path)


def test_genrec_serve_workers_need_a_free_explicit_port(model_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(model_dir), "--port", str(port), "--workers", "2"]) == 2
        assert "Address already in use" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(model_dir), "--port", "0", "--workers", "2"]) == 2
    assert "explicit --port" in capsys.readouterr().err


def test_genrec_serve_binds_loopback_by_default(model_dir, monkeypatch):
    assert build_parser().parse_args(["serve", "--checkpoint", "x"]).host == "127.0.0.1"
    seen = {}
    monkeypatch.setattr(workers, "run_server", lambda app, **kw: seen.update(kw, app=app))
    assert main(["serve", "--checkpoint", str(model_dir), "--port", "8123"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123 and seen["app"].title == "genrec"


def test_an_app_for_worker_processes_refuses_a_metrics_directory_it_would_not_write_to(rec, tmp_path):
    """Without ``$PROMETHEUS_MULTIPROC_DIR`` naming the directory before ``prometheus_client`` was imported, the
    workers' counts would silently not be shared: refused instead."""
    from genrec.serve.app import create_app

    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR"):
        create_app(rec, metrics_dir=tmp_path, workers=2)
