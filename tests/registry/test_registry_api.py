"""The registry API as the rest of dsft uses it: register, resolve, check, evaluate, tag, remove."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from registry_helpers import ARCH, Q_PROJ, fingerprint, manifest, register, write_adapter_files

from dsft.errors import IncompatibleError, IntegrityError, NotFoundError, UsageError
from dsft.registry import Registry


def test_training_flow_registers_base_adapter_and_verified_row(reg: Registry, dsft_home: Path) -> None:
    fp = fingerprint()
    rec = register(reg, "finance", fp, metrics={"domain_loss": 1.25})
    assert (rec.domain, rec.version, rec.ref, rec.kind) == ("finance", "0.1.0", "finance@0.1.0", "lora+terms")
    assert rec.path == str(dsft_home / "adapters" / "finance" / "0.1.0")
    assert (Path(rec.path) / "dsft_adapter.json").is_file()
    assert rec.manifest["version"] == "0.1.0" and rec.metrics == {"domain_loss": 1.25} and rec.tags == ()
    assert rec.base is not None and rec.base.id == fp["id"] and rec.base.architecture == ARCH
    assert rec.recipe == {"lr": 0.0001}
    [row] = reg.compat_rows("finance")
    assert (row.status, row.base_id, row.metrics) == ("verified", fp["id"], {"domain_loss": 1.25})
    c = reg.check("finance@0.1.0", base_fingerprint=fp)
    assert (c.status, c.metrics, c.ok) == ("verified", {"domain_loss": 1.25}, True)


def test_metrics_of_a_diverged_run_still_register(reg: Registry) -> None:
    rec = register(reg, "finance", fingerprint(), metrics={"loss": float("nan"), "ppl": float("inf"), "steps": (1, 2)})
    assert reg.resolve(rec.ref).metrics == {"loss": "nan", "ppl": "inf", "steps": [1, 2]}


def test_ensure_base_is_idempotent_on_fingerprint(reg: Registry) -> None:
    fp = fingerprint()
    with reg.transaction() as tx:
        a = tx.ensure_base(name="tiny", source="preset:tiny", fingerprint=fp)
    with reg.transaction() as tx:
        b = tx.ensure_base(name="same-weights-other-name", source="/models/tiny", fingerprint=fp)
    assert a == b and [x.name for x in reg.list_bases()] == ["tiny"]
    with reg.transaction() as tx, pytest.raises(UsageError, match="contradicts"):
        tx.ensure_base(name="x", source="y", architecture="Other", fingerprint=fp)


def test_versions_bump_minor_on_retrain_and_major_on_new_tokenizer_or_architecture(reg: Registry) -> None:
    fp = fingerprint()
    assert register(reg, "finance", fp).version == "0.1.0"
    assert register(reg, "finance", fp, parent="0.1.0").version == "0.2.0"
    assert register(reg, "finance", fingerprint(weights="w2")).version == "0.3.0"
    new_tok = fingerprint(tokenizer="t2")
    assert register(reg, "finance", new_tok).version == "1.0.0"
    assert register(reg, "finance", new_tok).version == "1.1.0"
    assert register(reg, "finance", fingerprint(arch="Qwen3MoeForCausalLM", tokenizer="t2")).version == "2.0.0"
    assert register(reg, "legal", fp).version == "0.1.0"
    assert reg.resolve("finance@0.2.0").parent == "0.1.0"
    assert [r.version for r in reg.list_adapters("finance")] == ["0.1.0", "0.2.0", "0.3.0", "1.0.0", "1.1.0", "2.0.0"]
    assert [r.ref for r in reg.list_adapters()][-1] == "legal@0.1.0"


def test_resolve_latest_version_and_tag(reg: Registry) -> None:
    fp = fingerprint()
    for _ in range(3):
        register(reg, "finance", fp)
    assert reg.resolve("finance").version == "0.3.0"
    assert reg.resolve("finance@latest").version == "0.3.0"
    assert reg.resolve("finance@0.2.0").version == "0.2.0"
    move = reg.tag("finance@0.2.0", "production")
    assert (move.ref, move.previous) == ("finance@0.2.0", None)
    assert reg.resolve("finance@production").version == "0.2.0"
    assert reg.resolve("finance@0.2.0").tags == ("production",)
    move = reg.tag("finance@0.3.0", "production")  # moves, atomically: one row per (domain, tag)
    assert (move.version, move.previous) == ("0.3.0", "0.2.0")
    assert reg.resolve("finance@0.2.0").tags == ()
    assert reg.resolve("finance@production").tags == ("production",)
    reg.untag("finance", "production")
    with pytest.raises(NotFoundError, match="no tag 'production' in domain finance; it has no tags"):
        reg.resolve("finance@production")


def test_not_found_lists_what_exists(reg: Registry) -> None:
    with pytest.raises(NotFoundError, match="the registry is empty"):
        reg.resolve("finance")
    register(reg, "finance", fingerprint())
    register(reg, "finance", fingerprint())
    reg.tag("finance@0.1.0", "staging")
    with pytest.raises(NotFoundError, match=r"no adapter for domain 'legal'; registered domains: finance"):
        reg.resolve("legal")
    with pytest.raises(NotFoundError, match=r"no adapter finance@0.9.0; finance has versions 0.1.0, 0.2.0"):
        reg.resolve("finance@0.9.0")
    with pytest.raises(NotFoundError, match=r"no tag 'production' in domain finance; its tags: staging -> 0.1.0"):
        reg.resolve("finance@production")


def test_check_statuses(reg: Registry) -> None:
    fp = fingerprint()
    register(reg, "finance", fp)
    # same weights, different name: still the same fingerprint, so verified
    assert reg.check("finance", base_fingerprint=dict(fp)).status == "verified"
    # same shapes, different weights: compatible until an eval records metrics
    other = fingerprint(weights="continued-pretraining")
    c = reg.check("finance", base_fingerprint=other)
    assert (c.status, c.metrics, c.base_name) == ("compatible", None, None)
    rec = reg.record_eval("finance", base_fingerprint=other, metrics={"domain_loss": 1.1}, name="tiny-continued")
    assert (rec.status, rec.metrics, rec.base_name) == ("verified", {"domain_loss": 1.1}, "tiny-continued")
    c = reg.check("finance", base_fingerprint=other)
    assert (c.status, c.metrics) == ("verified", {"domain_loss": 1.1})
    # different tokenizer under a term extension: incompatible, with the reason
    c = reg.check("finance", base_fingerprint=fingerprint(tokenizer="t2"))
    assert c.status == "incompatible" and not c.ok and "term extension" in c.reasons[0]
    with pytest.raises(IncompatibleError, match="cannot be verified"):
        reg.record_eval("finance", base_fingerprint=fingerprint(hidden=32), metrics={"x": 1})


def test_add_base_computes_rows_for_every_adapter_of_its_architecture(reg: Registry) -> None:
    fp = fingerprint()
    register(reg, "finance", fp)
    register(reg, "legal", fp, kind="lora", added_tokens=[])
    register(reg, "medical", fingerprint(arch="Qwen3MoeForCausalLM"))
    new = fingerprint(weights="w2", tokenizer="t2")
    base, rows = reg.add_base(name="tiny-v2", source="/models/tiny-v2", fingerprint=new)
    assert base.name == "tiny-v2"
    assert {r.ref: r.status for r in rows} == {"finance@0.1.0": "incompatible", "legal@0.1.0": "compatible"}
    stored = {c.base_name: c.status for c in reg.compat_rows("legal")}
    assert stored == {"tiny": "verified", "tiny-v2": "compatible"}
    # re-adding keeps verified rows verified (with their metrics)
    reg.record_eval("legal", base_fingerprint=new, metrics={"loss": 2.0})
    _, rows = reg.add_base(name="tiny-v2", source="/models/tiny-v2", fingerprint=new)
    assert {r.ref: (r.status, r.metrics) for r in rows}["legal@0.1.0"] == ("verified", {"loss": 2.0})


def test_add_adapter_rejects_inconsistent_input(reg: Registry) -> None:
    fp = fingerprint()
    with reg.transaction() as tx:
        base = tx.ensure_base(name="tiny", source="preset:tiny", fingerprint=fp)
    kw = dict(kind="lora", path="/nowhere", manifest_sha256="0" * 64, base=base)
    with reg.transaction() as tx, pytest.raises(UsageError, match=r"manifest.version is '0.9.0'"):
        tx.add_adapter(domain="finance", version="0.1.0", manifest=manifest("finance", "0.9.0", fp), **kw)
    with reg.transaction() as tx, pytest.raises(IncompatibleError, match=r"does not fit the base it was trained on"):
        bad = manifest("finance", "0.1.0", fp, targets={Q_PROJ: [9, 9]})
        tx.add_adapter(domain="finance", version="0.1.0", manifest=bad, **kw)
    with reg.transaction() as tx, pytest.raises(UsageError, match="bad domain name"):
        tx.add_adapter(domain="../etc", version="0.1.0", manifest={}, **kw)
    with reg.transaction() as tx, pytest.raises(UsageError, match="cannot be stored"):
        tx.add_adapter(domain="finance", version="0.1.0", manifest={"x": object()}, **kw)
    with reg.transaction() as tx:
        tx.add_adapter(domain="finance", version="0.1.0", manifest=manifest("finance", "0.1.0", fp), **kw)
    with reg.transaction() as tx, pytest.raises(UsageError, match="already registered"):
        tx.add_adapter(domain="finance", version="0.1.0", manifest=manifest("finance", "0.1.0", fp), **kw)
    assert [r.ref for r in reg.list_adapters()] == ["finance@0.1.0"]


def test_failed_transaction_leaves_no_row_and_moves_the_directory_back(reg: Registry) -> None:
    fp = fingerprint()
    staged = reg.adapters_root / "finance" / ".staged.partial"
    write_adapter_files(staged)
    with pytest.raises(RuntimeError, match="boom"), reg.transaction() as tx:
        base = tx.ensure_base(name="tiny", source="preset:tiny", fingerprint=fp)
        v = tx.next_adapter_version(domain="finance", base_fingerprint=fp)
        final = tx.place_dir(staged, domain="finance", version=v)
        tx.add_adapter(domain="finance", version=v, kind="lora", path=str(final),
                       manifest=manifest("finance", v, fp), manifest_sha256="0" * 64, base=base)
        raise RuntimeError("boom")
    assert reg.list_adapters() == [] and reg.list_bases() == []
    assert staged.is_dir() and not (reg.adapters_root / "finance" / "0.1.0").exists()


def test_rm_refuses_tagged_then_deletes_rows_and_files_together(reg: Registry) -> None:
    fp = fingerprint()
    a = register(reg, "finance", fp)
    b = register(reg, "finance", fp, parent="0.1.0")
    reg.tag(a.ref, "production")
    with pytest.raises(UsageError, match=r"finance@0.1.0 is tagged production; move the tag first .* or pass --force"):
        reg.remove("finance@0.1.0")
    assert Path(a.path).is_dir()
    rec, deleted = reg.remove("finance@production", force=True)
    assert rec.ref == a.ref and deleted == Path(a.path)
    assert not Path(a.path).exists() and not list(Path(a.path).parent.glob(".*trash*"))
    assert [r.ref for r in reg.list_adapters()] == [b.ref]
    assert reg.resolve(b.ref).parent is None
    rec, deleted = reg.remove(b.ref)
    assert reg.list_adapters() == [] and not Path(b.path).exists()
    assert reg.verify().ok


def test_rm_rolls_back_files_when_the_transaction_fails(reg: Registry) -> None:
    a = register(reg, "finance", fingerprint())
    with pytest.raises(RuntimeError), reg.transaction() as tx:
        tx.remove_adapter(a.ref)
        assert not Path(a.path).exists()
        raise RuntimeError("commit never happens")
    assert Path(a.path).is_dir() and reg.resolve(a.ref) == a
    assert reg.verify().ok


def test_rm_leaves_files_outside_the_adapters_dir(reg: Registry, tmp_path: Path) -> None:
    fp = fingerprint()
    outside = tmp_path / "elsewhere"
    write_adapter_files(outside)
    with reg.transaction() as tx:
        base = tx.ensure_base(name="tiny", source="preset:tiny", fingerprint=fp)
        tx.add_adapter(domain="finance", version="0.1.0", kind="lora", path=str(outside),
                       manifest=manifest("finance", "0.1.0", fp), manifest_sha256="0" * 64, base=base)
    _, deleted = reg.remove("finance")
    assert deleted is None and outside.is_dir()


def test_verify_and_checked_resolve(reg: Registry) -> None:
    a = register(reg, "finance", fingerprint())
    b = register(reg, "legal", fingerprint())
    assert reg.resolve(a.ref, verify_files=True) == a
    report = reg.verify()
    assert report.ok and report.checked == 2 and report.findings == []

    weights = Path(a.path) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])  # truncated
    (Path(b.path) / "terms.safetensors").unlink()
    (Path(b.path) / "notes.txt").write_text("hi")
    orphan = reg.adapters_root / "finance" / "0.7.0"
    orphan.mkdir()
    (reg.adapters_root / "finance" / ".0.8.0.partial").mkdir()

    with pytest.raises(IntegrityError, match=r"adapter finance@0.1.0: .*adapter_model.safetensors: sha256 .* differs"):
        reg.resolve("finance", verify_files=True)
    with pytest.raises(IntegrityError, match=r"terms.safetensors: file is missing"):
        reg.resolve("legal", verify_files=True)
    report = reg.verify()
    kinds = sorted((f.kind, Path(f.path).name) for f in report.findings)
    assert kinds == [("changed", "adapter_model.safetensors"), ("leftover", ".0.8.0.partial"),
                     ("missing", "terms.safetensors"), ("orphan", "0.7.0"), ("unlisted", "notes.txt")]
    assert not report.ok and len(report.problems) == 3
    assert weights.exists() and orphan.exists()  # verify never deletes
    json.dumps(report.to_json())


def test_import_plain_peft_directory(reg: Registry, tmp_path: Path) -> None:
    src = tmp_path / "lora-out"
    write_adapter_files(src)
    (src / "README.md").write_text("trained elsewhere")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    rec = reg.import_dir(src, domain="finance")
    assert (rec.ref, rec.kind, rec.base) == ("finance@0.1.0", "lora", None)
    assert rec.manifest["target_shapes"] == {Q_PROJ: [64, 64]}
    assert set(rec.manifest["files"]) == {"adapter_model.safetensors", "adapter_config.json", "terms.safetensors",
                                          "README.md"}
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the source is copied, not moved
    assert reg.resolve(rec.ref, verify_files=True) == rec and reg.verify().ok
    # judged on module shapes: fits any base whose q_proj is 64x64
    assert reg.check(rec.ref, base_fingerprint=fingerprint(arch="Anything")).status == "compatible"
    assert reg.check(rec.ref, base_fingerprint=fingerprint(hidden=32)).status == "incompatible"
    # with a known base it is checked against it and gets a row (compatible: not evaluated here)
    rec2 = reg.import_dir(src, domain="finance", version="0.5.0", base=("tiny", "preset:tiny", fingerprint()))
    assert rec2.version == "0.5.0" and rec2.base is not None
    assert [(c.status, c.base_name) for c in reg.compat_rows(rec2.ref)] == [("compatible", "tiny")]
    with pytest.raises(IncompatibleError):
        reg.import_dir(src, domain="finance", base=("small", "preset:small", fingerprint(hidden=32)))
    assert [r.version for r in reg.list_adapters()] == ["0.1.0", "0.5.0"]
    assert not [p for p in (reg.adapters_root / "finance").iterdir() if p.name.startswith(".")]


def test_import_records_block_digests_and_recomputes_a_previous_dsft_s(reg: Registry, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import shutil

    import dsft.adapter_format as fmt

    monkeypatch.setattr(fmt, "BLOCK_BYTES", 64)
    src = tmp_path / "lora-out"
    write_adapter_files(src)
    rec = reg.import_dir(src, domain="finance")
    m = rec.parsed_manifest()
    size, blocks = m.blocks("adapter_model.safetensors") or (0, ())
    data = (src / "adapter_model.safetensors").read_bytes()
    assert m.schema_version == 2 and size == 64 and len(blocks) == -(-len(data) // 64) > 1
    assert list(blocks) == [hashlib.sha256(data[i : i + 64]).hexdigest() for i in range(0, len(data), 64)]
    export = tmp_path / "export"  # another dsft's schema 1 manifest, with forged block digests
    shutil.copytree(register(reg, "legal", fingerprint()).path, export)
    old = json.loads((export / "dsft_adapter.json").read_text())
    assert old["schema_version"] == 1
    (export / "dsft_adapter.json").write_text(json.dumps({**old, "schema_version": 2, "file_blocks": {
        "block_bytes": 64, "files": {"adapter_model.safetensors": ["0" * 64]}}}))
    m2 = reg.import_dir(export, domain="legal-copy").parsed_manifest()
    assert m2.schema_version == 2 and m2.blocks("adapter_model.safetensors") != (64, ("0" * 64,))


def test_import_refuses_what_is_not_an_adapter(reg: Registry, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a directory"):
        reg.import_dir(tmp_path / "missing", domain="finance")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a PEFT adapter directory"):
        reg.import_dir(tmp_path / "empty", domain="finance")
    assert reg.list_adapters() == []


def test_import_of_a_dsft_export_checks_its_manifest(reg: Registry, tmp_path: Path) -> None:
    a = register(reg, "finance", fingerprint())
    export = tmp_path / "export"
    import shutil

    shutil.copytree(a.path, export)
    rec = reg.import_dir(export, domain="finance-copy")
    assert rec.manifest["added_tokens"] == a.manifest["added_tokens"]
    assert reg.check(rec.ref, base_fingerprint=fingerprint(tokenizer="t2")).status == "incompatible"
    (export / "terms.safetensors").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="terms.safetensors does not match"):
        reg.import_dir(export, domain="finance-copy")
    manifest = json.loads((export / "dsft_adapter.json").read_text())
    (export / "dsft_adapter.json").write_text(json.dumps({**manifest, "added_tokens": "cdo"}))
    with pytest.raises(IntegrityError, match="dsft_adapter.json: added_tokens: must be a list of strings"):
        reg.import_dir(export, domain="finance-copy")


def test_sql_metacharacters_are_rejected_before_the_database(reg: Registry) -> None:
    register(reg, "finance", fingerprint())
    for ref in ["finance'; DROP TABLE adapters;--", "finance@x' OR '1'='1", "finance@0.1.0;DELETE"]:
        with pytest.raises(UsageError):
            reg.resolve(ref)
    with pytest.raises(UsageError):
        reg.tag("finance", "x'); DROP TABLE tags;--")
    with pytest.raises(UsageError):
        reg.list_adapters("%")
    assert [r.ref for r in reg.list_adapters()] == ["finance@0.1.0"]
    assert os.path.isdir(reg.adapters_root / "finance" / "0.1.0")
