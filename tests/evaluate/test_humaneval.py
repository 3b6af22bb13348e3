"""HumanEval: pass@k against a brute-force count over all k-subsets and closed forms; the canonical
solutions all pass and empty bodies all fail (run in the sandbox); samples files are read strictly
(`file:line: reason`); a model's greedy completions are generated, cut at stop sequences and scored."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from typer.testing import CliRunner

from moelab.cli import app
from moelab.errors import DataError
from moelab.evaluate.humaneval import load_problems, pass_at_k, read_samples, score_samples, truncate


def test_pass_at_k_equals_the_brute_force_count():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 6, 4), (7, 3, 5), (10, 1, 10)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert pass_at_k(200, 37, 1) == pytest.approx(37 / 200)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_canonical_solutions_pass_and_empty_bodies_fail():
    problems = load_problems()
    assert len(problems) == 164
    first = dict(list(problems.items())[:40])
    good = [(t, p["canonical_solution"]) for t, p in first.items()]
    bad = [(t, "    pass\n") for t in first]
    report = score_samples(good + bad, first)
    assert report.per_task["HumanEval/0"] == (2, 1)
    assert report.pass_at_k["pass@1"] == pytest.approx(0.5)
    assert report.statuses() == {"passed": 40, "failed": 40}


def test_samples_file_errors(tmp_path):
    problems = load_problems()
    cases = {'{"task_id": "HumanEval/0"}\n': ":1: 'completion' missing",
             'not json\n': ":1: not valid JSON",
             '{"task_id": "HumanEval/0", "completion": "x"}\n[1]\n': ":2: expected a JSON object",
             '{"task_id": "Other/1", "completion": "x"}\n': ":1: unknown task_id",
             '\n': "no samples"}
    for text, words in cases.items():
        path = tmp_path / "s.jsonl"
        path.write_text(text)
        with pytest.raises(DataError, match=words):
            read_samples(path, problems)


def test_truncate_at_stop_sequences():
    assert truncate("    return 1\n\ndef other():\n    pass\n") == "    return 1\n"
    assert truncate("    return 1\nprint(f())\n") == "    return 1"
    assert truncate("    return 1\n") == "    return 1\n"


def test_cli_scores_a_samples_file_and_a_model(tmp_path, tiny_checkpoint):
    problems = load_problems()
    path = tmp_path / "samples.jsonl"
    rows = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in list(problems.items())[:5]]
    rows.append({"task_id": "HumanEval/5", "completion": "    while True:\n        pass\n"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(app, ["eval", "humaneval", "--samples", str(path), "--timeout", "2", "-q",
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "pass@1 0.8333" in res.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["statuses"] == {"passed": 5, "timeout": 1}
    res = CliRunner().invoke(app, ["eval", "humaneval", str(tiny_checkpoint), "--limit", "3", "--max-new-tokens",
                                   "8", "-q", "--out", str(tmp_path / "model"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    done = [json.loads(x) for x in (tmp_path / "model" / "results.jsonl").read_text().splitlines()]
    assert [d["task_id"] for d in done] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(d["passed"] is False for d in done)          # a random tiny model writes no working code
    bad = CliRunner().invoke(app, ["eval", "humaneval"])
    assert bad.exit_code == 1 and "give a MODEL" in bad.output
