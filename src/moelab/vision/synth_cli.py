"""``moelab vl data``: write generated vision-language examples (OCR, charts, shapes to ground, photos) to
disk (:mod:`moelab.vision.synth`). The function is registered by ``moelab.vision.cli``.

    moelab vl data --out data/vl --ocr 500 --charts 200 --shapes 500 --photos
    moelab vl data --out data/vl --split val --seed 1 --ocr 50 --charts 20 --shapes 50
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from moelab.cli_utils import friendly


@friendly
def data(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write: SPLIT.jsonl, images/, vl_data.json. "
                                      "Other splits already there are kept.", show_default=False)],
    ocr: Annotated[int, typer.Option(min=0, help="OCR examples: short text on canvases from 8:1 to 1:6; "
                                     "the answer is the text.")] = 200,
    charts: Annotated[int, typer.Option(min=0, help="Bar-chart examples: 'What is the value of X?' or "
                                        "'Which bar is the highest?'.")] = 100,
    shapes: Annotated[int, typer.Option(min=0, help="Grounding examples: '<|ref|>the red circle<|/ref|>.' -> its "
                                        "box in 0-999 coordinates, or 'not present'.")] = 200,
    photos: Annotated[bool, typer.Option("--photos", help="Add scikit-image's bundled photographs with one "
                                         "caption each (needs scikit-image: pip install scikit-image).")
                      ] = False,
    seed: Annotated[int, typer.Option(min=0, help="Seed: the same seed, split and options give the same "
                                      "bytes.")] = 0,
    split: Annotated[str, typer.Option(help="Split name: the file SPLIT.jsonl (e.g. train, val).")] = "train",
    negatives: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of grounding questions about a "
                                             "shape that is not drawn.")] = 0.2,
    min_side: Annotated[int, typer.Option(min=16, help="Smallest side of an OCR canvas, in pixels.")] = 64,
    max_side: Annotated[int, typer.Option(min=16, help="Largest side of an OCR canvas, in pixels "
                                          "(8:1 strips need 8x --min-side); shapes canvases (96..384) are capped "
                                          "by it too.")] = 512,
    max_chars: Annotated[int, typer.Option(min=1, help="Longest OCR text, in characters.")] = 12,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace SPLIT if OUT already holds it.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
):
    """Generate VL training/eval data offline: PNG images and conversations (OUT/SPLIT.jsonl) in the
    form VLProcessor.process takes, each with the truth its image was drawn from.

    A record holds id, task, image (images/ID.png), size (W, H), messages (a user turn "<image>" plus the
    question, then the assistant's answer), answer, and the truth: OCR the text, aspect and font size;
    charts the labels and integer values (each written above its bar); shapes every drawn box in pixels;
    photos the caption (stage 1: the user turn is only the image).

    Score grounding answers with moelab.vision.synth.grounding_iou; read a split back, checked line by
    line, with read_vl_jsonl. Nothing is left at OUT unless the run completes; a directory with files
    moelab did not write is refused.

        moelab vl data --out data/vl --ocr 500 --charts 200 --shapes 500 --photos
    """
    from moelab.errors import DataError
    from moelab.vision.synth import SynthOptions, generate
    from moelab.vision.synth_options import fitting_aspects
    from moelab.vision.synth_photos import available_photos

    if min_side > max_side:
        raise DataError(f"--min-side {min_side} is larger than --max-side {max_side}")
    aspects = fitting_aspects((min_side, max_side))           # e.g. 8:1 needs a long side of 8x --min-side
    if not aspects:
        raise DataError(f"no OCR aspect fits sides {min_side}..{max_side} px; raise --max-side")
    d = SynthOptions()
    options = SynthOptions(ocr_sides=(min_side, max_side), ocr_chars=(min(d.ocr_chars[0], max_chars), max_chars),
                           ocr_aspects=aspects, negatives=negatives,
                           shape_sides=(max(32, min(d.shape_sides[0], max_side)),
                                        max(32, min(d.shape_sides[1], max_side)))).check()
    counts = {"ocr": ocr, "chart": charts, "shapes": shapes, "photo": len(available_photos()) if photos else 0}
    summary = generate(out, counts, seed=seed, split=split, options=options, overwrite=overwrite,
                       progress=not quiet)
    if as_json:
        print(json.dumps(summary.to_dict()))
        return
    if quiet:
        return
    console = Console()
    kept = f" (kept splits: {', '.join(summary.kept_splits)})" if summary.kept_splits else ""
    console.print(f"wrote {summary.jsonl}{kept}", highlight=False, soft_wrap=True)
    t = Table()
    for name, justify in (("task", "left"), ("examples", "right"), ("smallest image", "right"),
                          ("largest image", "right"), ("negatives", "right")):
        t.add_column(name, justify=justify)
    for task, s in summary.tasks.items():
        t.add_row(task, str(s.examples), "×".join(map(str, s.min_size)), "×".join(map(str, s.max_size)),
                  str(s.negatives) if task == "shapes" else "")
    console.print(t)


__all__ = ["data"]
