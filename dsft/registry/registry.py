"""The registry service: what the rest of dsft and the CLI call.

    reg = open_registry()                       # $DSFT_REGISTRY_URL or $DSFT_HOME/registry.db
    with reg.transaction() as tx:               # one atomic unit, write lock taken up front
        base = tx.ensure_base(name=..., source=..., fingerprint=fp)
        version = tx.next_adapter_version(domain="finance", base_fingerprint=fp)
        ...                                     # rename the adapter dir into adapters/finance/<version>/
        tx.add_adapter(domain="finance", version=version, ..., base=base)
    reg.resolve("finance@production")
    reg.check("finance", base_fingerprint=fp)   # CompatRecord(status, reasons, metrics)
"""
from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from dsft.adapter_format import MANIFEST_FILE
from dsft.atomic import sha256_file, staging_dir, write_json_atomic
from dsft.errors import RegistryError, UsageError
from dsft.home import adapters_dir, registry_url
from dsft.registry import importer, peft_export, placing
from dsft.registry import repository as repo
from dsft.registry.compat import decide
from dsft.registry.integrity import Finding, check_files, file_findings, orphan_findings
from dsft.registry.records import AdapterRecord, BaseRecord, CompatRecord, TagMove
from dsft.registry.refs import parse_ref, validate_domain, validate_kind, validate_version
from dsft.registry.store import db_errors, make_engine, prepare, safe_url, writer
from dsft.registry.transaction import Transaction, check_fingerprint

log = logging.getLogger("dsft.registry")


@dataclass(frozen=True)
class VerifyReport:
    """What ``Registry.verify`` found: per-file findings and orphans. ``ok`` when nothing is wrong."""

    checked: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "adapters_checked": self.checked, "problems": len(self.problems),
                "findings": [f.to_json() for f in self.findings]}


class Registry:
    """A registry of base versions, adapter versions and their compatibility. Use :func:`open_registry`."""

    def __init__(self, engine: Engine, adapters_root: Path | None = None):
        self.engine = engine
        self.url = safe_url(engine.url)
        self._writer = writer(engine)
        self._root = adapters_root

    @property
    def adapters_root(self) -> Path:
        """Where adapter directories live (``$DSFT_HOME/adapters`` unless given)."""
        return self._root if self._root is not None else adapters_dir()

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- sessions ------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One atomic unit of writes, holding the registry's write lock from the start.

        Commits when the block ends, rolls back (and undoes registered file moves) on any exception.

        Raises:
            RegistryError: the database failed (busy for over a minute, unreachable, damaged).
        """
        with db_errors(self.engine.url, "writing"):
            session = Session(self._writer, expire_on_commit=False, autoflush=True)
            tx = Transaction(session, self.adapters_root)
            try:
                session.connection()  # BEGIN IMMEDIATE / advisory lock: the lock is taken here
                yield tx
                session.commit()
            except BaseException:
                try:
                    session.rollback()
                finally:
                    tx._run_undo()
                raise
            finally:
                session.close()
        tx._run_after()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with db_errors(self.engine.url, "reading"):
            with Session(self.engine, expire_on_commit=False) as session:
                yield session

    # --- reads ---------------------------------------------------------------------------------

    def resolve(self, ref: str, *, verify_files: bool = False, hashed_when_read: Collection[str] = ()) -> AdapterRecord:
        """The adapter a ref names: ``finance`` (latest), ``finance@0.2.0`` or ``finance@production``.

        Args:
            ref: the ref.
            verify_files: also re-hash its files against the manifest (do this before loading).
            hashed_when_read: with ``verify_files``, files only checked to exist here because the loader
                verifies their sha256 while it reads them (one read instead of two).
        Raises:
            UsageError: malformed ref. NotFoundError: nothing by that ref (the message lists what exists).
            IntegrityError: with ``verify_files``, a missing, changed or truncated file (named).
        """
        parsed = parse_ref(ref)
        with self._read() as s:
            rec = AdapterRecord.from_row(repo.resolve(s, parsed))
        if verify_files:
            check_files(rec, hashed_when_read=hashed_when_read)
        return rec

    def list_adapters(self, domain: str | None = None) -> list[AdapterRecord]:
        """Every adapter version (of ``domain``), by domain then version."""
        if domain is not None:
            validate_domain(domain)
        with self._read() as s:
            return [AdapterRecord.from_row(r) for r in repo.all_adapters(s, domain)]

    def list_bases(self) -> list[BaseRecord]:
        """Every registered base version, oldest first."""
        with self._read() as s:
            return [BaseRecord.from_row(r) for r in repo.all_bases(s)]

    def compat_rows(self, ref: str) -> list[CompatRecord]:
        """The stored compatibility rows of one adapter version, one per base version."""
        parsed = parse_ref(ref)
        with self._read() as s:
            row = repo.resolve(s, parsed)
            return [CompatRecord.from_row(c) for c in repo.compat_of_adapter(s, row.id)]

    def check(self, ref: str, *, base_fingerprint: Mapping[str, Any], verify_files: bool = True) -> CompatRecord:
        """Whether adapter ``ref`` fits the base with this fingerprint (computed now; nothing is written).

        ``verified`` when an evaluation on exactly this base was recorded (training or ``record_eval``),
        ``compatible`` when it loads, ``incompatible`` with every reason otherwise. Its files are
        re-hashed first: a verdict is about the adapter that would load, never a tampered copy.

        Args:
            verify_files: False only when the caller has just checked them (``resolve(verify_files=True)``).
        Raises:
            IntegrityError: with ``verify_files``, a missing, changed or truncated file (named).
        """
        fp = check_fingerprint(base_fingerprint)
        parsed = parse_ref(ref)
        if verify_files:  # hashed outside the read transaction; the ref is then pinned to the version hashed
            parsed = parse_ref(self.resolve(ref, verify_files=True).ref)
        with self._read() as s:
            row = repo.resolve(s, parsed)
            base = repo.get_base(s, fp["id"])
            stored = repo.get_compat(s, row.id, fp["id"]) if base is not None else None
            verified = stored is not None and stored.status == "verified"
            d = decide(row.manifest, fp, verified=verified)
            return CompatRecord(ref=f"{row.domain}@{row.version}", base_id=fp["id"],
                                base_name=base.name if base else None, status=d.status, reasons=list(d.reasons),
                                metrics=dict(stored.metrics or {}) if verified and d.ok and stored else None,
                                checked_at=stored.checked_at if stored else None, stored=False)

    # --- writes (each its own transaction) -------------------------------------------------------

    def add_base(self, *, name: str, source: str,
                 fingerprint: Mapping[str, Any]) -> tuple[BaseRecord, list[CompatRecord]]:
        """Register a base version and compute its compatibility with every adapter of its architecture."""
        with self.transaction() as tx:
            return tx.add_base(name=name, source=source, fingerprint=fingerprint)

    def record_eval(self, ref: str, *, base_fingerprint: Mapping[str, Any], metrics: Mapping[str, Any],
                    name: str | None = None, source: str | None = None, merge: bool = False) -> CompatRecord:
        """Mark ``ref`` verified on a base with evaluation metrics (see ``Transaction.record_eval``)."""
        with self.transaction() as tx:
            return tx.record_eval(ref, base_fingerprint=base_fingerprint, metrics=metrics, name=name, source=source,
                                  merge=merge)

    def tag(self, ref: str, tag: str) -> TagMove:
        """Point ``domain@TAG`` at ``ref`` (moved atomically if it pointed elsewhere)."""
        with self.transaction() as tx:
            return tx.tag(ref, tag)

    def untag(self, domain: str, tag: str) -> None:
        """Remove the tag ``domain@TAG``."""
        with self.transaction() as tx:
            tx.untag(domain, tag)

    def remove(self, ref: str, *, force: bool = False) -> tuple[AdapterRecord, Path | None]:
        """Delete an adapter version: its rows and its directory together, or neither.

        Raises:
            UsageError: a tag points at it and ``force`` is false.
        """
        with self.transaction() as tx:
            return tx.remove_adapter(ref, force=force)

    def import_dir(self, src: str | Path, *, domain: str, version: str | None = None, kind: str | None = None,
                   base: tuple[str, str, Mapping[str, Any]] | None = None) -> AdapterRecord:
        """Register an adapter trained elsewhere (a PEFT directory, or one exported by another dsft).

        The directory is copied to ``$DSFT_HOME/adapters/<domain>/<version>/`` with a computed
        ``dsft_adapter.json`` (files' sha256, module shapes from the safetensors header); the source is
        left as it was.

        Args:
            src: the directory ``save_pretrained`` wrote.
            domain: the domain to register it under.
            version: its version (default: the next one for the domain).
            kind: its kind (default: from ``peft_type``, e.g. ``lora``).
            base: ``(name, source, fingerprint)`` of the base it was trained on, when known; it is then
                registered and the adapter checked against it (compatible, not verified: no eval here).
        Raises:
            UsageError: not an adapter directory, bad names, version taken.
            IntegrityError: an exported dsft adapter whose files do not match its manifest.
            IncompatibleError: it does not fit the named base.
        """
        validate_domain(domain)
        if version is not None:
            validate_version(version)
        source = Path(src).expanduser().resolve()
        peft, previous = importer.read_source(source)
        exported = None if previous else peft_export.export_record(source)
        kind = validate_kind(kind or importer.default_kind(peft, previous, exported))
        if base is not None:
            check_fingerprint(base[2])
        importer.check_room(importer.check_tree(source), self.adapters_root)  # a sparse 1 TB file would fill the disk
        with staging_dir(self.adapters_root / domain / "import") as staged:
            _copy_tree(source, staged)
            importer.check_tree(staged)  # the source may have changed since it was checked
            if exported:
                peft_export.restore_terms(staged, exported)
            with self.transaction() as tx:
                base_rec = tx.ensure_base(name=base[0], source=base[1], fingerprint=base[2]) if base else None
                v = version or tx.next_adapter_version(domain=domain, base_fingerprint=base[2] if base else None)
                if repo.get_adapter(tx.session, domain, v) is not None:
                    raise UsageError(f"{domain}@{v} is already registered; leave out --version for the next one")
                manifest = importer.build_manifest(staged, domain=domain, version=v, kind=kind, peft=peft,
                                                   previous=previous, source=str(source), base=base,
                                                   exported=exported)
                write_json_atomic(staged / MANIFEST_FILE, manifest)
                sha = sha256_file(staged / MANIFEST_FILE)
                final = tx.place_dir(staged, domain=domain, version=v)
                return tx.add_adapter(domain=domain, version=v, kind=kind, path=str(final), manifest=manifest,
                                      manifest_sha256=sha, recipe=manifest.get("recipe"),
                                      metrics=manifest.get("metrics") or None, base=base_rec, verified=False)

    # --- integrity -----------------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Re-hash every registered adapter's files and list directories no row explains. Never deletes."""
        records = self.list_adapters()
        findings: list[Finding] = []
        for rec in records:
            findings.extend(file_findings(rec))
        findings.extend(orphan_findings(self.adapters_root, [r.path for r in records]))
        return VerifyReport(checked=len(records), findings=findings)


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` into the existing ``dst`` without its manifest; a link (refused earlier by
    :func:`importer.check_tree`, but one could appear since) is copied as a link, never followed."""
    import shutil

    def ignore(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if n == MANIFEST_FILE and os.path.samefile(_dir, src)}

    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True, ignore=ignore)


def open_registry(url: str | None = None, *, adapters_root: str | Path | None = None) -> Registry:
    """Open (creating or migrating as needed) the registry at ``url``.

    Args:
        url: any SQLAlchemy URL; None means ``DSFT_REGISTRY_URL`` or SQLite at ``$DSFT_HOME/registry.db``.
        adapters_root: where adapter directories live (default ``$DSFT_HOME/adapters``).
    Returns:
        The registry, its schema at head.
    Raises:
        RegistryError: the file or database is not a registry, is damaged, has a newer schema, or
            cannot be reached; it is left untouched.
    """
    engine = make_engine(url or registry_url())
    try:
        prepare(engine)
    except BaseException:
        engine.dispose()
        raise
    reg = Registry(engine, Path(adapters_root) if adapters_root is not None else None)
    if placing.pending(reg.adapters_root):  # a registration was killed between placing its directory and its commit
        try:
            placing.recover(reg)
        except (RegistryError, OSError) as err:  # reads go on; the next open tries again
            log.warning("could not undo an interrupted registration: %s", err)
    return reg
