"""The prompts of the UMP-style evaluation (:mod:`moelab.evaluate.ump`), shared with its judge
(:mod:`moelab.evaluate.ump_judge`, which ignores sentences that merely repeat the CCC template).

``plain``: the problem text alone, as the user message. ``ccc``: the Critical Calculation and Conclusion
template. Its verbatim wording is unpublished; :data:`CCC_TEMPLATE` is the reconstruction
``ccc-reconstructed-v1`` of docs/methods.md §9. Another template can be given (a text file with
``{question}``); every result records the template id.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from moelab.errors import DataError, MoelabError

MODES = ("plain", "ccc")

CCC_TEMPLATE_ID = "ccc-reconstructed-v1"
#: A reconstruction (the paper's wording is not public); see docs/methods.md §9.
CCC_TEMPLATE = (
    "Solve the following math problem with Critical Calculation and Conclusion.\n"
    "1. Check the premises: are the conditions consistent with each other and possible in the real world?\n"
    "2. Solve step by step. Test every intermediate quantity for plausibility: negative or fractional "
    "counts, parts larger than their totals, impossible units or times.\n"
    "3. Conclude. If the problem is reasonable, give the final answer as a number. If it is not, state "
    "that the problem is unreasonable and explain why.\n"
    "\n"
    "Problem: {question}"
)
PLAIN_TEMPLATE_ID = "plain-v1"
PLAIN_TEMPLATE = "{question}"


def load_template(mode: str, ccc_template: str | os.PathLike | None = None) -> tuple[str, str]:
    """``(template id, template)`` of a prompt mode; ``ccc_template`` (a file) replaces the built-in CCC
    reconstruction, with id ``file:<name>:<sha256[:12]>``."""
    if mode == "plain":
        return PLAIN_TEMPLATE_ID, PLAIN_TEMPLATE
    if mode != "ccc":
        raise MoelabError(f"unknown prompt mode {mode!r}; use plain, ccc or both")
    if ccc_template is None:
        return CCC_TEMPLATE_ID, CCC_TEMPLATE
    p = Path(ccc_template)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the CCC template {p}: {e}") from None
    if "{question}" not in text:
        raise DataError(f"the CCC template {p} has no {{question}} placeholder; add one where the problem goes")
    return f"file:{p.name}:{hashlib.sha256(text.encode()).hexdigest()[:12]}", text


def render_prompt(template: str, question: str) -> str:
    """The user message: the template with ``{question}`` replaced (no other placeholder is expanded)."""
    return template.replace("{question}", question)


__all__ = ["CCC_TEMPLATE", "CCC_TEMPLATE_ID", "MODES", "PLAIN_TEMPLATE", "PLAIN_TEMPLATE_ID", "load_template",
           "render_prompt"]
