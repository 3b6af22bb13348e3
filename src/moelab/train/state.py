"""Training checkpoints: model weights as a Hugging Face checkpoint plus the training state.

    RUN_DIR/checkpoints/step-00000500/
        model/              config.json + model.safetensors (+ tokenizer.json): opens in transformers
        train_state.pt      optimizer state, step, tokens seen, RNG state, balancer state
        meta.json           step, tokens, time

Each checkpoint is written into a temporary directory and renamed into place, so a crash or an
interrupt never leaves a half-written checkpoint; only the newest ``keep_last`` are kept. The training
state is our own file and is read back with ``torch.load(..., weights_only=True)`` (no unpickling).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from moelab.common.atomic import share
from moelab.dist.checkpoint import read_run_state
from moelab.errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "train_state.pt").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int,
                    save_weights) -> Path:
    """Write ``checkpoints/step-NNNNNNNN`` atomically; ``save_weights(model, dir)`` writes the weights (the
    job's hook: a Hugging Face checkpoint in ``dir/model`` by default, see :class:`moelab.train.job.Job`)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=root))
    try:
        save_weights(model, tmp)
        payload = {"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state(), **state}
        torch.save(payload, tmp / "train_state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "tokens": state.get("tokens", 0),
                                                   "time": time.time()}, indent=2))
        share(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, load_weights) -> dict:
    """Restore weights (in place) and optimizer state; returns the saved training state."""
    try:
        load_weights(model, ckpt)
    except CheckpointError as e:
        if "has shape" not in str(e):
            raise
        raise CheckpointError(f"cannot resume from {ckpt}: {e}. A run keeps its model's shape (even with "
                              "--allow-config-change): undo the change to [model], or start a new run under "
                              "another --out") from None
    except Exception as e:
        raise CheckpointError(f"cannot resume from {ckpt}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from None
    state = read_train_state(ckpt)
    try:
        optimizer.load_state_dict(state.pop("optimizer"))
        torch.set_rng_state(state.pop("torch_rng"))
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"cannot resume from {ckpt}: its train_state.pt does not fit this run "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return state


def read_train_state(ckpt: Path) -> dict:
    """``train_state.pt``, read with ``weights_only=True`` (tensors and plain containers only: a file
    that needs anything else is refused, never unpickled)."""
    state = read_run_state(ckpt)
    if "optimizer" not in state:
        raise CheckpointError(f"cannot resume from {ckpt}: its train_state.pt has no optimizer state (damaged or "
                              "replaced). Move this step directory out of checkpoints/ to resume from the one before")
    return state
