"""``moelab finetune grpo``: prompts with rule-checkable answers, a frozen reference, and the jobs that carry
the sample batch through checkpoints.

Prompt file (JSON Lines), one task per line::

    {"prompt": "What is 12 + 7?", "completion": "19"}                       exact match (arithmetic tasks)
    {"messages": [{"role": "user", "content": "..."}], "answer": "19"}       chat prompt, exact match
    {"prompt": "Write add(a, b).", "tests": "assert add(1, 2) == 3"}         unit tests in the sandbox

(``moelab data tasks arithmetic`` writes the first form.) A line that is not a JSON object, has no prompt,
lacks what its reward needs, or whose prompt leaves fewer than ``grpo.max_new_tokens`` positions within
``data.seq_len`` (prompt + completion − 1 ≤ seq_len) is a :class:`DataError` ``file:line: reason`` — or
skipped and counted with ``data.skip_malformed``. Validation: ``data.val_path`` or a seeded
``data.val_fraction`` of the prompts; its ``val_loss`` is the NLL of the reference answers (of the prompts
themselves where rows have no reference, e.g. code with tests only).

The reference is ``grpo.reference`` (a checkpoint) or the base model, loaded frozen; its tokenizer must be
the policy's, token for token, since the KL compares log-probabilities of the same token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moelab.data.chat import ChatFormat, Example, to_messages
from moelab.data.jsonl import read_records
from moelab.data.sft import SFTData, pack
from moelab.data.split import split_off
from moelab.dist.coord import agreed
from moelab.errors import ConfigError, DataError
from moelab.tune.dpo_job import PrefLoadStats
from moelab.tune.grpo_data import GRPOData, PromptTask
from moelab.tune.jobs import EsftJob, FullJob, LoraJob
from moelab.tune.rewards import RuleReward, make_reward, reference_answer


def prompt_messages(row: dict) -> list[dict]:
    """The conversation up to the assistant's turn: ``prompt``, or chat ``messages`` (a trailing assistant
    message is the reference answer and is left out)."""
    if "messages" in row:
        msgs = row["messages"]
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            return to_messages(row)[:-1]
        return to_messages({"messages": [*msgs, {"role": "assistant", "content": "x"}]})[:-1]
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise DataError("'prompt' (a non-empty string) or 'messages' (a list of turns) is missing")
    return [{"role": "user", "content": row["prompt"]}]


def task_row(row: dict) -> dict:
    """The row the reward sees: a chat row's trailing assistant message becomes its ``completion``."""
    msgs = row.get("messages")
    if ("completion" not in row and "answer" not in row and isinstance(msgs, list) and msgs
            and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant"):
        return {**row, "completion": msgs[-1].get("content")}
    return row


def read_tasks(path: str | Path, fmt: ChatFormat, reward: RuleReward, seq_len: int, max_new: int,
               skip_malformed: bool, stats: PrefLoadStats) -> list[PromptTask]:
    """Every task of a GRPO prompt file, checked (module docstring)."""

    def parse(row: dict, where: str) -> PromptTask:
        row = task_row(row)
        ids = fmt.prompt_ids(prompt_messages(row))
        reward.check_row(row)
        if len(ids) + max_new - 1 > seq_len:
            raise DataError(f"the prompt is {len(ids)} tokens; with grpo.max_new_tokens = {max_new} a sample "
                            f"needs {len(ids) + max_new - 1} positions but data.seq_len is {seq_len}; raise "
                            "data.seq_len or shorten the prompt")
        return PromptTask(ids, row, where)

    tasks = read_records(path, parse, what="prompt file (JSON Lines with prompt and completion, answer or tests)",
                         skip_malformed=skip_malformed, skipped=stats.skipped, hint="data.skip_malformed")
    if not tasks:
        raise DataError(f"{path}: no usable prompts ({len(stats.skipped)} skipped)")
    return tasks


def validation_rows(tasks: list[PromptTask], fmt: ChatFormat, seq_len: int, meta: dict) -> SFTData:
    """The validation split as SFT rows: each prompt with its reference answer (or, lacking one, the prompt's
    own tokens as targets)."""
    examples = []
    for t in tasks:
        try:
            answer = reference_answer(t.row)
        except DataError:
            examples.append(Example(list(t.ids), [-100] + list(t.ids[1:]), 0))
            continue
        examples.append(fmt.render([*prompt_messages(t.row), {"role": "assistant", "content": answer}]))
    ids, labels = pack(examples, seq_len, fmt.pad)
    n = max(int((labels[:, 1:] != -100).sum()), 1)
    return SFTData(ids, labels, sum(e.answer_bytes for e in examples) / n or 1.0, {**meta, "examples": len(tasks)})


def load_grpo_data(cfg, tokenizer: Tokenizer) -> tuple[GRPOData, SFTData, PrefLoadStats]:
    """(train prompts, validation rows) of a fine-tuning config with method grpo."""
    dc, tc, g = cfg.data, cfg.train, cfg.grpo
    fmt = ChatFormat(tokenizer, dc.template)
    reward = make_reward(g.reward, g.reward_timeout_s)
    stats = PrefLoadStats()
    args = (fmt, reward, dc.seq_len, g.max_new_tokens, dc.skip_malformed, stats)
    tasks = read_tasks(dc.path, *args)
    if dc.val_path:
        train, val = tasks, read_tasks(dc.val_path, *args)
    else:
        train, val = split_off(tasks, dc.val_fraction, tc.seed, 0x4752, dc.path, "prompt")     # "GR"
    meta = {"vocab_size": tokenizer.get_vocab_size(with_added_tokens=True)}
    data = GRPOData(train, g, reward, dc.seq_len, fmt.pad, fmt.eos, tokenizer, tc.batch_size * tc.grad_accum,
                    tc.dtype, meta)
    return data, validation_rows(val, fmt, dc.seq_len, meta), stats


class GRPOState:
    """Mixin for the fine-tuning jobs: checkpoints carry the sample batch; one process only."""

    def state_dict(self) -> dict:
        return {"grpo": self.train_data.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.train_data.load_state_dict(state.get("grpo"))

    def prepare_parallel(self, model: torch.nn.Module, ps) -> dict:
        raise agreed(ConfigError("finetune grpo runs in one process (its sampling and sample batch are not split "
                                 "over ranks); run it without torchrun"))


@dataclass
class GRPOFullJob(GRPOState, FullJob):
    pass


@dataclass
class GRPOLoraJob(GRPOState, LoraJob):
    pass


@dataclass
class GRPOEsftJob(GRPOState, EsftJob):
    pass


GRPO_JOBS = {"full": GRPOFullJob, "lora": GRPOLoraJob, "esft": GRPOEsftJob}

__all__ = ["GRPO_JOBS", "GRPOEsftJob", "GRPOFullJob", "GRPOLoraJob", "GRPOState", "load_grpo_data",
           "prompt_messages", "read_tasks", "task_row", "validation_rows"]
