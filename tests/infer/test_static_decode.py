"""The static cache and its fixed-shape decode step (moelab.infer.static) against the growable cache and
transformers' generate: same greedy tokens, logits within 1e-5 (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from decode_steps import assert_logits_close, step_logits
from hf_oracle import hf_model, v2_config, v3_config

import moelab
from moelab.errors import CheckpointError, MoelabError
from moelab.infer import SamplingConfig, generate
from moelab.infer.static import StaticDecoder, resolve_mode
from moelab.model.transformer import DeepSeekForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py

MHA = dict(use_mla=False, num_attention_heads=4, num_key_value_heads=2, rope_interleave=False, hidden_size=32)


def build(tiny_config, **kw) -> DeepSeekForCausalLM:
    return DeepSeekForCausalLM.from_config(tiny_config(**kw), seed=0).eval()


@pytest.mark.parametrize("kw", [{}, {"attn_impl": "absorb"}, {"attn_impl": "naive"}, {"q_lora_rank": 24},
                                MHA, MHA | {"num_key_value_heads": 4}],
                         ids=["mla_auto", "mla_absorb", "mla_naive", "mla_qlora", "gqa", "mha"])
def test_static_steps_match_the_growable_cache(tiny_config, kw):
    model = build(tiny_config, **kw)
    ids = torch.randint(2, 320, (2, 9))
    ref_tokens = generate(model, ids, 12, decode="dynamic")
    assert generate(model, ids, 12, decode="static").tolist() == ref_tokens.tolist()
    feed = ref_tokens[:, 9:-1]
    ref = step_logits(model, ids, feed)
    assert ref[0].abs().max() > 0.1, "logits too small for a meaningful comparison"
    assert_logits_close(step_logits(model, ids, feed, static=True), ref)


def test_left_padded_batch_and_chunked_prefill(tiny_config):
    model = build(tiny_config)
    a, b = torch.randint(2, 320, (1, 11)), torch.randint(2, 320, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    ref = generate(model, batch, 10, attention_mask=mask, decode="dynamic")
    got = generate(model, batch, 10, attention_mask=mask, decode="static", prefill_chunk=4)
    assert got.tolist() == ref.tolist()
    assert got[0].tolist() == generate(model, a, 10, decode="static").tolist()[0]
    assert got[1, 5:].tolist() == generate(model, b, 10, decode="static").tolist()[0]
    assert_logits_close(step_logits(model, batch, ref[:, 11:-1], mask, static=True),
                        step_logits(model, batch, ref[:, 11:-1], mask))


@pytest.mark.parametrize("case", ["v2", "v3"])
def test_static_decode_matches_transformers_generate(case, tmp_path):
    hf = hf_model(v2_config() if case == "v2" else v3_config())
    hf.save_pretrained(tmp_path)
    ours = moelab.load(tmp_path)
    prompt = torch.randint(2, 160, (2, 7))
    n = 16
    ref = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    got = generate(ours, prompt, n, SamplingConfig(greedy=True), decode="static")
    assert got.tolist() == ref.sequences.tolist()
    assert_logits_close(step_logits(ours, prompt, got[:, 7:-1], static=True), list(ref.logits))


def test_left_padded_batch_matches_transformers_generate(tmp_path):
    hf = hf_model(v3_config())
    hf.save_pretrained(tmp_path)
    ours = moelab.load(tmp_path)
    prompt = torch.randint(2, 160, (2, 8))
    prompt[0, :3] = 0
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    ref = hf.generate(prompt, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert generate(ours, prompt, 10, attention_mask=mask, decode="static").tolist() == ref.tolist()


def test_eos_stops_like_the_dynamic_path(tiny_config):
    model = build(tiny_config)
    ids = torch.randint(2, 320, (3, 5))
    free = generate(model, ids, 12, decode="dynamic")
    eos = int(free[0, 8])                                      # row 0 emits it at its 4th new token
    ref = generate(model, ids, 12, eos_token_id=eos, decode="dynamic")
    seen = []
    got = generate(model, ids, 12, eos_token_id=eos, decode="static", on_token=lambda t: seen.append(t.clone()))
    assert got.tolist() == ref.tolist()
    assert torch.equal(torch.stack(seen, 1), got[:, 5:])


def test_sampling_with_a_seed_matches(tiny_config):
    model = build(tiny_config)
    ids = torch.randint(2, 320, (2, 6))
    s = SamplingConfig(temperature=0.9, top_k=40, top_p=0.95, seed=3)
    assert torch.equal(generate(model, ids, 10, s, decode="static"), generate(model, ids, 10, s, decode="dynamic"))


def test_max_new_tokens_zero_and_one(tiny_config):
    model = build(tiny_config)
    ids = torch.randint(2, 320, (1, 4))
    for n in (0, 1):
        assert generate(model, ids, n, decode="static").tolist() == generate(model, ids, n, decode="dynamic").tolist()


@torch.inference_mode()
def test_writing_past_the_capacity_is_a_clear_error(tiny_config):
    model = build(tiny_config)
    cache = model.new_static_cache(1, 6)
    ids = torch.randint(2, 320, (1, 5))
    model(ids, cache=cache)
    with pytest.raises(MoelabError, match="holds 6 tokens per sequence; 5 are cached and 2 more do not fit"):
        model(ids[:, :2], cache=cache)
    decoder = StaticDecoder(model, cache, None)
    decoder(ids[:, 0])                                         # the sixth token fits
    assert cache.seq_len == 6
    with pytest.raises(MoelabError, match="holds 6 tokens per sequence; 6 are cached and 1 more do not fit"):
        decoder(ids[:, 0])
    with pytest.raises(MoelabError, match="at least one token"):
        model.new_static_cache(1, 0)


def test_static_cache_shapes(tiny_config):
    mla, gqa = build(tiny_config), build(tiny_config, **MHA)
    c = mla.new_static_cache(3, 20)
    assert c.elems_per_token() == mla.config.cache_elems_per_token()
    assert c.nbytes() == 3 * 20 * mla.config.cache_elems_per_token() * 4
    g = gqa.new_static_cache(2, 10)
    assert g.elems_per_token() == gqa.config.cache_elems_per_token()
    with torch.inference_mode():
        gqa(torch.randint(2, 320, (2, 4)), cache=g)
    k, v = g.layer_tensors(1)
    assert k.shape == v.shape == (2, 4, 2, 8)


def test_nonfinite_logits_are_refused_after_the_fact(tiny_config):
    model = build(tiny_config)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    for mode in ("static", "dynamic"):
        with pytest.raises(CheckpointError, match="non-finite logits at step 1;.*o_proj"):
            generate(model, torch.randint(2, 320, (1, 4)), 5, decode=mode)
        with pytest.raises(CheckpointError, match="non-finite logits at step 1;"):
            generate(model, torch.randint(2, 320, (1, 4)), 5, decode=mode, eos_token_id=1)


def test_decode_modes_resolve(tiny_config):
    cpu = torch.device("cpu")
    assert resolve_mode("auto", cpu) == "dynamic"
    assert resolve_mode("auto", torch.device("cuda")) == "graph"
    assert resolve_mode("compile", cpu) == "compile"
    with pytest.raises(MoelabError, match="captures CUDA graphs"):
        resolve_mode("graph", cpu)
    with pytest.raises(MoelabError, match="unknown decode mode 'fast'"):
        generate(build(tiny_config), torch.ones(1, 2, dtype=torch.long), 2, decode="fast")
    report = {}
    generate(build(tiny_config), torch.ones(1, 2, dtype=torch.long), 3, report=report)
    assert report["mode"] == "dynamic" and report["graph"] is False


def test_routing_observers_keep_the_step_eager(tiny_config):
    model = build(tiny_config)
    seen = []
    model.model.layers[0].mlp.routing_observers.append(lambda m, r: seen.append(r.indices))
    with torch.inference_mode():
        cache = model.new_static_cache(1, 8)
        model(torch.randint(2, 320, (1, 4)), cache=cache)
        decoder = StaticDecoder(model, cache, None, compile=True, backend="eager")
        decoder(torch.tensor([5]))
    assert decoder.run_layer is None and "routing observers" in decoder.not_graphed
    assert len(seen) == 2                                       # the prefill's and the step's routing


def test_compiled_step_traces_each_layer_kind_once(tiny_config):
    """dynamo over the decode step (backend ``eager``: tracing only, fast): no graph break, one graph per kind
    of layer (dense, MoE) shared by all layers of that kind, the same logits."""
    from torch._dynamo.utils import counters

    model = build(tiny_config, num_hidden_layers=4, first_k_dense_replace=1)
    ids = torch.randint(2, 320, (2, 6))
    feed = generate(model, ids, 6, decode="dynamic")[:, 6:-1]
    torch._dynamo.reset()
    counters.clear()
    got = step_logits(model, ids, feed, static=True, compile=True, backend="eager")
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2
    assert_logits_close(got, step_logits(model, ids, feed))


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager(tiny_config):
    """``decode="compile"`` on the CPU: inductor's C++ kernels (about a minute of compiling on 2 cores)."""
    model = build(tiny_config, num_hidden_layers=3, first_k_dense_replace=1)
    ids = torch.randint(2, 320, (2, 6))
    ref = generate(model, ids, 8, decode="dynamic")
    report = {}
    assert generate(model, ids, 8, decode="compile", report=report).tolist() == ref.tolist()
    assert report["mode"] == "compile" and report["graph"] is False
    assert_logits_close(step_logits(model, ids, ref[:, 6:-1], static=True, compile=True),
                        step_logits(model, ids, ref[:, 6:-1]))


def test_a_step_dynamo_cannot_compile_runs_eagerly(tiny_config):
    def failing_backend(gm, example_inputs):
        raise RuntimeError("no kernels today")

    model = build(tiny_config)
    ids = torch.randint(2, 320, (2, 6))
    feed = generate(model, ids, 5, decode="dynamic")[:, 6:-1]
    decoders = []
    got = step_logits(model, ids, feed, static=True, decoders=decoders, compile=True, backend=failing_backend)
    assert decoders[0].run_layer is None and "no kernels today" in decoders[0].not_compiled
    assert_logits_close(got, step_logits(model, ids, feed))
