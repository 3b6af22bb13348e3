"""Which source files make a code corpus: the language from the file extension, and DeepSeek-Coder-V2's
quality filters (arXiv 2406.11931 §2; docs/methods.md §11), each with the reason a file is dropped.

    mean line length ≤ 100 characters, longest line ≤ 1000
    alphabetic characters ≥ 25% of the file
    HTML: visible text ≥ 20% of the file
    JSON / YAML: 50 ≤ characters ≤ 5000 (kept only in that range)

The paper applies the line and alphabetic rules to every file; moelab does the same (they drop
generated, minified and data files).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: file extension -> language (a file with none of these is dropped as "unknown extension")
LANGUAGES: dict[str, str] = {
    ".py": "Python", ".pyi": "Python", ".c": "C", ".h": "C", ".cc": "C++", ".cpp": "C++", ".cxx": "C++",
    ".hpp": "C++", ".hh": "C++", ".cu": "CUDA", ".java": "Java", ".kt": "Kotlin", ".scala": "Scala",
    ".js": "JavaScript", ".mjs": "JavaScript", ".jsx": "JavaScript", ".ts": "TypeScript", ".tsx": "TypeScript",
    ".go": "Go", ".rs": "Rust", ".rb": "Ruby", ".php": "PHP", ".swift": "Swift", ".m": "Objective-C",
    ".cs": "C#", ".fs": "F#", ".hs": "Haskell", ".ml": "OCaml", ".lua": "Lua", ".pl": "Perl", ".r": "R",
    ".jl": "Julia", ".sh": "Shell", ".bash": "Shell", ".zsh": "Shell", ".ps1": "PowerShell", ".bat": "Batchfile",
    ".sql": "SQL", ".html": "HTML", ".htm": "HTML", ".css": "CSS", ".scss": "SCSS", ".xml": "XML",
    ".json": "JSON", ".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".ini": "INI", ".cfg": "INI",
    ".md": "Markdown", ".rst": "reStructuredText", ".tex": "TeX", ".txt": "Text", ".cmake": "CMake",
    ".mk": "Makefile", ".asm": "Assembly", ".s": "Assembly", ".f90": "Fortran", ".vim": "Vim Script",
    ".el": "Emacs Lisp", ".clj": "Clojure", ".ex": "Elixir", ".erl": "Erlang", ".dart": "Dart", ".zig": "Zig",
}
FILENAMES = {"Makefile": "Makefile", "Dockerfile": "Dockerfile", "CMakeLists.txt": "CMake"}

_TAG = re.compile(r"<script\b.*?</script>|<style\b.*?</style>|<[^>]*>", re.S | re.I)


@dataclass(frozen=True)
class QualityRules:
    """The thresholds of the module docstring (Coder-V2's values by default)."""

    max_mean_line: float = 100.0
    max_line: int = 1000
    min_alpha: float = 0.25
    min_html_visible: float = 0.20
    json_yaml_chars: tuple[int, int] = (50, 5000)


def language_of(name: str) -> str | None:
    """The language of a file name (``"utils.py"`` -> ``"Python"``), or None."""
    if name in FILENAMES:
        return FILENAMES[name]
    dot = name.rfind(".")
    return LANGUAGES.get(name[dot:].lower()) if dot > 0 else None


def quality_reason(text: str, language: str, rules: QualityRules = QualityRules()) -> str | None:
    """Why ``text`` fails the quality filters (a short reason), or None when it passes."""
    n = len(text)
    if language in ("JSON", "YAML"):
        lo, hi = rules.json_yaml_chars
        if not lo <= n <= hi:
            return f"{language} size outside {lo}-{hi} chars"
    lines = text.splitlines() or [""]
    if max(len(line) for line in lines) > rules.max_line:
        return f"a line longer than {rules.max_line} chars"
    if n / len(lines) > rules.max_mean_line:
        return f"mean line length over {rules.max_mean_line:g}"
    if sum(c.isalpha() for c in text) < rules.min_alpha * n:
        return f"under {rules.min_alpha:.0%} alphabetic"
    if language == "HTML":
        visible = len(_TAG.sub("", text).strip())
        if visible < rules.min_html_visible * n:
            return f"HTML with under {rules.min_html_visible:.0%} visible text"
    return None


__all__ = ["FILENAMES", "LANGUAGES", "QualityRules", "language_of", "quality_reason"]
