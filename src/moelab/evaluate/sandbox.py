"""Run untrusted Python programs (model-written code and its tests) one process each, contained, and say
whether each passed — so a bad completion is a failed sample, never a crashed or damaged run.

    results = run_programs(["def f(): ...\\nassert f() == 1\\n", ...], Limits(wall_s=10), workers=4)
    results[0].passed, results[0].status      # True, "passed" | "failed" | "timeout" | "memory" | "output" | ...

Each program runs in a fresh interpreter (``python -I``) in its own session and temporary directory,
started by a small launcher that, before the program's first line:

* sets resource limits: CPU seconds, address space (memory), size of any file written (stdout and
  stderr go to files, so this caps the output too), number of processes (RLIMIT_NPROC), no core files;
* cuts the network: a new network namespace with no interfaces (when the kernel allows it: as root,
  or through an unprivileged user namespace);
* drops root: run as root, it becomes ``nobody`` (65534), so the rest of the file system is read-only
  to it, it cannot signal the harness, and the process limit applies;
* switches off what a test program never needs: ``os.fork`` / ``kill`` / ``system`` / ``exec*`` /
  ``spawn*`` / removal and renaming of files, ``subprocess``, ``socket``, ``shutil.rmtree``, and
  ``open`` for writing outside its directory (also in ``posix``, so re-importing ``os`` does not undo it).

The harness waits at most the wall time, then kills the program's whole process group; it kills the
group after a normal exit too (nothing is left behind). A program passes only when it runs to its end:
an exception, ``sys.exit``, a signal, or any limit is a failure. These are the layers HumanEval's own
harness recommends (a process, resource limits, disabled functions) plus the kernel's; it is meant for
model-written code, not for code written to break out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
PASS_CODE = 0


@dataclass(frozen=True)
class Limits:
    """What one program may use (defaults fit HumanEval: each problem runs in well under a second)."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 2 << 30
    output_bytes: int = 1 << 20
    processes: int = 32


@dataclass
class Result:
    status: str            # passed | failed | timeout | memory | output | killed
    passed: bool
    seconds: float
    detail: str            # the last line of stderr (the exception), or what stopped it


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def run_program(code: str, limits: Limits = Limits()) -> Result:
    """Run one program contained (module docstring) and classify how it ended."""
    with tempfile.TemporaryDirectory(prefix="moelab-sandbox-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        os.chmod(tmp, 0o755)
        os.chmod(work, 0o777)        # writable by the unprivileged user the launcher becomes under root
        program = work / "program.py"
        program.write_text(code, encoding="utf-8")
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        cfg = {"work": str(work), "program": str(program), "cpu_s": limits.cpu_s, "memory": limits.memory_bytes,
               "output": limits.output_bytes, "processes": limits.processes}
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.monotonic()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            os.chmod(out_path, 0o666)
            os.chmod(err_path, 0o666)
            proc = subprocess.Popen([sys.executable, "-I", "-S", str(_LAUNCHER), json.dumps(cfg)], cwd=work,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, close_fds=True,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limits.wall_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                rc = proc.wait()
                timed_out = True
            _kill_group(proc.pid)              # anything it started is ended with it
        seconds = time.monotonic() - t0
        stderr = err_path.read_bytes()[-4000:].decode("utf-8", "replace")
    last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
    if timed_out:
        return Result("timeout", False, seconds, f"still running after {limits.wall_s:g} s")
    if rc == PASS_CODE:
        return Result("passed", True, seconds, "")
    if rc == -signal.SIGXCPU:
        return Result("timeout", False, seconds, f"used more than {limits.cpu_s} s of CPU")
    if rc == -signal.SIGXFSZ or "File too large" in last:          # (Python ignores SIGXFSZ: EFBIG)
        return Result("output", False, seconds, f"wrote more than {limits.output_bytes:,} bytes")
    if "MemoryError" in last:
        return Result("memory", False, seconds, last[-300:])
    if rc < 0:
        return Result("killed", False, seconds, f"killed by signal {-rc} ({signal.Signals(-rc).name})")
    return Result("failed", False, seconds, last[-300:] or f"exit status {rc}")


def run_programs(codes: list[str], limits: Limits = Limits(), workers: int | None = None,
                 on_done=None) -> list[Result]:
    """:func:`run_program` for each program, ``workers`` at a time; results in the input order.
    ``on_done(i, result)`` is called as each finishes (progress bars)."""
    workers = max(1, workers or (os.cpu_count() or 1))
    results: list[Result | None] = [None] * len(codes)

    def one(i: int) -> None:
        results[i] = run_program(codes[i], limits)
        if on_done is not None:
            on_done(i, results[i])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(len(codes))))
    return results


__all__ = ["Limits", "Result", "run_program", "run_programs"]
