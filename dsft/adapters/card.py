"""What an adapter directory says about itself to the Hugging Face ecosystem: the base named as the Hub
names it (in ``adapter_config.json`` and the card), and a ``README.md`` model card.

The card has the Hub's YAML front matter (``base_model``, ``library_name``, ``tags``, ``license``) and says in
prose what the adapter is, how it was measured (every figure names its held-out set), how it was trained
and where it is known to work. The machine-local path of the base stays in dsft's manifest only.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dsft.adapter_format import PEFT_CONFIG_FILE
from dsft.base.loading import looks_like_hub_id

CARD_FILE = "README.md"


def hub_name(name: str, source: str) -> str:
    """The base as the Hub names it: a hub id (``hub:ID@REV``), a preset's name, or for a local directory
    the hub id its ``config.json`` was saved from (``_name_or_path``) when it has one, else the directory's name."""
    kind, _, rest = source.partition(":")
    if kind == "hub":
        return rest.rsplit("@", 1)[0]
    if kind == "path":
        try:
            saved = json.loads((Path(rest) / "config.json").read_text()).get("_name_or_path", "")
        except (OSError, ValueError):
            saved = ""
        return saved if isinstance(saved, str) and looks_like_hub_id(saved) else Path(rest).name
    return name


def point_peft_config_at(directory: Path, base: str) -> None:
    """Set ``base_model_name_or_path`` in the directory's ``adapter_config.json`` (when it has one) to ``base``:
    PEFT writes the local path it loaded the base from, which means nothing on another machine."""
    path = directory / PEFT_CONFIG_FILE
    if not path.exists():
        return
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def front_matter(base: str, library_name: str, tags: list[str]) -> str:
    """The Hub's YAML header of a model card (the base's license applies: dsft cannot know it)."""
    lines = ["---", f"base_model: {base}", f"library_name: {library_name}", "license: other  # the base model's license applies",
             "tags:", *(f"- {t}" for t in tags), "---", ""]
    return "\n".join(lines) + "\n"


def _figures(metrics: Mapping[str, Any]) -> list[str]:
    """Table rows: the headline held-out set (the user's, else the pack's generated text), then general text."""
    h = metrics.get("headline") or ({"set": "generated pack text", "ppl_before": metrics["eval_ppl_before"],
                                     "ppl_after": metrics["eval_ppl_after"]} if "eval_ppl_before" in metrics else None)
    lines = [f"| {h['set']} | {h['ppl_before']:.2f} | {h['ppl_after']:.2f} |"] if h else []
    if "general_loss_before" in metrics and "general_loss_after" in metrics:
        lines.append(f"| general text | {math.exp(metrics['general_loss_before']):.2f} | {math.exp(metrics['general_loss_after']):.2f} |")
    return lines


def model_card(*, ref: str, kind: str, base: str, base_fingerprint: str, metrics: Mapping[str, Any],
               recipe: Mapping[str, Any], added_tokens: int) -> str:
    """The ``README.md`` of an adapter directory (see the module docstring)."""
    domain = ref.split("@", 1)[0]
    method = "esft" if kind.startswith("esft") else "lora"
    peft = method == "lora"
    front = front_matter(base, "peft" if peft else "dsft", ["dsft", "domain-adaptation", domain, method, "mixture-of-experts"])
    what = ("LoRA on attention, shared and routed experts (PEFT format: `adapter_config.json` + `adapter_model.safetensors`)"
            if peft else "the weights of the routed experts this domain uses (expert-specialised fine-tuning, `esft.safetensors`)")
    terms = (f" It adds {added_tokens} domain-term tokens, whose embedding and output rows are in `terms.safetensors`."
             if added_tokens else "")
    body = [f"# {ref}: a {domain} adapter for {base}", "",
            f"A dsft domain adapter: {what}.{terms}", ""]
    figures = _figures(metrics)
    if figures:
        body += ["## Evaluation", "", "Perplexity per base-tokenizer token on held-out text, before and after the adapter:", "",
                 "| held-out set | base | base + adapter |", "|---|---|---|", *figures, ""]
    stages = recipe.get("stages") or []
    if stages:
        body += ["## Training", "", f"Recipe `{recipe.get('name', '?')}`:", ""]
        for s in stages:
            steps = f"{s['steps']} steps" if s.get("steps") else f"{s.get('epochs')} epochs"
            body.append(f"- stage `{s['name']}` ({s['kind']}): {steps}, lr {s['lr']}, "
                        f"{s.get('batch_size')} rows of {s.get('seq_len')} tokens a step")
        body.append("")
    body += ["## Compatibility", "",
             f"Trained and verified on `{base}` (dsft base fingerprint `{base_fingerprint[:12]}`). dsft checks an adapter "
             "against the base it is loaded on before using it (`dsft registry check REF --base BASE`).", "",
             "## Use", "", "```console", f"$ dsft generate --adapter {ref} \"...\"",
             f"$ dsft export {ref} --format {'peft' if peft else 'merged'} --out exported   # "
             + ("plain PEFT files for `AutoPeftModelForCausalLM`" if peft else "full weights with the experts merged in"),
             "```", ""]
    return front + "\n".join(body)
