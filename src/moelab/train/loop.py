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

import json
import math
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moelab.data.tokens import TokenData
from moelab.errors import TrainingError
from moelab.interop.atomic import CHECKPOINT, write_dir
from moelab.interop.checkpoint import load as load_checkpoint_dir
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.train.balance import Balancer
from moelab.train.compile import compile_dense_parts
from moelab.train.config import BalanceConfig, RunConfig, TrainConfig
from moelab.train.host_memory import keep_freed_host_memory
from moelab.train.run_dir import CHANGES, check_run_dir, open_run, reconcile_config, write_record
from moelab.train.schedule import LRSchedule
from moelab.train.state import latest_checkpoint, load_checkpoint, save_checkpoint


@dataclass
class RunResult:
    run_dir: Path
    step: int
    tokens: int
    status: str                 # "finished" | "interrupted"
    last_eval: dict
    checkpoint: Path | None


@dataclass
class Job:
    """What :func:`fit` trains.

    ``save_weights(model, dir)`` writes a checkpoint's weights into ``dir`` (default: a Hugging Face
    checkpoint in ``dir/model``); ``load_weights(model, ckpt_dir)`` restores them on ``--resume``.
    ``after_step(step, optimizer)`` runs after every optimizer step (PeriodicLoRA merges there) and
    ``schedule_step(step)`` maps the step to the LR schedule's step (PeriodicLoRA restarts it).
    ``finalize(model, run_dir)`` writes the final result; by default the last checkpoint's ``model/`` is
    copied to ``RUN_DIR/model``. ``extra_evals`` are more validation sets (e.g. ``"general"`` text for
    measuring forgetting), logged as ``{name}_val_loss`` etc. ``state``/``load_state`` carry a job's own
    small state (ints, floats) through checkpoints.
    """

    model: DeepSeekForCausalLM
    train_data: object                 # TokenData | SFTData: .batch(), .eval_batches(), .bytes_per_token
    val_data: object
    config_json: str
    tokenizer_file: Path | None = None
    extra_evals: dict = field(default_factory=dict)
    save_weights: Callable | None = None
    load_weights: Callable | None = None
    after_step: Callable | None = None
    schedule_step: Callable[[int], int] | None = None
    finalize: Callable | None = None
    state: Callable[[], dict] | None = None
    load_state: Callable[[dict], None] | None = None
    kind: str = "train"                # the progress bar's label


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (linear, embedding, expert weights), none on norms and
    biases. The routing bias is a buffer, so it is in no group at all."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def autocast_ctx(dtype: str, device: torch.device):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and exits.
    A second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class MetricsLog:
    """Appends JSON lines to metrics.jsonl and mirrors scalars to TensorBoard (if installed)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:
            self.tb = None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint step (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


IGNORE = -100


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over targets != −100 (0 with a graph when there are none)."""
    if not bool((y != IGNORE).any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def evaluate(model, data: TokenData, batch_size: int, seq_len: int, max_batches: int, dtype: str,
             balancer: Balancer | None = None) -> dict:
    """Validation loss (nats/token), perplexity, bits per byte and MaxVio_global."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ctx = balancer.measure() if balancer is not None else nullcontext()
    with ctx:
        for x, y in data.eval_batches(batch_size, seq_len, max_batches):
            with autocast_ctx(dtype, model.device):
                logits = model(x.to(model.device)).logits
            y = y.to(model.device)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum", ignore_index=IGNORE)
            total += float(loss)
            count += int((y != IGNORE).sum())
    model.train(was_training)
    if count == 0:
        raise TrainingError("the validation split is too small for one evaluation window; "
                            "lower data.seq_len or prepare more validation data")
    val_loss = total / count
    out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
           "val_bpb": val_loss / math.log(2) / data.bytes_per_token, "val_tokens": count}
    if balancer is not None:
        out.update(balancer.global_stats())
    return out


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          on_event: Callable[[str, dict], None] | None = None, allow_config_change: bool = False) -> RunResult:
    """Run (or resume) pre-training as configured; returns where it stopped."""
    tc, dc = cfg.train, cfg.data
    check_run_dir(Path(run_dir), resume)       # before any work: a refused run costs nothing
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if dc.seq_len > cfg.model.max_position_embeddings:
        raise TrainingError(f"data.seq_len {dc.seq_len} exceeds model.max_position_embeddings "
                            f"{cfg.model.max_position_embeddings}; lower data.seq_len (or extend the model's "
                            "context with YaRN rope_scaling)")
    train_data, val_data = TokenData(dc.path, "train"), TokenData(dc.path, "val")
    tok_vocab = int(train_data.meta["vocab_size"])
    if tok_vocab > cfg.model.vocab_size:
        raise TrainingError(f"the tokenizer in {dc.path} has {tok_vocab} tokens but model.vocab_size is "
                            f"{cfg.model.vocab_size}; raise model.vocab_size to at least {tok_vocab}")
    if tc.init_from:
        check_same_architecture(cfg.model, tc.init_from)
    torch.manual_seed(tc.seed)
    if tc.init_from:
        model = load_checkpoint_dir(tc.init_from, dtype=torch.float32, **runtime_settings(cfg.model))
    else:
        model = DeepSeekForCausalLM.from_config(cfg.model, seed=tc.seed)
    job = Job(model=model, train_data=train_data, val_data=val_data, config_json=cfg.model_dump_json(indent=2),
              tokenizer_file=Path(dc.path) / "tokenizer.json")
    return fit(job, tc, cfg.balance, dc.seq_len, run_dir, resume=resume, progress=progress, on_event=on_event,
               allow_config_change=allow_config_change)


#: ModelConfig fields that choose how the model computes, not what it is: they may differ from a
#: ``train.init_from`` checkpoint's (the run's [model] value is used).
RUNTIME_FIELDS = ("attn_impl", "expert_impl", "compile_experts", "initializer_range", "model_type",
                  "aux_loss_alpha", "seq_aux", "ep_size")


def runtime_settings(model_cfg) -> dict:
    return {k: getattr(model_cfg, k) for k in ("attn_impl", "expert_impl", "compile_experts")}


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
             for k in sorted(ours) if k not in RUNTIME_FIELDS and theirs.get(k) != ours.get(k)]
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise TrainingError(f"train.init_from {ckpt} has another architecture than [model]: {shown}. Make "
                            f"[model] describe the checkpoint (`moelab info {ckpt}` shows it), or drop "
                            "train.init_from")


def check_eval_data(val_data, batch_size: int, seq_len: int) -> None:
    """A validation split too small for one evaluation would fail at the first evaluation: fail now."""
    n = val_data.n_eval_windows(seq_len) if hasattr(val_data, "n_eval_windows") else len(val_data)
    if n == 0:
        where = getattr(val_data, "path", "the data")
        size = f" has {val_data.n_tokens} tokens, which" if hasattr(val_data, "n_tokens") else ""
        raise TrainingError(f"the validation split of {where}{size} is too small for one evaluation window of "
                            f"data.seq_len + 1 = {seq_len + 1} tokens; prepare the data with more "
                            "documents held out (moelab data prepare --val-docs N / --val-fraction F), or "
                            "lower data.seq_len")


def fit(job: Job, tc: TrainConfig, balance: BalanceConfig, seq_len: int, run_dir: str | Path,
        resume: bool = False, progress: bool = True,
        on_event: Callable[[str, dict], None] | None = None, allow_config_change: bool = False) -> RunResult:
    """The training loop: runs ``job`` for ``tc``'s steps, evaluating, logging and checkpointing.

    The run directory is checked, created and locked first (:mod:`moelab.train.run_dir`): a refused run
    changes nothing on disk."""
    run_dir = Path(run_dir)
    max_pos = getattr(job.model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise TrainingError(f"data.seq_len {seq_len} exceeds the model's max_position_embeddings {max_pos}; "
                            "lower data.seq_len")
    check_eval_data(job.val_data, tc.batch_size, seq_len)
    with open_run(run_dir, resume):
        return _fit(job, tc, balance, seq_len, run_dir, resume, progress, on_event, allow_config_change)


def _fit(job: Job, tc: TrainConfig, balance: BalanceConfig, seq_len: int, run_dir: Path, resume: bool,
         progress: bool, on_event, allow_config_change: bool) -> RunResult:
    if tc.threads:
        torch.set_num_threads(tc.threads)
    model, train_data, val_data = job.model, job.train_data, job.val_data
    if tc.keep_host_memory and model.device.type == "cpu":
        keep_freed_host_memory()   # 18% faster ~100M-parameter CPU step: no fresh pages every step
    model.train()
    if tc.compile:
        compile_dense_parts(model)
    balancer = Balancer(model, balance)
    # fused: one multi-tensor kernel per step (CPU and CUDA); 7x faster than the per-parameter loop
    # for ~100M fp32 parameters on the CPU (benchmarks/train_step.py notes)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=tc.betas, eps=tc.eps,
                                  fused=True)
    total_steps = tc.total_steps(seq_len)
    schedule = LRSchedule(total_steps=total_steps, peak_lr=tc.lr, schedule=tc.lr_schedule,
                          warmup_steps=min(tc.warmup_steps, total_steps - 1), min_lr_ratio=tc.min_lr_ratio,
                          milestones=tuple(tc.milestones), gamma=tc.gamma, decay_fraction=tc.decay_fraction)
    tokens_per_step = tc.batch_size * tc.grad_accum * seq_len
    tokenizer_file = job.tokenizer_file

    step, tokens, last_eval = 0, 0, {}
    if resume:
        ckpt = latest_checkpoint(run_dir)
        record_changes = reconcile_config(run_dir, job.config_json, int(ckpt.name.split("-")[1]),
                                          allow_config_change)
        state = load_checkpoint(ckpt, model, optimizer, job.load_weights)
        record_changes()
        step, tokens = int(state["step"]), int(state["tokens"])
        balancer._frozen = bool(state.get("bias_frozen", False))
        if job.load_state is not None:
            job.load_state(dict(state.get("job", {})))
        truncate_metrics(run_dir / "metrics.jsonl", step)
    else:   # a new run (open_run checked that nothing resumable is here): forget a run that never saved
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        (run_dir / CHANGES).unlink(missing_ok=True)
        write_record(run_dir, job.config_json)

    log = MetricsLog(run_dir)
    emit = on_event or (lambda kind, rec: None)
    last_ckpt: Path | None = latest_checkpoint(run_dir)

    def checkpoint() -> Path:
        bad = nonfinite_tensors(model)
        if bad:
            raise TrainingError(
                f"not saving step {step}: {len(bad)} tensor(s) hold NaN or inf (e.g. {bad[0]}). The last good "
                f"checkpoint is {last_ckpt or '(none yet)'}; try a lower train.lr or train.dtype = 'float32'")
        state = {"tokens": tokens, "bias_frozen": balancer._frozen, "total_steps": total_steps}
        if job.state is not None:
            state["job"] = job.state()
        return save_checkpoint(run_dir, step, model, optimizer, state, tc.keep_last, tokenizer_file,
                               job.save_weights)

    def run_eval() -> dict:
        out = {"step": step, "tokens": tokens, **evaluate(
            model, val_data, tc.batch_size, seq_len, tc.eval_batches, tc.dtype, balancer)}
        for name, data in job.extra_evals.items():
            extra = evaluate(model, data, tc.batch_size, seq_len, tc.eval_batches, tc.dtype)
            out.update({f"{name}_{k}": v for k, v in extra.items()})
        return out

    bar = _progress(progress, total_steps, step, job.kind)
    status = "finished"
    window_t, window_tokens, losses = time.perf_counter(), 0, []
    try:
        with _StopFlag() as stop, bar:
            if step == 0 and job.extra_evals:   # the starting point, to measure forgetting against
                first = run_eval()
                first.pop("expert_share", None)
                log.write(first)
                emit("eval", first)
            while step < total_steps:
                lr = schedule.apply(optimizer, job.schedule_step(step) if job.schedule_step else step)
                step_loss, step_aux = 0.0, 0.0
                for micro in range(tc.grad_accum):
                    x, y = train_data.batch(tc.batch_size, seq_len, step, micro, tc.seed)
                    with autocast_ctx(tc.dtype, model.device):
                        logits = model(x).logits
                    loss = lm_loss(logits, y)
                    aux = balancer.pop_aux_loss()
                    total = loss if aux is None else loss + aux
                    if not torch.isfinite(total.detach()):
                        raise TrainingError(
                            f"the loss became {float(total.detach())} at step {step + 1}; stopping. The last good "
                            f"checkpoint is {last_ckpt or '(none yet)'}. Try a lower train.lr, "
                            "train.dtype = 'float32', or a smaller train.grad_clip")
                    (total / tc.grad_accum).backward()
                    step_loss += float(loss.detach()) / tc.grad_accum
                    step_aux += (float(aux.detach()) if aux is not None else 0.0) / tc.grad_accum
                trainable = [p for p in model.parameters() if p.requires_grad]
                # max_norm=inf measures without clipping (the norm is checked, and logged, either way)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip if tc.grad_clip > 0 else math.inf)
                if not math.isfinite(float(grad_norm)):
                    raise TrainingError(
                        f"the gradient norm became {float(grad_norm)} at step {step + 1}; stopping before the update "
                        f"(the weights are unchanged). The last good checkpoint is {last_ckpt or '(none yet)'}. "
                        "Try a lower train.lr, more train.warmup_steps, or train.dtype = 'float32'")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += tokens_per_step
                window_tokens += tokens_per_step
                bal = balancer.step(tokens)
                if job.after_step is not None:
                    job.after_step(step, optimizer)
                losses.append(step_loss)
                if step % tc.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    rec = {"step": step, "tokens": tokens, "loss": sum(losses) / len(losses), "aux_loss": step_aux,
                           "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": window_tokens / (now - window_t),
                           "maxvio_batch": bal.get("maxvio_batch", 0.0),
                           "maxvio_batch_layers": bal.get("maxvio_batch_layers", [])}
                    log.write(rec)
                    emit("log", rec)
                    window_t, window_tokens, losses = now, 0, []
                    bar.update(rec)
                if step % tc.eval_every == 0 or step == total_steps:
                    last_eval = run_eval()
                    share = last_eval.pop("expert_share", None)
                    if share is not None:
                        _save_expert_load(run_dir, share, balancer.layer_ids)
                    log.write(last_eval)
                    emit("eval", last_eval)
                    bar.update(last_eval)
                if step % tc.ckpt_every == 0 or step == total_steps:
                    last_ckpt = checkpoint()
                elif stop.requested:
                    last_ckpt = checkpoint()
                if stop.requested:
                    status = "interrupted"
                    break
                bar.advance()
    finally:
        log.close()
        balancer.detach()
    if status == "finished":
        from moelab.train.report import write_report

        if job.finalize is not None:
            job.finalize(model, run_dir)
        elif last_ckpt is not None:  # the final model, where users look for it: RUN_DIR/model
            src = last_ckpt / "model"
            write_dir(run_dir / "model", lambda tmp: [shutil.copy2(f, tmp / f.name) for f in src.iterdir()],
                      kind=CHECKPOINT, overwrite=True)
        write_report(run_dir)
    return RunResult(run_dir, step, tokens, status, last_eval, last_ckpt)


def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of floating-point parameters and buffers holding NaN or inf."""
    return [k for k, v in model.state_dict().items()
            if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())]


def _save_expert_load(run_dir: Path, share: np.ndarray, layer_ids: list[int]) -> None:
    tmp = run_dir / "expert_load.tmp.npy"
    np.save(tmp, share.astype(np.float64))
    tmp.replace(run_dir / "expert_load.npy")
    (run_dir / "expert_load_layers.json").write_text(json.dumps(layer_ids))


class _progress:
    """A rich progress bar showing step, loss, tokens/s, MaxVio and ETA (no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, start: int, label: str = "train"):
        self.enabled = enabled
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        self.fields: dict = {}

    def __enter__(self):
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)

    def update(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.fields.update(rec)
        f = self.fields
        parts = []
        if "loss" in f:
            parts.append(f"loss {f['loss']:.3f}")
        if "val_loss" in f:
            parts.append(f"val {f['val_loss']:.3f}")
        if "tokens_per_s" in f:
            parts.append(f"{f['tokens_per_s'] / 1000:.1f}k tok/s")
        if "maxvio_batch" in f:
            parts.append(f"MaxVio {f['maxvio_batch']:.2f}")
        self.progress.update(self.task, info=" · ".join(parts))

    def advance(self) -> None:
        if self.enabled:
            self.progress.advance(self.task)
