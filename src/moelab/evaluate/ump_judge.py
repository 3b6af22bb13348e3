"""A rule-based judge: does an answer flag its math problem as unreasonable or unsolvable?

    flags_unreasonable("A week has only 7 days, so 9 days a week is impossible.")      # True
    flags_unreasonable("There is no contradiction here. The answer is 44.")            # False

The UMP paper judged answers with an LLM; moelab has no such judge offline, so this one reads the answer
sentence by sentence and looks for phrases that call the problem impossible, contradictory, ill-defined,
missing information, meaningless in its units, or unsolvable. A phrase does not count when

- it is negated or only looked for: "not unreasonable", "no contradiction", "nothing impossible",
  "check for inconsistencies" (a negator in the 4 words before it, a sentence of the form "nothing ... is
  <phrase>", or a checking verb just before it);
- it is hypothetical: "would be impossible";
- its sentence is a question ("Is it possible to ...?") or a conditional ("If the problem is
  unreasonable, ...");
- its sentence repeats the prompt or the CCC template (a model echoing its instructions claims nothing).

Labelling policy of its test set (``tests/fixtures/ump_judge_labels.jsonl``): flagged means the answer
itself concludes that the problem as given is flawed, even if it then answers under an assumption
(whether its reason is right is not judged). The set holds 64 answers written by hand (flagging,
plain, hedged and tricky ones; the judge agreed on 59 the first time it ran, 62 = 0.969 after three
general fixes) and 42 real SmolLM2-135M-Instruct answers labelled by hand afterwards (agreement 1.0;
most of them are repetitive and easy). The judge is a heuristic: it misses flags phrased in ways it
has no pattern for and is fooled by idioms and reported speech ("it is impossible to get the answer in
one step", "the teacher says it is impossible ..."). ``tests/test_ump.py`` measures the agreement.
"""

from __future__ import annotations

import re

from moelab.evaluate.ump_prompts import CCC_TEMPLATE

JUDGE_ID = "rules-v1"

_FLAG = re.compile(r"\b(?:" + "|".join([
    r"unreasonable", r"unrealistic", r"ill[- ]posed", r"ill[- ]defined", r"illogical", r"nonsensical",
    r"unsolvable", r"not solvable", r"no solution", r"contradict\w*", r"inconsistent", r"inconsistenc\w*",
    r"invalid", r"flawed", r"a flaw", r"not possible", r"impossible", r"not realistic", r"absurd",
    r"makes? no sense", r"does not make (?:any )?sense", r"meaningless",
    r"no (?:valid|single|sensible|meaningful|definite|unique) answer",
    r"cannot (?:really )?(?:be )?(?:determined?|solved?|answered|answer|calculated?|computed?|found|known?|know)",
    r"cannot (?:give|provide) (?:a|an|the) (?:\w+ )?answer", r"cannot have", r"unable to (?:solve|answer|determine)",
    r"(?:not|in)sufficient information", r"not enough information", r"missing information",
    r"information is missing", r"is missing", r"missing (?:data|value|quantity|number)",
    r"undefined", r"never (?:defined?|defines|says|states|tells|gives|specifie[sd])", r"not defined",
    r"not (?:given|told|specified|stated)", r"(?:is|it is|remains) unclear", r"unknown value",
    r"typo", r"(?:a )?mistake in the (?:problem|question)", r"error in the (?:problem|question)",
    r"contains? (?:an )?errors?", r"has an error",
    r"(?:problem|question|premise) (?:is|seems|appears) (?:to be )?(?:wrong|incorrect|false)",
    r"something (?:seems|is) (?:off|wrong)", r"seems off", r"does not add up",
    r"not a whole number of (?:people|persons|children|students|animals)",
]) + r")")

_NEGATORS = {"not", "no", "nothing", "never", "without", "hardly", "neither", "nor", "none", "any"}
_CHECKING = re.compile(r"\b(?:check(?:ing|ed|s)?|look(?:ing)? (?:out )?for|verify(?:ing)?|test(?:ing)? for|whether|"
                       r"if there (?:is|are)|would(?: be| have been)?|could be|might be checked)\W*(?:\w+\W+){0,2}$")
_NOTHING_IS = re.compile(r"^\W*(?:nothing|none of [a-z ]+?)\b[^,;]*\b(?:is|are|was|were|seems?)\s+(?:\w+\s+)?$")
_SENT = re.compile(r"[^.!?\n]+[.!?]*")
_CONTRACTIONS = [("can't", "cannot"), ("can not", "cannot"), ("won't", "will not"), ("n't", " not"),
                 ("it's", "it is"), ("that's", "that is"), ("there's", "there is"), ("what's", "what is")]


def _normalise(text: str) -> str:
    t = text.lower().replace("\u2019", "'").replace("\u2018", "'").replace("?)", ")")  # "(liters?)" asks nothing
    for a, b in _CONTRACTIONS:
        t = t.replace(a, b)
    return t


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.findall(text) if s.strip()]


def _echoes(sentence: str, sources: list[str]) -> bool:
    core = re.sub(r"^[\s\d.)*#:-]+", "", sentence).strip()
    return len(core) >= 20 and any(core in s for s in sources)


def flagged_sentences(answer: str, prompt: str | None = None) -> list[str]:
    """The sentences of ``answer`` that flag the problem (lower-cased, contractions expanded)."""
    sources = [_normalise(CCC_TEMPLATE)] + ([_normalise(prompt)] if prompt else [])
    out = []
    for sent in _sentences(_normalise(answer)):
        bare = re.sub(r"^[\s\d.)*#:-]+", "", sent)
        if sent.endswith("?") or bare.startswith(("if ", "whether ")) or _echoes(sent, sources):
            continue
        negated_end = None  # a negation carries over coordinated flags: "nothing is impossible or inconsistent"
        for m in _FLAG.finditer(sent):
            before = sent[:m.start()]
            words = re.findall(r"[a-z]+", re.sub(r"\bno\s*[,!]", " ", before))[-4:]  # "no, ..." negates nothing
            if _NEGATORS & set(words) or _CHECKING.search(before) or _NOTHING_IS.search(before) or \
                    (negated_end is not None and re.fullmatch(r"\s*(?:,|or|and|nor)\s*", sent[negated_end:m.start()])):
                negated_end = m.end()
                continue
            out.append(sent)
            break
    return out


def flags_unreasonable(answer: str, prompt: str | None = None) -> bool:
    """True when ``answer`` says its problem is unreasonable, contradictory, ill-defined or unsolvable.

    ``prompt``: the prompt the answer replies to; sentences that merely repeat it are ignored.
    """
    return bool(flagged_sentences(answer, prompt))


__all__ = ["JUDGE_ID", "flagged_sentences", "flags_unreasonable"]
