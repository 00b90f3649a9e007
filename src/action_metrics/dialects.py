"""Everything that differs between SQLite and PostgreSQL, behind one small interface.

The rest of the package builds dialect-free SQLAlchemy Core and asks a `Backend` for the few pieces
that differ: the async driver, connect-time settings, `INSERT ... ON CONFLICT`, and percentiles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, ClassVar, Final

from sqlalchemy import (
    URL,
    ColumnElement,
    Double,
    Integer,
    Select,
    Table,
    case,
    event,
    func,
    make_url,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import Insert as PostgresInsert
from sqlalchemy.dialects.sqlite import Insert as SQLiteInsert
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool
from sqlalchemy.sql.selectable import NamedFromClause

DEFAULT_URL: Final = "sqlite:///action_metrics.db"
URL_VARIABLE: Final = "ACTION_METRICS_URL"
SQLITE_BUSY_TIMEOUT_MS: Final = 30_000

WRITE: Final = "action_metrics_write"
"""Connection execution option: this transaction writes (SQLite then takes its write lock up front)."""


class UnsupportedDatabase(ValueError):
    """The URL names a database action-metrics does not run on."""


def resolve_url(url: str | URL | None) -> URL:
    """The URL given, else `$ACTION_METRICS_URL`, else the embedded SQLite default."""
    if url is None:
        url = os.environ.get(URL_VARIABLE) or DEFAULT_URL
    try:
        return make_url(url)
    except Exception as error:  # SQLAlchemy raises ArgumentError with a terse message
        raise UnsupportedDatabase(f"cannot parse database URL {str(url)!r}: {error}") from None


def display_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)


class Backend:
    """The dialect-specific pieces of one database family."""

    name: ClassVar[str]
    async_driver: ClassVar[str]

    def __init__(self, url: URL) -> None:
        self.given_url = url
        """The URL as the user wrote it: what error messages and commands show."""
        self.url = url.set(drivername=f"{self.name}+{self.async_driver}")

    def create_engine(self) -> AsyncEngine:
        engine = create_async_engine(self.url, **self.engine_options())
        self.configure(engine)
        return engine

    def engine_options(self) -> dict[str, Any]:
        return {}

    def configure(self, engine: AsyncEngine) -> None:
        """Hook for connect-time settings."""

    def insert(self, table: Table) -> SQLiteInsert | PostgresInsert:
        """An INSERT that supports `on_conflict_do_nothing()` / `on_conflict_do_update()`."""
        raise NotImplementedError

    def rank_latencies(self, rows: NamedFromClause, keys: Sequence[str]) -> NamedFromClause:
        """Prepare `rows` for `latency_percentile()` over groups of `keys`."""
        return rows

    def latency_percentile(self, ranked: NamedFromClause, fraction: float) -> ColumnElement[float]:
        """The `fraction` percentile of `latency_ms` within each group, interpolated linearly."""
        raise NotImplementedError


def jsonb_text(value: Any) -> str:
    """JSON text for a jsonb column that reads back equal, floats included.

    jsonb keeps numbers as NUMERIC and prints them without an exponent: `1e+23` would come back
    as the integer 10**23, which is not the float 1e23. Written out in full with a `.0`, it comes
    back as that float. Everything else is written as `json.dumps` writes it.
    """
    if isinstance(value, float) and "e+" in (text := repr(value)):
        return f"{Decimal(text):f}.0"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(key)}:{jsonb_text(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(jsonb_text(item) for item in value) + "]"
    return json.dumps(value)


def server_settings(options: str | Sequence[str]) -> dict[str, str]:
    """libpq's `options` URL parameter (`-c name=value` or `--name=value`, space separated) as
    settings for asyncpg, which has no such parameter: `?options=-csearch_path%3Dmetrics` works."""
    words = " ".join([options] if isinstance(options, str) else options).split()
    settings: dict[str, str] = {}
    for position, word in enumerate(words):
        if word == "-c":
            continue
        if position > 0 and words[position - 1] == "-c":
            setting = word
        elif word.startswith(("-c", "--")):
            setting = word[2:]
        else:
            raise UnsupportedDatabase(f"cannot read the URL's options {options!r}: expected -c name=value")
        name, equals, value = setting.partition("=")
        if not equals or not name:
            raise UnsupportedDatabase(f"cannot read the URL's options {options!r}: expected -c name=value")
        settings[name.replace("-", "_")] = value
    return settings


class PostgresBackend(Backend):
    name = "postgresql"
    async_driver = "asyncpg"

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        options = self.url.query.get("options")
        self.server_settings = server_settings(options) if options is not None else {}
        self.url = self.url.difference_update_query(["options"])

    def engine_options(self) -> dict[str, Any]:
        # A pooled connection may have died with a restarted server: test it before use.
        options: dict[str, Any] = {"pool_pre_ping": True, "json_serializer": jsonb_text}
        if self.server_settings:
            options["connect_args"] = {"server_settings": self.server_settings}
        return options

    def insert(self, table: Table) -> PostgresInsert:
        return postgresql.insert(table)

    def latency_percentile(self, ranked: NamedFromClause, fraction: float) -> ColumnElement[float]:
        return func.percentile_cont(fraction).within_group(ranked.c.latency_ms)


class SQLiteBackend(Backend):
    name = "sqlite"
    async_driver = "aiosqlite"

    @property
    def in_memory(self) -> bool:
        return self.url.database in (None, "", ":memory:")

    def engine_options(self) -> dict[str, Any]:
        # An in-memory database lives in one connection: share it, or every checkout sees nothing.
        return {"poolclass": StaticPool} if self.in_memory else {}

    def configure(self, engine: AsyncEngine) -> None:
        in_memory = self.in_memory

        @event.listens_for(engine.sync_engine, "connect")
        def set_pragmas(dbapi_connection: DBAPIConnection, _: ConnectionPoolEntry) -> None:
            # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (see "begin").
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def begin(connection: Any) -> None:
            # A writer takes the lock when it begins, so busy_timeout applies; a deferred
            # transaction that upgrades to a writer later fails at once with "database is locked".
            immediate = connection.get_execution_options().get(WRITE, False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    def insert(self, table: Table) -> SQLiteInsert:
        return sqlite.insert(table)

    def rank_latencies(self, rows: NamedFromClause, keys: Sequence[str]) -> NamedFromClause:
        partition = [rows.c[key] for key in keys]
        return (
            Select(
                rows,
                (func.row_number().over(partition_by=partition, order_by=rows.c.latency_ms) - 1).label(
                    "latency_rank"
                ),
                func.count().over(partition_by=partition).label("latency_count"),
            )
        ).subquery("ranked")

    def latency_percentile(self, ranked: NamedFromClause, fraction: float) -> ColumnElement[float]:
        # PostgreSQL's percentile_cont written out: position (n - 1) * f, then interpolate between
        # the values ranked floor(position) and floor(position) + 1 (0-based). n is the same on
        # every row of a group, so the per-row position is the group's.
        rank, latency = ranked.c.latency_rank, ranked.c.latency_ms
        position = (ranked.c.latency_count - 1) * sql_cast(fraction, Double)
        lower = sql_cast(position, Integer)  # truncation is floor: position >= 0
        low_value = func.max(case((rank == lower, latency)))
        high_value = func.coalesce(func.max(case((rank == lower + 1, latency))), low_value)
        return low_value + func.max(position - lower) * (high_value - low_value)


BACKENDS: Final[dict[str, type[Backend]]] = {
    "sqlite": SQLiteBackend,
    "postgresql": PostgresBackend,
    "postgres": PostgresBackend,
}


def backend_for(url: str | URL | None) -> Backend:
    resolved = resolve_url(url)
    backend = BACKENDS.get(resolved.get_backend_name())
    if backend is None:
        raise UnsupportedDatabase(
            f"action-metrics runs on sqlite:/// and postgresql:// URLs, not {display_url(resolved)!r}"
        )
    return backend(resolved)
