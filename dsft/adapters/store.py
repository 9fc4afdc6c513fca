"""Write an adapter directory and load one onto a base model.

What the directory holds, file by file, and its manifest are described in :mod:`dsft.adapter_format`.
To load it with plain PEFT: resize the base's embeddings to ``term_start + len(added_tokens)``
(when larger than the base), copy the rows of ``terms.safetensors`` to ids ``term_start...``,
add ``added_tokens`` to the tokenizer in order, then ``PeftModel.from_pretrained``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dsft.adapter_format import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    TERMS_FILE,
    Manifest,
    digests,
    read_manifest,
    verify_files,
)
from dsft.adapters.terms import TermPlan, extend_model, load_terms, save_terms
from dsft.atomic import sha256_file, write_json_atomic


def write_weights(directory: Path, peft_model, plan: TermPlan) -> None:
    """Write the PEFT files and the term rows into ``directory`` (a staging directory)."""
    peft_model.save_pretrained(directory, save_embedding_layers=False)
    (directory / "README.md").unlink(missing_ok=True)  # PEFT's empty model card says nothing about the adapter
    if plan.terms:
        save_terms(directory / TERMS_FILE, peft_model.get_base_model(), plan)


def write_manifest(directory: Path, fields: dict[str, Any]) -> tuple[Manifest, str]:
    """Hash every file in ``directory`` (whole and by block) and write the manifest last; returns (manifest, its sha256).

    Raises:
        IntegrityError: ``fields`` do not make a valid manifest (the field is named).
    """
    names = [p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")]
    manifest = Manifest.from_dict({"schema_version": SCHEMA_VERSION, **fields, **digests(directory, names)})
    write_json_atomic(directory / MANIFEST_FILE, manifest.to_dict())
    return manifest, sha256_file(directory / MANIFEST_FILE)


def load_adapter(model, tokenizer, directory: str | Path, *, adapter_name: str = "default", verify: bool = True):
    """Attach the adapter in ``directory`` to ``model`` (a plain transformers model); returns the PeftModel.

    The files are checked against the manifest's sha256 first; term rows extend the tokenizer and
    the embeddings in place. An ESFT adapter (manifest ``kind`` ``esft`` / ``esft+terms``) has no PEFT
    files: its expert slices replace the base's in place and ``model`` itself is returned
    (:func:`dsft.adapters.esft.load_esft`).

    Raises:
        IntegrityError: no manifest, or a file that is missing or changed.
    """
    from peft import PeftModel

    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
    if manifest.is_esft:
        from dsft.adapters.esft import load_esft

        return load_esft(model, tokenizer, directory, manifest)
    if manifest.added_tokens:
        plan = TermPlan(manifest.added_tokens, int(manifest.term_start or 0), ())
        extend_model(model, tokenizer, plan, rows=load_terms(directory / TERMS_FILE))
    return PeftModel.from_pretrained(model, directory, adapter_name=adapter_name, is_trainable=False)
