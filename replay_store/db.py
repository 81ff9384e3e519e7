"""Database engines and schema migrations.

SQLite (the embedded default) runs in WAL mode with synchronous=FULL, so a committed transaction
survives a crash or a power cut; any other SQLAlchemy URL (PostgreSQL) works through the same code.
The schema is owned by alembic from its first version: `migrate()` brings any store to the head.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def create_store_engine(url: str, *, busy_timeout_s: float = 30.0) -> Engine:
    """An engine for `url`; SQLite files get WAL, full fsync on commit, foreign keys and a busy timeout."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":  # a server that does not answer fails a connection in 10 s
        return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    database = parsed.database or ""
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_timeout_s})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.close()

    return engine


def alembic_config(engine: Engine) -> Config:
    """An alembic configuration that runs the package's migrations on `engine`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    config.attributes["engine"] = engine
    return config


class SchemaTooNewError(RuntimeError):
    """The store's schema was migrated by a newer cl-service: this version does not know its revision."""


def check_known_revision(engine: Engine) -> None:
    """Raise SchemaTooNewError when the store's schema revision is not one of this version's migrations."""
    current = current_revision(engine)
    if current is None:
        return
    script = ScriptDirectory.from_config(alembic_config(engine))
    known = {revision.revision for revision in script.walk_revisions()}
    if current not in known:
        raise SchemaTooNewError(
            f"the store's schema is at revision {current!r}, which this version of cl-service does not know "
            f"(its newest is {script.get_current_head()!r}): a newer cl-service migrated it. Run that version, or "
            "restore the backup taken before the upgrade; schemas are not migrated down"
        )


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to `revision` (default: the newest); SchemaTooNewError if a newer version migrated it.

    Processes that start together on one database (several servers, a `migrate` beside them) take turns: the
    first migrates, the others then find the schema current."""
    with _migration_lock(engine):
        check_known_revision(engine)
        command.upgrade(alembic_config(engine), revision)


MIGRATION_LOCK_KEY = 0x636C5F6D6967  # a PostgreSQL advisory lock of this project's migrations ("cl_mig")


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Hold a lock that every process migrating this database takes: PostgreSQL's advisory lock (held by one
    connection for the migration's length), for a SQLite file an exclusive lock on a file beside it."""
    backend = engine.url.get_backend_name()
    database = engine.url.database or ""
    if backend == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
    elif backend == "sqlite" and database and database != ":memory:" and os.name == "posix":
        import fcntl

        with open(f"{database}.migrate-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    else:
        yield


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision(engine: Engine) -> str | None:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


SQLITE_FULL = 13


def is_disk_full(exc: BaseException) -> bool:
    """A database error that means its disk is full: SQLite's SQLITE_FULL, PostgreSQL's disk_full (53100)."""
    original = getattr(exc, "orig", None)
    return getattr(original, "sqlite_errorcode", None) == SQLITE_FULL or getattr(original, "sqlstate", None) == "53100"


def is_unreachable(exc: BaseException) -> bool:
    """True for a database error that says the database cannot be used right now (its server is down or restarting,
    the connection dropped, SQLite's file is locked or cannot be opened): a retry may succeed; not a bug. A full
    disk is not this (both are OperationalErrors): see is_disk_full."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError) and not is_disk_full(exc)


def short_reason(exc: BaseException) -> str:
    """The first line of the driver's own message (without SQLAlchemy's statement and background link)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
