"""Bad input: one line naming the problem and the fix, a non-zero exit, and nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(home: Path, *args: str) -> subprocess.CompletedProcess:
    """The real `dsft` command in a child process (used where the process boundary matters)."""
    env = {**os.environ, "DSFT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "dsft.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def run_inline(*args: str):
    """The same command in this process (no import cost per case); $DSFT_HOME comes from the fixture."""
    from typer.testing import CliRunner

    from dsft.cli.main import app

    result = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and "bases" not in p.parts}


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{bad json\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (tmp_path / "notadapter").mkdir()
    (tmp_path / "notadapter" / "keep.txt").write_text("mine")
    return tmp_path


CASES = [
    (["--domain", "../etc"], 2, "path separator"),
    (["--domain", "fin/ance"], 2, "path separator"),
    (["--domain", "astrology"], 3, "unknown domain 'astrology'"),
    (["--base", "tiny-foo"], 3, "unknown base"),
    (["--base", "{tmp}/missing-dir"], 3, "does not exist"),
    (["--data", "{tmp}/missing.jsonl"], 4, "not found"),
    (["--data", "{tmp}/empty.jsonl"], 4, "empty"),
    (["--data", "{tmp}/bad.jsonl"], 4, "line 2"),
    (["{tmp}/qa.jsonl"], 2, "is not an override (key.path=value"),
    (["--data", "{tmp}/qa.jsonl", "--field", "response=reply"], 4, "--field response=reply: no field 'reply' here"),
    (["--data", "{tmp}/qa.jsonl", "--field", "answer=response"], 2, "'answer' is not one of dsft's fields"),
    (["--data", "{tmp}/*.csv"], 4, "the pattern matches no file"),
    (["--data", "acme/not-cached"], 4, "hf download acme/not-cached --repo-type dataset"),
    (["--output", "{tmp}/notadapter"], 2, "not a dsft adapter"),
    (["--recipe", "lora", "stages.0.lr=-1e-5"], 2, "stages[0].lr: must be > 0"),
    (["--keep-layers", "0", "--recompute-attention"], 2, "--keep-layers 0 keeps none"),
]


@pytest.mark.parametrize("args, code, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_fails_in_one_line_and_writes_nothing(home, bad_files, args, code, message):
    args = [a.replace("{tmp}", str(bad_files)) for a in args]
    before = _files(home)
    proc = run_inline("train", *args)
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (home / "adapters").exists() or not any((home / "adapters").rglob("*.safetensors"))
    after = _files(home)
    assert {k: v for k, v in after.items() if k in before} == before, "an existing file changed"
    assert (bad_files / "notadapter" / "keep.txt").read_text() == "mine"


def test_non_moe_base_is_refused_with_the_supported_list(home, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    proc = run_inline("train", "--base", str(tmp_path / "llama"))
    assert proc.returncode == 5
    assert "LlamaForCausalLM is not a supported MoE architecture" in proc.stderr and "DeepseekV2ForCausalLM" in proc.stderr


def test_debug_shows_the_traceback(home):
    proc = run(home, "--debug", "train", "--domain", "astrology")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_ctrl_c_during_training_names_the_command_that_resumes(home, monkeypatch):
    import dsft.recipes.runner

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dsft.recipes.runner, "train", interrupted)
    monkeypatch.setattr(sys, "argv", ["dsft", "train", "--domain", "legal", "stages.0.lr=2e-4"])
    out = run_inline("train", "--domain", "legal", "stages.0.lr=2e-4")
    assert out.returncode == 130
    assert "interrupted; nothing was registered" in out.stderr
    assert out.stderr.strip().endswith("with: dsft train --domain legal stages.0.lr=2e-4 --resume")
    assert "Traceback" not in out.stderr and not (home / "adapters").exists()
