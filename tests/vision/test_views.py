"""The encoder's views of an image: the global view padded to a tile, the canvas padded and cut row-major,
the fill value after normalisation (−0.0039), and each tile holding the part of the image it should."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from moelab.errors import DataError
from moelab.vision.tiling import layout
from moelab.vision.views import image_views


def _quadrants(W: int, H: int) -> Image.Image:
    """Red, green, blue and white quadrants (top-left, top-right, bottom-left, bottom-right)."""
    a = np.zeros((H, W, 3), dtype=np.uint8)
    a[:H // 2, :W // 2] = (255, 0, 0)
    a[:H // 2, W // 2:] = (0, 255, 0)
    a[H // 2:, :W // 2] = (0, 0, 255)
    a[H // 2:, W // 2:] = (255, 255, 255)
    return Image.fromarray(a)


def test_views_shapes_order_and_fill():
    img = _quadrants(112, 112)                      # square: a canvas of 2×2 tiles of 56 fits it exactly
    lay = layout(img.size, tile=56, patch=14)
    views = image_views(img, lay)
    tw, th = lay.tiles
    assert views.shape == (1 + tw * th, 3, 56, 56) and (tw, th) == (2, 2)
    centre = views[:, :, 28, 28]                    # the middle pixel of each view
    red, green, blue, white = ([1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1])
    for view, colour in zip(centre[1:].tolist(), (red, green, blue, white), strict=True):   # row-major
        assert view == pytest.approx(colour, abs=0.05)

    wide = Image.new("RGB", (300, 100), (255, 255, 255))
    lay = layout(wide.size, tile=56, patch=14)
    v = image_views(wide, lay)
    fill = 127 / 127.5 - 1
    assert v[0, :, 0, 28].tolist() == pytest.approx([fill] * 3, abs=1e-6)       # global view: padded above
    assert v[0, :, 28, 28].tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert fill == pytest.approx(-0.0039, abs=1e-4)


def test_a_layout_for_another_size_is_refused():
    with pytest.raises(DataError, match="made for"):
        image_views(_quadrants(100, 100), layout((50, 50), tile=56, patch=14))
