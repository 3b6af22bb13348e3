"""SFT data: chat rendering and loss masks, packing, malformed input; the loss only on assistant tokens.

Oracles: the tokenizer encoding the whole rendered string at once (the per-segment concatenation must
equal it), a brute-force per-token loss, and bookkeeping identities (every trained token appears once).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moelab.data.sft import IGNORE, ChatFormat, load_sft, pack, pack_file, read_jsonl, to_messages
from moelab.data.tokenizer import ASSISTANT, BOS, EOS, USER, train_tokenizer
from moelab.errors import DataError
from moelab.train.loop import lm_loss

EXCERPT = Path(__file__).resolve().parents[1] / "assets" / "shakespeare_excerpt.txt"


@pytest.fixture(scope="module")
def tok():
    text = EXCERPT.read_text(encoding="utf-8")
    return train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)], vocab_size=400)


def chat(u: str, a: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# -- rendering ----------------------------------------------------------------------------------------
def test_deepseek_template_equals_encoding_the_whole_string(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
            {"role": "assistant", "content": "A friend, my lord."}, {"role": "user", "content": "And now?"},
            {"role": "assistant", "content": "Still one."}]
    ex = ChatFormat(tok, "deepseek").render(msgs)
    whole = (f"{BOS}Be brief.{USER}Who art thou?{ASSISTANT}A friend, my lord.{EOS}"
             f"{USER}And now?{ASSISTANT}Still one.{EOS}")
    assert ex.ids == tok.encode(whole, add_special_tokens=False).ids
    trained = [i for i, lab in zip(ex.ids, ex.labels, strict=True) if lab != IGNORE]
    # exactly the two answers, each followed by its EOS
    assert tok.decode(trained, skip_special_tokens=False) == f"A friend, my lord.{EOS}Still one.{EOS}"
    assert all(lab in (IGNORE, i) for i, lab in zip(ex.ids, ex.labels, strict=True))
    assert ex.answer_bytes == len("A friend, my lord.") + len("Still one.")


def test_plain_template_is_the_esft_format(tok):
    ex = ChatFormat(tok, "plain").render(to_messages({"prompt": "2+2?", "completion": "4"}))
    assert tok.decode(ex.ids, skip_special_tokens=False) == f"{BOS}User: 2+2?\n\nAssistant: 4{EOS}"
    trained = [i for i, lab in zip(ex.ids, ex.labels, strict=True) if lab != IGNORE]
    assert tok.decode(trained, skip_special_tokens=False) == f"4{EOS}"


def test_prompt_completion_equals_one_user_and_one_assistant_turn(tok):
    fmt = ChatFormat(tok)
    a = fmt.render(to_messages({"prompt": "hi", "completion": "there"}))
    b = fmt.render(to_messages(chat("hi", "there")))
    assert a.ids == b.ids and a.labels == b.labels
    prompt = fmt.prompt_ids([{"role": "user", "content": "hi"}])
    assert prompt[-1] == fmt.assistant and a.ids[:len(prompt)] == prompt
    assert a.labels[len(prompt):] == a.ids[len(prompt):]      # everything after the prompt is trained


# -- malformed input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("line, why", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"text": "no roles"}', "no 'messages'"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant message"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
    ('{"prompt": "p", "completion": 3}', "must both be strings"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}', "only come first"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, why):
    f = write(tmp_path / "d.jsonl", [chat("a", "b"), line, chat("c", "d")])
    with pytest.raises(DataError, match=rf"d.jsonl:2: .*{why}.*skip_malformed"):
        list(read_jsonl(f))


def test_skip_malformed_counts_lines(tmp_path, tok):
    f = write(tmp_path / "d.jsonl", [chat("a", "b"), "{bad", "", chat("c", "d"), '{"x": 1}'] + [chat("e", "f")] * 4)
    train, val, stats = load_sft(f, tok, 32, skip_malformed=True, val_fraction=0.2)
    assert len(stats.skipped) == 2 and stats.skipped[0].endswith("not valid JSON (Expecting property name "
                                                                "enclosed in double quotes)")
    assert stats.examples == 6 == train.meta["examples"] + val.meta["examples"]


def test_missing_and_non_utf8_files(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        load_sft(tmp_path / "nope.jsonl", tok, 32)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(chat("caf\u00e9", "x")).encode("latin-1", errors="replace") + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        list(read_jsonl(bad))
    empty = write(tmp_path / "e.jsonl", ["{bad"])
    with pytest.raises(DataError, match="no usable examples"):
        load_sft(empty, tok, 32, skip_malformed=True)


def test_template_needs_the_special_tokens():
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(DataError, match="has no .*begin"):
        ChatFormat(bare)


# -- packing ------------------------------------------------------------------------------------------
def test_packing_keeps_every_trained_token_once_and_no_cross_example_target(tok):
    fmt = ChatFormat(tok)
    rng = np.random.default_rng(0)
    exs = [fmt.render(to_messages(chat("q" * int(rng.integers(1, 20)), "answer " * int(rng.integers(1, 6)))))
           for _ in range(40)]
    T = 48
    ids, labels = pack(exs, T, fmt.pad, seed=3)
    assert ids.shape[1] == T + 1 and labels.shape == ids.shape
    assert ids.shape[0] < len(exs)                           # packing put several examples per row
    want = sum(sum(lab != IGNORE for lab in e.labels) for e in exs)
    assert int((labels != IGNORE).sum()) == want             # every trained token kept, once
    # a target is never the first token (BOS) of an example: no loss crosses an example boundary
    assert not np.any((labels[:, 1:] != IGNORE) & (ids[:, 1:] == fmt.bos))
    # rows hold whole examples: the BOS count equals the number of examples
    assert int((ids == fmt.bos).sum()) == len(exs)
    unpacked, _ = pack(exs, T, fmt.pad, packing=False)
    assert unpacked.shape[0] == len(exs)


def test_truncation_is_counted(tok):
    from moelab.data.sft import SFTStats

    fmt = ChatFormat(tok)
    long = fmt.render(to_messages(chat("x" * 5, "y " * 100)))
    only_prompt = fmt.render(to_messages(chat("x " * 100, "y")))
    stats = SFTStats()
    ids, labels = pack([long, only_prompt], 16, fmt.pad, stats=stats)
    assert stats.truncated == 2 and stats.no_target == 1 and ids.shape[0] == 1


def test_batches_are_deterministic_and_an_epoch_visits_every_row(tmp_path, tok):
    f = write(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(50)])
    train, val, _ = load_sft(f, tok, 16, val_fraction=0.1, micro_per_step=2)
    assert len(val) > 0 and val.meta["examples"] + train.meta["examples"] == 50
    x1, y1 = train.batch(3, 16, step=4, micro=1, seed=7)
    x2, y2 = train.batch(3, 16, step=4, micro=1, seed=7)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (3, 16)
    R = len(train)
    seen = []
    for g in range(R):   # one row per micro-batch: consecutive (step, micro) walk one permutation
        x, _ = train.batch(1, 16, step=g // 2, micro=g % 2, seed=7)
        seen.append(tuple(x[0].tolist()))
    assert len(set(seen)) == R
    with pytest.raises(DataError, match="packed for seq_len 16"):
        train.batch(2, 32, 0)
    rows = sum(x.shape[0] for x, _ in val.eval_batches(4, 16))
    assert rows == len(val)


def test_pack_file_yields_input_rows(tmp_path, tok):
    f = write(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(20)])
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    rows = list(pack_file(f, tok_path, 24, n_sequences=3))
    assert len(rows) == 3 and all(r.shape == (24,) and r.dtype == torch.long for r in rows)


# -- the loss -----------------------------------------------------------------------------------------
def test_loss_is_the_mean_over_assistant_tokens_only(tok):
    torch.manual_seed(0)
    fmt = ChatFormat(tok)
    exs = [fmt.render(to_messages(chat("hello there", "good morrow"))) for _ in range(3)]
    ids, labels = pack(exs, 40, fmt.pad)
    x, y = torch.from_numpy(ids[:, :-1]), torch.from_numpy(labels[:, 1:])
    logits = torch.randn(*x.shape, 400)
    total, n = 0.0, 0
    for b in range(x.shape[0]):                  # brute force, one position at a time
        for t in range(x.shape[1]):
            if int(y[b, t]) != IGNORE:
                total += float(-F.log_softmax(logits[b, t], -1)[y[b, t]])
                n += 1
    assert n == sum(sum(lab != IGNORE for lab in e.labels) for e in exs)
    assert float(lm_loss(logits, y)) == pytest.approx(total / n, rel=1e-5)
    none = torch.full_like(y, IGNORE)
    z = lm_loss(logits.requires_grad_(), none)
    assert float(z.detach()) == 0.0 and z.requires_grad  # no targets: zero, not NaN
