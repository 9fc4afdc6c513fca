"""Hub-shaped adapters: the base named as the Hub names it, a model card with front matter, and the PEFT
export loading with `AutoPeftModelForCausalLM` from a base in the local Hugging Face cache (offline)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from dsft.adapters.card import hub_name, model_card


def test_the_base_is_named_as_the_hub_names_it(tmp_path):
    assert hub_name("deepseek-ai/DeepSeek-V2-Lite", "hub:deepseek-ai/DeepSeek-V2-Lite@main") == "deepseek-ai/DeepSeek-V2-Lite"
    assert hub_name("tiny-deepseek-v2", "preset:tiny-deepseek-v2") == "tiny-deepseek-v2"
    saved = tmp_path / "downloaded"
    saved.mkdir()
    (saved / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen3-30B-A3B"}))
    assert hub_name(str(saved), f"path:{saved}") == "Qwen/Qwen3-30B-A3B"  # where the directory came from
    (saved / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/ckpt"}))
    assert hub_name(str(saved), f"path:{saved}") == "downloaded"  # never a machine-local path


def test_the_card_has_hub_front_matter_and_says_what_each_figure_measured():
    metrics = {"headline": {"set": "user held-out (50 records)", "ppl_before": 30.0, "ppl_after": 20.0},
               "general_loss_before": 3.0, "general_loss_after": 3.1}
    recipe = {"name": "lora", "stages": [{"name": "sft", "kind": "sft", "steps": 120, "lr": 2e-4, "batch_size": 8, "seq_len": 128}]}
    card = model_card(ref="contracts@0.1.0", kind="lora+terms", base="deepseek-ai/DeepSeek-V2-Lite", base_fingerprint="ab" * 32,
                      metrics=metrics, recipe=recipe, added_tokens=12)
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "deepseek-ai/DeepSeek-V2-Lite" and front["library_name"] == "peft"
    assert {"dsft", "contracts", "lora"} <= set(front["tags"]) and front["license"] == "other"
    assert "| user held-out (50 records) | 30.00 | 20.00 |" in card
    assert "stage `sft` (sft): 120 steps, lr 0.0002, 8 rows of 128 tokens a step" in card
    assert "`ababababab" in card and "12 domain-term tokens" in card
    esft = model_card(ref="legal@0.1.0", kind="esft", base="b", base_fingerprint="0" * 64, metrics={}, recipe={}, added_tokens=0)
    assert yaml.safe_load(esft.split("---")[1])["library_name"] == "dsft" and "--format merged" in esft


SCRIPT = """
import json, sys, torch
from pathlib import Path
from dsft.adapters.store import load_adapter
from dsft.base import load_base
from dsft.runtime.export import export_peft
from dsft.testing.adapters import make_adapter

loaded = load_base("dsft-test/tiny-deepseek-v2", device="cpu")  # a hub id, from the local cache
rec = make_adapter(loaded, "finance", seed=1)
export_peft(rec.ref, sys.argv[1])
ours = load_base("dsft-test/tiny-deepseek-v2", device="cpu")
ours_model = load_adapter(ours.model, ours.tokenizer, rec.path)

from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
peft_model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok("The collateralized debt obligation desk reviewed its duration risk.", return_tensors="pt").input_ids
with torch.no_grad():
    diff = (ours_model(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max().item()
print(json.dumps({"path": rec.path, "max_diff": diff, "term_token": bool((ids >= rec.parsed_manifest().term_start).any()),
                  "same_ids": ids.tolist() == ours.tokenizer(
                      "The collateralized debt obligation desk reviewed its duration risk.", return_tensors="pt").input_ids.tolist()}))
"""


def test_the_peft_export_loads_with_auto_peft_from_a_base_in_the_hf_cache(tiny_base_dir, tmp_path):
    """The base as a hub id in the Hugging Face cache layout (models--ORG--NAME/snapshots/REV, refs/main),
    offline: the adapter's config and card name the hub id, and AutoPeftModelForCausalLM loads the export
    (base from the cache, embeddings resized to the export's tokenizer) to dsft's own logits."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--dsft-test--tiny-deepseek-v2"
    shutil.copytree(tiny_base_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "DSFT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["term_token"] and result["same_ids"] and result["max_diff"] < 1e-4, result

    adapter = Path(result["path"])
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "dsft-test/tiny-deepseek-v2"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "dsft-test/tiny-deepseek-v2"
    for card in (adapter / "README.md", out / "README.md"):
        front = yaml.safe_load(card.read_text().split("---")[1])
        assert front["base_model"] == "dsft-test/tiny-deepseek-v2" and front["library_name"] == "peft", card
    manifest = json.loads((adapter / "dsft_adapter.json").read_text())
    assert "README.md" in manifest["files"]  # hashed like every other file
    assert manifest["base"]["source"] == "hub:dsft-test/tiny-deepseek-v2@main"
