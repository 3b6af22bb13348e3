"""UMP-style evaluation (docs/methods.md §9): the flawed-problem generator, Acc/Abs/Rel on a fixed boolean table,
byte-exact prompts, the rule-based judge against 106 hand labels, and the run/report/CLI path."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moelab
from moelab.config import make_config
from moelab.data.tokenizer import byte_level_tokenizer, save_tokenizer
from moelab.errors import DataError, MoelabError
from moelab.evaluate import ump as ump_mod
from moelab.evaluate.cli import eval_app
from moelab.evaluate.ump import (
    CATEGORIES,
    CCC_TEMPLATE,
    CCC_TEMPLATE_ID,
    UMPItem,
    generate_ump,
    load_template,
    make_flawed,
    read_items,
    render_prompt,
    results_table,
    run_ump,
    ump_metrics,
    write_items,
    write_report,
)
from moelab.evaluate.ump_judge import flagged_sentences, flags_unreasonable
from moelab.model.transformer import DeepSeekForCausalLM

LABELS = Path(__file__).resolve().parents[1] / "assets" / "ump_judge_labels.jsonl"
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- metrics ----------------------------------------------------------------------------------------

def test_metrics_on_a_fixed_boolean_table():
    # item:     0     1      2      3      4     5      6      7
    solved = [True, True, False, False, True, False, True, True]
    flagged = [True, False, True, False, True, False, False, True]
    m = ump_metrics(solved, flagged)
    assert m["n"] == 8
    assert m["acc"] == 5 / 8                       # originals solved: 0, 1, 4, 6, 7
    assert m["abs"] == 4 / 8                       # flawed flagged: 0, 2, 4, 7
    assert m["rel"] == 3 / 5                       # solved and flagged: 0, 4, 7 of the 5 solved
    assert (m["solved"], m["flagged"], m["solved_and_flagged"]) == (5, 4, 3)
    m = ump_metrics([False, False, False], [True, False, True])
    assert (m["acc"], m["abs"], m["rel"]) == (0.0, 2 / 3, None)          # Rel undefined when nothing is solved
    m = ump_metrics([True, True], [False, False])
    assert (m["acc"], m["abs"], m["rel"]) == (1.0, 0.0, 0.0)
    with pytest.raises(MoelabError, match="differ in length"):
        ump_metrics([True], [True, False])
    with pytest.raises(DataError, match="no items"):
        ump_metrics([], [])


# -- generator --------------------------------------------------------------------------------------

def test_generator_is_deterministic_and_seeds_are_disjoint():
    a, b = generate_ump(12, seed=3), generate_ump(12, seed=3)
    assert a == b
    c = generate_ump(12, seed=4)
    assert not {i.original for i in a} & {i.original for i in c}
    assert len({i.original for i in a}) == 12 and len({i.id for i in a}) == 12
    for it in a:
        assert it.category in CATEGORIES and it.flawed != it.original and it.flaw
        assert "Give the result as your final answer" not in it.original
        float(it.answer)


def test_generator_covers_every_category_near_balanced():
    items = generate_ump(40, seed=0)
    counts = {c: sum(i.category == c for i in items) for c in CATEGORIES}
    assert all(counts.values()), counts
    assert max(counts.values()) <= 12


def test_originals_are_reasoning_gym_problems_with_their_answers():
    import reasoning_gym

    from moelab.data.tasks import SEED_STRIDE

    items = generate_ump(5, seed=2)
    ds = list(reasoning_gym.create_dataset("gsm_symbolic", size=40, seed=2 * SEED_STRIDE))
    by_q = {ump_mod.strip_suffix(x["question"]): str(x["answer"]) for x in ds}
    for it in items:
        assert by_q[it.original] == it.answer


Q = ("Martha is knitting for her 2 grandchildren. It takes 23 minutes to knit a hat. She works 6 days every "
     "week. Robert is 14 years old. How many hats can she knit in 3 hours?")


def test_each_category_edit():
    f, why = make_flawed(Q, "incorrect_assumptions")
    assert "2.5 grandchildren" in f and "fractional" in why
    f, _ = make_flawed("Robert has 14 apples. He eats 3. How many are left?", "incorrect_assumptions")
    assert f.startswith("Robert has -14 apples.")
    f, why = make_flawed(Q, "inconsistent_conditions")
    first = "Martha is knitting for her 2 grandchildren."
    assert f.startswith(first + " Martha is knitting for her ") and f.count("Martha is knitting") == 2
    assert f.split(first + " ")[1].split(" grandchildren")[0] != "Martha is knitting for her 2"
    f, why = make_flawed(Q, "undefined_variables")
    assert "her x grandchildren" in f and "never defined" in why
    f, why = make_flawed(Q, "units")
    assert "23 kilograms to knit" in f and "time -> mass" in why
    f, why = make_flawed(Q, "illogical_scenarios")
    n = int(f.split(" days every week")[0].split()[-1])
    assert n >= 8 and "7 days" in why
    assert make_flawed("How many apples are there?", "units") is None
    assert make_flawed("Ms. Lee has 4 cats. How many?", "inconsistent_conditions")[0].count("Ms. Lee has") == 2
    with pytest.raises(MoelabError, match="unknown UMP category"):
        make_flawed(Q, "typos")


def test_items_round_trip(tmp_path):
    items = generate_ump(3, seed=1)
    p = write_items(items, tmp_path / "d" / "items.jsonl")
    assert read_items(p) == items
    (tmp_path / "bad.jsonl").write_text('{"original": "x"}\n')
    with pytest.raises(DataError, match="needs category"):
        read_items(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no UMP items"):
        read_items(tmp_path / "empty.jsonl")


# -- prompts ----------------------------------------------------------------------------------------

def test_prompts_are_byte_exact(tmp_path):
    q = "A boy has -9 toys. How many toys does he have?"
    assert render_prompt(load_template("plain")[1], q) == q
    tid, tpl = load_template("ccc")
    assert tid == CCC_TEMPLATE_ID == "ccc-reconstructed-v1" and tpl == CCC_TEMPLATE
    assert render_prompt(tpl, q) == (
        "Solve the following math problem with Critical Calculation and Conclusion.\n"
        "1. Check the premises: are the conditions consistent with each other and possible in the real world?\n"
        "2. Solve step by step. Test every intermediate quantity for plausibility: negative or fractional counts, "
        "parts larger than their totals, impossible units or times.\n"
        "3. Conclude. If the problem is reasonable, give the final answer as a number. If it is not, state that the "
        "problem is unreasonable and explain why.\n"
        "\n"
        "Problem: A boy has -9 toys. How many toys does he have?")
    custom = tmp_path / "mine.txt"
    custom.write_text("Check this: {question} {not_a_field}")
    tid, tpl = load_template("ccc", custom)
    assert tid.startswith("file:mine.txt:") and render_prompt(tpl, "Q?") == "Check this: Q? {not_a_field}"
    (tmp_path / "no.txt").write_text("no placeholder")
    with pytest.raises(DataError, match="placeholder"):
        load_template("ccc", tmp_path / "no.txt")
    with pytest.raises(MoelabError, match="unknown prompt mode"):
        load_template("cot")


# -- judge ------------------------------------------------------------------------------------------

def test_judge_agrees_with_hand_labels():
    # 64 answers written and labelled by hand (flagging, plain, hedged, tricky), and 42 real SmolLM2 answers
    # labelled by hand after the judge was written (a held-out check; most are degenerate repetitions).
    rows = [json.loads(x) for x in LABELS.read_text(encoding="utf-8").splitlines() if x.strip()]
    written = [r for r in rows if r["kind"] != "smollm2"]
    real = [r for r in rows if r["kind"] == "smollm2"]
    assert len(written) >= 50 and len(real) >= 40
    assert 20 <= sum(r["flagged"] for r in written) <= len(written) - 20        # both classes well represented

    def agreement(rs):
        return sum(flags_unreasonable(r["answer"]) == r["flagged"] for r in rs) / len(rs)

    print(f"judge agreement: written {agreement(written):.3f} (n={len(written)}), "
          f"SmolLM2 {agreement(real):.3f} (n={len(real)}), all {agreement(rows):.3f} (n={len(rows)})")
    assert agreement(written) >= 0.9 and agreement(real) >= 0.9


def test_judge_ignores_echoes_questions_and_negations():
    prompt = render_prompt(CCC_TEMPLATE, "There are x apples. How many are left?")
    echo = ("2. Solve step by step. Test every intermediate quantity for plausibility: negative or fractional counts, "
            "parts larger than their totals, impossible units or times. The answer is 5.")
    assert not flags_unreasonable(echo, prompt)
    assert not flags_unreasonable("Is this impossible? No. The answer is 3.")
    assert not flags_unreasonable("If the problem were inconsistent, I would say so. It is fine: 12.")
    assert not flags_unreasonable("There is no contradiction, and nothing is undefined. 7.")
    assert flags_unreasonable("No, this is impossible: a week has 7 days.")
    assert flagged_sentences("Fine. The value of x is never defined, so it cannot be solved.") == \
        ["the value of x is never defined, so it cannot be solved."]


# -- running ----------------------------------------------------------------------------------------

ITEMS = [UMPItem(f"t{i}", c, f"Original {i}: 3 + {i} apples?", f"Flawed {i}: x + {i} apples?", str(3 + i), "x")
         for i, c in enumerate(["units", "units", "undefined_variables"])]


def test_run_ump_scores_canned_answers(monkeypatch):
    canned = {"Original 0: 3 + 0 apples?": "3 + 0 = 3. The answer is 3.",
              "Original 1: 3 + 1 apples?": "The answer is 5.",
              "Original 2: 3 + 2 apples?": "#### 5",
              "Flawed 0: x + 0 apples?": "x is never defined, so the answer cannot be determined.",
              "Flawed 1: x + 1 apples?": "The problem is unreasonable.",
              "Flawed 2: x + 2 apples?": "x + 2 = 7, so x = 5."}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, on_batch=None, system=None):
        return [canned[p.split("Problem: ")[-1]] for p in prompts]

    monkeypatch.setattr("moelab.evaluate.lm.generate_texts", fake_generate)
    rep = run_ump(None, None, ITEMS, modes=("plain", "ccc"))
    for mode in ("plain", "ccc"):
        m = rep["modes"][mode]["metrics"]
        # solved: 0, 2; flagged: 0, 1 -> Acc 2/3, Abs 2/3, Rel 1/2
        assert (m["acc"], m["abs"], m["rel"]) == (2 / 3, 2 / 3, 1 / 2)
        assert rep["modes"][mode]["per_category"]["units"]["abs"] == 1.0
        assert rep["modes"][mode]["original_flag_rate"] == 0.0
    assert rep["modes"]["ccc"]["template_id"] == CCC_TEMPLATE_ID
    assert len(rep["responses"]) == 6 and rep["judge"] == "rules-v1"
    table = results_table(rep)
    assert "| plain | plain-v1 | 3 | 66.7 | 66.7 | 50.0 | 0.0 |" in table
    assert "units (n=2)" in table


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ump") / "model"
    cfg = make_config(dict(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                           kv_lora_rank=16, q_lora_rank=None, n_routed_experts=0, max_position_embeddings=512))
    with warnings.catch_warnings():   # notes on transformers' DeepseekV2 router: irrelevant here
        warnings.simplefilter("ignore")
        moelab.save(DeepSeekForCausalLM.from_config(cfg, seed=0), d)
    save_tokenizer(byte_level_tokenizer(), d)
    return d


def test_run_and_report_on_a_tiny_model(tiny_dir, tmp_path):
    from moelab.interop.hf_lm import load_causal_lm

    model, tok = load_causal_lm(tiny_dir)
    items = generate_ump(2, seed=0)
    rep = run_ump(model, tok, items, modes=("ccc",), max_new_tokens=3, batch_size=4)
    paths = write_report(rep, items, tmp_path / "out")
    res = json.loads(paths["results"].read_text())
    assert res["modes"]["ccc"]["template_id"] == CCC_TEMPLATE_ID and "responses" not in res
    assert len(paths["responses"].read_text().splitlines()) == 2
    assert read_items(paths["items"]) == items
    assert "| ccc | ccc-reconstructed-v1 | 2 |" in paths["table"].read_text()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]   # no temp files left


def test_cli_ump(tiny_dir, tmp_path):
    data = tmp_path / "items.jsonl"
    r = runner.invoke(eval_app, ["ump-data", "--n", "3", "--seed", "5", "--out", str(data)])
    assert r.exit_code == 0 and len(data.read_text().splitlines()) == 3, r.output
    r = runner.invoke(eval_app, ["ump", str(tiny_dir), "--data", str(data), "--n", "2", "--mode", "both",
                                 "--max-new-tokens", "2", "--out", str(tmp_path / "run"), "-q"])
    assert r.exit_code == 0, r.output
    assert "| plain | plain-v1 | 2 |" in r.output and "| ccc | ccc-reconstructed-v1 | 2 |" in r.output
    assert (tmp_path / "run" / "table.md").is_file()
    r = runner.invoke(eval_app, ["ump", str(tiny_dir), "--mode", "cot", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("error: --mode")
    (tmp_path / "empty.jsonl").write_text("")
    r = runner.invoke(eval_app, ["ump", str(tiny_dir), "--data", str(tmp_path / "empty.jsonl"),
                                 "--out", str(tmp_path / "y")])
    assert r.exit_code == 1 and "no UMP items" in r.output and "Traceback" not in r.output
