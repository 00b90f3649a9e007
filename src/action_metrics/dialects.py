"""Everything that differs between SQLite and PostgreSQL, behind one small interface.

The rest of the package builds dialect-free SQLAlchemy Core and asks a `Backend` for the few pieces
that differ: the async driver, connect-time settings, whether a new database is migrated on first
use, `INSERT ... ON CONFLICT`, percentiles, the start of a timestamp's hour or day, its seconds since
the epoch, GREATEST, a subquery computed once, a read snapshot, and the bulk insert of metrics through
the driver's fastest path.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path
from typing import Any, ClassVar, Final
from urllib.parse import urlencode

from sqlalchemy import (
    URL,
    BigInteger,
    Column,
    ColumnElement,
    Double,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    case,
    column,
    event,
    func,
    literal,
    make_url,
    or_,
    select,
    type_coerce,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import Insert as PostgresInsert
from sqlalchemy.dialects.sqlite import Insert as SQLiteInsert
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool
from sqlalchemy.schema import CreateTable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import ReturnTypeFromArgs
from sqlalchemy.sql.selectable import NamedFromClause
from sqlalchemy.types import TypeEngine

from action_metrics.errors import UnsupportedDatabase
from action_metrics.model import ActionMetric
from action_metrics.schema import UTCDateTime, action_metrics
from action_metrics.validation import json_text

DEFAULT_URL: Final = "sqlite:///action_metrics.db"
URL_VARIABLE: Final = "ACTION_METRICS_URL"
SQLITE_BUSY_TIMEOUT_MS: Final = 30_000
SQLITE_CACHE_KIB: Final = 32 * 1024
SQLITE_WAL_PAGES_BEFORE_CHECKPOINT: Final = 10_000
"""A batch of a few thousand metrics dirties a page of most indexes per metric (ids from response
ids, users and citizens are spread through theirs). SQLite's defaults (a 2 MiB cache; a checkpoint
once the WAL holds 1,000 pages, ~4 MiB) read those pages back from the file and copy them into it at
nearly every commit. A 32 MiB cache keeps them, and a WAL of up to ~40 MiB (10,000 pages of 4 KiB)
lets a checkpoint copy a page that many commits dirtied once (bench/wire.py: README, "Ingest speed")."""

WRITE: Final = "action_metrics_write"
"""Connection execution option: this transaction writes (SQLite then takes its write lock up front)."""
LOCK_WAIT: Final = "action_metrics_lock_wait_ms"
"""Connection execution option, with `WRITE`: wait at most this many milliseconds for the write lock
(`Backend.bound_lock_wait`), for a write worth doing only if it need not wait (closed buckets)."""


def resolve_url(url: str | URL | None) -> URL:
    """The URL given, else `$ACTION_METRICS_URL`, else the embedded SQLite default."""
    if url is None:
        url = os.environ.get(URL_VARIABLE) or DEFAULT_URL
    try:
        return make_url(url)
    except Exception as error:  # SQLAlchemy raises ArgumentError with a terse message
        raise UnsupportedDatabase(f"cannot parse database URL {str(url)!r}: {error}") from None


SECRET_PARAMETERS: Final = ("password", "sslpassword")
"""URL parameters whose values `display_url` hides, as it hides the password."""


def display_url(url: URL) -> str:
    """The URL to show in messages and logs: the password, and any secret parameter, as ***."""
    hidden = {name: "HIDDEN" for name in SECRET_PARAMETERS if name in url.query}
    shown = url.update_query_dict(hidden).render_as_string(hide_password=True)
    for name in hidden:  # *** itself would be rendered percent-encoded
        shown = shown.replace(f"{name}=HIDDEN", f"{name}=***")
    return shown


class Backend:
    """The dialect-specific pieces of one database family."""

    name: ClassVar[str]
    async_driver: ClassVar[str]
    migrates_on_first_use: ClassVar[bool]
    """Whether a store creates the schema in a brand-new, empty database (an embedded file), or
    leaves every schema change to an operator (a server)."""
    union_of_ranges: ClassVar[bool] = False
    """Whether rows in many time ranges are read as a UNION ALL of a statement per range
    (`rollup.rows_in_ranges`) rather than one statement with an OR of the ranges."""

    def __init__(self, url: URL) -> None:
        self.given_url = url
        """The URL as the user wrote it: what error messages and commands show."""
        self.url = url.set(drivername=f"{self.name}+{self.async_driver}")

    def create_engine(self) -> AsyncEngine:
        # JSON is written as ActionMetric.metadata_json has it, so the bulk path can store that text.
        engine = create_async_engine(self.url, json_serializer=json_text, **self.engine_options())
        self.configure(engine)
        return engine

    def engine_options(self) -> dict[str, Any]:
        return {}

    def configure(self, engine: AsyncEngine) -> None:
        """Hook for connect-time settings."""

    def insert(self, table: Table) -> SQLiteInsert | PostgresInsert:
        """An INSERT that supports `on_conflict_do_nothing()` / `on_conflict_do_update()`."""
        raise NotImplementedError

    def bucket_start(self, timestamp: ColumnElement[Any], grain: str) -> ColumnElement[Any]:
        """The start of the UTC `grain` ('hour', 'day' or 'month') that holds `timestamp`."""
        raise NotImplementedError

    def greatest(self, first: ColumnElement[Any], *others: ColumnElement[Any]) -> ColumnElement[Any]:
        """The largest of the values, ignoring NULLs among `others` (`first` is never NULL)."""
        raise NotImplementedError

    def epoch_seconds(self, timestamp: ColumnElement[Any]) -> ColumnElement[int]:
        """The whole seconds from 1970-01-01 UTC to `timestamp`, as an integer."""
        raise NotImplementedError

    async def refresh_statistics(self, connection: AsyncConnection, *tables: Table) -> None:
        """Let the planner know a small table changed (the price tables are far below autovacuum's
        thresholds, and their estimates decide the join plans)."""

    async def bound_lock_wait(self, connection: AsyncConnection, milliseconds: int) -> None:
        """In a transaction just begun with `LOCK_WAIT`: make waiting longer for a lock an error (SQLite
        has done it at BEGIN)."""

    def computed_once(self, rows: Select[Any], name: str) -> NamedFromClause:
        """`rows` as a source that a join reads without running it again for every row it meets."""
        return rows.subquery(name)

    def rows_table(
        self, name: str, columns: Sequence[tuple[str, TypeEngine[Any]]], rows: Sequence[Sequence[Any]]
    ) -> NamedFromClause:
        """`rows` as a table named `name` with `columns`, passed as one JSON parameter: the statement
        stays the same whatever the rows (SQLAlchemy's compiled cache keeps it; a VALUES list of
        2,000 bound values cost ~70 ms to build and compile on every call), and timestamps compare
        equal to stored ones. Values are JSON numbers or text; datetimes must be aware."""
        raise NotImplementedError

    def int_list(self, values: ColumnElement[Any]) -> ColumnElement[Any]:
        """An aggregate: a group's integers as one value, which `ints_of` reads back in order."""
        raise NotImplementedError

    def ints_of(self, value: Any) -> list[int]:
        raise NotImplementedError

    def _json_rows(self, rows: Sequence[Sequence[Any]]) -> str:
        return json.dumps([[self._json_value(value) for value in row] for row in rows], separators=(",", ":"))

    def _json_value(self, value: Any) -> Any:
        return value.astimezone(UTC).isoformat() if isinstance(value, datetime) else value

    snapshot_options: ClassVar[dict[str, Any]] = {}
    """Connection options under which every statement of a transaction reads the same snapshot."""

    def rank_latencies(
        self, rows: NamedFromClause, keys: Sequence[str], fractions: Sequence[float]
    ) -> NamedFromClause:
        """Prepare `rows` for `latency_percentile()` of these `fractions` over groups of `keys`."""
        return rows

    def latency_percentile(self, ranked: NamedFromClause, fraction: float) -> ColumnElement[float]:
        """The `fraction` percentile of `latency_ms` within each group, interpolated linearly."""
        raise NotImplementedError

    ranks_in_one_pass: ClassVar[bool] = False
    """Whether exact percentiles overall and per model are best ranked in one pass over the rows
    (two window sorts, the rows at the wanted ranks kept once) rather than one statement each."""

    covering_filters: ClassVar[frozenset[str]] = frozenset()
    """The filters whose index on (filter, timestamp) carries every column a read of raw rows
    takes (`INCLUDE` on PostgreSQL since migration 0008; SQLite's town index since 0011)."""

    sums_per_model_search: ClassVar[bool] = False
    """Whether raw rows without a filter are best summed by one search of the (model, timestamp)
    index per stored model and price period, each without a GROUP BY, rather than by one GROUP BY
    per period: a database without hash aggregation sorts every row for the GROUP BY."""

    bulk_insert_minimum: ClassVar[int]
    """The smallest batch for which `bulk_insert_metrics` beats a plain `INSERT ... ON CONFLICT`."""

    async def bulk_insert_metrics(self, connection: AsyncConnection, metrics: Sequence[ActionMetric]) -> int:
        """Insert into action_metrics through the driver, skipping stored ids, within the connection's
        open transaction; the number of rows inserted. Stores exactly what the plain SQLAlchemy
        insert stores."""
        raise NotImplementedError

    async def bulk_insert_groups(
        self, connection: AsyncConnection, groups: Sequence[Sequence[ActionMetric]]
    ) -> list[int]:
        """`bulk_insert_metrics` of several groups whose ids are disjoint, in the connection's open
        transaction; the rows inserted from each group."""
        return [await self.bulk_insert_metrics(connection, group) for group in groups]


# --- bulk insert of metrics ------------------------------------------------------------------

METRIC_COLUMNS: Final = tuple(column.name for column in action_metrics.columns)
"""The columns of action_metrics in table order: the order of every driver row below."""

_ATTRIBUTE_OF_COLUMN: Final = {"metadata": "metadata_json"}  # the JSON text made once at validation
_METRIC_ATTRIBUTES: Final = tuple(_ATTRIBUTE_OF_COLUMN.get(name, name) for name in METRIC_COLUMNS)
_metric_values = attrgetter(*_METRIC_ATTRIBUTES)
assert METRIC_COLUMNS[:2] == ("id", "timestamp"), "SQLite rows convert these two, then take the rest as is"
_metric_values_after_timestamp = attrgetter(*_METRIC_ATTRIBUTES[2:])


async def _driver_connection(connection: AsyncConnection) -> Any:
    """The driver's own connection under SQLAlchemy's (asyncpg's, or aiosqlite's): no second pool."""
    pooled = await connection.get_raw_connection()
    driver = pooled.driver_connection
    assert driver is not None, "a checked-out connection always has its driver connection"
    return driver


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


SSL_MODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
"""libpq's `sslmode` values, which asyncpg's `ssl` argument takes as they are."""
SSL_FILES: Final = ("sslrootcert", "sslcert", "sslkey", "sslcrl")
_SSL_CONNECTION_STRING: Final = (*SSL_FILES, "sslpassword")
"""libpq parameters asyncpg reads only from a connection string, not as keyword arguments."""
_TRANSLATED: Final = (
    "sslmode",
    "ssl",
    "connect_timeout",
    "application_name",
    "options",
    *_SSL_CONNECTION_STRING,
)
_PASSED_AS_GIVEN: Final = (
    "host",
    "port",
    "target_session_attrs",
    "passfile",
    "krbsrvname",
    "gsslib",
    "prepared_statement_cache_size",
)
"""Parameters SQLAlchemy's asyncpg dialect hands over as they are, which it or asyncpg reads with
libpq's meaning (`prepared_statement_cache_size`: SQLAlchemy's own)."""
POSTGRES_URL_PARAMETERS: Final = (*_TRANSLATED, *_PASSED_AS_GIVEN)


def asyncpg_connect_args(url: URL) -> tuple[URL, dict[str, Any]]:
    """A PostgreSQL URL's libpq parameters as asyncpg.connect() arguments, and the URL without them.

    SQLAlchemy passes every URL parameter to asyncpg.connect() as a keyword argument of the same
    name, and asyncpg has few of libpq's (`?sslmode=require` was a TypeError at the first
    connection). Any parameter neither translated nor asyncpg's own is refused here, before a
    connection is tried."""
    where = display_url(url)
    unknown = [name for name in url.query if name not in POSTGRES_URL_PARAMETERS]
    if unknown:
        raise UnsupportedDatabase(
            f"{where}: action-metrics does not know the URL parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)}; remove {'them' if len(unknown) > 1 else 'it'}, or use one of "
            f"{', '.join(POSTGRES_URL_PARAMETERS)}"
        )
    given = {name: value if isinstance(value, str) else value[-1] for name, value in url.query.items()}

    # JIT compiles plans whose cost estimate is large, which the range joins on the price
    # periods make of even a small selection: measured, the compile took 0.9 s of a 0.92 s
    # aggregate of 4,000 actions. `?options=-cjit%3Don` turns it back on.
    settings = {"jit": "off"}
    if "options" in url.query:
        settings.update(server_settings(url.query["options"]))
    if "application_name" in given:
        settings["application_name"] = given["application_name"]
    connect_args: dict[str, Any] = {"server_settings": settings}

    modes = {name: given[name] for name in ("sslmode", "ssl") if name in given}
    for name, mode in modes.items():
        if mode not in SSL_MODES:
            raise UnsupportedDatabase(f"{where}: {name} {mode!r} is not one of {', '.join(SSL_MODES)}")
    if len(set(modes.values())) > 1:
        raise UnsupportedDatabase(f"{where}: sslmode and ssl differ: give one")
    if modes:
        connect_args["ssl"] = next(iter(modes.values()))

    if "connect_timeout" in given:
        try:
            seconds = int(given["connect_timeout"])
        except ValueError:
            raise UnsupportedDatabase(
                f"{where}: connect_timeout is whole seconds (0: no limit), not {given['connect_timeout']!r}"
            ) from None
        connect_args["timeout"] = float(seconds) if seconds > 0 else None  # libpq: 0 or less waits forever

    for file_parameter in SSL_FILES:
        if file_parameter in given and not Path(given[file_parameter]).is_file():
            raise UnsupportedDatabase(
                f"{where}: {file_parameter} names no file here, {given[file_parameter]!r}"
            )
    ssl_parameters: dict[str, str] = {name: given[name] for name in _SSL_CONNECTION_STRING if name in given}
    if ssl_parameters:
        # asyncpg's keyword arguments (host, user, ...) override the connection string's.
        connect_args["dsn"] = f"postgresql://?{urlencode(ssl_parameters)}"
    return url.difference_update_query(_TRANSLATED), connect_args


class PostgresBackend(Backend):
    name = "postgresql"
    async_driver = "asyncpg"
    migrates_on_first_use = False  # schema changes on a server are an operator's decision
    # An OR of ranges, each with the same filter, is planned as a BitmapOr of the ranges ANDed with
    # a bitmap of the whole filter (PostgreSQL pulls the terms common to the branches out of the
    # OR), then a visit of every table page: a town's 90 edge hours at 10M actions, 140 ms. A branch
    # per range reads each from the covering index alone: 12 ms, and 5 ms to plan.
    union_of_ranges = True
    covering_filters = frozenset({"town_id", "user_id", "citizen_id"})

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        without_them, self.connect_args = asyncpg_connect_args(url)  # its messages show the URL as given
        self.url = without_them.set(drivername=self.url.drivername)

    def engine_options(self) -> dict[str, Any]:
        # A pooled connection may have died with a restarted server: test it before use.
        return {"pool_pre_ping": True, "connect_args": self.connect_args}

    def insert(self, table: Table) -> PostgresInsert:
        return postgresql.insert(table)

    def latency_percentile(self, ranked: NamedFromClause, fraction: float) -> ColumnElement[float]:
        return func.percentile_cont(fraction).within_group(ranked.c.latency_ms)

    def bucket_start(self, timestamp: ColumnElement[Any], grain: str) -> ColumnElement[Any]:
        # The three-argument date_trunc truncates in the zone given, not the session's TimeZone.
        return type_coerce(func.date_trunc(grain, timestamp, "UTC"), UTCDateTime())

    def greatest(self, first: ColumnElement[Any], *others: ColumnElement[Any]) -> ColumnElement[Any]:
        return type_coerce(func.greatest(first, *others), first.type)

    def epoch_seconds(self, timestamp: ColumnElement[Any]) -> ColumnElement[int]:
        return sql_cast(func.floor(func.extract("epoch", timestamp)), BigInteger)

    def computed_once(self, rows: Select[Any], name: str) -> NamedFromClause:
        # A group's estimate is one row until ANALYZE has seen the rollups: the planner would then
        # rerun a grouped subquery once per row of the other side of a nested loop.
        return rows.cte(name).prefix_with("MATERIALIZED")

    def int_list(self, values: ColumnElement[Any]) -> ColumnElement[Any]:
        return func.array_agg(values, type_=postgresql.ARRAY(BigInteger()))

    def ints_of(self, value: Any) -> list[int]:
        return list(value)

    def rows_table(
        self, name: str, columns: Sequence[tuple[str, TypeEngine[Any]]], rows: Sequence[Sequence[Any]]
    ) -> NamedFromClause:
        # json_to_recordset takes objects: each row's values by its columns' names.
        names = [column_name for column_name, _ in columns]
        document = json.dumps(
            [dict(zip(names, (self._json_value(value) for value in row), strict=True)) for row in rows],
            separators=(",", ":"),
        )
        rows_json = sql_cast(literal(document, String()), postgresql.JSON())
        return (
            func.json_to_recordset(rows_json)
            .table_valued(*(column(column_name, type_) for column_name, type_ in columns))
            .render_derived(name, with_types=True)
        )

    snapshot_options: ClassVar[dict[str, Any]] = {"isolation_level": "REPEATABLE READ"}

    async def bound_lock_wait(self, connection: AsyncConnection, milliseconds: int) -> None:
        await connection.exec_driver_sql(f"SET LOCAL lock_timeout = {int(milliseconds)}")

    async def refresh_statistics(self, connection: AsyncConnection, *tables: Table) -> None:
        # A role that does not own the table gets a warning, not an error.
        await connection.exec_driver_sql(f"ANALYZE {', '.join(table.name for table in tables)}")

    # Measured: below ~200 rows, creating the staging table costs more than COPY saves.
    bulk_insert_minimum = 200

    async def bulk_insert_metrics(self, connection: AsyncConnection, metrics: Sequence[ActionMetric]) -> int:
        # COPY cannot skip conflicts: copy into a temporary table emptied at commit, then move the
        # rows with INSERT ... SELECT ... ON CONFLICT DO NOTHING, all in the caller's transaction.
        await self._copy_to_staging(connection, metrics)
        moved = await connection.execute(_MOVE_STAGED)
        return int(moved.rowcount)

    async def _copy_to_staging(self, connection: AsyncConnection, metrics: Sequence[ActionMetric]) -> None:
        """The staging table, created if this connection has none yet (it is emptied at commit), filled."""
        import asyncpg  # imported here: only a PostgreSQL store needs the driver

        await connection.execute(_CREATE_STAGING)  # through SQLAlchemy: this also opens the transaction
        driver = await _driver_connection(connection)
        assert driver.is_in_transaction(), "COPY must run in the batch's transaction"
        try:
            await driver.copy_records_to_table(
                _staging.name, columns=METRIC_COLUMNS, records=map(_metric_values, metrics)
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise DBAPIError.instance(f"COPY {_staging.name}", None, error, Exception) from error

    async def bulk_insert_groups(
        self, connection: AsyncConnection, groups: Sequence[Sequence[ActionMetric]]
    ) -> list[int]:
        if len(groups) == 1:
            return [await self.bulk_insert_metrics(connection, groups[0])]
        # One COPY into the staging table and one move for all the groups; the
        # ids the move inserted tell the groups apart.
        group_of = {metric.id: index for index, group in enumerate(groups) for metric in group}
        inserted = [0] * len(groups)
        await self._copy_to_staging(connection, [metric for group in groups for metric in group])
        for stored_id in (await connection.execute(_MOVE_STAGED.returning(action_metrics.c.id))).scalars():
            inserted[group_of[stored_id]] += 1
        return inserted


# asyncpg binary COPY encodes a UUID, an aware datetime, and jsonb from its text, as they are.
_staging = Table(
    "action_metrics_staging",
    MetaData(),
    *(Column(column.name, column.type) for column in action_metrics.columns),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DELETE ROWS",
)
# Made once per connection and emptied at each commit: creating and dropping it in every batch's
# transaction cost PostgreSQL 1-4 ms a batch (catalog rows written and removed each time).
_CREATE_STAGING: Final = CreateTable(_staging, if_not_exists=True)
_MOVE_STAGED: Final = (
    postgresql.insert(action_metrics)
    .from_select(list(METRIC_COLUMNS), select(*_staging.columns))
    .on_conflict_do_nothing(index_elements=["id"])
)


class SQLiteBackend(Backend):
    name = "sqlite"
    async_driver = "aiosqlite"
    migrates_on_first_use = True  # an embedded file: the store is its only user

    @property
    def in_memory(self) -> bool:
        return self.url.database in (None, "", ":memory:")

    def engine_options(self) -> dict[str, Any]:
        # An in-memory database lives in one connection: share it, or every checkout sees nothing.
        return {"poolclass": StaticPool} if self.in_memory else {}

    def configure(self, engine: AsyncEngine) -> None:
        in_memory = self.in_memory

        @event.listens_for(engine.sync_engine, "do_connect")
        def open_joining_on_failure(
            _dialect: Any, _record: Any, _args: Any, parameters: dict[str, Any]
        ) -> None:
            parameters["async_creator_fn"] = _open_aiosqlite  # SQLAlchemy then connects through it

        @event.listens_for(engine.sync_engine, "connect")
        def set_pragmas(dbapi_connection: DBAPIConnection, _: ConnectionPoolEntry) -> None:
            # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (see "begin").
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_PAGES_BEFORE_CHECKPOINT}")
                cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
            _ensure_math_functions(dbapi_connection)

        @event.listens_for(engine.sync_engine, "begin")
        def begin(connection: Any) -> None:
            # A writer takes the lock when it begins, so busy_timeout applies; a deferred
            # transaction that upgrades to a writer later fails at once with "database is locked".
            options = connection.get_execution_options()
            immediate = options.get(WRITE, False)
            wait = options.get(LOCK_WAIT)
            if wait is None or not immediate:
                connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
                return
            connection.exec_driver_sql(f"PRAGMA busy_timeout={int(wait)}")  # the lock is taken at BEGIN
            try:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            finally:
                connection.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")

    def insert(self, table: Table) -> SQLiteInsert:
        return sqlite.insert(table)

    def bucket_start(self, timestamp: ColumnElement[Any], grain: str) -> ColumnElement[Any]:
        # Timestamps are UTC text, 'YYYY-MM-DD HH:MM:SS.ffffff': keep the day or the hour.
        kept, rest = _SQLITE_BUCKET_TEXT[grain]
        truncated = func.substr(type_coerce(timestamp, String), 1, kept) + literal(rest, String)
        return type_coerce(truncated, UTCDateTime())

    def greatest(self, first: ColumnElement[Any], *others: ColumnElement[Any]) -> ColumnElement[Any]:
        # SQLite's multi-argument max() is NULL when any argument is.
        return type_coerce(func.max(first, *(func.coalesce(other, first) for other in others)), first.type)

    def epoch_seconds(self, timestamp: ColumnElement[Any]) -> ColumnElement[int]:
        # SQLite's date functions keep milliseconds and round the rest: 18:59:59.9998 would read as
        # 19:00:00, a bucket late. The stored text cut at its whole seconds is the floor.
        return sql_cast(func.strftime("%s", func.substr(timestamp, 1, 19)), Integer)

    def int_list(self, values: ColumnElement[Any]) -> ColumnElement[Any]:
        return func.json_group_array(values, type_=String())

    def ints_of(self, value: Any) -> list[int]:
        ints: list[int] = json.loads(value)
        return ints

    def rows_table(
        self, name: str, columns: Sequence[tuple[str, TypeEngine[Any]]], rows: Sequence[Sequence[Any]]
    ) -> NamedFromClause:
        # An array of arrays; each value taken out by its place.
        each = func.json_each(literal(self._json_rows(rows), String())).table_valued("value")
        return select(
            *(
                type_coerce(func.json_extract(each.c.value, f"$[{place}]"), type_).label(column_name)
                for place, (column_name, type_) in enumerate(columns)
            )
        ).subquery(name)

    def _json_value(self, value: Any) -> Any:
        # The text SQLAlchemy stores a DateTime as on SQLite (UTC, see UTCDateTime).
        if isinstance(value, datetime):
            utc = value.astimezone(UTC)  # the year padded to four digits, as SQLAlchemy writes it
            return f"{utc.year:04d}-{utc:%m-%d %H:%M:%S}.{utc.microsecond:06d}"
        return value

    bulk_insert_minimum = 1

    async def bulk_insert_metrics(self, connection: AsyncConnection, metrics: Sequence[ActionMetric]) -> int:
        driver = await _driver_connection(connection)
        assert driver.in_transaction, "the batch's BEGIN IMMEDIATE runs when SQLAlchemy begins"
        try:
            # aiosqlite runs executemany on its own thread, which also draws the rows from the
            # generator: the event loop is not held up by the conversion.
            cursor = await driver.executemany(_SQLITE_INSERT_OR_SKIP, map(_sqlite_row, metrics))
        except sqlite3.Error as error:
            raise DBAPIError.instance(_SQLITE_INSERT_OR_SKIP, None, error, sqlite3.Error) from error
        # sqlite3 sums the changes of every row: a skipped conflict changes nothing.
        inserted = cursor.rowcount
        await cursor.close()
        return int(inserted)

    def rank_latencies(
        self, rows: NamedFromClause, keys: Sequence[str], fractions: Sequence[float]
    ) -> NamedFromClause:
        partition = [not_indexed(rows.c[key]) for key in keys]
        order = rows.c.latency_ms
        ranked = Select(
            rows,
            (func.row_number().over(partition_by=partition, order_by=order) - 1).label("latency_rank"),
            # The same window as the rank's, over the whole partition: one sort for both.
            func.count()
            .over(partition_by=partition, order_by=order, rows=(None, None))
            .label("latency_count"),
        ).subquery("ranked_all")
        # Only the rows at the ranks the interpolation reads go on to be grouped.
        rank = ranked.c.latency_rank
        lowers = [sql_cast((ranked.c.latency_count - 1) * sql_cast(f, Double), Integer) for f in fractions]
        wanted = or_(*(rank == lower for lower in lowers), *(rank == lower + 1 for lower in lowers))
        return Select(ranked).where(wanted).subquery("ranked")

    def latency_percentile(self, ranked: NamedFromClause, fraction: float) -> ColumnElement[float]:
        return interpolated_percentile(
            ranked.c.latency_rank, ranked.c.latency_count, ranked.c.latency_ms, fraction
        )

    ranks_in_one_pass = True
    sums_per_model_search = True
    covering_filters = frozenset({"town_id"})


def not_indexed(column: ColumnElement[Any]) -> ColumnElement[str]:
    """The text of `column` as an expression, not the column, to group or partition raw rows by:
    SQLite would otherwise read the whole table in the order of the column's index (to spare a
    sort) instead of just the selection's rows through the time index."""
    return type_coerce(type_coerce(column, String) + literal("", String), String)


def interpolated_percentile(
    rank: ColumnElement[int], count: ColumnElement[int], latency: ColumnElement[float], fraction: float
) -> ColumnElement[float]:
    """PostgreSQL's percentile_cont written out, as an aggregate over rows carrying their 0-based
    `rank` among the group's `count` latencies: position (n - 1) * f, then interpolate between the
    values ranked floor(position) and floor(position) + 1. n is the same on every row of a group, so
    the per-row position is the group's."""
    position = (count - 1) * sql_cast(fraction, Double)
    lower = sql_cast(position, Integer)  # truncation is floor: position >= 0
    low_value = func.max(case((rank == lower, latency)))
    high_value = func.coalesce(func.max(case((rank == lower + 1, latency))), low_value)
    return low_value + func.max(position - lower) * (high_value - low_value)


_SQLITE_BUCKET_TEXT: Final = {
    "hour": (13, ":00:00.000000"),
    "day": (10, " 00:00:00.000000"),
    "month": (8, "01 00:00:00.000000"),
}

_MATH_FUNCTIONS: Final = {"ln": math.log, "exp": math.exp, "ceil": math.ceil, "floor": math.floor}
"""What the rollups compute with. SQLite has them when built with SQLITE_ENABLE_MATH_FUNCTIONS (most
builds since 3.35); elsewhere Python's are registered on our own connections. The views need none."""


async def _open_aiosqlite(*args: Any, **kwargs: Any) -> Any:
    """`aiosqlite.connect(...)` as SQLAlchemy opens it, except that a connection that fails to open
    returns only once its worker thread has ended. aiosqlite stops that thread without waiting for
    it, and the thread then reports to the event loop, which may be closed by then (a failed store
    closed at once): "RuntimeError: Event loop is closed" in a thread nobody joins."""
    import aiosqlite  # imported here: only a SQLite store needs the driver

    connection = aiosqlite.connect(*args, **kwargs)
    worker = connection._thread
    worker.daemon = True  # as SQLAlchemy's own connect makes it: never holds up the interpreter's exit
    try:
        return await connection
    except Exception:
        await asyncio.to_thread(worker.join)
        raise


def _ensure_math_functions(dbapi_connection: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT ln(1), exp(0), ceil(0.5), floor(0.5)")
        cursor.fetchall()
    except sqlite3.OperationalError:
        for name, function in _MATH_FUNCTIONS.items():
            dbapi_connection.create_function(name, 1, function, deterministic=True)
    finally:
        cursor.close()


def _sqlite_row(metric: ActionMetric) -> tuple[Any, ...]:
    """What SQLAlchemy binds for a metric on SQLite: `Uuid` as 32 lowercase hex digits, `DateTime`
    as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC, always six decimals), JSON as its text."""
    # metric.timestamp is aware UTC: drop the '+00:00' isoformat appends.
    stamp = metric.timestamp.isoformat(" ", "microseconds")[:26]
    return (metric.id.hex, stamp, *_metric_values_after_timestamp(metric))


def _compile_sqlite_insert() -> str:
    statement = sqlite.insert(action_metrics).on_conflict_do_nothing(index_elements=["id"])
    compiled = statement.compile(dialect=sqlite.dialect(paramstyle="qmark"), column_keys=list(METRIC_COLUMNS))
    assert tuple(compiled.positiontup or ()) == METRIC_COLUMNS, compiled.positiontup
    return str(compiled)


_SQLITE_INSERT_OR_SKIP: Final = _compile_sqlite_insert()


class sum_of_counts(ReturnTypeFromArgs[Any]):
    """SUM of counts of tokens or credits that never fails a read or a write, however large they are
    (each fits 64 bits, their sum need not): PostgreSQL's SUM of BIGINT is an exact NUMERIC; SQLite's
    SUM raises "integer overflow" past 2**63, so there it is TOTAL, a double (exact below 2**53, so
    for any real token counts), which a rollup column stores back as an INTEGER whenever it is one."""

    inherit_cache = True
    name = "sum"
    identifier = "sum_of_counts"


@compiles(sum_of_counts, "sqlite")
def _total_on_sqlite(element: sum_of_counts, compiler: SQLCompiler, **options: Any) -> str:
    return f"total{compiler.function_argspec(element, **options)}"


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
    if backend is SQLiteBackend and any(
        (resolved.host, resolved.port, resolved.username, resolved.password)
    ):  # sqlite://relative.db: SQLAlchemy would refuse it later, in a traceback
        raise UnsupportedDatabase(
            f"cannot read {display_url(resolved)!r} as a SQLite URL (two slashes: a host, which SQLite "
            "has not): the file follows three, sqlite:///relative.db (from the working directory) or "
            "sqlite:////absolute/path.db"
        )
    return backend(resolved)
