"""Opening the catalog's database: the engine, how it handles lost connections, and the schema's
migrations (alembic, `indexer/migrations`)."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError

from indexer import path_glob
from indexer.errors import CatalogConnectionError, CatalogUnavailableError, CatalogVersionError

QUERY_CANCELED = "57014"  # PostgreSQL's SQLSTATE for a statement that ran past statement_timeout
SQLITE_STEPS_PER_CHECK = 10_000  # virtual machine steps between looks at the clock: a count stops ms past its limit
# The server's keepalive probes on each connection: idle 60 s, then every 10 s, 6 unanswered: dropped.
# A client lost without a word (a host down, a network cut) otherwise holds its transaction's row locks
# until the server's default probes give up, after more than two hours, and a rerun waits on them.
SERVER_KEEPALIVES = {"tcp_keepalives_idle": 60, "tcp_keepalives_interval": 10, "tcp_keepalives_count": 6}
# And this side's (libpq's): a run or server waiting on an answer that a network cut swallowed would
# otherwise wait as long, then fail; now it gets the one clear error within about two minutes. A URL
# that sets one of these (?keepalives_idle=300) keeps its own.
CLIENT_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 60, "keepalives_interval": 10, "keepalives_count": 6}


def open_engine(url: str) -> Engine:
    """An engine for `url` with the catalog's schema at its newest version; one clear error for a URL
    that is not one, a driver not installed, or a database that cannot be reached or read."""
    try:
        # Pre-ping: a pooled connection the server dropped while idle (a restart, a failover, an
        # idle timeout) is replaced at checkout, so a long-lived server goes on without a 500.
        engine = create_engine(url, future=True, pool_pre_ping=True)
    except ArgumentError:
        raise CatalogUnavailableError(
            "the catalog URL is not a database URL; give e.g. postgresql+psycopg://host/db") from None
    except ImportError as exc:  # a database whose driver is not installed
        raise CatalogUnavailableError(
            f"the catalog URL needs a driver that is not installed ({exc}); blipsearch's catalogs are "
            "SQLite and PostgreSQL (postgresql+psycopg://host/db)") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_connected)
    elif engine.dialect.name == "postgresql":
        if engine.dialect.driver in ("psycopg", "psycopg2"):  # libpq's parameters: pg8000 has none
            event.listen(engine, "do_connect", _client_keepalives)
        event.listen(engine, "connect", _postgres_connected)
    try:
        _migrate(engine)
    except DatabaseError as exc:  # no server there, no such database, refused, not a database file
        engine.dispose()
        reason = " ".join(str(exc.orig or exc).split())
        where = engine.url.render_as_string(hide_password=True)
        raise CatalogUnavailableError(f"cannot open the catalog at {where}: {reason}") from None
    if engine.dialect.name != "sqlite":  # a file has no connection to lose
        event.listen(engine, "handle_error", _connection_lost)
    return engine


def _migrate(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from alembic.runtime.migration import MigrationContext

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    scripts = ScriptDirectory.from_config(config)
    head = scripts.get_current_head()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # several indexers/servers may open a new catalog at once
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(4242000001)")
        current = MigrationContext.configure(conn).get_current_revision()
        if current == head:
            return
        if current is not None and current not in {s.revision for s in scripts.walk_revisions()}:
            raise CatalogVersionError(
                f"the catalog has schema version {current}, newer than this blipsearch knows; upgrade blipsearch"
            )
        config.attributes["connection"] = conn
        try:
            command.upgrade(config, "head")
        except DatabaseError as exc:
            if not _read_only(exc):
                raise
            where = engine.url.render_as_string(hide_password=True)
            raise CatalogVersionError(
                f"the catalog at {where} has schema version {current}, older than this blipsearch's {head}, and "
                "cannot be upgraded where it is read-only; open it once where it can be written (blipsearch "
                "status does), or use the blipsearch that wrote it") from None


def _read_only(exc: DatabaseError) -> bool:
    """A write refused because the database, or this connection to it, is read-only."""
    text = str(exc.orig or exc).lower()
    return "readonly database" in text or "read-only transaction" in text or "read only" in text


def _connection_lost(context) -> None:
    """SQLAlchemy's handle_error hook, once the catalog is open: a connection lost mid-statement, or a
    server that cannot be reached for a new one, becomes one clear error instead of the driver's
    traceback. (A connection lost while idle in the pool is replaced by the pre-ping, unseen.)"""
    connecting = context.connection is None  # no connection yet: a new one could not be made
    if (context.is_disconnect or connecting) and not context.is_pre_ping:
        where = context.engine.url.render_as_string(hide_password=True)
        reason = " ".join(str(context.original_exception).split())[:200]
        raise CatalogConnectionError(f"lost the connection to the catalog at {where} ({reason}); "
                                     "run the same command again once it is back") from None


def _sqlite_connected(dbapi_connection, _record) -> None:
    """Each new SQLite connection: its pragmas, and fnmatch as a SQL function for `path_glob`."""
    dbapi_connection.create_function(path_glob.SQLITE_FUNCTION, 2, path_glob.sqlite_fnmatch, deterministic=True)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _client_keepalives(_dialect, _record, _args, params: dict) -> None:
    for name, value in CLIENT_KEEPALIVES.items():
        params.setdefault(name, value)


def _postgres_connected(dbapi_connection, _record) -> None:
    """Each new PostgreSQL connection: the server's keepalives, as SET (not startup options, which a
    pooler such as PgBouncer refuses), committed so that the pool's rollback on return keeps them."""
    cursor = dbapi_connection.cursor()
    for name, value in SERVER_KEEPALIVES.items():
        cursor.execute(f"SET {name} = {value}")
    cursor.close()
    dbapi_connection.commit()


def scalar_within(conn: Connection, query, seconds: float):
    """`query`'s one value, or None when it would take over `seconds` (then stopped by the database:
    PostgreSQL's statement_timeout, SQLite's progress handler). `conn` ends its transaction here."""
    try:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, round(seconds * 1000))}")
            return conn.execute(query).scalar_one()
        deadline = time.monotonic() + seconds
        sqlite = conn.connection.driver_connection
        sqlite.set_progress_handler(lambda: time.monotonic() > deadline, SQLITE_STEPS_PER_CHECK)
        try:
            return conn.execute(query).scalar_one()
        finally:
            sqlite.set_progress_handler(None, 0)
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) == QUERY_CANCELED or str(exc.orig) == "interrupted":
            return None
        raise
    finally:
        conn.rollback()  # a read: ends SET LOCAL, or the transaction a cancelled statement aborted
