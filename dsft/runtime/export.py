"""``dsft export``: an adapter for people who do not run dsft.

* ``peft``: a directory that plain ``PeftModel.from_pretrained`` loads. Term extensions travel as PEFT
  *trainable tokens* on the input embedding and the output head (``trainable_token_indices`` in the
  config, the rows in ``adapter_model.safetensors``), with the extended tokenizer beside them; a
  README.md says to resize the base's embeddings to the tokenizer's size first.
* ``merged``: the base with the LoRA merged into its weights and the term rows written into its
  (resized) embedding and head: safetensors + config + tokenizer that plain
  ``AutoModelForCausalLM.from_pretrained`` loads.

Both check the adapter's files and its compatibility with the base before writing, write to a staging
directory and rename it into place; an existing non-empty ``--out`` is refused.
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.adapter_format import ESFT_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, TERMS_FILE, Manifest
from dsft.adapters.card import front_matter, hub_name
from dsft.atomic import fsync_dir, staging_dir, write_json_atomic, write_text_atomic
from dsft.errors import IncompatibleError, UsageError
from dsft.runtime.verified_read import read_verified

FORMATS = ("peft", "merged")
PEFT_PREFIX = "base_model.model."


@dataclass
class ExportResult:
    ref: str
    format: str
    path: Path
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"adapter": self.ref, "format": self.format, "path": str(self.path), "files": self.files}


def training_base(manifest: Manifest) -> str | None:
    """How to name the base an adapter was trained on (preset name, directory or hub id), if recorded."""
    if manifest.base is None:
        return None
    source = manifest.base.source or ""
    if source.startswith("preset:"):
        return source.removeprefix("preset:")
    if source.startswith("path:"):
        return source.removeprefix("path:")
    if source.startswith("hub:"):
        return source.removeprefix("hub:").rsplit("@", 1)[0]
    return manifest.base.name


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not empty; choose a new directory")


def _resolve(ref: str, base: str | None, registry: Any):
    """(record, base ref, base fingerprint), refusing a tampered adapter or one that does not fit the base."""
    from contextlib import nullcontext

    from dsft.base.loading import fingerprint_for, resolve_base
    from dsft.registry import Registry, open_registry

    with (nullcontext(registry) if isinstance(registry, Registry) else open_registry(registry)) as reg:
        rec = reg.resolve(ref, verify_files=True)
        name = base or training_base(rec.parsed_manifest())
        if not name:
            raise UsageError(f"{rec.ref} does not record its base; pass --base")
        base_ref = resolve_base(name)
        _, _, fp = fingerprint_for(base_ref)
        compat = reg.check(rec.ref, base_fingerprint=fp, verify_files=False)  # hashed by resolve above
    if not compat.ok:
        raise IncompatibleError(f"{rec.ref} does not fit base {name}: " + "; ".join(compat.reasons))
    return rec, base_ref, fp


def _extended_tokenizer(base_dir: Path, manifest: Manifest):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)
    added = manifest.added_tokens
    if added:
        if len(tok) != manifest.term_start:
            raise IncompatibleError(f"the adapter's terms start at id {manifest.term_start} but the base tokenizer "
                                    f"has {len(tok)} tokens")
        tok.add_tokens(list(added))
    return tok


def _peft_with_trainable_tokens(directory: Path, manifest: Manifest, base_dir: Path) -> tuple[dict, Any]:
    """The adapter's LoRA state plus its term rows as PEFT trainable tokens, built on a meta-device skeleton."""
    from peft import (
        LoraConfig,
        get_peft_model_state_dict,
        inject_adapter_in_model,
        set_peft_model_state_dict,
    )
    from safetensors.torch import load as load_safetensors
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads(read_verified(directory, manifest, PEFT_CONFIG_FILE))
    config = LoraConfig.from_peft_type(**cfg)
    state = load_safetensors(read_verified(directory, manifest, PEFT_WEIGHTS_FILE))
    rows = load_safetensors(read_verified(directory, manifest, TERMS_FILE))
    start, n = int(manifest.term_start or 0), len(manifest.added_tokens)
    model_config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    model_config.vocab_size = max(model_config.vocab_size, start + n)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=False)
    names = {id(m): n_ for n_, m in skeleton.named_modules()}
    embed, head = names[id(skeleton.get_input_embeddings())], names[id(skeleton.get_output_embeddings())]
    ids = list(range(start, start + n))
    config.trainable_token_indices = {embed.rsplit(".", 1)[-1]: ids, head.rsplit(".", 1)[-1]: ids}
    skeleton = inject_adapter_in_model(config, skeleton, low_cpu_mem_usage=True)
    for module in skeleton.modules():
        for attr in ("lora_A", "lora_B"):
            factors = getattr(module, attr, None)
            if isinstance(factors, torch.nn.ModuleDict):
                for k in factors:
                    factors[k].to_empty(device="cpu")
        deltas = getattr(module, "trainable_tokens_delta", None)
        if isinstance(deltas, torch.nn.ParameterDict):
            for k in list(deltas):
                deltas[k] = torch.nn.Parameter(torch.empty(deltas[k].shape), requires_grad=False)
    for path, module in skeleton.named_modules():
        if type(module).__name__ == "TrainableTokensWrapper":
            state[f"{path}.token_adapter.trainable_tokens_delta"] = rows["embed" if path == embed else "head"]
    result = set_peft_model_state_dict(skeleton, state)
    missing = [k for k in result.missing_keys if "lora_" in k or "trainable_tokens" in k]
    if missing:
        raise UsageError(f"cannot export {directory}: {missing[0]} has no value")
    out = get_peft_model_state_dict(skeleton, save_embedding_layers=False)
    return {PEFT_PREFIX + k: v.contiguous() for k, v in out.items()}, config


README_PEFT = """# {ref}: a dsft domain adapter, exported for plain PEFT

LoRA adapter (PEFT {peft_version} format) for `{base}` (architecture `{arch}`, base fingerprint `{fp}`).
{terms}
```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{out}")          # the base tokenizer{tok_note}
model = AutoModelForCausalLM.from_pretrained("{base_path}")
{resize}model = PeftModel.from_pretrained(model, "{out}")
```
"""

TERMS_NOTE = """
This adapter adds {n} domain terms as new tokens (ids {start}-{end}), e.g. {examples}. Their input-embedding and
output-head rows are stored as PEFT *trainable tokens* (`trainable_token_indices` in `adapter_config.json`).

**Resize the base first.** The base's embedding matrix has {rows} rows; the extended tokenizer here has {size}
tokens. Before `PeftModel.from_pretrained`, call `model.resize_token_embeddings(len(tokenizer))` when the
tokenizer is larger than the matrix (the added rows' initial values do not matter: the adapter overwrites them).
Use the tokenizer in this directory, not the base's: it maps each term to its token.
"""


def export_peft(ref: str, out: str | Path, *, base: str | None = None, registry: Any = None) -> ExportResult:
    """Write adapter ``ref`` as a plain PEFT directory at ``out`` (see the module docstring).

    Raises:
        NotFoundError, IntegrityError, IncompatibleError, UsageError (``out`` exists and is not empty).
    """
    import peft
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    _check_out(out)
    rec, base_ref, fp = _resolve(ref, base, registry)
    directory, manifest = Path(rec.path), rec.parsed_manifest()
    if manifest.is_esft:
        raise UsageError(f"{rec.ref} is an ESFT adapter (its own weights for some experts), which PEFT has no format for; "
                         f"export it with --format merged")
    added = manifest.added_tokens
    tokenizer = _extended_tokenizer(base_ref.path, manifest)
    with staging_dir(out) as tmp:
        if added:
            state, config = _peft_with_trainable_tokens(directory, manifest, base_ref.path)
            save_file(state, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
            config.save_pretrained(tmp)
        else:
            (tmp / PEFT_CONFIG_FILE).write_bytes(read_verified(directory, manifest, PEFT_CONFIG_FILE))
            (tmp / PEFT_WEIGHTS_FILE).write_bytes(read_verified(directory, manifest, PEFT_WEIGHTS_FILE))
        tokenizer.save_pretrained(tmp)
        rows = int(json.loads((base_ref.path / "config.json").read_text()).get("vocab_size") or 0)
        resize = "model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().num_embeddings))\n" if added else ""
        terms = TERMS_NOTE.format(n=len(added), start=manifest.term_start, end=int(manifest.term_start or 0) + len(added) - 1,
                                  examples=", ".join(f"`{t}`" for t in added[:3]), rows=rows, size=len(tokenizer)) if added else ""
        write_text_atomic(tmp / "README.md", front_matter(hub_name(base_ref.name, base_ref.source), "peft",
                                                          ["dsft", "domain-adaptation", "lora"]) + README_PEFT.format(
            ref=rec.ref, peft_version=peft.__version__, base=base_ref.name, arch=fp["architecture"], fp=fp["id"][:12],
            terms=terms, out=out, base_path=base_ref.path, resize=resize,
            tok_note=f" + {len(added)} domain terms" if added else ""))
        write_json_atomic(tmp / "dsft_export.json", _provenance(rec, fp, "peft"))
        _publish(tmp, out)
    return ExportResult(rec.ref, "peft", out, sorted(p.name for p in out.iterdir()))


README_MERGED = """# {ref} merged into {base}

Full weights: `{base}` (fingerprint `{fp}`) with the dsft adapter `{ref}` merged in{terms}.
Load it like any Hugging Face model:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{out}")
tokenizer = AutoTokenizer.from_pretrained("{out}")
```
"""


def export_merged(ref: str, out: str | Path, *, base: str | None = None, registry: Any = None,
                  device: str = "cpu", dtype: torch.dtype | None = None) -> ExportResult:
    """Write the base with adapter ``ref`` merged in (LoRA into the weights, term rows into the resized
    embedding and head) as an ordinary Hugging Face model directory at ``out``.

    Args:
        device, dtype: where and in which precision to merge (default CPU, the checkpoint's own dtype).
    Raises:
        NotFoundError, IntegrityError, IncompatibleError, UsageError.
    """
    from peft import PeftModel
    from safetensors.torch import load as load_safetensors
    from transformers import AutoModelForCausalLM

    from dsft.adapters.terms import apply_rows_to_plain_model

    out = Path(out).expanduser()
    _check_out(out)
    rec, base_ref, fp = _resolve(ref, base, registry)
    directory, manifest = Path(rec.path), rec.parsed_manifest()
    tokenizer = _extended_tokenizer(base_ref.path, manifest)
    model = AutoModelForCausalLM.from_pretrained(base_ref.path, dtype=dtype or "auto", device_map=device, use_safetensors=True,
                                                 trust_remote_code=False)
    added = manifest.added_tokens
    if added:
        rows = load_safetensors(read_verified(directory, manifest, TERMS_FILE))
        apply_rows_to_plain_model(model, int(manifest.term_start or 0), rows)
    with staging_dir(out) as tmp:
        if manifest.is_esft:
            from dsft.adapters.esft import apply_slices

            apply_slices(model, load_safetensors(read_verified(directory, manifest, ESFT_FILE)))
            merged = model
        else:
            # PEFT reads the files itself: they were verified above; copy them first so that what it reads is
            # exactly what was hashed, then merge.
            src = tmp / ".adapter"
            src.mkdir()
            for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE):
                (src / name).write_bytes(read_verified(directory, manifest, name))
            merged = PeftModel.from_pretrained(model, src, is_trainable=False).merge_and_unload()
            shutil.rmtree(src)
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_text_atomic(tmp / "README.md", front_matter(hub_name(base_ref.name, base_ref.source), "transformers",
                                                          ["dsft", "domain-adaptation", "merge"]) + README_MERGED.format(
            ref=rec.ref, base=base_ref.name, fp=fp["id"][:12], out=out,
            terms=f" and its {len(added)} domain terms added to the vocabulary" if added else ""))
        write_json_atomic(tmp / "dsft_export.json", _provenance(rec, fp, "merged"))
        _publish(tmp, out)
    return ExportResult(rec.ref, "merged", out, sorted(p.name for p in out.iterdir()))


def export_adapter(ref: str, out: str | Path, *, format: str = "peft", **kwargs: Any) -> ExportResult:
    """:func:`export_peft` or :func:`export_merged` by ``format``."""
    if format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    return (export_peft if format == "peft" else export_merged)(ref, out, **kwargs)


def _provenance(rec, fp: dict[str, Any], fmt: str) -> dict[str, Any]:
    m = rec.parsed_manifest()
    return {"exported_from": rec.ref, "format": fmt, "manifest_sha256": rec.manifest_sha256,
            "base_fingerprint": {k: v for k, v in fp.items() if k != "param_shapes"},
            "added_tokens": list(m.added_tokens), "term_start": m.term_start,
            "metrics": copy.deepcopy(m.metrics), "kind": m.kind,
            "target_shapes": dict(m.target_shapes), "base_vocab_size": m.base_vocab_size,  # for re-import
            "base_name": m.base.name if m.base else None, "base_source": m.base.source if m.base else None}


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty (checked): replaced by the finished export
    tmp.rename(out)
    fsync_dir(out.parent)
