"""The VL processor: the template byte-exact (METHODS §12), each <image> expanded to its layout's N tokens,
labels only on answers and EOS, the >2-images rule, and bad images / placeholder counts refused clearly."""

from __future__ import annotations

import pytest
from PIL import Image

from moelab.data.tokenizer import byte_level_tokenizer
from moelab.errors import DataError
from moelab.vision.processor import IMAGE, VLProcessor, add_vl_tokens
from moelab.vision.tiling import layout

TILING = dict(tile=56, patch=14)


@pytest.fixture(scope="module")
def proc():
    return VLProcessor(add_vl_tokens(byte_level_tokenizer()), **TILING)


def test_template_is_byte_exact(proc):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"},
            {"role": "assistant", "content": "  A cat.  "}]
    assert proc.text(msgs) == ("<｜begin▁of▁sentence｜>Be brief.\n\n<|User|>: <image>\nWhat is it?\n\n<|Assistant|>:"
                               "A cat.<｜end▁of▁sentence｜>")
    two = msgs + [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes"}]
    assert proc.text(two).endswith("A cat.<｜end▁of▁sentence｜><|User|>: Sure?\n\n<|Assistant|>:Yes"
                                   "<｜end▁of▁sentence｜>")


def test_image_slots_and_labels(proc):
    img = Image.new("RGB", (300, 130), (10, 200, 30))
    msgs = [{"role": "user", "content": "<image>\nRead."}, {"role": "assistant", "content": "OK"}]
    ex = proc.process(msgs, [img])
    n = layout(img.size, **TILING).tokens
    image_id = proc.ids[IMAGE]
    assert n == 43 and ex.input_ids.count(image_id) == n
    first = ex.input_ids.index(image_id)
    assert ex.input_ids[first:first + n] == [image_id] * n and all(x == -100 for x in ex.labels[first:first + n])
    trained = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != -100]
    assert proc.tok.decode(trained, skip_special_tokens=False) == "OK<｜end▁of▁sentence｜>"
    views, tiles = ex.images[0]
    assert tiles == (4, 2) and views.shape == (9, 3, 56, 56)
    three = proc.process([{"role": "user", "content": "<image><image><image> Compare."},
                          {"role": "assistant", "content": "Same."}], [img] * 3)
    assert three.input_ids.count(image_id) == 3 * layout((56, 56), **TILING).tokens
    assert all(t == (1, 1) for _, t in three.images)


def test_bad_input(proc, tmp_path):
    msgs = [{"role": "user", "content": "<image> and <image>"}, {"role": "assistant", "content": "x"}]
    with pytest.raises(DataError, match="2 <image> placeholder"):
        proc.process(msgs, [Image.new("RGB", (10, 10))])
    one = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:40])
    for name, words in [("empty.png", "empty"), ("junk.png", "not a readable image"), ("cut.png", "not a readable"),
                        ("missing.png", "no such image")]:
        with pytest.raises(DataError, match=words):
            proc.process(one, [tmp_path / name])
    assert proc.process(one, [good]).images[0][1] == layout((64, 64), **TILING).tiles == (2, 2)
