"""``moelab export``: consolidate a sharded torchrun checkpoint into one Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moelab.cli_utils import friendly
from moelab.errors import CheckpointError


@friendly
def export(
    checkpoint: Annotated[Path, typer.Argument(
        help="A sharded checkpoint: RUN_DIR/checkpoints/step-N written under torchrun.", metavar="STEP_DIR")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the Hugging Face checkpoint (new, or a "
                                      "checkpoint moelab wrote, which is replaced).")],
):
    """Gather every rank's shards of a torchrun checkpoint (any world size or mesh) into one Hugging Face
    checkpoint directory that moelab.load and transformers open. Runs in one process, no GPUs needed.

        moelab export runs/ep2/checkpoints/step-00000010 --out runs/ep2/step10-hf
    """
    from moelab.dist.checkpoint import export as consolidate, is_sharded

    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {checkpoint}")
    if not is_sharded(checkpoint):
        raise CheckpointError(f"{checkpoint} is not a sharded checkpoint (no sharded/.metadata). A one-process "
                              f"run's checkpoint already holds a Hugging Face checkpoint: {checkpoint / 'model'}")
    Console().print(f"exported: {consolidate(checkpoint, out)}")
