"""The chat template in every tokenizer moelab writes renders, through transformers' apply_chat_template,
exactly what moelab's own chat formatting renders — the same text and the same token ids — for a system
prompt, several turns and a generation prompt; a tokenizer copied from an older directory gets it too."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

import moelab
from moelab.data.chat import ChatFormat
from moelab.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from moelab.model.transformer import DeepSeekForCausalLM

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "7"}],
    [{"role": "user", "content": "  spaces and\nnew lines  "}, {"role": "assistant", "content": " ok \n"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "é 𝄞 中文"}, {"role": "assistant", "content": "✓"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    save_tokenizer(train_tokenizer(["What is 2 + 3? You are terse. Hello, name a prime."] * 20, 300), d)
    return d


def test_apply_chat_template_equals_moelab_rendering(tok_dir):
    hf = AutoTokenizer.from_pretrained(tok_dir)
    fmt = ChatFormat(load_tokenizer(tok_dir), "deepseek")
    for conv in CONVERSATIONS:
        ours = fmt.render(conv).ids
        text = hf.apply_chat_template(conv, tokenize=False)
        assert text == hf.decode(ours, skip_special_tokens=False)
        assert hf(text, add_special_tokens=False).input_ids == ours
        prompt = conv[:-1]                                       # ask for the last answer
        want = fmt.prompt_ids(prompt)
        got = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        assert got == hf.decode(want, skip_special_tokens=False) and got.endswith("<｜Assistant｜>")
        assert hf(got, add_special_tokens=False).input_ids == want


def test_checkpoints_carry_the_template_also_from_an_older_tokenizer(tok_dir, tmp_path, tiny_config):
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (old / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = moelab.save(DeepSeekForCausalLM.from_config(tiny_config(vocab_size=320), seed=0), tmp_path / "ckpt",
                      tokenizer=old)
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(CONVERSATIONS[0], tokenize=False).startswith(
        "<｜begin▁of▁sentence｜><｜User｜>What is 2 + 3?<｜Assistant｜>5")
