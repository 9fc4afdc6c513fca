"""Opening the registry database: engine settings, refusing what is not a registry, migrating.

SQLite (the default) gets WAL, ``foreign_keys=ON`` and a busy timeout on every connection, and its
write transactions start with ``BEGIN IMMEDIATE`` so that the lock is taken up front: two processes
computing "the next version" can then never both read the same latest version. PostgreSQL gets the
same guarantee from a transaction-scoped advisory lock taken as the first statement of every write
transaction. Registry writes are rare and short, so one lock for the whole registry is enough.

Creating or migrating an SQLite registry also takes an OS file lock (``registry.db.lock``): switching a
new file to WAL needs an exclusive lock for which SQLite does not always wait, so processes that open
a registry at the same moment take turns instead of failing with "database is locked".
"""
from __future__ import annotations

import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from dsft.atomic import fsync_dir
from dsft.errors import RegistryError
from dsft.registry.models import SCHEMA_HEAD, TABLES, VERSION_TABLE

log = logging.getLogger("dsft.registry")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
BUSY_TIMEOUT_S = 60
#: Key of the PostgreSQL advisory lock that serialises registry writes (b"dsft" as an integer).
PG_LOCK_KEY = 0x64736674
SQLITE_MAGIC = b"SQLite format 3\x00"
_WRITE = "dsft_write"


def safe_url(url: str | URL) -> str:
    """The URL with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return re.sub(r"://[^@/]*@", "://***@", str(url))


def describe_db_error(err: BaseException) -> str:
    """The first line of a driver error, without SQLAlchemy's boilerplate."""
    orig = getattr(err, "orig", None) or err
    line = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return line[:300]


@contextmanager
def db_errors(url: str | URL, doing: str) -> Iterator[None]:
    """Turn driver errors into one-line RegistryErrors that say what to do."""
    try:
        yield
    except (DBAPIError, sqlite3.OperationalError) as err:
        msg = describe_db_error(err)
        if "locked" in msg or "lock timeout" in msg or "lock_timeout" in msg:
            raise RegistryError(
                f"registry {safe_url(url)} is busy: another dsft process held its write lock for over "
                f"{BUSY_TIMEOUT_S} s while {doing}; try again"
            ) from err
        orig = getattr(err, "orig", err)
        if isinstance(orig, sqlite3.DatabaseError) and not isinstance(orig, sqlite3.OperationalError) \
                or "malformed" in msg or "not a database" in msg:
            raise RegistryError(
                f"registry {safe_url(url)} is damaged ({msg}); it was left untouched: "
                "restore it from a backup or move it away"
            ) from err
        if "connect" in msg.lower() and not isinstance(orig, sqlite3.Error):
            raise RegistryError(f"cannot reach registry {safe_url(url)} ({msg}); check that the server is up, "
                                "or set --registry / DSFT_REGISTRY_URL") from err
        if "unable to open database file" in msg:
            raise RegistryError(f"cannot open registry {safe_url(url)} ({msg}); check that its directory "
                                "exists and is writable, or set --registry / DSFT_REGISTRY_URL") from err
        raise RegistryError(f"registry {safe_url(url)} failed while {doing}: {msg}") from err
    except SQLAlchemyError as err:
        raise RegistryError(f"registry {safe_url(url)} failed while {doing}: {describe_db_error(err)}") from err


def sqlite_path(url: URL) -> Path | None:
    """The file of an SQLite URL, or None for in-memory databases and other backends."""
    if url.get_backend_name() != "sqlite":
        return None
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:") or url.query.get("mode") == "memory":
        return None
    return Path(db).expanduser()


def check_sqlite_file(path: Path) -> None:
    """Refuse, without opening it through SQLite, a file that is not an SQLite database.

    Raises:
        RegistryError: the file exists, is not empty and does not start with the SQLite header.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    if path.is_dir():
        raise RegistryError(f"registry path {path} is a directory; point DSFT_REGISTRY_URL at a file")
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head != SQLITE_MAGIC:
        raise RegistryError(
            f"{path} is not a dsft registry (not an SQLite database); it was left untouched: "
            "move it away or set DSFT_REGISTRY_URL to another location"
        )


def _on_connect_sqlite(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook emit BEGIN itself (pysqlite would defer it to the first write).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def _on_begin_sqlite(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


def _on_begin_postgresql(conn: Connection) -> None:
    if conn.get_execution_options().get(_WRITE):
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{BUSY_TIMEOUT_S}s'")
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_LOCK_KEY})")


def make_engine(url: str | URL) -> Engine:
    """An engine with the registry's connection settings (see the module docstring).

    Raises:
        RegistryError: the URL cannot be parsed or its driver is not installed.
    """
    try:
        u = make_url(url)
    except ArgumentError as err:
        raise RegistryError(f"bad registry URL {safe_url(url)}: {err}; use e.g. sqlite:////path/registry.db") from None
    backend = u.get_backend_name()
    kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        kwargs["connect_args"] = {"timeout": BUSY_TIMEOUT_S}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(u, **kwargs)
    except (NoSuchModuleError, ModuleNotFoundError, ImportError) as err:
        hint = " (pip install 'psycopg[binary]')" if backend == "postgresql" else ""
        raise RegistryError(f"cannot use registry {safe_url(u)}: driver not installed{hint}: {err}") from None
    if backend == "sqlite":
        event.listen(engine, "connect", _on_connect_sqlite)
        event.listen(engine, "begin", _on_begin_sqlite)
    elif backend == "postgresql":
        event.listen(engine, "begin", _on_begin_postgresql)
    return engine


def writer(engine: Engine) -> Engine:
    """The same engine, but its transactions take the registry's write lock when they begin."""
    return engine.execution_options(**{_WRITE: True})


# --- schema state and migrations -------------------------------------------------------------


def _alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def known_revisions() -> tuple[list[str], str]:
    """All revisions this code knows, and the head."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    revs = [s.revision for s in script.walk_revisions()]
    return revs, script.get_current_head() or ""


def _current_revision(conn: Connection) -> str | None:
    rows = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    if len(rows) > 1:
        raise RegistryError(f"registry has several schema versions ({', '.join(rows)}); it was edited by hand "
                            "or by another tool; restore it from a backup")
    return rows[0] if rows else None


def schema_state(conn: Connection, url: URL) -> str | None:
    """The registry's schema revision; None for a database where a registry can be created.

    Raises:
        RegistryError: the database holds other tables (not a registry), or a revision this code
            does not know (written by a newer dsft).
    """
    names = set(inspect(conn).get_table_names())
    if VERSION_TABLE not in names:
        if url.get_backend_name() == "sqlite":
            foreign = sorted(n for n in names if not n.startswith("sqlite_"))
        else:
            foreign = sorted(n for n in names if n in TABLES)
        if foreign:
            raise RegistryError(
                f"{safe_url(url)} is not a dsft registry (it has tables {', '.join(foreign[:5])} but no "
                f"{VERSION_TABLE}); it was left untouched: point DSFT_REGISTRY_URL at a new file or an empty database"
            )
        return None
    rev = _current_revision(conn)
    if rev == SCHEMA_HEAD:  # the common case; spares loading the migration scripts
        return rev
    revs, head = known_revisions()
    if rev is not None and rev not in revs:
        raise RegistryError(
            f"registry {safe_url(url)} has schema {rev}, newer than this dsft understands (up to {head}); "
            "it was left untouched: upgrade dsft (pip install -U dsft)"
        )
    return rev


def _quick_check(conn: Connection, url: URL) -> None:
    result = conn.exec_driver_sql("PRAGMA quick_check").scalars().all()
    if result != ["ok"]:
        raise RegistryError(f"registry {safe_url(url)} is damaged ({'; '.join(map(str, result[:3]))}); "
                            "it was left untouched: restore it from a backup or move it away")


def prepare(engine: Engine) -> str:
    """Check the database behind ``engine`` and bring its schema to head.

    A new database is created; an older schema is migrated inside one write transaction (so a
    concurrent opener waits, then finds it done); anything else is refused before a byte is written.

    Returns:
        The schema revision (head).
    Raises:
        RegistryError: not a registry, damaged, newer schema, or the server is unreachable.
    """
    url = engine.url
    path = sqlite_path(url)
    head = SCHEMA_HEAD
    if path is not None:
        check_sqlite_file(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.stat().st_size == 0:
            return _create_sqlite(engine, path, head)
    with db_errors(url, "opening it"):
        with engine.connect() as conn:
            rev = schema_state(conn, url)
            if path is not None and path.exists() and path.stat().st_size > 0:
                _quick_check(conn, url)
            conn.rollback()
        if rev == head:
            return head
        if path is None:
            return _migrate(engine, head)
        try:
            with FileLock(str(path) + ".lock", timeout=BUSY_TIMEOUT_S):
                return _migrate(engine, head)
        except Timeout:
            raise RegistryError(f"registry {safe_url(url)} is busy: another dsft process has been creating or "
                                f"migrating it for over {BUSY_TIMEOUT_S} s; try again") from None


def _create_sqlite(engine: Engine, path: Path, head: str) -> str:
    """Create a new SQLite registry: built whole in a temp file beside ``path``, then renamed into place,
    under the file lock.

    So a process killed while creating leaves at most a temp file, never a half-made ``registry.db``; and
    a zero-length file where a registry was expected is damage (a truncated registry), refused rather
    than silently taken for a new, empty one.
    """
    url = engine.url
    try:
        with FileLock(str(path) + ".lock", timeout=BUSY_TIMEOUT_S):
            if path.exists() and path.stat().st_size == 0:
                raise RegistryError(
                    f"registry {path} is an empty file (0 bytes): a registry was expected there, so it is damaged or was "
                    "truncated; it was left untouched: restore it from a backup, or delete it to start a new, empty registry")
            created_meanwhile = path.exists()  # by another process, while this one waited for the lock
            if not created_meanwhile:
                _create_sqlite_file(engine, path, head)
    except Timeout:
        raise RegistryError(f"registry {safe_url(url)} is busy: another dsft process has been creating or "
                            f"migrating it for over {BUSY_TIMEOUT_S} s; try again") from None
    return prepare(engine) if created_meanwhile else head


def _create_sqlite_file(engine: Engine, path: Path, head: str) -> None:
    """Build the registry in a temp file beside ``path`` and rename it into place (caller holds the lock)."""
    url = engine.url
    tmp = path.with_name(f".{path.name}.{os.getpid()}.creating")
    tmp.unlink(missing_ok=True)  # left by a killed process that had this pid
    new = make_engine(url.set(database=str(tmp)))
    try:
        with db_errors(url, "creating it"):
            _migrate(new, head)
        new.dispose()  # the last connection closes: the WAL is checkpointed into the file
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        new.dispose()
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)


def _pragma(raw: Any, sql: str) -> Any:
    """Run a PRAGMA on the driver connection, waiting out "database is locked" like the busy timeout would."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.01
    while True:
        try:
            return raw.execute(sql).fetchall()
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 0.5)


def _migrate(engine: Engine, head: str) -> str:
    from alembic import command

    url = engine.url
    sqlite = url.get_backend_name() == "sqlite"
    with engine.connect() as plain:
        # PRAGMAs that must run outside any transaction go to the driver connection directly
        # (with isolation_level=None it sends them as they are, with no implicit BEGIN).
        raw = plain.connection.dbapi_connection if sqlite else None
        if raw is not None and sqlite_path(url) is not None:
            # Persistent; only ever set on a file already known to be ours, or a new one.
            if str(_pragma(raw, "PRAGMA journal_mode")[0][0]).lower() != "wal":
                _pragma(raw, "PRAGMA journal_mode = WAL")
        if raw is not None:
            # Table rebuilds in batch migrations must not cascade deletes (https://sqlite.org/lang_altertable.html).
            _pragma(raw, "PRAGMA foreign_keys = OFF")
        try:
            conn = plain.execution_options(**{_WRITE: True})
            with conn.begin():
                rev = schema_state(conn, url)  # again, under the lock: another process may have done it
                if rev != head:
                    log.info("migrating registry %s from schema %s to %s", safe_url(url), rev or "(new)", head)
                    command.upgrade(_alembic_config(conn), "head")
                    if sqlite:
                        bad = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                        if bad:
                            raise RegistryError(f"migration to {head} left {len(bad)} dangling references; "
                                                "nothing was changed; please report this")
        finally:
            if raw is not None:
                _pragma(raw, "PRAGMA foreign_keys = ON")
    return head
