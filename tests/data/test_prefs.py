"""Preference pairs: both answers share the prompt's tokens, labels only on each answer and its EOS, both
input forms, and every bad line a `file:line: reason` (or skipped and counted)."""

from __future__ import annotations

import json

import pytest

from moelab.data.prefs import PrefStats, read_preferences
from moelab.data.tokenizer import byte_level_tokenizer
from moelab.errors import DataError

TOK = byte_level_tokenizer()


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_pairs_share_the_prompt_and_label_the_answers(tmp_path):
    f = _write(tmp_path / "p.jsonl", [
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "six"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "chosen": "Hello.", "rejected": "Go away."}])
    pairs = read_preferences(f, TOK, max_len=128)
    assert len(pairs) == 2
    for pair, (good, bad) in zip(pairs, [("5", "six"), ("Hello.", "Go away.")], strict=True):
        c, r = pair.chosen, pair.rejected
        k = next(i for i, lab in enumerate(c.labels) if lab != -100)
        assert c.ids[:k] == r.ids[:k]                                    # the same prompt
        assert TOK.decode([t for t, lab in zip(c.ids, c.labels, strict=True) if lab != -100],
                          skip_special_tokens=False) == good + "<｜end▁of▁sentence｜>"
        assert TOK.decode([t for t, lab in zip(r.ids, r.labels, strict=True) if lab != -100],
                          skip_special_tokens=False) == bad + "<｜end▁of▁sentence｜>"


@pytest.mark.parametrize("row, words", [
    ({"prompt": "q", "chosen": "a"}, "'rejected' missing"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical"),
    ({"chosen": "a", "rejected": "b"}, "'prompt'"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' missing"),
    ({"messages": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "ending with the user"),
    ({"prompt": "x" * 200, "chosen": "a", "rejected": "b"}, "no room for an answer"),
    ("{not json", "not valid JSON"),
])
def test_bad_lines(tmp_path, row, words):
    f = _write(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError, match=words) as e:
        read_preferences(f, TOK, max_len=64)
    assert "p.jsonl:2" in str(e.value)
    stats = PrefStats()
    assert len(read_preferences(f, TOK, max_len=64, skip_malformed=True, stats=stats)) == 1
    assert len(stats.skipped) == 1
