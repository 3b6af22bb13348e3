"""The pictures of :mod:`moelab.vision.synth` that hold text: OCR strips (PIL) and bar charts (matplotlib).

Each ``make_*`` takes a ``random.Random`` and the options and returns ``(image, fields)``: ``fields`` has the
question (``prompt``, without the ``<image>\\n`` prefix), the ``answer`` and the truth the picture was drawn
from. Each ``draw_*`` draws a picture from those stored fields alone, the same pixels every time, so a
test (or a sceptical reader) can redraw a record and compare it with its PNG.

OCR      the text in Pillow's built-in scalable font (``ImageFont.load_default(size)``, Pillow >= 10.1), one
         line (``layout="line"``), one character per line (``"stacked"``, tall canvases) or a line turned
         90° anticlockwise (``"rotated"``, tall canvases); the font is the largest that fits, or a bit smaller.
Charts   2–5 bars with distinct integer values, each value written above its bar; no y ticks, so the
         written values are the only numbers in the picture. :func:`draw_chart` also returns what the
         figure's text objects say (tick labels, value labels) as read back from matplotlib after drawing.
"""

from __future__ import annotations

import functools
import math
import random

from moelab.errors import DataError
from moelab.vision.synth_options import SynthOptions, parse_aspect

OCR_QUESTIONS = ("What is written in the image?", "Read the text in the image.", "What does the text say?")
#: Short common words for ``kind="word"`` (written for moelab).
WORDS = (
    "air apple bird black blue boat book bread bridge brown cake card city clock cloud coat coffee cold "
    "corner dance door dream earth east field fire fish floor flower forest friend garden glass gold grass "
    "green hand happy heart hill horse house island kitchen lamp leaf letter light lion market metal milk "
    "money moon morning mountain music night north ocean orange paper party pencil piano plant rain red "
    "river road rock salt sand school sea shadow ship silver sky snow song south spring star stone storm "
    "street summer sun table tiger train tree valley voice water west white wind window winter wood yellow "
    "zebra"
).split()
CHART_LABELS = (
    ("apple", "pear", "plum", "kiwi", "lime", "fig", "mango", "grape"),
    ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"),
    ("A", "B", "C", "D", "E", "F", "G", "H"),
    ("north", "south", "east", "west", "centre"),
    ("cat", "dog", "owl", "fox", "bee", "cow", "hen"),
    ("2019", "2020", "2021", "2022", "2023", "2024"),
)
BAR_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


# ------------------------------------------------------------------------------------------------
# OCR
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def font(size: int):
    """Pillow's built-in scalable font at ``size`` px (a DataError where Pillow is too old for it)."""
    from PIL import ImageFont, features

    if not features.check("freetype2"):
        raise DataError("drawing OCR text needs Pillow built with FreeType; reinstall Pillow (pip install -U pillow)")
    f = ImageFont.load_default(size=size)
    if not isinstance(f, ImageFont.FreeTypeFont):
        raise DataError("drawing OCR text needs Pillow >= 10.1 (a scalable built-in font); pip install -U pillow")
    return f


def random_text(rng: random.Random, kind: str, lo: int, hi: int) -> str:
    """A word (or two, when they fit), an uppercase string or a digit string of ``lo``–``hi`` characters."""
    n = rng.randint(lo, hi)
    if kind == "upper":
        return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(n))
    if kind == "digits":
        return "".join(rng.choice("0123456789") for _ in range(n))
    fitting = [w for w in WORDS if len(w) <= hi]
    text = rng.choice(fitting)
    while len(text) < n:                                   # add words while the text is shorter than drawn
        more = [w for w in fitting if len(text) + 1 + len(w) <= hi]
        if not more:
            break
        text += " " + rng.choice(more)
    if len(text) < lo:                                     # a short word cannot be padded: spell a longer one
        text = rng.choice([w for w in WORDS if lo <= len(w) <= hi] or ["x" * lo])
    return text


def _ink_box(d, text: str, layout: str, f) -> tuple[int, int, int, int]:
    """The ink's box when drawn at (0, 0), widened to whole pixels (centred lines can start mid-pixel)."""
    if layout == "stacked":
        box = d.multiline_textbbox((0, 0), "\n".join(text), font=f, align="center")
    else:
        box = d.textbbox((0, 0), text, font=f)
    return math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])


def _ink_size(text: str, layout: str, size: int) -> tuple[int, int]:
    from PIL import Image, ImageDraw

    x0, y0, x1, y1 = _ink_box(ImageDraw.Draw(Image.new("L", (1, 1))), text, layout, font(size))
    w, h = x1 - x0, y1 - y0
    return (h, w) if layout == "rotated" else (w, h)


def largest_font(text: str, layout: str, room: tuple[int, int], cap: int = 400) -> int:
    """The largest font size whose ink fits ``room`` (w, h), or 0."""
    lo, hi = 0, cap
    while lo < hi:                                         # ink grows with the size: bisect
        mid = (lo + hi + 1) // 2
        w, h = _ink_size(text, layout, mid)
        if w <= room[0] and h <= room[1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def draw_text(text: str, size: tuple[int, int], layout: str, font_size: int, xy: tuple[int, int],
              fg: tuple[int, int, int], bg: tuple[int, int, int]):
    """The OCR picture: ``text`` with its ink's top-left corner at ``xy`` on a ``bg`` canvas of ``size``."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", tuple(size), tuple(bg))
    f = font(font_size)
    if layout == "rotated":                                # draw the line on its own, turn it, paste its ink
        w, h = _ink_size(text, "line", font_size)
        mask = Image.new("L", (w, h), 0)
        x0, y0, _, _ = _ink_box(ImageDraw.Draw(mask), text, "line", f)
        ImageDraw.Draw(mask).text((-x0, -y0), text, fill=255, font=f)
        mask = mask.transpose(Image.Transpose.ROTATE_90)
        img.paste(tuple(fg), (xy[0], xy[1], xy[0] + mask.width, xy[1] + mask.height), mask)
        return img
    d = ImageDraw.Draw(img)
    x0, y0, _, _ = _ink_box(d, text, layout, f)
    if layout == "stacked":
        d.multiline_text((xy[0] - x0, xy[1] - y0), "\n".join(text), fill=tuple(fg), font=f, align="center")
    else:
        d.text((xy[0] - x0, xy[1] - y0), text, fill=tuple(fg), font=f)
    return img


def _colours(rng: random.Random) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(text, background): dark on light seven times in ten, else light on dark."""
    light = tuple(rng.randint(200, 255) for _ in range(3))
    dark = tuple(rng.randint(0, 70) for _ in range(3))
    return (dark, light) if rng.random() < 0.7 else (light, dark)


def make_ocr(rng: random.Random, opts: SynthOptions):
    """An OCR example (module docstring); fields ``text``, ``aspect``, ``kind``, ``layout``, ``font_size``,
    ``xy``, ``ink`` (the text's box in pixels), ``fg``, ``bg``."""
    lo, hi = opts.ocr_sides
    for _ in range(200):                                   # redraw while the text would be too small to read
        aspect = rng.choice(opts.ocr_aspects)
        kind = rng.choice(opts.ocr_kinds)
        text = random_text(rng, kind, *opts.ocr_chars)
        a, b = parse_aspect(aspect)
        short = rng.randint(lo, min(a, b) * hi // max(a, b))
        W, H = (round(short * a / b), short) if a >= b else (short, round(short * b / a))
        layout = "line" if H <= 1.5 * W else rng.choice(("stacked", "rotated"))
        margin = max(2, round(0.06 * min(W, H)))
        best = largest_font(text, layout, (W - 2 * margin, H - 2 * margin))
        if best >= opts.ocr_min_font:
            break
    else:
        raise DataError(f"no legible OCR text fits canvases of {lo}..{hi} px with {opts.ocr_chars} characters; "
                        "allow larger canvases or shorter text")
    font_size = rng.randint(max(opts.ocr_min_font, round(0.6 * best)), best)
    w, h = _ink_size(text, layout, font_size)
    x = rng.randint(margin, W - margin - w)
    y = rng.randint(margin, H - margin - h)
    fg, bg = _colours(rng)
    img = draw_text(text, (W, H), layout, font_size, (x, y), fg, bg)
    return img, {"prompt": rng.choice(OCR_QUESTIONS), "answer": text, "text": text, "aspect": aspect, "kind": kind,
                 "layout": layout, "font_size": font_size, "xy": [x, y], "ink": [x, y, x + w, y + h],
                 "fg": list(fg), "bg": list(bg)}


# ------------------------------------------------------------------------------------------------
# bar charts
# ------------------------------------------------------------------------------------------------
def draw_chart(labels: list[str], values: list[int], size: tuple[int, int], colours: list[str]):
    """``(image, readback)``: the bar chart, and ``[(tick label, value label, bar height), ...]`` as
    matplotlib holds them after drawing (the text in the picture, read from the figure)."""
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    W, H = size
    with matplotlib.style.context("default"):              # whatever a matplotlibrc says: the same pixels
        fig = Figure(figsize=(W / 100, H / 100), dpi=100)
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        bars = ax.bar(range(len(labels)), values, color=colours, width=0.6)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        texts = ax.bar_label(bars, labels=[str(v) for v in values], fontsize=8, padding=2)
        ax.set_ylim(0, max(values) * 1.2 + 1)
        ax.set_yticks([])
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        fig.tight_layout(pad=0.4)
        canvas.draw()
        img = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
        readback = [(t.get_text(), v.get_text(), b.get_height())
                    for t, v, b in zip(ax.get_xticklabels(), texts, bars, strict=True)]
    return img.convert("RGB"), readback


def make_chart(rng: random.Random, opts: SynthOptions):
    """A chart example: fields ``labels``, ``values``, ``colours``, ``question`` ("value"/"highest"), ``target``."""
    n = rng.randint(*opts.chart_bars)
    pool = rng.choice([p for p in CHART_LABELS if len(p) >= n])
    labels = rng.sample(pool, n)
    values = rng.sample(range(opts.chart_values[0], opts.chart_values[1] + 1), n)
    colours = [rng.choice(BAR_COLOURS)] * n if rng.random() < 0.5 else rng.sample(BAR_COLOURS, n)
    size = (rng.randint(*opts.chart_width), rng.randint(*opts.chart_height))
    img, readback = draw_chart(labels, values, size, colours)
    if [(t, v) for t, v, _ in readback] != [(lab, str(v)) for lab, v in zip(labels, values, strict=True)]:
        raise DataError(f"a chart's drawn text {readback} differs from its data {labels}, {values}")  # never, we hope
    if rng.random() < 1 / 3:
        kind, target = "highest", labels[values.index(max(values))]
        prompt, answer = "Which bar is the highest?", target
    else:
        kind, target = "value", rng.choice(labels)
        prompt, answer = f"What is the value of {target}?", str(values[labels.index(target)])
    return img, {"prompt": prompt, "answer": answer, "labels": labels, "values": values, "colours": colours,
                 "question": kind, "target": target}


__all__ = ["BAR_COLOURS", "CHART_LABELS", "OCR_QUESTIONS", "WORDS", "draw_chart", "draw_text", "font",
           "largest_font", "make_chart", "make_ocr", "random_text"]
