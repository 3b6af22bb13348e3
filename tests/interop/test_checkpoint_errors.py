"""A bad checkpoint (or a bad request to save one) gets a clear CheckpointError, never a deep stack trace;
the CLI prints it as one line."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from errcheck import clean_message, write_toml  # tests/support
from safetensors.torch import load_file, save_file

import moelab
import moelab.interop.checkpoint as ckpt_mod
from moelab.config import load_model_config
from moelab.errors import CheckpointError, ConfigError, MoelabError
from moelab.model.transformer import DeepSeekForCausalLM

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"
BASE = tomllib.loads(TINY.read_text())["model"]


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    return DeepSeekForCausalLM.from_config(load_model_config(TINY), seed=0)


@pytest.fixture(scope="module")
def good_ckpt(tiny_model, tmp_path_factory):
    return moelab.save(tiny_model, tmp_path_factory.mktemp("ckpt") / "good")


@pytest.fixture(scope="module")
def sharded_ckpt(tiny_model, tmp_path_factory):
    return moelab.save(tiny_model, tmp_path_factory.mktemp("ckpt") / "sharded", max_shard_size="1MB")


@pytest.fixture
def ckpt(good_ckpt, tmp_path):
    """A private copy of the good checkpoint to break."""
    return Path(shutil.copytree(good_ckpt, tmp_path / "ckpt"))


def _load_error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as ei:
        moelab.load(path, **kwargs)
    return clean_message(ei.value)


def test_good_checkpoint_loads(good_ckpt, sharded_ckpt, tiny_model):
    for path in (good_ckpt, sharded_ckpt):
        m = moelab.load(path)
        for (n, a), (_, b) in zip(m.state_dict().items(), tiny_model.state_dict().items(), strict=True):
            assert torch.equal(a, b), n


def test_errors_are_moelab_errors():
    assert issubclass(CheckpointError, MoelabError) and issubclass(ConfigError, MoelabError)
    assert moelab.CheckpointError is CheckpointError and moelab.MoelabError is MoelabError


def test_path_does_not_exist(tmp_path):
    msg = _load_error(tmp_path / "nowhere")
    assert "nowhere" in msg and "not found" in msg


def test_file_instead_of_directory(good_ckpt):
    msg = _load_error(good_ckpt / "model.safetensors")
    assert "model.safetensors" in msg and "directory" in msg


def test_directory_without_config_json(ckpt):
    (ckpt / "config.json").unlink()
    msg = _load_error(ckpt)
    assert "config.json" in msg and str(ckpt) in msg


def test_empty_directory(tmp_path):
    assert "config.json" in _load_error(tmp_path)


def test_directory_without_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    msg = _load_error(ckpt)
    assert "model.safetensors" in msg and "weights" in msg


class _Trap:
    """Unpickling this creates ``path`` (proof that a file was unpickled)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_trap_really_fires_when_unpickled(tmp_path):
    """Sanity check of the marker technique used below."""
    marker, f = tmp_path / "fired", tmp_path / "x.bin"
    torch.save({"w": _Trap(marker)}, f)
    assert not marker.exists()
    torch.load(f, weights_only=False)["w"].close()
    assert marker.exists()


def test_pickle_only_checkpoint_is_refused_without_unpickling(ckpt, tmp_path):
    marker = tmp_path / "UNPICKLED"
    (ckpt / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Trap(marker)}, ckpt / "pytorch_model.bin")
    msg = _load_error(ckpt)
    assert not marker.exists(), "moelab unpickled pytorch_model.bin"
    assert "pytorch_model.bin" in msg and "safetensors" in msg and "pickle" in msg


@pytest.mark.parametrize("writer", ["torch.save", "pickle2", "pickle4", "pickle5"])
def test_pickle_disguised_as_safetensors(ckpt, tmp_path, writer):
    marker = tmp_path / "UNPICKLED"
    target = ckpt / "model.safetensors"
    payload = {"model.embed_tokens.weight": _Trap(marker)}
    if writer == "torch.save":
        torch.save(payload, target)
    else:
        with open(target, "wb") as f:
            pickle.dump(payload, f, protocol=int(writer[-1]))
    msg = _load_error(ckpt)
    assert not marker.exists(), "moelab unpickled model.safetensors"
    assert "model.safetensors" in msg and "pickle" in msg.lower()


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    msg = _load_error(ckpt)
    assert "model.safetensors" in msg and "truncated" in msg


@pytest.mark.parametrize("cut", [0, 5, 8])
def test_tiny_or_empty_safetensors(ckpt, cut):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:cut])
    assert "model.safetensors" in _load_error(ckpt)


def _header(data: bytes) -> tuple[int, dict]:
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


@pytest.mark.parametrize("kind", ["garbage_json", "huge_length", "not_json", "bad_offsets", "offsets_past_end"])
def test_corrupt_header(ckpt, kind):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    n, header = _header(bytes(data))
    if kind == "garbage_json":
        data[9:40] = b"\x00garbage, not json at all!!!!\x01"
    elif kind == "huge_length":
        data[:8] = (1 << 60).to_bytes(8, "little")
    elif kind == "not_json":
        data[8:16] = b"\x00\x01\x02\x03\x04\x05\x06\x07"
    else:
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = "nonsense" if kind == "bad_offsets" else [0, 10**9]
        blob = json.dumps(header).encode()
        blob += b" " * ((8 - len(blob) % 8) % 8)
        data = bytearray(len(blob).to_bytes(8, "little") + blob + bytes(data[8 + n :]))
    f.write_bytes(bytes(data))
    msg = _load_error(ckpt)
    assert "model.safetensors" in msg


def _edit_tensors(ckpt: Path, edit) -> None:
    f = ckpt / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["model.norm.weight", "model.layers.2.self_attn.kv_a_layernorm.weight",
                                  "model.layers.1.mlp.experts.3.up_proj.weight",
                                  "model.layers.3.mlp.experts.15.down_proj.weight", "lm_head.weight"])
def test_missing_tensor_is_named(ckpt, name):
    _edit_tensors(ckpt, lambda t: t.pop(name))
    msg = _load_error(ckpt)
    assert name in msg and "missing" in msg


def test_many_missing_tensors_are_summarised(ckpt):
    _edit_tensors(ckpt, lambda t: [t.pop(k) for k in [k for k in t if ".mlp.experts." in k]])
    msg = _load_error(ckpt)
    assert "missing" in msg and "more" in msg and len(msg) < 2000


@pytest.mark.parametrize("name,shape", [("model.extra_proj.weight", (3, 4)),
                                        ("model.layers.1.mlp.experts.16.gate_proj.weight", (64, 128)),
                                        ("model.layers.0.mlp.experts.0.up_proj.weight", (64, 128))])
def test_unexpected_tensor_is_named(ckpt, name, shape):
    _edit_tensors(ckpt, lambda t: t.__setitem__(name, torch.zeros(shape)))
    msg = _load_error(ckpt)
    assert name in msg


@pytest.mark.parametrize("name,bad,good", [
    ("model.embed_tokens.weight", (500, 128), (512, 128)),
    ("model.layers.0.mlp.down_proj.weight", (128, 383), (128, 384)),
    ("model.layers.2.mlp.experts.7.gate_proj.weight", (63, 128), (64, 128)),
    ("model.layers.1.self_attn.q_a_proj.weight", (65, 128), (64, 128)),
])
def test_shape_mismatch_names_tensor_and_both_shapes(ckpt, name, bad, good):
    _edit_tensors(ckpt, lambda t: t.__setitem__(name, torch.zeros(bad)))
    msg = _load_error(ckpt)
    assert name in msg
    for shape in (bad, good):
        assert re.search(r"\D" + r",\s*".join(map(str, shape)) + r"\D", msg), f"{shape} missing from: {msg}"


def test_index_lists_a_missing_shard(sharded_ckpt, tmp_path):
    d = Path(shutil.copytree(sharded_ckpt, tmp_path / "sharded"))
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[1].unlink()
    msg = _load_error(d)
    assert shards[1].name in msg and "model.safetensors.index.json" in msg


@pytest.mark.parametrize("text", ["{not json", '{"metadata": {}}', "[1, 2]"])
def test_unreadable_index(sharded_ckpt, tmp_path, text):
    d = Path(shutil.copytree(sharded_ckpt, tmp_path / "sharded"))
    (d / "model.safetensors.index.json").write_text(text)
    assert "model.safetensors.index.json" in _load_error(d)


def test_index_weight_map_not_an_object(sharded_ckpt, tmp_path):
    d = Path(shutil.copytree(sharded_ckpt, tmp_path / "sharded"))
    (d / "model.safetensors.index.json").write_text('{"weight_map": [1, 2]}')
    _load_error(d)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe", "[1, 2, 3]", '"a string"'])
def test_config_json_not_json_or_not_an_object(ckpt, text):
    (ckpt / "config.json").write_bytes(text.encode("latin-1"))
    msg = _load_error(ckpt)
    assert "config.json" in msg


@pytest.mark.parametrize("model_type", ["llama", "mixtral", None, 3])
def test_model_type_not_deepseek(ckpt, model_type):
    raw = json.loads((ckpt / "config.json").read_text())
    if model_type is None:
        raw.pop("model_type")
    else:
        raw["model_type"] = model_type
    (ckpt / "config.json").write_text(json.dumps(raw))
    msg = _load_error(ckpt)
    assert repr(model_type) in msg and "deepseek_v3" in msg


def test_quantised_checkpoint(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3"}
    (ckpt / "config.json").write_text(json.dumps(raw))
    assert "quantis" in _load_error(ckpt)


def test_bad_value_in_config_json_is_a_moelab_error(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["hidden_size"] = "wide"
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(MoelabError) as ei:
        moelab.load(ckpt)
    msg = clean_message(ei.value)
    assert "hidden_size" in msg and "config.json" in msg


def test_unknown_override_suggests_field(good_ckpt):
    with pytest.raises(MoelabError) as ei:
        moelab.load(good_ckpt, atn_impl="naive")
    assert "'attn_impl'" in clean_message(ei.value)


# Malformed values in config.json: each must raise a MoelabError, never a bare Python error.
def _cfg_edit(**changes):
    def edit(raw):
        raw.update(changes)
        raw.pop("rope_scaling", None)
    return edit


MALFORMED = {
    "quantization_config_string": (_cfg_edit(quantization_config="fp8"), AttributeError,
                                   "hf_config.config_from_hf calls .get on a non-dict quantization_config"),
    "rope_parameters_string": (_cfg_edit(rope_parameters="yarn"), AttributeError,
                               "hf_config._rope_from_hf calls .get on a non-dict rope_parameters"),
    "yarn_factor_string": (_cfg_edit(rope_parameters={"rope_type": "yarn", "factor": "big",
                                                      "original_max_position_embeddings": 256}),
                           ValueError, "hf_config._rope_from_hf: float('big') escapes as a bare ValueError"),
    "model_type_list": (_cfg_edit(model_type=["deepseek_v3"]), TypeError,
                        "hf_config.config_from_hf: `model_type not in _HF_DEFAULTS` with an unhashable value"),
    "yarn_original_zero": (_cfg_edit(rope_parameters={"rope_type": "yarn", "original_max_position_embeddings": 0}),
                           ZeroDivisionError, "hf_config._rope_from_hf divides by original_max_position_embeddings"),
    "rope_theta_string": (_cfg_edit(rope_parameters={"rope_type": "default", "rope_theta": "fast"}), ValueError,
                          "hf_config._rope_from_hf: float('fast') escapes as a bare ValueError"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_config_json_malformed_values(ckpt, case):
    edit = MALFORMED[case][0]
    raw = json.loads((ckpt / "config.json").read_text())
    edit(raw)
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(MoelabError):
        moelab.load(ckpt)


@pytest.mark.parametrize("dtype", ["float33", "Tensor", "nn"])
def test_unknown_dtype_string(good_ckpt, dtype):
    assert repr(dtype) in _load_error(good_ckpt, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# save: bad arguments and atomic writes
# ----------------------------------------------------------------------------------------------
def test_save_bad_arguments(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="moelab model"):
        moelab.save(torch.nn.Linear(2, 2), tmp_path / "x")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="afile"):
        moelab.save(tiny_model, tmp_path / "afile")
    moelab.save(tiny_model, tmp_path / "exists", overwrite=False)     # a new checkpoint: fine
    with pytest.raises(CheckpointError, match="overwrite"):
        moelab.save(tiny_model, tmp_path / "exists", overwrite=False)  # replacing one needs overwrite=True
    with pytest.raises(CheckpointError, match="lots"):
        moelab.save(tiny_model, tmp_path / "y", max_shard_size="lots")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "exists"]


def _fail_after_first_save_file(monkeypatch) -> list[str]:
    real, calls = ckpt_mod.save_file, []

    def flaky(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) > 1:
            raise OSError(28, "No space left on device (simulated)")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_file", flaky)
    return calls


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_save_is_atomic_over_an_existing_checkpoint(tiny_model, tmp_path, monkeypatch):
    parent = tmp_path / "runs"
    out = moelab.save(tiny_model, parent / "ckpt")
    before = _snapshot(out)
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(1.0)
    calls = _fail_after_first_save_file(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        moelab.save(other, out, max_shard_size="1MB")
    assert len(calls) == 2  # it really failed midway, after one shard was written
    assert [p.name for p in parent.iterdir()] == ["ckpt"], "a temporary directory was left behind"
    assert _snapshot(out) == before
    monkeypatch.undo()
    loaded = moelab.load(out)
    assert torch.equal(loaded.model.embed_tokens.weight, tiny_model.model.embed_tokens.weight)


def test_save_is_atomic_for_a_new_checkpoint(tiny_model, tmp_path, monkeypatch):
    parent = tmp_path / "runs"
    parent.mkdir()
    calls = _fail_after_first_save_file(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        moelab.save(tiny_model, parent / "new", max_shard_size="1MB")
    assert len(calls) == 2
    assert list(parent.iterdir()) == []


def test_save_overwrites_when_complete(tiny_model, tmp_path):
    out = moelab.save(tiny_model, tmp_path / "ckpt", max_shard_size="1MB")
    assert (out / "model.safetensors.index.json").is_file()
    moelab.save(tiny_model, out)  # single file now: no stale shards or index may remain
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    moelab.load(out)


# ----------------------------------------------------------------------------------------------
# CLI: one line on stderr, non-zero exit, no traceback
# ----------------------------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    p = subprocess.run([sys.executable, "-m", "moelab.cli", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=120)
    p.stderr = _ANSI.sub("", p.stderr)
    return p


def _assert_clean_failure(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0, p
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error:"), p.stderr
    return lines[0]


def test_cli_info_missing_path(tmp_path):
    line = _assert_clean_failure(_cli("info", str(tmp_path / "missing.toml"), cwd=tmp_path))
    assert "missing.toml" in line


def test_cli_info_unknown_key(tmp_path):
    write_toml(tmp_path / "typo.toml", {**BASE, "hiden_size": 128})
    line = _assert_clean_failure(_cli("info", "typo.toml", cwd=tmp_path))
    assert "'hiden_size'" in line and "'hidden_size'" in line
    assert "[model]" in line  # not eaten as console markup


def test_cli_generate_without_config_json(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    line = _assert_clean_failure(_cli("generate", "ckpt", "--prompt-ids", "0,1", "-n", "2", cwd=tmp_path))
    assert "config.json" in line and "ckpt" in line


@pytest.mark.parametrize("eos,expected", [([], None), ([7, 9], 7), (9, 9)])
def test_eos_token_id_lists(ckpt, eos, expected):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["eos_token_id"] = eos
    (ckpt / "config.json").write_text(json.dumps(raw))
    assert moelab.load(ckpt).config.eos_token_id == expected


def test_index_may_not_point_outside_the_checkpoint(sharded_ckpt, tmp_path):
    d = Path(shutil.copytree(sharded_ckpt, tmp_path / "sharded"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere/model.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "outside the checkpoint directory" in _load_error(d)
