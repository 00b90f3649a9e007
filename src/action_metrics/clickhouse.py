"""ClickHouse, the third backend (preview): `ClickHouseMetricsStore` and its versioned schema.

A ClickHouse server is reached over HTTP (`clickhouse://user:password@host:8123/db`) and the same
engine runs in process through chdb (`chdb:///path/to/dir?database=name`), both through
`clickhouse-connect` (the optional extra `.[clickhouse]`). ClickHouse is not a SQLAlchemy dialect
here: this module speaks ClickHouse SQL itself, with every user value sent as a bound parameter.

The schema lives in `sql/clickhouse/<NNNN>_<name>.sql`; the version applied is recorded in
`action_metrics_schema_version`. Reads say FINAL, so a re-sent action counts once before the
merges have removed its copies. The figures follow the contract's definitions: money in Decimal
(the sums of token x price are exact; the division by 1e6 is done once, in Python `decimal`),
prices in force at each action's timestamp by ASOF JOIN, percentiles by `quantilesExactInclusive`
(NumPy's 'linear') over the successful actions.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, Unpack
from urllib.parse import parse_qs, urlsplit

from action_metrics.aggregate import Aggregate, ModelAggregate
from action_metrics.errors import (
    InvalidMetric,
    SchemaNotCreated,
    SchemaOutOfDate,
    SchemaTooNew,
    StoreClosed,
    UnsupportedDatabase,
)
from action_metrics.migrate import sql_dir
from action_metrics.model import ActionMetric
from action_metrics.pricing import CreditPrice, ModelPrice
from action_metrics.query import EQUALITY_FILTERS, MetricFilter

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from action_metrics.store import Amount, Filters

SCHEMES: Final = ("chdb", "clickhouse", "clickhouses")
VERSION_TABLE: Final = "action_metrics_schema_version"
EARLIEST: Final = datetime(1900, 1, 1, tzinfo=UTC)
"""DateTime64's first instant: the beginning of time of this backend (prices seeded from it)."""
LATEST: Final = datetime(2300, 1, 1, tzinfo=UTC)
"""DateTime64's end (exclusive): a metric stamped outside [EARLIEST, LATEST) cannot be stored."""

_VERSION_FILE: Final = re.compile(r"^(\d{4})_(\w+)\.sql$")
_MICROSECOND: Final = timedelta(microseconds=1)


def is_clickhouse_url(url: str | None) -> bool:
    return url is not None and urlsplit(url).scheme in SCHEMES


# --- where the database is ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClickHouseURL:
    """A ClickHouse database: a server over HTTP, or a chdb directory in this process."""

    given: str
    database: str
    in_process: bool

    @classmethod
    def parse(cls, url: str) -> ClickHouseURL:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise UnsupportedDatabase(f"not a ClickHouse URL (chdb:///path or clickhouse://host): {url!r}")
        if parts.scheme == "chdb":
            if parts.netloc or not parts.path:
                raise UnsupportedDatabase(
                    f"expected chdb:///absolute/path/to/a/directory[?database=name], got {url!r}"
                )
            database = parse_qs(parts.query).get("database", ["default"])[0]
            return cls(url, database, in_process=True)
        database = parts.path.strip("/") or "default"
        return cls(url, database, in_process=False)

    def shown(self) -> str:
        """The URL without its password, for messages."""
        parts = urlsplit(self.given)
        if parts.password is None:
            return self.given
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()

    def connect(self, *, with_database: bool = True) -> Client:
        """A clickhouse-connect client, on the database or (to create it) on the server's default."""
        try:
            import clickhouse_connect
        except ModuleNotFoundError:
            raise UnsupportedDatabase(
                "ClickHouse needs the optional extra: pip install 'action-metrics[clickhouse]'"
            ) from None
        parts = urlsplit(self.given)
        if self.in_process:
            return clickhouse_connect.get_client(
                dsn=f"chdb://{parts.path}", database=self.database if with_database else None
            )
        dsn = parts._replace(scheme="https" if parts.scheme == "clickhouses" else "http", path="").geturl()
        return clickhouse_connect.get_client(dsn=dsn, database=self.database if with_database else None)


# --- the versioned schema ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    """One file of `sql/clickhouse/`: the statements that take the schema to `number`."""

    number: int
    name: str
    path: Path

    def statements(self) -> list[str]:
        """The file's statements: `--` comment lines dropped, split at each `;` that ends a line."""
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if not _comment(line)]
        return [
            statement.strip()
            for statement in re.split(r";\s*$", "\n".join(lines), flags=re.M)
            if statement.strip()
        ]


def _comment(line: str) -> bool:
    return line.lstrip().startswith("--")


def schema_versions() -> list[SchemaVersion]:
    """Every version this package carries, oldest first."""
    found = []
    for path in sorted((sql_dir() / "clickhouse").iterdir()):
        if match := _VERSION_FILE.match(path.name):
            found.append(SchemaVersion(int(match[1]), match[2], path))
    return found


def head_version() -> int:
    return schema_versions()[-1].number


_VERSION_TABLE_DDL: Final = f"""CREATE TABLE IF NOT EXISTS {VERSION_TABLE}
(
    version UInt32,
    name String,
    applied_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = MergeTree
ORDER BY version"""


def _version_row(version: SchemaVersion) -> str:
    # Both values come from this package's own file names (`_VERSION_FILE`), never from a user.
    return f"INSERT INTO {VERSION_TABLE} (version, name) VALUES ({version.number}, '{version.name}')"


def upgrade_sql(url: ClickHouseURL, after: int = 0) -> str:
    """What `db upgrade --sql` prints: every statement from version `after` to the head, for a DBA."""
    statements = [
        f"CREATE DATABASE IF NOT EXISTS `{url.database}`",
        f"USE `{url.database}`",
        _VERSION_TABLE_DDL,
    ]
    for version in schema_versions():
        if version.number > after:
            statements.extend([f"-- version {version.number}: {version.name}", *version.statements()])
            statements.append(_version_row(version))
    return "".join(s + "\n" if s.startswith("--") else s + ";\n\n" for s in statements)


def current_version(client: Client) -> int | None:
    """The version applied, or None when the database has no action-metrics schema."""
    if not client.command(f"EXISTS TABLE {VERSION_TABLE}"):
        return None
    number = client.query(f"SELECT max(version) FROM {VERSION_TABLE}").result_rows[0][0]
    return int(number) or None


def upgrade(url: ClickHouseURL) -> int:
    """Create the database if needed and apply the versions it lacks; the version reached."""
    server = url.connect(with_database=False)
    try:
        server.command(
            "CREATE DATABASE IF NOT EXISTS {database:Identifier}", parameters={"database": url.database}
        )
    finally:
        server.close()
    client = url.connect()
    try:
        client.command(_VERSION_TABLE_DDL)
        applied = current_version(client) or 0
        for version in schema_versions():
            if version.number > applied:
                for statement in version.statements():
                    client.command(statement)
                client.command(_version_row(version))
        return head_version()
    finally:
        client.close()


def version_of(url: ClickHouseURL) -> int | None:
    """`db current`: the version applied to the database (None: no schema, or no database)."""
    server = url.connect(with_database=False)
    try:
        exists = server.command(
            "EXISTS DATABASE {database:Identifier}", parameters={"database": url.database}
        )
    finally:
        server.close()
    if not exists:
        return None
    client = url.connect()
    try:
        return current_version(client)
    finally:
        client.close()


def describe_version(url: ClickHouseURL) -> str:
    """`db current`'s line: the version applied and whether it is this package's newest."""
    version, head = version_of(url), head_version()
    state = "head" if version == head else f"behind head {head}" if version else "no schema"
    return f"{version or '-'} ({state})"


# --- reading and writing ------------------------------------------------------------------------------

_COLUMNS: Final = (
    "id",
    "timestamp",
    "action_type",
    "user_id",
    "town_id",
    "citizen_id",
    "model",
    "tokens_in",
    "tokens_out",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "latency_ms",
    "credits_charged",
    "error",
    "metadata",
)
_READ_SETTINGS: Final = {"do_not_merge_across_partitions_select_final": 1}
"""FINAL per partition is enough: copies of one action share its timestamp, hence its month."""


def _row(metric: ActionMetric) -> list[Any]:
    if not EARLIEST <= metric.timestamp < LATEST:
        raise InvalidMetric(
            "timestamp", f"ClickHouse stores 1900-01-01 to 2299-12-31 UTC, got {metric.timestamp}"
        )
    return [
        metric.id,
        metric.timestamp,
        metric.action_type,
        metric.user_id,
        metric.town_id,
        metric.citizen_id,
        metric.model,
        metric.tokens_in,
        metric.tokens_out,
        metric.cache_read_tokens,
        metric.cache_write_tokens,
        metric.reasoning_tokens,
        metric.latency_ms,
        metric.credits_charged,
        metric.error,
        metric.metadata_json,
    ]


def _micros(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // _MICROSECOND


def _moment(micros: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)


def _selection(metric_filter: MetricFilter, columns: str) -> tuple[str, dict[str, Any]]:
    """The actions a filter selects, newest first when it has a limit; SQL and its parameters."""
    terms: list[str] = []
    parameters: dict[str, Any] = {}
    for name in EQUALITY_FILTERS:
        value = getattr(metric_filter, name)
        if value is not None:
            terms.append(f"{name} = {{{name}:String}}")
            parameters[name] = value
    if not metric_filter.storable:
        terms.append("0")
    if metric_filter.since is not None:
        terms.append("timestamp >= fromUnixTimestamp64Micro({since:Int64}, 'UTC')")
        parameters["since"] = _micros(max(metric_filter.since, EARLIEST))
    if metric_filter.until is not None:
        terms.append("timestamp < fromUnixTimestamp64Micro({until:Int64}, 'UTC')")
        parameters["until"] = _micros(min(metric_filter.until, LATEST))
    if metric_filter.since is not None and metric_filter.since >= LATEST:
        terms.append("0")
    if metric_filter.until is not None and metric_filter.until <= EARLIEST:
        terms.append("0")
    where = f" WHERE {' AND '.join(terms)}" if terms else ""
    statement = f"SELECT {columns} FROM action_metrics FINAL{where}"
    if metric_filter.limit is not None:
        # toString: ClickHouse orders UUIDs by their halves swapped; their text orders as Python does.
        statement += " ORDER BY timestamp DESC, toString(id) DESC LIMIT {limit:UInt64}"
        parameters["limit"] = metric_filter.limit
    return statement, parameters


_PRICED_COLUMNS: Final = (
    "model, timestamp, tokens_in, tokens_out, cache_read_tokens, cache_write_tokens, reasoning_tokens, "
    "credits_charged, latency_ms, error, toUInt8(1) AS one"
)

_AGGREGATE: Final = """
WITH priced AS (
    SELECT
        s.model AS model,
        s.tokens_in AS tokens_in,
        s.tokens_out AS tokens_out,
        s.cache_read_tokens AS cache_read_tokens,
        s.cache_write_tokens AS cache_write_tokens,
        s.reasoning_tokens AS reasoning_tokens,
        s.credits_charged AS credits_charged,
        s.latency_ms AS latency_ms,
        s.error IS NULL AS succeeded,
        -- USD x 1e6, exact: the division by 1e6 is done once, on the sum.
        toDecimal256(s.tokens_in - s.cache_read_tokens - s.cache_write_tokens, 0) * p.input_per_1m
            + toDecimal256(s.cache_read_tokens, 0) * coalesce(p.cache_read_per_1m, p.input_per_1m)
            + toDecimal256(s.cache_write_tokens, 0) * coalesce(p.cache_write_per_1m, p.input_per_1m)
            + toDecimal256(s.tokens_out, 0) * p.output_per_1m AS cost_e6,
        toDecimal256(s.credits_charged, 0) * coalesce(c.usd_per_credit, toDecimal128(0, 9)) AS revenue
    FROM ({selection}) AS s
    ASOF LEFT JOIN (SELECT * FROM model_prices FINAL) AS p
        ON s.model = p.model AND s.timestamp >= p.effective_from
    ASOF LEFT JOIN (SELECT toUInt8(1) AS one, effective_from, usd_per_credit FROM credit_prices FINAL) AS c
        ON s.one = c.one AND s.timestamp >= c.effective_from
)
SELECT
    model,
    count() AS count,
    sum(toUInt128(tokens_in)),
    sum(toUInt128(tokens_out)),
    sum(toUInt128(credits_charged)),
    sum(toUInt128(cache_read_tokens)),
    sum(toUInt128(cache_write_tokens)),
    sum(toUInt128(reasoning_tokens)),
    avg(latency_ms),
    countIf(succeeded),
    quantilesExactInclusiveIf(0.5, 0.95, 0.99)(latency_ms, succeeded),
    sum(cost_e6),
    countIf(cost_e6 IS NULL),
    sum(revenue),
    sumKahanIf(
        toFloat64(revenue * 1000000 - cost_e6) / toFloat64(revenue * 1000000),
        revenue > 0 AND cost_e6 IS NOT NULL
    ),
    countIf(revenue > 0 AND cost_e6 IS NOT NULL),
    countIf(NOT succeeded)
FROM priced
GROUP BY GROUPING SETS ((model), ())
"""
_AGGREGATE_SETTINGS: Final = {**_READ_SETTINGS, "join_use_nulls": 1, "group_by_use_nulls": 1}
_ONE_MILLION: Final = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class _Figures:
    """One row of `_AGGREGATE`: a model's figures, or the selection's (model None)."""

    model: str | None
    count: int
    tokens_in: int
    tokens_out: int
    credits: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    avg_latency_ms: float | None
    succeeded: int
    percentiles: Sequence[float]
    cost: Decimal
    unpriced: int
    revenue: Decimal
    margin_sum: float
    margin_count: int
    errors: int

    @classmethod
    def of(cls, row: Sequence[Any]) -> _Figures:
        (model, count, tokens_in, tokens_out, credits, read, write, reasoning, avg_latency, succeeded,
         percentiles, cost_e6, unpriced, revenue, margin_sum, margin_count, errors) = row  # fmt: skip
        return cls(
            model=model,
            count=int(count),
            tokens_in=int(tokens_in),
            tokens_out=int(tokens_out),
            credits=int(credits),
            cache_read_tokens=int(read),
            cache_write_tokens=int(write),
            reasoning_tokens=int(reasoning),
            avg_latency_ms=float(avg_latency) if count else None,
            succeeded=int(succeeded),
            percentiles=percentiles,
            cost=Decimal(cost_e6 or 0) / _ONE_MILLION,
            unpriced=int(unpriced),
            revenue=Decimal(revenue or 0),
            margin_sum=float(margin_sum or 0),
            margin_count=int(margin_count),
            errors=int(errors),
        )

    def percentile(self, index: int) -> float | None:
        return float(self.percentiles[index]) if self.succeeded else None

    def for_model(self) -> ModelAggregate:
        return ModelAggregate(
            count=self.count,
            total_tokens=self.tokens_in + self.tokens_out,
            avg_latency_ms=self.avg_latency_ms,
            p95_latency_ms=self.percentile(1),
            total_cost_usd=float(self.cost),
            unpriced_count=self.unpriced,
        )

    def aggregate(self, by_model: Mapping[str, ModelAggregate]) -> Aggregate:
        return Aggregate(
            count=self.count,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            total_credits=self.credits,
            cache_read_tokens=self.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens,
            avg_latency_ms=self.avg_latency_ms,
            p50_latency_ms=self.percentile(0),
            p95_latency_ms=self.percentile(1),
            p99_latency_ms=self.percentile(2),
            total_cost_usd=float(self.cost),
            total_revenue_usd=float(self.revenue),
            total_profit_usd=float(self.revenue - self.cost),
            avg_margin=self.margin_sum / self.margin_count if self.margin_count else None,
            gross_margin=float((self.revenue - self.cost) / self.revenue) if self.revenue else None,
            unpriced_count=self.unpriced,
            error_count=self.errors,
            percentiles_exact=True,
            by_model=by_model,
        )


_EMPTY: Final = _Figures(None, 0, 0, 0, 0, 0, 0, 0, None, 0, (), Decimal(0), 0, Decimal(0), 0.0, 0, 0)


def _metric(row: Sequence[Any]) -> ActionMetric:
    fields = dict(zip(_COLUMNS, row, strict=True))
    fields["timestamp"] = _moment(fields["timestamp"])
    fields["metadata"] = json.loads(fields["metadata"])
    fields["latency_ms"] = float(fields["latency_ms"])
    if not isinstance(fields["id"], uuid.UUID):
        fields["id"] = uuid.UUID(str(fields["id"]))
    return ActionMetric.stored(**fields)


def _price_start(effective_from: datetime) -> datetime:
    """No action is stamped before EARLIEST, so a price from earlier is in force from EARLIEST."""
    return max(effective_from, EARLIEST)


class ClickHouseMetricsStore:
    """The blocking store's API on ClickHouse: emit, emit_many, query, aggregate and the prices.

    Writes are synchronous (`emit` inserts before it returns; there is no background writer yet), so
    `flush()` has nothing to wait for. A chdb directory is created and upgraded on first use, as a
    SQLite file is; a server's schema is only ever changed by `action-metrics db upgrade`.
    """

    def __init__(self, url: str) -> None:
        self.url = ClickHouseURL.parse(url)
        self._lock = threading.Lock()
        """One statement at a time: a clickhouse-connect client is not shared between threads."""
        if self.url.in_process and version_of(self.url) is None:
            upgrade(self.url)
        self._client: Client | None = self.url.connect()
        try:
            self._check_version()
        except BaseException:
            self.close()
            raise

    def _check_version(self) -> None:
        version, head = current_version(self._open()), head_version()
        command = f"action-metrics db upgrade --url {self.url.shown()}"
        if version is None:
            raise SchemaNotCreated(f"{self.url.shown()} has no action-metrics schema: run {command}")
        if version < head:
            raise SchemaOutOfDate(f"{self.url.shown()} is at version {version}, not {head}: run {command}")
        if version > head:
            raise SchemaTooNew(
                f"{self.url.shown()} is at version {version}, newer than this package's {head}: "
                "upgrade action-metrics"
            )

    def __repr__(self) -> str:
        return f"ClickHouseMetricsStore({self.url.shown()!r})"

    def _open(self) -> Client:
        if self._client is None:
            raise StoreClosed(f"{self!r} is closed: open a new store to use the database again")
        return self._client

    def emit(self, metric: ActionMetric) -> None:
        self.emit_many([metric])

    def emit_many(self, metrics: Iterable[ActionMetric]) -> None:
        """Insert the metrics in one block; an id already stored is kept once (see the module)."""
        rows = []
        for metric in metrics:
            if not isinstance(metric, ActionMetric):
                raise TypeError(f"expected an ActionMetric, got {type(metric).__name__}")
            rows.append(_row(metric))
        if rows:
            with self._lock:
                self._open().insert("action_metrics", rows, column_names=list(_COLUMNS))

    def flush(self, timeout: float | None = None) -> None:
        """Nothing is buffered: every emit has been inserted when it returns."""
        self._open()

    def query(self, **filters: Unpack[Filters]) -> list[ActionMetric]:
        """The matching metrics, newest first (`since` inclusive, `until` exclusive, the newest `limit`)."""
        metric_filter = MetricFilter(**filters)
        columns = ", ".join("toUnixTimestamp64Micro(timestamp)" if c == "timestamp" else c for c in _COLUMNS)
        statement, parameters = _selection(metric_filter, columns)
        if metric_filter.limit is None:
            statement += " ORDER BY timestamp DESC, toString(id) DESC"
        with self._lock:
            rows = self._open().query(statement, parameters=parameters, settings=_READ_SETTINGS).result_rows
        return [_metric(row) for row in rows]

    def aggregate(self, *, exact: bool = False, **filters: Unpack[Filters]) -> Aggregate:
        """The dashboard figures of the selection, from raw rows: the percentiles are exact either way."""
        selection, parameters = _selection(MetricFilter(**filters), _PRICED_COLUMNS)
        with self._lock:
            result = self._open().query(
                _AGGREGATE.format(selection=selection), parameters=parameters, settings=_AGGREGATE_SETTINGS
            )
        figures = [_Figures.of(row) for row in result.result_rows]
        total = next((f for f in figures if f.model is None), _EMPTY)
        by_model = {f.model: f.for_model() for f in figures if f.model is not None}
        return total.aggregate(by_model)

    def set_model_price(
        self,
        model: str,
        input_per_1m: Amount,
        output_per_1m: Amount,
        effective_from: datetime | None = None,
        *,
        cache_read_per_1m: Amount | None = None,
        cache_write_per_1m: Amount | None = None,
    ) -> None:
        """Price `model` from `effective_from` (default now) until its next price; again at the same
        start replaces it. A cache price left out means the input price for those tokens."""
        price = ModelPrice.of(
            model,
            input_per_1m,
            output_per_1m,
            effective_from,
            cache_read_per_1m=cache_read_per_1m,
            cache_write_per_1m=cache_write_per_1m,
        )
        row = [
            price.model,
            _price_start(price.effective_from),
            price.input_per_1m,
            price.output_per_1m,
            price.cache_read_per_1m,
            price.cache_write_per_1m,
        ]
        columns = [
            "model",
            "effective_from",
            "input_per_1m",
            "output_per_1m",
            "cache_read_per_1m",
            "cache_write_per_1m",
        ]
        with self._lock:
            self._open().insert("model_prices", [row], column_names=columns)

    def set_credit_price(self, usd_per_credit: Amount, effective_from: datetime | None = None) -> None:
        """Set the revenue of one credit from `effective_from` (default now) until the next price."""
        price = CreditPrice.of(usd_per_credit, effective_from)
        row = [_price_start(price.effective_from), price.usd_per_credit]
        with self._lock:
            self._open().insert("credit_prices", [row], column_names=["effective_from", "usd_per_credit"])

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
