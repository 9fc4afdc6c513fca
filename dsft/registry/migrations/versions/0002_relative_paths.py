"""Adapter paths relative to $DSFT_HOME: ``adapters/<domain>/<version>`` instead of an absolute path.

An absolute path ending in ``adapters/<domain>/<version>`` (of its own row) was written by dsft into the
home it ran with; storing the tail makes a copied or moved home use its own files. Other absolute paths
(adapters kept outside a home) stay as they are. Downgrade makes them absolute under the current home.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""
from __future__ import annotations

import os
from pathlib import Path, PurePath

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_adapters = sa.table("adapters", sa.column("id", sa.Integer), sa.column("domain", sa.String),
                     sa.column("version", sa.String), sa.column("path", sa.Text))


def upgrade() -> None:
    conn = op.get_bind()
    for row in conn.execute(sa.select(_adapters)).all():
        parts = PurePath(row.path).parts
        if os.path.isabs(row.path) and parts[-3:] == ("adapters", row.domain, row.version):
            conn.execute(sa.update(_adapters).where(_adapters.c.id == row.id)
                         .values(path=f"adapters/{row.domain}/{row.version}"))


def downgrade() -> None:
    home = Path(os.environ.get("DSFT_HOME") or Path.home() / ".dsft").expanduser()
    conn = op.get_bind()
    for row in conn.execute(sa.select(_adapters)).all():
        if not os.path.isabs(row.path):
            conn.execute(sa.update(_adapters).where(_adapters.c.id == row.id).values(path=str(home / row.path)))
