"""The vision-language model's assembly: an image becomes exactly the N vectors of its layout (global rows +
newlines, the separator, local rows + newlines, tiles row-major), they fill the <image> positions in order,
and a wrong number of positions is refused; text-only input equals the language model alone."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config

from moelab.errors import MoelabError
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.model.vision_encoder import VisionConfig
from moelab.model.vl_model import VisionLanguageModel
from moelab.vision.tiling import layout

VISION = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=56, patch_size=14)
IMAGE = 5


@pytest.fixture
def vlm():
    torch.manual_seed(0)
    return VisionLanguageModel(DeepSeekForCausalLM.from_config(tiny_config(), seed=0), VISION, IMAGE).eval()


def test_image_vectors_follow_the_layout(vlm):
    lay = layout((300, 130), tile=56, patch=14)                  # 4×2 tiles, g = 2, N = 43
    views = torch.randn(lay.views, 3, 56, 56)
    with torch.no_grad():
        emb = vlm.image_embeddings(views, lay.tiles)
        feats = vlm.projector(vlm.vision(views))                 # [9, 4, D]
    assert emb.shape == (lay.tokens, 32) and lay.tokens == 43
    g, nl, sep = 2, vlm.image_newline, vlm.view_separator
    torch.testing.assert_close(emb[0], feats[0, 0])
    torch.testing.assert_close(emb[1], feats[0, 1])
    torch.testing.assert_close(emb[2], nl)                       # end of the global view's first row
    torch.testing.assert_close(emb[g * (g + 1)], sep)
    local0 = emb[g * (g + 1) + 1:]
    # first local row: tile (row 0, col 0)'s first row, then tile (0, 1)'s first row, ..., then a newline
    want = torch.cat([feats[1 + c, :g] for c in range(4)] + [nl[None]])
    torch.testing.assert_close(local0[:4 * g + 1], want)


def test_images_fill_the_image_positions_in_order(vlm):
    lay = layout((56, 56), tile=56, patch=14)                    # 1×1: N = 2·3 + 1 + 2·1·3 = 13
    views = [torch.randn(lay.views, 3, 56, 56) for _ in range(2)]
    ids = torch.tensor([[1] + [IMAGE] * lay.tokens + [7, 8] + [IMAGE] * lay.tokens + [9]])
    with torch.no_grad():
        embeds = vlm.embed(ids, [(v, lay.tiles) for v in views])
        first = vlm.image_embeddings(views[0], lay.tiles)
        second = vlm.image_embeddings(views[1], lay.tiles)
        out = vlm(ids, [(v, lay.tiles) for v in views]).logits
    torch.testing.assert_close(embeds[0, 1:1 + lay.tokens], first)
    torch.testing.assert_close(embeds[0, 3 + lay.tokens:3 + 2 * lay.tokens], second)
    assert out.shape == (1, ids.shape[1], 320)
    with pytest.raises(MoelabError, match="<image> positions"):
        vlm.embed(ids[:, :-5], [(v, lay.tiles) for v in views])
    text = torch.tensor([[1, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(vlm(text).logits, vlm.language(text).logits)
