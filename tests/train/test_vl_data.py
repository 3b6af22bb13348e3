"""VL training data: records become packed rows whose <image> slots match their images in order, labels only
on answers (plain and chat templates, text-only records trained whole), batches a pure function of
(seed, step, micro), and bad records refused as file:line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_config

from moelab.data.tokenizer import byte_level_tokenizer
from moelab.errors import DataError
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.model.vision_encoder import VisionConfig
from moelab.model.vl_model import VisionLanguageModel
from moelab.train.vl_data import VLData, VLLoadStats, read_vl_records
from moelab.vision.processor import IGNORE, IMAGE, VLProcessor, add_vl_tokens
from moelab.vision.tiling import layout

TOK = add_vl_tokens(byte_level_tokenizer())


def write_data(tmp_path, records):
    (tmp_path / "images").mkdir(exist_ok=True)
    for name, size in [("a.png", (300, 130)), ("b.png", (56, 56)), ("c.png", (40, 160))]:
        Image.new("RGB", size, (len(name) * 40, 90, 20)).save(tmp_path / "images" / name)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [
    {"messages": [{"role": "user", "content": "<image>\nRead."}, {"role": "assistant", "content": "HELLO"}],
     "image": "images/a.png"},
    {"text": "plain text trained whole"},
    {"messages": [{"role": "user", "content": "<image> vs <image>"}, {"role": "assistant", "content": "left"}],
     "images": ["images/b.png", "images/c.png"]},
]


@pytest.mark.parametrize("template", ["plain", "deepseek"])
def test_rows_slots_and_labels(tmp_path, template):
    proc = VLProcessor(TOK, tile=56, patch=14, template=template)
    exs = read_vl_records(write_data(tmp_path, RECORDS), proc, seq_len=200)
    data = VLData(exs, proc, seq_len=200, pad_id=0)
    assert len(data) == 1                                        # 43 + 13·2 image tokens + text < 201: one row
    rows = data.rows(np.array([0]))
    image_id = proc.ids[IMAGE]
    want_tokens = sum(layout(s, tile=56, patch=14).tokens for s in [(300, 130), (56, 56), (40, 160)])
    assert int((rows["x"] == image_id).sum()) == want_tokens
    assert [t for _, t in rows["images"]] == [layout(s, tile=56, patch=14).tiles for s in [(300, 130), (56, 56),
                                                                                            (40, 160)]]
    y = rows["y"][0]
    assert (data.labels[0][data.ids[0] == image_id] == IGNORE).all()          # image slots carry no loss
    # the trained targets, decoded, are the answers, the text record and their EOS
    trained = TOK.decode([int(t) for t in y if t != IGNORE], skip_special_tokens=False)
    eos = "<｜end▁of▁sentence｜>"
    assert trained == f"HELLO{eos}plain text trained whole{eos}left{eos}"
    if template == "plain":
        text = TOK.decode([t for t in data.ids[0].tolist() if t != image_id], skip_special_tokens=False)
        assert text.startswith("<｜begin▁of▁sentence｜>\nRead.\nHELLO<｜end▁of▁sentence｜>")
    else:
        text = TOK.decode([t for t in data.ids[0].tolist() if t != image_id], skip_special_tokens=False)
        assert text.startswith("<｜begin▁of▁sentence｜><|User|>: \nRead.\n\n<|Assistant|>:HELLO")
    vlm = VisionLanguageModel(DeepSeekForCausalLM.from_config(tiny_config(), seed=0),
                              VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=56, patch_size=14), image_id)
    logits = vlm(rows["x"], **data.model_inputs(rows, torch.device("cpu"))).logits
    loss, _ = data.loss_fn(logits, rows)
    assert torch.isfinite(loss)


def test_packing_and_batches_are_pure(tmp_path):
    proc = VLProcessor(TOK, tile=56, patch=14, template="plain")
    exs = read_vl_records(write_data(tmp_path, RECORDS * 3), proc, seq_len=120)
    packed, single = VLData(exs, proc, 120, 0), VLData(exs, proc, 120, 0, packing=False)
    assert len(single) == 9 and len(packed) < 9
    assert packed.target_tokens == single.target_tokens
    a, b = packed.batch(2, 120, step=3, seed=1), packed.batch(2, 120, step=3, seed=1)
    assert torch.equal(a["x"], b["x"]) and len(a["images"]) == len(b["images"])
    assert all(torch.equal(u[0], v[0]) for u, v in zip(a["images"], b["images"], strict=True))
    assert sum(1 for _ in packed.eval_batches(2, 120)) == -(-len(packed) // 2)


def test_bad_records(tmp_path):
    proc = VLProcessor(TOK, tile=56, patch=14)
    path = write_data(tmp_path, RECORDS)
    (tmp_path / "images" / "bad.png").write_bytes(b"junk")
    cases = [("{not json", "not a JSON object"), ('{"messages": []}', "needs 'messages'"),
             (json.dumps({"messages": [{"role": "user", "content": "<image>"}], "image": "images/a.png"}),
              "no assistant turn"),
             (json.dumps({**RECORDS[0], "image": "images/bad.png"}), "not a readable image"),
             (json.dumps({**RECORDS[0], "image": "images/none.png"}), "no such image"),
             (json.dumps({**RECORDS[0], "images": ["images/a.png", "images/b.png"]}), "placeholder")]
    for line, words in cases:
        path.write_text(json.dumps(RECORDS[1]) + "\n" + line + "\n")
        with pytest.raises(DataError, match=f"train.jsonl:2: .*{words}"):
            read_vl_records(path, proc, 200)
        stats = VLLoadStats()
        assert len(read_vl_records(path, proc, 200, skip_malformed=True, stats=stats)) == 1
        assert len(stats.skipped) == 1
    path.write_text(json.dumps(RECORDS[0]) + "\n")
    with pytest.raises(DataError, match="train.jsonl:1: the example is .* tokens .* raise data.seq_len"):
        read_vl_records(path, proc, 30)
