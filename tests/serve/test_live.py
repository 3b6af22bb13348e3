"""Real clients on localhost: the ``openai`` package (completion, chat, streaming) against uvicorn; a flood of
requests gets 503s and no failure, and so does a flood of connections; a client that disconnects mid-stream
frees its blocks; SIGTERM lets the running request finish, then the process exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_openai_client_completion_chat_and_streaming(live_server):
    openai = pytest.importorskip("openai")
    srv = live_server(model_name="tiny", api_key="k")
    client = openai.OpenAI(base_url=srv.url, api_key="k", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="To be", max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="To be", max_tokens=6, temperature=0, stream=True))
    assert done.choices[0].text == streamed and done.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                                  {"role": "user", "content": "Hi"}],
                                          max_tokens=5, temperature=0.8, seed=7, n=2)
    again = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                                   {"role": "user", "content": "Hi"}],
                                           max_tokens=5, temperature=0.8, seed=7, n=2)
    assert [c.message.content for c in chat.choices] == [c.message.content for c in again.choices]   # seeded
    parts = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=5, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
    assert parts[0].choices[0].delta.role == "assistant" and parts[-1].usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0).models.list()


def test_flood_gets_503s_and_nothing_fails(live_server):
    srv = live_server(max_batch=1, max_waiting=2, cache_tokens=512)
    codes, texts = [], []

    def one():
        r = httpx.post(srv.url + "/completions", json={"prompt": "flood", "max_tokens": 40, "temperature": 0},
                       timeout=60)
        codes.append(r.status_code)
        texts.append(r.json()["choices"][0]["text"] if r.status_code == 200 else r.json()["error"]["message"])

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(codes) == {200, 503}, codes
    assert any("busy" in t for t in texts)
    assert len({t for c, t in zip(codes, texts, strict=True) if c == 200}) == 1     # every success: same greedy text
    assert httpx.get(srv.base + "/health").status_code == 200


def test_connection_flood_beyond_the_limit_gets_503_and_the_server_stays_up(live_server):
    """Connections beyond ``limit_concurrency`` are answered 503 at once while the open ones are held (streams
    kept open, unread); when they close, the server answers normally again."""
    srv = live_server(limit_concurrency=4, max_batch=2, max_waiting=64)
    body = {"prompt": "hold", "max_tokens": 200, "temperature": 0, "stream": True}
    clients = [httpx.Client(timeout=30) for _ in range(4)]
    streams = []
    try:
        for c in clients:                          # open connections hold the slots while their streams run
            cm = c.stream("POST", srv.url + "/completions", json=body)
            streams.append((cm, cm.__enter__()))
        flood = [httpx.post(srv.url + "/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
                 for _ in range(8)]
        codes = [r.status_code for r in flood]
        assert 503 in codes, codes
        assert set(codes) <= {200, 503}, codes
        assert all(r.text for r in flood if r.status_code == 503)      # a body that says why, not a reset
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
        for c in clients:
            c.close()
    deadline = time.monotonic() + 30
    while metric(srv.base, "moelab_choices_running") or metric(srv.base, "moelab_cache_blocks_used"):
        assert time.monotonic() < deadline, "the closed streams did not free their choices"
        time.sleep(0.1)
    r = httpx.post(srv.url + "/completions", json={"prompt": "after", "max_tokens": 3, "temperature": 0}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_disconnect_mid_stream_frees_the_blocks(live_server):
    srv = live_server(cache_tokens=512, block_size=4, max_tokens=250)
    with httpx.Client(timeout=30) as c, c.stream("POST", srv.url + "/completions", json={
            "prompt": "a", "max_tokens": 250, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines)
        assert metric(srv.base, "moelab_cache_blocks_used") > 0
    deadline = time.monotonic() + 10
    while metric(srv.base, "moelab_cache_blocks_used") > 0 or metric(srv.base, "moelab_choices_running") > 0:
        assert time.monotonic() < deadline, "the disconnected stream kept its blocks"
        time.sleep(0.05)
    assert metric(srv.base, "moelab_generation_tokens_total") < 250


def test_sigterm_drains_the_running_request_and_exits(tiny_checkpoint, unused_port):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "moelab", "serve", str(tiny_checkpoint), "--port",
                             str(unused_port), "--device", "cpu", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{unused_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        got, finish = [], []
        with httpx.Client(timeout=60) as c, c.stream("POST", base + "/v1/completions", json={
                "prompt": "a", "max_tokens": 200, "temperature": 0, "stream": True,
                "stop": ["never-appears"]}) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                if not got:
                    proc.send_signal(signal.SIGTERM)          # mid-stream
                choice = json.loads(line[6:])["choices"][0]
                got.append(choice["text"])
                finish.append(choice["finish_reason"])
        assert finish[-1] in ("length", "stop") and len(got) > 1      # the stream ran to its end
        # uvicorn re-raises the signal once it has drained: the exit status is that of SIGTERM (or 0)
        assert proc.wait(30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(base + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
