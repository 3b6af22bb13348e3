"""VL generation: greedy answers equal a brute-force loop that re-runs the whole vision-language forward for
every new token; batching (left padding, images of different sizes) and chunked prefill change nothing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny import tiny_config

from moelab.data.tokenizer import byte_level_tokenizer
from moelab.evaluate.vl_generate import decode_answer, vl_generate
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.model.vision_encoder import VisionConfig
from moelab.model.vl_model import VisionLanguageModel
from moelab.vision.processor import IMAGE, VLProcessor, add_vl_tokens

VISION = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=56, patch_size=14)


@pytest.fixture(scope="module")
def setup():
    proc = VLProcessor(add_vl_tokens(byte_level_tokenizer()), tile=56, patch=14)
    torch.manual_seed(0)
    vlm = VisionLanguageModel(DeepSeekForCausalLM.from_config(tiny_config(), seed=0), VISION,
                              proc.ids[IMAGE]).eval()
    convs = [([{"role": "user", "content": "<image>\nWhat is written?"}], [Image.new("RGB", (300, 130), (9, 80, 200))]),
             ([{"role": "user", "content": "Two: <image> and <image>"}],
              [Image.new("RGB", (56, 200), (200, 1, 1)), Image.new("RGB", (90, 90), (1, 200, 1))])]
    return proc, vlm, convs


def brute_force(vlm, proc, messages, images, n):
    ex = proc.process(messages, images)
    ids = torch.tensor([ex.input_ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = vlm(ids, ex.images).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return decode_answer(proc, ids[0, len(ex.input_ids):].tolist())


def test_greedy_equals_brute_force_batched_and_chunked(setup):
    proc, vlm, convs = setup
    n = 6
    want = [brute_force(vlm, proc, m, im, n) for m, im in convs]
    assert all(want)
    assert vl_generate(vlm, proc, convs, max_new_tokens=n, batch_size=1) == want
    assert vl_generate(vlm, proc, convs, max_new_tokens=n, batch_size=2) == want
    assert vl_generate(vlm, proc, convs, max_new_tokens=n, batch_size=2, prefill_chunk=7) == want


def test_decode_keeps_grounding_tokens(setup):
    proc = setup[0]
    text = "<|ref|>the red circle<|/ref|><|det|>[[1,2,3,4]]<|/det|>"
    ids = proc.tok.encode(text, add_special_tokens=False).ids + [proc.ids["<｜end▁of▁sentence｜>"], 65, 66]
    assert decode_answer(proc, ids) == text
