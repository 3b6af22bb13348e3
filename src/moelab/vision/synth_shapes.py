"""Grounding data of :mod:`moelab.vision.synth`: coloured shapes on a plain canvas, and how an answer is
scored against them.

    img, fields = make_shapes(random.Random(0), SynthOptions())
    fields["prompt"]  -> "<|ref|>the red circle<|/ref|>."                  (after "<image>\\n")
    fields["answer"]  -> "<|ref|>the red circle<|/ref|><|det|>[[120, 85, 410, 600]]<|/det|>"
                      or NOT_PRESENT ("not present") when no red circle was drawn (a negative)
    grounding_iou(model_answer, record)                                   -> 0.0 … 1.0

Shapes (circle, square, triangle pointing up) are drawn without anti-aliasing in exact colours
(:data:`moelab.vision.synth_options.COLOURS`), never overlapping, at most one of each colour/shape pair,
so a reference names one shape. Each shape's box is the box of its drawn pixels, ``[x1, y1, x2, y2)``
in pixels (x2, y2 exclusive: a 1-pixel dot at (5, 7) has the box [5, 7, 6, 8]); the answer renders it
with :func:`moelab.vision.grounding.render` (0–999, relative to the image).

Scoring (:func:`grounding_iou`): a negative scores 1 when the answer says "not present" (any case) and
0 otherwise; a positive scores the IoU of the answer's boxes with the truth (one-to-one, best pairs
first, the sum over pairs divided by the larger of the two counts), 0 when the answer says "not
present", has no ``<|det|>`` or a malformed one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from moelab.vision.grounding import parse, render
from moelab.vision.synth_options import COLOURS, SynthOptions

#: The answer to a question about a shape that is not in the picture.
NOT_PRESENT = "not present"
#: Background: a light grey, far from every shape colour.
BACKGROUNDS = ((255, 255, 255), (245, 245, 245), (235, 235, 230), (250, 248, 240))


def reference(colour: str, shape: str) -> str:
    return f"the {colour} {shape}"


def shape_mask(shape: str, box: Sequence[int], size: tuple[int, int]):
    """An ``L`` mask of ``size`` with the shape drawn (255) inside the pixel box ``[x1, y1, x2, y2)``."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", tuple(size), 0)
    d = ImageDraw.Draw(mask)
    x1, y1, x2, y2 = box
    if shape == "circle":
        d.ellipse((x1, y1, x2 - 1, y2 - 1), fill=255)
    elif shape == "square":
        d.rectangle((x1, y1, x2 - 1, y2 - 1), fill=255)
    else:
        d.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=255)
    return mask


def draw_shapes(size: tuple[int, int], background: Sequence[int], shapes: list[dict]):
    """``(image, boxes)``: the canvas with each ``{"colour", "shape", "place"}`` drawn in its place, and the
    box of each shape's drawn pixels (``[x1, y1, x2, y2)``)."""
    from PIL import Image

    img = Image.new("RGB", tuple(size), tuple(background))
    boxes = []
    for s in shapes:
        mask = shape_mask(s["shape"], s["place"], size)
        img.paste(COLOURS[s["colour"]], (0, 0, *size), mask)
        boxes.append(list(mask.getbbox()))
    return img, boxes


def _overlaps(a: Sequence[int], b: Sequence[int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def make_shapes(rng: random.Random, opts: SynthOptions):
    """A grounding example (module docstring): fields ``shapes`` (every drawn shape with its ``box``),
    ``ref``, ``negative``, ``boxes`` (the referred shape's box, ``[]`` for a negative), ``background``."""
    lo, hi = opts.shape_sides
    W, H = rng.randint(lo, hi), rng.randint(lo, hi)
    side_lo, side_hi = max(8, round(0.15 * min(W, H))), max(9, round(0.45 * min(W, H)))
    pairs = [(c, s) for c in opts.shape_colours for s in opts.shape_kinds]
    chosen = rng.sample(pairs, rng.randint(*opts.shape_count))
    shapes, places = [], []
    for colour, shape in chosen:
        for _ in range(100):                                        # a free place, or the shape is left out
            side = rng.randint(side_lo, side_hi)
            w, h = (side, side) if shape != "triangle" else (side, max(4, round(side * rng.uniform(0.8, 1.0))))
            x, y = rng.randint(0, W - w), rng.randint(0, H - h)
            place = [x, y, x + w, y + h]
            if not any(_overlaps(place, p, 4) for p in places):
                places.append(place)
                shapes.append({"colour": colour, "shape": shape, "place": place})
                break
    background = rng.choice(BACKGROUNDS)
    img, boxes = draw_shapes((W, H), background, shapes)
    for s, b in zip(shapes, boxes, strict=True):
        s["box"] = b
    drawn = {(s["colour"], s["shape"]) for s in shapes}
    absent = [p for p in pairs if p not in drawn]
    if absent and rng.random() < opts.negatives:
        near = [p for p in absent if any(p[0] == c or p[1] == s for c, s in drawn)]  # shares a colour or shape
        colour, shape = rng.choice(near or absent)
        ref, negative, truth = reference(colour, shape), True, []
        answer = NOT_PRESENT
    else:
        s = rng.choice(shapes)
        ref, negative, truth = reference(s["colour"], s["shape"]), False, [s["box"]]
        answer = render(ref, [tuple(s["box"])], (W, H))
    return img, {"prompt": f"<|ref|>{ref}<|/ref|>.", "answer": answer, "ref": ref, "negative": negative,
                 "boxes": truth, "shapes": shapes, "background": list(background)}


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------
def iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (0 when both are empty)."""
    ax1, ay1, ax2, ay2 = box_a
    bx1, by1, bx2, by2 = box_b
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def says_not_present(text: str) -> bool:
    return NOT_PRESENT in text.lower()


def match_boxes(pred: list[Sequence[float]], truth: list[Sequence[float]]) -> float:
    """Sum of IoUs over a one-to-one matching (best pairs first) divided by max(len(pred), len(truth))."""
    if not pred or not truth:
        return 0.0
    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)), reverse=True)
    used_p, used_t, total = set(), set(), 0.0
    for v, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            total += v
    return total / max(len(pred), len(truth))


def grounding_iou(answer_text: str, truth_record: dict, image_size: tuple[int, int] | None = None) -> float:
    """How right a model's grounding answer is (module docstring); ``image_size`` defaults to the record's
    ``size``. Malformed or missing boxes score 0, never raise."""
    size = tuple(image_size or truth_record["size"])
    if truth_record.get("negative"):
        return 1.0 if says_not_present(answer_text) else 0.0
    if says_not_present(answer_text):
        return 0.0
    found = parse(answer_text, size, skip_bad=True)
    if not found:
        return 0.0
    same = [g for g in found if g.ref.strip() == truth_record.get("ref")]
    return match_boxes((same or found)[0].boxes, [tuple(b) for b in truth_record["boxes"]])


__all__ = ["BACKGROUNDS", "NOT_PRESENT", "draw_shapes", "grounding_iou", "iou", "make_shapes", "match_boxes",
           "reference", "says_not_present", "shape_mask"]
