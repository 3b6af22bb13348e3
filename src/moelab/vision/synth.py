"""Generated vision-language data, offline and deterministic: OCR strips, bar charts, coloured shapes to
ground, and a few real photographs to caption — written to disk for training and evaluating the VL2 path.

    summary = generate(Path("data/vl"), {"ocr": 200, "chart": 100, "shapes": 200, "photo": 15}, seed=0)
    records = read_vl_jsonl(Path("data/vl/train.jsonl"))
    ex = VLProcessor(tok).process(records[0]["messages"], [records[0]["image_path"]])

On disk (``out``)::

    vl_data.json              {"format": "moelab VL data", "version": 1, "splits": {SPLIT: {"seed", "counts",
                              "examples", "options"}}}    (marks the directory as moelab's)
    SPLIT.jsonl               one record per line, in task order (ocr, chart, shapes, photo), then by index
    images/SPLIT-TASK-NNNNNN.png

A record (one JSON object per line)::

    {"id": "train-ocr-000003", "task": "ocr", "image": "images/train-ocr-000003.png", "size": [W, H],
     "messages": [{"role": "user", "content": "<image>\\nWhat is written in the image?"},
                  {"role": "assistant", "content": "RIVER"}],
     "answer": "RIVER", ...truth fields of the task}

``messages`` is what :meth:`moelab.vision.processor.VLProcessor.process` takes (one ``<image>``, which
is ``image``); ``answer`` is the last assistant turn. Truth fields per task:

    ocr      text (= answer), aspect ("8:1" … "1:6"), kind (word/upper/digits), layout (line/stacked/rotated),
             font_size, xy, ink (the text's pixel box), fg, bg            (moelab.vision.synth_draw)
    chart    labels, values (integers, each written above its bar), colours, question (value/highest),
             target; answer "What is the value of X?" -> "42", "Which bar is the highest?" -> the label
    shapes   ref, negative, boxes (the referred shape's pixel box [x1, y1, x2, y2), [] for a negative),
             shapes (all drawn: colour, shape, place, box), background; the question is
             "<image>\\n<|ref|>the red circle<|/ref|>." and the answer the VL2 grounding
             "<|ref|>the red circle<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>" (0–999), or "not present"
             (:data:`NOT_PRESENT`) for a shape that is not drawn             (moelab.vision.synth_shapes)
    photo    name, caption (= answer), source; stage-1 captioning: the user turn is only "<image>\\n"
                                                                           (moelab.vision.synth_photos)

Determinism: example ``i`` of a task draws from ``random.Random("moelab.vision.synth:SEED:SPLIT:TASK:i")``,
so the same seed, split and options give byte-identical JSONL and PNGs (same Pillow and matplotlib), and
changing one task's count leaves the other tasks' examples as they were. Different splits draw different
examples (not guaranteed disjoint: a short word can come up in both).

Writing is atomic (:func:`moelab.common.atomic.write_dir`): the directory is built aside and renamed into
place, so a reader never sees half of it. Writing a split into an existing moelab VL data directory keeps
its other splits (hard-linked, not copied); replacing a split needs ``overwrite``; a directory with files
moelab did not write is refused, whatever ``overwrite`` says.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from moelab.common.atomic import OutputKind, check_output_dir, is_output_of, write_dir
from moelab.common.progress import Bars
from moelab.errors import DataError, did_you_mean
from moelab.vision.synth_draw import make_chart, make_ocr
from moelab.vision.synth_options import SynthOptions
from moelab.vision.synth_photos import PHOTOS, available_photos, make_photo
from moelab.vision.synth_shapes import NOT_PRESENT, grounding_iou, iou, make_shapes

TASKS = ("ocr", "chart", "shapes", "photo")
META = "vl_data.json"
FORMAT, VERSION = "moelab VL data", 1
VL_DATA = OutputKind("VL data directory", META, (META, "*.jsonl", "images"), DataError)
IMAGE_TOKEN = "<image>"
_SPLIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
MAKERS = {"ocr": make_ocr, "chart": make_chart, "shapes": make_shapes}


@dataclass
class TaskSummary:
    examples: int = 0
    negatives: int = 0
    min_size: tuple[int, int] | None = None        # the image with the fewest pixels
    max_size: tuple[int, int] | None = None        # the one with the most

    def add(self, size: tuple[int, int], negative: bool) -> None:
        self.examples += 1
        self.negatives += int(negative)
        if self.min_size is None or size[0] * size[1] < self.min_size[0] * self.min_size[1]:
            self.min_size = size
        if self.max_size is None or size[0] * size[1] > self.max_size[0] * self.max_size[1]:
            self.max_size = size


@dataclass
class Summary:
    out: Path
    split: str
    jsonl: Path
    seed: int
    tasks: dict[str, TaskSummary] = field(default_factory=dict)
    kept_splits: list[str] = field(default_factory=list)     # other splits already in ``out``, kept

    def to_dict(self) -> dict:
        return {"out": str(self.out), "split": self.split, "jsonl": str(self.jsonl), "seed": self.seed,
                "kept_splits": self.kept_splits,
                "tasks": {t: {"examples": s.examples, "negatives": s.negatives,
                              "min_size": list(s.min_size or ()), "max_size": list(s.max_size or ())}
                          for t, s in self.tasks.items()}}


def check_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """``counts`` as {task: n} in :data:`TASKS` order, or a DataError (unknown task, negative, all zero)."""
    for t, n in counts.items():
        if t not in TASKS:
            raise DataError(f"unknown task {t!r}{did_you_mean(t, TASKS)} (tasks: {', '.join(TASKS)})")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DataError(f"the count of {t} must be a whole number >= 0 (got {n!r})")
    out = {t: counts[t] for t in TASKS if counts.get(t, 0) > 0}
    if not out:
        raise DataError("nothing to generate: every count is 0; ask for some ocr, chart, shapes or photo examples")
    return out


def check_split(split: str) -> str:
    if not _SPLIT.match(split or ""):
        raise DataError(f"a split name is letters, digits, '-' and '_' (e.g. train, val); got {split!r}")
    return split


def _read_meta(out: Path) -> dict:
    try:
        meta = json.loads((out / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{out / META}: not readable as JSON ({type(e).__name__}); is {out} a moelab VL data "
                        "directory? choose a new directory") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("splits"), dict):
        raise DataError(f"{out / META} does not describe moelab VL data; choose a new directory")
    return meta


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:                       # another file system, or links not allowed: copy
        shutil.copy2(src, dst)


def generate(out: str | os.PathLike, counts: Mapping[str, int], *, seed: int = 0, split: str = "train",
             options: SynthOptions | None = None, overwrite: bool = False, progress: bool = False,
             option: str = "--out") -> Summary:
    """Write ``counts`` examples per task (:data:`TASKS`) as split ``split`` of ``out`` (module docstring).

    ``counts["photo"]`` takes the first n of :func:`available_photos` (fixed order, not drawn). Refuses,
    before drawing anything: unknown tasks, bad options, a split already there without ``overwrite``,
    and a directory that holds files moelab did not write.
    """
    out, opts = Path(out), (options or SynthOptions()).check()
    split, counts = check_split(split), check_counts(counts)
    names = []
    if "photo" in counts:
        names = available_photos()
        if counts["photo"] > len(names):
            raise DataError(f"{counts['photo']} photographs asked for, but this scikit-image has {len(names)} of "
                            f"the {len(PHOTOS)} moelab captions ({', '.join(names) or 'none'})")
    keep: list[str] = []
    adding = is_output_of(out, VL_DATA)
    if adding:
        meta = _read_meta(out)
        if split in meta["splits"] and not overwrite:
            raise DataError(f"{option} {out} already holds split {split!r}; pass --overwrite to replace it "
                            "(its other splits are kept), or choose another --split")
        keep = sorted(s for s in meta["splits"] if s != split)
    else:
        meta = {"format": FORMAT, "version": VERSION, "splits": {}}
        check_output_dir(out, VL_DATA, overwrite, option)
    summary = Summary(out, split, out / f"{split}.jsonl", seed, kept_splits=keep)

    def fill(tmp: Path) -> None:
        (tmp / "images").mkdir()
        for other in keep:                                     # the other splits, as they were
            for rec in read_vl_jsonl(out / f"{other}.jsonl"):
                _link(out / rec["image"], tmp / rec["image"])
            _link(out / f"{other}.jsonl", tmp / f"{other}.jsonl")
        lines = []
        with Bars(progress) as bars:
            for task, n in counts.items():
                bar = bars.add_task(f"{split}: {task}", total=n)
                stats = summary.tasks.setdefault(task, TaskSummary())
                for i in range(n):
                    rec = _example(tmp, task, i, seed, split, opts, names)
                    stats.add(tuple(rec["size"]), bool(rec.get("negative")))
                    lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                    bars.advance(bar)
        (tmp / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
        splits = {s: meta["splits"][s] for s in keep}
        splits[split] = {"seed": seed, "counts": counts, "examples": len(lines), "options": opts.to_dict()}
        new = {"format": FORMAT, "version": VERSION, "splits": dict(sorted(splits.items()))}
        (tmp / META).write_text(json.dumps(new, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    write_dir(out, fill, kind=VL_DATA, overwrite=overwrite or adding, option=option)
    return summary


def _example(tmp: Path, task: str, i: int, seed: int, split: str, opts: SynthOptions, names: list[str]) -> dict:
    """Draw example ``i`` of ``task``, save its PNG under ``tmp``; its record."""
    rng = random.Random(f"moelab.vision.synth:{seed}:{split}:{task}:{i}")
    if task == "photo":
        img, fields = make_photo(names[i], opts.photo_max_side)
    else:
        img, fields = MAKERS[task](rng, opts)
    rid = f"{split}-{task}-{i:06d}"
    rel = f"images/{rid}.png"
    img.save(tmp / rel, format="PNG")
    prompt, answer = fields.pop("prompt"), fields.pop("answer")
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{prompt}"}, {"role": "assistant", "content": answer}]
    return {"id": rid, "task": task, "image": rel, "size": list(img.size), "messages": messages, "answer": answer,
            **fields}


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
REQUIRED = {"id": str, "task": str, "image": str, "messages": list, "answer": str}


def check_record(rec, base: Path) -> str | None:
    """Why ``rec`` (one parsed line of a VL JSONL beside ``base``) is malformed, or None."""
    if not isinstance(rec, dict):
        return f"a record is a JSON object, not {type(rec).__name__}"
    for key, typ in REQUIRED.items():
        if key not in rec:
            return f"missing field {key!r} (a record has {', '.join(REQUIRED)})"
        if not isinstance(rec[key], typ):
            return f"field {key!r} must be a {typ.__name__}, not {type(rec[key]).__name__}"
    msgs = rec["messages"]
    for m in msgs:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            return f"each message is {{\"role\": system|user|assistant, \"content\": text}} (got {str(m)[:80]})"
    if not msgs or msgs[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in msgs):
        return "messages need a user turn and end with the assistant's answer"
    if msgs[-1]["content"] != rec["answer"]:
        return "field 'answer' differs from the last assistant message"
    slots = sum(m["content"].count(IMAGE_TOKEN) for m in msgs)
    if slots != 1:
        return f"the messages hold {slots} {IMAGE_TOKEN} placeholders; a record has one image, so exactly one"
    size = rec.get("size")
    if size is not None and not (isinstance(size, list) and len(size) == 2
                                 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        return f"field 'size' must be [width, height] in pixels (got {size!r})"
    image = Path(rec["image"])
    if image.is_absolute() or ".." in image.parts:
        return f"image {rec['image']!r} must be a path relative to the JSONL's directory, inside it"
    if not (base / image).is_file():
        return f"image {rec['image']} does not exist (looked for {base / image})"
    return None


def read_vl_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a VL JSONL file (module docstring), each checked, with ``image_path`` added (the
    image's full path). Blank lines are skipped. A malformed line: ``DataError("FILE:LINE: reason")``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; write one with `moelab vl data --out DIR` (DIR/SPLIT.jsonl)")
    out, seen = [], {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
        reason = check_record(rec, path.parent)
        if reason is None and rec["id"] in seen:
            reason = f"id {rec['id']!r} is also on line {seen[rec['id']]}; ids are unique"
        if reason:
            raise DataError(f"{path}:{n}: {reason}")
        seen[rec["id"]] = n
        out.append({**rec, "image_path": str(path.parent / rec["image"])})
    return out


def load_split(out: str | os.PathLike, split: str = "train") -> list[dict]:
    """:func:`read_vl_jsonl` of ``out/SPLIT.jsonl``."""
    return read_vl_jsonl(Path(out) / f"{check_split(split)}.jsonl")


__all__ = ["FORMAT", "MAKERS", "META", "NOT_PRESENT", "REQUIRED", "TASKS", "VERSION", "VL_DATA", "Summary",
           "SynthOptions", "TaskSummary", "check_counts", "check_record", "check_split", "generate", "grounding_iou",
           "iou", "load_split", "read_vl_jsonl"]
