"""dsft's own PEFT export can be imported back and used: ``check`` finds it compatible with its own base and
the runtime serves it with the logits of the original (its term rows travel as PEFT trainable tokens)."""
from __future__ import annotations

import json

import torch


def test_an_exported_adapter_imports_back_checks_compatible_and_serves_the_same_logits(dsft, home, tmp_path):
    from dsft.base import load_base as load_plain
    from dsft.runtime import load_base
    from dsft.testing.adapters import make_adapter

    original = make_adapter(load_plain("tiny-deepseek-v2", device="cpu"), "finance", seed=3).ref
    out = tmp_path / "finance-peft"
    assert dsft("export", original, "--format", "peft", "--out", str(out)).returncode == 0
    assert json.loads((out / "adapter_config.json").read_text())["trainable_token_indices"]

    proc = dsft("registry", "import", str(out), "--domain", "finance-again", "--json")
    assert proc.returncode == 0, proc.stderr
    check = dsft("registry", "check", "finance-again", "--base", "tiny-deepseek-v2", "--json")
    assert check.returncode == 0 and json.loads(check.stdout)["status"] == "compatible", check.stdout
    assert dsft("registry", "verify").returncode == 0

    runtime = load_base("tiny-deepseek-v2", device="cpu")
    runtime.attach(original)
    runtime.attach("finance-again")
    text = "The collateralized debt obligation desk"
    want, got = runtime.logits([text], adapters=[original])[0], runtime.logits([text], adapters=["finance-again"])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
