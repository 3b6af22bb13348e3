"""Fixtures of the server tests: the shared tiny checkpoint served in-process (an engine, an app) or by uvicorn
on a free localhost port in a background thread (for real HTTP clients)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1:``port`` in a thread; ``url`` is its /v1 base."""

    def __init__(self, app, engine, limit_concurrency: int = 64):
        import uvicorn

        self.engine, self.port = engine, free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    limit_concurrency=limit_concurrency))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def make_server(tiny_checkpoint):
    """``make_server(**ServeOptions fields) -> (app, engine)`` for the shared tiny checkpoint."""
    from moelab.serve.server import ServeOptions, build_server

    def make(**kw):
        kw.setdefault("cache_tokens", 2048)
        return build_server(ServeOptions(checkpoint=tiny_checkpoint, **kw), progress=False)

    return make


@pytest.fixture
def live_server(make_server):
    """``live_server(**options) -> LiveServer``; every server started is stopped after the test."""
    started = []

    def start(limit_concurrency: int = 64, **kw):
        app, engine = make_server(**kw)
        started.append(LiveServer(app, engine, limit_concurrency))
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def unused_port() -> int:
    """A TCP port free on 127.0.0.1 a moment ago."""
    return free_port()
