"""Running the service: one uvicorn server in this process, or ``genrec serve --workers N``: N worker processes, each
with its own model, batcher and listening socket, under a supervising process.

Each worker binds its own socket to the same host and port with ``SO_REUSEPORT``, so the kernel spreads incoming
connections evenly over the workers (by a hash of the connection). uvicorn's own multi-worker mode shares one
listening socket instead, and whichever worker wakes first accepts a burst of new connections: in
``bench/serve_load.py`` all 8 connections of a concurrency-8 run sometimes landed on one worker (4 requests per
forward pass on one worker, the other idle), and the throughput of a run varied by 2x with that luck.

The supervisor (this process) starts the workers with the ``spawn`` method and waits. It does not restart a worker
that exits: it stops the others and exits with that worker's code, leaving restarts to whatever runs the service
(systemd, Kubernetes, a shell loop).

Stopping: SIGINT (Ctrl-C) or SIGTERM to the supervisor sends SIGTERM to each worker, which finishes the requests in
flight and exits (a second signal kills them at once); the supervisor exits with 0. The workers keep SIGINT blocked,
so the Ctrl-C that a terminal sends to the whole process group reaches only the supervisor, which stops them once.
A server in this process stops the same way, on SIGINT or SIGTERM, and returns.

Metrics: the supervisor creates a temporary directory, names it in ``$PROMETHEUS_MULTIPROC_DIR`` for the workers
(``genrec.serve.metrics``), marks each worker that exits as dead there, and removes the directory on exit.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from typing import Any

from genrec.serve.metrics import MULTIPROC_ENV, mark_process_dead

log = logging.getLogger("genrec.serve")

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_server(
    app: Any, *, host: str, port: int, log_level: str, access_log: bool, sock: socket.socket | None = None
) -> None:
    """Serve ``app`` with uvicorn (on ``sock`` if given, else on ``host:port``) until SIGINT or SIGTERM, then shut
    down gracefully and return (uvicorn alone re-raises the signal after its shutdown: a KeyboardInterrupt
    traceback, or death by SIGTERM)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log))

    def stop(signum: int, frame: Any) -> None:  # also what uvicorn's re-raised signal lands on, after its shutdown
        server.should_exit = True

    previous = {s: signal.signal(s, stop) for s in _STOP_SIGNALS}
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def _leave(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _worker(host: str, port: int, settings: str, log_level: str, access_log: bool) -> None:
    # Started with SIGINT and SIGTERM blocked (see serve_workers). SIGINT stays blocked: the supervisor decides when
    # workers stop. SIGTERM before the server runs (while the model loads): leave quietly.
    signal.signal(signal.SIGTERM, _leave)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    from genrec.serve.app import app_from_settings

    sock = _listen(host, port)
    run_server(app_from_settings(settings), host=host, port=port, log_level=log_level, access_log=access_log, sock=sock)


def serve_workers(
    workers: int, host: str, port: int, settings: dict[str, Any], log_level: str, access_log: bool
) -> int:
    """Run ``workers`` processes serving on ``host:port`` until SIGINT / SIGTERM or until one exits; returns the
    exit code (0 after a signal, else the first worker's nonzero code). ``settings``: the JSON-able settings of
    ``genrec.serve.app.app_from_settings`` without ``metrics_dir`` and ``workers``, which this adds."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("--workers > 1 needs SO_REUSEPORT (Linux, macOS, BSD); run one worker per port instead")
    if port == 0:
        raise ValueError("--workers > 1 needs an explicit --port (every worker binds the same one)")
    _listen(host, port).close()  # fail here, in the supervisor, when the port is taken by another program
    ctx = multiprocessing.get_context("spawn")
    metrics_dir = tempfile.mkdtemp(prefix="genrec-serve-metrics-")
    previous_env = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the workers, before they import prometheus_client
    payload = json.dumps({**settings, "metrics_dir": metrics_dir, "workers": workers})
    procs = [ctx.Process(target=_worker, args=(host, port, payload, log_level, access_log), name=f"genrec-worker-{i}")
             for i in range(workers)]  # fmt: skip
    signals = 0

    def stop(signum: int | None, frame: Any) -> None:
        nonlocal signals
        signals += 1
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM if signals == 1 else signal.SIGKILL)  # type: ignore[arg-type]

    previous = {s: signal.signal(s, stop) for s in _STOP_SIGNALS}
    dead: set[int] = set()

    def bury(p: multiprocessing.process.BaseProcess) -> None:
        if p.pid is not None and p.pid not in dead and not p.is_alive():
            dead.add(p.pid)
            mark_process_dead(p.pid, metrics_dir)

    try:
        # The workers inherit this mask: a signal arriving while they start waits until they can take it.
        signal.pthread_sigmask(signal.SIG_BLOCK, set(_STOP_SIGNALS))
        try:
            for p in procs:
                p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, set(_STOP_SIGNALS))  # a pending signal is handled here
        log.info("%d workers on %s:%d (pids %s)", workers, host, port, ", ".join(str(p.pid) for p in procs))
        code = 0
        while any(p.is_alive() for p in procs):
            exited = [p for p in procs if not p.is_alive()]
            for p in exited:
                bury(p)
            if exited and not signals:
                code = next((p.exitcode for p in exited if p.exitcode), 0) or 1
                log.error("worker %s exited with code %s: stopping the others", exited[0].pid, exited[0].exitcode)
                stop(None, None)
            time.sleep(0.2)
        if not signals:  # every worker ended on its own
            code = next((p.exitcode for p in procs if p.exitcode), 0)
        return code
    finally:
        for p in procs:
            if p.pid is None:
                continue
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
            bury(p)
        for s, handler in previous.items():
            signal.signal(s, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if previous_env is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous_env
