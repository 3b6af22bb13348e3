"""``moelab finetune ...``: full fine-tuning, LoRA, PeriodicLoRA and ESFT from one config file.

    moelab finetune lora configs/finetune-arith.toml --set lora.r=16
    moelab finetune esft configs/finetune-arith.toml --set esft.expert_config=runs/esft/expert_cfg.json
    moelab finetune grpo configs/grpo-arith.toml --set grpo.group=8
    moelab finetune merge runs/demo/model runs/ft-lora/adapter --out runs/ft-lora/merged
    torchrun --standalone --nproc_per_node=2 -m moelab finetune esft configs/finetune-arith.toml --set parallel.ep=2
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moelab.cli_utils import err, friendly

finetune_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                           help="Fine-tune a checkpoint on chat / prompt-completion data (full, lora, plora, "
                                "esft), on preference pairs (dpo) or by RL from rule rewards (grpo).")

_CONFIG = typer.Argument(help="TOML with [finetune] (base), [data] (path, seq_len), [train] and method sections.")
_OUT = typer.Option("--out", "-o", help="Run directory (default: runs/ft-<method>-<config name>).")
_SET = typer.Option("--set", help="Override a setting: --set train.steps=200 --set lora.r=16 (repeatable).")
_BASE = typer.Option("--base", help="Checkpoint to start from (overrides finetune.base).")
_RESUME = typer.Option("--resume", help="Continue from the newest checkpoint in --out.")
_PROGRESS = typer.Option(help="Show the progress bar.")
_ALLOW = typer.Option("--allow-config-change", help="With --resume: apply settings that differ from the run's "
                      "record (refused by default; recorded in RUN_DIR/config_changes.jsonl).")


def run_method(method: str, config: Path | None, out: Path | None, overrides: list[str] | None,
               base: str | None, resume: bool, progress: bool, allow_config_change: bool = False) -> None:
    from moelab.tune.config import load_finetune_config
    from moelab.tune.run import finetune

    cfg = load_finetune_config(config, overrides or [], method=method, base=base)
    run_dir = out or Path("runs") / f"ft-{method}-{config.stem if config else 'run'}"
    if os.environ.get("RANK", "0") == "0":
        err.print(f"fine-tuning ({method}) {cfg.finetune.base} on {cfg.data.path} → {run_dir}")
    result, summary = finetune(cfg, run_dir, resume=resume, progress=progress,
                               allow_config_change=allow_config_change)
    if os.environ.get("RANK", "0") != "0":      # under torchrun rank 0 reports for the job
        raise typer.Exit(130 if result.status == "interrupted" else 0)
    t, n = summary["trainable_params"], summary["total_params"]
    con = Console()
    con.print(f"trainable parameters: {t:,} of {n:,} ({100 * t / n:.3f}%)")
    if result.status == "interrupted":
        err.print(f"interrupted: checkpoint {result.checkpoint}; continue with --resume")
        raise typer.Exit(130)
    ev = result.last_eval
    line = f"step {result.step}"
    if ev:
        line += f" · task val loss {ev['val_loss']:.3f}"
        if "general_val_ppl" in ev:
            line += f" · general ppl {ev['general_val_ppl']:.2f}"
    rewards = summary.get("rewards")
    if rewards and (rewards["reward_errors"] or rewards["reward_timeouts"]):
        err.print(f"rewards: {rewards['reward_errors']} raised and {rewards['reward_timeouts']} timed out of "
                  f"{rewards['samples']} samples (scored 0); first: {rewards['first_problem']}")
    con.print(f"{line}\nresult: {summary['result']} ({summary['result_bytes'] / 1e6:.2f} MB)\n"
              f"report: {result.run_dir / 'report' / 'summary.md'}")


def _command(method: str, doc: str):
    @friendly
    def command(config: Annotated[Path, _CONFIG], out: Annotated[Path | None, _OUT] = None,
                overrides: Annotated[list[str] | None, _SET] = None, base: Annotated[str | None, _BASE] = None,
                resume: Annotated[bool, _RESUME] = False, progress: Annotated[bool, _PROGRESS] = True,
                allow_config_change: Annotated[bool, _ALLOW] = False):
        run_method(method, config, out, overrides, base, resume, progress, allow_config_change)

    command.__doc__ = doc
    command.__name__ = method
    return command


finetune_app.command("full")(_command("full", """Full fine-tuning: every weight trains (LR default 3e-5).

    Writes RUN_DIR/model (a Hugging Face checkpoint), metrics, checkpoints and a report, like `moelab train`.

        moelab finetune full configs/finetune-arith.toml --set train.steps=200
    """))
finetune_app.command("lora")(_command("lora", """LoRA: low-rank adapters on the layers matched by lora.target_modules.

    Default targets: attention projections, dense MLPs, shared and routed experts (never the router).
    Writes RUN_DIR/adapter in PEFT's format (opens with peft.PeftModel.from_pretrained on the
    transformers model of the base checkpoint).

        moelab finetune lora configs/finetune-arith.toml --set lora.r=8 --set lora.alpha=16
    """))
finetune_app.command("plora")(_command("plora", """PeriodicLoRA: LoRA merged into the weights every plora.stage_steps.

    After each stage s·BA is added to the base weights, A is redrawn, B zeroed and the LoRA optimizer
    state reset, so the total update can exceed rank r at LoRA's memory. Writes RUN_DIR/model.

        moelab finetune plora configs/finetune-arith.toml --set plora.stage_steps=50
    """))
finetune_app.command("esft")(_command("esft", """ESFT: train only the task-relevant routed experts.

    Needs esft.expert_config from `moelab esft score` + `moelab esft select`. Router, shared experts,
    attention, embeddings and head stay frozen; tokens still route to every expert. Writes RUN_DIR/esft
    (expert_cfg.json + the trained experts' weights).

        moelab finetune esft configs/finetune-arith.toml --set esft.expert_config=runs/esft/expert_cfg.json
    """))


finetune_app.command("dpo")(_command("dpo", """DPO: learn from preference pairs (prompt, chosen, rejected).

    data.path is a preference JSON Lines file ({"prompt", "chosen", "rejected"}, or chat "messages" with
    the answers; `moelab data prefs` makes one from a model's own samples). The reference is the base
    model, or dpo.reference (a checkpoint with the same tokenizer); its log-probabilities are computed
    once. [dpo] sets beta (0.1), loss (sigmoid or ipo),
    label_smoothing and what trains (full, lora or esft). Logged besides the loss: dpo_margin,
    dpo_accuracy, chosen_reward, rejected_reward and logratio (policy vs reference).

        moelab finetune dpo configs/finetune-arith.toml --set data.path=runs/prefs.jsonl --set train.lr=5e-6
    """))


finetune_app.command("grpo")(_command("grpo", """GRPO: reinforcement learning from rule-checked rewards (DeepSeekMath).

    data.path holds prompts with what checks an answer: {"prompt", "completion"} (exact match, e.g. from
    `moelab data tasks arithmetic`) or {"prompt", "tests"} (Python asserts run in the sandbox). Each
    sample batch draws train.batch_size × train.grad_accum / grpo.group prompts, samples grpo.group
    completions of each (grpo.temperature, grpo.max_new_tokens), scores them, normalises the rewards
    within each group and takes grpo.iterations optimizer steps on the clipped objective with a k3 KL
    penalty (grpo.beta) to the reference (grpo.reference, default the base). [grpo] also sets clip_eps,
    reward (auto, exact_match, unit_tests or module:function) and what trains (full, lora, esft); the
    loss-free routing bias updates only with [balance] method = "loss_free".
    Logged besides the loss: reward_mean, reward_std, zero_var_groups, completion_len, truncated, kl,
    clip_fraction, reward_errors and reward_timeouts (rewards that raised or timed out score 0).

        moelab finetune grpo configs/grpo-arith.toml --set grpo.group=8 --set train.steps=100
    """))


@finetune_app.command("merge")
@friendly
def merge(base: Annotated[Path, typer.Argument(help="The base checkpoint the run started from.")],
          result: Annotated[Path, typer.Argument(help="RUN_DIR/adapter (LoRA) or RUN_DIR/esft (ESFT).")],
          out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the merged checkpoint.")],
          overwrite: Annotated[bool, typer.Option(help="Replace --out if it holds a moelab checkpoint.")] = False):
    """Merge a LoRA adapter or an ESFT result into its base: a full Hugging Face checkpoint.

    --out must be a new or empty directory, or (with --overwrite) a checkpoint moelab wrote; a directory
    holding anything else is never replaced.
    """
    from moelab.tune.run import merge_result

    Console().print(f"wrote {merge_result(base, result, out, overwrite=overwrite)}")
