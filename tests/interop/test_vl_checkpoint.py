"""VL checkpoints in the layout of the released DeepSeek-VL2 models: a save -> load round trip computes the same
outputs; the tensor names are exactly the released scheme (listed by hand below from deepseek-ai/DeepSeek-VL2's
modeling_deepseek_vl_v2.py / siglip_vit.py naming: ``language.*``, timm ``vision.*``, ``projector.layers.{0,2}``,
``image_newline``, ``view_seperator``); config.json and processor_config.json hold the released sections; the
fused ``qkv`` is q rows, then k, then v; released extras (the pooling head, a released-style config.json) load;
broken inputs are clear errors."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from typer.testing import CliRunner

import moelab
from moelab.cli import app
from moelab.data.tokenizer import byte_level_tokenizer
from moelab.errors import CheckpointError
from moelab.interop.hf_config import config_to_hf
from moelab.interop.vl_checkpoint import is_vl_checkpoint, load_vl, load_vl_state_into, save_vl
from moelab.model.vl_config import vl_config_from_sections
from moelab.model.vl_model import VisionLanguageModel
from moelab.vision.processor import IMAGE, add_vl_tokens

C, I, L_VIS, HEADS, TILE, PATCH = 16, 40, 2, 2, 56, 14          # P = 16 patches, g = 2
MHA_LM = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              use_mla=False, rope_interleave=False, n_routed_experts=3, n_shared_experts=1, num_experts_per_tok=2,
              moe_intermediate_size=16, first_k_dense_replace=1, scoring_func="softmax", topk_method="greedy",
              norm_topk_prob=False, model_type="deepseek_v2", max_position_embeddings=256, initializer_range=0.05)
MLA_LM = dict(MHA_LM, use_mla=True, rope_interleave=True, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
              qk_rope_head_dim=4, v_head_dim=8, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
              routed_scaling_factor=2.0)
IMAGE_ID = 264                                                   # <image> of byte_level_tokenizer + add_vl_tokens


def sections(lm: dict) -> dict:
    return {"model": lm, "vision": dict(hidden_size=C, intermediate_size=I, num_hidden_layers=L_VIS,
                                        num_attention_heads=HEADS, image_size=TILE, patch_size=PATCH),
            "projector": {"downsample_ratio": 2}, "processor": {"max_tiles": 9, "image_token_id": IMAGE_ID}}


def make_model(lm: dict = MHA_LM, seed: int = 0) -> VisionLanguageModel:
    return VisionLanguageModel.from_config(vl_config_from_sections(sections(lm)), seed=seed).eval()


def run(model, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    views = torch.randn(1 + 2 * 1, 3, TILE, TILE, generator=g)          # a 2×1 canvas: N = 6 + 1 + 2·(4 + 1) = 17
    ids = torch.tensor([[0, 7, 8] + [IMAGE_ID] * 17 + [9, 10]])
    with torch.no_grad():
        return model(ids, [(views, (2, 1))]).logits


def expected_names(lm: dict) -> list[str]:
    """The released names for the test configs, written out from the released naming scheme."""
    names = ["image_newline", "view_seperator", "language.lm_head.weight", "language.model.embed_tokens.weight",
             "language.model.norm.weight", "projector.layers.0.weight", "projector.layers.0.bias",
             "projector.layers.2.weight", "projector.layers.2.bias", "vision.pos_embed",
             "vision.patch_embed.proj.weight", "vision.patch_embed.proj.bias", "vision.norm.weight", "vision.norm.bias"]
    for i in range(L_VIS):
        names += [f"vision.blocks.{i}.{m}.{k}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                                          "mlp.fc2") for k in ("weight", "bias")]
    attn = (["q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"] if lm["use_mla"]
            else ["q_proj", "k_proj", "v_proj", "o_proj"])
    for i in range(2):
        p = f"language.model.layers.{i}"
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
        names += [f"{p}.self_attn.{a}.weight" for a in attn]
        if i == 0:                                                   # first_k_dense_replace = 1
            names += [f"{p}.mlp.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")]
            continue
        names += [f"{p}.mlp.gate.weight"] + ([f"{p}.mlp.gate.e_score_correction_bias"] if lm["use_mla"] else [])
        names += [f"{p}.mlp.shared_experts.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")]
        names += [f"{p}.mlp.experts.{e}.{w}.weight" for e in range(3) for w in ("gate_proj", "up_proj", "down_proj")]
    return sorted(names)


def file_names(directory: Path) -> list[str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make_model()
    return model, save_vl(model, tmp_path_factory.mktemp("vl") / "ckpt")


# --- round trip ------------------------------------------------------------------------------------

@pytest.mark.parametrize("lm", [MHA_LM, MLA_LM], ids=["mha-tiny-like", "mla-sigmoid-base-like"])
def test_round_trip_gives_identical_outputs_and_config(lm, tmp_path):
    model = make_model(lm)
    out = save_vl(model, tmp_path / "ckpt")
    back = load_vl(out)
    torch.testing.assert_close(run(back), run(model), rtol=0, atol=0)
    a, b = model.vl_config, back.vl_config
    assert (a.vision, a.projector, a.processor, a.image_token_id) == (b.vision, b.projector, b.processor,
                                                                       b.image_token_id)
    assert config_to_hf(a.language) == config_to_hf(b.language)
    assert back.processor_settings() == dict(tile=TILE, patch=PATCH, downsample=2, max_tiles=9)


@pytest.mark.parametrize("lm", [MHA_LM, MLA_LM], ids=["mha-tiny-like", "mla-sigmoid-base-like"])
def test_tensor_names_are_the_released_ones(lm, tmp_path):
    assert file_names(save_vl(make_model(lm), tmp_path / "ckpt")) == expected_names(lm)


def test_shapes_on_disk(saved):
    _, path = saved
    t = load_file(str(path / "model.safetensors"))
    assert t["vision.pos_embed"].shape == (1, (TILE // PATCH) ** 2, C)             # timm: [1, P, C]
    assert t["vision.blocks.0.attn.qkv.weight"].shape == (3 * C, C)
    assert t["vision.blocks.0.attn.qkv.bias"].shape == (3 * C,)
    assert t["vision.patch_embed.proj.weight"].shape == (C, 3, PATCH, PATCH)
    assert t["projector.layers.0.weight"].shape == (32, C * 4)
    assert t["image_newline"].shape == t["view_seperator"].shape == (32,)


def test_qkv_is_q_rows_then_k_then_v(tmp_path):
    model = make_model()
    attn = model.vision.encoder.layers[1].self_attn
    with torch.no_grad():
        for value, proj in ((1.0, attn.q_proj), (2.0, attn.k_proj), (3.0, attn.v_proj)):
            proj.weight.fill_(value)
            proj.bias.fill_(10 * value)
    t = load_file(str(save_vl(model, tmp_path / "ckpt") / "model.safetensors"))
    w, b = t["vision.blocks.1.attn.qkv.weight"], t["vision.blocks.1.attn.qkv.bias"]
    for k, value in enumerate((1.0, 2.0, 3.0)):
        assert bool((w[k * C:(k + 1) * C] == value).all()) and bool((b[k * C:(k + 1) * C] == 10 * value).all())
    back = load_vl(tmp_path / "ckpt").vision.encoder.layers[1].self_attn
    assert back.k_proj.weight[0, 0].item() == 2.0 and back.v_proj.bias[-1].item() == 30.0


def test_timm_attention_on_the_file_equals_the_encoders(saved):
    """timm's Attention reads qkv(x) as [B, P, 3, heads, C/heads]: the released weights in that reading compute
    what moelab's (transformers-named) attention computes."""
    model, path = saved
    t = load_file(str(path / "model.safetensors"))
    x = torch.randn(1, (TILE // PATCH) ** 2, C)
    B, P, _ = x.shape
    qkv = (x @ t["vision.blocks.0.attn.qkv.weight"].T + t["vision.blocks.0.attn.qkv.bias"])
    q, k, v = qkv.reshape(B, P, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, P, C)
    y = y @ t["vision.blocks.0.attn.proj.weight"].T + t["vision.blocks.0.attn.proj.bias"]
    with torch.no_grad():
        torch.testing.assert_close(y, model.vision.encoder.layers[0].self_attn(x))


# --- config.json, processor_config.json ------------------------------------------------------------

def test_config_json_sections(saved):
    model, path = saved
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_vl_v2" and cfg["architectures"] == ["DeepseekVLV2ForCausalLM"]
    assert cfg["language_config"] == config_to_hf(model.language.config, "float32")
    v = cfg["vision_config"]
    assert (v["width"], v["layers"], v["heads"], v["image_size"], v["patch_size"]) == (C, L_VIS, HEADS, TILE, PATCH)
    assert int(v["width"] * v["mlp_ratio"]) == I and v["ignore_head"] is True and v["class_token"] is False
    assert v["global_pool"] == ""                          # no pooling head written (see vl_hf_config)
    assert cfg["projector_config"] == {"model_type": "mlp_projector", "projector_type": "downsample_mlp_gelu",
                                       "input_dim": C, "n_embed": 32, "depth": 2, "mlp_ratio": 1,
                                       "downsample_ratio": 2, "token_pooling": False}
    assert (cfg["tile_tag"], cfg["global_view_pos"], cfg["image_token_id"]) == ("2D", "head", IMAGE_ID)
    # the released order of the 23 canvases (m·T, n·T), m·n <= 9: by tiles, then the thinner side, then width
    order = [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1), (2, 2), (1, 5), (5, 1), (1, 6), (6, 1), (2, 3),
             (3, 2), (1, 7), (7, 1), (1, 8), (8, 1), (2, 4), (4, 2), (1, 9), (9, 1), (3, 3)]
    assert cfg["candidate_resolutions"] == [[m * TILE, n * TILE] for m, n in order]
    proc = json.loads((path / "processor_config.json").read_text())
    assert proc["candidate_resolutions"] == cfg["candidate_resolutions"]
    assert (proc["patch_size"], proc["downsample_ratio"], proc["image_mean"], proc["image_std"]) == \
        (PATCH, 2, [0.5] * 3, [0.5] * 3)
    assert (proc["image_token"], proc["processor_class"], proc["sft_format"]) == \
        ("<image>", "DeepseekVLV2Processor", "deepseek")


def test_so400m_mlp_ratio_is_the_released_one():
    from moelab.interop.vl_hf_config import mlp_ratio_for, vision_to_hf
    from moelab.model.vision_encoder import VisionConfig

    assert mlp_ratio_for(1152, 4304) == 3.7362                # siglip_vit.py's SO400M mlp_ratio
    assert vision_to_hf(VisionConfig())["model_name"] == "siglip_so400m_patch14_384"


# --- released checkpoints ---------------------------------------------------------------------------

def test_a_released_style_checkpoint_loads(saved, tmp_path):
    """config.json as released (no moelab keys, global_pool default "map", Tiny's MHA language_config with null
    MLA keys and no rope_interleave), the pooling head's tensors, the <image> id from tokenizer.json."""
    model, path = saved
    rel = tmp_path / "released"
    shutil.copytree(path, rel)
    cfg = json.loads((rel / "config.json").read_text())
    for key in ("image_token_id",):
        cfg.pop(key)
    for key in ("intermediate_size", "layer_norm_eps", "global_pool", "ignore_head", "class_token", "num_classes"):
        cfg["vision_config"].pop(key)
    cfg["vision_config"]["mlp_ratio"] = 2.5                    # int(16 · 2.5) = 40
    lang = cfg["language_config"]
    lang.pop("rope_interleave")
    lang.update(kv_lora_rank=None, q_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0,
                lm_head=True, rm_head=False)
    (rel / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(rel / "model.safetensors"))
    head = {"vision.attn_pool.latent": torch.zeros(1, 1, C), "vision.attn_pool.q.weight": torch.zeros(C, C),
            "vision.attn_pool.kv.weight": torch.zeros(2 * C, C), "vision.attn_pool.proj.weight": torch.zeros(C, C),
            "vision.attn_pool.norm.weight": torch.ones(C), "vision.attn_pool.mlp.fc1.weight": torch.zeros(I, C)}
    save_file({**tensors, **head}, str(rel / "model.safetensors"))
    tok = add_vl_tokens(byte_level_tokenizer())
    tok.save(str(rel / "tokenizer.json"))
    back = load_vl(rel)
    assert back.image_token_id == tok.token_to_id(IMAGE) == IMAGE_ID
    assert back.language.config.rope_interleave is False and back.language.config.use_mla is False
    torch.testing.assert_close(run(back), run(model), rtol=0, atol=0)


# --- options -----------------------------------------------------------------------------------------

def test_sharded_bf16_tokenizer_and_overwrite(saved, tmp_path):
    model, _ = saved
    tok = add_vl_tokens(byte_level_tokenizer())
    out = save_vl(model, tmp_path / "ckpt", tokenizer=tok, dtype=torch.bfloat16, max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and sorted(index["weight_map"]) == expected_names(MHA_LM)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id(IMAGE) == IMAGE_ID
    back = load_vl(out)
    assert back.language.model.embed_tokens.weight.dtype == torch.bfloat16
    assert back.vision.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="--overwrite"):
        save_vl(model, out)
    save_vl(model, out, overwrite=True)
    assert not (out / "model.safetensors.index.json").exists()


def test_load_state_into_an_existing_model(saved):
    model, path = saved
    other = make_model(seed=5)
    assert not torch.equal(run(other), run(model))
    load_vl_state_into(other, path)
    torch.testing.assert_close(run(other), run(model), rtol=0, atol=0)


def test_info_of_a_checkpoint_equals_info_of_its_config(saved, tmp_path):
    model, path = saved
    toml = tmp_path / "vl.toml"
    lines = []
    for name, sec in sections(MHA_LM).items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in sec.items()]
    toml.write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    a = json.loads(runner.invoke(app, ["info", str(path), "--json"]).stdout)
    b = json.loads(runner.invoke(app, ["info", str(toml), "--json"]).stdout)
    assert a.pop("config") != b.pop("config") and a == b
    assert a["vl"]["total_params"] == sum(p.numel() for p in model.parameters())


# --- errors ------------------------------------------------------------------------------------------

def _copy(path: Path, tmp_path: Path, edit) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(bad / "model.safetensors"))
    return bad


def test_missing_tensor(saved, tmp_path):
    bad = _copy(saved[1], tmp_path, lambda t: t.pop("vision.blocks.1.attn.qkv.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): vision.blocks.1.attn.qkv.weight"):
        load_vl(bad)


def test_wrong_shape(saved, tmp_path):
    def edit(t):
        t["vision.pos_embed"] = torch.zeros(1, 17, C)

    with pytest.raises(CheckpointError, match=r"vision.pos_embed has shape \[1, 17, 16\], the config expects "
                                              r"\[1, 16, 16\]"):
        load_vl(_copy(saved[1], tmp_path, edit))


def test_unexpected_tensor(saved, tmp_path):
    def edit(t):
        t["vision.blocks.9.norm1.weight"] = torch.ones(C)

    with pytest.raises(CheckpointError, match="does not describe: vision.blocks.9.norm1.weight"):
        load_vl(_copy(saved[1], tmp_path, edit))


def test_not_a_vl_directory(tmp_path, tiny_lm_checkpoint):
    with pytest.raises(CheckpointError, match="not a DeepSeek-VL2 checkpoint.*moelab.load"):
        load_vl(tiny_lm_checkpoint)
    with pytest.raises(CheckpointError, match="not a DeepSeek-VL2 checkpoint"):
        load_vl_state_into(make_model(), tiny_lm_checkpoint)
    assert not is_vl_checkpoint(tiny_lm_checkpoint)
    with pytest.raises(CheckpointError, match="not found"):
        load_vl(tmp_path / "nowhere")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_vl(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_vl(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="VisionLanguageModel"):
        save_vl(torch.nn.Linear(2, 2), tmp_path / "x")


def test_unsupported_layouts_are_refused(saved, tmp_path):
    for key, value, match in (("tile_tag", "1D", "tile_tag"), ("global_view_pos", "tail", "global_view_pos")):
        bad = tmp_path / key
        shutil.copytree(saved[1], bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg[key] = value
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=match):
            load_vl(bad)
    bad = tmp_path / "projector"
    shutil.copytree(saved[1], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["projector_config"]["depth"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="depth 3"):
        load_vl(bad)


@pytest.fixture
def tiny_lm_checkpoint(tmp_path):
    lm = vl_config_from_sections(sections(MHA_LM)).language
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                   # "transformers has no MHA DeepseekV2": not the point here
        return moelab.save(moelab.DeepSeekForCausalLM.from_config(lm, seed=0), tmp_path / "lm")
