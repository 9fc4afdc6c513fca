"""Alembic environment for the registry schema.

dsft runs migrations itself (``dsft.registry.store.prepare``), passing an open connection that
already holds the registry's write lock. To write a new revision during development::

    alembic -c dsft/registry/alembic.ini revision --autogenerate -m "what changes"

(with ``DSFT_REGISTRY_URL`` pointing at a registry at the current head).
"""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from dsft.home import registry_url
from dsft.registry.models import VERSION_TABLE, Model

config = context.config


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=Model.metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
        **kwargs,
    )


def run_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or registry_url()
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url") or registry_url())
        with engine.begin() as connection:
            _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
            context.run_migrations()
        return
    # The caller's transaction is the unit: begin_transaction() joins it rather than committing.
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
