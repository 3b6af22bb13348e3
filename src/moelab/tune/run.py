"""Fine-tuning runs: build a :class:`~moelab.train.loop.Job` for a method and train it with the same loop,
checkpoints, resume, metrics and report as pre-training.

=========  ==================================================  =====================================
method     trains                                              RUN_DIR result
=========  ==================================================  =====================================
full       every parameter (router bias: per ``[balance]``)    ``model/`` (Hugging Face checkpoint)
lora       LoRA A, B on the matched linears / expert weights   ``adapter/`` (PEFT format)
plora      LoRA, merged into the base every ``stage_steps``    ``model/`` (the update exceeds rank r)
esft       the selected routed experts only                    ``esft/`` (expert_cfg.json + experts)
=========  ==================================================  =====================================

DPO (:mod:`moelab.tune.dpo_job`) and GRPO (:mod:`moelab.tune.grpo_job`) are data with their own loss;
what they train is ``dpo.train`` / ``grpo.train`` (full, lora or esft), with that method's result.

``moelab finetune merge BASE RESULT --out DIR`` turns ``adapter/`` or ``esft/`` into a full checkpoint.

Checkpoints of the parameter-efficient methods hold the whole in-memory state (``state.safetensors``,
LoRA/ESFT tensors included) so that ``--resume`` continues exactly; the final result is small.
Under torchrun (``[parallel]``, as for pre-training) full and ESFT fine-tuning run on any dp × ep mesh and
LoRA on data-parallel ranks (ep = 1 when the routed experts carry adapters); checkpoints are sharded, and
rank 0 writes the final result from the last one. ESFT's selected experts train wherever their ep rank
is (:mod:`moelab.train.frozen_rows`); PeriodicLoRA runs in one process only.
When ``data.general_path`` names a token directory, its validation split is evaluated before the first
step and at every evaluation (``general_val_loss``, ``general_val_ppl``): the forgetting curve.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from moelab.common.atomic import CHECKPOINT, check_output_dir, write_text
from moelab.common.run_dir_hint import check_not_run_dir
from moelab.data.sft import load_sft
from moelab.data.tokenizer import load_tokenizer
from moelab.data.tokens import TokenData
from moelab.errors import CheckpointError, TrainingError
from moelab.interop.checkpoint import load as load_checkpoint_dir
from moelab.interop.checkpoint import save as save_model
from moelab.train.loop import Job, RunResult, check_device, fit
from moelab.train.run_dir import check_run_dir, note
from moelab.tune.config import FinetuneConfig
from moelab.tune.jobs import EsftJob, FullJob, LoraJob, PLoraJob
from moelab.tune.reference import load_reference


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts (shared tensors counted once)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def build_job(cfg: FinetuneConfig) -> tuple[Job, dict]:
    """Load the base model and the data, apply the method; returns the job and a summary dict."""
    base = Path(cfg.finetune.base)
    check_not_run_dir(base)
    if not (base / "config.json").is_file():
        raise CheckpointError(f"finetune.base {base} is not a checkpoint directory (no config.json); give the "
                              "directory written by `moelab train` (RUN_DIR/model) or a Hugging Face export")
    if not (base / "tokenizer.json").is_file():
        raise CheckpointError(f"{base} has no tokenizer.json; fine-tuning renders chat data with the base "
                              "model's tokenizer — copy it next to the weights")
    tc, dc = cfg.train, cfg.data
    torch.manual_seed(tc.seed)
    model = load_checkpoint_dir(base, dtype=torch.float32, **cfg.runtime.model_settings())
    base_params = count_params(model)[1]
    tokenizer = load_tokenizer(base)
    jobs = {"full": FullJob, "lora": LoraJob, "esft": EsftJob}
    if cfg.method == "dpo":
        from moelab.tune.dpo_job import load_preference_data

        train_data, val_data, stats = load_preference_data(cfg, tokenizer, model.config.vocab_size)
    elif cfg.method == "grpo":
        from moelab.tune.grpo_job import GRPO_JOBS, load_grpo_data

        train_data, val_data, stats = load_grpo_data(cfg, tokenizer)
        jobs = GRPO_JOBS
    else:
        train_data, val_data, stats = load_sft(
            dc.path, tokenizer, dc.seq_len, template=dc.template, val_path=dc.val_path,
            val_fraction=dc.val_fraction, packing=dc.packing, skip_malformed=dc.skip_malformed, seed=tc.seed,
            micro_per_step=tc.grad_accum)
    vocab = int(train_data.meta["vocab_size"])
    if vocab > model.config.vocab_size:
        raise TrainingError(f"the tokenizer of {base} has {vocab} tokens but the model only "
                            f"{model.config.vocab_size}; use the tokenizer the model was trained with")
    if len(val_data) == 0:
        raise TrainingError(f"{dc.path}: no validation examples; set data.val_path or raise data.val_fraction")
    extra = {}
    if dc.general_path:
        extra["general"] = TokenData(dc.general_path, "val")

    method = cfg.trains                                  # DPO and GRPO train as full / LoRA / ESFT
    summary = {"method": method, "base": str(base), "data": dc.path, "train_examples": train_data.meta["examples"],
               "val_examples": val_data.meta["examples"], "train_rows": len(train_data),
               "target_tokens": train_data.target_tokens, "skipped_lines": len(stats.skipped),
               "truncated_examples": stats.truncated, "dropped_examples": stats.no_target}
    common = dict(model=model, train_data=train_data, val_data=val_data, config_json=cfg.model_dump_json(indent=2),
                  tokenizer_file=base / "tokenizer.json", extra_evals=extra, kind=cfg.method)
    if method == "full":
        job = jobs["full"](**common)
    elif method in ("lora", "plora"):
        from moelab.tune.lora import apply_lora

        summary["adapted"] = len(apply_lora(model, cfg.lora).adapted)
        if method == "lora":
            job = jobs["lora"](**common, base=str(base), settings=cfg.lora)
        else:
            from moelab.tune.plora import PeriodicLoRA

            job = PLoraJob(**common, plora=PeriodicLoRA(model, cfg.plora))
    elif method == "esft":
        from moelab.tune.esft import apply_esft, read_expert_config

        expert_cfg = read_expert_config(cfg.esft.expert_config, model)
        apply_esft(model, expert_cfg)
        summary["experts_per_layer"] = {k: len(v) for k, v in expert_cfg["experts"].items()}
        job = jobs["esft"](**common, expert_cfg=expert_cfg)
    else:  # pragma: no cover (validated by the config)
        raise TrainingError(f"unknown method {method}")
    if cfg.method == "dpo":       # the reference: dpo.reference, or the base (adapters still zero) before any step
        ref = model if cfg.dpo.reference is None else load_reference(
            cfg.dpo.reference, base, "dpo", tokenizer, model.config.vocab_size, **cfg.runtime.model_settings())
        train_data.set_reference(ref)
        val_data.set_reference(ref)
        del ref
        summary.update(method="dpo", dpo=cfg.dpo.model_dump())
    if cfg.method == "grpo":      # the reference: frozen, from disk (LoRA / ESFT changed the policy in place)
        train_data.attach(model, load_reference(cfg.grpo.reference, base, "grpo", tokenizer,
                                                model.config.vocab_size, **cfg.runtime.model_settings()))
        summary.update(method="grpo", grpo=cfg.grpo.model_dump())
    summary["trainable_params"] = count_params(model)[0]
    summary["total_params"] = base_params      # of the base model (LoRA / ESFT copies not counted)
    return job, summary


def finetune(cfg: FinetuneConfig, run_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
             on_event=None, allow_config_change: bool = False) -> tuple[RunResult, dict]:
    """Fine-tune as configured; returns the run result and a summary (trainable parameters, data, sizes)."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume)         # before loading anything: a refused run costs nothing
    check_device(cfg.train)
    if cfg.method == "lora" and cfg.parallel.data_parallel == "auto":
        cfg.parallel.data_parallel = "ddp"     # torchrun: LoRA runs data-parallel with DDP (jobs.LoraJob)
    job, summary = build_job(cfg)
    note(f"data: {summary['train_examples']:,} train / {summary['val_examples']:,} val examples; "
         f"{summary['truncated_examples']:,} truncated and {summary['dropped_examples']:,} dropped (longer "
         f"than data.seq_len {cfg.data.seq_len}); {summary['skipped_lines']:,} malformed lines skipped")
    result = fit(job, cfg.train, cfg.balance, cfg.data.seq_len, run_dir, resume=resume, progress=progress,
                 on_event=on_event, allow_config_change=allow_config_change, parallel=cfg.parallel)
    if result.status == "finished" and os.environ.get("RANK", "0") == "0":    # torchrun: rank 0 writes
        out = {"lora": "adapter", "esft": "esft"}.get(cfg.trains, "model")
        summary["result"] = str(run_dir / out)
        summary["result_bytes"] = sum(f.stat().st_size for f in (run_dir / out).rglob("*") if f.is_file())
        summary["last_eval"] = result.last_eval
        if cfg.method == "grpo":
            summary["rewards"] = job.train_data.report()
        write_text(run_dir / "finetune.json", json.dumps(summary, indent=2, default=str))
    return result, summary


def merge_result(base: str | os.PathLike, result: str | os.PathLike, out: str | os.PathLike,
                 overwrite: bool = False) -> Path:
    """A full checkpoint from a base and a fine-tuning result (``adapter/`` or ``esft/``).

    ``out`` must be new, empty, or (with ``overwrite``) a checkpoint moelab wrote; it is checked before
    any work."""
    base, result, out = Path(base), Path(result), Path(out)
    for src, what in ((base, "base checkpoint"), (result, "fine-tuning result")):
        if out.exists() and src.exists() and out.resolve() == src.resolve():
            raise CheckpointError(f"--out {out} is the {what}; write the merged checkpoint to a new directory")
    check_output_dir(out, CHECKPOINT, overwrite)
    if (result / "adapter_config.json").is_file():
        from moelab.tune.lora import load_adapter, merge_lora

        model = load_checkpoint_dir(base, dtype=torch.float32)
        load_adapter(model, result)
        merge_lora(model)
        tok = base / "tokenizer.json"
        return save_model(model, out, tokenizer=tok if tok.is_file() else None, overwrite=overwrite)
    if (result / "expert_cfg.json").is_file():
        from moelab.tune.esft import merge_esft

        return Path(merge_esft(base, result, out, overwrite=overwrite) or out)
    raise CheckpointError(f"{result} is neither a LoRA adapter (adapter_config.json) nor an ESFT result "
                          "(expert_cfg.json); give RUN_DIR/adapter or RUN_DIR/esft")


__all__ = ["build_job", "count_params", "finetune", "merge_result"]
