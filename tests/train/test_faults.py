"""Never lose a user's work: outputs, run directories, locks, NaN steps, resume with changed settings.

Each test plays one thing a careless (or unlucky) user does, through the real command line, and checks
three things: the exit status, the one-line message, and that nothing the user had changed (every
file under the directory is hashed before and after). Most commands run in-process (typer's
CliRunner); where a second process matters (a lock held by a live process, ``kill -9``, a second
Ctrl-C at exit) a real one is started.

Bad-input cases of the other commands live in test_faults_data.py and test_faults_eval.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import moelab
from moelab.cli import app
from moelab.data.tokens import prepare

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "400"}


def snapshot(d: Path) -> dict[str, str]:
    """Path → content hash of every file under ``d`` (hidden ones included); {} when missing."""
    if not d.exists():
        return {}
    if d.is_file():
        return {d.name: hashlib.sha256(d.read_bytes()).hexdigest()}
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


def cli(*args, ok: bool = True, code: int = 1) -> str:
    """Run ``moelab ARGS`` in-process; returns stdout + stderr. Checks the exit status and that a
    failure is one clean line, not a traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400", "NO_COLOR": "1"})
    text = result.output
    if ok:
        assert result.exit_code == 0, (text, result.exception)
    else:
        assert result.exit_code == code, (result.exit_code, text, result.exception)
        assert "Traceback" not in text
        assert "error:" in text
    return " ".join(text.split())   # rich wraps long lines: compare on single spaces


@pytest.fixture(scope="module")
def txt(tmp_path_factory) -> Path:
    """The audit's corpus: six files of numbered lines."""
    src = tmp_path_factory.mktemp("txt")
    for i in range(1, 7):
        (src / f"d{i}.txt").write_text("".join(f"line {i} {n}\n" for n in range(1, 3001)))
    return src


@pytest.fixture(scope="module")
def corpus(txt, tmp_path_factory) -> Path:
    """``txt`` prepared with a 300-token BPE."""
    out = tmp_path_factory.mktemp("tokens") / "d"
    prepare([txt], out, vocab_size=300, progress=False)
    return out


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def settings(corpus: Path, *extra: str, layers: int | None = 2) -> list[str]:
    """The audit's ``$S``, on a 2-layer tiny model so that a run takes about a second."""
    base = [f'data.path="{corpus}"', "data.seq_len=32", "train.batch_size=2", 'train.dtype="float32"',
            "train.eval_batches=2", "train.log_every=1", *extra]
    if layers is not None:
        base.append(f"model.num_hidden_layers={layers}")
    return [x for s in base for x in ("--set", s)] + ["--no-progress"]


def train(corpus, out, *extra, resume=False, ok=True, flags=()):
    args = ["train", TINY, "--out", out, *settings(corpus, *extra), *flags]
    return cli(*args, *(["--resume"] if resume else []), ok=ok)


@pytest.fixture
def ckpt(work) -> Path:
    cli("init", TINY, "--out", "m")
    return work / "m"


# ------------------------------------------------------------------------------------------------
# 1. an existing --out is never deleted
# ------------------------------------------------------------------------------------------------
def test_init_refuses_a_directory_with_user_files(work):
    (work / "keep").mkdir()
    (work / "keep" / "thesis.txt").write_text("four years of work")
    before = snapshot(work / "keep")
    msg = cli("init", TINY, "--out", "keep", ok=False)
    assert "keep is not empty" in msg and "thesis.txt" in msg and "never deletes" in msg
    msg = cli("init", TINY, "--out", "keep", "--overwrite", ok=False)      # --overwrite does not help
    assert "thesis.txt" in msg
    assert snapshot(work / "keep") == before


def test_init_replaces_its_own_checkpoint_only_with_overwrite(ckpt):
    before = snapshot(ckpt)
    msg = cli("init", TINY, "--out", ckpt, "--seed", "1", ok=False)
    assert "already holds a moelab checkpoint" in msg and "--overwrite" in msg
    assert snapshot(ckpt) == before
    cli("init", TINY, "--out", ckpt, "--seed", "1", "--overwrite")
    assert snapshot(ckpt) != before and moelab.load(ckpt) is not None
    (ckpt / "notes.md").write_text("mine")                         # a checkpoint with a user's file in it
    before = snapshot(ckpt)
    assert "notes.md" in cli("init", TINY, "--out", ckpt, "--overwrite", ok=False)
    assert snapshot(ckpt) == before


@pytest.mark.parametrize("out", [".", "..", "sub/.."])
def test_init_refuses_the_working_directory_and_above(work, out):
    (work / "sub").mkdir()
    (work / "thesis.txt").write_text("x")
    before = snapshot(work)
    msg = cli("init", TINY, "--out", out, "--overwrite", ok=False)
    assert "is the working directory or contains it" in msg
    assert snapshot(work) == before


def test_init_out_is_a_file(work):
    (work / "f").write_text("x")
    assert "--out f is a file" in cli("init", TINY, "--out", "f", ok=False)
    assert (work / "f").read_text() == "x"


@pytest.mark.parametrize("command", [["finetune", "merge"], ["esft", "merge"]])
@pytest.mark.parametrize("out", ["keep", ".."])
def test_merges_refuse_directories_they_did_not_write(ckpt, work, command, out):
    """`finetune merge` / `esft merge` check --out before any work, like every writer."""
    (work / "keep").mkdir()
    (work / "keep" / "thesis.txt").write_text("x")
    (work / "adapter").mkdir()
    before = snapshot(work)
    msg = cli(*command, ckpt, "adapter", "--out", out, "--overwrite", ok=False)
    assert ("thesis.txt" in msg) if out == "keep" else ("working directory" in msg)
    assert snapshot(work) == before


def test_data_prepare_refuses_a_directory_with_user_files(work, txt):
    (work / "keep").mkdir()
    (work / "keep" / "thesis.txt").write_text("x")
    msg = cli("data", "prepare", txt, "--out", "keep", "--overwrite", ok=False)
    assert "thesis.txt" in msg
    assert snapshot(work / "keep") == {"thesis.txt": hashlib.sha256(b"x").hexdigest()}


# ------------------------------------------------------------------------------------------------
# 2-3. a run never writes into a directory before it has checked it
# ------------------------------------------------------------------------------------------------
def test_train_into_a_checkpoint_is_refused_and_the_checkpoint_survives(ckpt, corpus):
    before = snapshot(ckpt)
    msg = train(corpus, ckpt, "train.steps=2", ok=False)
    assert "is not a moelab run directory" in msg and "model.safetensors" in msg
    assert snapshot(ckpt) == before
    cli("generate", ckpt, "-p", "hi", "-n", "2", "--greedy")            # still opens


def test_refused_run_leaves_the_record_alone(work, corpus):
    train(corpus, "runs/a", "train.steps=3")
    before = snapshot(work / "runs" / "a")
    msg = train(corpus, "runs/a", "model.hidden_size=64", ok=False)
    assert "already holds a run" in msg and "--resume" in msg
    assert snapshot(work / "runs" / "a") == before


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_resume_without_a_run_writes_nothing(work, corpus, state):
    if state == "empty":
        (work / "e").mkdir()
    msg = train(corpus, "e", "train.steps=2", resume=True, ok=False)
    assert "--resume" in msg and ("does not exist" if state == "missing" else "holds no checkpoint") in msg
    assert (work / "e").exists() == (state == "empty")
    assert snapshot(work / "e") == {}


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_run_out_that_is_a_file(work, corpus, command):
    (work / "f").write_text("x")
    if command == "train":
        msg = train(corpus, "f", "train.steps=2", ok=False)
    else:
        msg = cli("finetune", "full", ROOT / "configs" / "finetune-arith.toml", "--out", "f", ok=False)
    assert "--out f is a file" in msg
    assert (work / "f").read_text() == "x"


# ------------------------------------------------------------------------------------------------
# 4. one run per directory
# ------------------------------------------------------------------------------------------------
def _hold_lock(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from moelab.train.run_dir import RunLock; "
            "Path(sys.argv[1]).mkdir(parents=True, exist_ok=True); RunLock(Path(sys.argv[1])).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_in_a_locked_directory_refuses_and_a_dead_holder_does_not_block(work, corpus):
    holder = _hold_lock(work / "runs" / "c")
    try:
        before = snapshot(work / "runs" / "c")
        msg = train(corpus, "runs/c", "train.steps=2", ok=False)
        assert "is in use by another moelab run" in msg and f"process {holder.pid}" in msg
        assert snapshot(work / "runs" / "c") == before
    finally:
        holder.send_signal(signal.SIGKILL)          # dies holding the lock: the kernel drops it
        holder.wait()
    train(corpus, "runs/c", "train.steps=2")
    assert (work / "runs" / "c" / "model" / "model.safetensors").is_file()


def test_two_runs_started_together_one_trains_the_other_refuses(work, corpus):
    """The audit's case: two `moelab train --out runs/c` at once used to both exit 0 over one directory."""
    args = [sys.executable, "-m", "moelab", "train", str(TINY), "--out", "runs/c",
            *settings(corpus, "train.steps=30")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=work)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    [err] = [e for code, e in results if code == 1]
    assert "Traceback" not in err
    assert "in use by another moelab run" in err or "already holds a run" in err
    steps = [json.loads(x)["step"] for x in (work / "runs" / "c" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 31))                      # one run's metrics, each step once


# ------------------------------------------------------------------------------------------------
# 5. NaN: no update applied, no non-finite checkpoint, the named checkpoint is good
# ------------------------------------------------------------------------------------------------
def test_divergence_never_saves_nonfinite_weights(work, corpus):
    msg = train(corpus, "runs/nan", "train.lr=1e6", "train.warmup_steps=0", "train.ckpt_every=1",
                "train.steps=20", "train.keep_last=1", ok=False)
    assert "stopping" in msg and "last good checkpoint is" in msg
    named = msg.split("last good checkpoint is ")[1].split(". ")[0].split()[0]
    ckpts = sorted((work / "runs" / "nan" / "checkpoints").glob("step-*"))
    assert ckpts, "at least one step was fine before the divergence"
    assert named == str(Path("runs/nan/checkpoints") / ckpts[-1].name)
    for c in ckpts:
        tensors = load_file(str(c / "model" / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in tensors.values()), c


def test_nonfinite_gradient_norm_stops_before_the_update(work, corpus, monkeypatch):
    """The loss is finite but a gradient is not: the update must not be applied."""
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def poisoned(params, max_norm, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            params = list(params)
            params[0].grad.fill_(float("nan"))
        return real(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    msg = train(corpus, "runs/g", "train.ckpt_every=1", "train.steps=5", ok=False)
    assert "gradient norm became nan at step 3" in msg and "step-00000002" in msg
    assert not (work / "runs" / "g" / "checkpoints" / "step-00000003").exists()


# ------------------------------------------------------------------------------------------------
# 6. resume with changed settings
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def run_a(work, corpus) -> Path:
    train(corpus, "runs/a", "train.steps=4", "train.ckpt_every=2")
    return work / "runs" / "a"


@pytest.mark.parametrize("change", ["train.lr=0.01", "data.seq_len=16", "train.batch_size=3",
                                    'balance.method="aux_loss"'])
def test_resume_refuses_a_changed_setting(run_a, corpus, change):
    before = snapshot(run_a)
    msg = train(corpus, run_a, "train.steps=4", "train.ckpt_every=2", change, resume=True, ok=False)
    key = change.split("=")[0]
    assert "--resume: these settings differ from the run's record" in msg and key in msg
    assert "--allow-config-change" in msg
    assert snapshot(run_a) == before


def test_resume_applies_and_records_an_allowed_change(run_a, corpus):
    record = (run_a / "config.json").read_text()
    out = train(corpus, run_a, "train.steps=6", "train.ckpt_every=2", "train.lr=0.01", resume=True,
                flags=["--allow-config-change"])
    assert "train.lr 0.002 → 0.01" in out and "train.steps 4 → 6" in out
    assert (run_a / "config.json").read_text() == record                     # the original record stays
    [line] = [json.loads(x) for x in (run_a / "config_changes.jsonl").read_text().splitlines()]
    assert line["step"] == 4 and line["changes"]["train.lr"] == [0.002, 0.01]
    assert line["config"]["train"]["lr"] == 0.01
    # a later resume compares with the settings in force (0.01), not with the first record
    msg = train(corpus, run_a, "train.steps=6", "train.ckpt_every=2", "train.lr=0.002", resume=True, ok=False)
    assert "train.lr 0.01 → 0.002" in msg


def test_resume_with_a_changed_logging_setting_is_noted_not_refused(run_a, corpus):
    out = train(corpus, run_a, "train.steps=4", "train.ckpt_every=2", "train.eval_every=1", resume=True)
    assert "train.eval_every 200 → 1" in out


# ------------------------------------------------------------------------------------------------
# 7. train.init_from with another architecture
# ------------------------------------------------------------------------------------------------
def test_init_from_another_architecture_is_refused(ckpt, corpus):
    msg = train(corpus, "runs/i", f'train.init_from="{ckpt}"', "train.steps=2", ok=False)
    assert "another architecture than [model]" in msg and "num_hidden_layers 4 (checkpoint) vs 2" in msg
    assert not Path("runs/i").exists()


def test_init_from_the_same_architecture_records_it(ckpt, corpus):
    cli("train", TINY, "--out", "runs/i", *settings(corpus, f'train.init_from="{ckpt}"', "train.steps=2",
                                                     'runtime.attn_impl="naive"',  # a moelab setting may differ
                                                     layers=None))
    rec = json.loads(Path("runs/i/config.json").read_text())
    assert rec["model"]["num_hidden_layers"] == 4 and rec["train"]["init_from"] == str(ckpt)


# ------------------------------------------------------------------------------------------------
# 8. leftovers of killed processes are swept, safely
# ------------------------------------------------------------------------------------------------
def test_leftover_checkpoint_temp_is_swept_on_resume(run_a, corpus):
    junk = run_a / "checkpoints" / ".tmp-step-00000006-dead"
    (junk / "model").mkdir(parents=True)
    (junk / "model" / "model.safetensors").write_bytes(b"\0" * 1000)
    out = train(corpus, run_a, "train.steps=4", "train.ckpt_every=2", resume=True)
    assert "removed 1 incomplete file(s) left by an interrupted run" in out
    assert not junk.exists()


def _die_inside_write_dir(out: Path) -> int:
    """A real process that dies by SIGKILL while writing ``out`` atomically; returns its pid."""
    code = ("import sys, time; from pathlib import Path; from moelab.common.atomic import TOKENS, write_dir\n"
            "def w(tmp):\n    (tmp / 'train.bin').write_bytes(b'x' * 4096); print('writing', flush=True); "
            "time.sleep(120)\n"
            "write_dir(Path(sys.argv[1]), w, kind=TOKENS)")
    p = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait()
    return p.pid


def test_killed_data_prepare_leaves_a_temp_that_the_next_one_sweeps(work, txt):
    pid = _die_inside_write_dir(work / "d")
    [left] = list(work.glob(f".d.tmp-{pid}-*"))
    alive = work / f".d.tmp-{os.getpid()}-live"                   # a live writer's temp: never touched
    alive.mkdir()
    cli("data", "prepare", txt, "--out", "d", "--vocab-size", "300")
    assert not left.exists() and alive.exists()
    assert (work / "d" / "meta.json").is_file()


def test_killed_training_run_resumes_and_leaves_no_temp(work, corpus):
    """kill -9 a real training process while it checkpoints every step; --resume then continues."""
    args = [sys.executable, "-m", "moelab", "train", str(TINY), "--out", "runs/k",
            *settings(corpus, "train.steps=100000", "train.ckpt_every=1", "train.keep_last=2")]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=work)
    ckpts = work / "runs" / "k" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(ckpts.glob("step-*"))) < 2:
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    step = int(sorted(ckpts.glob("step-*"))[-1].name.split("-")[1])
    out = train(corpus, "runs/k", f"train.steps={step + 1}", "train.ckpt_every=1", "train.keep_last=2",
                resume=True, flags=["--allow-config-change"])
    assert f"step {step + 1}" in out
    assert not list(ckpts.glob(".tmp-*")) and not list((work / "runs" / "k").glob(".*.tmp*"))


# ------------------------------------------------------------------------------------------------
# 9, 13. impossible data is found before step 1
# ------------------------------------------------------------------------------------------------
def test_empty_validation_split_fails_before_training(work, tmp_path_factory):
    src = tmp_path_factory.mktemp("one")
    (src / "only.txt").write_text("".join(f"line {n}\n" for n in range(3000)))
    prepare([src], work / "d1", vocab_size=300, progress=False)
    msg = train(work / "d1", "runs/one", "train.steps=200", ok=False)
    assert "validation split" in msg and "has 0 tokens" in msg
    assert not (work / "runs").exists()


def test_seq_len_above_max_position_embeddings_is_refused(work, corpus):
    msg = train(corpus, "runs/p", "data.seq_len=5000", ok=False)
    assert "data.seq_len 5000 exceeds model.max_position_embeddings 1024" in msg
    assert not (work / "runs").exists()


# ------------------------------------------------------------------------------------------------
# tracebacks and wrong words of the training commands
# ------------------------------------------------------------------------------------------------
def test_garbage_train_state_is_refused_without_advising_unpickling(run_a, corpus):
    state = sorted((run_a / "checkpoints").glob("step-*"))[-1] / "train_state.pt"
    state.write_bytes(b"garbage")
    before = snapshot(run_a)
    msg = train(corpus, run_a, "train.steps=4", "train.ckpt_every=2", resume=True, ok=False)
    assert "train_state.pt is not a training state written by moelab" in msg
    assert "weights_only" not in msg and "Weights only" not in msg
    assert snapshot(run_a) == before


def test_second_ctrl_c_while_exiting_is_quiet(work, corpus):
    """Ctrl-C checkpoints and exits 130; a second Ctrl-C while the interpreter shuts down (here during an
    exit handler that takes a second) prints no "Exception ignored" traceback."""
    code = ("import atexit, sys, time; atexit.register(time.sleep, 1.5); from moelab.cli import main; "
            "sys.argv = ['moelab'] + sys.argv[1:]; main()")
    args = [sys.executable, "-c", code, "train", str(TINY), "--out", "runs/int",
            *settings(corpus, "train.steps=100000")]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=work)
    metrics = work / "runs" / "int" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    ckpts = work / "runs" / "int" / "checkpoints"
    while time.time() < deadline and not list(ckpts.glob("step-*")):
        time.sleep(0.02)
    time.sleep(0.5)                                   # now inside the exit handler
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted: checkpoint" in err and "--resume" in err
    assert "Traceback" not in err and "Exception ignored" not in err and "KeyboardInterrupt" not in err


def test_finetune_reports_truncated_and_dropped_examples(ckpt, work):
    """Item 10: every fine-tuning run says how many examples seq_len cut or dropped."""
    rows = [{"prompt": f"what is {i}?", "completion": "ok"} for i in range(16)]
    rows += [{"prompt": "x " * 40, "completion": "too long"} for _ in range(3)]              # dropped
    rows += [{"prompt": "short", "completion": "y " * 40} for _ in range(2)]               # truncated
    (work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "ft.toml").write_text(f'[finetune]\nbase = "{ckpt}"\n[data]\npath = "sft.jsonl"\nseq_len = 32\n'
                                  'val_fraction = 0.2\n[train]\nsteps = 2\nbatch_size = 2\ndtype = "float32"\n')
    out = cli("finetune", "full", "ft.toml", "--out", "runs/ft", "--no-progress")
    assert "truncated and 3 dropped (longer than data.seq_len 32)" in out
    assert json.loads(Path("runs/ft/finetune.json").read_text())["dropped_examples"] == 3
