"""Vision-language configs (moelab.model.vl_config): the shipped TOMLs load and say what their headers say, bad
sections are clear errors, ``VisionLanguageModel.from_config`` is reproducible; parameter counts
(moelab.model.vl_accounting, on the meta device) against DeepSeek-VL2's Table 1 (docs/methods.md §12) and SigLIP;
``moelab info`` on a VL config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moelab.cli import app
from moelab.config import load_model_config
from moelab.data.tokenizer import byte_level_tokenizer
from moelab.errors import ConfigError
from moelab.model.vision_encoder import VisionConfig
from moelab.model.vl_accounting import pooling_head_params, vl_budget
from moelab.model.vl_config import (
    VLConfig,
    is_vl_toml,
    load_vl_config,
    release_order,
    tile_candidates,
    vl_config_from_sections,
)
from moelab.model.vl_model import VisionLanguageModel
from moelab.vision.processor import IMAGE, add_vl_tokens
from moelab.vision.tiling import candidate_resolutions

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VL2 = ["deepseek-vl2-tiny", "deepseek-vl2-small", "deepseek-vl2-base"]
LM = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
          qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, kv_lora_rank=16, q_lora_rank=None,
          n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=56,
              patch_size=14)


def _cfg(name: str) -> VLConfig:
    return load_vl_config(CONFIGS / f"{name}.toml")


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "vl.toml"
    p.write_text(text)
    return p


# --- the shipped configs -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [*VL2, "vl-tiny"])
def test_shipped_configs_load(name):
    cfg = _cfg(name)
    assert is_vl_toml(CONFIGS / f"{name}.toml")
    assert cfg.projector.projector_type == "downsample_mlp_gelu" and cfg.downsample == 2
    assert cfg.tile == cfg.vision.image_size and cfg.patch == cfg.vision.patch_size and cfg.max_tiles == 9
    if name != "vl-tiny":
        assert cfg.vision == VisionConfig()                          # SigLIP-SO400M/14@384
        assert cfg.grid == 14 and cfg.language.max_position_embeddings == 4096
        assert cfg.processor_settings() == dict(tile=384, patch=14, downsample=2, max_tiles=9)


def test_the_table_of_language_models():
    """docs/methods.md §12: d, L, heads, attention, experts, router, vocabulary."""
    rows = {"deepseek-vl2-tiny": (1280, 12, 10, False, 64, "softmax", 129280),
            "deepseek-vl2-small": (2048, 27, 16, True, 64, "softmax", 102400),
            "deepseek-vl2-base": (2560, 30, 32, True, 72, "sigmoid", 129280)}
    for name, (d, L, h, mla, E, router, vocab) in rows.items():
        c = _cfg(name).language
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.use_mla, c.n_routed_experts,
                c.scoring_func, c.vocab_size) == (d, L, h, mla, E, router, vocab)
        assert (c.n_shared_experts, c.num_experts_per_tok) == (2, 6)
        assert not mla or c.kv_lora_rank == 512
    base = _cfg("deepseek-vl2-base").language
    assert (base.routed_scaling_factor, base.topk_method, base.scale_only_if_unnormalized) == (2.0, "noaux_tc", False)
    assert _cfg("deepseek-vl2-small").image_token_id == 100003        # METHODS §12: Small's <image>


def test_tiny_language_model_is_the_lm_only_config():
    assert _cfg("deepseek-vl2-tiny").language == load_model_config(CONFIGS / "deepseek-vl2-tiny-lm.toml")


def test_vl_tiny_image_token_is_the_tokenizers():
    tok = add_vl_tokens(byte_level_tokenizer())
    cfg = _cfg("vl-tiny")
    assert cfg.image_token_id == tok.token_to_id(IMAGE) == 264
    assert cfg.language.vocab_size >= tok.get_vocab_size(with_added_tokens=True) == 272


def test_candidates_are_the_tilings_and_the_released_order():
    assert tile_candidates(9, 384) == candidate_resolutions(9, 384) and len(tile_candidates(9, 384)) == 23
    released = release_order(tile_candidates(9, 384), 384)
    assert released[:8] == [(384, 384), (384, 768), (768, 384), (384, 1152), (1152, 384), (384, 1536), (1536, 384),
                            (768, 768)]
    assert released[-3:] == [(384, 3456), (3456, 384), (1152, 1152)]


# --- bad sections ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,match", [
    ("[model]\nvocab_size = 320\n[vision]\nhiden_size = 8\n", r"unknown key 'hiden_size' in \[vision\].*did you "
                                                              r"mean 'hidden_size'"),
    ("[model]\nvocab_size = 320\n[vision]\n[projector]\ndownsample = 2\n", r"unknown key 'downsample' in "
                                                                          r"\[projector\].*downsample_ratio"),
    ("[model]\nvocab_size = 320\n[vision]\n[processor]\nmax_tile = 4\n", r"unknown key 'max_tile'.*max_tiles"),
    ("[model]\nvocab_size = 320\n[vision]\n[projector]\ndepth = 3\n", r"depth"),
    ("[model]\nvocab_size = 320\n[vision]\nhidden_size = 10\nnum_attention_heads = 4\n", "not divisible"),
    ("[model]\nvocab_size = 320\n[vision]\nimage_size = 56\n[processor]\ntile_size = 64\n", "tile_size 64"),
    ("[model]\nvocab_size = 320\n[vision]\n[processor]\nimage_token_id = 320\n", r"image_token_id 320 must lie"),
    ("[model]\nvocab_size = 320\n[vision]\n[processor]\nmax_tiles = 4\ncandidate_resolutions = [[384, 384]]\n",
     "not both"),
    ("[model]\nvocab_size = 320\n[vision]\n[processor]\ncandidate_resolutions = [[384, 384], [768, 768]]\n",
     "not the set"),
    ("[model]\nvocab_size = 320\n", r"no \[vision\] section"),
    ("[model]\nvocab_size = 320\n[vision]\n[visoin]\n", r"unknown section \[visoin\].*did you mean 'vision'"),
])
def test_bad_sections_are_clear_errors(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_vl_config(_toml(tmp_path, text))


def test_candidate_list_is_read_as_max_tiles(tmp_path):
    cands = json.dumps([list(wh) for wh in release_order(tile_candidates(4, 384), 384)])
    cfg = load_vl_config(_toml(tmp_path, f"[model]\nvocab_size = 320\n[vision]\n[processor]\n"
                                         f"candidate_resolutions = {cands}\n"))
    assert cfg.max_tiles == 4 and cfg.candidate_resolutions() == candidate_resolutions(4, 384)


def test_language_model_commands_refuse_a_vl_config_saying_why():
    with pytest.raises(ConfigError, match=r"\[vision\] .* belongs to a vision-language config"):
        load_model_config(CONFIGS / "vl-tiny.toml")


# --- building --------------------------------------------------------------------------------------------

def test_from_config_is_reproducible_and_leaves_the_global_rng():
    cfg = vl_config_from_sections({"model": LM, "vision": VISION}).with_image_token(5)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = VisionLanguageModel.from_config(cfg, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = VisionLanguageModel.from_config(cfg, seed=3)
    c = VisionLanguageModel.from_config(cfg, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["vision.encoder.layers.0.mlp.fc1.weight"], sc["vision.encoder.layers.0.mlp.fc1.weight"])
    assert a.vl_config == cfg and a.image_token_id == 5
    assert a.processor_settings() == dict(tile=56, patch=14, downsample=2, max_tiles=9)
    bf = VisionLanguageModel.from_config(cfg, seed=3, dtype=torch.bfloat16)
    assert bf.vision.embeddings.patch_embedding.weight.dtype == torch.bfloat16


def test_from_config_needs_an_image_token():
    cfg = vl_config_from_sections({"model": LM, "vision": VISION})
    with pytest.raises(ConfigError, match="image_token_id"):
        VisionLanguageModel.from_config(cfg)
    assert VisionLanguageModel.from_config(cfg, image_token_id=7).image_token_id == 7


# --- parameter counts against DeepSeek-VL2 Table 1 and SigLIP -----------------------------------------------

def test_encoder_is_siglip_so400m_without_its_head():
    """SigLIP-SO400M/14@384: 412,987,248 parameters without the pooling head, 428,225,600 with it (the "400M")."""
    b = vl_budget(_cfg("deepseek-vl2-tiny"))
    C, I, L, P = 1152, 4304, 27, 27 * 27
    per_layer = 4 * (C * C + C) + (C * I + I) + (I * C + C) + 4 * C
    assert b.vision_params == 3 * 14 * 14 * C + C + P * C + L * per_layer + 2 * C == 412_987_248
    assert b.vision_params + b.pooling_head_params == 428_225_600
    assert b.vision_params == pytest.approx(400e6, rel=0.05)


def test_encoder_counts_equal_transformers_siglip():
    transformers = pytest.importorskip("transformers")
    v = VisionConfig()
    for head, want in ((False, 0), (True, pooling_head_params(v))):
        hf = transformers.SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                             num_hidden_layers=v.num_hidden_layers, image_size=v.image_size,
                                             num_attention_heads=v.num_attention_heads, patch_size=v.patch_size,
                                             vision_use_head=head)
        with torch.device("meta"):
            n = sum(p.numel() for p in transformers.SiglipVisionModel(hf).parameters())
        assert n == vl_budget(_cfg("deepseek-vl2-tiny")).vision_params + want


# Reading that fits (moelab.model.vl_accounting): the paper's totals are the released files' parameters (language
# model + encoder with its never-run pooling head + adaptor); its activated counts leave out the input-embedding
# lookup and count the encoder and adaptor. The language model alone fits neither (Tiny: 2.93B / 0.74B).
PAPER = {"deepseek-vl2-tiny": (3.37e9, 1.0e9), "deepseek-vl2-small": (16.1e9, 2.8e9),
         "deepseek-vl2-base": (27.5e9, 4.5e9)}


@pytest.mark.parametrize("name", VL2)
def test_total_parameters_within_2_percent(name):
    b = vl_budget(_cfg(name))
    assert b.released_total_params == pytest.approx(PAPER[name][0], rel=0.02)
    assert b.total_params == pytest.approx(PAPER[name][0], rel=0.02)          # without the head, too


@pytest.mark.parametrize("name", ["deepseek-vl2-tiny", "deepseek-vl2-base"])
def test_activated_parameters_within_2_percent(name):
    assert vl_budget(_cfg(name)).activated_params_papers == pytest.approx(PAPER[name][1], rel=0.02)


@pytest.mark.xfail(strict=True, reason="Small: 2.878B activated against the paper's 2.8B (+2.8%). The paper's number "
                   "looks like DeepSeek-V2-Lite's rounded 2.4B plus 0.4B for the encoder; V2-Lite counted this way is "
                   "2.451B (tests/model/test_paper_configs.py: the same +2.1% on V2-Lite alone)")
def test_small_activated_parameters_within_2_percent():
    b = vl_budget(_cfg("deepseek-vl2-small"))
    assert b.activated_params_papers == pytest.approx(2.8e9, rel=0.02)


def test_the_language_model_alone_is_not_the_papers_reading():
    b = vl_budget(_cfg("deepseek-vl2-tiny"))
    assert b.language.total_params < 0.9 * 3.37e9 and b.language.activated_params < 0.8 * 1.0e9
    assert b.total_params == b.language.total_params + b.vision_params + b.adaptor_params
    assert b.adaptor_params == (4608 * 1280 + 1280) + (1280 * 1280 + 1280) + 2 * 1280


# --- moelab info -------------------------------------------------------------------------------------------

def test_info_of_a_vl_config():
    runner = CliRunner()
    r = runner.invoke(app, ["info", str(CONFIGS / "deepseek-vl2-small.toml")], env={"COLUMNS": "160"})
    assert r.exit_code == 0, r.output
    for row in ("language model: total parameters", "15.71B", "vision encoder", "412.99M", "adaptor",
                "VLM total parameters", "16.13B", "VLM activated parameters"):
        assert row in r.stdout
    data = json.loads(runner.invoke(app, ["info", str(CONFIGS / "deepseek-vl2-small.toml"), "--json"]).stdout)
    assert data["total_params"] == 15_706_484_224                     # the language model's, as for an LM config
    assert data["vl"]["vision_params"] == 412_987_248
    assert data["vl"]["released_total_params"] == pytest.approx(16.1e9, rel=0.02)
    plain = json.loads(runner.invoke(app, ["info", str(CONFIGS / "tiny.toml"), "--json"]).stdout)
    assert "vl" not in plain
