"""A run directory given where a model checkpoint is wanted: say so and name the model inside it.

``moelab train`` / ``finetune`` print their run directory (``RUN_DIR``) first, so ``moelab generate
RUN_DIR`` is a natural mistake; the model is ``RUN_DIR/model`` (the final one) or
``RUN_DIR/checkpoints/step-N/model``. Every reader of checkpoints calls :func:`check_not_run_dir` before
it looks for config.json, weights or a tokenizer, so the error names the right path instead of what is
missing.
"""

from __future__ import annotations

import os
from pathlib import Path

from moelab.errors import CheckpointError


def run_dir_model(directory: str | os.PathLike) -> Path | None:
    """The model inside a run directory (final, else the latest checkpoint's); None when ``directory``
    is not a run directory or holds no model yet."""
    d = Path(directory)
    if (d / "model" / "config.json").is_file():
        return d / "model"
    saved = sorted((d / "checkpoints").glob("step-*/model/config.json"))
    return saved[-1].parent if saved else None


def is_run_dir(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return d.is_dir() and ((d / "metrics.jsonl").is_file() or (d / "checkpoints").is_dir())


def check_not_run_dir(directory: str | os.PathLike) -> None:
    """Raise a :class:`CheckpointError` naming the model inside when ``directory`` is a run directory that
    is not itself a checkpoint (one with weights next to its config.json passes)."""
    d = Path(directory)
    if not is_run_dir(d) or (d / "model.safetensors").exists() or (d / "model.safetensors.index.json").exists():
        return
    model = run_dir_model(d)
    if model is None:
        raise CheckpointError(f"{d} is a training run directory with no saved model yet; a checkpoint is "
                              f"written to {d / 'model'} at the end of the run (or to {d / 'checkpoints'}/step-N/"
                              "model on the way)")
    raise CheckpointError(f"{d} is a training run directory, not a checkpoint; its model is {model}")
