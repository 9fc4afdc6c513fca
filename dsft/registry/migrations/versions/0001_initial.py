"""Initial registry schema: base versions, adapter versions, compatibility rows, tags.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Migrations are frozen: they spell out types instead of importing dsft.registry.models, whose
# classes describe only the newest schema. (UTCDateTime there is DateTime(timezone=True) on disk.)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "bases",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("architecture", sa.String(200), nullable=False),
        sa.Column("model_type", sa.String(100), nullable=True),
        sa.Column("config_hash", sa.String(128), nullable=True),
        sa.Column("tokenizer_hash", sa.String(128), nullable=True),
        sa.Column("weights_hash", sa.String(128), nullable=True),
        sa.Column("fingerprint", sa.JSON(), nullable=False),
        sa.Column("registered_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_bases"),
    )
    op.create_index("ix_bases_architecture", "bases", ["architecture"])

    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("domain", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("recipe", sa.JSON(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("base_id", sa.String(128), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["base_id"], ["bases.id"], name="fk_adapters_base_id_bases", ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["parent_id"], ["adapters.id"], name="fk_adapters_parent_id_adapters",
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_adapters"),
        sa.UniqueConstraint("domain", "version", name="uq_adapters_domain_version"),
    )
    op.create_index("ix_adapters_base_id", "adapters", ["base_id"])
    op.create_index("ix_adapters_domain", "adapters", ["domain"])

    op.create_table(
        "compat",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("base_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("checked_at", TS, nullable=False),
        sa.CheckConstraint("status IN ('verified', 'compatible', 'incompatible')", name="ck_compat_status"),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"], name="fk_compat_adapter_id_adapters",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["base_id"], ["bases.id"], name="fk_compat_base_id_bases", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("adapter_id", "base_id", name="pk_compat"),
    )
    op.create_index("ix_compat_base_id", "compat", ["base_id"])

    op.create_table(
        "tags",
        sa.Column("domain", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"], name="fk_tags_adapter_id_adapters",
                                ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("domain", "name", name="pk_tags"),
    )
    op.create_index("ix_tags_adapter_id", "tags", ["adapter_id"])


def downgrade() -> None:
    for table in ("tags", "compat", "adapters", "bases"):
        op.drop_table(table)
