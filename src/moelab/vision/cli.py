"""``moelab vl ...``: the DeepSeek-VL2 path. Today: ``moelab vl tokens`` (the tiling arithmetic).

    moelab vl tokens --image-size 1920x1080
    moelab vl tokens --image-size 300x130 --tile 56 --json
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from moelab.cli_utils import friendly

vl_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                     help="DeepSeek-VL2: dynamic tiling and image tokens.")


@vl_app.command()
@friendly
def tokens(
    image_size: Annotated[str, typer.Option("--image-size", help="WIDTHxHEIGHT in pixels, e.g. 1920x1080.",
                                            show_default=False)],
    tile: Annotated[int, typer.Option(min=1, help="Tile side in pixels (VL2: 384).")] = 384,
    patch: Annotated[int, typer.Option(min=1, help="ViT patch side in pixels (SigLIP: 14).")] = 14,
    downsample: Annotated[int, typer.Option(min=1, help="Token compression per side (VL2: 2x2 unfold).")] = 2,
    max_tiles: Annotated[int, typer.Option(min=1, help="Most local tiles per image (VL2: 9; InfoVQA 18).")] = 9,
    images: Annotated[int, typer.Option(min=1, help="Images in the conversation (> 2: no tiling).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the layout as JSON.")] = False,
):
    """The canvas, tile grid and image-token count of an image, without loading a model.

    The canvas is the candidate (m·tile, n·tile), m·n <= max-tiles, that keeps the most of the image and
    then wastes the least; the image becomes a global view plus tw×th local tiles, and
    N = g(g+1) + 1 + g·th·(g·tw + 1) tokens with g = ceil(floor(tile/patch) / downsample).
    """
    from moelab.vision.tiling import layout, parse_size

    lay = layout(parse_size(image_size), tile=tile, patch=patch, downsample=downsample, max_tiles=max_tiles,
                 n_images=images)
    if as_json:
        print(json.dumps(lay.to_dict()))
        return
    t = Table(title=f"{lay.image[0]}×{lay.image[1]} image, tile {tile}, patch {patch}, downsample {downsample}",
              show_header=False)
    t.add_column("")
    t.add_column("", justify="right")
    t.add_row("canvas", f"{lay.canvas[0]}×{lay.canvas[1]}" + ("" if lay.tiled else " (not tiled: > 2 images)"))
    t.add_row("tiles (tw × th)", f"{lay.tiles[0]} × {lay.tiles[1]}")
    t.add_row("encoder passes", f"{lay.views} (1 global + {lay.views - 1} local)")
    t.add_row("tokens per tile side", str(lay.grid))
    t.add_row("image tokens N", f"{lay.tokens:,}")
    Console().print(t)


__all__ = ["vl_app"]
