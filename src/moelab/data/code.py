"""Source trees as a code corpus: walk, filter, deduplicate, label, and write JSON Lines for ``moelab data
prepare`` (DeepSeek-Coder-V2 §2; docs/methods.md §11).

    moelab data code stdlib --out runs/code/stdlib.jsonl             # this machine's Python standard library
    moelab data code ~/src/project other/tree --out runs/code/mine.jsonl
    moelab data prepare runs/code/stdlib.jsonl --out runs/data/code --fim-rate 0.5

Every file below each root (sorted; hidden entries, ``__pycache__``, ``site-packages``, ``node_modules``
and ``--exclude`` names skipped) goes through, in order, and the first failing check names why it is
dropped:

    not a regular file (a device, FIFO, broken link) · too large (> max_file_bytes) · binary (a NUL byte
    in its first 8 KiB) · not UTF-8 · unknown extension · empty · the quality filters
    (:mod:`moelab.data.code_filters`) · exact duplicate (same text as a kept file) · near duplicate
    (MinHash, estimated Jaccard ≥ ``near_threshold`` with a kept file: :mod:`moelab.data.minhash`)

A kept file is one line ``{"text", "path", "language"}`` (``path`` relative to its root, language from the
extension). ``stdlib`` names ``sysconfig.get_paths()["stdlib"]`` without its test suites (``test``,
``tests``, ``idle_test``). The output is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sysconfig
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from moelab.common.atomic import write_file
from moelab.common.progress import Bars
from moelab.data.code_filters import QualityRules, language_of, quality_reason
from moelab.data.minhash import NearDuplicates
from moelab.errors import DataError

STDLIB = "stdlib"
ALWAYS_SKIPPED = {"__pycache__", "site-packages", "dist-packages", "node_modules"}
STDLIB_TESTS = {"test", "tests", "idle_test"}
#: reasons, in the order the checks run
REASONS = ("not a regular file", "too large", "binary", "not UTF-8", "unknown extension", "empty", "quality",
           "exact duplicate", "near duplicate")


@dataclass
class CodeReport:
    """What :func:`build_code_corpus` kept (by language) and dropped (by reason, with the quality rule)."""

    kept: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))   # lang -> [files, bytes]
    dropped: Counter = field(default_factory=Counter)
    quality: Counter = field(default_factory=Counter)          # which quality rule dropped how many
    examples: dict[str, str] = field(default_factory=dict)     # reason -> one path

    @property
    def n_kept(self) -> int:
        return sum(f for f, _ in self.kept.values())

    def drop(self, reason: str, path: str, rule: str | None = None) -> None:
        self.dropped[reason] += 1
        if rule:
            self.quality[rule] += 1
        self.examples.setdefault(reason, path)

    def to_dict(self) -> dict:
        return {"kept_files": self.n_kept, "kept_bytes": sum(b for _, b in self.kept.values()),
                "kept": {k: {"files": f, "bytes": b} for k, (f, b) in sorted(self.kept.items())},
                "dropped": dict(self.dropped), "quality": dict(self.quality), "examples": self.examples}

    def table(self, title: str) -> Table:
        t = Table(title=title)
        t.add_column("kept: language")
        t.add_column("files", justify="right")
        t.add_column("MB", justify="right")
        for lang, (files, size) in sorted(self.kept.items(), key=lambda kv: -kv[1][1]):
            t.add_row(lang, f"{files:,}", f"{size / 1e6:.2f}")
        t.add_row("[bold]dropped: reason[/]", "", "", end_section=True)
        for reason in REASONS:
            if self.dropped[reason]:
                rules = "; ".join(f"{r}: {n}" for r, n in self.quality.most_common()) if reason == "quality" else ""
                t.add_row(reason + (f" ({rules})" if rules else ""), f"{self.dropped[reason]:,}", "")
        return t


def resolve_roots(specs: list[str]) -> list[tuple[Path, set[str]]]:
    """``(directory, extra names to skip)`` for each spec (``stdlib`` or a directory), or a DataError."""
    roots = []
    for spec in specs:
        if spec == STDLIB:
            roots.append((Path(sysconfig.get_paths()["stdlib"]), set(STDLIB_TESTS)))
            continue
        p = Path(spec).expanduser()
        if not p.exists():
            raise DataError(f"{spec}: no such directory; give source trees (or 'stdlib' for Python's standard "
                            "library)")
        if not p.is_dir():
            raise DataError(f"{spec} is a file; give the directory that holds the source tree")
        roots.append((p, set()))
    if not roots:
        raise DataError("no source trees given; name at least one directory (or 'stdlib')")
    return roots


def walk(root: Path, skip: set[str]) -> list[Path]:
    """Files below ``root`` in sorted order, without hidden entries and skipped directory names."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip | ALWAYS_SKIPPED)
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


def build_code_corpus(specs: list[str], out: str | os.PathLike, *, exclude: tuple[str, ...] = (),
                      max_file_bytes: int = 1 << 20, near_threshold: float = 0.85, rules: QualityRules = QualityRules(),
                      progress: bool = True, seed: int = 0) -> CodeReport:
    """Write the kept files of ``specs`` to ``out`` (JSON Lines) and return what was kept and dropped."""
    out = Path(out)
    if out.is_dir():
        raise DataError(f"--out {out} is a directory; give the JSON Lines file to write, e.g. {out / 'code.jsonl'}")
    if max_file_bytes < 1:
        raise DataError(f"max_file_bytes must be positive (got {max_file_bytes})")
    roots = resolve_roots(list(specs))
    files = [(root, f) for root, skip in roots for f in walk(root, skip | set(exclude))]
    if not files:
        raise DataError(f"no files under {', '.join(str(r) for r, _ in roots)}")
    report = CodeReport()
    exact: set[bytes] = set()
    near = NearDuplicates(threshold=near_threshold, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)

    def fill(f) -> None:
        with Bars(enabled=progress) as bars:
            task = bars.add_task("reading code", total=len(files))
            for root, path in files:
                bars.advance(task)
                row = _check(root, path, report, exact, near, max_file_bytes, rules)
                if row is not None:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")

    write_file(out, fill)
    if report.n_kept == 0:
        out.unlink(missing_ok=True)
        raise DataError(f"every file was dropped ({dict(report.dropped)}); nothing written to {out}")
    return report


def _check(root: Path, path: Path, report: CodeReport, exact: set[bytes], near: NearDuplicates,
           max_file_bytes: int, rules: QualityRules) -> dict | None:
    rel = str(path.relative_to(root))
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):            # a device, a FIFO, a socket (read_bytes could block forever)
            return report.drop("not a regular file", rel)
        if st.st_size > max_file_bytes:
            return report.drop("too large", rel)
        data = path.read_bytes()
    except OSError:                                 # a broken link, no permission
        return report.drop("not a regular file", rel)
    if b"\0" in data[:8192]:
        return report.drop("binary", rel)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return report.drop("not UTF-8", rel)
    language = language_of(path.name)
    if language is None:
        return report.drop("unknown extension", rel)
    if not text.strip():
        return report.drop("empty", rel)
    reason = quality_reason(text, language, rules)
    if reason is not None:
        return report.drop("quality", rel, reason)
    digest = hashlib.sha256(data).digest()
    if digest in exact:
        return report.drop("exact duplicate", rel)
    if not near.add(text):
        return report.drop("near duplicate", rel)
    exact.add(digest)
    report.kept[language][0] += 1
    report.kept[language][1] += len(data)
    return {"text": text, "path": rel, "language": language}


__all__ = ["STDLIB", "CodeReport", "build_code_corpus", "resolve_roots", "walk"]
