"""The pre-training loop.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size × seq_len`` tokens:

    for each micro-batch:  loss = CE(model(x), y) + aux;  (loss / grad_accum).backward()
    clip gradients; set the LR for this step; AdamW step
    balancer.step()        # loss-free bias update from this step's loads, MaxVio_batch

Batches are a pure function of (seed, step, micro-batch) (:meth:`TokenData.batch`), so a resumed run
sees exactly the batches an uninterrupted one would: with fp32 on the CPU, the losses after a
resume equal those of a run that never stopped (tested).

Writes into RUN_DIR: ``metrics.jsonl`` (one JSON object per logged step / evaluation), TensorBoard
events under ``tb/``, checkpoints under ``checkpoints/``, and at the end ``model/`` (the final model, a
Hugging Face checkpoint with its tokenizer), ``expert_load.npy`` and ``report/``.

The loop itself (:func:`fit`) trains a :class:`Job`: a model, its data, and how its weights are saved.
:func:`train` builds the pre-training job; :mod:`moelab.tune.run` builds fine-tuning jobs (full, LoRA,
PeriodicLoRA, ESFT) that differ only in which parameters train, what happens after each step and what
is written at the end. Targets equal to −100 carry no loss (SFT prompts and padding).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch

from moelab.common.device import resolve_device
from moelab.config import RUNTIME_FIELDS, runtime_settings
from moelab.data.tokens import TokenData
from moelab.dist.checkpoint import is_sharded, load_sharded, save_sharded
from moelab.dist.coord import any_rank, on_main
from moelab.dist.mesh import ParallelConfig, ParallelState, init_parallel
from moelab.dist.wrap import all_mean, parallelize
from moelab.errors import CheckpointError, TrainingError
from moelab.interop.checkpoint import load as load_checkpoint_dir
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.train.balance import Balancer
from moelab.train.checkpointing import enable_activation_checkpointing
from moelab.train.compile import compile_model
from moelab.train.config import BalanceConfig, RunConfig, TrainConfig
from moelab.train.evaluation import check_eval_data, evaluate
from moelab.train.frozen_rows import FrozenRows
from moelab.train.host_memory import keep_freed_host_memory
from moelab.train.interrupt import StopFlag
from moelab.train.job import Job, RunResult
from moelab.train.metrics import MetricsLog, NoLog, ProgressBar, save_expert_load, truncate_metrics
from moelab.train.run_dir import CHANGES, check_run_dir, open_run, reconcile_config, write_record
from moelab.train.schedule import LRSchedule
from moelab.train.state import latest_checkpoint, load_checkpoint, save_checkpoint
from moelab.train.step import build_optimizer, lm_loss, nonfinite_tensors, train_step

__all__ = ["Job", "RunResult", "fit", "lm_loss", "train"]


def fit(job: Job, tc: TrainConfig, balance: BalanceConfig, seq_len: int, run_dir: str | Path,
        resume: bool = False, progress: bool = True,
        on_event: Callable[[str, dict], None] | None = None, allow_config_change: bool = False,
        parallel: ParallelConfig | None = None) -> RunResult:
    """Train ``job`` for ``tc``'s steps, evaluating, logging and checkpointing; returns where it stopped.

    The run directory is checked, created and locked first (:mod:`moelab.train.run_dir`): a refused run
    changes nothing on disk. ``on_event(kind, record)`` sees every logged ("log") and evaluation ("eval")
    record. Under torchrun (``parallel``: the ``[parallel]`` section) rank 0 owns the run directory, the
    log, the progress bar and the report; every rank trains its share (:mod:`moelab.dist`)."""
    run_dir = Path(run_dir)
    device = check_device(tc)
    check_context(seq_len, job.model.config)
    for data in (job.val_data, *job.extra_evals.values()):
        check_eval_data(data, tc.batch_size, seq_len)
    n_experts = job.model.config.n_routed_experts or 0
    ps = init_parallel(parallel or ParallelConfig(), device, n_experts, tc.batch_size)
    with ExitStack() as held:
        on_main(ps, lambda: held.enter_context(open_run(run_dir, resume)))
        trainer = Trainer(job, tc, balance, seq_len, run_dir, on_event or (lambda kind, rec: None), ps)
        if resume:
            trainer.restore(allow_config_change)
        else:   # a new run (open_run checked that nothing resumable is here): forget a run that never saved
            on_main(ps, lambda: start_record(run_dir, job.config_json))
        status = trainer.run(progress and ps.is_main)
        if status == "finished":
            on_main(ps, lambda: finish(job, run_dir, trainer.last_ckpt))
        return RunResult(run_dir, trainer.step, trainer.tokens, status, trainer.last_eval, trainer.last_ckpt)


def start_record(run_dir: Path, config_json: str) -> None:
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    (run_dir / CHANGES).unlink(missing_ok=True)
    write_record(run_dir, config_json)


def finish(job: Job, run_dir: Path, last_ckpt: Path | None) -> None:
    """The final model and the report (rank 0): a sharded checkpoint is consolidated into RUN_DIR/model."""
    from moelab.train.report import write_report

    if last_ckpt is not None and is_sharded(last_ckpt):
        job.finalize_sharded(last_ckpt, run_dir)
    else:
        job.finalize(job.model, run_dir, last_ckpt)
    write_report(run_dir)


class Trainer:
    """The state of one run (model, optimizer, schedule, balancer, counters) and its small steps."""

    def __init__(self, job: Job, tc: TrainConfig, balance: BalanceConfig, seq_len: int, run_dir: Path,
                 emit: Callable[[str, dict], None], ps: ParallelState | None = None):
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.job, self.tc, self.seq_len, self.run_dir, self.emit = job, tc, seq_len, run_dir, emit
        self.ps = ps = ps or ParallelState.single(check_device(tc))
        model = self.model = place_model(job.model, tc, ps.device)
        if tc.keep_host_memory and model.device.type == "cpu":
            keep_freed_host_memory()   # 18% faster ~100M-parameter CPU step: no fresh pages every step
        model.train()
        if tc.activation_checkpointing:
            enable_activation_checkpointing(model)
        if tc.compile:
            compile_model(model, tc.compile)
        self.balancer = Balancer(model, balance)
        masks = job.prepare_parallel(model, ps) if ps.distributed else {}
        parallelize(model, ps)
        self.frozen_rows = FrozenRows(masks).attach(model, ps)
        self.optimizer = build_optimizer(model, tc, self.frozen_rows)
        self.total_steps = total = tc.total_steps(seq_len)
        self.schedule = LRSchedule(total_steps=total, peak_lr=tc.lr, schedule=tc.lr_schedule,
                                   warmup_steps=min(tc.warmup_steps, total - 1), min_lr_ratio=tc.min_lr_ratio,
                                   milestones=tuple(tc.milestones), gamma=tc.gamma, decay_fraction=tc.decay_fraction)
        self.tokens_per_step = tc.batch_size * tc.grad_accum * seq_len
        self.step, self.tokens, self.last_eval = 0, 0, {}
        self.last_ckpt: Path | None = latest_checkpoint(run_dir)

    # -- resume and checkpoints ---------------------------------------------------------------------
    def restore(self, allow_config_change: bool) -> None:
        """Continue from the newest checkpoint (settings checked against the run's record first)."""
        ckpt, ps = latest_checkpoint(self.run_dir), self.ps
        record_changes = on_main(ps, lambda: reconcile_config(self.run_dir, self.job.config_json,
                                                               int(ckpt.name.split("-")[1]), allow_config_change))
        if is_sharded(ckpt):
            state = load_sharded(ckpt, self.model, self.optimizer, ps)
        elif ps.distributed:
            raise CheckpointError(f"{ckpt} was written by a one-process run; a torchrun job resumes only from "
                                  "sharded checkpoints. Resume it with plain `moelab train --resume`, or start a "
                                  f"new run from its weights with train.init_from = '{ckpt / 'model'}'")
        else:
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.job.load_weights)
        on_main(ps, record_changes)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.balancer.load_state_dict(state)
        self.job.load_state_dict(dict(state.get("job", {})))
        on_main(self.ps, lambda: truncate_metrics(self.run_dir / "metrics.jsonl", self.step))

    def checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` (never with non-finite weights: the last checkpoint stays good)."""
        bad = nonfinite_tensors(self.model)
        if any_rank(self.ps, bool(bad)):
            bad = bad or ["(on another rank)"]
            raise TrainingError(
                f"not saving step {self.step}: {len(bad)} tensor(s) hold NaN or inf (e.g. {bad[0]}). The last "
                f"good checkpoint is {self.last_ckpt or '(none yet)'}; try a lower train.lr or train.dtype = "
                "'float32'")
        state = {"tokens": self.tokens, "total_steps": self.total_steps, "job": self.job.state_dict(),
                 **self.balancer.state_dict()}
        if self.ps.distributed:
            self.last_ckpt = save_sharded(self.run_dir, self.step, self.model, self.optimizer, self.ps, state,
                                          self.tc.keep_last, tokenizer=self.job.tokenizer_file)
        else:
            self.last_ckpt = save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state,
                                             self.tc.keep_last, save_weights=self.job.save_weights)
        return self.last_ckpt

    # -- evaluation and logging ---------------------------------------------------------------------
    def evaluate(self) -> dict:
        tc = self.tc
        out = {"step": self.step, "tokens": self.tokens, **evaluate(
            self.model, self.job.val_data, tc.batch_size, self.seq_len, tc.eval_batches, tc.dtype, self.balancer,
            self.ps)}
        for name, data in self.job.extra_evals.items():
            extra = evaluate(self.model, data, tc.batch_size, self.seq_len, tc.eval_batches, tc.dtype, ps=self.ps)
            out.update({f"{name}_{k}": v for k, v in extra.items()})
        return out

    def log_eval(self, log: MetricsLog, bar: ProgressBar, initial: bool = False) -> None:
        """Evaluate, log and show; ``initial``: the starting point of a fine-tuning run (not a result)."""
        rec = self.evaluate()
        share = rec.pop("expert_share", None)
        log.write(rec)
        self.emit("eval", rec)
        if initial:
            return
        if share is not None and self.ps.is_main:     # the heatmap follows the latest evaluation
            save_expert_load(self.run_dir, share, self.balancer.layer_ids)
        self.last_eval = rec
        bar.update(rec)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, progress: bool) -> str:
        """Train to the last step; "finished", or "interrupted" (Ctrl-C / SIGTERM, after a checkpoint)."""
        tc, total = self.tc, self.total_steps
        ps = self.ps
        log = MetricsLog(self.run_dir) if ps.is_main else NoLog()
        bar = ProgressBar(progress, total, self.step, self.job.kind)
        window_t, window_tokens, losses = time.perf_counter(), 0, []
        try:
            with StopFlag() as stop, bar:
                if self.step == 0 and self.job.extra_evals:   # the starting point, to measure forgetting against
                    self.log_eval(log, bar, initial=True)
                while self.step < total:
                    lr = self.schedule.apply(self.optimizer, self.job.schedule_step(self.step))
                    stats = train_step(self.model, self.job.train_data, self.balancer, self.optimizer, tc,
                                       self.seq_len, self.step, self.last_ckpt, ps, self.frozen_rows)
                    if ps.distributed:    # the job's mean losses and metrics, and an interrupt seen by any rank
                        keys = sorted(stats.extra)
                        stats.loss, stats.aux_loss, stopping, *vals = all_mean(
                            [stats.loss, stats.aux_loss, float(stop.requested), *(stats.extra[k] for k in keys)], ps)
                        stats.extra = dict(zip(keys, vals, strict=True))
                        if stopping > 0:
                            stop.requested = True
                    self.step += 1
                    self.tokens += self.tokens_per_step
                    window_tokens += self.tokens_per_step
                    bal = self.balancer.step(self.tokens)
                    self.job.after_step(self.step, self.optimizer)
                    losses.append(stats.loss)
                    if self.step % tc.log_every == 0 or self.step == total:
                        now = time.perf_counter()
                        rec = {"step": self.step, "tokens": self.tokens, "loss": sum(losses) / len(losses),
                               "aux_loss": stats.aux_loss, "lr": lr, "grad_norm": stats.grad_norm,
                               "tokens_per_s": window_tokens / (now - window_t),
                               "maxvio_batch": bal.get("maxvio_batch", 0.0),
                               "maxvio_batch_layers": bal.get("maxvio_batch_layers", []), **stats.extra}
                        log.write(rec)
                        self.emit("log", rec)
                        window_t, window_tokens, losses = now, 0, []
                        bar.update(rec)
                    if self.step % tc.eval_every == 0 or self.step == total:
                        self.log_eval(log, bar)
                    if self.step % tc.ckpt_every == 0 or self.step == total or stop.requested:
                        self.checkpoint()
                    if stop.requested:
                        return "interrupted"
                    bar.advance()
        finally:
            log.close()
            self.balancer.detach()
        return "finished"


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          on_event: Callable[[str, dict], None] | None = None, allow_config_change: bool = False) -> RunResult:
    """Run (or resume) pre-training as configured; returns where it stopped."""
    tc, dc = cfg.train, cfg.data
    check_run_dir(Path(run_dir), resume)       # before any work: a refused run costs nothing
    check_device(tc)
    check_context(dc.seq_len, cfg.model)      # before loading anything
    train_data, val_data, extra = open_data(dc)
    tok_vocab = int(train_data.meta["vocab_size"])
    if tok_vocab > cfg.model.vocab_size:
        raise TrainingError(f"the tokenizer in {train_data.path} has {tok_vocab} tokens but model.vocab_size is "
                            f"{cfg.model.vocab_size}; raise model.vocab_size to at least {tok_vocab}")
    if tc.init_from:
        check_same_architecture(cfg.model, tc.init_from)
    torch.manual_seed(tc.seed)
    if tc.init_from:
        model = load_checkpoint_dir(tc.init_from, dtype=torch.float32, **runtime_settings(cfg.model))
    else:
        model = DeepSeekForCausalLM.from_config(cfg.model, seed=tc.seed)
    job = Job(model=model, train_data=train_data, val_data=val_data, config_json=cfg.model_dump_json(indent=2),
              tokenizer_file=Path(train_data.path) / "tokenizer.json", extra_evals=extra)
    return fit(job, tc, cfg.balance, dc.seq_len, run_dir, resume=resume, progress=progress, on_event=on_event,
               allow_config_change=allow_config_change, parallel=cfg.parallel)


def open_data(dc) -> tuple[object, TokenData, dict[str, TokenData]]:
    """(train data, validation data, extra validation sets) of ``[data]``: one token directory, or a
    weighted mixture (validated on its first source; the others' val splits as extra sets)."""
    if not dc.mixture:
        return TokenData(dc.path, "train"), TokenData(dc.path, "val"), {}
    from moelab.data.tokens.mixture import MixtureData

    sources = {name: (m.path, m.weight) for name, m in dc.mixture.items()}
    train_data = MixtureData(sources, "train")
    names = list(sources)
    return (train_data, TokenData(sources[names[0]][0], "val"),
            {name: TokenData(sources[name][0], "val") for name in names[1:]})


def check_device(tc: TrainConfig) -> torch.device:
    """``train.device`` on this machine (``auto``: the GPU when there is one), or a one-line error."""
    return torch.device(resolve_device(tc.device, "train.device ="))


def place_model(model: torch.nn.Module, tc: TrainConfig, device: torch.device | None = None) -> torch.nn.Module:
    """Move ``model`` to ``device`` (default ``train.device``) and, for ``weights_dtype = 'bfloat16'``, cast its
    weights (the router's fp32 buffers stay fp32); in place, before the optimizer sees the parameters."""
    model.to(device if device is not None else check_device(tc))
    if tc.weights_dtype == "bfloat16":
        model.to(torch.bfloat16)
    return model


def check_context(seq_len: int, model_cfg) -> None:
    """``data.seq_len`` must fit the model's context (``eval ppl`` would refuse the result later)."""
    if seq_len > model_cfg.max_position_embeddings:
        raise TrainingError(f"data.seq_len {seq_len} exceeds model.max_position_embeddings "
                            f"{model_cfg.max_position_embeddings}; lower data.seq_len (or extend the model's "
                            "context with YaRN rope_scaling)")


#: ModelConfig fields that may differ from a ``train.init_from`` checkpoint's (the run's [model] value is
#: used): the runtime settings, and fields that do not change what the loaded model computes.
MAY_DIFFER = (*RUNTIME_FIELDS, "initializer_range", "model_type", "aux_loss_alpha", "seq_aux", "ep_size")


def check_same_architecture(model_cfg, checkpoint: str | Path) -> None:
    """Refuse a ``train.init_from`` checkpoint whose architecture differs from the run's ``[model]``
    (the record would describe a model that was not trained)."""
    from moelab.interop.hf_config import read_config_json

    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise TrainingError(f"train.init_from {ckpt} is not a checkpoint directory; give one written by "
                            "`moelab init`, `moelab train` (RUN_DIR/model) or a Hugging Face export")
    theirs = read_config_json(ckpt).model_dump()
    ours = model_cfg.model_dump()
    diffs = [f"{k} {theirs.get(k)!r} (checkpoint) vs {ours.get(k)!r} ([model])"
             for k in sorted(ours) if k not in MAY_DIFFER and theirs.get(k) != ours.get(k)]
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise TrainingError(f"train.init_from {ckpt} has another architecture than [model]: {shown}. Make "
                            f"[model] describe the checkpoint (`moelab info {ckpt}` shows it), or drop "
                            "train.init_from")


