"""GRPO as data that owns its loss: each sample batch is drawn from the policy itself, scored by rule, and
trained on for μ optimizer steps by the one training loop (:func:`moelab.train.loop.fit`).

Legend: P prompts per sample batch, G completions per prompt, R = P·G rows = ``batch_size × grad_accum``
(a micro-batch holds whole groups), T = seq_len, μ = ``grpo.iterations``.

    data = GRPOData(tasks, settings, reward, seq_len, pad, eos, rows_per_step=R)
    data.attach(policy, reference)
    rows = data.batch(B, T, step, micro, seed)    # {"x", "y" [B, T], "ref", "old" [B, T], "reward" [B], "row" [B]}
    loss, metrics = data.loss_fn(logits_BTV, rows)

Optimizer step s trains on sample batch k = s // μ. Its first step (s = kμ) samples: P prompts (epoch
order seeded by ``seed``), G completions of each from the current policy (seeded from ``(seed, k)``),
rewards, and the reference's token log-probabilities (:mod:`moelab.tune.grpo_rollout`). π_old — the
policy that sampled — is the policy of that first step, so its log-probabilities are that step's own
forward (detached; the ratio is exactly 1 there) and are kept for the μ − 1 steps after it. The batch
(old log-probabilities included) is part of the job's checkpoint state, so a resume in the middle of a
sample batch continues exactly; sampling again would draw from a policy that already moved.

Logged per step (the sample batch's, besides the loss): ``reward_mean``, ``reward_std``,
``zero_var_groups`` (fraction of groups whose rewards are all equal: no learning signal), ``completion_len``,
``truncated`` (no EOS within ``max_new_tokens``), ``reward_errors`` / ``reward_timeouts`` (scored 0), and the
loss's ``kl`` (k3, mean per completion token) and ``clip_fraction``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moelab.data.epochs import epoch_indices
from moelab.errors import DataError
from moelab.infer.sampling import SamplingConfig
from moelab.train.run_dir import note
from moelab.tune.grpo_loss import group_advantages, grpo_loss
from moelab.tune.grpo_rollout import IGNORE, layout, model_token_logps, sample_completions, token_logps
from moelab.tune.rewards import RuleReward

_TOTALS = ("samples", "reward_errors", "reward_timeouts")


@dataclass
class PromptTask:
    """One prompt of the GRPO data: its generation prompt ids, its JSON row (reference / tests), its line."""

    ids: list[int]
    row: dict
    where: str


def batch_seed(seed: int, k: int) -> int:
    """The sampling seed of sample batch ``k``."""
    return int(np.random.default_rng([seed, k, 0x4752504F]).integers(2**62))      # "GRPO"


class GRPOData:
    """The training interface of the loop for GRPO (module docstring)."""

    def __init__(self, tasks: list[PromptTask], settings, reward: RuleReward, seq_len: int, pad: int, eos: int,
                 tokenizer, rows_per_step: int, dtype: str = "float32", meta: dict | None = None):
        if not tasks:
            raise DataError("no prompts in this split")
        g = settings.group
        if rows_per_step % g:
            raise DataError(f"train.batch_size × train.grad_accum ({rows_per_step}) must be a multiple of "
                            f"grpo.group ({g})")
        self.tasks, self.s, self.reward, self.tokenizer = tasks, settings, reward, tokenizer
        self.seq_len, self.pad, self.eos, self.dtype = seq_len, pad, eos, dtype
        self.rows, self.prompts_per_batch = rows_per_step, rows_per_step // g
        self.meta = dict(meta or {}, examples=len(tasks))
        self.bytes_per_token = 1.0
        self.target_tokens = 0               # drawn as training goes
        self.policy = self.reference = None
        self.buf: dict | None = None
        self.totals = {k: 0 for k in _TOTALS}
        self.first_problem = ""

    def __len__(self) -> int:
        return len(self.tasks)

    def attach(self, policy, reference) -> None:
        """The model being trained (it samples) and the frozen reference (KL)."""
        self.policy, self.reference = policy, reference

    # -- sampling -----------------------------------------------------------------------------------
    def sample(self, k: int, seed: int) -> None:
        """Draw, score and lay out sample batch ``k`` (module docstring)."""
        if self.policy is None or self.reference is None:
            raise RuntimeError("GRPOData.attach(policy, reference) first")
        s, G = self.s, self.s.group
        idx = epoch_indices(len(self.tasks), k * self.prompts_per_batch, self.prompts_per_batch, seed, salt=0x4752)
        tasks = [self.tasks[i] for i in idx]
        sampling = SamplingConfig(temperature=s.temperature, top_p=s.top_p)
        roll = sample_completions(self.policy, [t.ids for t in tasks], G, sampling, s.max_new_tokens, self.eos,
                                  self.pad, batch_seed(seed, k), s.gen_batch)
        texts = [self.tokenizer.decode([t for t in c if t != self.eos], skip_special_tokens=True).strip()
                 for c in roll.tokens]
        rows = [t.row for t in tasks for _ in range(G)]
        outcome = self.reward(texts, rows)
        x, y = layout([t.ids for t in tasks for _ in range(G)], roll.tokens, self.seq_len, self.pad)
        device = next(self.policy.parameters()).device
        self.reference.to(device)
        ref = model_token_logps(self.reference, x, y, max(G, min(len(x), 16)), self.dtype)
        self.set_samples(k, x, y, ref, torch.tensor(outcome.rewards, dtype=torch.float64),
                         truncated=float(np.mean(roll.truncated)), errors=outcome.errors, timeouts=outcome.timeouts)
        if outcome.first_problem and not self.first_problem:
            self.first_problem = outcome.first_problem
            note(f"grpo: {outcome.first_problem} (scored 0; reward_errors / reward_timeouts count them)")

    def set_samples(self, k: int, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor, rewards: torch.Tensor,
                    old: torch.Tensor | None = None, truncated: float = 0.0, errors: int = 0,
                    timeouts: int = 0) -> None:
        """Make ``(x, y, ref, rewards)`` sample batch ``k`` (``old``: π_old's token log-probabilities, NaN
        rows = this step's forward). Also the way to train on a fixed batch (tests)."""
        R = x.shape[0]
        if R != self.rows or tuple(y.shape) != tuple(x.shape) or tuple(ref.shape) != tuple(x.shape):
            raise DataError(f"a sample batch is {self.rows} rows of x, y, ref [R, T] (got {tuple(x.shape)}, "
                            f"{tuple(y.shape)}, {tuple(ref.shape)})")
        r = rewards.to(torch.float64)
        _, zero_var = group_advantages(r, self.s.group)
        lengths = (y != IGNORE).sum(-1).double()
        stats = {"reward_mean": float(r.mean()), "reward_std": float(r.std(unbiased=False)),
                 "zero_var_groups": zero_var, "completion_len": float(lengths.mean()), "truncated": truncated,
                 "reward_errors": float(errors), "reward_timeouts": float(timeouts)}
        old = torch.full(x.shape, float("nan")) if old is None else old.float()
        self.buf = {"k": k, "x": x, "y": y, "ref": ref.float(), "old": old, "reward": r, "stats": stats}
        self.totals["samples"] += R
        self.totals["reward_errors"] += errors
        self.totals["reward_timeouts"] += timeouts

    # -- the loop's interface -----------------------------------------------------------------------
    def batch(self, batch_size: int, seq_len: int, step: int, micro: int = 0, seed: int = 0) -> dict:
        if seq_len != self.seq_len:
            raise DataError(f"GRPO rows were set up for seq_len {self.seq_len}, not {seq_len}")
        k = step // self.s.iterations
        if self.buf is None or self.buf["k"] != k:
            if step % self.s.iterations:
                raise DataError(f"step {step + 1} is inside sample batch {k}, which this run does not hold (was "
                                "grpo.iterations changed on resume?); resume from a checkpoint at a batch boundary")
            self.sample(k, seed)
        rows = slice(micro * batch_size, (micro + 1) * batch_size)
        if rows.stop > self.rows:
            raise DataError(f"micro-batch {micro} of {batch_size} rows is past the {self.rows} rows of a sample batch")
        b = self.buf
        return {"x": b["x"][rows].clone(), "y": b["y"][rows].clone(), "ref": b["ref"][rows].clone(),
                "old": b["old"][rows].clone(), "reward": b["reward"][rows].clone(),
                "row": torch.arange(self.rows)[rows]}

    def loss_fn(self, logits_RTV: torch.Tensor, rows: dict) -> tuple[torch.Tensor, dict]:
        """The GRPO loss of a micro-batch (whole groups) and the metrics of the module docstring."""
        dev = logits_RTV.device
        y = rows["y"].to(dev)
        logp = token_logps(logits_RTV, y)
        old = rows["old"].to(dev, logp.dtype)
        fresh = torch.isnan(old).any(-1)
        if bool(fresh.any()):           # the first step of a sample batch: π_old is this very forward
            old = torch.where(fresh[:, None], logp.detach(), old)
            if self.buf is not None:
                self.buf["old"][rows["row"][fresh.cpu()]] = old[fresh].float().cpu()
        s = self.s
        stats = grpo_loss(logp, old, rows["ref"].to(dev, logp.dtype), y != IGNORE,
                          rows["reward"].to(dev, logp.dtype), s.group, s.clip_eps, s.beta)
        extra = dict(self.buf["stats"]) if self.buf is not None else {}
        return stats.loss, {**extra, "kl": stats.kl, "clip_fraction": stats.clipped}

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The current sample batch (π_old included) and the run's reward totals."""
        out = {"totals": dict(self.totals), "first_problem": self.first_problem}
        if self.buf is not None:
            out["buffer"] = {k: v for k, v in self.buf.items()}
        return out

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        self.totals.update({k: int(v) for k, v in state.get("totals", {}).items()})
        self.first_problem = str(state.get("first_problem", ""))
        buf = state.get("buffer")
        self.buf = None if buf is None else {**buf, "k": int(buf["k"]), "stats": dict(buf["stats"])}

    def report(self) -> dict:
        """What the run's rewards met: samples drawn, rewards that raised or timed out (scored 0)."""
        return {**self.totals, "first_problem": self.first_problem}


__all__ = ["GRPOData", "PromptTask", "batch_seed"]
