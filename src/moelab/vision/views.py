"""The pixels DeepSeek-VL2's encoder sees for one image (docs/methods.md §12): a global view and the local
tiles of its canvas, normalised.

    lay = layout(img.size)
    views_V3TT = image_views(img, lay)        # [1 + tw·th, 3, T, T] float32; view 0 is the global one

    global view   ImageOps.pad(img, (T, T)): resized (bicubic) to fit, centred, padded with (127, 127, 127)
    local view    ImageOps.pad(img, canvas) the same way, then cut into tw × th tiles of T×T, row-major
    normalise     (x / 255 − 0.5) / 0.5 per channel, so the padding is 127/127.5 − 1 ≈ −0.0039

With more than two images (``layout(..., n_images=3)``) the canvas is T×T: one local tile.
"""

from __future__ import annotations

import numpy as np
import torch

from moelab.errors import DataError
from moelab.vision.tiling import Layout

FILL = (127, 127, 127)
MEAN = STD = 0.5


def _pad(img, size: tuple[int, int]):
    from PIL import Image, ImageOps

    return ImageOps.pad(img.convert("RGB"), size, method=Image.Resampling.BICUBIC, color=FILL, centering=(0.5, 0.5))


def normalise(img) -> torch.Tensor:
    """An RGB PIL image -> float32 ``[3, H, W]``, (x/255 − mean)/std."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy((a - MEAN) / STD).permute(2, 0, 1).contiguous()


def image_views(img, lay: Layout) -> torch.Tensor:
    """``[1 + tw·th, 3, T, T]``: the global view, then the local tiles row by row."""
    if tuple(img.size) != lay.image:
        raise DataError(f"the layout was made for a {lay.image[0]}×{lay.image[1]} image, not {img.size[0]}×"
                        f"{img.size[1]}")
    T = lay.canvas[0] // lay.tiles[0]
    views = [normalise(_pad(img, (T, T)))]
    canvas = normalise(_pad(img, lay.canvas))                              # [3, h, w]
    tw, th = lay.tiles
    for r in range(th):
        for c in range(tw):
            views.append(canvas[:, r * T:(r + 1) * T, c * T:(c + 1) * T])
    return torch.stack(views)


__all__ = ["FILL", "MEAN", "STD", "image_views", "normalise"]
