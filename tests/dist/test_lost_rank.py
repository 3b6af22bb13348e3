"""A rank killed mid-run: ``torchrun -m moelab train`` ends within the collective timeout with a non-zero
status, torchrun's summary names the lost rank, no half-written checkpoint is left, and ``--resume``
continues from the last complete checkpoint to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_configs import run_config, run_toml

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers in /proc")
TIMEOUT_S = 20


def worker_pids(agent: int) -> dict[int, int]:
    """``{rank: pid}`` of the worker processes torchrun's agent (process ``agent``) started."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent:
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(d.name)
    return out


def torchrun(config: Path, run: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moelab",
           "train", str(config), "--out", str(run), "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_killed_rank_ends_the_job_and_the_last_checkpoint_resumes(excerpt_tokens, tmp_path):
    steps = 300
    cfg = run_config(excerpt_tokens, steps=steps, ckpt_every=5, eval_every=steps)
    text = run_toml(cfg).replace("[parallel]\n", f"[parallel]\ntimeout_s = {TIMEOUT_S}\n")
    (tmp_path / "c.toml").write_text(text, encoding="utf-8")
    run = tmp_path / "run"
    job = torchrun(tmp_path / "c.toml", run)
    first = run / "checkpoints" / "step-00000005"
    deadline = time.monotonic() + 120
    while not first.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.poll() is None, "the job ended before a rank could be killed:\n" + job.communicate()[0]
    os.kill(worker_pids(job.pid)[1], signal.SIGKILL)
    killed_at = time.monotonic()
    out, _ = job.communicate(timeout=TIMEOUT_S + 60)
    assert job.returncode != 0
    assert time.monotonic() - killed_at < TIMEOUT_S + 45, "the other rank waited past parallel.timeout_s"
    assert "rank      : 1" in out or "rank: 1" in out, out[-3000:]            # torchrun's failure summary
    assert "]: Traceback" not in out, out[-3000:]          # no worker stack trace (torchrun's own is its way)
    assert "error: rank 0: a collective with the other ranks failed" in out and "--resume" in out
    ckpts = run / "checkpoints"
    assert not any(p.name.startswith(".tmp") for p in ckpts.iterdir())        # complete checkpoints only
    last = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    assert 5 <= last < steps

    again = torchrun(tmp_path / "c.toml", run, "--resume")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert logged == list(range(1, steps + 1))        # resumed after `last`, nothing logged twice
    assert (run / "model" / "config.json").is_file()
