"""Rollups: the dashboard's sums and latency histograms kept per hour and per day, so that the cost of
a question grows with the buckets it touches, not with the actions stored.

How they stay equal to the raw rows (TimescaleDB's real-time aggregates, kept in the write's own
transaction instead of by a scheduler):

- A bucket is *closed* once a batch of metrics has moved `CLOSE_DELAY` past its end: the batch's
  transaction sums the bucket's raw rows into the rollups, in bulk. Until then the bucket is *open*
  and readers take its raw rows. `action_metrics_rollup_state` says how far each grain is closed;
  readers read it and the data in one snapshot, so every action is counted once, from one side.
- Some levels grow as finer buckets close (`Level.filled_as`): the month being filled holds its
  closed days, and the day being filled, of every model and of each action type, its closed hours.
  Readers take such a level's open bucket as far as it reaches (`RollupState.filled_until`).
- A metric that arrives for a closed bucket (late) is added to the rollups by its own batch, once:
  ids already stored are skipped, as they are in the raw table.
- Money is not stored. Tokens and credits are, and priced when read by the price in force at each
  row's `start`. No row spans a price change: where a price starts inside a bucket the bucket's rows
  are split there, and a price set later inside a closed bucket rebuilds that bucket from raw rows.
- Percentiles come from logarithmic histograms (DDSketch): a latency x is counted in bin
  ceil(log_GAMMA(x)), whose representative value is within `RELATIVE_ACCURACY` of every latency in it,
  so any k-th smallest latency, and so any interpolated percentile, is too. Histograms of any
  buckets add up, which daily percentiles do not; raw rows of open buckets join them exactly.

A level is a grain and the dimensions it keeps (`Level`); the model is always kept. Which levels
exist is a trade between write cost and the questions they answer fast: see `LEVELS`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Double,
    Integer,
    MetaData,
    Select,
    Table,
    and_,
    bindparam,
    case,
    cast,
    delete,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    true,
    type_coerce,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import CreateTable, DropTable
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.selectable import CompoundSelect, Subquery

from action_metrics import latency_sketches, sketch
from action_metrics.dialects import Backend, sum_of_counts
from action_metrics.schema import (
    action_metrics,
    credit_prices,
    latency_histogram,
    latency_sketch,
    model_prices,
    rollup,
    rollup_detail,
    rollup_state,
    rollup_user,
)

Grain = Literal["hour", "day", "month"]
GRAIN_LENGTH: Final[dict[Grain, timedelta]] = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
"""The fixed-length grains' lengths (a month's is its own: `next_start`)."""
DIMENSIONS: Final = ("town_id", "action_type")
"""The dimensions a level may keep besides the model; '' in a rollup row means "all of them"."""
USER: Final = ("user_id",)
"""What the user levels keep besides the model, in a table of their own (`rollup_user`)."""

CLOSE_DELAY: Final = timedelta(minutes=5)
"""How far past a bucket's end a batch must reach before the bucket is closed: metrics emitted by
other processes a little before the batch's newest still land in the open bucket, not the late path."""
MAX_HOURS_CLOSED_PER_BATCH: Final = 48
MAX_DAYS_CLOSED_PER_BATCH: Final = 2
"""A batch closes every bucket it moved past, but at most this much of a backlog older than itself
(a database migrated with `--sql` and not yet built): catching up costs every batch a bounded amount
instead of one batch all of it."""
ACTIONS_CLOSED_PER_METRIC: Final = 4
MIN_ACTIONS_CLOSED_PER_BATCH: Final = 50_000
"""The buckets a batch moved past may hold far more actions than it brought: one old metric and one
new one over a history not yet built (an upgrade interrupted, or still building) spanned the whole
backlog, which one transaction then closed, holding the write lock for tens of seconds (other
writers on SQLite failed with "database is locked"). So a batch closes buckets holding at most
this many actions per metric it brings, and at least this many (or `MAX_*_CLOSED_PER_BATCH`
buckets); a batch of new actions in time order moves past little more than its own."""

STATE_ID: Final = 1
GRAINS: Final[tuple[Grain, ...]] = ("hour", "day", "month")
"""Finest first: a bucket closes after the finer buckets it is summed from."""

# --- the latency histogram's bins --------------------------------------------------------------


# The bins are `sketch`'s (this module bins raw rows in SQL the same way), known here by the same names.
RELATIVE_ACCURACY: Final = sketch.RELATIVE_ACCURACY
GAMMA: Final = sketch.GAMMA
LN_GAMMA: Final = sketch.LN_GAMMA
REPRESENTATIVE_FACTOR: Final = sketch.REPRESENTATIVE_FACTOR
ZERO_BIN: Final = sketch.ZERO_BIN
bin_of: Final = sketch.bin_of
bin_value_of: Final = sketch.bin_value_of


def latency_bin(latency_ms: ColumnElement[float]) -> ColumnElement[int]:
    exponent = func.ceil(func.ln(latency_ms) / literal(LN_GAMMA, Double))
    return case((latency_ms > 0, cast(exponent, Integer)), else_=literal(ZERO_BIN, Integer))


def bin_value(bin_column: ColumnElement[int]) -> ColumnElement[float]:
    """The latency a bin stands for: 2 * GAMMA**bin / (GAMMA + 1)."""
    scaled = func.exp(
        cast(bin_column, Double) * literal(LN_GAMMA, Double)
        + literal(math.log(REPRESENTATIVE_FACTOR), Double)
    )
    return type_coerce(case((bin_column == ZERO_BIN, literal(0.0, Double)), else_=scaled), Double)


# --- levels --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """A grain and the dimensions kept (the model always is); where its sums and histogram come from
    when a bucket closes: a finer level's rows, or (None) the raw rows."""

    grain: Grain
    keeps: tuple[str, ...]
    histogram: bool
    sums_from: Level | None = None
    histogram_from: Level | None = None
    filled_as: Grain | None = None
    """A finer grain whose buckets, as each closes, are added to this level's bucket holding them, so
    that its open bucket holds the closed ones (None: a bucket is summed when it closes)."""

    @property
    def table(self) -> Table:
        """Where its sums are kept: the levels of every town, action and model in a table of their own,
        ordered by time first, and the users' in another."""
        if self.keeps == USER:
            return rollup_user
        return rollup_detail if set(self.keeps) == set(DIMENSIONS) else rollup

    @property
    def dimensions(self) -> tuple[str, ...]:
        """The key columns of its table besides grain, start and model."""
        return USER if self.keeps == USER else DIMENSIONS

    def rows(self, table: Any) -> list[ColumnElement[bool]]:
        """WHERE terms selecting this level's rows of the rollup or histogram table."""
        return [table.c.grain == self.grain, *self.dimension_terms(table)]

    def dimension_terms(self, table: Any) -> list[ColumnElement[bool]]:
        """`rows` but the grain's: the dimensions it keeps are set, the others ''."""
        if self.keeps == USER:
            return []  # every row of the users' table keeps the user
        return [
            table.c[dimension] != "" if dimension in self.keeps else table.c[dimension] == ""
            for dimension in DIMENSIONS
        ]


HOURLY: Final = Level("hour", (), histogram=True)
"""Per model and hour: every question without a town or action filter over part of a day."""
HOURLY_DETAIL: Final = Level("hour", DIMENSIONS, histogram=False)
"""Per town, action, model and hour: the `action_metrics_hourly` view."""
HOURLY_BY_TOWN: Final = Level("hour", ("town_id",), histogram=False, sums_from=HOURLY_DETAIL)
"""Per town, model and hour: the edge hours of a town's local day, added to or subtracted from a UTC
day's sums (`sketch_reads`); its percentiles are the town/hour sketches."""
DAILY: Final = Level("day", (), histogram=True, sums_from=HOURLY, histogram_from=HOURLY, filled_as="hour")
"""Per model and day, the day being filled holding its closed hours: everything over all time reads
its rows of today (5 models' ~1k histogram rows) rather than today's hours' (~10k late in the day)."""
DAILY_DETAIL: Final = Level("day", DIMENSIONS, histogram=False, sums_from=HOURLY_DETAIL)
"""Per town, action, model and day: the `action_metrics_daily` view."""
DAILY_BY_TOWN: Final = Level("day", ("town_id",), histogram=True, sums_from=DAILY_DETAIL)
DAILY_BY_ACTION: Final = Level(
    "day", ("action_type",), histogram=True, sums_from=HOURLY_DETAIL, filled_as="hour"
)
"""Per action type, model and day, the day being filled holding its closed hours (its histogram from
their raw rows as they close): an action type over all time reads the raw rows of the open hour only,
not today's (~9k of lod3 at 10M actions late in the day, 50-110 ms), and no level per action and
hour (~0.6 histogram rows per action) is kept for it."""
DAILY_BY_USER: Final = Level("day", USER, histogram=False)
"""Per user, model and day, from the raw rows (no finer level keeps the user); its percentiles are
the user/day sketches."""
MONTHLY: Final = Level("month", (), histogram=True, sums_from=DAILY, histogram_from=DAILY, filled_as="day")
"""Per model and month, from its closed days: everything or one model over all time reads the rows of
~4 months (the month being filled holds its closed days) and the hours since, instead of ~90 days
(at 10M actions over 90 days the day histograms of 5 models are ~105k rows, ~70 ms of SQLite's 130
for everything over all time; the months' ~4k)."""
MONTHLY_BY_ACTION: Final = Level(
    "month",
    ("action_type",),
    histogram=True,
    sums_from=DAILY_BY_ACTION,
    histogram_from=DAILY_BY_ACTION,
    filled_as="day",
)
MONTHLY_BY_USER: Final = Level("month", USER, histogram=False, sums_from=DAILY_BY_USER, filled_as="day")
"""Per user, model and month, from its days: by user over all time reads ~3 months of these and the
days since, instead of ~90 days (1,000 users x 5 models: 15k rows rather than 450k)."""

LEVELS: Final = (
    HOURLY,
    HOURLY_DETAIL,
    HOURLY_BY_TOWN,
    DAILY,
    DAILY_DETAIL,
    DAILY_BY_TOWN,
    DAILY_BY_ACTION,
    DAILY_BY_USER,
    MONTHLY,
    MONTHLY_BY_ACTION,
    MONTHLY_BY_USER,
)
"""Every level, each after the levels it is summed from. A town or action filter over part of a day
reads raw rows through their indexes (a town's day is ~1/50 of the actions): hourly levels per town
or action would be nearly as large as the raw table at 50 towns x 11 actions x 5 models; instead the
day of every model and of each action type is filled as its hours close, so that over all time
only the open hour is raw. Months are kept where a day's rows are many (every model's histogram, an
action type's, a user's sums): a town's days are few enough (its histogram per day is ~1/50 of
everything's)."""


def levels_of(grain: Grain) -> tuple[Level, ...]:
    return tuple(level for level in LEVELS if level.grain == grain)


def closing_with(grain: Grain) -> tuple[Level, ...]:
    """The levels a closing `grain` bucket is added to: its grain's own, but those filled as a finer
    grain closes, and those filled as it closes (`Level.filled_as`); each after its sources."""
    return tuple(level for level in LEVELS if (level.filled_as or level.grain) == grain)


def reading_level(grain: Grain, kept: Iterable[str]) -> Level | None:
    """The smallest level with a histogram that keeps every filtered dimension, if any."""
    wanted = set(kept)
    candidates = [level for level in levels_of(grain) if level.histogram and wanted <= set(level.keeps)]
    return min(candidates, key=lambda level: len(level.keeps), default=None)


# --- the sums kept per row ------------------------------------------------------------------------


def raw_sums(rows: Any) -> dict[str, ColumnElement[Any]]:
    """Each rollup sum as the expression summed over raw action rows. Adding one here (and its
    column, by a migration) is all a new summed figure needs."""
    c = rows.c
    credited = c.credits_charged > 0
    per_credit = {
        f"{tokens}_per_credit": case(
            (credited, cast(c[tokens], Double) / c.credits_charged), else_=literal(0.0, Double)
        )
        for tokens in PRICED_TOKENS
    }
    return {
        "count": literal(1, BigInteger),
        "tokens_in": c.tokens_in,
        "tokens_out": c.tokens_out,
        "credits_charged": c.credits_charged,
        "latency_ms_sum": c.latency_ms,
        "cache_read_tokens": c.cache_read_tokens,
        "cache_write_tokens": c.cache_write_tokens,
        "reasoning_tokens": c.reasoning_tokens,
        "error_count": case((c.error.is_not(None), 1), else_=0),
        "credited_count": case((credited, 1), else_=0),
        **per_credit,
    }


PRICED_TOKENS: Final = ("tokens_in", "tokens_out", "cache_read_tokens", "cache_write_tokens")
"""The token counts a price applies to (reasoning tokens are priced as the output they are part of)."""


SUM_COLUMNS: Final = tuple(raw_sums(action_metrics))
KEY_COLUMNS: Final = ("grain", "town_id", "action_type", "start", "model")
assert all(
    {c.name for c in table.columns} == {*KEY_COLUMNS, *SUM_COLUMNS} for table in (rollup, rollup_detail)
)
assert {c.name for c in rollup_user.columns} == {"grain", *USER, "start", "model", *SUM_COLUMNS}


# --- state ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RollupState:
    """How far the rollups reach (see `RollupStateRow`)."""

    hours_closed_until: datetime | None = None
    days_closed_until: datetime | None = None
    raw_kept_from: datetime | None = None
    sketches_from: datetime | None = None
    users_from: datetime | None = None
    town_actions_from: datetime | None = None
    user_hours_until: datetime | None = None

    def closed_until(self, grain: Grain) -> datetime | None:
        """A month's rows hold its closed days: months are closed as far as days are."""
        return self.hours_closed_until if grain == "hour" else self.days_closed_until

    def filled_until(self, level: Level) -> datetime | None:
        """How far `level`'s rows hold the actions: to the end of its grain's closed buckets, or of
        the finer ones it is filled as (its open bucket holding those)."""
        return self.closed_until(level.filled_as or level.grain)


async def read_state(connection: AsyncConnection, *, for_update: bool = False) -> RollupState:
    """The state row; `for_update` also makes concurrent writers wait their turn (PostgreSQL; a
    SQLite writer already holds the database's write lock)."""
    statement = select(
        rollup_state.c.hours_closed_until,
        rollup_state.c.days_closed_until,
        rollup_state.c.raw_kept_from,
        rollup_state.c.sketches_from,
        rollup_state.c.users_from,
        rollup_state.c.town_actions_from,
        rollup_state.c.user_hours_until,
    ).where(rollup_state.c.id == STATE_ID)
    if for_update:
        statement = statement.with_for_update()
    row = (await connection.execute(statement)).one()
    return RollupState(*row)


async def _write_state(connection: AsyncConnection, state: RollupState) -> None:
    await connection.execute(
        update(rollup_state)
        .where(rollup_state.c.id == STATE_ID)
        .values(
            hours_closed_until=state.hours_closed_until,
            days_closed_until=state.days_closed_until,
            raw_kept_from=state.raw_kept_from,
            sketches_from=state.sketches_from,
            users_from=state.users_from,
            town_actions_from=state.town_actions_from,
            user_hours_until=state.user_hours_until,
        )
    )


# --- time ------------------------------------------------------------------------------------------


def floor_to(moment: datetime, grain: Grain) -> datetime:
    moment = moment.astimezone(UTC)
    floored = moment.replace(minute=0, second=0, microsecond=0)
    if grain == "month":
        return floored.replace(day=1, hour=0)
    return floored.replace(hour=0) if grain == "day" else floored


def next_start(start: datetime, grain: Grain) -> datetime:
    """The start of the bucket after the one starting at `start` (the end of time when there is none)."""
    if grain != "month":
        return END_OF_TIME if END_OF_TIME - start < GRAIN_LENGTH[grain] else start + GRAIN_LENGTH[grain]
    if start.year == END_OF_TIME.year and start.month == 12:
        return END_OF_TIME
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def ceil_to(moment: datetime, grain: Grain) -> datetime:
    """The first bucket start at or after `moment` (the end of time when there is none)."""
    floored = floor_to(moment, grain)
    return floored if floored == moment else next_start(floored, grain)


END_OF_TIME: Final = datetime.max.replace(tzinfo=UTC)


# --- filling levels --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """Which source rows a fill takes: a time range (on the raw timestamp, or a rollup row's start),
    and optionally one model, or exactly these action ids (late metrics; raw rows only)."""

    since: datetime | None
    until: datetime | None
    model: str | None = None
    ids: tuple[Any, ...] | None = None

    @property
    def shape(self) -> tuple[bool, bool, bool, bool]:
        """Which of since, until, model and ids are given: all a statement of `bound_terms` depends on."""
        return (self.since is not None, self.until is not None, self.model is not None, self.ids is not None)

    def bound_terms(
        self,
        moment: ColumnElement[Any],
        model: ColumnElement[str],
        ids: ColumnElement[Any] | None = None,
    ) -> list[ColumnElement[bool]]:
        """WHERE terms selecting the scope's rows by their `moment` and `model` (and, given their
        column, `ids`), the values bound by name (`parameters`): a statement of them is built once
        per shape (`_reused`)."""
        terms: list[ColumnElement[bool]] = []
        if self.since is not None:
            terms.append(moment >= bindparam("scope_since"))
        if self.until is not None:
            terms.append(moment < bindparam("scope_until"))
        if self.model is not None:
            terms.append(model == bindparam("scope_model"))
        if self.ids is not None:
            assert ids is not None, "a scope of ids selects raw rows"
            terms.append(ids.in_(bindparam("scope_ids", expanding=True)))
        return terms

    @property
    def parameters(self) -> dict[str, Any]:
        """The values `bound_terms` binds."""
        values: dict[str, Any] = {
            "scope_since": self.since,
            "scope_until": self.until,
            "scope_model": self.model,
        }
        parameters = {name: value for name, value in values.items() if value is not None}
        if self.ids is not None:
            parameters["scope_ids"] = list(self.ids)
        return parameters


E = TypeVar("E", bound=Executable)
_built: dict[tuple[Any, ...], Any] = {}
_built_lock = threading.Lock()


def _reused(key: tuple[Any, ...], build: Callable[[], E]) -> E:
    """`build()`, once per process for `key`: the fill statements are rebuilt for every bucket closed
    and every late batch otherwise, and building them (not running them) took most of a small batch's
    time. A statement holds no values (`Scope.bound_terms`), no engine and no URL, so every store on
    the same kind of database (`key` holds the backend's class) shares it; its cache key is memoized
    and its compiled form kept in each engine's compiled cache."""
    with _built_lock:
        statement = _built.get(key)
    if statement is None:  # built outside the lock: two threads may both build it, alike
        built = build()
        with _built_lock:
            statement = _built.setdefault(key, built)
    return statement  # type: ignore[no-any-return]


_scratch_columns = [
    Column("town_id", rollup.c.town_id.type),
    Column("action_type", rollup.c.action_type.type),
    Column("user_id", rollup_user.c.user_id.type),
    Column("model", rollup.c.model.type),
    Column("at", rollup.c.start.type),
    *(Column(name, rollup.c[name].type) for name in SUM_COLUMNS),
    Column("bin", latency_histogram.c.bin.type),
]
_scratch = Table(
    "action_metrics_rollup_scratch",
    MetaData(),
    *_scratch_columns,
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)
"""The raw rows being summed, read once with their sums' terms and latency bin, then summed into
every level: one pass over the raw table instead of one per level."""


def _raw_rows(scope: Scope) -> Select[Any]:
    """The scope's raw rows as the scratch table holds them: keys, sums' terms and latency bin (the
    scope's values bound by name: `Scope.parameters`)."""
    m = action_metrics
    where = scope.bound_terms(m.c.timestamp, m.c.model, m.c.id)
    sums = raw_sums(m)
    return select(
        m.c.town_id,
        m.c.action_type,
        m.c.user_id,
        m.c.model,
        m.c.timestamp.label("at"),
        *(sums[name].label(name) for name in SUM_COLUMNS),
        # The histograms describe successful actions: a failed one has no bin.
        case((m.c.error.is_(None), latency_bin(m.c.latency_ms))).label("bin"),
    ).where(*where)


async def _copy_raw_rows(connection: AsyncConnection, scope: Scope) -> None:
    await connection.execute(CreateTable(_scratch))
    columns = [column.name for column in _scratch_columns]
    statement = _reused(
        ("scratch", scope.shape), lambda: insert(_scratch).from_select(columns, _raw_rows(scope))
    )
    await connection.execute(statement, scope.parameters)


def _raw_source(*, histogram: bool) -> Subquery:
    s = _scratch
    measures = ("bin",) if histogram else SUM_COLUMNS
    counted = (literal(1, BigInteger).label("count"),) if histogram else ()
    keys = (s.c.town_id, s.c.action_type, s.c.user_id, s.c.model, s.c.at)
    rows = select(*keys, *(s.c[name] for name in measures), *counted)
    return (rows.where(s.c.bin.is_not(None)) if histogram else rows).subquery("source")


def _level_source(finer: Level, scope: Scope, *, histogram: bool) -> Subquery:
    table = latency_histogram if histogram else finer.table
    measures = ("bin", "count") if histogram else SUM_COLUMNS
    return (
        select(
            *(table.c[dimension] for dimension in finer.dimensions),
            table.c.model,
            table.c.start.label("at"),
            *(table.c[name] for name in measures),
        )
        .where(*finer.rows(table), *scope.bound_terms(table.c.start, table.c.model))
        .subquery("source")
    )


def price_start(model: ColumnElement[str], moment: ColumnElement[Any]) -> ColumnElement[Any]:
    """When the price of `model` in force at `moment` began (NULL when unpriced)."""
    p = model_prices
    return (
        select(func.max(p.c.effective_from))
        .where(p.c.model == model, p.c.effective_from <= moment)
        .scalar_subquery()
    )


def credit_price_start(moment: ColumnElement[Any]) -> ColumnElement[Any]:
    c = credit_prices
    return select(func.max(c.c.effective_from)).where(c.c.effective_from <= moment).scalar_subquery()


def _kept(level: Level, source: Subquery) -> list[ColumnElement[str]]:
    return [
        source.c[dimension] if dimension in level.keeps else literal("", rollup.c[dimension].type)
        for dimension in level.dimensions
    ]


def _summed_into(
    table: Table,
    level: Level,
    source: Subquery,
    start: ColumnElement[Any],
    extra_keys: tuple[str, ...],
    summed: tuple[str, ...],
    backend: Backend,
    merge: bool,
) -> Any:
    """INSERT ... SELECT of `source`'s `summed` columns into `level`'s rows of `table`, grouped by
    the level's keys (and `extra_keys`); adding to rows already there if `merge` (buckets being
    closed have none: a plain INSERT is cheaper)."""
    keyed = select(
        *(column.label(name) for name, column in zip(level.dimensions, _kept(level, source), strict=True)),
        start.label("start"),
        source.c.model,
        *(source.c[name] for name in (*extra_keys, *summed)),
    ).subquery("keyed")
    k = keyed.c
    key_names = (*level.dimensions, "start", "model", *extra_keys)
    keys = [k[name] for name in key_names]
    grouped = select(
        literal(level.grain, table.c.grain.type).label("grain"),
        *keys,
        *(sum_of_counts(k[name]).label(name) for name in summed),
    ).group_by(*keys)
    insert = backend.insert(table).from_select(["grain", *key_names, *summed], grouped)
    if not merge:
        return insert
    return insert.on_conflict_do_update(
        index_elements=["grain", *key_names],
        set_={name: table.c[name] + insert.excluded[name] for name in summed},
    )


def _fill_sums(level: Level, source: Subquery, backend: Backend, *, split: bool, merge: bool) -> Any:
    start = backend.bucket_start(source.c.at, level.grain)
    if split:  # a price began inside a bucket: rows start at the latest of bucket and price starts
        at = source.c.at
        start = backend.greatest(start, price_start(source.c.model, at), credit_price_start(at))
    return _summed_into(level.table, level, source, start, (), SUM_COLUMNS, backend, merge)


def _fill_histogram(level: Level, source: Subquery, backend: Backend, *, merge: bool) -> Any:
    start = backend.bucket_start(source.c.at, level.grain)
    return _summed_into(latency_histogram, level, source, start, ("bin",), ("count",), backend, merge)


def _fill_statement(
    backend: Backend,
    level: Level,
    origin: Level | Literal["raw", "scratch"],
    scope: Scope,
    *,
    histogram: bool,
    split: bool,
    merge: bool,
) -> Executable:
    """The INSERT adding the scope's rows of `origin` (a finer level, the raw rows, or the scratch
    table's copy of them) to `level`'s sums or histogram; built once per process (`_reused`)."""

    def build() -> Executable:
        if origin == "scratch":
            source = _raw_source(histogram=histogram)
        elif origin == "raw":
            source = _raw_rows(scope).subquery("source")
        else:
            source = _level_source(origin, scope, histogram=histogram)
        if histogram:
            return _fill_histogram(level, source, backend, merge=merge)  # type: ignore[no-any-return]
        return _fill_sums(level, source, backend, split=split, merge=merge)  # type: ignore[no-any-return]

    shape = () if origin == "scratch" else scope.shape
    return _reused(("fill", type(backend), level, origin, shape, histogram, split, merge), build)


async def _prices_start_inside(connection: AsyncConnection, grain: Grain, scope: Scope) -> bool:
    """Whether a model or credit price begins strictly inside a `grain` bucket of the scope's range:
    from the start of the bucket holding `since` (a late metric at 23:50 goes into the day's row that
    a price starting at 07:13 split, not the one from midnight)."""
    since = None if scope.since is None else floor_to(scope.since, grain)
    model_starts = select(model_prices.c.effective_from.label("at")).where(
        *range_terms(model_prices.c.effective_from, since, scope.until)
    )
    if scope.model is not None:
        model_starts = model_starts.where(model_prices.c.model == scope.model)
    credit_starts = select(credit_prices.c.effective_from.label("at")).where(
        *range_terms(credit_prices.c.effective_from, since, scope.until)
    )
    moments = (await connection.execute(union_all(model_starts, credit_starts))).scalars().all()
    return any(moment != floor_to(moment, grain) for moment in moments)


async def fill(
    connection: AsyncConnection,
    backend: Backend,
    levels: Sequence[Level],
    scope: Scope,
    *,
    closing: bool,
    histograms: bool = True,
    sketch_levels: Sequence[latency_sketches.SketchLevel] | None = None,
) -> None:
    """Add the scope's actions to `levels` (in order). When `closing` the buckets have no rows yet
    (but those of levels filled as finer buckets close, which are added to), and each level sums a
    finer level's rows where it has one; otherwise (late metrics, rebuilds) every level sums the raw
    rows and adds to its rows. `histograms=False` fills the sums only; `sketch_levels` are the
    sketches filled (None: every one of the levels' grains)."""
    grains = {level.grain for level in levels}
    split = {grain: await _prices_start_inside(connection, grain, scope) for grain in grains}
    copied = False
    for level in levels:
        merge = not closing or level.filled_as is not None
        sources = [(False, level.sums_from)] + (
            [(True, level.histogram_from)] if level.histogram and histograms else []
        )
        for histogram, finer in sources:
            origin: Level | Literal["raw", "scratch"]
            if finer is not None and closing:
                origin = finer
            elif not copied and level.keeps == USER:
                # A closing day's user rows are the only ones summed from raw rows: read them where
                # they are rather than copy a day of them.
                origin = "raw"
            else:
                if not copied:
                    await _copy_raw_rows(connection, scope)
                    copied = True
                origin = "scratch"
            statement = _fill_statement(
                backend, level, origin, scope, histogram=histogram, split=split[level.grain], merge=merge
            )
            await connection.execute(statement, {} if origin == "scratch" else scope.parameters)
    if sketch_levels is None:
        sketch_levels = latency_sketches.levels_of(sorted(grains))
    if histograms:
        for sketch_level in sketch_levels:
            if copied:  # the raw rows are binned in the scratch table already
                binned = await connection.execute(_scratch_bins(sketch_level, backend))
                await latency_sketches.add(connection, backend, sketch_level, binned.all(), new=closing)
            elif closing and sketch_level.finer is not None and scope.since is not None and scope.until:
                await latency_sketches.add_from_finer(
                    connection, backend, sketch_level, scope.since, scope.until
                )
            else:
                await _write_sketches(connection, backend, sketch_level, scope, new=closing)
    if copied:
        await connection.execute(DropTable(_scratch))


async def _write_sketches(
    connection: AsyncConnection,
    backend: Backend,
    level: latency_sketches.SketchLevel,
    scope: Scope,
    *,
    new: bool,
) -> None:
    binned = await connection.execute(_sketch_bins(level, scope, backend), scope.parameters)
    await latency_sketches.add(connection, backend, level, binned.all(), new=new)


def _scratch_bins(level: latency_sketches.SketchLevel, backend: Backend) -> Select[Any]:
    """`_sketch_bins` of the raw rows copied to the scratch table (their bins computed once)."""
    return _reused(("scratch bins", type(backend), level), lambda: _build_scratch_bins(level, backend))


def _build_scratch_bins(level: latency_sketches.SketchLevel, backend: Backend) -> Select[Any]:
    s = _scratch
    binned = (
        select(
            level.key_of(s.c).label("key"),
            backend.bucket_start(s.c.at, level.grain).label("start"),
            s.c.bin,
            s.c.latency_ms_sum.label("latency_ms"),
        )
        .where(s.c.bin.is_not(None))
        .subquery("binned")
    )
    return _per_sketch(binned, backend)


def _sketch_bins(level: latency_sketches.SketchLevel, scope: Scope, backend: Backend) -> Select[Any]:
    """The scope's successful actions' latencies binned per key of the sketch level and bucket (the
    scope's values bound by name: `Scope.parameters`)."""
    return _reused(
        ("sketch bins", type(backend), level, scope.shape), lambda: _build_sketch_bins(level, scope, backend)
    )


def _build_sketch_bins(level: latency_sketches.SketchLevel, scope: Scope, backend: Backend) -> Select[Any]:
    m = action_metrics
    where = [*scope.bound_terms(m.c.timestamp, m.c.model, m.c.id), m.c.error.is_(None)]
    binned = (
        select(
            level.key_of(m.c).label("key"),
            backend.bucket_start(m.c.timestamp, level.grain).label("start"),
            latency_bin(m.c.latency_ms).label("bin"),
            m.c.latency_ms,
        )
        .where(*where)
        .subquery("binned")
    )
    return _per_sketch(binned, backend)


def _per_sketch(binned: Subquery, backend: Backend) -> Select[Any]:
    """Binned latencies (key, start, bin, latency_ms) counted per bin, then one row per sketch (key
    and bucket start): its bins and their counts as two lists (`Backend.int_list`) and the latencies'
    sum (`latency_sketches.SketchRow`). A row per bin made each close fetch and convert ~3.7 rows
    per action in Python (200k actions of the dashboard shape: 734k rows, ~2.5 s of 11 s)."""
    b = binned.c
    per_bin = (
        select(b.key, b.start, b.bin, func.count().label("n"), func.sum(b.latency_ms).label("latency"))
        .group_by(b.key, b.start, b.bin)
        .subquery("per_bin")
    )
    p = per_bin.c
    return select(
        p.key,
        p.start,
        backend.int_list(p.bin).label("bins"),
        backend.int_list(p.n).label("counts"),
        func.sum(p.latency).label("latency_sum"),
    ).group_by(p.key, p.start)


# --- the write path ----------------------------------------------------------------------------------


async def _next_timestamp(connection: AsyncConnection, since: datetime | None) -> datetime | None:
    """The first raw timestamp at or after `since`: closing skips the empty time before it."""
    m = action_metrics
    statement = select(func.min(m.c.timestamp)).where(*range_terms(m.c.timestamp, since, None))
    result: datetime | None = (await connection.execute(statement)).scalar()
    return result


async def close(
    connection: AsyncConnection,
    backend: Backend,
    state: RollupState,
    reach: datetime,
    *,
    batch_since: datetime | None = None,
    batch_size: int = 0,
    max_hours: int = MAX_HOURS_CLOSED_PER_BATCH,
    max_days: int = MAX_DAYS_CLOSED_PER_BATCH,
) -> RollupState:
    """Close the buckets that end at or before `reach`, within the connection's transaction; the
    new state, not yet written. Buckets before `batch_since` (the oldest metric of the batch doing
    this; None: all of them) are a backlog, closed `max_hours` hours and `max_days` days at a time;
    the buckets a batch of `batch_size` metrics moved past, at most those holding
    `ACTIONS_CLOSED_PER_METRIC` actions per metric (`MIN_ACTIONS_CLOSED_PER_BATCH` at least)."""
    budget = max(MIN_ACTIONS_CLOSED_PER_BATCH, ACTIONS_CLOSED_PER_METRIC * batch_size)
    hours = await _close_grain(
        connection,
        backend,
        "hour",
        state.hours_closed_until,
        floor_to(reach, "hour"),
        batch_since,
        max_hours,
        budget,
    )
    reached = state.user_hours_until
    if (
        reached is not None
        and state.days_closed_until is not None
        and floor_to(hours, "day") > state.days_closed_until
    ):
        # The open day closes: its user rows are summed anew from its raw rows, as any closing day's.
        await _clear_user_day(connection, state.days_closed_until)
        reached = None
    days = await _close_grain(
        connection,
        backend,
        "day",
        state.days_closed_until,
        floor_to(hours, "day"),
        batch_since,
        max_days,
        budget,
    )
    reached = await _add_hours_to_open_day(connection, backend, reached, days, hours)
    return replace(state, hours_closed_until=hours, days_closed_until=days, user_hours_until=reached)


USER_HOURS_STEP: Final = timedelta(hours=6)
"""How many of the open day's closed hours its user rows take at a time. Each addition reads and
writes back the sketch of every user active since the last (~1,000 at 10M actions over 90 days,
~0.1 s on SQLite): every hour that cost as much as the writes themselves in that shape; every six
hours by user reads at most ~7 hours of raw rows (~30k actions)."""


def open_user_day(state: RollupState) -> tuple[datetime, datetime] | None:
    """[the open day's start, how far its user rows reach), when they hold any of its closed hours:
    the user levels' day rows and sketches of the day being filled, which by user reads as it reads
    a closed day's (the actions after it raw), instead of ~100k raw rows late in the day."""
    day, reached = state.days_closed_until, state.user_hours_until
    if day is None or reached is None or not day < reached <= day + GRAIN_LENGTH["day"]:
        return None
    return day, reached


async def _add_hours_to_open_day(
    connection: AsyncConnection,
    backend: Backend,
    reached: datetime | None,
    day: datetime,
    hours: datetime,
) -> datetime | None:
    """Add the open day's hours closed since `reached` (None: since the day began) to its user rows
    and sketches, `USER_HOURS_STEP` at a time; how far they reach now (None: nothing of it)."""
    closed = min(hours, day + GRAIN_LENGTH["day"])
    since = reached if reached is not None and day < reached <= closed else day
    until = max(since, day + (closed - day) // USER_HOURS_STEP * USER_HOURS_STEP)
    if until <= day:
        return None
    if since == day:  # from the day's start: whatever rows it had are not known to hold anything
        await _clear_user_day(connection, day)
    if since < until:
        await fill(
            connection,
            backend,
            [DAILY_BY_USER],
            Scope(since, until),
            closing=False,
            sketch_levels=[latency_sketches.USER_DAILY],
        )
    return until


async def _clear_user_day(connection: AsyncConnection, day: datetime) -> None:
    """Delete the user rows and sketches of the day starting at `day`."""
    end = day + GRAIN_LENGTH["day"]
    await _clear(connection, "day", Scope(day, end), [rollup_user])
    s = latency_sketch
    await connection.execute(
        delete(s).where(s.c.level == latency_sketches.USER_DAILY.name, *range_terms(s.c.start, day, end))
    )


async def _close_grain(
    connection: AsyncConnection,
    backend: Backend,
    grain: Grain,
    closed: datetime | None,
    target: datetime,
    batch_since: datetime | None,
    most: int,
    budget: int,
) -> datetime:
    """Fill the levels of `grain` from `closed` (None: the beginning) up to `target`, skipping the
    buckets without actions; a backlog at most `most` buckets at a time, a batch's buckets at most
    those holding `budget` actions (or `most` buckets). How far it got."""
    if closed is not None and closed >= target:
        return closed
    following = await _next_timestamp(connection, closed)
    if following is None or following >= target:
        return target
    since = floor_to(following, grain)
    bounded = since + most * GRAIN_LENGTH[grain]
    backlog = batch_since is None or since + GRAIN_LENGTH[grain] < floor_to(batch_since, grain)
    if backlog:
        until = min(target, bounded)
    else:
        beyond = await _timestamp_after(connection, since, budget)
        until = target if beyond is None else min(target, max(bounded, floor_to(beyond, grain)))
    scope = Scope(since, until)
    # The buckets closing are added to the levels filled as they close (the day being filled holds its
    # closed hours, the month its closed days): rows, histograms, and the months' user sketches.
    sketches = latency_sketches.levels_of([grain])
    await fill(connection, backend, closing_with(grain), scope, closing=True, sketch_levels=sketches)
    for sketch_level in latency_sketches.levels_of(SKETCHES_CLOSING_WITH[grain]):
        if sketch_level.grain != grain:  # a month's, holding its closed days
            await latency_sketches.add_from_finer(connection, backend, sketch_level, since, until, new=False)
    return until


SKETCHES_CLOSING_WITH: Final[dict[Grain, tuple[str, ...]]] = {
    "hour": ("hour",),
    "day": ("day", "month"),
    "month": (),
}
"""The grains of the sketches a closing bucket of each grain is added to: its own grain's (a new
sketch each), and the month's, which holds its closed days as the month levels do (`closing_with`)."""


async def _timestamp_after(connection: AsyncConnection, since: datetime, actions: int) -> datetime | None:
    """The timestamp of the action that follows the first `actions` at or after `since` (None: there
    are no more): read through the time index, as far as those actions."""
    m = action_metrics
    statement = (
        select(m.c.timestamp)
        .where(*range_terms(m.c.timestamp, since, None))
        .order_by(m.c.timestamp)
        .offset(actions)
        .limit(1)
    )
    result: datetime | None = (await connection.execute(statement)).scalar()
    return result


async def write_state(connection: AsyncConnection, before: RollupState, after: RollupState) -> None:
    if after != before:
        await _write_state(connection, after)


async def add_late(
    connection: AsyncConnection, backend: Backend, state: RollupState, ids: Sequence[Any], since: datetime
) -> None:
    """Add newly stored actions with these ids (all from `since` on) to every level whose buckets
    holding them are closed, and to the open day's user rows where they reach."""
    for grain in GRAINS:
        closed, levels = state.closed_until(grain), closing_with(grain)
        if not levels or closed is None or since >= closed:
            continue
        sketches = latency_sketches.levels_of(SKETCHES_CLOSING_WITH[grain])
        for chunk in _chunks(ids, 5_000):
            scope = Scope(since, closed, ids=tuple(chunk))
            await fill(connection, backend, levels, scope, closing=False, sketch_levels=sketches)
    open_day = open_user_day(state)
    if open_day is not None and since < open_day[1]:
        for chunk in _chunks(ids, 5_000):
            await fill(
                connection,
                backend,
                [DAILY_BY_USER],
                Scope(*open_day, ids=tuple(chunk)),
                closing=False,
                sketch_levels=[latency_sketches.USER_DAILY],
            )


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def stored_ids(connection: AsyncConnection, ids: Sequence[Any]) -> set[Any]:
    """Which of `ids` are already in action_metrics."""
    found: set[Any] = set()
    for chunk in _chunks(ids, 5_000):
        result = await connection.execute(select(action_metrics.c.id).where(action_metrics.c.id.in_(chunk)))
        found.update(result.scalars())
    return found


# --- prices set afterwards -------------------------------------------------------------------------


def closed_buckets_split_by(state: RollupState, moment: datetime) -> list[tuple[Grain, datetime]]:
    """The buckets with rows a price beginning at `moment` falls strictly inside: closed ones, and
    those being filled with closed finer ones (the open day's closed hours, the month's days)."""
    split: list[tuple[Grain, datetime]] = []
    for grain in GRAINS:
        start = floor_to(moment, grain)
        if start != moment and _levels_holding(state, grain, start):
            split.append((grain, start))
    return split


def _levels_holding(state: RollupState, grain: Grain, start: datetime) -> list[tuple[Level, datetime]]:
    """The levels of `grain` whose rows hold actions of the bucket at `start`, with how far they do."""
    held = []
    for level in levels_of(grain):
        reach = state.filled_until(level)
        if reach is not None and start < reach:
            held.append((level, reach))
    return held


async def rebuild(
    connection: AsyncConnection,
    backend: Backend,
    state: RollupState,
    buckets: Sequence[tuple[Grain, datetime]],
    model: str | None,
) -> None:
    """Sum these buckets again from the raw rows (one model's, or all), splitting rows at every
    price that begins inside them, each level as far as it holds them (the day being filled, its
    closed hours); a month from its closed days, rebuilt before it (so a month whose first days were
    pruned is split too; the open day's user rows are not the month's yet). The histograms do not
    depend on prices and stay."""
    for grain, start in buckets:
        held = _levels_holding(state, grain, start)
        levels = [level for level, _ in held]
        until = min([next_start(start, grain), *(reach for _, reach in held)])
        scope = Scope(start, until, model=model)
        for level in levels:
            table = level.table
            await connection.execute(
                delete(table).where(*level.rows(table), *scope.bound_terms(table.c.start, table.c.model)),
                scope.parameters,
            )
        await fill(connection, backend, levels, scope, closing=grain == "month", histograms=False)


async def split_open_user_day(
    connection: AsyncConnection, backend: Backend, state: RollupState, moment: datetime, model: str | None
) -> None:
    """A price beginning at `moment`, inside the hours the open day's user rows hold: sum them anew
    (one model's, or all) from the raw rows, split there."""
    open_day = open_user_day(state)
    if open_day is None or not open_day[0] < moment < open_day[1]:
        return
    day, reached = open_day
    await _clear(connection, "day", Scope(day, day + GRAIN_LENGTH["day"], model=model), [rollup_user])
    await fill(
        connection, backend, [DAILY_BY_USER], Scope(day, reached, model=model), closing=True, histograms=False
    )


async def _clear(
    connection: AsyncConnection,
    grain: Grain,
    scope: Scope,
    tables: Sequence[Table] = (rollup, rollup_detail, rollup_user),
) -> None:
    """Delete the sums of `grain`'s levels in the scope (of these tables)."""
    for table in tables:
        where = [table.c.grain == grain, *scope.bound_terms(table.c.start, table.c.model)]
        await connection.execute(delete(table).where(*where), scope.parameters)


# --- reading -----------------------------------------------------------------------------------------

Range = tuple[datetime | None, datetime | None]
"""[since, until): None is minus or plus infinity."""


@dataclass(frozen=True)
class ReadPlan:
    """Where each part of a window is read from: whole closed buckets of levels, the rest raw."""

    rollup_ranges: tuple[tuple[Level, datetime | None, datetime], ...] = ()
    raw_ranges: tuple[Range, ...] = ()
    binned_raw: bool = False
    """Whether the raw rows' latencies join the histograms binned as they are (a GROUP BY rather
    than a sort of every latency), where histogram rows are read: the percentiles are approximate
    (within 1%) then anyway. Without histogram rows they stay exact."""

    @property
    def uses_rollups(self) -> bool:
        return bool(self.rollup_ranges)

    def ranges_per_level(self) -> dict[Level, list[Range]]:
        """Each level read, with its ranges: a statement reads a level once, whatever the number of
        its ranges (a breakdown's buckets each add some)."""
        per_level: dict[Level, list[Range]] = {}
        for level, since, until in self.rollup_ranges:
            per_level.setdefault(level, []).append((since, until))
        return per_level


def _subtract(window: Range, covered: Sequence[tuple[datetime | None, datetime]]) -> list[Range]:
    """`window` minus the covered ranges (which lie inside it, in order, without overlap)."""
    pieces: list[Range] = []
    since, until = window
    for start, end in covered:
        if start is not None and (since is None or since < start):
            pieces.append((since, start))
        since = end
    if until is None or since is None or since < until:
        pieces.append((since, until))
    return pieces


def plan_reads(
    state: RollupState, kept: Iterable[str], since: datetime | None, until: datetime | None
) -> ReadPlan:
    """Cover [since, until) with whole closed months of the monthly level, then whole closed days of
    the daily level, then whole closed hours of the hourly level (each where one keeps the filtered
    dimensions); raw rows for the rest."""
    kept = tuple(kept)
    covered = _cover(state, kept, since, until, ("month", "day", "hour"))
    if not covered:
        return ReadPlan(raw_ranges=((since, until),))
    raw = _subtract((since, until), [(start, end) for _, start, end in covered])
    return ReadPlan(rollup_ranges=tuple(covered), raw_ranges=tuple(raw))


def _cover(
    state: RollupState,
    kept: tuple[str, ...],
    since: datetime | None,
    until: datetime | None,
    grains: Sequence[Grain],
) -> list[tuple[Level, datetime | None, datetime]]:
    """[since, until) covered, in time order, by the closed buckets of the first grain's level that
    keeps `kept` (one run of them), and the time before and after that run by the finer grains'."""
    if not grains:
        return []
    grain, finer = grains[0], grains[1:]
    level = reading_level(grain, kept)
    closed = None if level is None else state.filled_until(level)
    if level is None or closed is None:
        return _cover(state, kept, since, until, finer)
    first = None if since is None else ceil_to(since, grain)
    # Up to the end of what its rows hold: a month's rows hold its closed days, so the month being
    # filled covers it from its start up to `closed` (its last closed day's end); the day being
    # filled, of a level filled as hours close, up to its last closed hour's end.
    last = closed if until is None or until >= closed else floor_to(until, grain)
    if first is not None and first >= last:
        return _cover(state, kept, since, until, finer)
    before = (
        _cover(state, kept, since, first, finer)
        if first is not None and (since is None or since < first)
        else []
    )
    after = _cover(state, kept, last, until, finer) if until is None or last < until else []
    return [*before, (level, first, last), *after]


def raw_only(since: datetime | None, until: datetime | None) -> ReadPlan:
    return ReadPlan(raw_ranges=((since, until),))


def reads_pruned_rows(plan: ReadPlan, state: RollupState) -> bool:
    """Whether the plan needs raw rows from before the prune cut-off (its raw ranges are never empty)."""
    cutoff = state.raw_kept_from
    return cutoff is not None and any(since is None or since < cutoff for since, _ in plan.raw_ranges)


def range_terms(
    column: ColumnElement[Any], since: datetime | None, until: datetime | None
) -> list[ColumnElement[bool]]:
    terms: list[ColumnElement[bool]] = []
    if since is not None:
        terms.append(column >= since)
    if until is not None:
        terms.append(column < until)
    return terms


def any_range(
    column: ColumnElement[Any], ranges: Sequence[Range], terms: Sequence[ColumnElement[bool]] = ()
) -> ColumnElement[bool]:
    """`terms` and `column` in any of `ranges`: the terms repeated in each range's, so that SQLite
    searches its index per range (it does not carry terms outside an OR into its branches: a town's
    90 Kathmandu quarter hours were one read of all its actions, each tested against every range,
    0.6 s at 10M actions, against 0.02 s)."""
    each = [and_(true(), *terms, *range_terms(column, since, until)) for since, until in ranges]
    return each[0] if len(each) == 1 else or_(false(), *each)  # none: false


def rows_in_ranges(
    statement: Select[Any],
    column: ColumnElement[Any],
    ranges: Sequence[Range],
    terms: Sequence[ColumnElement[bool]],
    backend: Backend,
) -> Select[Any] | CompoundSelect[Any]:
    """`statement` (of one table) restricted to `terms` and `column` in any of `ranges`: one
    statement with `any_range`, or where the backend reads ranges apart (`union_of_ranges`), one
    statement per range, all of them UNION ALL."""
    if not backend.union_of_ranges or len(ranges) < 2 or len(ranges) > MAX_RANGES_UNITED:
        return statement.where(any_range(column, ranges, terms))
    branches = [statement.where(*terms, *range_terms(column, since, until)) for since, until in ranges]
    return union_all(*branches)


MAX_RANGES_UNITED: Final = 400
"""More ranges than this are one statement with an OR even where the backend reads them apart: a
plan of a branch per range takes longer to make than the ranges take to read."""


# --- building ------------------------------------------------------------------------------------------

WriteTransaction = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
StateLock = Callable[[AsyncConnection], Awaitable[RollupState]]
"""How a write transaction takes the state row: `lock_state`, or the repository's, which also
refuses a schema moved since the store opened."""


async def lock_state(connection: AsyncConnection) -> RollupState:
    return await read_state(connection, for_update=True)


@dataclass(frozen=True)
class BuildProgress:
    """Days closed so far by a build, out of those it will close."""

    done: int
    total: int


async def build(
    transaction: WriteTransaction,
    backend: Backend,
    *,
    now: datetime | None = None,
    progress: Callable[[BuildProgress], None] | None = None,
    lock: StateLock = lock_state,
) -> RollupState:
    """Close every bucket up to `now` (less `CLOSE_DELAY`), a day of actions per transaction, so that
    an interrupted build resumes where it stopped; `progress` gets the days covered so far. Each
    transaction takes the state row by `lock` first."""
    reach = (now or datetime.now(UTC)) - CLOSE_DELAY
    async with transaction() as connection:
        first = await _next_timestamp(connection, None)
    first_day = None if first is None else floor_to(first, "day")
    total = 0 if first_day is None else max(0, (floor_to(reach, "day") - first_day) // GRAIN_LENGTH["day"])
    while True:
        async with transaction() as connection:
            before = await lock(connection)
            following = await _next_timestamp(connection, before.hours_closed_until)
            step = (
                reach if following is None else min(reach, floor_to(following, "day") + GRAIN_LENGTH["day"])
            )
            after = await close(connection, backend, before, step, max_hours=24, max_days=1)
            await write_state(connection, before, after)
        if progress is not None and first_day is not None and after.days_closed_until is not None:
            done = max(0, (after.days_closed_until - first_day) // GRAIN_LENGTH["day"])
            progress(BuildProgress(min(done, total), total))
        if after == before:
            await _backfill_sketches(transaction, backend, lock)
            await _backfill_sketches(transaction, backend, lock, "town_actions_from", progress)
            return await _backfill_users(transaction, backend, lock, progress)


WRITTEN_BACK: Final = {
    "sketches_from": "the latency sketches are",
    "town_actions_from": "the latency sketches per town and action type are",
    "users_from": "the user rollup is",
}
"""The state's write-back marks (see `_backfill_sketches`, `_backfill_users`), each named for an operator."""


async def unfinished(connection: AsyncConnection) -> list[str]:
    """What `build` (run by `db upgrade`) has yet to write of the rows stored, a few words each (none:
    it finished). Writers close the buckets their batches move `CLOSE_DELAY` past, so the rollups are
    behind only where such a bucket of the newest row is open; a write-back is behind while raw rows
    are older than its mark (when done, the mark is the prune cut-off, before which none are left)."""
    state = await read_state(connection)
    newest = (await connection.execute(select(func.max(action_metrics.c.timestamp)))).scalar()
    if newest is None:
        return []
    hours = floor_to(min(newest, datetime.now(UTC)) - CLOSE_DELAY, "hour")
    left = []
    closing = ((state.hours_closed_until, hours), (state.days_closed_until, floor_to(hours, "day")))
    for closed, target in closing:
        following = await _next_timestamp(connection, closed)
        if following is not None and following < target:
            left.append(f"the rollups are built up to {closed.isoformat() if closed else 'nothing'} only")
            break
    oldest = await _next_timestamp(connection, None)
    for mark, what in WRITTEN_BACK.items():
        until = getattr(state, mark)
        if until is not None and oldest is not None and oldest < until:
            left.append(f"{what} written back to {until.isoformat()} only")
    return left


async def _backfill_sketches(
    transaction: WriteTransaction,
    backend: Backend,
    lock: StateLock,
    built_from: str = "sketches_from",
    progress: Callable[[BuildProgress], None] | None = None,
) -> RollupState:
    """Write the sketches of the closed buckets from before the state's `built_from` of the levels
    it dates (`sketches_from`: a database migrated to 0007 with rollups already built;
    `town_actions_from`: to 0012), the newest day first, a day per transaction: interrupted, it
    resumes; done, `built_from` is the prune cut-off (None: never pruned). Sketches already there
    (late metrics added meanwhile) are written anew with the rest."""
    levels = [
        level
        for level in latency_sketches.levels_of(["hour", "day"])
        if level.built_from == built_from and level.built_from != "users_from"  # `_backfill_users`
    ]
    total: int | None = None
    done = 0
    while True:
        async with transaction() as connection:
            state = await lock(connection)
            until = getattr(state, built_from)
            if until is None:
                return state
            since = floor_to(until, "day") if until != floor_to(until, "day") else until - GRAIN_LENGTH["day"]
            earlier = await _next_timestamp(connection, None)
            if total is None and earlier is not None:
                total = max(0, (until - floor_to(earlier, "day")) // GRAIN_LENGTH["day"])
            if earlier is None or earlier >= until:
                after = replace(state, **{built_from: state.raw_kept_from})
                await write_state(connection, state, after)
                return after
            for level in levels:
                closed = state.closed_until(level.grain)
                end = until if closed is None else min(until, closed)
                if level.grain == "day" and since + GRAIN_LENGTH["day"] > end:
                    continue  # the day is not closed yet: its close writes its sketches
                if end <= since:
                    continue
                # A late metric for these buckets since the migration added itself to a sketch of
                # its own (the late path finds none to add to): the raw rows, it among them, say all.
                s = latency_sketch
                await connection.execute(
                    delete(s).where(s.c.level == level.name, *range_terms(s.c.start, since, end))
                )
                await _write_sketches(connection, backend, level, Scope(since, end), new=True)
            await write_state(connection, state, replace(state, **{built_from: since}))
        done += 1
        if progress is not None and total:
            progress(BuildProgress(min(done, total), total))


async def _backfill_users(
    transaction: WriteTransaction,
    backend: Backend,
    lock: StateLock,
    progress: Callable[[BuildProgress], None] | None,
) -> RollupState:
    """Write the user levels' sums and sketches of the closed days from before `users_from` (a
    database migrated to 0009 with rollups already built), the newest day first, a day per
    transaction, and each closed month once its first day is written: interrupted, it resumes; done,
    `users_from` is the prune cut-off (None: never pruned). Rows already there (late metrics added
    meanwhile) are summed again with the rest."""
    total: int | None = None
    done = 0
    while True:
        async with transaction() as connection:
            state = await lock(connection)
            until = state.users_from
            if until is None:
                return state
            earlier = await _next_timestamp(connection, None)
            if total is None and earlier is not None:
                total = max(0, (until - floor_to(earlier, "day")) // GRAIN_LENGTH["day"])
            if earlier is None or earlier >= until:
                # The month holding the first day written, unless its first days were pruned.
                month = floor_to(until, "month")
                if month < until and (state.raw_kept_from is None or state.raw_kept_from <= month):
                    await _rewrite_users(connection, backend, state, "month", month)
                after = replace(state, users_from=state.raw_kept_from)
                await write_state(connection, state, after)
                return after
            since = floor_to(until, "day") if until != floor_to(until, "day") else until - GRAIN_LENGTH["day"]
            await _rewrite_users(connection, backend, state, "day", since)
            if since == floor_to(since, "month"):
                await _rewrite_users(connection, backend, state, "month", since)
            await write_state(connection, state, replace(state, users_from=since))
        done += 1
        if progress is not None and total:
            progress(BuildProgress(min(done, total), total))


async def _rewrite_users(
    connection: AsyncConnection, backend: Backend, state: RollupState, grain: Grain, start: datetime
) -> None:
    """The user level of `grain`'s bucket at `start`, sums and sketch, written anew: a closed day from
    its raw rows, a month with closed days from them."""
    end = next_start(start, grain)
    closed = state.closed_until(grain)
    if closed is None or (end > closed if grain == "day" else start >= closed):
        return
    scope = Scope(start, min(end, closed))  # a month's closed days (the open day's rows are not its)
    await _clear(connection, grain, scope, [rollup_user])
    s = latency_sketch
    users = [level for level in latency_sketches.levels_of([grain]) if level.key == "user_id"]
    names = [level.name for level in users]
    await connection.execute(delete(s).where(s.c.level.in_(names), *range_terms(s.c.start, start, end)))
    levels = [level for level in levels_of(grain) if level.keeps == USER]
    await fill(connection, backend, levels, scope, closing=True, sketch_levels=users)
