"""The tables as SQLAlchemy models, and the views as read-only table shapes.

The migrations in `migrations/` create all of this; `tests/test_migrations.py` checks with alembic's
autogenerate that these models and the migrated database never drift apart.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Dialect,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

PRICE = Numeric(20, 9)
"""USD with nine decimals: exact on PostgreSQL; SQLite (NUMERIC affinity) keeps a whole number as an
INTEGER and any other as a REAL."""

MONEY = Numeric(38, 15)
"""A computed amount of USD in the views."""

TOKEN_SUM = BigInteger().with_variant(Numeric(38, 0), "postgresql")
"""A rollup's sum of tokens or credits: each action's fits 64 bits, their sum need not. Exact NUMERIC
on PostgreSQL; on SQLite an INTEGER, which SQLite turns into a REAL past 2**63 rather than fail."""


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC and gives back aware UTC datetimes on both backends.

    SQLite has no time zones: SQLAlchemy stores its text form, which sorts in time order as long as
    every value is UTC, so values are converted before they are bound.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime reached the database layer; convert it to UTC first")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSON_DOCUMENT = JSON().with_variant(postgresql.JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


AGGREGATED_COLUMNS: Final = (
    "action_type",
    "model",
    "tokens_in",
    "tokens_out",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "credits_charged",
    "latency_ms",
    "error",
)
"""What `aggregate()`, `breakdown()` and the checks read of a raw action besides its filters."""


class ActionMetricRow(Base):
    """One row per action."""

    __tablename__ = "action_metrics"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    action_type: Mapped[str] = mapped_column(String(64), nullable=False)
    user_id: Mapped[str] = mapped_column(String(256), nullable=False)
    town_id: Mapped[str] = mapped_column(String(256), nullable=False)
    citizen_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    model: Mapped[str] = mapped_column(String(128), nullable=False)
    tokens_in: Mapped[int] = mapped_column(BigInteger(), nullable=False)
    tokens_out: Mapped[int] = mapped_column(BigInteger(), nullable=False)
    latency_ms: Mapped[float] = mapped_column(Double(), nullable=False)
    credits_charged: Mapped[int] = mapped_column(BigInteger(), nullable=False)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON_DOCUMENT, nullable=False)
    # The GenAI conventions' token kinds, parts of tokens_in and tokens_out (0.2).
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger(), nullable=False, server_default="0")
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger(), nullable=False, server_default="0")
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger(), nullable=False, server_default="0")
    error: Mapped[str | None] = mapped_column(String(256), nullable=True)
    """None for a success, else what failed (the error's type name)."""

    __table_args__ = (
        # Every filter of query()/aggregate() is an equality plus a time range, newest first.
        Index(None, "timestamp"),
        # On PostgreSQL these three also carry what the aggregates read of each action: one town's,
        # user's or citizen's actions are an index-only scan (migration 0008). On SQLite the town's
        # carries them after its key (0011, `SQLITE_WIDER_INDEXES`).
        Index(None, "town_id", "timestamp", postgresql_include=["user_id", *AGGREGATED_COLUMNS]),
        Index(None, "user_id", "timestamp", postgresql_include=["town_id", *AGGREGATED_COLUMNS]),
        Index(None, "action_type", "timestamp"),
        Index(None, "model", "timestamp"),
        Index(
            None, "citizen_id", "timestamp", postgresql_include=["town_id", "user_id", *AGGREGATED_COLUMNS]
        ),
    )


class ModelPriceRow(Base):
    """USD per 1M tokens of one model, in force from `effective_from` until the next row's."""

    __tablename__ = "model_prices"

    id: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), nullable=False)
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    input_per_1m: Mapped[Decimal] = mapped_column(PRICE, nullable=False)
    output_per_1m: Mapped[Decimal] = mapped_column(PRICE, nullable=False)
    cache_read_per_1m: Mapped[Decimal | None] = mapped_column(PRICE, nullable=True)
    """USD per 1M input tokens read from the prompt cache; NULL: the input price."""
    cache_write_per_1m: Mapped[Decimal | None] = mapped_column(PRICE, nullable=True)
    source: Mapped[str] = mapped_column(String(16), nullable=False, server_default="manual")
    """'manual' (set by hand or seeded) or 'catalogue' (`prices sync`): a manual price wins."""
    tiered_above_tokens: Mapped[int | None] = mapped_column(BigInteger(), nullable=True)
    """The catalogue charges more for calls above this many input tokens; NULL: not tiered."""

    __table_args__ = (Index(None, "model", "effective_from", unique=True),)


class CreditPriceRow(Base):
    """USD earned per credit, in force from `effective_from` until the next row's."""

    __tablename__ = "credit_prices"

    id: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=True)
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    usd_per_credit: Mapped[Decimal] = mapped_column(PRICE, nullable=False)

    __table_args__ = (Index(None, "effective_from", unique=True),)


class RollupSums:
    """What every rollup row sums (see `rollup.raw_sums`): a figure added here, and to the rollup
    tables by one migration, is kept at every level."""

    count: Mapped[int] = mapped_column(BigInteger(), nullable=False)
    tokens_in: Mapped[int] = mapped_column(TOKEN_SUM, nullable=False)
    tokens_out: Mapped[int] = mapped_column(TOKEN_SUM, nullable=False)
    credits_charged: Mapped[int] = mapped_column(TOKEN_SUM, nullable=False)
    latency_ms_sum: Mapped[float] = mapped_column(Double(), nullable=False)
    cache_read_tokens: Mapped[int] = mapped_column(TOKEN_SUM, nullable=False, server_default="0")
    cache_write_tokens: Mapped[int] = mapped_column(TOKEN_SUM, nullable=False, server_default="0")
    reasoning_tokens: Mapped[int] = mapped_column(TOKEN_SUM, nullable=False, server_default="0")
    error_count: Mapped[int] = mapped_column(BigInteger(), nullable=False, server_default="0")
    """Actions that failed; the latency histograms count successful actions only."""
    credited_count: Mapped[int] = mapped_column(BigInteger(), nullable=False)
    """Actions with credits > 0: those that can have a margin."""
    tokens_in_per_credit: Mapped[float] = mapped_column(Double(), nullable=False)
    """The sum of tokens_in / credits_charged over credited actions; with the prices it gives the
    sum of per-action margins (avg_margin) without the rows."""
    tokens_out_per_credit: Mapped[float] = mapped_column(Double(), nullable=False)
    cache_read_tokens_per_credit: Mapped[float] = mapped_column(Double(), nullable=False, server_default="0")
    cache_write_tokens_per_credit: Mapped[float] = mapped_column(Double(), nullable=False, server_default="0")


class RollupRow(RollupSums, Base):
    """Sums of the actions of one time segment, at one grain, for one combination of dimensions.

    A level of the rollup is a grain (`hour`, `day`) and the dimensions it keeps; a dimension a
    level sums over holds '' (never a valid id), so `town_id = '' AND action_type = ''` are the
    per-model totals. `start` is the bucket's start, or a later instant where a model or credit price
    changed inside the bucket: every row lies within one price period, and is priced at read.
    """

    __tablename__ = "action_metrics_rollup"

    grain: Mapped[str] = mapped_column(String(8), primary_key=True)
    town_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    action_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    start: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)

    # SQLite keeps the rows in their primary key's order: the rollups are read by key ranges.
    __table_args__ = {"sqlite_with_rowid": False}  # noqa: RUF012 - as SQLAlchemy declares it


class RollupDetailRow(RollupSums, Base):
    """The same sums for the levels that keep town, action and model, which the daily and hourly views
    read: ordered by time first, since they are written and read an hour or a day at a time (and are
    nearly as many as the actions when actions are few per group)."""

    __tablename__ = "action_metrics_rollup_detail"

    # RollupRow's keys in another order: a primary key's order is the order of its columns here.
    grain: Mapped[str] = mapped_column(String(8), primary_key=True)
    start: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    town_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    action_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)

    __table_args__ = {"sqlite_with_rowid": False}  # noqa: RUF012 - as SQLAlchemy declares it


class RollupUserRow(RollupSums, Base):
    """The same sums per user and model, per UTC day and per UTC month (a month's rows summed from its
    days'), which the breakdowns by user read: 1,000 users over 90 days are ~15k month rows and the
    days of one month, not the actions. Ordered by time first, as they are written and read."""

    __tablename__ = "action_metrics_rollup_user"

    grain: Mapped[str] = mapped_column(String(8), primary_key=True)
    start: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)

    __table_args__ = {"sqlite_with_rowid": False}  # noqa: RUF012 - as SQLAlchemy declares it


class LatencyHistogramRow(Base):
    """How many actions of a bucket had a latency in each logarithmic bin (see `rollup.BINS`)."""

    __tablename__ = "action_metrics_latency_histogram"

    grain: Mapped[str] = mapped_column(String(8), primary_key=True)
    town_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    action_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    start: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    bin: Mapped[int] = mapped_column(Integer(), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger(), nullable=False)

    # SQLite keeps the rows in their primary key's order: the rollups are read by key ranges.
    __table_args__ = (
        # On PostgreSQL the key's index also holds the count, so a level's bins are read from the
        # index alone: a town's 90 days at 10M actions in 31 ms instead of 107 through the heap.
        PrimaryKeyConstraint(
            "grain",
            "town_id",
            "action_type",
            "start",
            "model",
            "bin",
            name="pk_action_metrics_latency_histogram",
            postgresql_include=["count"],
        ),
        {"sqlite_with_rowid": False},
    )


class LatencyBinRow(Base):
    """The latency each histogram bin stands for (`sketch.bin_value_of`), one row per bin a stored
    latency can fall in (since 0020, filled by `sql/latency_bins/0020.sql`): the views turn
    histograms into percentiles by joining it, with no exp() (a SQLite may be built without it)."""

    __tablename__ = "action_metrics_latency_bins"

    bin: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=False)
    value_ms: Mapped[float] = mapped_column(Double(), nullable=False)

    __table_args__ = {"sqlite_with_rowid": False}  # noqa: RUF012 - as SQLAlchemy declares it


SKETCH_KEY_LENGTH: Final = 256 + 1 + 64
"""A town (at most 256 characters), '/', and an action type (at most 64)."""


class LatencySketchRow(Base):
    """One bucket's latency histogram as one value (see `sketch`): per town and UTC hour or day, per
    model and UTC hour, or per user and UTC day or month. Read many at a time and merged in NumPy;
    15-37x faster than one row per bin (docs/percentile-sketches.md)."""

    __tablename__ = "action_metrics_latency_sketch"

    level: Mapped[str] = mapped_column(String(16), primary_key=True)
    """`latency_sketches.SketchLevel.name`: 'town/hour', 'town/day', 'model/hour', 'user/day',
    'user/month', 'town-action/day'."""
    start: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    key: Mapped[str] = mapped_column(String(SKETCH_KEY_LENGTH), primary_key=True)
    """The town, the model or the user (each at most 256 characters), or a town and an action type as
    'town/action' (`latency_sketches.SketchLevel.key_of`; since 0012)."""
    n: Mapped[int] = mapped_column(BigInteger(), nullable=False)
    """How many latencies (of successful actions), zeros included."""
    latency_sum: Mapped[float] = mapped_column(Double(), nullable=False)
    zero_count: Mapped[int] = mapped_column(BigInteger(), nullable=False)
    bins: Mapped[bytes] = mapped_column(LargeBinary(), nullable=False)
    """`sketch.encode`'s blob: a format byte, then (bin, count) pairs."""

    # A level's buckets over a time range are one range of the key, whatever the towns. A rowid table
    # on SQLite: rows of ~0.1-2 KB are too wide to keep in a WITHOUT ROWID b-tree.


class RollupStateRow(Base):
    """How far the rollups reach, in one row: actions before `hours_closed_until` are in the hourly
    rollups, before `days_closed_until` in the daily ones (and, since 0019, the open day's rows of
    every model and of each action type hold its hours before `hours_closed_until`); raw rows before
    `raw_kept_from` were pruned."""

    __tablename__ = "action_metrics_rollup_state"

    id: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=False)
    hours_closed_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    days_closed_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    raw_kept_from: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    sketches_from: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    """The latency sketches of closed buckets exist from here on (None: all of them); `build` moves
    it back a day at a time, from where migration 0007 found the rollups closed to the raw rows'
    beginning."""
    users_from: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    """The per-user rollup and sketches of closed days (and of months from their first day) exist
    from here on (None: all of them); `build` moves it back a day at a time from where migration
    0009 found the days closed."""
    town_actions_from: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    """The sketches per town, action type and closed day exist from here on (None: all of them);
    `build` moves it back a day at a time from where migration 0012 found the days closed."""
    user_hours_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    """The user rows and sketch of the open day (from `days_closed_until`) hold its actions up to
    here, its closed hours (None: none); each hour's close adds to them, the day's close sums them
    anew (`rollup.open_user_day`; since 0013)."""
    closed_buckets_generation: Mapped[int] = mapped_column(BigInteger(), nullable=False, server_default="0")
    """Counts the writes that changed what closed buckets hold (late actions, prices, prune): a
    reader stores the rows of closed local buckets only if it has not moved since the snapshot they
    were read in (`closed_buckets`; since 0016)."""


class CreditClaimRow(Base):
    """Which call was charged the credits of the action above it, for calls that inherit them from an
    ancestor span (`POST /v1/traces`): one row per ancestor span, its first claim winning (since
    0015). A claim is written in the transaction that writes the call it charges, so every process
    of a server (`serve --workers`) charges an action once, and a claim never outlives a write that
    failed; `metric_id` names the call charged, and `timestamp` (that call's) lets `prune` remove
    the claims of the period it removes."""

    __tablename__ = "action_metrics_credit_claims"

    trace_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    """The ancestor span's trace id, 32 lowercase hex digits (as OTLP JSON writes it)."""
    span_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    """The ancestor span's id, 16 lowercase hex digits."""
    metric_id: Mapped[uuid.UUID] = mapped_column(Uuid(), nullable=False)
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)

    __table_args__ = (Index(None, "timestamp"),)


class ClosedBucketRow(Base):
    """A breakdown's rows for one closed bucket (a local day, week or month whose hours the rollups
    have closed), stored by the first reader that computed them and read back by the next, so that
    90 days of local days cost one row each instead of their rollup rows (since 0016). `question`
    says which breakdown (dimensions, bucket, zone, filters; `closed_buckets.question`); `rows` is
    that bucket's rows as JSON. Writes that change a closed bucket delete the rows from its end on.
    """

    __tablename__ = "action_metrics_closed_buckets"

    question: Mapped[str] = mapped_column(Text(), primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    bucket_end: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    rows: Mapped[str] = mapped_column(Text(), nullable=False)

    __table_args__ = (Index(None, "bucket_end"),)


EXPRESSION_INDEXES: Final = frozenset(
    {
        "ix_action_metrics_rollup_detail_day",
        "ix_action_metrics_rollup_detail_hour",
        "ix_action_metrics_rollup_time",
    }
)
"""Indexes migrations create, which the models do not declare: 0003's on expressions (the views' day
and hour; PostgreSQL), and 0008's of the rollup in time order with the sums (PostgreSQL's INCLUDE;
on SQLite since 0014, the sums after the key): `sketch_reads` joins each piece's rows by grain and
start, and the per-town view reads the open day's hours, from the index alone. Autogenerate cannot
compare them, so `compared_on` leaves them out (tests/test_migrations.py checks the last)."""


SQLITE_WIDER_INDEXES: Final = frozenset({"ix_action_metrics_town_id_timestamp"})
"""Indexes that carry more columns after their key on SQLite than the models declare (migration
0011: PostgreSQL's `INCLUDE`, which SQLAlchemy's Index cannot say for SQLite alone)."""

IncludeObject = Callable[[object, str | None, str, bool, object], bool]


def compared_on(dialect: str) -> IncludeObject:
    """alembic's `include_object` on `dialect`: everything but `EXPRESSION_INDEXES`, and on SQLite
    but `SQLITE_WIDER_INDEXES` (tests/test_migrations.py checks their columns on SQLite itself)."""
    left_out = EXPRESSION_INDEXES | (SQLITE_WIDER_INDEXES if dialect == "sqlite" else frozenset())

    def compared(item: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
        return not (type_ == "index" and name in left_out)

    return compared


action_metrics = cast(Table, ActionMetricRow.__table__)
model_prices = cast(Table, ModelPriceRow.__table__)
credit_prices = cast(Table, CreditPriceRow.__table__)
rollup = cast(Table, RollupRow.__table__)
rollup_detail = cast(Table, RollupDetailRow.__table__)
rollup_user = cast(Table, RollupUserRow.__table__)
latency_histogram = cast(Table, LatencyHistogramRow.__table__)
rollup_state = cast(Table, RollupStateRow.__table__)
latency_sketch = cast(Table, LatencySketchRow.__table__)
credit_claims = cast(Table, CreditClaimRow.__table__)
closed_buckets = cast(Table, ClosedBucketRow.__table__)

# The views, for building queries against them. They live in their own MetaData so that
# create_all() and autogenerate never mistake them for tables: migrations create them from sql/.
view_metadata = MetaData()

_METRIC_COLUMNS = [(column.name, column.type) for column in action_metrics.columns]

model_price_periods = Table(
    "model_price_periods",
    view_metadata,
    Column("model", String()),
    Column("effective_from", UTCDateTime()),
    Column("effective_until", UTCDateTime()),
    Column("input_per_1m", PRICE),
    Column("output_per_1m", PRICE),
    Column("cache_read_per_1m", PRICE),
    Column("cache_write_per_1m", PRICE),
)

credit_price_periods = Table(
    "credit_price_periods",
    view_metadata,
    Column("effective_from", UTCDateTime()),
    Column("effective_until", UTCDateTime()),
    Column("usd_per_credit", PRICE),
)

action_metrics_priced = Table(
    "action_metrics_priced",
    view_metadata,
    *(Column(name, type_) for name, type_ in _METRIC_COLUMNS),
    Column("cost_usd", MONEY),
    Column("revenue_usd", MONEY),
    Column("margin", Double()),
    Column("priced", Boolean()),
    Column("input_per_1m", PRICE),
    Column("output_per_1m", PRICE),
    Column("cache_read_per_1m", PRICE),
    Column("cache_write_per_1m", PRICE),
    Column("usd_per_credit", PRICE),
)


def _bucket_view(name: str, bucket: Column[Any], dimensions: tuple[str, ...]) -> Table:
    """The shape of a view with one row per time bucket, group (`dimensions` and model) and figure."""
    return Table(
        name,
        view_metadata,
        bucket,
        *(Column(dimension, String()) for dimension in (*dimensions, "model")),
        Column("count", BigInteger()),
        Column("tokens_in", BigInteger()),
        Column("tokens_out", BigInteger()),
        Column("credits_charged", BigInteger()),
        Column("cache_read_tokens", BigInteger()),
        Column("cache_write_tokens", BigInteger()),
        Column("reasoning_tokens", BigInteger()),
        Column("error_count", BigInteger()),
        Column("cost_usd", MONEY),
        Column("revenue_usd", MONEY),
        Column("unpriced_count", BigInteger()),
        Column("avg_latency_ms", Double()),
        Column("p50_latency_ms", Double()),
        Column("p95_latency_ms", Double()),
    )


_EVERY_GROUP = ("town_id", "action_type")
action_metrics_hourly = _bucket_view("action_metrics_hourly", Column("hour", UTCDateTime()), _EVERY_GROUP)
action_metrics_daily = _bucket_view("action_metrics_daily", Column("day", Date()), _EVERY_GROUP)
action_metrics_daily_by_town = _bucket_view(
    "action_metrics_daily_by_town", Column("day", Date()), ("town_id",)
)
action_metrics_daily_by_model = _bucket_view("action_metrics_daily_by_model", Column("day", Date()), ())
