"""`read_records`: every JSON object line parsed, blank lines ignored, a bad line named by file:line —
raised with the setting that skips it, or skipped and recorded. `split_off`: the seeded validation split."""

from __future__ import annotations

import pytest

from moelab.data.jsonl import read_records
from moelab.errors import DataError


def _parse(row: dict, where: str) -> tuple[int, str]:
    if not isinstance(row.get("x"), int):
        raise DataError("'x' missing or not an integer")
    return row["x"], where


def test_records_in_order_blank_lines_ignored(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"x": 1}\n\n  \n{"x": 2}\n')
    assert read_records(f, _parse, what="file") == [(1, f"{f}:1"), (2, f"{f}:4")]


@pytest.mark.parametrize("line, words", [("{oops", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                         ('{"x": "one"}', "'x' missing or not an integer")])
def test_bad_lines_raise_or_are_skipped(tmp_path, line, words):
    f = tmp_path / "r.jsonl"
    f.write_text('{"x": 1}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"r\.jsonl:2: {words}.*; fix the line \(or skip such lines with s\.skip\)"):
        read_records(f, _parse, what="file", hint="s.skip")
    with pytest.raises(DataError, match=r"r\.jsonl:2: .*; fix or remove the line"):
        read_records(f, _parse, what="file")
    skipped: list[str] = []
    assert read_records(f, _parse, what="file", skip_malformed=True, skipped=skipped) == [(1, f"{f}:1")]
    assert len(skipped) == 1 and skipped[0].startswith(f"{f}:2: ")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such records file \(JSON Lines\)"):
        read_records(tmp_path / "nope.jsonl", _parse, what="records file (JSON Lines)")


def test_split_off_is_seeded_in_file_order_and_never_empty():
    from moelab.data.split import split_off

    rows = list(range(20))
    train, val = split_off(rows, 0.25, seed=3, salt=7, path="f", noun="row")
    assert len(val) == 5 and sorted(train + val) == rows and train == sorted(train) and val == sorted(val)
    assert (train, val) == split_off(rows, 0.25, seed=3, salt=7, path="f", noun="row")
    assert val != split_off(rows, 0.25, seed=4, salt=7, path="f", noun="row")[1]
    assert [len(x) for x in split_off(rows[:3], 0.01, 0, 0, "f", "row")] == [2, 1]     # at least one held out
    assert [len(x) for x in split_off(rows[:3], 0.99, 0, 0, "f", "row")] == [1, 2]     # at least one kept
    with pytest.raises(DataError, match="f: 1 row cannot be split into training and validation; add rows or set"):
        split_off(rows[:1], 0.5, 0, 0, "f", "row")
