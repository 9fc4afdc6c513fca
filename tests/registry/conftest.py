"""Registry test fixtures: every test runs against SQLite, and against PostgreSQL when
``DSFT_TEST_POSTGRES_URL`` is set (``. .ci/postgres.sh`` sets it); each gets a fresh $DSFT_HOME."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsft.registry import Registry, open_registry

PG_ENV = "DSFT_TEST_POSTGRES_URL"
_pg_problem: list[str] = []


@pytest.fixture(autouse=True)
def dsft_home(home: Path) -> Path:
    """Every registry test runs in a fresh $DSFT_HOME (tests/conftest.py's ``home``)."""
    return home


def _pg_admin_engine():
    from sqlalchemy import create_engine

    return create_engine(os.environ[PG_ENV], isolation_level="AUTOCOMMIT")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql":
        if not os.environ.get(PG_ENV):
            pytest.skip(f"PostgreSQL variant: {PG_ENV} is not set (source .ci/postgres.sh to start a server)")
        if not _pg_problem:
            try:
                eng = _pg_admin_engine()
                with eng.connect():
                    pass
                eng.dispose()
                _pg_problem.append("")
            except Exception as err:  # any driver or connection failure: skip, saying why
                _pg_problem.append(f"PostgreSQL at {os.environ[PG_ENV]} unreachable: {str(err).splitlines()[0]}")
        if _pg_problem[0]:
            pytest.skip(_pg_problem[0])
    return request.param


@pytest.fixture
def registry_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A URL for an empty registry: a new SQLite file, or a new schema in the test PostgreSQL database."""
    if backend == "sqlite":
        (tmp_path / "home").mkdir(exist_ok=True)
        yield f"sqlite:///{tmp_path / 'home' / 'registry.db'}"
        return
    from sqlalchemy import text

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin_engine()
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in os.environ[PG_ENV] else "?"
    try:
        yield f"{os.environ[PG_ENV]}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def reg(registry_url: str) -> Iterator[Registry]:
    r = open_registry(registry_url)
    try:
        yield r
    finally:
        r.close()
