"""On-policy preference pairs: a correct sample is chosen and an incorrect one rejected, prompts always right
or always wrong give none; end to end on a real checkpoint whose references are its own greedy answers."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

import moelab
from moelab.cli import app
from moelab.data.chat import ChatFormat
from moelab.data.tokenizer import load_tokenizer
from moelab.infer.generate import generate
from moelab.tune.preferences import build_preferences, pair_from


def test_pair_rule():
    assert pair_from("q", ["7", "5", " 5 ", "x"], "5") == {"prompt": "q", "chosen": "5", "rejected": "7"}
    assert pair_from("q", ["5", "5"], "5") is None and pair_from("q", ["1", "2"], "5") is None
    # an empty answer is wrong but cannot be written as a rejected answer (the DPO reader refuses empty text)
    assert pair_from("q", ["", "5", " ", "7"], "5") == {"prompt": "q", "chosen": "5", "rejected": "7"}
    assert pair_from("q", ["", "5"], "5") is None


def test_end_to_end(tiny_checkpoint, tmp_path):
    model, tok = moelab.load(tiny_checkpoint).eval(), load_tokenizer(tiny_checkpoint)
    fmt = ChatFormat(tok)
    rows = []
    for q in ("ab", "cd", "ef", "gh"):
        ids = torch.tensor([fmt.prompt_ids([{"role": "user", "content": q}])])
        out = generate(model, ids, 2, eos_token_id=fmt.eos)[0, ids.shape[1]:].tolist()
        greedy = tok.decode(out, skip_special_tokens=True).strip()       # the reference: its own greedy answer
        rows.append({"prompt": q, "completion": greedy})
    pairs, st = build_preferences(model, tok, rows, samples=12, temperature=0.8, max_new_tokens=2)
    assert st.prompts == 4 and st.samples == 48 and st.pairs == len(pairs) > 0
    assert st.pairs + st.all_correct + st.all_wrong == 4
    for p in pairs:
        ref = next(r["completion"] for r in rows if r["prompt"] == p["prompt"])
        assert p["chosen"] == ref and p["rejected"] != ref
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(app, ["data", "prefs", str(tiny_checkpoint), "--tasks", str(tasks), "--out",
                                   str(tmp_path / "p.jsonl"), "--samples", "12", "--temperature", "0.8",
                                   "--max-new-tokens", "2", "-q", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == st.pairs
