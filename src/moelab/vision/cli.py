"""``moelab vl ...``: the DeepSeek-VL2 path — the tiling arithmetic, generated data, the three training
stages and chat.

    moelab vl tokens --image-size 1920x1080
    moelab vl tokens --image-size 300x130 --tile 56 --json
    moelab vl data --out runs/vl-data --ocr 600 --charts 300 --shapes 300
    moelab vl train configs/vl-tiny-align.toml --out runs/vl-align
    moelab vl chat runs/vl-sft/model --image sign.png --prompt "What is written in the image?"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from moelab.cli_utils import friendly
from moelab.vision.synth_cli import data

vl_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                     help="DeepSeek-VL2: dynamic tiling, generated data, training stages and chat.")
vl_app.command()(data)


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


@vl_app.command()
@friendly
def train(
    config: Annotated[Path, typer.Argument(help="TOML with [vl], [data], [train] (and the model sections or "
                                                "vl.init_from).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/<config name>).")
                   ] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a setting: --set vl.stage=sft --set train.steps=200 (repeatable).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
):
    """Train one DeepSeek-VL2 stage: align (adaptor, LM frozen), pretrain (everything) or sft (chat template).

    Each stage starts from the previous one's RUN_DIR/model (vl.init_from), a checkpoint in the layout of the
    released DeepSeek-VL2 models; the first describes a fresh model in [model], [vision], [projector],
    [processor]. Data: JSON Lines from `moelab vl data` (or your own in that format). Losses fall on the
    answers only (never on prompts or image slots); examples are packed whole into rows of data.seq_len.
    Checkpoints, --resume, metrics and the report are those of `moelab train`.

        moelab vl data --out runs/vl-data
        moelab vl train configs/vl-tiny.toml --set vl.stage=align --out runs/vl-align
        moelab vl train configs/vl-tiny.toml --set vl.stage=sft --set vl.init_from=runs/vl-align/model --out runs/vl-sft
    """
    from moelab.train.vl_config import load_vl_run_config
    from moelab.train.vl_job import train_vl

    cfg = load_vl_run_config(config, overrides or [])
    result, summary = train_vl(cfg, out or Path("runs") / config.stem, resume=resume, progress=progress)
    t = summary["trainable"]
    line = (f"stage {summary['stage']} ({summary['template']} template): step {result.step}, "
            f"{result.tokens:,} tokens; trained {sum(t.values()):,} parameters "
            f"(language {t['language']:,}, vision {t['vision']:,}, projector {t['projector']:,})")
    if result.last_eval:
        line += f" · val loss {result.last_eval['val_loss']:.3f}"
    if summary["skipped"]:
        line += f" · {len(summary['skipped'])} records skipped"
    if result.status == "interrupted":
        Console(stderr=True).print(f"interrupted: checkpoint {result.checkpoint}; continue with --resume")
        raise typer.Exit(130)
    Console().print(f"{line}\nreport: {result.run_dir / 'report' / 'summary.md'}\nmodel: {result.run_dir / 'model'}")


@vl_app.command()
@friendly
def chat(
    checkpoint: Annotated[Path, typer.Argument(help="A VL checkpoint (moelab's or in the released layout).")],
    image: Annotated[list[Path] | None, typer.Option("--image", help="An image (repeatable; one <image> each).")
                     ] = None,
    prompt: Annotated[str | None, typer.Option(help="The question. Without --prompt: read questions from stdin, one "
                                                    "per line, each about the same images.")] = None,
    batch: Annotated[Path | None, typer.Option(
        help="JSON Lines of {\"prompt\", \"image\" | \"images\"} (paths relative to the file): answer all, "
             "in batches, one JSON line each on stdout.")] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per answer.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass (1 = off).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    prefill_chunk: Annotated[int, typer.Option(min=0, help="Prefill the prompt in chunks of this many positions "
                                                           "(0 = at once): bounds memory for many image tokens.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Conversations per batch (with --batch).")] = 8,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
):
    """Ask a vision-language model about images.

    The images are tiled as the checkpoint's processor settings say (a global view plus local tiles;
    more than two images: no tiling), each <image> in the prompt expanded to its image tokens. If the prompt
    has no <image>, one is put in front for each --image. Grounding answers keep their <|ref|>/<|det|> tokens.

        moelab vl chat runs/vl-sft/model --image sign.png --prompt "What is written in the image?"
        moelab vl chat runs/vl-sft/model --batch questions.jsonl > answers.jsonl
    """
    import sys

    from moelab.evaluate.vl_chat import VLChat

    bot = VLChat(checkpoint, device=device, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                 seed=seed, prefill_chunk=prefill_chunk, system=system)
    if batch is not None:
        for rec in bot.answer_file(batch, batch_size=batch_size):
            print(json.dumps(rec, ensure_ascii=False), flush=True)
        return
    images = list(image or [])
    questions = [prompt] if prompt is not None else (line.strip() for line in sys.stdin)
    for q in questions:
        if q:
            print(bot.ask(q, images), flush=True)


__all__ = ["vl_app"]
