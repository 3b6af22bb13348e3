"""Data side of the linear number probes (docs/methods.md §8): addition problems, prompts, token positions
and answer parsing.

    problems = make_problems(n_per_length=1000, seed=0)       # 9,000 problems, 80/10/10 per length
    prompts = [render_prompt(p) for p in problems]             # Prompt(text, a_span, b_span)
    pos = find_positions(tokenizer, prompts)                   # PromptTokens: ids + 3 positions each
    parse_answer("4821 + 1937 = 6758<|im_end|>")               # 6758

**Problems** follow NumProbe's ``raw.jsonl``: for each operand length d (2–10 digits) ``n`` problems
``a + b`` with both operands of exactly d digits; for d ≤ 4 the pairs are drawn without replacement
from all (9·10^(d−1))² pairs, for longer ones ``a`` and ``b`` are drawn independently (each without
replacement). Within each length the first 80% are ``train``, the next 10% ``val``, the rest ``test``.
Everything comes from one ``random.Random(seed)``, so a seed fixes the data set on every machine.

**Prompt** (``prompt_variant="code"``, the released code): ``Question: What is the sum of {a} and {b}
?\\nAnswer: `` — note the space before ``?`` and the trailing space. ``"paper"`` is the paper's
``Question: What is the sum of {a} and {b}? Answer:``.

**Positions** come from the tokenizer's character offsets, not from guessing token strings: the token
whose span holds the last digit of ``a`` (and of ``b``) must end exactly at that digit (a leading space
in the same token is fine, a following character is not), and the last prompt token is the last token
with a non-empty span.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

from moelab.errors import ConfigError, DataError

#: Operand lengths of the published data set (2–10 digits).
DIGIT_LENGTHS = tuple(range(2, 11))
#: Longest operand moelab draws: sums stay below 2**63 and the draws within Python's index range.
MAX_DIGITS = 18
#: The two spellings of the prompt (see the module docstring). ``{a}``/``{b}`` each appear once.
PROMPT_TEMPLATES = {
    "code": "Question: What is the sum of {a} and {b} ?\nAnswer: ",
    "paper": "Question: What is the sum of {a} and {b}? Answer:",
}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Problem:
    """One addition problem; ``golden = a + b``; ``split`` is ``train``, ``val`` or ``test``."""

    id: int
    num_digits: int
    a: int
    b: int
    golden: int
    split: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt; ``a_span``/``b_span`` are the ``[start, end)`` character spans of the operands."""

    text: str
    a_span: tuple[int, int]
    b_span: tuple[int, int]


@dataclass
class PromptTokens:
    """Token ids and the three probe positions of each prompt (position indices into its own ids).

    ``input_ids``: N lists of token ids, each cut just after the last prompt token (a tokenizer that
    appends EOS would otherwise make the model continue after it). ``pos_a``, ``pos_b``, ``pos_last``:
    N ints each — the tokens holding the last digit of a, of b, and the last prompt token.
    """

    input_ids: list[list[int]]
    pos_a: list[int]
    pos_b: list[int]
    pos_last: list[int]


def _check_count(n: int, d: int) -> None:
    width = 9 * 10 ** (d - 1)
    cap = width * width if d <= 4 else width
    if n > cap:
        raise ConfigError(f"cannot draw {n} distinct {d}-digit problems (at most {cap}); lower n")


def make_problems(n_per_length: int = 1000, lengths=DIGIT_LENGTHS, seed: int = 0,
                  exclude: set[tuple[int, int]] | None = None, start_id: int = 0) -> list[Problem]:
    """``n_per_length`` problems for each operand length in ``lengths``, split 80/10/10 per length.

    ``exclude``: (a, b) pairs to leave out (used to draw a steering set disjoint from the probe data);
    with it, pairs are redrawn until ``n_per_length`` new ones are found. Ids run from ``start_id``.
    """
    if isinstance(n_per_length, bool) or not isinstance(n_per_length, int) or n_per_length < 10:
        raise ConfigError(f"n (problems per operand length) must be an integer >= 10 so that the 80/10/10 split "
                          f"leaves every split non-empty (got {n_per_length!r})")
    lengths = tuple(lengths)
    for d in lengths:
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DIGITS:
            raise ConfigError(f"operand lengths must be whole numbers from 1 to {MAX_DIGITS} digits (got {d!r}); "
                              "the paper uses 2-10")
        _check_count(n_per_length, d)
    rng = random.Random(seed)
    exclude = exclude or set()
    cut_train, cut_val = int(n_per_length * 0.8), int(n_per_length * 0.9)
    out: list[Problem] = []
    for d in lengths:
        lo, width = 10 ** (d - 1), 9 * 10 ** (d - 1)
        pairs: list[tuple[int, int]] = []
        seen: set[tuple[int, int]] = set()
        while len(pairs) < n_per_length:
            need = n_per_length - len(pairs)
            if d <= 4:  # all pairs: index k <-> (lo + k // width, lo + k % width)
                batch = [(lo + k // width, lo + k % width) for k in rng.sample(range(width * width), need)]
            else:
                batch = list(zip((lo + k for k in rng.sample(range(width), need)),
                                 (lo + k for k in rng.sample(range(width), need)), strict=True))
            for pair in batch:
                if pair not in exclude and pair not in seen:
                    seen.add(pair)
                    pairs.append(pair)
        for i, (a, b) in enumerate(pairs):
            split = "train" if i < cut_train else "val" if i < cut_val else "test"
            out.append(Problem(start_id + len(out), d, a, b, a + b, split))
    return out


def render_prompt(problem: Problem, variant: str = "code") -> Prompt:
    """The prompt of ``problem`` in ``variant`` (``"code"`` or ``"paper"``), with the operands' spans."""
    if variant not in PROMPT_TEMPLATES:
        raise ConfigError(f"unknown prompt variant {variant!r}; choose one of {', '.join(PROMPT_TEMPLATES)}")
    template = PROMPT_TEMPLATES[variant]
    head, rest = template.split("{a}")
    mid, tail = rest.split("{b}")
    a, b = str(problem.a), str(problem.b)
    a0 = len(head)
    b0 = a0 + len(a) + len(mid)
    return Prompt(head + a + mid + b + tail, (a0, a0 + len(a)), (b0, b0 + len(b)))


def _token_ending_at(offsets, text: str, span: tuple[int, int], what: str) -> int:
    """Index of the token holding the last character of ``span``; it must end exactly there."""
    last = span[1] - 1
    for i, (s, e) in enumerate(offsets):
        if s <= last < e:
            piece = text[s:e]
            if e != span[1] or text[s:span[0]].strip():
                raise DataError(
                    f"the tokenizer puts the last digit of {what} = {text[span[0]:span[1]]} into the token "
                    f"{piece!r}, which also covers {text[s:span[0]] + text[span[1]:e]!r} around the number, so "
                    f"there is no token that ends at its last digit (prompt {text!r}). Number probes need a "
                    "tokenizer that keeps digits apart from neighbouring characters (digit-splitting tokenizers "
                    "such as DeepSeek's, LLaMA's or SmolLM2's do); try --prompt-variant code or paper, whose "
                    "spacing may separate them, or probe another model")
            return i
    raise DataError(f"no token covers the last digit of {what} in {text!r} (the tokenizer's offsets skip it); "
                    "number probes need a tokenizer whose offset mapping covers every character of the prompt")


def find_positions(tokenizer, prompts: list[Prompt]) -> PromptTokens:
    """Tokenize ``prompts`` and locate the last digit of a, of b, and the last prompt token in each.

    ``tokenizer`` must be a transformers *fast* tokenizer (it needs ``return_offsets_mapping``). Raises
    :class:`DataError` naming the offending token when a number's last digit shares a token with a
    following character.
    """
    ids, pos_a, pos_b, pos_last = [], [], [], []
    for p in prompts:
        try:
            enc = tokenizer(p.text, return_offsets_mapping=True)
        except (NotImplementedError, ValueError, TypeError) as e:
            raise DataError(f"number probes need a fast tokenizer with character offsets (a tokenizer.json); "
                            f"{type(tokenizer).__name__} cannot give them: {e}") from None
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        real = [i for i, (s, e) in enumerate(offsets) if e > s]
        if not real:
            raise DataError(f"the tokenizer returned no token with a character span for {p.text!r}")
        last = real[-1]
        ia = _token_ending_at(offsets, p.text, p.a_span, "a")
        ib = _token_ending_at(offsets, p.text, p.b_span, "b")
        if not ia < ib < last:
            raise DataError(f"token positions out of order in {p.text!r}: a at {ia}, b at {ib}, last prompt token "
                            f"at {last}; the tokenizer's offsets look wrong")
        ids.append(list(enc["input_ids"][:last + 1]))
        pos_a.append(ia)
        pos_b.append(ib)
        pos_last.append(last)
    return PromptTokens(ids, pos_a, pos_b, pos_last)


_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+")


def parse_answer(text: str, complete: bool = True) -> int | None:
    """The model's numeric answer o in a generated continuation, or None when there is none.

    Only the first non-empty line counts. If it holds ``=``, the number after the last ``=`` is taken
    (small models often echo ``a + b = o``); else, if it holds `` is ``, the first number after the last
    one; else (or when nothing follows them) the line's first number. Thousands separators (``1,234``) are removed. With
    ``complete=False`` (generation stopped at its token limit) a number that runs to the very end of the
    text may be cut short and gives None.
    """
    start = 0
    for line in text.split("\n"):
        if line.strip():
            break
        start += len(line) + 1
    else:
        return None
    off = 0
    for sep in ("=", " is "):
        if sep in line:
            off = line.rindex(sep) + len(sep)
            break
    m = _NUMBER.search(line, off) or _NUMBER.search(line)
    if m is None:
        return None
    if not complete and start + m.end() == len(text):
        return None
    return int(m.group().replace(",", ""))


__all__ = ["DIGIT_LENGTHS", "PROMPT_TEMPLATES", "SPLITS", "Problem", "Prompt", "PromptTokens", "find_positions",
           "make_problems", "parse_answer", "render_prompt"]
