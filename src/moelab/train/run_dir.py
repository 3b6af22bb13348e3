"""The run directory of a training or fine-tuning run: what may be written there, its lock, its record.

    RUN_DIR/
        .moelab.lock          held (``flock``) by the one process training here; the kernel drops it
                              when that process dies, so a stale lock never blocks anyone
        config.json           the run's settings as first started: written once, never replaced
        config_changes.jsonl  one line per resume with changed settings: step, time, the differences,
                              the full settings then in force
        metrics.jsonl  tb/  checkpoints/  model/ | adapter/ | esft/  report/  expert_load.npy ...

Rules (:func:`open_run`):

* A new run goes only into a missing or empty directory, or one that holds a run that never reached
  its first checkpoint. A directory with anything moelab does not write into a run
  (a checkpoint made by ``moelab init``, a user's files) is refused, and so is one that holds a run:
  ``--resume`` continues it. Nothing is written before these checks pass.
* ``--resume`` needs a checkpoint. Settings that differ from the record are shown; those that change
  the computation are refused unless ``allow_config_change``; they are then appended to
  ``config_changes.jsonl`` (the original ``config.json`` is kept).
* Temporary directories left by a killed process (``checkpoints/.tmp-step-*``, ``.model.tmp-*``, ...)
  are removed once the lock is held, since no live moelab process can be writing them then.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from moelab.errors import TrainingError

try:  # POSIX advisory locks; elsewhere a pid file (see RunLock)
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

LOCK = ".moelab.lock"
RECORD = "config.json"
CHANGES = "config_changes.jsonl"
#: Every top-level name a run writes (temporary names included).
RUN_ENTRIES = (LOCK, RECORD, CHANGES, "metrics.jsonl", "tb", "checkpoints", "model", "adapter", "esft", "report",
               "expert_load.npy", "expert_load_layers.json", "finetune.json", "expert_load.tmp.npy",
               ".model.tmp", ".finetune.json.tmp", ".*.tmp-*", ".*.old-*",
               "run.json", "result.json")   # an IsoFLOP sweep's plan and result for one of its runs
#: Settings that do not change what is computed (the runtime ones only up to rounding): a resume may change
#: them freely (they are recorded).
FREE_SETTINGS = ("train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every",
                 "train.keep_last", "train.threads", "train.compile", "train.keep_host_memory",
                 "data.general_path", "model.attn_impl", "model.expert_impl", "model.compile_experts",
                 "runtime.expert_impl", "runtime.attn_impl", "runtime.compile_experts", "runtime.compile",
                 "train.device", "train.activation_checkpointing",
                 # the layout of a torchrun job: a sharded checkpoint reshards to any other
                 "parallel.dp", "parallel.ep", "parallel.data_parallel", "parallel.backend", "parallel.timeout_s")

#: Settings added after runs may have started, with the value a record without them implies.
ADDED_SETTINGS = {"train.device": "auto", "train.weights_dtype": "float32", "train.activation_checkpointing": False,
                  "parallel.dp": None, "parallel.ep": 1, "parallel.data_parallel": "auto", "parallel.backend": "auto",
                  "parallel.timeout_s": 300.0}

_err = Console(stderr=True)


def note(message: str) -> None:
    """One line of information on stderr (results go to stdout); under torchrun rank 0's only."""
    if os.environ.get("RANK", "0") != "0":
        return
    _err.print(f"[cyan]note:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _is_run_entry(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in RUN_ENTRIES)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _is_run_record(path: Path) -> bool:
    data = _read_json(path)
    return isinstance(data, dict) and isinstance(data.get("train"), dict)


def has_run(run_dir: Path) -> bool:
    """Whether the directory holds a run that can be resumed (a complete checkpoint). A run killed
    before its first checkpoint has nothing to resume: a new run may start there (its metrics go)."""
    from moelab.train.state import latest_checkpoint

    return latest_checkpoint(run_dir) is not None


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Everything that can be checked without writing: raises :class:`TrainingError` (one line)."""
    from moelab.common.atomic import check_not_cwd
    from moelab.train.state import latest_checkpoint

    run_dir = Path(run_dir)
    if run_dir.is_symlink() and not run_dir.exists():
        raise TrainingError(f"--out {run_dir} is a broken symbolic link; give a directory")
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"--out {run_dir} is a file; give a directory for the run (e.g. runs/NAME)")
    if resume:
        if not run_dir.is_dir() or latest_checkpoint(run_dir) is None:
            where = "does not exist" if not run_dir.exists() else "holds no checkpoint (checkpoints/step-*)"
            raise TrainingError(f"--resume: {run_dir} {where}; start without --resume, or give the run "
                                "directory of an earlier run")
        return
    check_not_cwd(run_dir, "--out", TrainingError)
    if not run_dir.is_dir():
        return
    names = os.listdir(run_dir)
    foreign = sorted(n for n in names if not _is_run_entry(n))
    if RECORD in names and not _is_run_record(run_dir / RECORD):
        foreign = sorted({*foreign, RECORD})
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise TrainingError(f"--out {run_dir} is not empty and is not a moelab run directory (it holds {shown}); "
                            "moelab never writes into a directory it did not make — choose a new --out")
    if has_run(run_dir):
        raise TrainingError(f"--out {run_dir} already holds a run; pass --resume to continue it, or choose "
                            "another --out")


class RunLock:
    """An exclusive lock on a run directory for the life of one process (non-blocking)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:  # pragma: no cover (no flock: trust a pid that is still alive)
                from moelab.common.atomic import pid_alive

                pid = self._holder(fd)
                if pid and pid != os.getpid() and pid_alive(pid):
                    raise BlockingIOError
        except BlockingIOError:
            pid = self._holder(fd)
            os.close(fd)
            who = f"process {pid}" if pid else "another process"
            raise TrainingError(f"{self.path.parent} is in use by another moelab run ({who}); wait for it to "
                                "finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    @staticmethod
    def _holder(fd: int) -> int | None:
        try:
            return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing drops the flock; the file stays (unlinking it would race)
            self.fd = None


def sweep(run_dir: Path) -> list[Path]:
    """Remove what killed runs left behind (call with the lock held); returns what was removed."""
    from moelab.common.atomic import sweep_leftovers

    removed = []
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        for p in ckpts.iterdir():
            if p.name.startswith(".tmp-step-") and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    for name in (".model.tmp", ".finetune.json.tmp", "expert_load.tmp.npy"):
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif p.is_file() or p.is_symlink():
            p.unlink()
            removed.append(p)
    for name in ("model", "adapter", "esft", "finetune.json", "config.json"):
        removed += sweep_leftovers(run_dir / name)
    return removed


# ------------------------------------------------------------------------------------------------
# the config record
# ------------------------------------------------------------------------------------------------
def flatten(data: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` → ``{"train.lr": 1}`` (lists and scalars are leaves)."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def recorded_config(run_dir: Path) -> dict | None:
    """The settings in force at the newest resume: config.json updated by config_changes.jsonl."""
    config = _read_json(run_dir / RECORD)
    changes = run_dir / CHANGES
    if changes.is_file():
        for line in changes.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("config"), dict):
                config = rec["config"]
    return config if isinstance(config, dict) else None


def record_names(run_dir: Path) -> str:
    names = str(run_dir / RECORD)
    return names + f" + {CHANGES}" if (run_dir / CHANGES).is_file() else names


def config_differences(old: dict, new: dict) -> dict[str, tuple]:
    """``{key: (old, new)}`` for every flattened setting that differs."""
    a, b = flatten(old), flatten(new)
    if "train.steps" in a or "train.tokens" in a:     # a run's record: fill in settings it predates
        a = {**{k: v for k, v in ADDED_SETTINGS.items() if k in b}, **a}
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _show(diffs: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {json.dumps(o)} → {json.dumps(n)}" for k, (o, n) in diffs.items())


def reconcile_config(run_dir: Path, config_json: str, step: int, allow_change: bool) -> Callable[[], None]:
    """On resume: compare the settings with the record and refuse differences that change the run.

    Returns a function that records the differences (call it once the checkpoint has loaded)."""
    old = recorded_config(run_dir)
    new = json.loads(config_json)
    if old is None:   # a run from before the record existed, or a lost record: start one
        return lambda: write_record(run_dir, config_json)
    diffs = config_differences(old, new)
    if not diffs:
        return lambda: None
    binding = {k: v for k, v in diffs.items() if k not in FREE_SETTINGS}
    if binding and not allow_change:
        raise TrainingError(
            f"--resume: these settings differ from the run's record ({record_names(run_dir)}): {_show(binding)}; "
            "the run would not continue as it started. Resume with the recorded settings, or pass "
            f"--allow-config-change to apply them (recorded in {CHANGES})")

    def record() -> None:
        note(f"resuming at step {step} with changed settings: {_show(diffs)} (recorded in {run_dir / CHANGES})")
        line = {"step": step, "time": time.time(), "changes": {k: [o, n] for k, (o, n) in diffs.items()},
                "config": new}
        with open(run_dir / CHANGES, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    return record


def write_record(run_dir: Path, config_json: str) -> None:
    from moelab.common.atomic import write_text

    write_text(run_dir / RECORD, config_json)


@contextmanager
def open_run(run_dir: Path, resume: bool) -> Iterator[Path]:
    """Check, create and lock ``run_dir`` for one run; sweeps leftovers. On a refusal inside the block,
    a directory this call created is removed again (it holds nothing but the lock)."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume)
    created = not run_dir.exists()
    lock = RunLock(run_dir)
    for attempt in range(3):   # a racing run may remove a directory it made and then gave up
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()     # refused: the directory belongs to the run holding the lock; leave it be
            break
        except FileNotFoundError:
            if attempt == 2:
                raise TrainingError(f"{run_dir} keeps disappearing; is another program removing it?") from None
    ok = False
    try:
        check_run_dir(run_dir, resume)   # again, now that no other run can change it
        removed = sweep(run_dir)
        if removed:
            note(f"removed {len(removed)} incomplete file(s) left by an interrupted run in {run_dir}: "
                 + ", ".join(str(p.relative_to(run_dir)) for p in removed[:3]))
        yield run_dir
        ok = True
    finally:
        if not ok and created and set(os.listdir(run_dir)) <= {LOCK}:
            shutil.rmtree(run_dir, ignore_errors=True)   # refused before writing: take back the new dir
        lock.release()
