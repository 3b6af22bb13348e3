"""Rule-based rewards for GRPO: each of N completions of a prompt row gets a number, ``[N]`` floats.

    score = make_reward("auto", timeout_s=10.0)
    out = score(["5", "7"], [{"prompt": "2 + 3 =", "completion": "5"}] * 2)   # out.rewards == [1.0, 0.0]

=================  ===========================================================================
``reward``         a completion scores
=================  ===========================================================================
``exact_match``    1 when it equals the row's ``completion`` (or ``answer``) after trimming
                   whitespace and one trailing period (:func:`moelab.data.tasks.exact_match`, the
                   verifier of the reasoning-gym arithmetic tasks), else 0
``unit_tests``     1 when ``completion + "\\n\\n" + row["tests"]`` runs to its end in the sandbox of
                   :mod:`moelab.evaluate.sandbox` (code fences stripped; ``row["setup"]`` prepended
                   when given), else 0 — compiler errors, failing asserts and limits alike
``auto``           ``unit_tests`` for rows with ``tests``, ``exact_match`` for the others
``mod:function``   ``function(completion, row) -> float`` imported from a module, or
                   ``path/file.py:function`` loaded from a file
=================  ===========================================================================

A reward function that raises, returns something that is not a finite number, or runs past
``timeout_s`` gives 0; :class:`RewardOutcome` counts those (``errors``, ``timeouts``) and keeps the first
message, so a run reports them instead of stopping. A sandboxed program that times out is a timeout too.
(A timed-out Python function cannot be stopped: its thread is left running as a daemon.)
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moelab.data.tasks import exact_match
from moelab.errors import ConfigError, DataError
from moelab.evaluate.sandbox import Limits, run_programs

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*\n(.*?)(?:```|$)", re.DOTALL)


@dataclass
class RewardOutcome:
    rewards: list[float] = field(default_factory=list)
    errors: int = 0            # the function raised or returned a non-number
    timeouts: int = 0          # the function (or the sandboxed program) ran past the limit
    first_problem: str = ""    # the first error / timeout, one line

    def problem(self, kind: str, message: str) -> None:
        if kind == "timeout":
            self.timeouts += 1
        else:
            self.errors += 1
        if not self.first_problem:
            self.first_problem = message.splitlines()[0][:300] if message else kind


def reference_answer(row: dict) -> str:
    """The exact-match reference of a prompt row: ``completion``, else ``answer``."""
    ans = row.get("completion", row.get("answer"))
    if not isinstance(ans, str | int | float) or isinstance(ans, bool):
        raise DataError("the row has no reference answer ('completion' or 'answer') for exact match")
    return str(ans)


def code_of(completion: str) -> str:
    """The program in a completion: the first fenced block if there is one, else the whole text."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def test_program(completion: str, row: dict) -> str:
    """What the sandbox runs for a completion of a row with unit tests."""
    return f"{row.get('setup', '')}{code_of(completion)}\n\n{row['tests']}\n"


def call_with_timeout(fn: Callable[[str, dict], float], completion: str, row: dict, timeout_s: float,
                      out: RewardOutcome) -> float:
    """``fn(completion, row)`` as a finite float, or 0 with the problem counted in ``out``."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(completion, row)
        except BaseException as e:  # noqa: BLE001 (any failure of user code is a zero reward)
            box["error"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=run, daemon=True, name="moelab-reward")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        out.problem("timeout", f"the reward function ran past {timeout_s:g} s")
        return 0.0
    if "error" in box:
        out.problem("error", f"the reward function raised {box['error']}")
        return 0.0
    try:
        value = float(box.get("value"))
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        out.problem("error", f"the reward function returned {box.get('value')!r}, not a finite number")
        return 0.0
    return value


def exact_match_reward(completion: str, row: dict) -> float:
    return 1.0 if exact_match(completion, reference_answer(row)) else 0.0


class RuleReward:
    """The built-in rules (``exact_match``, ``unit_tests``, ``auto``) or a user function (module docstring)."""

    def __init__(self, kind: str, fn: Callable[[str, dict], float] | None = None, timeout_s: float = 10.0,
                 workers: int | None = None):
        self.kind, self.fn, self.timeout_s, self.workers = kind, fn, timeout_s, workers

    def uses_tests(self, row: dict) -> bool:
        return self.kind == "unit_tests" or (self.kind == "auto" and "tests" in row)

    def check_row(self, row: dict) -> None:
        """Refuse (:class:`DataError`) a row this reward cannot score."""
        if self.fn is not None:
            return
        if self.uses_tests(row):
            if not isinstance(row.get("tests"), str) or not row["tests"].strip():
                raise DataError("'tests' (a string of Python asserts run after the completion) is missing or empty")
        else:
            reference_answer(row)

    def __call__(self, completions: list[str], rows: list[dict]) -> RewardOutcome:
        out = RewardOutcome(rewards=[0.0] * len(completions))
        code = [i for i, r in enumerate(rows) if self.fn is None and self.uses_tests(r)]
        for i, (c, r) in enumerate(zip(completions, rows, strict=True)):
            if i not in code:
                out.rewards[i] = call_with_timeout(self.fn or exact_match_reward, c, r, self.timeout_s, out)
        if code:
            limits = Limits(wall_s=self.timeout_s, cpu_s=max(1, math.ceil(self.timeout_s)))
            try:
                results = run_programs([test_program(completions[i], rows[i]) for i in code], limits, self.workers)
            except OSError as e:         # the sandbox itself failed: every program scores 0, counted
                for _ in code:
                    out.problem("error", f"the sandbox could not run the tests: {e}")
                return out
            for i, res in zip(code, results, strict=True):
                out.rewards[i] = 1.0 if res.passed else 0.0
                if res.status == "timeout":
                    out.problem("timeout", f"unit tests: {res.detail}")
        return out


def load_function(spec: str) -> Callable[[str, dict], float]:
    """``module:function`` or ``path/file.py:function`` (a :class:`ConfigError` when it cannot be loaded)."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(f"grpo.reward = {spec!r}: use auto, exact_match, unit_tests, 'module:function' or "
                          "'path/file.py:function'")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"grpo.reward: {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"moelab_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 (any import failure of user code)
        raise ConfigError(f"grpo.reward: cannot load {where}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"grpo.reward: {where} has no function {name!r}")
    return fn


def make_reward(spec: str, timeout_s: float = 10.0, workers: int | None = None) -> RuleReward:
    """The reward of a ``grpo.reward`` setting (module docstring)."""
    if spec in ("auto", "exact_match", "unit_tests"):
        return RuleReward(spec, timeout_s=timeout_s, workers=workers)
    return RuleReward("function", load_function(spec), timeout_s, workers)


__all__ = ["RewardOutcome", "RuleReward", "call_with_timeout", "code_of", "exact_match_reward", "load_function",
           "make_reward", "reference_answer", "test_program"]
