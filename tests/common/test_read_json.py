"""common.jsonio.read_json: one clear error per way a JSON file can be wrong."""

from __future__ import annotations

import pytest

from moelab.common.jsonio import read_json, write_json
from moelab.errors import ConfigError


def test_reads_what_write_json_wrote(tmp_path):
    p = write_json(tmp_path / "a.json", {"x": [1.5, float("nan")]})
    assert read_json(p, ConfigError, missing="-") == {"x": [1.5, None]}


@pytest.mark.parametrize("content, words", [
    ("{not json", "is not valid JSON"),
    (b"\xff\xfe", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, not list"),
])
def test_bad_files_raise_the_given_error_with_the_hint(tmp_path, content, words):
    p = tmp_path / "a.json"
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ConfigError) as e:
        read_json(p, ConfigError, missing="-", hint="write it again")
    assert words in str(e.value) and str(e.value).endswith("; write it again") and str(p) in str(e.value)


def test_missing_file_and_directory_give_the_missing_message(tmp_path):
    for p in (tmp_path / "nope.json", tmp_path):
        with pytest.raises(ConfigError, match="^not there; make it$"):
            read_json(p, ConfigError, missing="not there; make it")


def test_any_value_when_an_object_is_not_required(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("[1, 2]")
    assert read_json(p, ConfigError, missing="-", want_object=False) == [1, 2]
