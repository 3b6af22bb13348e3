"""DeepSeek-VL2's grounding format (docs/methods.md §12): a referring expression and its boxes, with
integer coordinates 0–999 relative to the original image.

    render("the giraffe", [(30.0, 10.0, 120.0, 260.0)], size=(300, 300))
    -> '<|ref|>the giraffe<|/ref|><|det|>[[100, 33, 400, 866]]<|/det|>'
    parse(text, size=(300, 300))  -> [Grounded("the giraffe", [(30.03, 9.91, 120.12, 259.56)])]

Encoding ``round(x / W · 999)`` (y with H), decoding ``x / 999 · W``: a coordinate comes back within
W/999 of where it was (tested). A ``<|grounding|>`` at the start of a prompt asks for grounded captions.
A malformed ``<|det|>`` (not a list of 4-number lists, a coordinate outside 0–999, x2 < x1) is a
:class:`DataError` naming it — or, with ``skip_bad``, skipped and counted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from moelab.errors import DataError

REF, REF_END, DET, DET_END, GROUNDING = "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"
_PAIR = re.compile(re.escape(REF) + r"(.*?)" + re.escape(REF_END) + r"\s*" + re.escape(DET) + r"(.*?)"
                   + re.escape(DET_END), re.S)
Box = tuple[float, float, float, float]


@dataclass
class Grounded:
    ref: str
    boxes: list[Box]


@dataclass
class ParseStats:
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    W, H = size
    if W < 1 or H < 1:
        raise DataError(f"an image size must be positive (got {W}×{H})")
    return W, H


def encode_box(box: Box, size: tuple[int, int]) -> list[int]:
    W, H = _check_size(size)
    x1, y1, x2, y2 = box
    q = [round(x1 / W * 999), round(y1 / H * 999), round(x2 / W * 999), round(y2 / H * 999)]
    return [min(999, max(0, v)) for v in q]


def decode_box(q: list[int], size: tuple[int, int]) -> Box:
    W, H = _check_size(size)
    return (q[0] / 999 * W, q[1] / 999 * H, q[2] / 999 * W, q[3] / 999 * H)


def render(ref: str, boxes: list[Box], size: tuple[int, int]) -> str:
    """``<|ref|>ref<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`` in 0–999 coordinates."""
    if not boxes:
        raise DataError(f"no box for {ref!r}; a grounded reference needs at least one")
    return f"{REF}{ref}{REF_END}{DET}{json.dumps([encode_box(b, size) for b in boxes])}{DET_END}"


def _boxes(det: str, where: str) -> list[list[int]]:
    try:
        boxes = json.loads(det)
    except json.JSONDecodeError:
        raise DataError(f"{where}: {DET} holds {det[:60]!r}, not a list of [x1, y1, x2, y2] lists") from None
    if not isinstance(boxes, list) or not boxes:
        raise DataError(f"{where}: {DET} must hold a non-empty list of boxes (got {det[:60]!r})")
    for b in boxes:
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                            for v in b)):
            raise DataError(f"{where}: a box must be 4 integers [x1, y1, x2, y2] (got {b!r})")
        if not all(0 <= v <= 999 for v in b):
            raise DataError(f"{where}: box {b} has a coordinate outside 0-999")
        if b[2] < b[0] or b[3] < b[1]:
            raise DataError(f"{where}: box {b} has x2 < x1 or y2 < y1")
    return boxes


def parse(text: str, size: tuple[int, int], skip_bad: bool = False, stats: ParseStats | None = None,
          where: str = "grounding") -> list[Grounded]:
    """Every ``<|ref|>…<|/ref|><|det|>…<|/det|>`` of ``text``, boxes in pixels of an image of ``size``."""
    out = []
    for m in _PAIR.finditer(text):
        try:
            out.append(Grounded(m.group(1), [decode_box(q, size) for q in _boxes(m.group(2), where)]))
        except DataError as e:
            if not skip_bad:
                raise
            if stats is not None:
                stats.skipped += 1
                stats.reasons.append(str(e))
    return out


__all__ = ["DET", "DET_END", "GROUNDING", "REF", "REF_END", "Grounded", "ParseStats", "decode_box", "encode_box",
           "parse", "render"]
