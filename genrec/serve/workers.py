"""``genrec serve --workers N``: N worker processes, each with its own model, batcher and listening socket.

Each worker binds its own socket to the same host and port with ``SO_REUSEPORT``, so the kernel spreads incoming
connections evenly over the workers (by a hash of the connection). uvicorn's own multi-worker mode shares one
listening socket instead, and whichever worker wakes first accepts a burst of new connections: in
``bench/serve_load.py`` all 8 connections of a concurrency-8 run sometimes landed on one worker (4 requests per
forward pass on one worker, the other idle), and the throughput of a run varied by 2x with that luck.

The supervisor (this process) starts the workers with the ``spawn`` method, forwards SIGINT / SIGTERM to them and
waits. It does not restart a worker that exits: it stops the others and exits with that worker's code, leaving
restarts to whatever runs the service (systemd, Kubernetes, a shell loop). The workers share their metrics through a
temporary directory (``genrec.serve.app.SharedMetrics``) that the supervisor removes on exit.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time

log = logging.getLogger("genrec.serve")


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def _worker(host: str, port: int, settings: str, log_level: str, access_log: bool) -> None:
    import uvicorn

    from genrec.serve.app import app_from_settings

    sock = _listen(host, port)
    config = uvicorn.Config(app_from_settings(settings), log_level=log_level, access_log=access_log)
    uvicorn.Server(config).run(sockets=[sock])


def serve_workers(workers: int, host: str, port: int, settings: str, log_level: str, access_log: bool) -> int:
    """Run ``workers`` processes serving on ``host:port`` until SIGINT / SIGTERM or until one exits; returns the
    exit code (0 after a signal, else the first worker's nonzero code). ``settings``: the JSON of
    ``genrec.serve.app.app_from_settings``."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("--workers > 1 needs SO_REUSEPORT (Linux, macOS, BSD); run one worker per port instead")
    if port == 0:
        raise ValueError("--workers > 1 needs an explicit --port (every worker binds the same one)")
    _listen(host, port).close()  # fail here, in the supervisor, when the port is taken by another program
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(host, port, settings, log_level, access_log), name=f"genrec-worker-{i}")
             for i in range(workers)]  # fmt: skip
    stopping = False

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)  # uvicorn's graceful shutdown

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        log.info("%d workers on %s:%d (pids %s)", workers, host, port, ", ".join(str(p.pid) for p in procs))
        code = 0
        while any(p.is_alive() for p in procs):
            exited = [p for p in procs if not p.is_alive()]
            if exited and not stopping:
                code = next((p.exitcode for p in exited if p.exitcode), 0) or 1
                log.error("worker %s exited with code %s: stopping the others", exited[0].pid, exited[0].exitcode)
                stop(None, None)
            time.sleep(0.2)
        if not stopping:  # every worker ended on its own
            code = next((p.exitcode for p in procs if p.exitcode), 0)
        return code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
