"""DeepSeek-VL2's dynamic tiling (arXiv 2412.10302 §3.1; docs/methods.md §12): which canvas an image is
laid out on, how many local tiles it becomes, and how many image tokens that costs the language model.

Legend: W×H the image, T the tile (384), P the patch (14), d the downsampling (2), (w, h) a canvas,
tw×th its tiles, g = ⌈⌊T/P⌋ / d⌉ the token grid side of one tile after the 2×2 compression (14 at 384/14).

    candidates      {(m·T, n·T) : m·n ≤ max_tiles}                    (23 pairs for max_tiles 9)
    best canvas     per candidate s = min(w/W, h/H), effective = min(⌊W·s⌋·⌊H·s⌋, W·H),
                    waste = w·h − effective; the most effective, then the least waste, then list order
    views           a global view (the image padded to T×T) and tw·th local tiles of the canvas, row-major
    tokens          N = g·(g + 1) + 1 + g·th·(g·tw + 1)
                    (global: g rows of g tokens + a newline each; one view separator; local: g·th rows of
                    g·tw tokens + a newline each)

More than two images in one conversation are not tiled: each is one 1×1 canvas (421 tokens at 384/14).
Checked against the worked table of docs/methods.md §12 (tests/vision/test_tiling.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import ceil

from moelab.errors import DataError

TILE, PATCH, DOWNSAMPLE, MAX_TILES = 384, 14, 2, 9


@dataclass(frozen=True)
class Layout:
    """Where one image goes: its canvas, the tile grid, and the image tokens it becomes."""

    image: tuple[int, int]          # W, H
    canvas: tuple[int, int]         # w, h (multiples of the tile)
    tiles: tuple[int, int]          # tw, th
    grid: int                       # g: tokens per side of one tile after compression
    tokens: int                     # N
    tiled: bool                     # False: more than two images, no local tiling

    @property
    def views(self) -> int:
        """Encoder passes: the global view plus the local tiles."""
        return 1 + self.tiles[0] * self.tiles[1]

    def to_dict(self) -> dict:
        return {**asdict(self), "views": self.views}


def candidate_resolutions(max_tiles: int = MAX_TILES, tile: int = TILE) -> list[tuple[int, int]]:
    """Every canvas ``(m·tile, n·tile)`` with ``m·n ≤ max_tiles``, width multiple outer."""
    if max_tiles < 1 or tile < 1:
        raise DataError(f"max_tiles and tile must be >= 1 (got {max_tiles}, {tile})")
    return [(m * tile, n * tile) for m in range(1, max_tiles + 1) for n in range(1, max_tiles // m + 1)]


def select_best_resolution(size: tuple[int, int], candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """The canvas that keeps the most of the image's pixels, then wastes the least (module docstring)."""
    W, H = size
    best, best_key = None, None
    for w, h in candidates:
        s = min(w / W, h / H)
        effective = min(int(W * s) * int(H * s), W * H)
        key = (effective, -(w * h - effective))
        if best_key is None or key > best_key:
            best, best_key = (w, h), key
    return best


def token_grid(tile: int = TILE, patch: int = PATCH, downsample: int = DOWNSAMPLE) -> int:
    """g: patches per side ⌊tile/patch⌋, padded up to a multiple of ``downsample``, divided by it."""
    if min(tile, patch, downsample) < 1 or patch > tile:
        raise DataError(f"need 1 <= patch <= tile and downsample >= 1 (got tile {tile}, patch {patch}, "
                        f"downsample {downsample})")
    return ceil((tile // patch) / downsample)


def image_tokens(tw: int, th: int, grid: int) -> int:
    """N = g(g + 1) + 1 + g·th·(g·tw + 1)."""
    return grid * (grid + 1) + 1 + grid * th * (grid * tw + 1)


def layout(size: tuple[int, int], *, tile: int = TILE, patch: int = PATCH, downsample: int = DOWNSAMPLE,
           max_tiles: int = MAX_TILES, n_images: int = 1) -> Layout:
    """The layout of one image of ``size`` (W, H) in a conversation with ``n_images`` images."""
    W, H = size
    if W < 1 or H < 1:
        raise DataError(f"an image must be at least 1×1 pixels (got {W}×{H})")
    g = token_grid(tile, patch, downsample)
    if n_images > 2:
        return Layout((W, H), (tile, tile), (1, 1), g, image_tokens(1, 1, g), tiled=False)
    w, h = select_best_resolution((W, H), candidate_resolutions(max_tiles, tile))
    tw, th = w // tile, h // tile
    return Layout((W, H), (w, h), (tw, th), g, image_tokens(tw, th, g), tiled=True)


def parse_size(text: str) -> tuple[int, int]:
    """``"1920x1080"`` -> (1920, 1080), or a DataError."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        W, H = (int(p) for p in parts)
    except ValueError:
        raise DataError(f"an image size is WIDTHxHEIGHT in pixels, e.g. 1920x1080 (got {text!r})") from None
    if W < 1 or H < 1:
        raise DataError(f"an image must be at least 1×1 pixels (got {text})")
    return W, H


__all__ = ["DOWNSAMPLE", "MAX_TILES", "PATCH", "TILE", "Layout", "candidate_resolutions", "image_tokens", "layout",
           "parse_size", "select_best_resolution", "token_grid"]
