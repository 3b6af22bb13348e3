"""Generated task data (reasoning-gym) and the exact-match scorer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moelab.cli import app
from moelab.config import make_config
from moelab.data.sft import ChatFormat, to_messages
from moelab.data.tasks import exact_match, generate, write_jsonl
from moelab.data.tokenizer import train_tokenizer
from moelab.errors import DataError
from moelab.evaluate.exact_match import score_exact_match
from moelab.infer.generate import generate as lm_generate
from moelab.model.transformer import DeepSeekForCausalLM

EXCERPT = Path(__file__).resolve().parents[1] / "assets" / "shakespeare_excerpt.txt"


def test_arithmetic_answers_are_correct_and_seeds_are_disjoint():
    rows = generate("arithmetic", 200, seed=0)
    for r in rows:                       # an independent check of every answer: Python's own arithmetic
        expr = r["prompt"].removeprefix("Calculate ").removesuffix(".")
        assert eval(expr, {"__builtins__": {}}) == int(r["completion"])   # noqa: S307 (digits and +/- only)
    other = generate("arithmetic", 200, seed=1)
    # reasoning-gym seeds item i with seed + i; moelab spreads seeds so draws do not shift by one
    assert [r["prompt"] for r in rows[1:6]] != [r["prompt"] for r in other[:5]]
    assert generate("arithmetic", 200, seed=0) == rows                       # deterministic
    test = generate("arithmetic", 100, seed=1, exclude={r["prompt"] for r in rows})
    assert len(test) == 100 and not {r["prompt"] for r in test} & {r["prompt"] for r in rows}


def test_task_errors():
    with pytest.raises(DataError, match="unknown task"):
        generate("no_such_task", 3)
    with pytest.raises(DataError, match="at least 1"):
        generate("arithmetic", 0)
    everything = {f"Calculate {a} {op} {b}." for a in range(100) for b in range(100) for op in "+-"}
    with pytest.raises(DataError, match="could only draw"):
        generate("arithmetic", 10, seed=4, exclude=everything)


def test_exact_match_rule():
    assert exact_match(" 42 ", "42") and exact_match("42.", "42") and not exact_match("42", "-42")
    assert not exact_match("4 2", "42") and not exact_match("", "0")


def test_batched_scoring_equals_one_prompt_at_a_time(tmp_path):
    text = EXCERPT.read_text(encoding="utf-8")
    tok = train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)], 300)
    cfg = make_config(dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                           kv_lora_rank=16, q_lora_rank=None, n_routed_experts=4, n_shared_experts=1,
                           num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                           max_position_embeddings=128))
    model = DeepSeekForCausalLM.from_config(cfg, seed=0)
    rows = generate("arithmetic", 12, seed=5)
    fmt = ChatFormat(tok)
    preds = []
    for r in rows:                                     # unbatched: no padding at all
        ids = torch.tensor([fmt.prompt_ids(to_messages(r)[:-1])])
        new = lm_generate(model, ids, 6, eos_token_id=fmt.eos)[0, ids.shape[1]:].tolist()
        new = new[:new.index(fmt.eos)] if fmt.eos in new else new
        preds.append(tok.decode(new, skip_special_tokens=True))
    # make some answers right so that the count is not trivially zero
    rows = [dict(r, completion=preds[i]) if i % 3 == 0 else r for i, r in enumerate(rows)]
    out = score_exact_match(model, tok, rows, max_new_tokens=6, batch_size=5, n_samples=12)
    assert [s["prediction"] for s in out["samples"]] == preds
    assert out["correct"] == sum(exact_match(p, r["completion"]) for p, r in zip(preds, rows, strict=True)) >= 4


def test_cli_tasks_writes_a_disjoint_test_file(tmp_path):
    r = CliRunner().invoke(app, ["data", "tasks", "arithmetic", "--size", "50", "--out", str(tmp_path / "a.jsonl")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["data", "tasks", "arithmetic", "--size", "20", "--seed", "1", "--exclude",
                                 str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "b.jsonl")])
    assert r.exit_code == 0, r.output
    a = {json.loads(x)["prompt"] for x in (tmp_path / "a.jsonl").read_text().splitlines()}
    b = [json.loads(x)["prompt"] for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert len(b) == 20 and not a & set(b)
    r = CliRunner().invoke(app, ["data", "tasks", "nonsense", "--out", str(tmp_path / "c.jsonl")])
    assert r.exit_code == 1 and "unknown task" in r.output and not (tmp_path / "c.jsonl").exists()
    write_jsonl([{"prompt": "p", "completion": "c"}], tmp_path / "d.jsonl")
    assert (tmp_path / "d.jsonl").read_text() == '{"prompt": "p", "completion": "c"}\n'
