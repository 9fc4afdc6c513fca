"""The main job, end to end through the real CLI: `dsft train --domain finance` on the default tiny base."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsft.adapter_format import read_manifest, verify_files


def dsft(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DSFT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dsft.cli", *args], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"dsft {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, new_home):
    """One real `dsft train --domain finance --json` run, shared by the tests of this module."""
    home = new_home(tmp_path_factory.mktemp("e2e_home"))
    proc = dsft("train", "--domain", "finance", "--json", home=home)
    return home, json.loads(proc.stdout)


def test_main_job_registers_finance_0_1_0_and_lowers_perplexity_by_20_percent(trained):
    home, result = trained
    assert result["adapter"] == "finance@0.1.0"
    m = result["metrics"]
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert m["eval_ppl_after"] <= 0.8 * m["eval_ppl_before"], m
    path = Path(result["path"])
    assert path == home / "adapters" / "finance" / "0.1.0"
    manifest = read_manifest(path)
    verify_files(path, manifest)
    assert manifest.domain == "finance" and manifest.version == "0.1.0" and manifest.kind == "lora+terms"
    assert manifest.trained_fingerprint["architecture"] == "DeepseekV2ForCausalLM"
    assert len(manifest.added_tokens) > 50
    assert {"adapter_config.json", "adapter_model.safetensors", "terms.safetensors", "recipe.yaml"} <= set(manifest.files)


def test_adapter_files_are_small_and_safetensors_only(trained):
    _, result = trained
    path = Path(result["path"])
    names = {p.name for p in path.iterdir()}
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    from safetensors.torch import load_file

    rows = load_file(str(path / "terms.safetensors"))
    manifest = read_manifest(path)
    assert rows["embed"].shape[0] == len(manifest.added_tokens)  # the added rows only, never the whole matrix


def test_plain_peft_loading_gives_the_same_logits_as_dsft(trained):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsft.adapters.store import load_adapter
    from dsft.adapters.terms import apply_rows_to_plain_model
    from dsft.base import load_base

    home, result = trained
    path = Path(result["path"])
    manifest = read_manifest(path)
    os.environ["DSFT_HOME"] = str(home)
    ours = load_base("tiny-deepseek-v2", device="cpu")
    ours_model = load_adapter(ours.model, ours.tokenizer, path)

    base_dir = home / "bases" / "tiny-deepseek-v2"
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_tokens(list(manifest.added_tokens))
    apply_rows_to_plain_model(plain, manifest.term_start, load_file(str(path / "terms.safetensors")))
    plain = PeftModel.from_pretrained(plain, path)

    text = "The collateralized debt obligation desk reviewed its duration risk."
    ids = ours.tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, tok(text, return_tensors="pt").input_ids)
    assert (ids >= manifest.term_start).any(), "the text should use an added term token"
    with torch.no_grad():
        torch.testing.assert_close(ours_model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_retraining_bumps_the_minor_version(trained):
    home, _ = trained
    proc = dsft("train", "--domain", "finance", "--max-steps", "2", "--json", home=home)
    assert json.loads(proc.stdout)["adapter"] == "finance@0.2.0"


def test_same_seed_same_adapter_and_user_data_joins_the_mixture(home, tmp_path):
    from safetensors.torch import load_file

    import dsft

    data = tmp_path / "notes.jsonl"
    data.write_text("".join(f'{{"prompt": "Explain note {i}.", "response": "Note {i} concerns duration risk."}}\n' for i in range(20)))
    runs = [dsft.train(domain="finance", max_steps=3, seed=7, data=[data]) for _ in range(2)]
    assert [r.adapter for r in runs] == ["finance@0.1.0", "finance@0.2.0"]
    assert runs[0].metrics["stages"][0]["mixture"]["user"] > 0
    a, b = (load_file(str(r.path / "adapter_model.safetensors")) for r in runs)
    assert a.keys() == b.keys()
    # CPU thread scheduling may flip the last bits of a reduction, nothing more
    assert runs[0].metrics["stages"][0]["final_loss"] == pytest.approx(runs[1].metrics["stages"][0]["final_loss"], rel=1e-6)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_output_gets_a_copy_and_an_older_adapter_there_is_replaced(home, tmp_path):
    import dsft

    out = tmp_path / "exported"
    first = dsft.train(domain="legal", max_steps=2, output=out)
    assert read_manifest(out).version == first.adapter.split("@")[1]
    second = dsft.train(domain="legal", max_steps=2, output=out)  # an existing dsft adapter is replaced atomically
    assert read_manifest(out).version == second.adapter.split("@")[1] == "0.2.0"
    verify_files(out, read_manifest(out))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no staging leftovers"
