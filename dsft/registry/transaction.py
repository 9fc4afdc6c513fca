"""One atomic unit of registry writes: ``with reg.transaction() as tx: ...``.

The transaction holds the registry's write lock from its first line (see ``store``), so everything
read inside it (the latest version, existing tags) stays true until it commits. File moves that
belong to the unit register an undo with :meth:`Transaction.on_rollback`: rows and files change
together or not at all. A SIGKILL between placing an adapter directory and the commit is undone when a
registry is next opened (:mod:`dsft.registry.placing`).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from dsft.atomic import fsync_dir
from dsft.errors import IncompatibleError, NotFoundError, UsageError
from dsft.registry import placing
from dsft.registry import repository as repo
from dsft.registry.compat import Decision, applies_to, decide, trained_fingerprint
from dsft.registry.models import AdapterVersion, BaseVersion, Compatibility, Tag, utcnow
from dsft.registry.paths import to_stored
from dsft.registry.records import AdapterRecord, BaseRecord, CompatRecord, TagMove
from dsft.registry.refs import (
    VERSION_RE,
    Ref,
    parse_ref,
    validate_domain,
    validate_kind,
    validate_tag,
    validate_version,
)
from dsft.registry.versions import next_version

log = logging.getLogger("dsft.registry")


def _clean(value: Any) -> Any:
    """JSON-storable form: NaN/inf become strings (PostgreSQL's json refuses them; a diverged run's
    loss must still register), tuples/sets become lists, numpy scalars their Python value, paths strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars, without importing them
        try:
            return _clean(value.item())
        except (TypeError, ValueError):
            pass
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _json(value: Any, what: str) -> Any:
    """A JSON-clean deep copy (see ``_clean``), or a UsageError naming ``what``."""
    try:
        return _clean(value)
    except TypeError as err:
        raise UsageError(f"{what} cannot be stored: {err}") from None


def check_fingerprint(fp: Any) -> dict[str, Any]:
    """Validate a base fingerprint dict (needs a string ``id`` and ``architecture``).

    Raises:
        UsageError: naming the missing or bad key.
    """
    if not isinstance(fp, Mapping):
        raise UsageError(f"base fingerprint must be a dict, got {type(fp).__name__}")
    for key in ("id", "architecture"):
        v = fp.get(key)
        if not isinstance(v, str) or not v or len(v) > 128:
            raise UsageError(f"base fingerprint.{key}: must be a non-empty string of at most 128 characters, "
                             f"got {v!r:.60}")
    return _json(dict(fp), "base fingerprint")


def _compat_record(adapter: AdapterVersion, base_id: str, base_name: str | None, d: Decision,
                   metrics: dict[str, Any] | None, stored: bool) -> CompatRecord:
    return CompatRecord(ref=f"{adapter.domain}@{adapter.version}", base_id=base_id, base_name=base_name,
                        status=d.status, reasons=list(d.reasons), metrics=metrics, checked_at=utcnow(), stored=stored)


class Transaction:
    """Registry writes inside one database transaction. Obtain it from ``Registry.transaction()``."""

    def __init__(self, session: Session, adapters_root: Path):
        self.session = session
        self.adapters_root = adapters_root
        self._undo: list[Callable[[], None]] = []
        self._after: list[Callable[[], None]] = []

    # --- hooks ---------------------------------------------------------------------------------

    def on_rollback(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` if this transaction rolls back (last registered runs first)."""
        self._undo.append(fn)

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once this transaction has committed."""
        self._after.append(fn)

    def _run_undo(self) -> None:
        for fn in reversed(self._undo):
            try:
                fn()
            except OSError as err:  # keep undoing the rest; verify will name what is left
                log.warning("could not undo a file move after rollback: %s", err)

    def _run_after(self) -> None:
        for fn in self._after:
            try:
                fn()
            except OSError as err:
                log.warning("post-commit cleanup failed (dsft registry verify will list the leftover): %s", err)

    # --- reads inside the lock -----------------------------------------------------------------

    def _row(self, ref: str | Ref) -> AdapterVersion:
        return repo.resolve(self.session, ref if isinstance(ref, Ref) else parse_ref(ref))

    def resolve(self, ref: str | Ref) -> AdapterRecord:
        """Like ``Registry.resolve``, but sees this transaction's own writes."""
        return AdapterRecord.from_row(self._row(ref))

    # --- bases ---------------------------------------------------------------------------------

    def ensure_base(self, *, name: str, source: str, architecture: str | None = None,
                    fingerprint: Mapping[str, Any]) -> BaseRecord:
        """Register a base-model version, or return the one with the same fingerprint id.

        Args:
            name: how the user calls it (preset name, path or hub id); the first name is kept.
            source: where it came from (``preset:NAME``, a path, or ``hub:ID@REVISION``).
            architecture: must equal ``fingerprint["architecture"]`` when given.
            fingerprint: the dict from ``dsft.base`` (``id``, ``architecture``, hashes, ``param_shapes``...).
        Returns:
            The base's record.
        Raises:
            UsageError: bad fingerprint, or an architecture that contradicts it.
        """
        fp = check_fingerprint(fingerprint)
        if architecture is not None and architecture != fp["architecture"]:
            raise UsageError(f"architecture {architecture!r} contradicts the fingerprint's {fp['architecture']!r}")
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise UsageError(f"base name must be 1-200 characters, got {name!r:.60}")
        row = repo.get_base(self.session, fp["id"])
        if row is None:
            row = BaseVersion(
                id=fp["id"], name=name, source=str(source), architecture=fp["architecture"],
                model_type=fp.get("model_type"), config_hash=fp.get("config_hash"),
                tokenizer_hash=fp.get("tokenizer_hash"), weights_hash=fp.get("weights_hash"),
                fingerprint=fp, registered_at=utcnow(),
            )
            self.session.add(row)
            self.session.flush()
        elif fp.get("param_shapes") and not row.fingerprint.get("param_shapes"):
            row.fingerprint = fp  # a fuller fingerprint of the same base (e.g. first seen in a manifest)
            self.session.flush()
        return BaseRecord.from_row(row)

    def _base_row(self, base: BaseRecord | str | Mapping[str, Any] | None) -> BaseVersion | None:
        if base is None:
            return None
        base_id = base.id if isinstance(base, BaseRecord) else base.get("id") if isinstance(base, Mapping) else base
        row = repo.get_base(self.session, str(base_id))
        if row is None:
            raise NotFoundError(f"base {str(base_id)[:16]} is not registered; call ensure_base first")
        return row

    def add_base(self, *, name: str, source: str,
                 fingerprint: Mapping[str, Any]) -> tuple[BaseRecord, list[CompatRecord]]:
        """Register a base version and (re)compute its row with every adapter of its architecture.

        Adapters whose training architecture is unrecorded (imported) get a row too: shapes decide.
        An existing ``verified`` row stays verified, with its metrics.

        Returns:
            The base and one compatibility record per adapter considered.
        """
        base = self.ensure_base(name=name, source=source, fingerprint=fingerprint)
        row = repo.get_base(self.session, base.id)
        assert row is not None
        out = []
        for adapter in repo.all_adapters(self.session):
            if applies_to(adapter.manifest, base.architecture):
                out.append(self._write_compat(adapter, row, verified_metrics=None))
        return base, out

    # --- adapters ------------------------------------------------------------------------------

    def _taken_dirs(self, domain: str) -> set[str]:
        d = self.adapters_root / domain
        return {p.name for p in d.iterdir() if VERSION_RE.fullmatch(p.name)} if d.is_dir() else set()

    def next_adapter_version(self, *, domain: str, base_fingerprint: Mapping[str, Any] | None) -> str:
        """The version the next adapter of ``domain`` gets (see ``versions.next_version``).

        ``"0.1.0"`` for the first; a minor bump on retrain; a major bump when the latest version's base
        differs in architecture or tokenizer. Versions whose directory already exists under
        ``$DSFT_HOME/adapters/<domain>/`` without a row (left by a killed run) are skipped. The
        version stays reserved for this transaction only: register it before the block ends.
        """
        validate_domain(domain)
        rows = repo.adapters_of(self.session, domain)
        prev = None
        if rows:
            latest = rows[-1]
            prev = latest.base.fingerprint if latest.base is not None else trained_fingerprint(latest.manifest)
        new = dict(base_fingerprint) if base_fingerprint else None
        return next_version([r.version for r in rows], prev, new, taken=self._taken_dirs(domain))

    def place_dir(self, staged: str | Path, *, domain: str, version: str) -> Path:
        """Rename a fully written directory to ``$DSFT_HOME/adapters/<domain>/<version>``; undone on rollback.

        Raises:
            UsageError: the target already exists.
        """
        final = self.adapters_root / validate_domain(domain) / validate_version(version)
        staged = Path(staged)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            raise UsageError(f"{final} already exists but is not registered (see `dsft registry verify`); "
                             "move it away or choose another version")
        intent = placing.record_intent(final)  # a kill before the commit is undone by the next open
        os.rename(staged, final)
        fsync_dir(final.parent)

        def undo() -> None:
            os.rename(final, staged)
            fsync_dir(final.parent)
            intent.unlink(missing_ok=True)

        self.on_rollback(undo)
        self.after_commit(lambda: intent.unlink(missing_ok=True))
        return final

    def add_adapter(self, *, domain: str, version: str, kind: str, path: str | Path, manifest: Mapping[str, Any],
                    manifest_sha256: str, recipe: Mapping[str, Any] | None = None,
                    metrics: Mapping[str, Any] | None = None,
                    base: BaseRecord | str | Mapping[str, Any] | None = None,
                    parent: AdapterRecord | str | None = None, verified: bool = True) -> AdapterRecord:
        """Register an adapter version and its compatibility row with the base it was trained on.

        Args:
            domain, version, kind: e.g. ``"finance"``, ``"0.2.0"``, ``"lora+terms"``.
            path: its directory (normally ``$DSFT_HOME/adapters/<domain>/<version>``).
            manifest: the content of its ``dsft_adapter.json``.
            manifest_sha256: sha256 of the ``dsft_adapter.json`` file.
            recipe, metrics: the resolved recipe and the final metrics (JSON-able dicts).
            base: the base it was trained on (record, fingerprint dict or fingerprint id; registered).
            parent: the version it was trained from (record, version of the same domain, or a ref).
            verified: True (training) writes a ``verified`` row with ``metrics``; False (import) writes
                what the rules say.
        Returns:
            The new record.
        Raises:
            UsageError: bad names, version taken, or a manifest that names another domain/version/base.
            IncompatibleError: the manifest does not fit the base it claims (every reason listed).
        """
        validate_domain(domain)
        validate_version(version)
        validate_kind(kind)
        man = _json(dict(manifest), "manifest")
        for key, want in (("domain", domain), ("version", version)):
            if man.get(key) not in (None, want):
                raise UsageError(f"manifest.{key} is {man[key]!r} but the adapter is registered as {want!r}")
        if not isinstance(manifest_sha256, str) or len(manifest_sha256) != 64:
            raise UsageError(f"manifest_sha256 must be a 64-character hex sha256, got {manifest_sha256!r:.70}")
        if repo.get_adapter(self.session, domain, version) is not None:
            raise UsageError(f"{domain}@{version} is already registered; use tx.next_adapter_version() for a new one")
        base_row = self._base_row(base)
        trained = trained_fingerprint(man)
        if base_row is not None and trained and trained.get("id") not in (None, base_row.id):
            raise UsageError(f"manifest says it was trained on base {str(trained['id'])[:12]} but it is being "
                             f"registered against base {base_row.id[:12]}")
        parent_row = None
        if parent is not None:
            parent_ref = parent.ref if isinstance(parent, AdapterRecord) else parent
            parent_row = self._row(parent_ref if "@" in parent_ref or not VERSION_RE.fullmatch(parent_ref)
                                   else f"{domain}@{parent_ref}")
        if base_row is not None:  # decided before anything is written: a refused adapter leaves no trace
            d = decide(man, base_row.fingerprint, verified=verified)
            if not d.ok:
                raise IncompatibleError(f"{domain}@{version} does not fit the base it was trained on "
                                        f"({base_row.name}): " + "; ".join(d.reasons))
        row = AdapterVersion(
            domain=domain, version=version, kind=kind, path=to_stored(path), manifest=man,
            manifest_sha256=manifest_sha256, recipe=_json(dict(recipe), "recipe") if recipe is not None else None,
            metrics=_json(dict(metrics), "metrics") if metrics is not None else None,
            parent_id=parent_row.id if parent_row else None, base_id=base_row.id if base_row else None,
            created_at=utcnow(),
        )
        self.session.add(row)
        self.session.flush()
        if base_row is not None:
            self._write_compat(row, base_row, verified_metrics=(row.metrics or {}) if verified else None)
        self.session.refresh(row)
        return AdapterRecord.from_row(row)

    def _write_compat(self, adapter: AdapterVersion, base: BaseVersion,
                      verified_metrics: dict[str, Any] | None) -> CompatRecord:
        """Apply the rules and upsert the row. ``verified_metrics`` set: this is an evaluation."""
        existing = repo.get_compat(self.session, adapter.id, base.id)
        was_verified = existing is not None and existing.status == "verified"
        d = decide(adapter.manifest, base.fingerprint, verified=verified_metrics is not None or was_verified)
        metrics = verified_metrics if verified_metrics is not None else (existing.metrics if existing is not None and was_verified else None)
        if d.status != "verified":
            metrics = None
        if existing is None:
            existing = Compatibility(adapter_id=adapter.id, base_id=base.id)
            self.session.add(existing)
        existing.status, existing.reasons, existing.metrics = d.status, list(d.reasons), metrics
        existing.checked_at = utcnow()
        self.session.flush()
        return _compat_record(adapter, base.id, base.name, d, metrics, stored=True)

    def record_eval(self, ref: str, *, base_fingerprint: Mapping[str, Any], metrics: Mapping[str, Any],
                    name: str | None = None, source: str | None = None, merge: bool = False) -> CompatRecord:
        """Mark ``ref`` verified on a base with the metrics of an evaluation there.

        The base is registered first if needed (``name``/``source`` default to its fingerprint id).
        ``merge``: keep the metrics already verified there, updated with these (a second kind of
        evaluation, e.g. lm-eval tasks beside the held-out losses); otherwise they are replaced.

        Raises:
            IncompatibleError: the rules say the adapter cannot load on that base.
        """
        fp = check_fingerprint(base_fingerprint)
        adapter = self._row(ref)
        metrics = _json(dict(metrics), "metrics")
        known = repo.get_base(self.session, fp["id"])
        d = decide(adapter.manifest, known.fingerprint if known else fp, verified=True)
        if not d.ok:
            raise IncompatibleError(f"{adapter.domain}@{adapter.version} cannot be verified on "
                                    f"{known.name if known else name or fp['id'][:12]}: " + "; ".join(d.reasons))
        base = self.ensure_base(name=name or f"base-{fp['id'][:12]}", source=source or "unknown", fingerprint=fp)
        row = repo.get_base(self.session, base.id)
        assert row is not None
        existing = repo.get_compat(self.session, adapter.id, row.id) if merge else None
        if existing is not None and existing.status == "verified" and existing.metrics:
            metrics = {**existing.metrics, **metrics}
        return self._write_compat(adapter, row, verified_metrics=dict(metrics))

    # --- tags ----------------------------------------------------------------------------------

    def tag(self, ref: str, tag: str) -> TagMove:
        """Point ``domain@TAG`` at the version ``ref`` names, moving it if it pointed elsewhere.

        Raises:
            UsageError: bad or reserved tag name. NotFoundError: no such adapter.
        """
        validate_tag(tag)
        adapter = self._row(ref)
        row = repo.get_tag(self.session, adapter.domain, tag)
        previous = row.adapter.version if row is not None else None
        if row is None:
            self.session.add(Tag(domain=adapter.domain, name=tag, adapter_id=adapter.id, updated_at=utcnow()))
        else:
            row.adapter_id, row.updated_at = adapter.id, utcnow()
        self.session.flush()
        return TagMove(adapter.domain, tag, adapter.version, previous)

    def untag(self, domain: str, tag: str) -> None:
        """Remove ``domain@TAG``.

        Raises:
            NotFoundError: no such tag.
        """
        row = repo.get_tag(self.session, validate_domain(domain), validate_tag(tag))
        if row is None:
            raise NotFoundError(f"no tag '{tag}' in domain {domain}")
        self.session.delete(row)
        self.session.flush()

    # --- removal -------------------------------------------------------------------------------

    def remove_adapter(self, ref: str, *, force: bool = False) -> tuple[AdapterRecord, Path | None]:
        """Delete an adapter's rows now and its directory when the transaction commits.

        The directory (only if it lies under ``$DSFT_HOME/adapters``) is renamed to a hidden trash
        name at once (renamed back on rollback) and deleted after the commit.

        Returns:
            The removed record, and the directory that will be deleted (None when there is none).
        Raises:
            UsageError: a tag points at it and ``force`` is false.
        """
        row = self._row(ref)
        rec = AdapterRecord.from_row(row)
        if rec.tags and not force:
            raise UsageError(f"{rec.ref} is tagged {', '.join(rec.tags)}; move the tag first "
                             f"(dsft registry tag {rec.domain}@VERSION TAG) or pass --force")
        path = Path(rec.path)
        root = os.path.realpath(self.adapters_root)
        inside = os.path.realpath(path).startswith(root + os.sep)
        doomed = None
        if inside and path.is_dir():
            trash = path.with_name(f".{path.name}.{os.getpid()}-trash-{uuid.uuid4().hex[:8]}")  # pid: for registry gc
            os.rename(path, trash)
            fsync_dir(path.parent)  # a power cut after the commit must not bring the removed version back
            self.on_rollback(lambda: os.rename(trash, path))
            self.after_commit(lambda: shutil.rmtree(trash))
            doomed = path
        repo.delete_adapter(self.session, row.id)
        self.session.flush()
        self.session.expunge(row)
        return rec, doomed
