"""The HTTP API in-process (FastAPI's TestClient): OpenAI-shaped responses, streaming, metrics, and a clear
error for every kind of bad request — the server answers the next request as before."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    from fastapi.testclient import TestClient

    from moelab.serve.server import ServeOptions, build_server

    app, _ = build_server(ServeOptions(checkpoint=tiny_checkpoint, cache_tokens=1024, max_tokens=64,
                                       max_body_bytes=4096, model_name="tiny"), progress=False)
    with TestClient(app) as c:
        yield c


def test_completion_chat_and_streaming_agree(client):
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 8, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200
    out = r.json()
    assert out["object"] == "text_completion" and out["choices"][0]["finish_reason"] in ("length", "stop")
    assert out["usage"]["prompt_tokens"] == 5
    streamed, done = "", False
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as s:
        for line in s.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                streamed += json.loads(line[6:])["choices"][0]["text"]
    assert done and streamed == out["choices"][0]["text"]
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 4, "n": 2, "temperature": 0}).json()
    assert chat["object"] == "chat.completion" and len(chat["choices"]) == 2
    assert chat["choices"][0]["message"] == chat["choices"][1]["message"]      # greedy: n equal choices


def test_echo_logprobs_score_the_prompt(client, tiny_checkpoint):
    import torch

    from moelab.interop.checkpoint import load

    ids = [0, 40, 41, 42, 43]
    out = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True,
                                               "logprobs": 2}).json()
    lp = out["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids) + 1
    with torch.no_grad():
        logits = load(tiny_checkpoint)(torch.tensor([ids])).logits[0].log_softmax(-1)
    ref = [float(logits[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(ref, abs=1e-4)
    assert all(len(top) == 2 for top in lp["top_logprobs"][1:])


BAD = [
    (b'{"prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b'{"prompt": "x",', 400, "not valid JSON"),
    (b'["prompt"]', 400, "must be a JSON object"),
    (b'{"max_tokens": 3}', 400, "'prompt'"),
    (b'{"prompt": "x", "n": 0}', 400, "'n'"),
    (b'{"prompt": "x", "n": 17}', 400, "'n'"),
    (b'{"prompt": "x", "max_tokens": -1}', 400, "'max_tokens'"),
    (b'{"prompt": "x", "max_tokens": 65}', 400, "at most 64"),
    (b'{"prompt": "x", "temperature": "hot"}', 400, "'temperature'"),
    (b'{"prompt": "x", "top_p": 0}', 400, "'top_p'"),
    (b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "at most 4 stop"),
    (b'{"prompt": "x", "frequency_penalty": 1}', 400, "frequency_penalty is not supported"),
    (b'{"prompt": "x", "model": "gpt-4o"}', 404, "does not exist"),
    (b'{"prompt": ""}', 400, "empty"),
    (b'{"prompt": [1, 999999]}', 400, "outside this model's vocabulary"),
    (json.dumps({"prompt": "x" * 300}).encode(), 400, "at most 255"),
    (json.dumps({"prompt": "x" * 250, "max_tokens": 10}).encode(), 400, "exceed the model's context of 256"),
    (json.dumps({"prompt": "x" * 5000}).encode(), 413, "at most 4,096"),
]


@pytest.mark.parametrize(("raw", "status", "message"), BAD, ids=[m for _, _, m in BAD])
def test_bad_requests_get_a_clear_error_and_the_server_stays_up(client, raw, status, message):
    r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"]
    assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200


def test_bad_chat_requests(client):
    for messages, message in [([], "'messages'"), ([{"role": "user", "content": "a"}, {"role": "assistant",
                                                                                         "content": "b"}], "last"),
                              ([{"role": "wizard", "content": "a"}], "'messages.0.role'")]:
        r = client.post("/v1/chat/completions", json={"messages": messages})
        assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_models_health_metrics_and_unknown_paths(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/health").json() == {"status": "ok"}
    text = client.get("/metrics").text
    for name in ("moelab_requests_total{", "moelab_generation_tokens_total", "moelab_requests_waiting",
                 "moelab_cache_usage_ratio", "moelab_time_to_first_token_seconds_bucket",
                 "moelab_inter_token_latency_seconds_count"):
        assert name in text
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]


def test_api_key_and_timeout(make_server):
    from fastapi.testclient import TestClient

    app, _ = make_server(api_key="s3cret", request_timeout=0.05, max_tokens=200)
    with TestClient(app) as c:
        body = {"prompt": "x", "max_tokens": 1}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/completions", json=body, headers=ok).status_code == 200
        assert c.get("/health").status_code == 200                       # probes need no key
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 200, "temperature": 0}, headers=ok)
        assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
