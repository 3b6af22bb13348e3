"""Bad input to the analysis, evaluation and inference commands: one ``error:`` line, exit status 1, no
traceback, no hang, and the user's files left as they were.

Most commands run in-process (typer's CliRunner); the one whose point is what a dependency prints on
stderr runs in a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moelab
from moelab.cli import app
from moelab.config import load_model_config
from moelab.data.tokenizer import byte_level_tokenizer, save_tokenizer
from moelab.model.transformer import DeepSeekForCausalLM

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"
EXCERPT = ROOT / "tests" / "assets" / "shakespeare_excerpt.txt"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NO_CUDA = re.escape("--device cuda:7: CUDA is not available on this machine (")


# ----------------------------------------------------------------------------------------------
# helpers and fixtures
# ----------------------------------------------------------------------------------------------
def invoke(*args) -> str:
    """Run ``moelab ARGS`` in-process; assert a clean failure and return its ``error:`` line."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    text = _ANSI.sub("", result.output)
    assert result.exit_code == 1, (text, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught exception
    assert "Traceback" not in text, text
    errors = [line for line in _ANSI.sub("", result.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


def snapshot(root: Path) -> dict[str, str]:
    """What is under ``root``, by relative path: file hashes, link targets, other kinds (never opened)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[str(p.relative_to(root))] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p.relative_to(root))] = f"mode:{stat.S_IFMT(st.st_mode)}"
    return out


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging the suite) if the block takes longer than ``seconds``."""
    def boom(signum, frame):
        raise TimeoutError(f"took more than {seconds} s (hung?)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(byte_level_tokenizer(), d)       # 264 tokens
    return d


@pytest.fixture(scope="module")
def tiny_model():
    return DeepSeekForCausalLM.from_config(load_model_config(TINY), seed=0)


@pytest.fixture(scope="module")
def ckpt(tiny_model, tok_dir, tmp_path_factory) -> Path:
    return moelab.save(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer=tok_dir)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("text") / "t.txt"
    f.write_text(EXCERPT.read_text(encoding="utf-8")[:2000], encoding="utf-8")
    return f


def _copy_config_and_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                       bos_token_id=0, eos_token_id=1, pad_token_id=2)


class _Trap:
    """Unpickling this creates ``path`` (proof that a file was unpickled)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------------------------
# 1. model.safetensors that is not a regular file
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,words", [("loop", "symbolic link that loops"), ("directory", "is a directory"),
                                        ("fifo", "is a named pipe (FIFO)")])
def test_weight_file_that_is_not_a_regular_file(ckpt, tmp_path, kind, words):
    d = _copy_config_and_tokenizer(ckpt, tmp_path / "ck")
    target = d / "model.safetensors"
    if kind == "loop":
        target.symlink_to("model.safetensors")
    elif kind == "directory":
        target.mkdir()
    else:
        if not hasattr(os, "mkfifo"):
            pytest.skip("no named pipes here")
        os.mkfifo(target)
    before = snapshot(d)
    with deadline(60):
        line = invoke("generate", d, "--prompt-ids", "0,5", "-n", "2")
    assert str(target) in line and words in line, line
    assert snapshot(d) == before


# ----------------------------------------------------------------------------------------------
# 2. NaN weights in generate
# ----------------------------------------------------------------------------------------------
def test_generate_with_nan_weights(tiny_model, tok_dir, tmp_path):
    model = DeepSeekForCausalLM.from_config(tiny_model.config, seed=0)
    with torch.no_grad():
        model.model.layers[2].self_attn.q_a_proj.weight[0, 0] = float("nan")
    d = moelab.save(model, tmp_path / "nan", tokenizer=tok_dir)
    for how in (["--seed", "0"], ["--greedy"]):       # sampling crashed, greedy printed garbage
        line = invoke("generate", d, "--prompt-ids", "0,5", "-n", "3", *how)
        assert "non-finite logits at step 1" in line and "may be corrupt" in line, line
        assert "model.layers.2.self_attn.q_a_proj.weight" in line, line


# ----------------------------------------------------------------------------------------------
# 3. a tokenizer with ids beyond the model's vocabulary
# ----------------------------------------------------------------------------------------------
def test_eval_ppl_tokenizer_larger_than_vocab(tiny_model, tok_dir, text, tmp_path):
    cfg = tiny_model.config.model_copy(update={"vocab_size": 200})
    d = moelab.save(DeepSeekForCausalLM.from_config(cfg, seed=0), tmp_path / "small", tokenizer=tok_dir)
    line = invoke("eval", "ppl", d, text)
    assert "264 tokens" in line and "vocab_size is 200" in line, line


# ----------------------------------------------------------------------------------------------
# 4. --device that this machine does not have
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["routing", "activation", "probes", "esft", "ppl", "tasks", "ump", "generate"])
def test_unavailable_cuda_device(ckpt, text, tmp_path, command):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n > 7:
        pytest.skip("this machine has a cuda:7")
    out = tmp_path / "out"
    args = {"esft": ["esft", "score", ckpt, text.with_suffix(".jsonl"), "--out", out / "s.json"],
            "probes": ["analyze", "probes", ckpt, "--out", out, "--n", "10"],
            "ppl": ["eval", "ppl", ckpt, text], "tasks": ["eval", "tasks", ckpt, "--n", "2"],
            "ump": ["eval", "ump", ckpt, "--out", out, "--n", "2"],
            "generate": ["generate", ckpt, "--prompt", "a"]}.get(command,
                                                                 ["analyze", command, ckpt, text, "--out", out])
    if command == "esft":
        text.with_suffix(".jsonl").write_text('{"prompt": "1 + 1", "completion": "2"}\n', encoding="utf-8")
    line = invoke(*args, "--device", "cuda:7")
    if n == 0:
        assert re.search(_NO_CUDA + r".*\); use --device cpu$", line), line
    else:
        assert f"this machine has {n} CUDA device" in line and "use --device cpu" in line, line
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# 5. probes --lengths outside what can be drawn
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", ["20", "2-100000", "0-3"])
def test_probes_lengths_out_of_range(ckpt, tmp_path, lengths):
    out = tmp_path / "probes"
    line = invoke("analyze", "probes", ckpt, "--out", out, "-n", "10", "--lengths", lengths)
    assert f"--lengths {lengths}" in line and "from 1 to 18" in line, line
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# 6. options checked before any work or file
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option,words", [(["--sparsity", "1.5"], "--sparsity must be in [0, 1) (got 1.5)"),
                                          (["--beta", "nan"], "--beta must be a finite number"),
                                          (["--activation-threshold-mode", "quantil"], "quantil")])
def test_activation_options_checked_first(ckpt, text, tmp_path, option, words):
    out = tmp_path / "out"
    line = invoke("analyze", "activation", ckpt, text, "--out", out, *option)
    assert words in line, line
    assert not out.exists(), "an output directory was left behind"
    keep = tmp_path / "existing"                          # an existing --out is not touched either
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    before = snapshot(keep)
    invoke("analyze", "activation", ckpt, text, "--out", keep, *option)
    assert snapshot(keep) == before


# ----------------------------------------------------------------------------------------------
# 7. --out that is a file (directory outputs) or a directory (file outputs)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["analyze", "routing", "{ckpt}", "{text}"],
                                     ["analyze", "activation", "{ckpt}", "{text}"],
                                     ["analyze", "probes", "{ckpt}", "-n", "10"],
                                     ["eval", "ump", "{ckpt}", "--n", "2"]])
def test_out_is_a_file(ckpt, text, tmp_path, command):
    out = tmp_path / "X"
    out.write_text("user data")
    before = snapshot(tmp_path)
    line = invoke(*[a.format(ckpt=ckpt, text=text) for a in command], "--out", out)
    assert line == f"error: --out {out} is a file; give a directory", line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", [["eval", "ump-data"], ["esft", "score", "{ckpt}", "{text}"]])
def test_out_file_is_a_directory(ckpt, text, tmp_path, command):
    out = tmp_path / "X"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    before = snapshot(tmp_path)
    line = invoke(*[a.format(ckpt=ckpt, text=text) for a in command], "--out", out)
    assert f"--out {out} is a directory; give a file name" in line, line
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# 8. the malformed-line hint of esft score
# ----------------------------------------------------------------------------------------------
def test_esft_score_malformed_line_hint(ckpt, tmp_path):
    data = tmp_path / "task.jsonl"
    data.write_text('{"prompt": "1 + 1", "completion": "2"}\n{bad json\n', encoding="utf-8")
    out = tmp_path / "summary.json"
    line = invoke("esft", "score", ckpt, data, "--out", out, "--seq-len", "32", "--samples", "2", "-q")
    assert f"{data}:2: not valid JSON" in line and "fix or remove the line" in line, line
    assert "skip_malformed" not in line                    # esft score has no such setting
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# 9. weights that do not match a transformers config ("look at the above report!")
# ----------------------------------------------------------------------------------------------
def test_transformers_weights_not_matching_config(tok_dir, text, tmp_path):
    from transformers import LlamaForCausalLM

    d = tmp_path / "llama"
    LlamaForCausalLM(_llama_config()).save_pretrained(d)
    save_tokenizer(byte_level_tokenizer(), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 48                           # the weights have 64
    (d / "config.json").write_text(json.dumps(cfg))
    before = snapshot(d)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    p = subprocess.run([sys.executable, "-m", "moelab.cli", "analyze", "routing", str(d), str(text), "--out",
                        str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, env=env,
                       timeout=120)
    stderr = _ANSI.sub("", p.stderr)
    assert p.returncode == 1, stderr
    assert "Traceback" not in stderr and "above report" not in stderr and "LOAD REPORT" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.search(r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape \[\d+, \d+\], config\.json expects",
                     lines[0]), lines[0]
    assert snapshot(d) == before and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# 10. transformers directories with pickle weights are never unpickled
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["bin_only", "config_names_bin"])
def test_transformers_pickle_weights_refused(text, tmp_path, layout):
    from transformers import LlamaForCausalLM

    marker = tmp_path / "UNPICKLED"
    d = tmp_path / "llama"
    if layout == "bin_only":
        _llama_config().save_pretrained(d)
    else:                                                  # safetensors there, but config.json points elsewhere
        LlamaForCausalLM(_llama_config()).save_pretrained(d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["transformers_weights"] = "pytorch_model.bin"
        (d / "config.json").write_text(json.dumps(cfg))
    save_tokenizer(byte_level_tokenizer(), d)
    torch.save({"model.embed_tokens.weight": _Trap(marker)}, d / "pytorch_model.bin")
    before = snapshot(d)
    line = invoke("eval", "ppl", d, text)
    assert not marker.exists(), "pytorch_model.bin was unpickled"
    if layout == "bin_only":     # the words of moelab.load for a pickle-only DeepSeek checkpoint
        assert f"{d} holds only pickle weights (pytorch_model.bin); moelab never unpickles files" in line, line
    else:
        assert "'pytorch_model.bin' (transformers_weights)" in line and "never unpickles" in line, line
    assert snapshot(d) == before


def test_transformers_directory_still_loads(text, tmp_path):
    """The checks above leave a sound transformers checkpoint alone (and a stray pickle beside it unread)."""
    from transformers import LlamaForCausalLM

    from moelab.interop.hf_lm import load_causal_lm

    d = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(_llama_config()).save_pretrained(d)
    save_tokenizer(byte_level_tokenizer(), d)
    marker = tmp_path / "UNPICKLED"
    torch.save({"model.embed_tokens.weight": _Trap(marker)}, d / "pytorch_model.bin")
    model, tok = load_causal_lm(d)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 320
    assert not marker.exists()
