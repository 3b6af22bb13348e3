"""Single-line infilling: the task set equals the published HumanEval single-line infilling benchmark
(1,033 lines, Fried et al. 2022), every task reassembles its program, prompts have the PSM layout within
the context budget, and the CLI runs end to end on a checkpoint (and refuses a model without sentinels)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moelab.cli import app
from moelab.data.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE, load_tokenizer
from moelab.errors import DataError
from moelab.evaluate.humaneval import load_problems
from moelab.evaluate.infill import file_line_tasks, first_line, humaneval_line_tasks, prompt_ids


def test_humaneval_single_line_tasks_are_the_published_1033():
    problems = load_problems()
    tasks = humaneval_line_tasks(problems)
    assert len(tasks) == 1033
    for t in tasks:
        pid = t.name.rsplit(":", 1)[0]
        p = problems[pid]
        assert t.prefix + t.target + "\n" + t.suffix == p["prompt"] + p["canonical_solution"]
        assert t.target.strip() and t.prefix.startswith(p["prompt"])


def test_prompt_layout_and_budget(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    t = humaneval_line_tasks(load_problems(), limit=1)[0]
    ids = prompt_ids(tok, t, start=1, budget=10_000)
    b, h, e = (tok.token_to_id(s) for s in (FIM_BEGIN, FIM_HOLE, FIM_END))
    assert ids[:2] == [1, b] and ids[-1] == e and ids.count(h) == 1
    assert tok.decode(ids[2:ids.index(h)]) == t.prefix and tok.decode(ids[ids.index(h) + 1:-1]) == t.suffix
    short = prompt_ids(tok, t, start=1, budget=64)
    assert len(short) <= 64
    assert tok.decode(short[2:short.index(h)]) == t.prefix[-len(tok.decode(short[2:short.index(h)])):]
    assert first_line("    return x  \nmore") == "    return x"


def test_file_tasks_and_errors(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "a = 1\n\nb = 2\nc = 3\n", "path": "m.py"}) + "\n")
    tasks = file_line_tasks(corpus, per_file=2, seed=0)
    assert len(tasks) == 2 and all(t.prefix + t.target + "\n" + t.suffix == "a = 1\n\nb = 2\nc = 3\n" for t in tasks)
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
    with pytest.raises(DataError, match="bad.jsonl:1"):
        file_line_tasks(tmp_path / "bad.jsonl")


def test_cli_runs_on_a_checkpoint(tiny_checkpoint, tmp_path):
    res = CliRunner().invoke(app, ["eval", "infill", str(tiny_checkpoint), "--limit", "5", "--max-new-tokens", "4",
                                   "-q", "--device", "cpu", "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n"] == 5 and len(result["examples"]) == 5


def test_infill_nll_equals_one_task_at_a_time(tiny_checkpoint):
    """Batched, left-padded scoring of the removed lines equals scoring each task alone, and a hand
    computation of the first: −Σ log p(line + newline | PSM prompt)."""
    import torch

    from moelab.data.fim import encode_plain
    from moelab.evaluate.infill import infill_nll
    from moelab.interop.hf_lm import load_causal_lm

    model, tok = load_causal_lm(tiny_checkpoint)
    tasks = humaneval_line_tasks(load_problems(), limit=5)
    tasks = [t.__class__(t.name, t.prefix[-60:], t.suffix[:30], t.target) for t in tasks]   # short prompts
    batched = infill_nll(model, tok, tasks, batch_size=4)
    alone = [infill_nll(model, tok, [t], batch_size=1) for t in tasks]
    total = sum(a["infill_nll"] * a["tokens"] for a in alone)
    assert batched["tokens"] == sum(a["tokens"] for a in alone)
    assert batched["infill_nll"] == pytest.approx(total / batched["tokens"], rel=1e-4)
    t = tasks[0]
    target = encode_plain(tok.backend_tokenizer, t.target + "\n")
    ids = prompt_ids(tok, t, 1, 10_000) + target
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    want = -sum(float(logp[len(ids) - len(target) - 1 + k, x]) for k, x in enumerate(target)) / len(target)
    assert alone[0]["infill_nll"] == pytest.approx(want, rel=1e-4)
