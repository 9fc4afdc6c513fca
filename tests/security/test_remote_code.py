"""Issue 15.1: a model directory that asks to run its own code (``auto_map``) is refused unless trusted,
before transformers can prompt or import anything."""
from __future__ import annotations

import json
import shutil

import pytest
from security_helpers import one_error_line

MARKER_CODE = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('remote code ran')\n"


@pytest.fixture(params=["tokenizer_config.json", "config.json"])
def asking_dir(request, tmp_path, tiny_base_dir):
    """A copy of the tiny base whose config or tokenizer config maps to a Python file that leaves a marker."""
    d = tmp_path / "base-with-code"
    shutil.copytree(tiny_base_dir, d, ignore=shutil.ignore_patterns("dsft_fingerprint.json"))
    (d / "evil.py").write_text(MARKER_CODE)
    cfg = json.loads((d / request.param).read_text())
    cfg["auto_map"] = ({"AutoTokenizer": ["evil.EvilTokenizer", None]} if request.param == "tokenizer_config.json"
                       else {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (d / request.param).write_text(json.dumps(cfg))
    return d, request.param


@pytest.mark.parametrize("command", [["registry", "add-base", "{dir}"], ["train", "--base", "{dir}", "--max-steps", "1"],
                                     ["plan", "--base", "{dir}"]], ids=["add-base", "train", "plan"])
def test_a_directory_asking_for_code_is_refused_naming_the_file(dsft, asking_dir, command):
    d, asking_file = asking_dir
    line = one_error_line(dsft(*[a.replace("{dir}", str(d)) for a in command]))
    assert str(d / asking_file) in line and "--trust-remote-code" in line
    assert not (d / "RAN").exists()
    assert not (d / "dsft_fingerprint.json").exists()  # refused before the directory was read as a model


def test_every_from_pretrained_passes_the_flag_explicitly():
    import ast
    from pathlib import Path

    import dsft

    missing = []
    for path in Path(dsft.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.startswith("Auto")):
                kw = {k.arg for k in node.keywords}
                if "trust_remote_code" not in kw and None not in kw:  # None: **hf_kwargs(...)
                    missing.append(f"{path.name}:{node.lineno}")
    assert missing == []
