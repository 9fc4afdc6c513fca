"""The registry's tables as SQLAlchemy 2 typed models.

Schema changes go through a new Alembic revision in ``dsft/registry/migrations/versions/``; these
classes describe the head revision and are what autogenerate compares against.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints let batch migrations on SQLite find and recreate them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Alembic's bookkeeping table; its presence is what marks a database as a dsft registry.
VERSION_TABLE = "dsft_schema_version"
#: The Alembic revision these models describe (the head); bump it with each new migration.
SCHEMA_HEAD = "0002"


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the registry; use datetime.now(timezone.utc)")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Model(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[str]: JSON(),
    }


class BaseVersion(Model):
    """A base-model version, identified by its fingerprint id (a hash of its config, tokenizer and weights)."""

    __tablename__ = "bases"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(Text)
    architecture: Mapped[str] = mapped_column(String(200), index=True)
    model_type: Mapped[str | None] = mapped_column(String(100))
    config_hash: Mapped[str | None] = mapped_column(String(128))
    tokenizer_hash: Mapped[str | None] = mapped_column(String(128))
    weights_hash: Mapped[str | None] = mapped_column(String(128))
    fingerprint: Mapped[dict[str, Any]]
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)


class AdapterVersion(Model):
    """One version of a domain adapter: where its files are and what they hash to."""

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("domain", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    domain: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    manifest: Mapped[dict[str, Any]]
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    recipe: Mapped[dict[str, Any] | None]
    metrics: Mapped[dict[str, Any] | None]
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id", ondelete="SET NULL"))
    base_id: Mapped[str | None] = mapped_column(ForeignKey("bases.id", ondelete="RESTRICT"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    base: Mapped[BaseVersion | None] = relationship(lazy="joined")
    parent: Mapped[AdapterVersion | None] = relationship(remote_side=[id], lazy="joined", join_depth=1)
    tags: Mapped[list[Tag]] = relationship(back_populates="adapter", lazy="selectin", passive_deletes=True)


class Compatibility(Model):
    """What the rules (or an evaluation) said about one adapter version on one base version."""

    __tablename__ = "compat"
    __table_args__ = (CheckConstraint("status IN ('verified', 'compatible', 'incompatible')", name="status"),)

    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    base_id: Mapped[str] = mapped_column(ForeignKey("bases.id", ondelete="CASCADE"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    reasons: Mapped[list[str]]
    metrics: Mapped[dict[str, Any] | None]
    checked_at: Mapped[datetime] = mapped_column(default=utcnow)

    adapter: Mapped[AdapterVersion] = relationship(lazy="joined")
    base: Mapped[BaseVersion] = relationship(lazy="joined")


Index("ix_compat_base_id", Compatibility.base_id)


class Tag(Model):
    """A movable name (``production``) for one version of a domain; one row per (domain, tag)."""

    __tablename__ = "tags"

    domain: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="RESTRICT"), index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    adapter: Mapped[AdapterVersion] = relationship(back_populates="tags")


TABLES = ("bases", "adapters", "compat", "tags")
