"""Named queries over a Session. They never commit: the caller owns the transaction."""
from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from dsft.errors import NotFoundError
from dsft.registry.models import AdapterVersion, BaseVersion, Compatibility, Tag
from dsft.registry.refs import Ref
from dsft.registry.versions import Version

_SHOW = 10


def _listing(items: Sequence[str]) -> str:
    items = list(items)
    more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def domains(s: Session) -> list[str]:
    return sorted(s.scalars(select(AdapterVersion.domain).distinct()))


def adapters_of(s: Session, domain: str) -> list[AdapterVersion]:
    """All versions of ``domain``, oldest to newest by SemVer precedence."""
    rows = s.scalars(select(AdapterVersion).where(AdapterVersion.domain == domain)).unique().all()
    return sorted(rows, key=lambda r: Version.parse(r.version))


def all_adapters(s: Session, domain: str | None = None) -> list[AdapterVersion]:
    """Every adapter version (of ``domain`` if given), by domain then version."""
    q = select(AdapterVersion)
    if domain is not None:
        q = q.where(AdapterVersion.domain == domain)
    rows = s.scalars(q).unique().all()
    return sorted(rows, key=lambda r: (r.domain, Version.parse(r.version)))


def get_adapter(s: Session, domain: str, version: str) -> AdapterVersion | None:
    return s.scalars(
        select(AdapterVersion).where(AdapterVersion.domain == domain, AdapterVersion.version == version)
    ).unique().one_or_none()


def get_tag(s: Session, domain: str, tag: str) -> Tag | None:
    return s.get(Tag, (domain, tag))


def tags_of_domain(s: Session, domain: str) -> list[Tag]:
    return list(s.scalars(select(Tag).where(Tag.domain == domain).order_by(Tag.name)))


def resolve(s: Session, ref: Ref) -> AdapterVersion:
    """The adapter row a parsed ref names.

    Raises:
        NotFoundError: naming what exists instead (domains, versions, tags).
    """
    versions = adapters_of(s, ref.domain)
    if not versions:
        known = domains(s)
        hint = (f"registered domains: {_listing(known)}" if known else
                "the registry is empty: train one (dsft train --domain D) or import one "
                "(dsft registry import DIR --domain D)")
        raise NotFoundError(f"no adapter for domain '{ref.domain}'; {hint}")
    if ref.version is None and ref.tag is None:
        return versions[-1]
    if ref.version is not None:
        for row in versions:
            if row.version == ref.version:
                return row
        raise NotFoundError(f"no adapter {ref}; {ref.domain} has versions {_listing([r.version for r in versions])}")
    tag = get_tag(s, ref.domain, ref.tag or "")
    if tag is None:
        tags = [f"{t.name} -> {t.adapter.version}" for t in tags_of_domain(s, ref.domain)]
        has = f"its tags: {_listing(tags)}" if tags else "it has no tags (dsft registry tag REF TAG)"
        raise NotFoundError(f"no tag '{ref.tag}' in domain {ref.domain}; {has}; versions: "
                            f"{_listing([r.version for r in versions])}")
    return tag.adapter


def get_base(s: Session, base_id: str) -> BaseVersion | None:
    return s.get(BaseVersion, base_id)


def all_bases(s: Session) -> list[BaseVersion]:
    return list(s.scalars(select(BaseVersion).order_by(BaseVersion.registered_at, BaseVersion.id)))


def get_compat(s: Session, adapter_id: int, base_id: str) -> Compatibility | None:
    return s.get(Compatibility, (adapter_id, base_id))


def compat_of_adapter(s: Session, adapter_id: int) -> list[Compatibility]:
    return list(s.scalars(select(Compatibility).where(Compatibility.adapter_id == adapter_id)
                          .order_by(Compatibility.checked_at)).unique())


def delete_adapter(s: Session, adapter_id: int) -> None:
    """Delete an adapter row with its tags and compatibility rows (children keep no parent)."""
    s.execute(delete(Tag).where(Tag.adapter_id == adapter_id))
    s.execute(delete(Compatibility).where(Compatibility.adapter_id == adapter_id))
    s.execute(update(AdapterVersion).where(AdapterVersion.parent_id == adapter_id).values(parent_id=None))
    s.execute(delete(AdapterVersion).where(AdapterVersion.id == adapter_id))
