"""Issue 15.7 and the early-error items: every bad ``dsft train`` argument is one line before any work."""
from __future__ import annotations

import pytest
from security_helpers import one_error_line

CASES = [
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--max-steps", "-1"], "--max-steps must be >= 1"),
    (["--seed", str(2**64)], "--seed must be an integer in 0..4294967295"),
    (["--seed", "-3"], "--seed must be an integer in 0..4294967295"),
    (["seed=18446744073709551616"], "seed must be an integer in 0..4294967295"),
    (["stages.0.seq_len=100000"], "stages[0].seq_len: must be <= 2048 (the context length of base"),
    (["--device", "quantum"], "--device must be cpu, cuda or cuda:N"),
    (["--recipe", "{tmp}/latin1.yaml"], "is not UTF-8 text (bad byte at offset"),
    (["--recipe", "{tmp}"], "is a directory; give a YAML file"),
    (["lr=["], "override 'lr=[': malformed YAML"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_train_arguments_fail_early_in_one_line(dsft, home, tmp_path, args, message):
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    line = one_error_line(dsft("train", *[a.replace("{tmp}", str(tmp_path)) for a in args]))
    assert message in line
    assert not (home / "runs").exists()  # refused before a run directory was opened
