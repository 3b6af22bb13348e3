"""DeepSeek-VL2 dynamic tiling against the worked table of docs/methods.md §12 (canvas, tile grid, encoder
passes and image tokens for eight sizes), the 23 candidate canvases, invariance to the candidates' order,
the >2-images rule and the tiny (tile 56) case."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from moelab.cli import app
from moelab.errors import DataError
from moelab.vision.tiling import candidate_resolutions, image_tokens, layout, parse_size, select_best_resolution

GOLDEN = [  # W×H, canvas, tw×th, passes, N (docs/methods.md §12)
    ((100, 50), (384, 384), (1, 1), 2, 421),
    ((640, 480), (768, 768), (2, 2), 5, 1023),
    ((1024, 768), (1152, 768), (3, 2), 7, 1415),
    ((1920, 1080), (1536, 768), (4, 2), 9, 1807),
    ((4000, 4000), (1152, 1152), (3, 3), 10, 2017),
    ((1000, 3000), (768, 1536), (2, 4), 9, 1835),
    ((3000, 500), (2304, 384), (6, 1), 7, 1401),
    ((385, 384), (768, 384), (2, 1), 3, 617),
]


@pytest.mark.parametrize("size, canvas, tiles, passes, tokens", GOLDEN)
def test_worked_table(size, canvas, tiles, passes, tokens):
    lay = layout(size)
    assert (lay.canvas, lay.tiles, lay.views, lay.tokens) == (canvas, tiles, passes, tokens)


def test_candidates_and_order_invariance():
    cands = candidate_resolutions()
    assert len(cands) == 23 and len(set(cands)) == 23
    assert all(w % 384 == 0 and h % 384 == 0 and (w // 384) * (h // 384) <= 9 for w, h in cands)
    rng = random.Random(0)
    for _ in range(20):
        shuffled = cands[:]
        rng.shuffle(shuffled)
        for size, canvas, *_ in GOLDEN:
            assert select_best_resolution(size, shuffled) == canvas
    assert len(candidate_resolutions(18)) > 23          # InfoVQA's m·n <= 18


def test_token_count_bounds_and_other_tile_sizes():
    assert image_tokens(1, 1, 14) == 421 and image_tokens(1, 9, 14) == 2101
    tiny = layout((300, 130), tile=56, patch=14)
    assert tiny.tiles == (4, 2) and tiny.grid == 2 and tiny.tokens == 43
    three = [layout(s, n_images=3) for s in ((4000, 4000), (100, 50), (3000, 500))]
    assert all(lay.tokens == 421 and lay.tiles == (1, 1) and not lay.tiled for lay in three)


def test_bad_sizes_and_the_cli():
    for bad in ("100", "0x5", "axb", "10x-3"):
        with pytest.raises(DataError):
            parse_size(bad)
    res = CliRunner().invoke(app, ["vl", "tokens", "--image-size", "1920x1080", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["tokens"] == 1807 and out["tiles"] == [4, 2] and out["canvas"] == [1536, 768]
    res = CliRunner().invoke(app, ["vl", "tokens", "--image-size", "300x130", "--tile", "56"])
    assert res.exit_code == 0 and "43" in res.output
    bad = CliRunner().invoke(app, ["vl", "tokens", "--image-size", "12"])
    assert bad.exit_code == 1 and "WIDTHxHEIGHT" in bad.output
