"""The image encoder equals transformers' SiglipVisionModel(vision_use_head=False) on the same weights
(hidden 64, 2 layers, 56-pixel views, as METHODS §12 asks), and the adaptor's 2×2 unfold is channel-major
with zero padding (a hand-made case), sizes as the released model's (27×27 -> 14×14)."""

from __future__ import annotations

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from moelab.model.vision_encoder import VisionConfig, VisionEncoder
from moelab.model.vision_projector import VisionProjector, unfold_tokens


def test_encoder_equals_transformers_siglip():
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
              patch_size=14)
    torch.manual_seed(0)
    hf = SiglipVisionModel(SiglipVisionConfig(**kw, vision_use_head=False)).eval()
    ours = VisionEncoder(VisionConfig(**kw)).eval()
    missing = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        want = hf(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == (3, 16, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unfold_is_channel_major_with_zero_padding():
    # C = 2 channels on a 3×3 grid (padded to 4×4): token 0 takes rows 0-1, columns 0-1
    grid = torch.arange(2 * 9, dtype=torch.float32).view(2, 3, 3)           # [C, 3, 3]
    x = grid.flatten(1).t().unsqueeze(0)                                     # [1, 9, 2] (patch-major)
    out = unfold_tokens(x, 2)
    assert out.shape == (1, 4, 8)
    c0, c1 = grid[0], grid[1]
    assert out[0, 0].tolist() == [c0[0, 0], c0[0, 1], c0[1, 0], c0[1, 1], c1[0, 0], c1[0, 1], c1[1, 0], c1[1, 1]]
    assert out[0, 1].tolist() == [c0[0, 2], 0, c0[1, 2], 0, c1[0, 2], 0, c1[1, 2], 0]      # right edge padded
    assert out[0, 3].tolist() == [c0[2, 2], 0, 0, 0, c1[2, 2], 0, 0, 0]


def test_released_sizes():
    proj = VisionProjector(vision_width=1152, lm_width=32)
    y = proj(torch.zeros(2, 729, 1152))
    assert y.shape == (2, 196, 32) and proj.layers[0].in_features == 4608
