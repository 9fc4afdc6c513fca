"""What the registry hands out: frozen snapshots of rows, safe to use after the session is gone."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dsft.adapter_format import Manifest
from dsft.registry.compat import OK_STATUSES
from dsft.registry.models import AdapterVersion, BaseVersion, Compatibility
from dsft.registry.paths import from_stored


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


@dataclass(frozen=True)
class BaseRecord:
    """A registered base-model version. ``id`` is its fingerprint id."""

    id: str
    name: str
    source: str
    architecture: str
    fingerprint: dict[str, Any]
    registered_at: datetime

    @classmethod
    def from_row(cls, row: BaseVersion) -> BaseRecord:
        return cls(row.id, row.name, row.source, row.architecture, dict(row.fingerprint), row.registered_at)

    def to_json(self) -> dict[str, Any]:
        fp = {k: v for k, v in self.fingerprint.items() if k != "param_shapes"}
        fp["param_shapes"] = len(self.fingerprint.get("param_shapes") or {})
        return {"id": self.id, "name": self.name, "source": self.source, "architecture": self.architecture,
                "fingerprint": fp, "registered_at": _iso(self.registered_at)}


@dataclass(frozen=True)
class AdapterRecord:
    """A registered adapter version (``ref`` is ``domain@version``)."""

    id: int
    domain: str
    version: str
    kind: str
    path: str
    manifest: dict[str, Any]
    manifest_sha256: str
    recipe: dict[str, Any] | None
    metrics: dict[str, Any] | None
    parent: str | None
    base: BaseRecord | None
    created_at: datetime
    tags: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.domain}@{self.version}"

    def parsed_manifest(self) -> Manifest:
        """The recorded manifest, checked (the registry stores it as given; loaders need it whole).

        Raises:
            IntegrityError: a required key is missing or a field has the wrong type (named).
        """
        return Manifest.from_dict(self.manifest, where=f"{self.ref} manifest")

    @classmethod
    def from_row(cls, row: AdapterVersion) -> AdapterRecord:
        return cls(
            id=row.id, domain=row.domain, version=row.version, kind=row.kind, path=from_stored(row.path),
            manifest=dict(row.manifest), manifest_sha256=row.manifest_sha256,
            recipe=dict(row.recipe) if row.recipe is not None else None,
            metrics=dict(row.metrics) if row.metrics is not None else None,
            parent=row.parent.version if row.parent is not None else None,
            base=BaseRecord.from_row(row.base) if row.base is not None else None,
            created_at=row.created_at, tags=tuple(sorted(t.name for t in row.tags)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref, "domain": self.domain, "version": self.version, "kind": self.kind,
            "path": self.path, "manifest_sha256": self.manifest_sha256, "parent": self.parent,
            "base": self.base.to_json() if self.base else None, "created_at": _iso(self.created_at),
            "tags": list(self.tags), "metrics": self.metrics, "recipe": self.recipe, "manifest": self.manifest,
        }


@dataclass(frozen=True)
class CompatRecord:
    """Whether adapter ``ref`` fits base ``base_id``, with every reason (or note) and eval metrics.

    ``stored`` says whether this comes from (or was written to) the registry, or was only computed.
    """

    ref: str
    base_id: str
    base_name: str | None
    status: str
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    checked_at: datetime | None = None
    stored: bool = False

    @property
    def ok(self) -> bool:
        """True for ``verified`` and ``compatible``."""
        return self.status in OK_STATUSES

    @classmethod
    def from_row(cls, row: Compatibility) -> CompatRecord:
        return cls(ref=f"{row.adapter.domain}@{row.adapter.version}", base_id=row.base_id, base_name=row.base.name,
                   status=row.status, reasons=list(row.reasons or []),
                   metrics=dict(row.metrics) if row.metrics is not None else None,
                   checked_at=row.checked_at, stored=True)

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "base_id": self.base_id, "base_name": self.base_name, "status": self.status,
                "ok": self.ok, "reasons": list(self.reasons), "metrics": self.metrics,
                "checked_at": _iso(self.checked_at), "stored": self.stored}


@dataclass(frozen=True)
class TagMove:
    """``domain@tag`` now points at ``version``; ``previous`` is where it pointed before (None: new tag)."""

    domain: str
    tag: str
    version: str
    previous: str | None

    @property
    def ref(self) -> str:
        return f"{self.domain}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "tag": self.tag, "ref": self.ref, "version": self.version,
                "previous": self.previous}
