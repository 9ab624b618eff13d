"""Opening the store: the engine for a URL, SQLite's pragmas, migrations to head."""

from __future__ import annotations

import contextlib
import fcntl
import zlib
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from ftservice.errors import FtserviceError

MIGRATIONS = Path(__file__).parent / "migrations"


class StoreError(FtserviceError):
    """A store that cannot be opened or migrated."""


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, schema: str | None = None) -> Engine:
    """An engine for a store URL; SQLite files get their folder made. `schema` (PostgreSQL):
    the tables live in that schema (tests use one of their own)."""
    try:
        parsed = make_url(url)
    except Exception as e:
        raise StoreError(f"store.url '{url}' is not a database URL ({e})") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("", "psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3 is what we ship
    options = {"options": f"-csearch_path={schema}"} if schema else {}
    return create_engine(parsed, connect_args=options, pool_pre_ping=True)


@contextlib.contextmanager
def _migration_lock(engine: Engine, connection: Connection) -> Iterator[None]:
    """One migrator at a time: processes that open a new store together (the loop's driver
    and its Serve replicas) would otherwise both see it empty and both create its tables.
    SQLite runs DDL outside a transaction, so a lock file beside the database; PostgreSQL
    takes a transaction-scoped advisory lock."""
    database = engine.url.database
    if engine.url.get_backend_name() == "sqlite":
        if not database or database == ":memory:":
            yield
            return
        with open(f"{database}.migrate.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return
    if engine.url.get_backend_name() == "postgresql":
        key = zlib.crc32(f"ftservice-migrate:{database}".encode())
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    yield


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (a no-op when it is there)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as connection, _migration_lock(engine, connection):
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
    except Exception as e:
        raise StoreError(f"cannot migrate the store at {engine.url!r}: {e}") from e


def open_store(url: str, schema: str | None = None) -> sessionmaker[Session]:
    engine = make_engine(url, schema)
    upgrade(engine)
    return sessionmaker(engine, expire_on_commit=False)
