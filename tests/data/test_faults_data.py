"""Faults a user can cause around configs, data and disks: one line on stderr, exit 1, no traceback, and the
user's files left as they were.

Non-finite / negative settings, a model too large for memory, a directory where a file belongs, help text
with TOML section names, SFT examples that do not fit seq_len, a huge one-line document, a full disk.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moelab.model.memory as accounting  # the host-memory check (was in moelab.model.accounting)
from moelab.cli import app
from moelab.data.sft import load_sft
from moelab.data.sources import DataWarning
from moelab.data.tokenizer import byte_level_tokenizer
from moelab.errors import ConfigError, DataError
from moelab.model.transformer import DeepSeekForCausalLM

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def failed(result, *needles: str) -> str:
    """Assert a one-line user error (exit 1, no traceback) containing every needle; return stderr."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# 1. non-finite floats and negative threads in run configs
# ----------------------------------------------------------------------------------------------
def test_nonfinite_settings_and_negative_threads_are_refused_by_key(tmp_path):
    for setting, needles in [("train.threads=-1", ("train.threads", ">= 0")),
                             ("train.lr=nan", ("train.lr", "finite number", "nan")),
                             ("train.lr=inf", ("train.lr", "finite number", "inf")),
                             ("train.min_lr_ratio=-inf", ("train.min_lr_ratio", "finite number")),
                             ("train.betas=[0.9, nan]", ("train.betas", "finite number")),
                             ("balance.aux_alpha=nan", ("balance.aux_alpha", "finite number"))]:
        failed(run_cli("train", TINY, "--set", setting, "--out", tmp_path / "run", "--no-progress"), *needles)
    assert not (tmp_path / "run").exists()
    ft = tmp_path / "ft.toml"
    ft.write_text('[finetune]\nbase = "x"\n[data]\npath = "y.jsonl"\n[train]\nsteps = 1\n')
    for setting, needles in [("train.lr=nan", ("train.lr", "finite number")),
                             ("lora.alpha=inf", ("lora.alpha", "finite number"))]:
        failed(run_cli("finetune", "lora", ft, "--set", setting, "--out", tmp_path / "ft"), *needles)


# ----------------------------------------------------------------------------------------------
# 2. a model too large for memory
# ----------------------------------------------------------------------------------------------
def test_init_refuses_a_model_larger_than_memory(tmp_path, monkeypatch):
    avail = accounting.available_memory()
    assert avail is None or avail > 0
    big = tmp_path / "big.toml"
    big.write_text(TINY.read_text().replace("vocab_size = 512", "vocab_size = 1000000000"))
    monkeypatch.setattr(accounting, "available_memory", lambda: 8 * 10**9)
    line = failed(run_cli("init", big, "--out", tmp_path / "ckpt"), "needs ~1,024.0 GB", "float32",
                  "8.0 GB of memory", "vocab_size")
    assert "lower vocab_size or hidden_size" in line
    assert not (tmp_path / "ckpt").exists()

    # an allocation that fails anyway (the estimate missed) is the same kind of one-line message
    def no_memory(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(DeepSeekForCausalLM, "to_empty", no_memory)
    failed(run_cli("init", TINY, "--out", tmp_path / "ckpt"), "ran out of memory", "lower")
    assert not (tmp_path / "ckpt").exists()


# ----------------------------------------------------------------------------------------------
# 3. / 4. a directory where a file belongs
# ----------------------------------------------------------------------------------------------
def test_directory_given_for_a_file(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    before = tree_hash(d)
    failed(run_cli("data", "tasks", "arithmetic", "--size", "3", "--out", d), "is a directory", "tasks.jsonl")
    for command in (["init", d, "--out", tmp_path / "ckpt"], ["train", d, "--out", tmp_path / "run"]):
        failed(run_cli(*command), f"{d} is a directory; give a TOML config file (e.g. configs/tiny.toml)")
    assert tree_hash(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


# ----------------------------------------------------------------------------------------------
# 5. help keeps the TOML section names
# ----------------------------------------------------------------------------------------------
def test_help_keeps_bracketed_section_names():
    for command, needles in [(["init"], ["[model]"]), (["train"], ["[model]", "[data]", "[train]", "[balance]"]),
                             (["finetune", "full"], ["[finetune]", "[data]"])]:
        r = run_cli(*command, "--help")
        assert r.exit_code == 0, r.output
        text = " ".join(r.stdout.split())
        for needle in needles:
            assert needle in text, (command, r.stdout)


# ----------------------------------------------------------------------------------------------
# 6. SFT examples longer than seq_len
# ----------------------------------------------------------------------------------------------
def test_sft_examples_dropped_for_seq_len_say_so(tmp_path):
    base = tmp_path / "base"
    assert run_cli("init", TINY, "--out", base).exit_code == 0
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": "word " * 60 + str(i), "completion": "ok"} for i in range(12)]
    (data / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = tree_hash(data)
    cfg = tmp_path / "ft.toml"
    cfg.write_text(f'[finetune]\nbase = "{base}"\n[data]\npath = "{data / "long.jsonl"}"\nseq_len = 32\n'
                   '[train]\nsteps = 1\n')
    ft = ["finetune", "full", cfg, "--no-progress"]
    for extra in ([], ["--set", "data.val_fraction=0.5"]):
        line = failed(run_cli(*ft, *extra, "--out", tmp_path / "run"),
                      "12 of 12 examples dropped: prompt longer than seq_len (32)", "raise data.seq_len")
        assert "val_fraction" not in line
    assert tree_hash(data) == before and not (tmp_path / "run").exists()

    # a separate validation file whose examples are all too long is named as such
    short = data / "short.jsonl"
    short.write_text("".join(json.dumps({"prompt": f"hi {i}", "completion": "ok " * (20 if i % 2 else 1)}) + "\n"
                             for i in range(8)))
    with pytest.raises(DataError, match=r"long\.jsonl: 12 of 12 examples dropped"):
        load_sft(short, byte_level_tokenizer(), 32, val_path=data / "long.jsonl")
    # some truncated: one warning line with the counts, and the run goes on
    with pytest.warns(DataWarning, match=r"4 of 8 examples are longer than seq_len \(32\) and were truncated"):
        train, _, stats = load_sft(short, byte_level_tokenizer(), 32, val_fraction=0.2)
    assert stats.truncated == 4 and stats.no_target == 0 and len(train) > 0


# ----------------------------------------------------------------------------------------------
# 7. a huge one-line document is encoded in bounded pieces, with the same tokens
# ----------------------------------------------------------------------------------------------
_CHUNK_SCRIPT = textwrap.dedent("""
    import json, random, sys, warnings
    from pathlib import Path
    warnings.simplefilter("ignore")
    from moelab.data.tokenizer import save_tokenizer, train_tokenizer
    from moelab.data.tokens import TokenData, prepare
    root = Path(sys.argv[1])
    rng = random.Random(0)
    words = ["the", "of", "kingdom", "hath", "thee", "12", "'s", "--", "é", "\\n", "  ", "\\t"]
    text = "".join(rng.choice(words) + rng.choice([" ", " ", "", "  "]) for _ in range(600_000))
    (root / "src").mkdir()
    (root / "src" / "one.txt").write_text(text, encoding="utf-8")
    tok = train_tokenizer([text[:50_000]], 320)
    save_tokenizer(tok, root)
    tok.encode_special_tokens = True
    # VmHWM: this process's peak resident set, in kB. (ru_maxrss would not do: Linux carries it over exec
    # from the parent, so a big pytest process would hide the growth.)
    peak = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
    base = peak()
    if sys.argv[2] == "chunked":
        prepare(root / "src", root / "out", tokenizer=root / "tokenizer.json", max_chunk_bytes=1 << 16,
                progress=False)
        out = {"ids": TokenData(root / "out", "train").document(0)[:-1].tolist()}
    else:   # the oracle, in a process of its own: the whole document in one encode call
        out = {"ids": tok.encode(text, add_special_tokens=False).ids}
    print(json.dumps({"bytes": len(text.encode()), "grew": peak() - base, **out}))
""")


def test_prepare_encodes_a_long_document_in_bounded_pieces(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = {}
    for mode in ("chunked", "whole"):
        (tmp_path / mode).mkdir()
        p = subprocess.run([sys.executable, "-c", _CHUNK_SCRIPT, str(tmp_path / mode), mode], capture_output=True,
                           text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr
        r[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["chunked"]["bytes"] > 2_000_000
    assert r["chunked"]["ids"] == r["whole"]["ids"], "chunked encoding changed the tokens"
    grew = {m: round(r[m]["grew"]) for m in r}
    # 64 KiB at a time: a few MB; the whole document at once: ~400 MB
    assert grew["chunked"] < 40, grew
    assert grew["whole"] > grew["chunked"] + 200, grew


# ----------------------------------------------------------------------------------------------
# 8. a full disk
# ----------------------------------------------------------------------------------------------
def test_disk_full_is_one_line(tmp_path, monkeypatch):
    import moelab.data.tokens.encode as tokens_mod
    import moelab.interop.checkpoint as ckpt_mod

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("to be or not to be\n" * 200)
    (src / "b.txt").write_text("that is the question\n" * 200)
    before = tree_hash(src)

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "x.bin")

    monkeypatch.setattr(tokens_mod, "_write_batch", enospc)
    failed(run_cli("data", "prepare", src, "--out", tmp_path / "tok", "--vocab-size", "300", "-q"),
           "disk full while writing x.bin (free some space, then run again; nothing was half-written)")
    assert tree_hash(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

    # torch.save keeps no errno: a RuntimeError from its stream writer
    def torch_save_fails(model, out, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(ckpt_mod, "save", torch_save_fails)
    failed(run_cli("init", TINY, "--out", tmp_path / "ckpt"), "disk full while writing",
           "nothing was half-written")

    class FullDisk(io.RawIOBase):             # a real torch.save whose every write fails with ENOSPC
        name, mode = "state.pt", "wb"

        def writable(self):
            return True

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save", lambda model, out, **kw: torch.save(model.state_dict(), FullDisk()))
    failed(run_cli("init", TINY, "--out", tmp_path / "ckpt"), "disk full while writing state.pt")

    # any other error is a bug and keeps its traceback
    def bug(model, out, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(ckpt_mod, "save", bug)
    r = run_cli("init", TINY, "--out", tmp_path / "ckpt")
    assert isinstance(r.exception, RuntimeError) and "something else" in str(r.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_config_errors_are_moelab_errors():
    from moelab.train.config import load_run_config

    with pytest.raises(ConfigError, match="train.eps") as ei:
        load_run_config(TINY, ["train.eps=inf"])
    assert ei.value.__cause__ is None and ei.value.__suppress_context__
