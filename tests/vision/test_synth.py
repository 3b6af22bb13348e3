"""Generated VL data (moelab.vision.synth): the same seed gives the same bytes, each record's answer is what
its picture shows (OCR redrawn, chart text read back from matplotlib, shape boxes found in the PNG's pixels),
IoU scoring, the reader's FILE:LINE errors, atomic writing that refuses foreign directories, and the CLI."""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from moelab.errors import DataError
from moelab.vision import synth, synth_draw
from moelab.vision.grounding import parse
from moelab.vision.synth import NOT_PRESENT, SynthOptions, generate, grounding_iou, iou, read_vl_jsonl
from moelab.vision.synth_cli import data
from moelab.vision.synth_draw import draw_chart, draw_text
from moelab.vision.synth_options import COLOURS
from moelab.vision.synth_shapes import match_boxes

COUNTS = {"ocr": 30, "chart": 10, "shapes": 40}


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("vl") / "data"
    summary = generate(out, COUNTS, seed=3, split="train")
    return out, summary, read_vl_jsonl(out / "train.jsonl")


def by_task(records, task):
    return [r for r in records if r["task"] == task]


def test_same_seed_same_bytes_and_other_seed_differs(made, tmp_path):
    out, _, _ = made
    again = generate(tmp_path / "again", COUNTS, seed=3, split="train").out
    assert (again / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
    assert (again / "vl_data.json").read_bytes() == (out / "vl_data.json").read_bytes()
    for png in sorted((out / "images").iterdir()):
        assert (again / "images" / png.name).read_bytes() == png.read_bytes(), png.name
    other = generate(tmp_path / "other", COUNTS, seed=4, split="train").out
    assert (other / "train.jsonl").read_bytes() != (out / "train.jsonl").read_bytes()
    # one task's count leaves the others' examples as they were
    fewer = generate(tmp_path / "fewer", {"ocr": 3, "shapes": 40}, seed=3, split="train").out
    assert [r["answer"] for r in by_task(read_vl_jsonl(fewer / "train.jsonl"), "shapes")] == \
        [r["answer"] for r in by_task(made[2], "shapes")]


def test_records_have_the_documented_fields(made):
    out, summary, records = made
    assert [r["task"] for r in records] == ["ocr"] * 30 + ["chart"] * 10 + ["shapes"] * 40
    assert {t: s.examples for t, s in summary.tasks.items()} == COUNTS
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert {"id", "task", "image", "size", "messages", "answer", "image_path"} <= set(r)
        assert r["image"] == f"images/{r['id']}.png" and (out / r["image"]).is_file()
        with Image.open(out / r["image"]) as im:
            assert list(im.size) == r["size"] and im.mode == "RGB"
        user, assistant = r["messages"]
        assert user["role"] == "user" and user["content"].startswith("<image>\n")
        assert user["content"].count("<image>") == 1
        assert assistant == {"role": "assistant", "content": r["answer"]} and r["answer"] == r["answer"].strip()
    meta = json.loads((out / "vl_data.json").read_text())
    assert meta["splits"]["train"]["counts"] == COUNTS and meta["splits"]["train"]["examples"] == 80


def test_records_go_through_the_processor(made):
    from moelab.data.tokenizer import byte_level_tokenizer
    from moelab.vision.processor import VLProcessor, add_vl_tokens

    proc = VLProcessor(add_vl_tokens(byte_level_tokenizer()), tile=56, patch=14)
    for task in COUNTS:
        r = by_task(made[2], task)[0]
        ex = proc.process(r["messages"], [r["image_path"]])
        trained = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != -100]
        assert proc.tok.decode(trained[:-1], skip_special_tokens=False) == r["answer"]


def test_ocr_answer_is_the_drawn_text(made, tmp_path):
    out, _, records = made
    ocr = by_task(records, "ocr")
    for r in ocr:
        assert r["answer"] == r["text"] and 3 <= len(r["text"]) <= 12
        a = pixels(out / r["image"])
        redrawn = np.asarray(draw_text(r["text"], r["size"], r["layout"], r["font_size"], r["xy"], r["fg"], r["bg"]))
        assert np.array_equal(a, redrawn), r["id"]
        x1, y1, x2, y2 = r["ink"]
        outside = a.copy()
        outside[y1:y2, x1:x2] = r["bg"]
        assert (outside == r["bg"]).all(), "ink outside the text's box"
        assert (a[y1:y2, x1:x2] != r["bg"]).any(axis=-1).sum() > 10, "no text drawn"
        assert all(64 <= s <= 512 for s in r["size"])
    # extreme canvases: 8:1 strips and 1:6 columns, with tall text stacked or turned
    opts = SynthOptions(ocr_aspects=("8:1", "1:6"))
    strips = read_vl_jsonl(generate(tmp_path / "x", {"ocr": 12}, seed=0, options=opts).out / "train.jsonl")
    for r in strips:
        W, H = r["size"]
        assert (r["aspect"], W, H) in {("8:1", 512, 64), ("1:6", W, 6 * W)}
        assert r["layout"] == ("line" if r["aspect"] == "8:1" else r["layout"]) and r["layout"] in (
            "line", "stacked", "rotated")
    assert {r["aspect"] for r in strips} == {"8:1", "1:6"}


def test_chart_values_read_back_exactly(made):
    out, _, records = made
    charts = by_task(records, "chart")
    assert {r["question"] for r in charts} == {"value", "highest"}
    for r in charts:
        img, readback = draw_chart(r["labels"], r["values"], r["size"], r["colours"])
        assert [(t, v) for t, v, _ in readback] == [(lab, str(v)) for lab, v in zip(r["labels"], r["values"],
                                                                                   strict=True)]
        assert [h for _, _, h in readback] == r["values"]
        assert np.array_equal(np.asarray(img), pixels(out / r["image"])), "the PNG is not the chart of its data"
        assert 2 <= len(r["values"]) <= 5 and len(set(r["values"])) == len(r["values"])
        if r["question"] == "value":
            assert r["answer"] == str(r["values"][r["labels"].index(r["target"])])
            assert r["messages"][0]["content"] == f"<image>\nWhat is the value of {r['target']}?"
        else:
            assert r["answer"] == r["labels"][int(np.argmax(r["values"]))]


def test_chart_text_mismatch_is_caught(monkeypatch):
    monkeypatch.setattr(synth_draw, "draw_chart", lambda *a: (None, [("x", "1", 1)]))
    with pytest.raises(DataError, match="differs from its data"):
        synth_draw.make_chart(random.Random(0), SynthOptions())


def colour_box(a: np.ndarray, rgb) -> list[int] | None:
    ys, xs = np.nonzero((a == np.array(rgb, dtype=a.dtype)).all(axis=-1))
    return None if len(xs) == 0 else [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_grounding_boxes_match_the_drawn_pixels(made):
    out, _, records = made
    shapes = by_task(records, "shapes")
    positives = [r for r in shapes if not r["negative"]]
    negatives = [r for r in shapes if r["negative"]]
    assert positives and negatives
    for r in shapes:
        W, H = r["size"]
        a = pixels(out / r["image"])
        assert r["messages"][0]["content"] == f"<image>\n<|ref|>{r['ref']}<|/ref|>."
        drawn = {(s["colour"], s["shape"]) for s in r["shapes"]}
        assert len(drawn) == len(r["shapes"])                    # a reference names one shape
        by_colour = {}
        for s in r["shapes"]:
            by_colour.setdefault(s["colour"], []).append(s["box"])
            x1, y1, x2, y2 = s["box"]
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
        for colour, boxes in by_colour.items():                  # the colour's pixels span its shapes' boxes
            union = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                     max(b[3] for b in boxes)]
            assert colour_box(a, COLOURS[colour]) == union
        colour, shape = r["ref"].split()[1:]
        if r["negative"]:
            assert r["answer"] == NOT_PRESENT and (colour, shape) not in drawn and r["boxes"] == []
            assert grounding_iou(r["answer"], r) == 1.0
            continue
        (g,) = parse(r["answer"], (W, H))
        assert g.ref == r["ref"] and len(g.boxes) == 1
        (target,) = [s for s in r["shapes"] if (s["colour"], s["shape"]) == (colour, shape)]
        assert r["boxes"] == [target["box"]]
        if len(by_colour[colour]) == 1:
            assert colour_box(a, COLOURS[colour]) == target["box"]
        for got, want, side in zip(g.boxes[0], target["box"], (W, H, W, H), strict=True):
            assert abs(got - want) <= 1 + side / 999
        assert grounding_iou(r["answer"], r) > 0.9


def test_iou_hand_cases():
    assert iou([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    assert iou([0, 0, 2, 2], [2, 0, 4, 2]) == 0.0                      # touching edges
    assert iou([0, 0, 2, 2], [1, 0, 3, 2]) == pytest.approx(2 / 6)
    assert iou([0, 0, 4, 4], [1, 1, 3, 3]) == pytest.approx(4 / 16)
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    assert iou([5, 5, 1, 1], [0, 0, 9, 9]) == 0.0                      # an inverted box has no area
    assert match_boxes([[0, 0, 2, 2], [10, 10, 12, 12]], [[0, 0, 2, 2]]) == pytest.approx(0.5)
    assert match_boxes([], [[0, 0, 2, 2]]) == 0.0


def test_grounding_iou_scores_answers():
    truth = {"ref": "the red circle", "negative": False, "boxes": [[10, 20, 60, 70]], "size": [100, 100]}
    exact = "<|ref|>the red circle<|/ref|><|det|>[[100, 200, 599, 699]]<|/det|>"
    assert grounding_iou(exact, truth) == pytest.approx(1.0, abs=0.05)
    half = "<|ref|>the red circle<|/ref|><|det|>[[100, 200, 350, 699]]<|/det|>"
    assert 0.4 < grounding_iou(half, truth) < 0.6
    for bad in ("", "a red circle", NOT_PRESENT, "<|ref|>the red circle<|/ref|><|det|>[[1, 2]]<|/det|>",
                "<|ref|>the red circle<|/ref|><|det|>[[1, 2, 3, 1000]]<|/det|>", "<|ref|>x<|/ref|><|det|>oops"):
        assert grounding_iou(bad, truth) == 0.0, bad
    neg = {**truth, "negative": True, "boxes": []}
    assert grounding_iou("Not present.", neg) == 1.0 and grounding_iou(exact, neg) == 0.0
    assert grounding_iou(exact, truth, image_size=(200, 200)) < 0.5    # the size the coordinates are relative to


def lines_of(made) -> list[str]:
    return (made[0] / "train.jsonl").read_text().splitlines()


@pytest.mark.parametrize("line, reason", [
    ("{not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"id": "x", "task": "ocr", "image": "images/none.png"}', "missing field 'messages'"),
    ("IMAGE_MISSING", "does not exist"),
    ("TWO_IMAGES", "2 <image> placeholders"),
    ("ANSWER_DIFFERS", "differs from the last assistant"),
    ("DUPLICATE_ID", "also on line 1"),
    ("ESCAPES", "inside it"),
])
def test_malformed_lines_name_file_and_line(made, tmp_path, line, reason):
    out = made[0]
    first = json.loads(lines_of(made)[0])
    variants = {
        "IMAGE_MISSING": {**first, "id": "new", "image": "images/gone.png"},
        "TWO_IMAGES": {**first, "id": "new", "messages": [{"role": "user", "content": "<image><image>\nRead."},
                                                          first["messages"][1]]},
        "ANSWER_DIFFERS": {**first, "id": "new", "answer": first["answer"] + "!"},
        "DUPLICATE_ID": first,
        "ESCAPES": {**first, "id": "new", "image": "../data/" + first["image"]},
    }
    bad = json.dumps(variants[line]) if line in variants else line
    f = out / "broken.jsonl"                         # beside the images, so the good lines resolve
    try:
        f.write_text("\n".join([lines_of(made)[0], "", bad, lines_of(made)[1]]) + "\n")
        with pytest.raises(DataError, match=rf"broken\.jsonl:3: .*{reason}"):
            read_vl_jsonl(f)
    finally:
        f.unlink()
    with pytest.raises(DataError, match="no such file"):
        read_vl_jsonl(tmp_path / "missing.jsonl")


def test_refuses_foreign_directories_and_replaces_splits_only_when_asked(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="did not write"):
        generate(foreign, {"ocr": 1}, overwrite=True)
    assert os.listdir(foreign) == ["notes.txt"]
    out = generate(tmp_path / "d", {"ocr": 2, "shapes": 2}, seed=0).out
    train = (out / "train.jsonl").read_bytes()
    with pytest.raises(DataError, match="already holds split 'train'.*--overwrite"):
        generate(out, {"ocr": 1}, seed=1)
    generate(out, {"chart": 2}, seed=1, split="val")           # a new split: train is kept
    assert (out / "train.jsonl").read_bytes() == train and len(read_vl_jsonl(out / "train.jsonl")) == 4
    assert len(read_vl_jsonl(out / "val.jsonl")) == 2
    assert sorted(json.loads((out / "vl_data.json").read_text())["splits"]) == ["train", "val"]
    generate(out, {"ocr": 1}, seed=1, overwrite=True)           # replace train; val stays
    assert len(read_vl_jsonl(out / "train.jsonl")) == 1 and len(read_vl_jsonl(out / "val.jsonl")) == 2
    assert sorted(p.name for p in (out / "images").iterdir()) == ["train-ocr-000000.png", "val-chart-000000.png",
                                                                  "val-chart-000001.png"]
    for bad, words in (({"ocrs": 1}, "did you mean 'ocr'"), ({"ocr": -1}, ">= 0"), ({"ocr": 0}, "nothing")):
        with pytest.raises(DataError, match=words):
            generate(tmp_path / "e", bad)
    with pytest.raises(DataError, match="split name"):
        generate(tmp_path / "e", {"ocr": 1}, split="../x")
    assert not (tmp_path / "e").exists()


def test_a_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    out = generate(tmp_path / "d", {"ocr": 2}, seed=0).out
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def boom(rng, opts):
        raise RuntimeError("power cut")

    monkeypatch.setitem(synth.MAKERS, "chart", boom)
    for target in (out, tmp_path / "new"):
        with pytest.raises(RuntimeError, match="power cut"):
            generate(target, {"ocr": 1, "chart": 1}, split="val")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert sorted(os.listdir(tmp_path)) == ["d"]                 # no temporary directories left behind


def test_photos_are_captioned():
    pytest.importorskip("skimage")
    from moelab.vision.synth_photos import PHOTOS, available_photos, make_photo

    names = available_photos()
    assert {"astronaut", "coffee", "chelsea", "camera"} <= set(names)
    img, fields = make_photo("astronaut", 64)
    assert img.mode == "RGB" and max(img.size) == 64 and fields["answer"] == PHOTOS["astronaut"]


def test_cli_writes_and_reports(tmp_path):
    app = typer.Typer()
    app.command()(data)
    app.command("noop")(lambda: None)                # two commands: typer keeps 'data' as a subcommand
    runner = CliRunner()
    out = tmp_path / "vl"
    args = ["data", "--out", str(out), "--ocr", "3", "--charts", "2", "--shapes", "3", "--seed", "5", "--quiet"]
    r = runner.invoke(app, args + ["--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert {t: s["examples"] for t, s in report["tasks"].items()} == {"ocr": 3, "chart": 2, "shapes": 3}
    assert len(read_vl_jsonl(out / "train.jsonl")) == 8
    r = runner.invoke(app, ["data", "--out", str(out), "--ocr", "1", "--charts", "0", "--shapes", "0",
                            "--split", "val", "--min-side", "32", "--max-side", "128"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "val.jsonl" in r.stdout and "kept splits: train" in r.stdout and "ocr" in r.stdout
    assert all(32 <= s <= 128 for s in read_vl_jsonl(out / "val.jsonl")[0]["size"])
    r = runner.invoke(app, args)                      # train is there: refused, one line, no traceback
    assert r.exit_code == 1 and "--overwrite" in r.output and "Traceback" not in r.output
    shutil.rmtree(out)
