"""The grounding format: rendering with 0–999 coordinates, parsing back within W/999, malformed boxes a
clear error or skipped and counted."""

from __future__ import annotations

import random

import pytest

from moelab.errors import DataError
from moelab.vision.grounding import ParseStats, parse, render


def test_render_matches_the_documented_form_and_round_trips():
    assert render("the giraffe", [(30.0, 10.0, 120.0, 260.0)], (300, 300)) == \
        "<|ref|>the giraffe<|/ref|><|det|>[[100, 33, 400, 866]]<|/det|>"
    rng = random.Random(0)
    for _ in range(200):
        W, H = rng.randint(1, 4000), rng.randint(1, 4000)
        x1, x2 = sorted(rng.uniform(0, W) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, H) for _ in range(2))
        text = "A caption with " + render("a thing", [(x1, y1, x2, y2), (0, 0, W, H)], (W, H)) + " in it."
        (g,) = parse(text, (W, H))
        assert g.ref == "a thing" and len(g.boxes) == 2
        for got, want, side in zip(g.boxes[0], (x1, y1, x2, y2), (W, H, W, H), strict=True):
            assert abs(got - want) <= side / 999 + 1e-9


@pytest.mark.parametrize("det, words", [
    ("[[1, 2, 3]]", "4 integers"), ("[[1, 2, 3, 1000]]", "outside 0-999"), ("[[5, 5, 1, 9]]", "x2 < x1"),
    ("not json", "not a list"), ("[]", "non-empty"), ("[[1.5, 2, 3, 4]]", "4 integers"),
])
def test_malformed_boxes(det, words):
    text = f"<|ref|>x<|/ref|><|det|>{det}<|/det|> and <|ref|>y<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>"
    with pytest.raises(DataError, match=words):
        parse(text, (100, 100))
    stats = ParseStats()
    got = parse(text, (100, 100), skip_bad=True, stats=stats)
    assert [g.ref for g in got] == ["y"] and stats.skipped == 1 and words.split()[0] in stats.reasons[0]
