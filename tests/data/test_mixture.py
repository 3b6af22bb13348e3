"""Weighted mixtures of token directories: every batch holds ⌊B·w⌋ or ⌈B·w⌉ rows of each source and the
long-run shares equal the weights (binomial tolerance), rows come from the source they are counted for,
batches are a pure function of (seed, step, micro) — so a resumed run is exact (tested end to end) — and
sources with different tokenizers are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moelab.data.tokens import TokenData, prepare
from moelab.data.tokens.mixture import MixtureData
from moelab.errors import DataError

WEIGHTS = {"code": 0.6, "math": 0.1, "text": 0.3}
TEXTS = {"code": "def f(x):\n    return x\n", "math": "12 + 34 = 46\n", "text": "To be or not to be.\n"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    dirs = {}
    for name, text in TEXTS.items():
        src = root / f"src-{name}"
        src.mkdir()
        for i in range(6):
            (src / f"{i}.txt").write_text(text * 40, encoding="utf-8")
        dirs[name] = root / name
        prepare([src], dirs[name], tokenizer=dirs["code"] if name != "code" else None, vocab_size=300,
                val_docs=1, progress=False)
    return dirs


def test_batches_respect_the_weights(sources):
    data = MixtureData({n: (sources[n], w) for n, w in WEIGHTS.items()})
    vocab = {n: set(np.unique(TokenData(sources[n]).tokens)) for n in WEIGHTS}
    B, totals, steps = 16, np.zeros(3), 300
    for step in range(steps):
        x, y = data.batch(B, 16, step, 0, seed=3)
        counts = np.bincount(data.last_sources, minlength=3)
        for c, w in zip(counts, WEIGHTS.values(), strict=True):
            assert np.floor(B * w) <= c <= np.ceil(B * w)
        for row, src in zip(x.tolist(), data.last_sources, strict=True):    # each row is from its source
            assert set(row) <= vocab[list(WEIGHTS)[src]]
        totals += counts
    shares = totals / (B * steps)
    for share, w in zip(shares, WEIGHTS.values(), strict=True):
        assert abs(share - w) < 4 * (w * (1 - w) / (B * steps)) ** 0.5 + 1e-9
    x1, _ = data.batch(B, 16, 7, 1, seed=3)
    x2, _ = data.batch(B, 16, 7, 1, seed=3)
    assert (x1 == x2).all() and not (x1 == data.batch(B, 16, 8, 1, seed=3)[0]).all()


def test_other_tokenizers_and_bad_weights_are_refused(sources, tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    (src / "a.txt").write_text("other words entirely " * 200)
    (src / "b.txt").write_text("more other words " * 200)
    prepare([src], tmp_path / "own", vocab_size=280, val_docs=1, progress=False)
    with pytest.raises(DataError, match="different tokenizers"):
        MixtureData({"code": (sources["code"], 1.0), "own": (tmp_path / "own", 1.0)})
    with pytest.raises(DataError, match="weights"):
        MixtureData({"code": (sources["code"], 0.0)})


def test_training_on_a_mixture_resumes_exactly(sources, tmp_path):
    from tiny import tiny_config

    from moelab.train.config import BalanceConfig, DataConfig, RunConfig, TrainConfig
    from moelab.train.loop import train

    mixture = {n: {"path": str(sources[n]), "weight": w} for n, w in WEIGHTS.items()}

    def cfg():
        return RunConfig(model=tiny_config(), data=DataConfig(seq_len=32, mixture=mixture),
                         train=TrainConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=1, dtype="float32",
                                           device="cpu", log_every=1, eval_every=3, eval_batches=1, ckpt_every=3),
                         balance=BalanceConfig())

    whole = tmp_path / "whole"
    train(cfg(), whole, progress=False)
    rows = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert any("math_val_loss" in r and "text_val_loss" in r for r in rows)

    class Stop(Exception):
        pass

    def stop_at_4(kind, rec):
        if kind == "log" and rec["step"] == 4:
            raise Stop

    part = tmp_path / "part"
    with pytest.raises(Stop):
        train(cfg(), part, progress=False, on_event=stop_at_4)
    train(cfg(), part, resume=True, progress=False)
    losses = [{r["step"]: r["loss"] for r in (json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines())
               if "loss" in r} for d in (whole, part)]
    assert losses[0] == losses[1]
