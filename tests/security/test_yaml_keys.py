"""A key given twice in a config is refused (PyYAML would keep the last one without a word), and every YAML
error is one line, whatever PyYAML's own message looks like."""
from __future__ import annotations

from pathlib import Path

import pytest
from security_helpers import one_error_line

from dsft.errors import UsageError
from dsft.safe_yaml import loads

LORA = Path(__file__).parents[2] / "dsft" / "recipes" / "builtin" / "lora.yaml"


@pytest.mark.parametrize("text, dotted, lines", [
    ("lr: 2.0e-3\nlr: 5.0\n", "lr", (2, 1)),
    ("stages:\n  - name: a\n    optimizer:\n      lr: 1\n      lr: 2\n", "stages.0.optimizer.lr", (5, 4)),
    ("a: {x: 1, y: 2, x: 3}\n", "a.x", (1, 1)),
    ("1: a\n0x1: b\n", "1", (2, 1)),  # equal once constructed
], ids=["top-level", "nested", "flow", "same-value"])
def test_a_duplicate_key_is_named_with_its_dotted_path_and_lines(text, dotted, lines):
    with pytest.raises(UsageError) as err:
        loads(text, "r.yaml")
    assert str(err.value) == (f"r.yaml: duplicate key '{dotted}' at line {lines[0]} (first at line {lines[1]}); "
                              "keep only one of them")


def test_a_merge_key_may_still_be_overridden():
    assert loads("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n", "r.yaml")["c"] == {"x": 3, "y": 2}


def test_recipes_validate_refuses_a_duplicate_lr(dsft, tmp_path):
    text = LORA.read_text()
    assert text.count("\n    lr: 2.0e-3") == 1
    path = tmp_path / "dup.yaml"
    path.write_text(text.replace("\n    lr: 2.0e-3", "\n    lr: 2.0e-3\n    lr: 5.0"))
    line_no = text[:text.index("\n    lr: 2.0e-3")].count("\n") + 2
    assert one_error_line(dsft("recipes", "validate", str(path))) == (
        f"error: {path}: duplicate key 'stages.0.lr' at line {line_no + 1} (first at line {line_no}); keep only one of them")


def test_a_duplicate_key_in_an_override_value_is_refused(dsft):
    line = one_error_line(dsft("recipes", "validate", str(LORA), "stages.0.train={terms: true, terms: false}"))
    assert "duplicate key 'terms'" in line


@pytest.mark.parametrize("text, message", [
    ("!!python/object/apply:os.system ['echo pwned']\n", "malformed YAML at line 1, column 1: could not determine a "
     "constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("name: [\n", "malformed YAML at line 2, column 1: while parsing a flow node; did not find expected node content"),
    ("name: 'open\n", "malformed YAML at line 2, column 1: while scanning a quoted scalar; found unexpected end of stream"),
], ids=["python-tag", "unclosed-list", "unclosed-quote"])
def test_every_yaml_error_is_one_line(dsft, tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert one_error_line(dsft("recipes", "validate", str(path))) == f"error: {path}: {message}"
