"""lm-evaluation-harness on a small local multiple-choice task (written as YAML here): its
``local-completions`` model against ``moelab serve`` and its ``hf`` model on the same moelab checkpoint give
the per-choice log-likelihoods and the accuracy of moelab's own harness (``moelab.evaluate.harness``).

The task's text starts with the EOS token, the start token moelab's harness puts before every context, so
all three condition on the same token ids.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]
lm_eval = pytest.importorskip("lm_eval")

EOS = "<｜end▁of▁sentence｜>"
ROWS = [{"question": f"What is {a} + {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)],
         "answer": i % 3} for i, (a, b) in enumerate([(2, 3), (4, 4), (1, 7), (6, 2), (3, 9), (5, 5)])]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_task")
    (d / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "moelab_sums.yaml").write_text(f"""task: moelab_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'sums.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{EOS}Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return d


def run_lm_eval(task_dir, model: str, model_args: str) -> tuple[float, list[list[float]]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=["moelab_sums"], batch_size=1,
                          task_manager=TaskManager(include_path=str(task_dir)), log_samples=True)
    samples = sorted(out["samples"]["moelab_sums"], key=lambda s: s["doc_id"])
    return out["results"]["moelab_sums"]["acc,none"], [[float(r[0][0]) for r in s["resps"]] for s in samples]


def flat(rows: list[list[float]]) -> list[float]:
    return [x for r in rows for x in r]


@pytest.fixture(scope="module")
def moelab_scores(tiny_checkpoint):
    from transformers import AutoTokenizer

    from moelab.evaluate.harness import loglikelihood, score_multiple_choice
    from moelab.interop.checkpoint import load

    model, tok = load(tiny_checkpoint), AutoTokenizer.from_pretrained(tiny_checkpoint)
    acc = score_multiple_choice(model, tok, ROWS)["accuracy"]
    lls = [[x.logprob for x in loglikelihood(model, tok, [(f"Question: {r['question']}\nAnswer:", " " + c)
                                                          for c in r["choices"]])] for r in ROWS]
    return acc, lls


def test_lm_eval_local_completions_against_the_server(live_server, task_dir, tiny_checkpoint, moelab_scores):
    srv = live_server(model_name="tiny")
    acc, lls = run_lm_eval(task_dir, "local-completions",
                           f"model=tiny,base_url={srv.url}/completions,tokenizer={tiny_checkpoint},"
                           "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=2,max_retries=1")
    assert acc == pytest.approx(moelab_scores[0])
    assert flat(lls) == pytest.approx(flat(moelab_scores[1]), abs=1e-4)


def test_lm_eval_hf_model_on_the_checkpoint(task_dir, tiny_checkpoint, moelab_scores):
    acc, lls = run_lm_eval(task_dir, "hf", f"pretrained={tiny_checkpoint},dtype=float32,device=cpu")
    assert acc == pytest.approx(moelab_scores[0])
    assert flat(lls) == pytest.approx(flat(moelab_scores[1]), abs=1e-4)
