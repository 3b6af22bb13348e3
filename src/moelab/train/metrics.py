"""What a run shows and keeps of its progress: metrics.jsonl (+ TensorBoard), the progress bar, the
expert-load heatmap data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moelab.common.atomic import write_file, write_text
from moelab.common.progress import Bars


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


class NoLog:
    """The log of a rank other than 0 under torchrun: rank 0 writes the job's metrics."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


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



def save_expert_load(run_dir: Path, share: np.ndarray, layer_ids: list[int]) -> None:
    write_file(run_dir / "expert_load.npy", lambda f: np.save(f, share.astype(np.float64)), "wb")
    write_text(run_dir / "expert_load_layers.json", json.dumps(layer_ids))



class ProgressBar:
    """A rich progress bar showing step, loss, tokens/s, MaxVio and ETA (no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, start: int, label: str = "train"):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        self.progress = Bars(transient=False, columns=(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn()))
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
