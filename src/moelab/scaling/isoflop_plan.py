"""The plan of an IsoFLOP sweep (:mod:`moelab.scaling.isoflop`): its settings, the model shapes per
budget, and the training config of each run.

**Models.** Dense by default: MHA with ``default_heads(d)``, a SwiGLU FFN of width ``8d/3`` (rounded to
a multiple of 8), so the non-embedding parameters are ``≈ 12·L·d²`` as the formula assumes. With
``moe=True``: 8 routed experts (top-2, sigmoid, loss-free balancing) + 1 shared expert, each of width
``8d/9``, so the *activated* FFN matches the dense one and M is unchanged. M (the paper's formula) sets
D for both; the measured ``M_active`` (:func:`~moelab.scaling.laws.config_flops`) is recorded too.

**Shapes per budget.** The candidate grid is every L in ``layers`` and d in ``widths`` (multiples of
``width_multiple``). Shapes with fewer than ``min_steps`` optimizer steps at that budget are dropped.
``sizes`` target Ms are log-spaced over the remaining range (or over ``10^±span`` around the paper's
``M_opt(C)``, when ``span`` is set), each mapped to the unused grid shape minimising
``|ln(M/target)| + 0.5·|ln((d/L)/aspect)|``: at tiny scale the loss depends on the shape as well as on M
(8 wide and 4 deep is much worse than 32 wide and 1 deep), so the sweep keeps to one shape family.

**Hyper-parameters** (``hparams``): ``"fixed"`` (the default) uses ``lr`` and ``batch_size`` for every
run — the DeepSeek laws were fit between 1e17 and 2e19 FLOPs and tiny budgets lie many decades below;
``"laws"`` uses ``η_opt(C)`` and ``B_opt(C)/seq_len`` sequences per budget. Both use DeepSeek LLM's
multi-step schedule (×0.316 at 80% and 90%) with ``warmup_fraction`` of the steps as warm-up, AdamW
(0.9, 0.95), weight decay 0.1, clip 1.0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from moelab.errors import ConfigError
from moelab.scaling.laws import M_OPT, check_budget, non_embedding_flops
from moelab.scaling.shapes import default_heads, pick_shape


@dataclass
class SweepSettings:
    """How the sweep is run (see the module docstring)."""

    budgets: list[float]
    sizes: int = 5
    layers: tuple[int, int] = (2, 6)
    widths: tuple[int, int] = (32, 192)
    width_multiple: int = 16
    seq_len: int = 128
    aspect: float = 32.0
    span: float | None = None
    hparams: Literal["fixed", "laws"] = "fixed"
    lr: float = 3e-3
    batch_size: int = 16
    warmup_fraction: float = 0.05
    min_steps: int = 20
    moe: bool = False
    eval_tokens: int = 131072
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = None

    def __post_init__(self):
        self.budgets = sorted({check_budget(c) for c in self.budgets})
        self.layers, self.widths = tuple(self.layers), tuple(self.widths)
        p = []
        if not self.budgets:
            p.append("give at least one budget, e.g. --budgets 1e11,3e11,1e12")
        if self.sizes < 3:
            p.append(f"--sizes must be at least 3 to fit a parabola (got {self.sizes})")
        if len(self.layers) != 2 or not 1 <= self.layers[0] <= self.layers[1]:
            p.append(f"--layers must be MIN,MAX with 1 <= MIN <= MAX (got {self.layers})")
        if self.width_multiple <= 0 or self.width_multiple % 2:
            p.append(f"--width-multiple must be a positive even number (got {self.width_multiple})")
        elif len(self.widths) != 2 or not 0 < self.widths[0] <= self.widths[1] \
                or self.widths[1] // self.width_multiple * self.width_multiple < max(self.widths[0], 2):
            p.append(f"--widths must be MIN,MAX with 0 < MIN <= MAX and a multiple of {self.width_multiple} "
                     f"between them (got {self.widths})")
        if self.seq_len < 2:
            p.append(f"--seq-len must be at least 2 (got {self.seq_len})")
        if self.hparams not in ("fixed", "laws"):
            p.append(f"--hparams must be 'fixed' or 'laws' (got {self.hparams!r})")
        if not self.lr > 0 or self.batch_size < 1 or self.min_steps < 1 or self.eval_tokens < self.seq_len:
            p.append("--lr must be positive, --batch-size and --min-steps at least 1, --eval-tokens at least "
                     "--seq-len")
        if not 0 <= self.warmup_fraction < 1:
            p.append(f"warmup_fraction must be in [0, 1) (got {self.warmup_fraction})")
        if self.span is not None and not self.span > 0:
            p.append(f"--span must be positive (got {self.span})")
        if self.aspect <= 0:
            p.append(f"--aspect must be positive (got {self.aspect})")
        if p:
            raise ConfigError("; ".join(p))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PlannedRun:
    """One training run of the sweep. ``tokens = steps·batch_size·seq_len`` ≈ C/M."""

    name: str
    budget: float
    n_layer: int
    d: int
    n_heads: int
    ffn: int                  # dense SwiGLU width, or the width of each expert with moe
    M: float
    batch_size: int
    lr: float
    steps: int
    warmup_steps: int
    tokens: int

    @property
    def C(self) -> float:
        """The compute actually spent, M·tokens (≈ the budget, up to rounding the steps)."""
        return self.M * self.tokens


def budget_name(c: float) -> str:
    """``1e11`` for 1e11, ``3e11``, ``1.5e12``: short, file-name safe."""
    text = f"{c:.3g}"
    if "e" not in text:
        return text
    mant, exp = text.split("e")
    return f"{mant}e{int(exp)}"


def ffn_width(d: int, moe: bool) -> int:
    """SwiGLU width giving ``3·d·w·(active FFNs) ≈ 8·d²``: 8d/3 dense, 8d/9 per expert (top-2 + 1 shared)."""
    w = 8 * d / (9 if moe else 3)
    return max(8, int(round(w / 8)) * 8)


def sweep_model_config(n_layer: int, d: int, vocab_size: int, seq_len: int, moe: bool = False):
    """The :class:`~moelab.config.ModelConfig` of one sweep shape (see the module docstring)."""
    from moelab.config import make_config

    heads, _ = default_heads(d)
    m = dict(vocab_size=vocab_size, hidden_size=d, num_hidden_layers=n_layer, num_attention_heads=heads,
             use_mla=False, max_position_embeddings=seq_len, initializer_range=0.02, tie_word_embeddings=False,
             intermediate_size=ffn_width(d, False))
    if moe:
        m.update(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                 moe_intermediate_size=ffn_width(d, True), first_k_dense_replace=0, scoring_func="sigmoid",
                 topk_method="noaux_tc", n_group=1, topk_group=1, norm_topk_prob=True)
    else:
        m.update(n_routed_experts=None, n_shared_experts=None, num_experts_per_tok=None)
    return make_config(m, where="the sweep model")


def _batch_and_lr(s: SweepSettings, budget: float) -> tuple[int, float]:
    if s.hparams == "laws":
        from moelab.scaling.laws import optimal_hyperparams

        h = optimal_hyperparams(budget, s.seq_len)
        return h.batch_sequences_rounded, h.lr
    return s.batch_size, s.lr


def grid(s: SweepSettings) -> list[tuple[int, int, float]]:
    """Every candidate ``(L, d, M)`` of the settings' ranges, by increasing M."""
    lo = max(s.width_multiple, -(-s.widths[0] // s.width_multiple) * s.width_multiple)
    ds = range(lo, s.widths[1] + 1, s.width_multiple)
    return sorted(((L, d, non_embedding_flops(L, d, s.seq_len)) for L in range(s.layers[0], s.layers[1] + 1)
                   for d in ds), key=lambda c: (c[2], c[0]))


def plan_sweep(s: SweepSettings) -> list[PlannedRun]:
    """The runs of a sweep, by budget then M. Raises ConfigError when a budget leaves < 3 shapes."""
    cands = grid(s)
    runs: list[PlannedRun] = []
    for c in s.budgets:
        B, lr = _batch_and_lr(s, c)
        per_step = B * s.seq_len
        feasible = [x for x in cands if round(c / x[2] / per_step) >= s.min_steps]
        if len({x[2] for x in feasible}) < 3:
            smallest = cands[0][2]
            need = s.min_steps * per_step * (cands[2][2] if len(cands) > 2 else smallest)
            raise ConfigError(
                f"budget {c:.3g} is too small: fewer than 3 shapes get {s.min_steps} steps of {B}×{s.seq_len} "
                f"tokens (the smallest shapes need about {need:.2g} FLOPs); raise the budget, lower --min-steps "
                "or --batch-size, or allow smaller --widths/--layers")
        lo, hi = feasible[0][2], feasible[-1][2]
        if s.span is not None:  # a window of 10^±span around the paper's M_opt, slid into [lo, hi]
            centre = min(max(M_OPT(c), lo), hi)
            wlo, whi = centre / 10 ** s.span, centre * 10 ** s.span
            if wlo < lo:
                wlo, whi = lo, min(hi, lo * 10 ** (2 * s.span))
            if whi > hi:
                wlo, whi = max(lo, hi / 10 ** (2 * s.span)), hi
            lo, hi = wlo, whi
        pool = list(feasible)
        chosen = []
        for target in np.geomspace(lo, hi, s.sizes):
            if not pool:
                break
            pick = pick_shape(float(target), pool, aspect=s.aspect, aspect_weight=0.5)
            pool = [x for x in pool if x[2] != pick[2]]  # one shape per distinct M
            chosen.append(pick)
        for L, d, M in sorted(chosen, key=lambda x: x[2]):
            steps = max(1, round(c / M / per_step))
            runs.append(PlannedRun(
                name=f"C{budget_name(c)}-L{L}-d{d}", budget=c, n_layer=L, d=d, n_heads=default_heads(d)[0],
                ffn=ffn_width(d, s.moe), M=M, batch_size=B, lr=lr, steps=steps,
                warmup_steps=min(steps - 1, max(1, round(s.warmup_fraction * steps))) if steps > 1 else 0,
                tokens=steps * per_step))
    return runs


def run_config(run: PlannedRun, s: SweepSettings, data_dir: Path, vocab_size: int, n_val_tokens: int):
    """The :class:`~moelab.train.config.RunConfig` of a planned run."""
    from moelab.train.config import RunConfig

    windows = max(1, min((n_val_tokens - 1) // s.seq_len, s.eval_tokens // s.seq_len))
    train = dict(steps=run.steps, batch_size=run.batch_size, lr=run.lr, lr_schedule="multistep",
                 warmup_steps=run.warmup_steps, dtype=s.dtype, seed=s.seed, threads=s.threads,
                 log_every=max(1, run.steps // 20), eval_every=run.steps, eval_batches=-(-windows // run.batch_size),
                 ckpt_every=max(1, -(-run.steps // 4)), keep_last=1)
    balance = {"method": "loss_free"} if s.moe else {"method": "none"}
    model = sweep_model_config(run.n_layer, run.d, vocab_size, s.seq_len, s.moe)
    return RunConfig(model=model, data={"path": str(data_dir), "seq_len": s.seq_len}, train=train, balance=balance)


__all__ = ["PlannedRun", "SweepSettings", "budget_name", "ffn_width", "grid", "plan_sweep", "run_config",
           "sweep_model_config"]
