"""Code corpora: DeepSeek-Coder-V2's quality filters, exact and MinHash near-duplicate removal (checked
against brute-force Jaccard similarity), languages from extensions, and every kind of bad file skipped and
counted with its reason."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from moelab.cli import app
from moelab.data.code import build_code_corpus
from moelab.data.code_filters import language_of, quality_reason
from moelab.data.minhash import NearDuplicates, jaccard, shingles
from moelab.errors import DataError

GOOD = "\n".join(f"def f{i}(x):\n    return x * {i} + helper_value_{i}\n" for i in range(30))


def _tree(root):
    (root / "pkg").mkdir(parents=True)
    files = {
        "pkg/good.py": GOOD,
        "pkg/copy.py": GOOD,                                               # exact duplicate
        "pkg/near.py": GOOD.replace("def f3(x)", "def g3(x)"),             # near duplicate
        "pkg/other.py": "import os\n\n\nclass Walker:\n    def run(self, top):\n        return list(os.walk(top))\n",
        "pkg/min.js": "var a=1;" * 200,                                    # one 1600-char line
        "pkg/numbers.txt": "\n".join("12, 34, 56, 78, 90" for _ in range(50)),   # under 25% alphabetic
        "pkg/small.json": '{"a": 1}',                                      # JSON under 50 characters
        "pkg/ok.json": json.dumps({"name": "moelab", "description": "sparse language model toolkit",
                                  "keywords": ["mixture", "experts", "attention"]}, indent=1),
        "pkg/tags.html": "<div><span><b></b></span></div>\n" * 30 + "hi\n",  # under 20% visible text
        "pkg/page.html": "<html><body><p>\n" + "Some readable words here.\n" * 20 + "</p></body></html>\n",
        "pkg/data.xyz": "unknown kind of file\n",
        "pkg/empty.py": "   \n",
        "pkg/big.py": "x = 1\n" * 2000,                                    # 12 kB > max_file_bytes
        ".hidden/secret.py": GOOD + "# hidden\n",
        "pkg/__pycache__/good.cpython-311.py": GOOD + "# cache\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "pkg" / "bin.py").write_bytes(b"x = 1\n\0\0\0binary")
    (root / "pkg" / "latin.py").write_bytes("name = 'café'\n".encode("latin-1"))
    (root / "pkg" / "zero.py").symlink_to("/dev/zero")                    # reading it would never end
    (root / "pkg" / "dangling.py").symlink_to(root / "nowhere.py")
    return root


def test_filters_dedup_and_reasons(tmp_path):
    tree = _tree(tmp_path / "tree")
    out = tmp_path / "code.jsonl"
    report = build_code_corpus([str(tree)], out, max_file_bytes=10_000, progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    kept = {r["path"]: r["language"] for r in rows}
    assert kept == {"pkg/copy.py": "Python", "pkg/other.py": "Python", "pkg/ok.json": "JSON",
                    "pkg/page.html": "HTML"}                             # sorted order: copy.py before good.py
    assert rows[0]["text"] == GOOD
    d = report.dropped
    assert (d["exact duplicate"], d["near duplicate"], d["binary"], d["not UTF-8"], d["too large"],
            d["unknown extension"], d["empty"], d["quality"]) == (1, 1, 1, 1, 1, 1, 1, 4)
    assert set(report.quality) == {"a line longer than 1000 chars", "under 25% alphabetic",
                                   "JSON size outside 50-5000 chars", "HTML with under 20% visible text"}
    assert report.examples["near duplicate"] == "pkg/near.py" and report.examples["exact duplicate"] == "pkg/good.py"
    assert d["not a regular file"] == 2
    assert report.to_dict()["kept_files"] == 4


def test_quality_rules_one_by_one():
    assert quality_reason(GOOD, "Python") is None
    assert quality_reason("x" * 1001, "Python") == "a line longer than 1000 chars"
    assert quality_reason(("y" * 150 + "\n") * 3, "Python") == "mean line length over 100"
    assert quality_reason("1 2 3 4 5 6 7 8 9\n" * 5, "Text") == "under 25% alphabetic"
    assert quality_reason('{"k": 1}', "JSON") == "JSON size outside 50-5000 chars"
    assert quality_reason("key: value\n" * 600, "YAML") == "YAML size outside 50-5000 chars"
    assert quality_reason("key: value\n" * 10, "YAML") is None
    assert language_of("a.PY") == "Python" and language_of("Makefile") == "Makefile" and language_of("x") is None


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)]
    base = [rng.choice(words) for _ in range(600)]
    nd = NearDuplicates(seed=1)
    for n_changed in (0, 10, 60, 200, 450):
        other = list(base)
        for i in rng.sample(range(len(base)), n_changed):
            other[i] = f"new{i}"
        a, b = " ".join(base), " ".join(other)
        exact = jaccard(shingles(a), shingles(b))
        est = float((nd.signature(a) == nd.signature(b)).mean())
        assert abs(est - exact) < 0.12, (n_changed, exact, est)
    # the decision follows the true similarity: near copies dropped, different texts kept
    nd = NearDuplicates(threshold=0.85, seed=2)
    assert nd.add(" ".join(base))
    near = list(base)
    near[5] = "changed"
    assert jaccard(shingles(" ".join(base)), shingles(" ".join(near))) > 0.95
    assert not nd.add(" ".join(near))
    far = [rng.choice(words) for _ in range(600)]
    assert jaccard(shingles(" ".join(base)), shingles(" ".join(far))) < 0.1
    assert nd.add(" ".join(far))


def test_cli_and_bad_input(tmp_path):
    tree = _tree(tmp_path / "tree")
    out = tmp_path / "c" / "code.jsonl"
    res = CliRunner().invoke(app, ["data", "code", str(tree), "--out", str(out), "--max-file-bytes", "10000"])
    assert res.exit_code == 0, res.output
    assert "near duplicate" in res.output and "kept 4 files" in res.output
    assert json.loads((tmp_path / "c" / "code.jsonl.summary.json").read_text())["dropped"]["binary"] == 1
    bad = CliRunner().invoke(app, ["data", "code", str(tmp_path / "nope"), "--out", str(out)])
    assert bad.exit_code == 1 and "no such directory" in bad.output
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "a.py").write_bytes(b"\0\1\2")
    with pytest.raises(DataError, match="every file was dropped"):
        build_code_corpus([str(tmp_path / "bins")], tmp_path / "x.jsonl", progress=False)
    assert not (tmp_path / "x.jsonl").exists()
