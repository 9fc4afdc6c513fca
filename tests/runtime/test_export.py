"""`dsft export`: plain PEFT and plain transformers load the adapter with the logits of base + adapter."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import dsft
from dsft.cli.main import app
from dsft.errors import UsageError
from dsft.runtime.export import export_adapter

ATOL = 1e-4


@pytest.fixture(scope="module")
def reference(attached, texts):
    ids = attached.tokenizer_for("finance")(texts[0], return_tensors="pt").input_ids
    return ids, attached.logits([texts[0]], adapters=["finance"])[0]


def test_peft_export_loads_in_plain_peft_after_resizing_as_its_readme_says(refs, reference, tmp_path, rt_home, texts):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "finance-peft"
    result = CliRunner().invoke(app, ["export", refs["finance"], "--format", "peft", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["path"] == str(out)
    readme = (out / "README.md").read_text()
    assert "resize_token_embeddings" in readme and "Resize the base first" in readme

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(rt_home / "bases" / "tiny-deepseek-v2", dtype=torch.float32)
    model.resize_token_embeddings(max(len(tok), model.get_input_embeddings().num_embeddings))
    model = PeftModel.from_pretrained(model, out)
    ids, want = reference
    assert torch.equal(tok(texts[0], return_tensors="pt").input_ids, ids)  # the exported tokenizer knows the terms
    with torch.no_grad():
        got = model(input_ids=ids).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_merged_export_loads_in_plain_transformers(refs, reference, tmp_path, texts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "finance-merged"
    result = export_adapter(refs["finance"], out, format="merged")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(result.files)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids, want = reference
    assert torch.equal(tok(texts[0], return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        got = model(input_ids=ids).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_export_refuses_a_used_directory_and_an_unknown_format(refs, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        export_adapter(refs["legal"], used, format="peft")
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    with pytest.raises(UsageError, match="--format"):
        export_adapter(refs["legal"], tmp_path / "x", format="gguf")
    result = CliRunner().invoke(app, ["export", "astrology", "--out", str(tmp_path / "y")])
    assert result.exit_code == 3 and "astrology" in result.output
    assert dsft.open_registry().resolve(refs["legal"]).ref == refs["legal"]
