"""UMP-style data: flawed grade-school math problems, each paired with its well-posed original.

    items = generate_ump(100, seed=0)            # list[UMPItem]
    write_items(items, "ump.jsonl")              # moelab eval ump-data --n 100 --out ump.jsonl

**Honest substitute, not the paper's benchmark.** The UMP data (1,129 problems from GSM8K, MATH, AIME24,
AMC23; arXiv 2403.19346) is not public, so this module *builds* flawed problems from reasoning-gym's
``gsm_symbolic`` grade-school problems by rule-based text edits, in the paper's five categories. The
definitions below are moelab's own operationalisation of the category names:

- ``incorrect_assumptions`` — a premise gives a quantity a value of an impossible kind: a fractional
  count of people or animals (``2.5 grandchildren``), else a negative amount (``-72 pebbles``).
- ``inconsistent_conditions`` — two premises contradict each other: the first sentence that states a
  quantity is repeated right after itself with a different value.
- ``undefined_variables`` — the first quantity of the problem is replaced by a symbol (``x``) that the
  problem never defines, so the answer cannot be computed.
- ``units`` — a quantity's unit is swapped for one of another dimension (``23 minutes`` ->
  ``23 kilograms``), so the quantities no longer combine.
- ``illogical_scenarios`` — the situation cannot happen: more days in a week, hours in a day, months in a
  year or minutes in an hour than exist, a share of a group above 100%, an age no person reaches.

Each problem gets the category (among those its text allows) that has the fewest items so far, so the
mix is near-balanced (the paper's is 38/41/8/9/4%; ``illogical_scenarios`` fits few problems, so it stays
rarer). The edits are checked only syntactically: a generated problem is flawed by construction, but an
undefined quantity may, rarely, be recoverable from elsewhere in the text (``x grandchildren ... they're
twins``). reasoning-gym's instruction suffix ("Give the result as your final answer. Do not include
units.") is removed from every problem; the prompt mode decides what the model is asked. Generation is
deterministic for a seed, and different seeds draw disjoint problems (``seed * SEED_STRIDE``, see
:mod:`moelab.data.tasks`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from moelab.common.atomic import write_text
from moelab.errors import DataError, MoelabError

CATEGORIES = ("incorrect_assumptions", "inconsistent_conditions", "undefined_variables", "units",
              "illogical_scenarios")
#: Shares of the categories in the paper's benchmark (v6), for reference only.
PAPER_SHARES = {"incorrect_assumptions": 0.384, "inconsistent_conditions": 0.409, "undefined_variables": 0.081,
                "units": 0.085, "illogical_scenarios": 0.040}
#: reasoning-gym appends this to every gsm_symbolic question; it is removed (the prompt mode decides).
RG_SUFFIX = "Give the result as your final answer. Do not include units."


@dataclass(frozen=True)
class UMPItem:
    """A flawed problem and its original. ``answer`` is the original's reference answer; ``flaw`` says
    in words what was changed."""

    id: str
    category: str
    original: str
    flawed: str
    answer: str
    flaw: str
    source: str = "gsm_symbolic"
    source_seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# -- editing the text -------------------------------------------------------------------------------

_MENTION = re.compile(r"(?<![\w.,:/$€£-])(?P<cur>[$€£])?(?P<num>\d+(?:,\d{3})*(?:\.\d+)?)(?P<pct>%)?"
                      r"(?![\w:/]|[.,]\d)")
_NEXT_WORD = re.compile(r"[ \t-]*([A-Za-z]+)")
_SENTENCE = re.compile(r"(?:[^.?!]|\.(?=\d))*(?:[.?!]|$)")


@dataclass(frozen=True)
class _Mention:
    start: int
    end: int
    cur: str
    num: str
    pct: bool
    word: str          # the word after the number ("" if none), lower case

    @property
    def integer(self) -> int | None:
        s = self.num.replace(",", "")
        return int(s) if s.isdigit() else None


def _mentions(text: str) -> list[_Mention]:
    out = []
    for m in _MENTION.finditer(text):
        w = _NEXT_WORD.match(text, m.end())
        out.append(_Mention(m.start("num"), m.end("num"), m.group("cur") or "", m.group("num"),
                            bool(m.group("pct")), w.group(1).lower() if w else ""))
    return out


def _replace(text: str, start: int, end: int, new: str) -> str:
    return text[:start] + new + text[end:]


_PEOPLE = frozenset(
    "people persons students children kids grandchildren friends girls boys patients players members employees "
    "workers guests sisters brothers daughters sons cousins teachers classmates passengers visitors adults "
    "babies puppies dogs cats pigs goats cows horses chickens sheep birds animals".split())


def _incorrect_assumption(q: str, rng: random.Random) -> tuple[str, str] | None:
    ms = [m for m in _mentions(q) if m.integer is not None and not m.cur and not m.pct and m.integer > 0]
    for m in ms:
        if m.word in _PEOPLE:
            new = f"{m.integer}.5"
            return _replace(q, m.start, m.end, new), f"a fractional number of {m.word}: {new} {m.word}"
    for m in ms:
        if m.word:
            return (_replace(q, m.start, m.end, f"-{m.num}"),
                    f"a negative quantity: -{m.num} {m.word} (was {m.num})")
    return None


_ABBREV = re.compile(r"\b(Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs)\.")


def _sentences(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence; a period after Mr/Mrs/Dr/... does not end one."""
    masked = _ABBREV.sub(lambda m: m.group(1) + "\0", text)  # same length, so spans carry over
    return [(m.start(), m.end()) for m in _SENTENCE.finditer(masked) if m.group().strip()]


def _format_like(value: int, like: str) -> str:
    return f"{value:,}" if "," in like else str(value)


def _inconsistent(q: str, rng: random.Random) -> tuple[str, str] | None:
    for a, b in _sentences(q):
        sent = q[a:b]
        if sent.rstrip().endswith("?"):
            continue
        ms = [m for m in _mentions(sent) if m.integer is not None and m.integer > 0]
        if not ms:
            continue
        m = ms[0]
        v = m.integer
        new_v = v + rng.choice([max(1, v // 2), v, 2 * v + 1, 3]) + (1 if v < 3 else 0)
        other = _replace(sent, m.start, m.end, _format_like(new_v, m.num)).strip()
        flawed = q[:b].rstrip() + " " + other + " " + q[b:].lstrip()
        return (flawed.strip(), f"two statements contradict each other: {sent.strip()!r} and {other!r}")
    return None


def _undefined(q: str, rng: random.Random) -> tuple[str, str] | None:
    ms = [m for m in _mentions(q) if not m.pct]
    if not ms:
        return None
    words = set(re.findall(r"\b\w+\b", q.lower()))
    sym = next(s for s in ("x", "n", "k", "y", "z", "q") if s not in words)
    m = ms[0]
    return _replace(q, m.start, m.end, sym), f"the quantity {m.cur}{m.num} became {m.cur}{sym}, which is never defined"


_UNITS = {
    "time": [("second", "seconds"), ("minute", "minutes"), ("hour", "hours"), ("day", "days"), ("week", "weeks"),
             ("month", "months"), ("year", "years")],
    "length": [("meter", "meters"), ("metre", "metres"), ("kilometer", "kilometers"), ("centimeter", "centimeters"),
               ("mile", "miles"), ("foot", "feet"), ("inch", "inches"), ("yard", "yards")],
    "mass": [("gram", "grams"), ("kilogram", "kilograms"), ("kg", "kg"), ("pound", "pounds"), ("ounce", "ounces"),
             ("oz", "oz"), ("ton", "tons")],
    "volume": [("liter", "liters"), ("litre", "litres"), ("milliliter", "milliliters"), ("gallon", "gallons"),
               ("quart", "quarts")],
}
_SWAP = {"time": ("mass", ["kilogram", "kilograms"]), "mass": ("length", ["meter", "meters"]),
         "length": ("volume", ["liter", "liters"]), "volume": ("time", ["hour", "hours"])}
_UNIT_OF = {form: (dim, i) for dim, pairs in _UNITS.items() for pair in pairs for i, form in enumerate(pair)}


def _units(q: str, rng: random.Random) -> tuple[str, str] | None:
    for m in _mentions(q):
        if m.cur or m.pct or m.word not in _UNIT_OF:
            continue
        w = _NEXT_WORD.match(q, m.end)
        dim, plural = _UNIT_OF[m.word]
        new_dim, forms = _SWAP[dim]
        new = forms[plural if m.word not in ("kg", "oz") else int(m.num != "1")]
        return (_replace(q, w.start(1), w.end(1), new),
                f"the unit of {m.num} {w.group(1)} became {new} ({dim} -> {new_dim})")
    return None


_ILLOGICAL = [  # (pattern with a group 'n', lowest impossible value, how many more to add at most, why)
    (re.compile(r"(?P<n>\d+)[ -](?:days?)\s+(?:a|per|each|every|in a)\s+week", re.I), 8, 5,
     "a week has 7 days"),
    (re.compile(r"(?P<n>\d+)[ -](?:hours?)\s+(?:a|per|each|every|in a)\s+day", re.I), 25, 15,
     "a day has 24 hours"),
    (re.compile(r"(?P<n>\d+)[ -](?:months?)\s+(?:a|per|each|every|in a)\s+year", re.I), 13, 6,
     "a year has 12 months"),
    (re.compile(r"(?P<n>\d+)[ -](?:minutes?)\s+(?:an|per|each|every|in an)\s+hour", re.I), 61, 40,
     "an hour has 60 minutes"),
    (re.compile(r"(?<![\d.])(?P<n>\d+)% of (?:the |her |his |their |its )?(?:[\w-]+ ){0,2}?(?:are|were|is|was)\b",
                re.I), 101, 60, "a share of a group cannot exceed 100%"),
    (re.compile(r"(?<![\d.])(?P<n>\d+)[ -]years?[ -]old", re.I), 180, 60, "no person lives that long"),
]


def _illogical(q: str, rng: random.Random) -> tuple[str, str] | None:
    for pat, low, spread, why in _ILLOGICAL:
        m = pat.search(q)
        if m is None:
            continue
        new = str(low + rng.randrange(spread))
        old = m.group(0)
        changed = _replace(old, m.start("n") - m.start(), m.end("n") - m.start(), new)
        return _replace(q, m.start(), m.end(), changed), f"{changed!r} is impossible ({why})"
    return None


EDITS: dict[str, Callable[[str, random.Random], tuple[str, str] | None]] = {
    "incorrect_assumptions": _incorrect_assumption,
    "inconsistent_conditions": _inconsistent,
    "undefined_variables": _undefined,
    "units": _units,
    "illogical_scenarios": _illogical,
}


def make_flawed(question: str, category: str, seed: int = 0) -> tuple[str, str] | None:
    """``(flawed question, description of the flaw)`` for one category, or None if the text allows none."""
    if category not in EDITS:
        raise MoelabError(f"unknown UMP category {category!r}; use one of {', '.join(CATEGORIES)}")
    digest = hashlib.blake2b(f"{seed}\0{category}\0{question}".encode(), digest_size=8).digest()
    return EDITS[category](question, random.Random(int.from_bytes(digest, "little")))


def strip_suffix(question: str) -> str:
    q = question.strip()
    return q[:-len(RG_SUFFIX)].rstrip() if q.endswith(RG_SUFFIX) else q


def generate_ump(n: int, seed: int = 0, categories: Sequence[str] = CATEGORIES) -> list[UMPItem]:
    """``n`` flawed/original pairs built from reasoning-gym ``gsm_symbolic`` problems (deterministic for a
    seed; different seeds draw disjoint problems). See the module docstring for the categories."""
    from moelab.data.tasks import SEED_STRIDE

    if n < 1:
        raise DataError(f"n must be at least 1 (got {n})")
    if seed < 0:
        raise DataError(f"seed must be >= 0 (got {seed})")
    bad = [c for c in categories if c not in EDITS]
    if bad or not categories:
        raise MoelabError(f"unknown UMP categories {bad}; use some of {', '.join(CATEGORIES)}")
    try:
        import reasoning_gym
    except ImportError:
        raise DataError("UMP generation needs the reasoning-gym package: pip install 'moelab[tasks]'") from None
    counts = dict.fromkeys(categories, 0)
    items: list[UMPItem] = []
    seen: set[str] = set()
    draw, offset = max(2 * n, 16), 0
    while len(items) < n:
        if offset > 50 * n + 1000:
            raise DataError(f"could only build {len(items)} of {n} UMP problems; allow more categories")
        ds = reasoning_gym.create_dataset("gsm_symbolic", size=draw, seed=seed * SEED_STRIDE + offset)
        for k, x in enumerate(ds):
            q = strip_suffix(x["question"])
            if q in seen:
                continue
            seen.add(q)
            edits = {c: make_flawed(q, c, seed) for c in categories}
            usable = [c for c in categories if edits[c] is not None]
            if not usable:
                continue
            cat = min(usable, key=lambda c: counts[c])
            counts[cat] += 1
            flawed, flaw = edits[cat]
            items.append(UMPItem(id=f"ump-{seed}-{len(items):05d}", category=cat, original=q, flawed=flawed,
                                 answer=str(x["answer"]), flaw=flaw, source_seed=seed * SEED_STRIDE + offset + k))
            if len(items) == n:
                break
        offset += draw
    return items


# -- files ------------------------------------------------------------------------------------------

def write_items(items: Sequence[UMPItem], path: str | os.PathLike) -> Path:
    """Write items as JSON Lines, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(json.dumps(i.to_dict(), ensure_ascii=False) + "\n" for i in items))
    return path


def read_items(path: str | os.PathLike) -> list[UMPItem]:
    """Items from a JSONL file written by :func:`write_items` (or by hand: ``category``, ``original``,
    ``flawed``, ``answer`` are required)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p} does not exist; write one with `moelab eval ump-data --out {p}`")
    items = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            items.append(UMPItem(id=str(d.get("id", f"item-{i}")), category=str(d["category"]),
                                 original=str(d["original"]), flawed=str(d["flawed"]), answer=str(d["answer"]),
                                 flaw=str(d.get("flaw", "")), source=str(d.get("source", "file")),
                                 source_seed=int(d.get("source_seed", 0))))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{p}:{i}: not a UMP item ({type(e).__name__}: {e}); each line needs category, "
                            "original, flawed and answer") from None
    if not items:
        raise DataError(f"{p} holds no UMP items (empty file)")
    return items


__all__ = ["CATEGORIES", "EDITS", "PAPER_SHARES", "RG_SUFFIX", "UMPItem", "generate_ump",
           "make_flawed", "read_items", "strip_suffix", "write_items"]
