"""Run configurations of the distributed tests: the tiny MoE on a token directory, as a RunConfig and as the
TOML a torchrun command reads. On sys.path through pytest's ``pythonpath = ["tests/support"]``."""

from __future__ import annotations

from pathlib import Path

from tiny import TINY_MOE, tiny_config

from moelab.dist.mesh import ParallelConfig
from moelab.train.config import BalanceConfig, DataConfig, RunConfig, TrainConfig

STEPS = 10


def run_config(data: Path, parallel: dict | None = None, balance: dict | None = None, **train_kw) -> RunConfig:
    tc = dict(steps=STEPS, batch_size=4, lr=3e-3, warmup_steps=2, dtype="float32", device="cpu", log_every=1,
              eval_every=STEPS, eval_batches=2, ckpt_every=STEPS, keep_last=2, threads=1)
    return RunConfig(model=tiny_config(), data=DataConfig(path=str(data), seq_len=32),
                     train=TrainConfig(**{**tc, **train_kw}), balance=BalanceConfig(**(balance or {})),
                     parallel=ParallelConfig(**(parallel or {})))

def run_toml(cfg: RunConfig) -> str:
    model = "\n".join(f"{k} = {toml_value(v)}" for k, v in TINY_MOE.items() if v is not None)
    return (f"[model]\n{model}\n\n[data]\npath = \"{cfg.data.path}\"\nseq_len = {cfg.data.seq_len}\n\n[train]\n"
            + "".join(f"{k} = {toml_value(getattr(cfg.train, k))}\n" for k in
                      ("steps", "batch_size", "lr", "warmup_steps", "dtype", "device", "log_every", "eval_every",
                       "eval_batches", "ckpt_every", "threads"))
            + "\n[parallel]\nep = 2\n")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return f'"{v}"' if isinstance(v, str) else repr(v)
