"""Opening the store: new, reopened, migrated; refusing garbage, truncation and newer schemas untouched;
SQLite connection settings and the up-front write lock on both backends."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from registry_helpers import fingerprint, register
from sqlalchemy import create_engine, text

from dsft.errors import RegistryError
from dsft.registry import open_registry
from dsft.registry.models import SCHEMA_HEAD, VERSION_TABLE
from dsft.registry.store import known_revisions


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.parent.iterdir()) if p.name.startswith(path.name)}


def test_models_describe_the_migrations_head(registry_url: str) -> None:
    """A database made by the migrations has the models' tables, columns (types, nullability), keys and indexes."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from dsft.registry.models import Model
    from dsft.registry.store import _alembic_config, make_engine

    revs, head = known_revisions()
    assert head == SCHEMA_HEAD and revs[-1] == "0001"
    engine = make_engine(registry_url)
    try:
        with engine.begin() as conn:
            command.upgrade(_alembic_config(conn), head)
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
            diff = [d for d in compare_metadata(context, Model.metadata)
                    if not (d[0] == "remove_table" and d[1].name == VERSION_TABLE)]
    finally:
        engine.dispose()
    assert diff == []


def test_default_location_is_dsft_home(dsft_home: Path) -> None:
    with open_registry() as reg:
        assert reg.list_adapters() == []
    assert (dsft_home / "registry.db").is_file()


def test_reopen_keeps_records(registry_url: str) -> None:
    with open_registry(registry_url) as reg:
        register(reg, "finance", fingerprint())
    with open_registry(registry_url) as reg:
        assert [r.ref for r in reg.list_adapters()] == ["finance@0.1.0"]


def test_older_schema_is_migrated_and_keeps_data(registry_url: str) -> None:
    from alembic import command

    from dsft.registry.store import _alembic_config, make_engine

    revs, head = known_revisions()
    oldest = revs[-1]
    engine = make_engine(registry_url)
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), oldest)
        conn.execute(text("INSERT INTO bases (id, name, source, architecture, fingerprint, registered_at) "
                          "VALUES ('b1', 'old', 'preset:old', 'A', '{\"id\": \"b1\"}', CURRENT_TIMESTAMP)"))
    engine.dispose()
    with open_registry(registry_url) as reg:
        assert [b.name for b in reg.list_bases()] == ["old"]
        with reg.engine.connect() as conn:
            assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == head


def test_newer_schema_is_refused_untouched(registry_url: str, backend: str) -> None:
    with open_registry(registry_url) as reg:
        register(reg, "finance", fingerprint())
        with reg.engine.begin() as conn:
            conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999_from_the_future'"))
    path = Path(registry_url.removeprefix("sqlite:///")) if backend == "sqlite" else None
    before = _snapshot(path) if path else None
    with pytest.raises(RegistryError, match=r"schema 9999_from_the_future, newer than this dsft .*upgrade dsft"):
        open_registry(registry_url)
    if path:
        assert _snapshot(path) == before


@pytest.mark.parametrize("content", [
    b"this is not a database\n" * 100,
    b"",  # a registry is created whole and renamed into place, so an empty one is damage
    bytes(range(256)) * 64,
], ids=["text", "empty", "binary"])
def test_garbage_file(dsft_home: Path, content: bytes) -> None:
    path = dsft_home / "registry.db"
    dsft_home.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    message = r"empty file \(0 bytes\).*left untouched" if not content else \
        r"not a dsft registry \(not an SQLite database\); it was left untouched"
    with pytest.raises(RegistryError, match=message):
        open_registry()
    assert path.read_bytes() == content
    # bases/ and cache/: the session's shared presets and base figures (tests/conftest.py)
    assert [p.name for p in dsft_home.iterdir() if not p.name.endswith(".lock") and p.name not in ("bases", "cache")] \
        == ["registry.db"]


def test_truncated_file_is_refused_untouched(dsft_home: Path) -> None:
    with open_registry() as reg:
        for _ in range(3):
            register(reg, "finance", fingerprint(), metrics={"blob": "x" * 20000})
    path = dsft_home / "registry.db"
    data = path.read_bytes()
    assert len(data) > 3 * 4096
    for cut in (len(data) // 2, 2048, 100):
        path.write_bytes(data[:cut])
        with pytest.raises(RegistryError, match=r"damaged|not a dsft registry|malformed"):
            open_registry()
        assert path.read_bytes() == data[:cut]


def test_other_sqlite_database_is_refused_untouched(dsft_home: Path) -> None:
    path = dsft_home / "registry.db"
    dsft_home.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (body TEXT)")
    con.commit()
    con.close()
    before = path.read_bytes()
    with pytest.raises(RegistryError, match=r"is not a dsft registry \(it has tables notes"):
        open_registry()
    assert path.read_bytes() == before
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_sqlite_connection_settings() -> None:
    with open_registry() as reg, reg.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000


def test_write_transaction_takes_the_lock_up_front(reg, registry_url: str, backend: str) -> None:
    """While one transaction is open (even before it writes), no other writer can start."""
    with reg.transaction():
        if backend == "sqlite":
            other = sqlite3.connect(registry_url.removeprefix("sqlite:///"), timeout=0.1, isolation_level=None)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            assert other.execute("SELECT count(*) FROM adapters").fetchone() == (0,)  # readers are not blocked
            other.close()
        else:
            from dsft.registry.store import PG_LOCK_KEY

            engine = create_engine(registry_url)
            with engine.connect() as conn:
                assert conn.execute(text(f"SELECT pg_try_advisory_xact_lock({PG_LOCK_KEY})")).scalar() is False
            engine.dispose()


def test_unreachable_server_is_a_registry_error() -> None:
    pytest.importorskip("psycopg")
    hidden = r"postgresql\+psycopg://dsft:\*\*\*@127.0.0.1:1/x"
    with pytest.raises(RegistryError, match=rf"cannot reach registry {hidden}.*check that the server is up"):
        open_registry("postgresql+psycopg://dsft:secret@127.0.0.1:1/x?connect_timeout=2")


def test_bad_url() -> None:
    with pytest.raises(RegistryError, match="bad registry URL|driver not installed"):
        open_registry("nosuchdb://x")
