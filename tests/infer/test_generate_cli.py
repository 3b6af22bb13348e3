"""``moelab generate --decode/--device``: the decode modes give the same tokens; bad choices fail in one line."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from moelab.cli import app

PROMPT = ["--prompt-ids", "5,72,101,108,108,111", "--greedy", "-n", "8", "--ids", "--device", "cpu"]


def run(*args):
    return CliRunner().invoke(app, ["generate", *map(str, args)])


def test_static_decode_gives_the_dynamic_tokens(tiny_checkpoint):
    out = {mode: run(tiny_checkpoint, *PROMPT, "--decode", mode) for mode in ("dynamic", "static", "auto")}
    for mode, result in out.items():
        assert result.exit_code == 0, (mode, result.output, result.exception)
    lines = {mode: r.stdout.rstrip("\n").split("\n")[-1] for mode, r in out.items()}
    assert lines["static"] == lines["dynamic"] == lines["auto"] and lines["dynamic"]


@pytest.mark.parametrize(("args", "message"), [
    (["--decode", "fast"], "--decode must be one of auto, dynamic, static, graph, compile"),
    (["--decode", "graph"], "--decode graph captures CUDA graphs; --device is cpu"),
])
def test_bad_decode_options_fail_before_loading(tiny_checkpoint, args, message):
    result = run(tiny_checkpoint, *PROMPT, *args)
    assert result.exit_code != 0
    assert message in result.output
