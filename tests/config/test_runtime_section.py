"""``[runtime]``: the kernels, the attention path and both compile switches in one section, apart from
the architecture (``[model]``) — for pre-training and fine-tuning runs alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from moelab.config import RUNTIME_FIELDS, RuntimeSettings
from moelab.errors import ConfigError
from moelab.train.config import load_run_config
from moelab.tune.config import load_finetune_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.toml"


def test_runtime_section_sets_model_and_train():
    cfg = load_run_config(TINY, ['runtime.expert_impl="loop"', 'runtime.attn_impl="naive"',
                                 "runtime.compile_experts=true", "runtime.compile=true"])
    assert (cfg.model.expert_impl, cfg.model.attn_impl, cfg.model.compile_experts) == ("loop", "naive", True)
    assert cfg.train.compile is True
    shipped = load_run_config(TINY)                       # tiny.toml's own [runtime]
    assert (shipped.model.expert_impl, shipped.model.attn_impl, shipped.train.compile) == \
        ("grouped_mm", "absorb", False)
    assert set(RuntimeSettings.model_fields) == {*RUNTIME_FIELDS, "compile"}


def test_runtime_and_model_may_agree_but_not_contradict():
    cfg = load_run_config(TINY, ['runtime.expert_impl="loop"', 'model.expert_impl="loop"'])
    assert cfg.model.expert_impl == "loop"
    with pytest.raises(ConfigError, match=r"runtime.expert_impl = 'loop' contradicts model.expert_impl = 'fused'"):
        load_run_config(TINY, ['runtime.expert_impl="loop"', 'model.expert_impl="fused"'])
    with pytest.raises(ConfigError, match=r"runtime.attn_impl = 'absorb' contradicts model.attn_impl = 'naive'"):
        load_run_config(TINY, ['model.attn_impl="naive"'])              # tiny.toml's [runtime] says absorb
    with pytest.raises(ConfigError, match=r"runtime.compile = True contradicts train.compile = False"):
        load_run_config(TINY, ["runtime.compile=true", "train.compile=false"])


def test_runtime_section_is_strict():
    with pytest.raises(ConfigError, match="expert_imp"):
        load_run_config(TINY, ['runtime.expert_imp="loop"'])
    with pytest.raises(ConfigError, match="expert_impl"):
        load_run_config(TINY, ['runtime.expert_impl="triton"'])


def test_compile_takes_a_scope():
    """``compile``: false, true (= "blocks": whole decoder blocks) or "dense" (their dense parts only)."""
    assert load_run_config(TINY, ['runtime.compile="dense"']).train.compile == "dense"
    assert load_run_config(TINY, ['train.compile="blocks"']).train.compile is True      # one spelling
    assert load_run_config(TINY, ['runtime.compile="blocks"', "train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match="compile"):
        load_run_config(TINY, ['runtime.compile="fast"'])


def test_finetune_runtime_section(tmp_path):
    toml = tmp_path / "ft.toml"
    toml.write_text('[finetune]\nbase = "b"\n[data]\npath = "d.jsonl"\n[train]\nsteps = 2\n'
                    '[runtime]\nexpert_impl = "loop"\ncompile = true\n')
    cfg = load_finetune_config(toml, [], method="full")
    assert cfg.runtime.model_settings() == {"expert_impl": "loop"} and cfg.train.compile is True
