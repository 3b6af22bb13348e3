"""The engine without HTTP: continuous batching gives the tokens of one-at-a-time serving and of
``moelab.infer.generate``; the cache budget holds and queued requests finish; cancelled requests and finished
ones give their blocks back; ``n`` choices share one prefill; stop strings end a choice."""

from __future__ import annotations

import threading

import pytest
import torch

from moelab.infer import SamplingConfig, generate
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.serve.engine import Engine
from moelab.serve.request import Delta, GenerationRequest
from moelab.serve.text import TextStream

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = 1
PROMPTS = [[9, 40, 41, 42, 43, 44, 45], [9, 70], [9, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109], [9, 33, 34],
           [9, 200, 201, 202, 203], [9, 250, 251, 252, 253, 254, 255, 256, 257]]
MAX_NEW = [12, 20, 7, 16, 10, 14]


@pytest.fixture(scope="module")
def model():
    from tiny import tiny_config

    return DeepSeekForCausalLM.from_config(tiny_config(), seed=3).eval()


class Collect:
    """A request's sink: tokens and text per choice, set ``done`` when every choice finished."""

    def __init__(self, choices: int = 1, watch=None):
        self.tokens = [[] for _ in range(choices)]
        self.text = [""] * choices
        self.finish = [None] * choices
        self.done = threading.Event()
        self.watch = watch

    def __call__(self, ev):
        if self.watch is not None:
            self.watch(ev)
        if isinstance(ev, Delta):
            self.tokens[ev.choice] += ev.tokens
            self.text[ev.choice] += ev.text
            if ev.finish_reason:
                self.finish[ev.choice] = ev.finish_reason
        if all(self.finish):
            self.done.set()


def request(prompt, max_new, sink, **kw) -> GenerationRequest:
    return GenerationRequest([prompt], max_new, SamplingConfig(greedy=True), sink, **kw)


def decode(ids):
    return "".join(chr(65 + i % 26) for i in ids)


def engine(model, **kw) -> Engine:
    return Engine(model, decode, eos_token_id=EOS, **kw).start()


def serve_all(eng, reqs):
    for r in reqs:
        eng.submit(r)
    for r in reqs:
        assert r.sink.done.wait(60), "a request did not finish"


def test_concurrent_greedy_equals_one_at_a_time_and_generate(model):
    eng = engine(model, cache_tokens=1024, block_size=4, prefill_chunk=4)
    batch = [0]

    def watch(_):
        batch[0] = max(batch[0], len(eng.sched.running))

    together = [request(p, n, Collect(watch=watch)) for p, n in zip(PROMPTS, MAX_NEW, strict=True)]
    serve_all(eng, together)
    assert batch[0] >= 3                     # they really were decoded together
    alone = []
    for p, n in zip(PROMPTS, MAX_NEW, strict=True):
        alone.append(request(p, n, Collect()))
        serve_all(eng, alone[-1:])
    eng.stop()
    for p, n, a, b in zip(PROMPTS, MAX_NEW, together, alone, strict=True):
        assert a.sink.tokens == b.sink.tokens
        ref = generate(model, torch.tensor([p]), n, eos_token_id=EOS)[0, len(p):].tolist()
        ref = ref[:ref.index(EOS) + 1] if EOS in ref else ref
        assert a.sink.tokens[0] == ref
    assert eng.pool.used == 0 and eng.pool.reserved == 0


def test_budget_holds_queued_requests_finish_blocks_come_back(model):
    eng = engine(model, cache_tokens=64, block_size=8)           # 8 blocks; each request books 3
    peak = {"reserved": 0, "used": 0, "waiting": 0}

    def watch(_):
        peak["reserved"] = max(peak["reserved"], eng.pool.reserved)
        peak["used"] = max(peak["used"], eng.pool.used)
        peak["waiting"] = max(peak["waiting"], len(eng.sched.waiting))

    reqs = [request(PROMPTS[i % 4], 12, Collect(watch=watch)) for i in range(8)]
    serve_all(eng, reqs)
    with pytest.raises(Exception, match="tokens of cache"):            # can never fit: refused at once
        eng.submit(request(list(range(9, 60)), 40, Collect()))
    eng.stop()
    assert peak["waiting"] > 0                 # some requests had to wait for blocks ...
    assert peak["reserved"] <= 8 and peak["used"] <= peak["reserved"]
    assert all(r.sink.finish[0] in ("stop", "length") for r in reqs)   # ... and all of them finished
    assert eng.pool.used == 0 and eng.pool.reserved == 0


def test_cancelled_request_frees_its_blocks(model):
    eng = engine(model, cache_tokens=256, block_size=4)
    first = threading.Event()
    sink = Collect(watch=lambda ev: first.set())
    req = request([9, 10, 11], 200, sink)
    eng.submit(req)
    assert first.wait(30)
    assert eng.pool.used > 0
    eng.cancel(req)
    other = request([9, 12], 3, Collect())     # the engine goes on serving
    serve_all(eng, [other])
    eng.stop()
    assert sum(map(len, sink.tokens)) < 200 and not sink.done.is_set()
    assert eng.pool.used == 0 and eng.pool.reserved == 0


def test_n_choices_share_the_prefill_and_stop_strings_end_a_choice(model):
    eng = engine(model, cache_tokens=512, block_size=4)
    one = request(PROMPTS[0], 10, Collect())
    three = request(PROMPTS[0], 10, Collect(3), n=3)
    serve_all(eng, [one, three])
    assert three.sink.tokens == one.sink.tokens * 3
    text = one.sink.text[0]
    stop = text[3:5]
    cut = request(PROMPTS[0], 10, Collect(), stop=[stop])
    serve_all(eng, [cut])
    eng.stop()
    assert cut.sink.text[0] == text[:text.index(stop)] and cut.sink.finish[0] == "stop"


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    table = {1: "ab", 2: "\ufffd", 3: "é", 4: "X", 5: "Y", 6: "c"}

    def dec(ids):   # 2 then 3: one character in two tokens
        out = "".join(table[i] for i in ids)
        return out.replace("\ufffdé", "é")

    s = TextStream(dec, stops=["XYZ"])
    assert s.push(1) == ("ab", False)
    assert s.push(2) == ("", False)              # half a character: held back
    assert s.push(3) == ("é", False)
    assert s.push(4) == ("", False)              # may become the stop string
    assert s.push(5) == ("", False)
    assert s.push(6) == ("XYc", False)           # it did not
    s = TextStream(dec, stops=["bX"])
    assert s.push(1) == ("a", False)
    assert s.push(4) == ("", True) and s.text == "a"
