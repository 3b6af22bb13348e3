"""The command line on inputs users get wrong: one line that names the problem and the fix, files others can
read, nothing overwritten unasked, and Ctrl-C during start-up as calm as during a command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from moelab.cli import app
from moelab.cli_utils import friendly

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"


def fails(*args, says: str) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code != 0 and r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output and says in r.output, r.output
    return r.output


@pytest.fixture
def run_dir(tmp_path, tiny_checkpoint):
    """What `moelab train` leaves: run config, metrics, checkpoints/, and the final model in model/."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    shutil.copytree(tiny_checkpoint, run / "model")
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    (run / "metrics.jsonl").write_text("")
    return run


@pytest.mark.parametrize("command", [["info"], ["generate", "--prompt", "Hi"], ["eval", "ppl", "-", "x"]],
                         ids=["info", "generate", "eval_ppl"])
def test_a_run_directory_given_for_a_model_names_the_model_inside(run_dir, command):
    args = [*command[:1 if command[0] != "eval" else 2], run_dir, *command[1 if command[0] != "eval" else 3:]]
    if command[0] == "eval":
        (run_dir / "text.txt").write_text("To be, or not to be.\n")
        args[-1] = run_dir / "text.txt"
    fails(*args, says=f"{run_dir} is a training run directory, not a checkpoint; its model is {run_dir / 'model'}")


def test_a_run_without_a_model_yet_says_where_it_will_be(run_dir):
    shutil.rmtree(run_dir / "model")
    fails("info", run_dir, says="with no saved model yet")


def test_a_path_through_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    fails("init", TINY, "--out", tmp_path / "afile" / "model", says="check the path")


def test_an_unwritable_path_is_one_line_naming_the_result_not_its_temp(capsys):
    @friendly
    def command():
        raise PermissionError(13, "Permission denied", "/data/ro/.model.tmp-123-abcd")

    with pytest.raises(typer.Exit) as e:
        command()
    assert e.value.exit_code == 1
    assert "/data/ro/model: permission denied; give a path you may write to" in capsys.readouterr().err


def test_other_os_errors_still_show_their_trace():
    @friendly
    def command():
        raise ConnectionResetError(104, "Connection reset by peer")    # no file name: not a path problem

    with pytest.raises(ConnectionResetError):
        command()


def test_generate_refuses_to_run_past_the_context(tiny_checkpoint):
    fails("generate", tiny_checkpoint, "--prompt-ids", "5,6,7", "-n", "300",   # the tiny model's context: 256
          says="the prompt (3 tokens) plus -n 300 new tokens exceeds the model's context of 256 tokens")
    fails("generate", tiny_checkpoint, "--prompt-ids", ",".join(["5"] * 256), "-n", "1", says="shorten the prompt")
    r = CliRunner().invoke(app, ["generate", str(tiny_checkpoint), "--prompt-ids", "5,6,7", "-n", "253", "--greedy"])
    assert r.exit_code == 0, r.output                                        # exactly the context: fine


def test_written_checkpoints_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        r = CliRunner().invoke(app, ["init", str(TINY), "--out", str(tmp_path / "m")])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    for f in (tmp_path / "m").iterdir():          # safetensors writes 0600 by itself
        assert f.stat().st_mode & 0o044 == 0o044, (f.name, oct(f.stat().st_mode))


def test_data_tasks_keeps_an_existing_file_unless_told(tmp_path):
    out = tmp_path / "train.jsonl"
    out.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    fails("data", "tasks", "arithmetic", "--size", "3", "--out", out, says="pass --overwrite")
    assert out.read_text().count("\n") == 1
    r = CliRunner().invoke(app, ["data", "tasks", "arithmetic", "--size", "3", "--out", str(out), "--overwrite"])
    assert r.exit_code == 0 and out.read_text().count("\n") == 3
    assert out.stat().st_mode & 0o044 == 0o044


def test_eval_ppl_names_a_file_that_is_not_utf8(tiny_checkpoint, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    fails("eval", "ppl", tiny_checkpoint, bad, says="not UTF-8")


def test_bad_numbers_are_refused_before_any_work(tiny_checkpoint, tmp_path):
    fails("extend-context", tiny_checkpoint, "--factor", "inf", "--out", tmp_path / "e", says="must be > 1 and finite")
    fails("scaling", "suggest", "--budget", "1e20", "--aspect", "0", says="--aspect")


def test_ctrl_c_during_start_up_is_calm():
    """The commands import torch (seconds); an interrupt meanwhile prints `interrupted`, not a trace."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "moelab.cli", "info", str(TINY)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=60)
    assert "Traceback" not in stderr, stderr
    # 130: interrupted in moelab; -SIGINT: before Python itself was up (a loaded machine); 0: it was done
    assert p.returncode in (0, 130, -signal.SIGINT), (p.returncode, stderr)


def test_a_negative_seed_is_refused_by_name_before_the_run_directory_exists(tmp_path):
    fails("train", TINY, "--out", tmp_path / "run", "--set", "train.seed=-1", says="train.seed must be >= 0")
    assert not (tmp_path / "run").exists()


def test_serve_on_a_taken_port_says_so_before_loading(tiny_checkpoint):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        fails("serve", tiny_checkpoint, "--port", port, says=f"cannot listen on 127.0.0.1:{port}")


def test_extend_context_checks_the_weights_it_copies(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    fails("extend-context", ckpt, "--factor", "2", "--out", tmp_path / "long", says="is truncated")
    assert not (tmp_path / "long").exists()
