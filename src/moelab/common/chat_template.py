"""moelab's ``deepseek`` chat format (:class:`moelab.data.chat.ChatFormat`) as the Jinja template that
transformers' ``apply_chat_template`` renders — byte-identical, and tokenising the text gives the same ids
(tests/data/test_chat_template.py): BOS, the system text, then per turn ``<｜User｜>``user``<｜Assistant｜>``
and the answer + EOS; ``add_generation_prompt`` ends a conversation whose last turn is the user's with
``<｜Assistant｜>``. Every tokenizer moelab writes carries it in ``tokenizer_config.json``.
"""

from __future__ import annotations

USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] }}"
    "{%- elif m['role'] == 'user' -%}{{ '" + USER + "' + m['content'] }}"
    "{%- if not loop.last or add_generation_prompt -%}{{ '" + ASSISTANT + "' }}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}{{ m['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}")


def wants_chat_template(vocab_has) -> bool:
    """Whether a tokenizer (``vocab_has(token) -> bool``) has the chat tokens the template writes."""
    return vocab_has(USER) and vocab_has(ASSISTANT)


__all__ = ["ASSISTANT", "CHAT_TEMPLATE", "USER", "wants_chat_template"]
