"""The knobs of the generated VL data (:mod:`moelab.vision.synth`): image sizes, text lengths, bar counts,
the share of "not present" grounding questions. Defaults keep images small (64–512 px a side) so a tiny
model (tile 56, patch 14) trains on a CPU; :meth:`SynthOptions.check` refuses impossible settings before
any image is drawn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moelab.errors import DataError

#: OCR canvas shapes, width:height — from 8:1 strips to 1:6 columns.
OCR_ASPECTS = ("8:1", "6:1", "4:1", "3:1", "2:1", "3:2", "1:1", "2:3", "1:2", "1:4", "1:6")
OCR_KINDS = ("word", "upper", "digits")
SHAPE_KINDS = ("circle", "square", "triangle")
#: Shape colours: names and the exact RGB drawn (far apart, so a colour's pixels are easy to find).
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20),
           "purple": (140, 50, 180), "orange": (245, 130, 20)}


def parse_aspect(text: str) -> tuple[int, int]:
    """``"8:1"`` -> (8, 1), or a DataError."""
    try:
        a, b = (int(p) for p in text.split(":"))
    except ValueError:
        raise DataError(f"an aspect is WIDTH:HEIGHT in whole numbers, e.g. 8:1 or 1:6 (got {text!r})") from None
    if a < 1 or b < 1:
        raise DataError(f"an aspect needs positive sides (got {text!r})")
    return a, b


def fitting_aspects(sides: tuple[int, int], aspects: tuple[str, ...] = OCR_ASPECTS) -> tuple[str, ...]:
    """The ``aspects`` a canvas with every side in ``sides`` (lo, hi) can have."""
    lo, hi = sides
    return tuple(a for a in aspects if max(parse_aspect(a)) * lo <= min(parse_aspect(a)) * hi)


@dataclass(frozen=True)
class SynthOptions:
    """Sizes in pixels; ``(lo, hi)`` pairs are inclusive ranges sampled uniformly."""

    ocr_sides: tuple[int, int] = (64, 512)          # every side of an OCR canvas lies in this range
    ocr_chars: tuple[int, int] = (3, 12)            # text length, spaces included
    ocr_aspects: tuple[str, ...] = OCR_ASPECTS
    ocr_kinds: tuple[str, ...] = OCR_KINDS
    ocr_min_font: int = 10                          # smaller text is not drawn: the canvas is drawn again
    chart_width: tuple[int, int] = (192, 320)
    chart_height: tuple[int, int] = (160, 256)
    chart_bars: tuple[int, int] = (2, 5)
    chart_values: tuple[int, int] = (1, 99)
    shape_sides: tuple[int, int] = (96, 384)        # every side of a shapes canvas lies in this range
    shape_count: tuple[int, int] = (1, 3)
    shape_kinds: tuple[str, ...] = SHAPE_KINDS
    shape_colours: tuple[str, ...] = tuple(COLOURS)
    negatives: float = 0.2                          # share of grounding questions about an absent shape
    photo_max_side: int = 256                       # photographs are shrunk to fit this (aspect kept)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def check(self) -> SynthOptions:
        """Self, or a DataError naming the first impossible setting."""
        for name in ("ocr_sides", "ocr_chars", "chart_width", "chart_height", "chart_bars", "chart_values",
                     "shape_sides", "shape_count"):
            lo, hi = getattr(self, name)
            if lo > hi or lo < (0 if name == "chart_values" else 1):
                raise DataError(f"{name} must be a range lo <= hi of positive numbers (got {lo}..{hi})")
        if self.ocr_sides[0] < 16 or self.shape_sides[0] < 32 or self.chart_width[0] < 96 \
                or self.chart_height[0] < 96:
            raise DataError("images this small cannot hold legible content: OCR sides >= 16, shape sides >= 32, "
                            "charts >= 96x96 pixels")
        if self.chart_bars[1] > 8:
            raise DataError(f"at most 8 bars per chart (got {self.chart_bars[1]})")
        if self.chart_values[1] - self.chart_values[0] + 1 < self.chart_bars[1]:
            raise DataError(f"chart_values {self.chart_values} has fewer distinct values than bars "
                            f"({self.chart_bars[1]}); bar values are distinct so one bar is the highest")
        lo, hi = self.ocr_sides
        for a in self.ocr_aspects:
            w, h = parse_aspect(a)
            if max(w, h) * lo > min(w, h) * hi:
                raise DataError(f"aspect {a} does not fit OCR sides {lo}..{hi} px (it needs a long side of "
                                f"{max(w, h) * lo / min(w, h):.0f} px); raise the largest side or drop the aspect")
        for name, have, known in (("ocr_kinds", self.ocr_kinds, OCR_KINDS),
                                  ("shape_kinds", self.shape_kinds, SHAPE_KINDS),
                                  ("shape_colours", self.shape_colours, tuple(COLOURS))):
            bad = [x for x in have if x not in known]
            if bad or not have:
                raise DataError(f"{name}: {bad or 'none'} not among {', '.join(known)}")
        if self.shape_count[1] > len(self.shape_kinds) * len(self.shape_colours):
            raise DataError("shape_count allows more shapes than there are colour/shape pairs")
        if not self.ocr_aspects:
            raise DataError("ocr_aspects is empty; give at least one WIDTH:HEIGHT")
        if not 0.0 <= self.negatives <= 1.0:
            raise DataError(f"negatives is a share between 0 and 1 (got {self.negatives})")
        if self.ocr_min_font < 6 or self.photo_max_side < 16:
            raise DataError("ocr_min_font must be >= 6 and photo_max_side >= 16")
        return self


__all__ = ["COLOURS", "OCR_ASPECTS", "OCR_KINDS", "SHAPE_KINDS", "SynthOptions", "fitting_aspects", "parse_aspect"]
