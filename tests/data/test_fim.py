"""Fill-in-the-middle: the PSM split, the exact token layout of prepared documents, the rate, document
boundaries, and the sentinels as single special tokens with DeepSeek's bytes — checked against the real
DeepSeek-V3 tokenizer (ids 128800–128802)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tokenizers import Tokenizer

from moelab.data.fim import FimSettings, fim_document_ids, fim_prompt_ids, fim_split, sentinel_ids
from moelab.data.tokenizer import EOS, FIM_BEGIN, FIM_END, FIM_HOLE, load_tokenizer
from moelab.data.tokens import prepare
from moelab.errors import DataError

#: The sentinels' UTF-8 bytes, written out: bars U+FF5C (EF BD 9C), "▁" U+2581 (E2 96 81).
SENTINEL_BYTES = {
    FIM_BEGIN: b"<\xef\xbd\x9cfim\xe2\x96\x81begin\xef\xbd\x9c>",
    FIM_HOLE: b"<\xef\xbd\x9cfim\xe2\x96\x81hole\xef\xbd\x9c>",
    FIM_END: b"<\xef\xbd\x9cfim\xe2\x96\x81end\xef\xbd\x9c>",
}
CODE = '''def add(a, b):
    """Return a + b."""
    return a + b


class Stack:
    def __init__(self):
        self.items = []  # 栈 <｜fim▁hole｜> is text here, not a sentinel

    def push(self, x):
        self.items.append(x)
'''


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [CODE[rng.randrange(len(CODE)):] + f"\n# doc {i}\n" + "x = 1\n" * rng.randrange(4) for i in range(n)]


def test_split_reassembles_the_document():
    s = FimSettings(fim_rate=1.0, seed=3)
    for i, text in enumerate(_docs(500) + ["ab", "é𝄞"]):
        drawn, split = fim_split(text, s, i)
        assert drawn and split is not None
        assert split.prefix + split.middle + split.suffix == text
        assert [p for p, _ in split.pieces()] == [FIM_BEGIN, FIM_HOLE, FIM_END]


def test_rate_is_binomially_consistent_over_10k_documents():
    for rate in (0.5, 0.1):
        s = FimSettings(fim_rate=rate, seed=7)
        n = 10_000
        k = sum(fim_split("some code\n", s, i)[0] for i in range(n))
        sigma = (n * rate * (1 - rate)) ** 0.5
        assert abs(k - n * rate) < 4 * sigma, (rate, k)
    assert not any(fim_split("x = 1\n", FimSettings(fim_rate=0.0), i)[0] for i in range(1000))


def test_too_short_documents_stay_whole_and_are_counted():
    s = FimSettings(fim_rate=1.0, min_chars=10)
    assert fim_split("short", s, 0) == (True, None)
    with pytest.raises(ValueError, match="min_chars"):
        FimSettings(min_chars=1)
    with pytest.raises(ValueError, match="fim_rate"):
        FimSettings(fim_rate=1.5)


def _check_sentinel_tokens(tok: Tokenizer) -> dict[str, int]:
    ids = sentinel_ids(tok)
    for sentinel, want in SENTINEL_BYTES.items():
        assert sentinel.encode() == want
        assert tok.encode(sentinel, add_special_tokens=False).ids == [ids[sentinel]]     # one special token
        assert tok.id_to_token(ids[sentinel]).encode() == want
    return ids


def test_sentinels_of_the_real_deepseek_v3_tokenizer(deepseek_v3_tokenizer):
    tok = Tokenizer.from_file(str(deepseek_v3_tokenizer))
    ids = _check_sentinel_tokens(tok)
    assert ids == {FIM_HOLE: 128800, FIM_BEGIN: 128801, FIM_END: 128802}
    assert tok.token_to_id(EOS) == 1
    prompt = fim_prompt_ids(tok, "def f(x):\n    return ", "\n")
    assert prompt[0] == 128801 and prompt[-1] == 128802 and prompt.count(128800) == 1


@pytest.fixture(scope="module")
def fim_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fim")
    src = root / "src"
    src.mkdir()
    docs = _docs(60, seed=1) + ["z"]            # the last one is too short to cut at min_chars 2
    for i, text in enumerate(docs):
        (src / f"m{i:03d}.py").write_text(text, encoding="utf-8")
    settings = FimSettings(fim_rate=0.5, seed=11)
    meta = prepare([src], root / "tok", vocab_size=400, val_docs=5, progress=False, fim=settings)
    return root / "tok", docs, settings, meta


def test_prepared_documents_have_the_exact_psm_layout(fim_corpus):
    out, docs, settings, meta = fim_corpus
    tok = load_tokenizer(out)
    ids = _check_sentinel_tokens(tok)
    sentinels = set(ids.values())
    eos = tok.token_to_id(EOS)
    from moelab.data.sources import ReadStats, Source

    order = [d.text for d in Source(str(out.parent / "src")).documents(ReadStats())]   # reading order
    val_texts = set()
    bins = {s: np.fromfile(out / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")}
    idx = {s: np.load(out / f"{s}.idx.npy") for s in ("train", "val")}
    val = [bins["val"][a:b].tolist() for a, b in zip(idx["val"][:-1], idx["val"][1:], strict=True)]
    for d in val:                                # left-to-right: no sentinel, EOS last
        assert not sentinels & set(d) and d[-1] == eos
        val_texts.add(tok.decode(d[:-1], skip_special_tokens=False))
    train = [bins["train"][a:b].tolist() for a, b in zip(idx["train"][:-1], idx["train"][1:], strict=True)]
    rearranged = 0
    train_order = [(i, t) for i, t in enumerate(order) if t not in val_texts]
    assert len(train_order) == len(train)
    for (i, text), got in zip(train_order, train, strict=True):
        drawn, split = fim_split(text, settings, i)
        assert got[-1] == eos and got.count(eos) == 1            # EOS last; nothing crosses into the next doc
        if split is None:
            assert not sentinels & set(got)
            continue
        rearranged += 1
        assert got == fim_document_ids(tok, split, eos)          # exact order: BEGIN p HOLE s END m EOS
        b, h, e = got.index(ids[FIM_BEGIN]), got.index(ids[FIM_HOLE]), got.index(ids[FIM_END])
        assert b == 0 < h < e < len(got) - 1 and sum(t in sentinels for t in got) == 3
        prefix, suffix, middle = (tok.decode(got[b + 1:h]), tok.decode(got[h + 1:e]), tok.decode(got[e + 1:-1]))
        assert prefix + middle + suffix == text
    assert meta["fim"]["documents"] == rearranged > 10
    assert meta["fim"]["too_short"] == int(fim_split("z", settings, order.index("z"))[0] and "z" not in val_texts)
    assert meta["fim"]["fim_rate"] == 0.5


def test_prepare_with_the_deepseek_v3_tokenizer(tmp_path, deepseek_v3_tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(_docs(12)):
        (src / f"m{i}.py").write_text(text, encoding="utf-8")
    meta = prepare([src], tmp_path / "tok", tokenizer=deepseek_v3_tokenizer, val_docs=2, progress=False,
                   fim=FimSettings(fim_rate=1.0))
    train = np.fromfile(tmp_path / "tok" / "train.bin", dtype=meta["dtype"])
    assert meta["dtype"] == "uint32" and meta["fim"]["documents"] == 10
    assert (train == 128801).sum() == (train == 128800).sum() == (train == 128802).sum() == 10


def test_a_tokenizer_without_sentinels_is_refused(tmp_path):
    from tokenizers import models

    tok = Tokenizer(models.BPE())
    with pytest.raises(DataError, match="no FIM sentinel"):
        sentinel_ids(tok)


def test_text_spelling_a_sentinel_is_encoded_as_bytes(deepseek_v3_tokenizer):
    """DeepSeek-V3 marks its FIM tokens as non-special added tokens; a source file that spells one must
    still not produce the sentinel id."""
    from moelab.data.fim import encode_plain

    tok = Tokenizer.from_file(str(deepseek_v3_tokenizer))
    ids = encode_plain(tok, "x = '<｜fim▁hole｜>'  # <｜end▁of▁sentence｜>")
    assert not {0, 1, 128800, 128801, 128802} & set(ids)
    assert tok.decode(ids) == "x = '<｜fim▁hole｜>'  # <｜end▁of▁sentence｜>"


def test_generate_fills_in_the_middle(tiny_checkpoint):
    """`moelab generate --fim-prefix/--fim-suffix` sends the PSM prompt and prints the middle it writes."""
    from typer.testing import CliRunner

    from moelab.cli import app

    res = CliRunner().invoke(app, ["generate", str(tiny_checkpoint), "--fim-prefix", "def f(x):\n    return ",
                                   "--fim-suffix", "\n", "-n", "4", "--greedy", "--ids", "--device", "cpu",
                                   "--no-stream"])
    assert res.exit_code == 0, res.output
    assert len(res.output.strip().splitlines()[-1].split(",")) == 4
    both = CliRunner().invoke(app, ["generate", str(tiny_checkpoint), "-p", "x", "--fim-prefix", "y"])
    assert both.exit_code == 1 and "exactly one of" in both.output
