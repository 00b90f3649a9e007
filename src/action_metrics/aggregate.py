"""`aggregate()`: one SQL statement answers every dashboard number of a selection.

The statement reads what `rollup.plan_reads` chose: rollup rows for the whole closed buckets of the
window and raw rows for the rest (or raw rows only, for `exact=True` and the filters no rollup keeps).
Both become the same "parts" (a raw row is a part of count 1 starting at its timestamp), priced by
the prices in force at each part's start; money is summed per price and multiplied once, so SQLite's
REAL arithmetic stays within 1e-9 USD of the decimal answer. Percentiles are exact over raw rows, and
merged from the rollups' latency histograms (within 1%) where those are read.

Totals and by-model figures come from the one statement (a UNION ALL of the two groupings), so
they are read from one snapshot and always agree with each other.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any, ClassVar, Final

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    CompoundSelect,
    Double,
    Integer,
    Numeric,
    Select,
    String,
    and_,
    bindparam,
    case,
    cast,
    exists,
    false,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    true,
    tuple_,
    type_coerce,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.selectable import NamedFromClause, Subquery
from sqlalchemy.sql.visitors import replacement_traverse

from action_metrics.dialects import Backend, interpolated_percentile, not_indexed, sum_of_counts
from action_metrics.pricing import BEGINNING_OF_TIME
from action_metrics.query import EQUALITY_FILTERS, MetricFilter
from action_metrics.rollup import (
    PRICED_TOKENS,
    SUM_COLUMNS,
    Level,
    Range,
    ReadPlan,
    any_range,
    bin_value,
    latency_bin,
    range_terms,
    raw_sums,
)
from action_metrics.schema import (
    UTCDateTime,
    action_metrics,
    credit_price_periods,
    latency_histogram,
    model_price_periods,
)
from action_metrics.validation import storable_text

PERCENTILES = {"p50_latency_ms": 0.50, "p95_latency_ms": 0.95, "p99_latency_ms": 0.99}
TOKEN_KINDS = ("cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
COUNTED = (*TOKEN_KINDS, "error_count")
"""Sums of the rollups passed through to `Aggregate` as they are."""


@dataclass(frozen=True, slots=True)
class ModelAggregate:
    """One model's share of a selection."""

    count: int
    total_tokens: int
    avg_latency_ms: float | None
    p95_latency_ms: float | None
    total_cost_usd: float
    unpriced_count: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "total_tokens": self.total_tokens,
            "avg_latency_ms": self.avg_latency_ms,
            "p95_latency_ms": self.p95_latency_ms,
            "total_cost_usd": self.total_cost_usd,
            "unpriced_count": self.unpriced_count,
        }


@dataclass(frozen=True, slots=True)
class Aggregate:
    """The dashboard numbers of a selection. Averages, percentiles and margins are None when empty."""

    count: int
    tokens_in: int
    tokens_out: int
    total_credits: int
    cache_read_tokens: int
    """Parts of tokens_in read from, and written to, the prompt cache; part of tokens_out spent reasoning."""
    cache_write_tokens: int
    reasoning_tokens: int
    avg_latency_ms: float | None
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    p99_latency_ms: float | None
    total_cost_usd: float
    total_revenue_usd: float
    total_profit_usd: float
    avg_margin: float | None
    gross_margin: float | None
    unpriced_count: int
    error_count: int
    """Actions that failed. The latency percentiles describe the successful ones."""
    percentiles_exact: bool
    """False when the percentiles were merged from latency histograms (within 1% of exact)."""
    by_model: Mapping[str, ModelAggregate] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "total_tokens": self.total_tokens,
            "total_credits": self.total_credits,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "avg_latency_ms": self.avg_latency_ms,
            "p50_latency_ms": self.p50_latency_ms,
            "p95_latency_ms": self.p95_latency_ms,
            "p99_latency_ms": self.p99_latency_ms,
            "total_cost_usd": self.total_cost_usd,
            "total_revenue_usd": self.total_revenue_usd,
            "total_profit_usd": self.total_profit_usd,
            "avg_margin": self.avg_margin,
            "gross_margin": self.gross_margin,
            "unpriced_count": self.unpriced_count,
            "error_count": self.error_count,
            "percentiles_exact": self.percentiles_exact,
            "by_model": {model: stats.to_dict() for model, stats in self.by_model.items()},
        }


def _as_float(expression: ColumnElement[Any]) -> ColumnElement[float]:
    """PostgreSQL computes money in NUMERIC (exact); the API reports it as a float."""
    return cast(expression, Double)


def _divisor(expression: ColumnElement[Any]) -> ColumnElement[Any]:
    """`expression` to divide by, as NUMERIC of any size: SQLAlchemy casts a divisor to the numerator's
    type, and a price's NUMERIC(20, 9) overflows past 1e11 USD of revenue (SQLite adds 0.0 instead)."""
    return type_coerce(expression, Numeric())


def _as_int(expression: ColumnElement[Any]) -> ColumnElement[Any]:
    """A sum of integers, made an int in Python (`_integer`): NUMERIC on PostgreSQL has no 64-bit limit."""
    return func.coalesce(expression, 0)


def _integer(value: Any) -> int:
    return int(value)


_ONE_MILLION = literal_column("1000000.0", Numeric)
"""A decimal literal: NUMERIC on PostgreSQL (a bound float would make the division inexact)."""


# --- what is read -------------------------------------------------------------------------------


_RAW_COLUMNS = (
    "model",
    "timestamp",
    "tokens_in",
    "tokens_out",
    "credits_charged",
    "latency_ms",
    *TOKEN_KINDS,
    "error",
)
"""What is read of a raw action: the rest of the row is never carried through a sort."""


@dataclass(frozen=True)
class Grouping:
    """What a breakdown groups by besides the model: dimensions of the actions and, optionally, time
    buckets."""

    dimensions: tuple[str, ...] = ()
    bucket_of: Callable[[ColumnElement[Any]], ColumnElement[int]] | None = None
    """The index of the time bucket holding a moment, if bucketed."""

    @property
    def keys(self) -> tuple[str, ...]:
        return (*self.dimensions, *(("bucket",) if self.bucket_of is not None else ()))

    def columns(self, rows: Any, moment: ColumnElement[Any], *, raw: bool) -> list[ColumnElement[Any]]:
        """The keys of `rows` (raw actions, or rollup rows starting at `moment`)."""
        columns: list[ColumnElement[Any]] = []
        for name in self.dimensions:
            column = not_indexed(rows.c[name]) if raw else rows.c[name]
            columns.append(column.label(name))
        if self.bucket_of is not None:
            columns.append(self.bucket_of(moment).label("bucket"))
        return columns


UNGROUPED: Final = Grouping()


Restriction = Mapping[str, Sequence[Any]]
"""Values columns are restricted to, besides the filter's (None among them: the column is NULL)."""


def restricted(
    rows: Any, only: Restriction | None, names: Sequence[str] | None = None
) -> list[ColumnElement[bool]]:
    """WHERE terms keeping the rows whose columns (of `names`, else all restricted) take the values of
    `only`."""
    terms: list[ColumnElement[bool]] = []
    for name, values in (only or {}).items():
        if names is not None and name not in names:
            continue
        present = [value for value in values if value is not None]
        term = rows.c[name].in_(present)
        terms.append(or_(term, rows.c[name].is_(None)) if len(present) < len(values) else term)
    return terms


def reads_once(metric_filter: MetricFilter, backend: Backend) -> bool:
    """Whether raw rows are summed in one pass rather than one per price period, and (in
    `aggregate_statement`) read once into a materialized selection that the sums and percentiles
    read: for a filter on an indexed column (a user, citizen, town, action type or model), one
    index search beats one per price period and per percentile pass (PostgreSQL searched a period
    of a model's or town's rows through the time index, reading every action of the period). At 10M
    actions on PostgreSQL, `exact=True`: town-7 over all time 2.3 s -> 1.5-1.7 s, sonnet 7.2-8.8 s
    -> 4.2-6.6 s, this week 2x faster. With no filter the copy would cost more than it saves.

    Not for one filter alone whose index holds every column read (`Backend.covering_filters`): each
    pass is an index-only search of exactly the selection then, and the sums of one price period
    group by columns with statistics (PostgreSQL hashes them), where the materialized selection's
    rows, each with its period as an expression, were sorted on disk (town-7 over all time at 10M:
    PostgreSQL 327-342 -> 193 ms, SQLite 834 -> 683 ms). With a second filter the index's range
    holds more than the selection, and each pass would read all of it again (town-7 and lod3 over
    90 days, PostgreSQL: 47 ms read once, 94-100 ms per pass)."""
    chosen = [name for name in EQUALITY_FILTERS if getattr(metric_filter, name) is not None]
    alone_and_covered = len(chosen) == 1 and chosen[0] in backend.covering_filters
    return metric_filter.limit is None and bool(chosen) and not alone_and_covered


def raw_rows(
    metric_filter: MetricFilter,
    plan: ReadPlan,
    grouping: Grouping = UNGROUPED,
    *,
    only: Restriction | None = None,
) -> Subquery:
    """The raw actions the plan reads: its raw time ranges, or the newest `limit` of the selection
    (restricted to `only`'s values)."""
    m = action_metrics
    columns = [m.c[name] for name in _RAW_COLUMNS] + grouping.columns(m, m.c.timestamp, raw=True)
    if metric_filter.limit is not None:
        return metric_filter.newest_first(select(*columns).where(*restricted(m, only)), m.c).subquery(
            "selection"
        )
    terms = [*metric_filter.conditions(m.c, times=False), *restricted(m, only)]
    return select(*columns).where(any_range(m.c.timestamp, plan.raw_ranges, terms)).subquery("selection")


MAX_PRICE_PERIODS_APART: Final = 16
"""Up to this many price periods met by the raw rows read, each is summed by a statement of its own;
beyond, one statement finds each row's period by a search written as nested CASEs."""


def price_periods(
    price_starts: Sequence[datetime], ranges: Sequence[Range]
) -> list[tuple[datetime, list[Range]]]:
    """The periods between price starts that meet `ranges`: each period's start (the beginning of
    time before the first) and the parts of `ranges` inside it."""
    bounds: list[datetime | None] = [None, *price_starts, None]
    periods = []
    for start, end in pairwise(bounds):
        inside = []
        for since, until in ranges:
            low = since if start is None else (start if since is None else max(since, start))
            high = until if end is None else (end if until is None else min(until, end))
            if low is None or high is None or low < high:
                inside.append((low, high))
        if inside:
            periods.append((BEGINNING_OF_TIME if start is None else start, inside))
    return periods


def latest_start(moment: ColumnElement[Any], starts: Sequence[datetime]) -> ColumnElement[Any]:
    """The latest of `starts` (sorted) at or before `moment`, or the beginning of time: a binary
    search written as nested CASEs. Between two consecutive price starts every price is constant,
    so raw rows summed per (model, segment) are priced once per sum, not once per row; the same
    search puts a row in its time bucket."""
    if not starts:
        return literal(BEGINNING_OF_TIME, UTCDateTime())
    middle = len(starts) // 2
    return case(
        (moment < literal(starts[middle], UTCDateTime()), latest_start(moment, starts[:middle])),
        else_=_latest_start_from(moment, starts[middle:]),
    )


def _latest_start_from(moment: ColumnElement[Any], starts: Sequence[datetime]) -> ColumnElement[Any]:
    """`latest_start` when `moment` is known to be at or after `starts[0]`."""
    if len(starts) == 1:
        return literal(starts[0], UTCDateTime())
    middle = len(starts) // 2
    return case(
        (moment < literal(starts[middle], UTCDateTime()), _latest_start_from(moment, starts[:middle])),
        else_=_latest_start_from(moment, starts[middle:]),
    )


def _level_terms(level: Level, table: Any, metric_filter: MetricFilter) -> list[ColumnElement[bool]]:
    """This level's rows of `table` that the filter selects."""
    terms = [*level.rows(table)]
    for name in ("town_id", "action_type", "model"):
        value = getattr(metric_filter, name)
        if value is not None:
            terms.append(table.c[name] == value)
    return terms


def _level_rows(
    level: Level, table: Any, metric_filter: MetricFilter, ranges: Sequence[Range]
) -> ColumnElement[bool]:
    """This level's rows of `table` in any of `ranges` that the filter selects: the level's terms
    repeated in each range's, so that each range is a search of the primary key (grain, town,
    action, start) of its own (SQLite does not carry terms outside an OR into its branches)."""
    terms = _level_terms(level, table, metric_filter)
    return or_(false(), *(and_(*terms, *range_terms(table.c.start, since, until)) for since, until in ranges))


def _raw_sums(raw: NamedFromClause, at: ColumnElement[Any] | datetime, grouping: Grouping) -> Select[Any]:
    """Raw rows summed per model, price period and the grouping's keys: `at`, the start of the
    prices they are charged, is each row's (an expression) or the same for all (a moment).

    The sums per credit (for the mean margin) and the count of credited rows: with no key but the
    action type, from each group's sums, the rows also grouped by credits charged (a few values, one
    per action type, so no more groups), not from a division and a CASE per row, as the hand SQL does
    it. Grouped by anything else (users, towns, buckets), from a division per row: grouping by
    credits too would make ~11x as many groups (a town's users over 90 days at 10M actions: 82k
    groups for 200k rows, which PostgreSQL sorted on disk, 450 ms, where 5k groups per price period
    are one hash aggregate in memory, 80 ms)."""
    sums = raw_sums(raw)
    keys = [raw.c[key] for key in grouping.keys]
    model = not_indexed(raw.c.model).label("model")
    credits = raw.c.credits_charged
    credited = credits > 0
    by_credits = set(grouping.keys) <= {"action_type"}
    per_group: dict[str, ColumnElement[Any]]
    if by_credits:
        per_group = {
            "credited_count": case((credited, func.count()), else_=0),
            **{
                f"{tokens}_per_credit": case(
                    (credited, cast(sum_of_counts(raw.c[tokens]), Double) / credits),
                    else_=literal(0.0, Double),
                )
                for tokens in PRICED_TOKENS
            },
        }
    else:
        per_group = {
            "credited_count": func.count(case((credited, 1))),
            **{
                f"{tokens}_per_credit": func.coalesce(
                    func.sum(case((credited, cast(raw.c[tokens], Double) / credits))), literal(0.0, Double)
                )
                for tokens in PRICED_TOKENS
            },
        }
    per_group["count"] = func.count()
    summed = [per_group.get(name, sum_of_counts(sums[name])).label(name) for name in SUM_COLUMNS]
    extra = [credits] if by_credits else []
    if isinstance(at, datetime):
        moment = literal(at, UTCDateTime()).label("at")
        return select(model, moment, *keys, *summed).group_by(model, *keys, *extra)
    period = at.label("at")
    return select(model, period, *keys, *summed).group_by(model, period, *keys, *extra)


def _model_sums(raw: NamedFromClause, at: datetime, model: str) -> Select[Any]:
    """One model's raw rows of one price period summed as one row (none when there are none):
    without a GROUP BY, since every row found by the model's search is that model's."""
    sums = raw_sums(raw)
    summed = select(
        literal(model, String()).label("model"),
        literal(at, UTCDateTime()).label("at"),
        *(
            (func.count() if name == "count" else sum_of_counts(sums[name])).label(name)
            for name in SUM_COLUMNS
        ),
    ).subquery("model_sums")
    return select(summed).where(summed.c["count"] > 0)


MAX_MODEL_SEARCHES: Final = 64
"""At most this many searches of the (model, timestamp) index (models x price periods) sum the raw
rows; beyond, one GROUP BY per period does (a store of 800 models would otherwise build a statement
of thousands of parts)."""


def searches_per_model(metric_filter: MetricFilter, plan: ReadPlan, backend: Backend) -> bool:
    """Whether the raw rows are summed by one search per model (`Backend.sums_per_model_search`), the
    filter's or every one stored: for raw rows only, with no filter but the model and time, no limit."""
    return (
        backend.sums_per_model_search
        and not plan.uses_rollups
        and metric_filter.limit is None
        and all(getattr(metric_filter, name) is None for name in EQUALITY_FILTERS if name != "model")
    )


def stored_models() -> Select[Any]:
    """Every model stored, in order: one search of the (model, timestamp) index per model, each
    for the least model after the one before (a loose index scan), not a scan of the index."""
    m = action_metrics
    models = select(func.min(m.c.model).label("model")).cte("models", recursive=True)
    following = select(select(func.min(m.c.model)).where(m.c.model > models.c.model).scalar_subquery())
    models = models.union_all(following.where(models.c.model.is_not(None)))
    return select(models.c.model).where(models.c.model.is_not(None))


async def models_searched(
    connection: AsyncConnection, metric_filter: MetricFilter, plan: ReadPlan, backend: Backend
) -> tuple[str, ...] | None:
    """The models whose rows `aggregate_statement` sums by a search each (`searches_per_model`): the
    filter's, or every one stored if there are at most `MAX_MODEL_SEARCHES`; None: no such search."""
    if not searches_per_model(metric_filter, plan, backend):
        return None
    if metric_filter.model is not None:  # one no stored model can be (a lone surrogate): none to search
        return (metric_filter.model,) if storable_text(metric_filter.model) else ()
    stored = tuple(await connection.scalars(stored_models().limit(MAX_MODEL_SEARCHES + 1)))
    return stored if 0 < len(stored) <= MAX_MODEL_SEARCHES else None


def summed_parts(
    metric_filter: MetricFilter,
    plan: ReadPlan,
    raw: NamedFromClause,
    price_starts: Sequence[datetime],
    grouping: Grouping = UNGROUPED,
    models: Sequence[str] | None = None,
    *,
    one_pass: bool = False,
) -> NamedFromClause:
    """Rollup rows and raw rows alike: model, start (`at`), the grouping's keys and the summed
    columns. Raw rows are summed per model, price segment and keys first: given the `models`
    stored (see `searches_per_model`), by one search per model and price period; with `one_pass`
    (`reads_once`), `raw` by one GROUP BY."""
    periods = price_periods(price_starts, plan.raw_ranges)
    selects: list[Select[Any]]
    if models and not grouping.keys and 0 < len(periods) * len(models) <= MAX_MODEL_SEARCHES:
        # SQLite has no hash aggregation: a GROUP BY model sorted every row (10M actions: 12.8 s
        # grouped by model and credits; 6.0 s for the five models' searches).
        selects = [
            _model_sums(
                raw_rows(replace(metric_filter, model=model), ReadPlan(raw_ranges=tuple(inside))),
                start,
                model,
            )
            for start, inside in periods
            for model in models
        ]
    elif metric_filter.limit is None and not one_pass and 0 < len(periods) <= MAX_PRICE_PERIODS_APART:
        # One GROUP BY per price period, over the raw rows of its own part of the time ranges: the
        # period is a constant, not an expression of each row, so the database estimates the groups
        # from the columns' statistics (a hash aggregate on PostgreSQL). Grouped (a breakdown), also
        # for a filter `aggregate` reads once: a breakdown's raw rows are not one materialized
        # selection, and with each row's period in the key PostgreSQL expected a group per row and
        # sorted them all (a town's users over 90 days at 10M actions: 450 -> 80 ms).
        selects = [
            _raw_sums(raw_rows(metric_filter, ReadPlan(raw_ranges=tuple(inside)), grouping), start, grouping)
            for start, inside in periods
        ]
    else:
        selects = [_raw_sums(raw, latest_start(raw.c.timestamp, price_starts), grouping)]
    for level, ranges in plan.ranges_per_level().items():
        r = level.table  # the levels of every town, action and model have a table of their own
        selects.append(
            select(
                r.c.model,
                r.c.start.label("at"),
                *grouping.columns(r, r.c.start, raw=False),
                *(r.c[name] for name in SUM_COLUMNS),
            ).where(_level_rows(level, r, metric_filter, ranges))
        )
    return union_all(*selects).subquery("parts")


def latency_values(
    metric_filter: MetricFilter,
    plan: ReadPlan,
    raw: NamedFromClause,
    grouping: Grouping = UNGROUPED,
    *,
    bin_raw: bool = False,
    only: Restriction | None = None,
) -> NamedFromClause:
    """Latency values with their weights: raw rows' own (weight 1, exact), or with `bin_raw` their
    histogram bins (a GROUP BY instead of a sort of every row), and histogram bins' representatives
    (weight: the bin's count, `approximate`). Histogram rows are restricted to `only` as `raw` is."""
    succeeded = raw.c.error.is_(None)  # latency percentiles describe successful actions
    keys = [raw.c[key] for key in grouping.keys]
    if bin_raw:
        binned = (
            # The model not indexed: else SQLite reads the raw rows through the (model, timestamp)
            # index for their GROUP BY order, all of them, not the time range's (10M actions: 0.9 s).
            select(not_indexed(raw.c.model).label("model"), *keys, latency_bin(raw.c.latency_ms).label("bin"))
            .where(succeeded)
            .subquery("binned")
        )
        binned_keys = [binned.c[key] for key in grouping.keys]
        raw_values = select(
            binned.c.model,
            *binned_keys,
            bin_value(binned.c.bin).label("value"),
            func.count().label("n"),
            literal(1, Integer).label("approximate"),
        ).group_by(binned.c.model, *binned_keys, binned.c.bin)
    else:
        raw_values = select(
            raw.c.model,
            *keys,
            raw.c.latency_ms.label("value"),
            literal(1, BigInteger).label("n"),
            literal(0, Integer).label("approximate"),
        ).where(succeeded)
    selects: list[Select[Any]] = [raw_values]
    h = latency_histogram
    for level, ranges in plan.ranges_per_level().items():
        bin_keys = grouping.columns(h, h.c.start, raw=False)
        bins = (
            select(h.c.model, *bin_keys, h.c.bin, func.sum(h.c["count"]).label("n"))
            .where(
                _level_rows(level, h, metric_filter, ranges),
                *restricted(h, only, (*level.keeps, "model")),
            )
            .group_by(h.c.model, *bin_keys, h.c.bin)
            .subquery("bins")
        )
        selects.append(
            select(
                bins.c.model,
                *(bins.c[key] for key in grouping.keys),
                bin_value(bins.c.bin),
                bins.c.n,
                literal(1, Integer).label("approximate"),
            )
        )
    return union_all(*selects).cte("latencies")


def histograms_read(metric_filter: MetricFilter, plan: ReadPlan) -> Select[Any]:
    """One boolean: whether the plan's rollup ranges hold any histogram row of the selection (an
    index probe per range: PostgreSQL reads the ranges of one OR as a filter over all the level's
    rows), so that `aggregate` bins its raw rows only where its percentiles are approximate anyway
    (`ReadPlan.binned_raw`)."""
    h = latency_histogram
    found = [
        exists().where(_level_rows(level, h, metric_filter, [one]))
        for level, ranges in plan.ranges_per_level().items()
        for one in ranges
    ]
    return select(or_(false(), *found))


# --- money and counts ---------------------------------------------------------------------------


def _price_join(parts: NamedFromClause) -> tuple[Any, dict[str, ColumnElement[Any]]]:
    """`parts` joined to the model and credit prices in force at each part's `at`, and those prices
    (a missing cache price is the input price)."""
    p, c = model_price_periods, credit_price_periods
    at = parts.c.at
    priced = parts.outerjoin(
        p,
        and_(
            p.c.model == parts.c.model,
            at >= p.c.effective_from,
            (p.c.effective_until.is_(None)) | (at < p.c.effective_until),
        ),
    ).outerjoin(
        c, and_(at >= c.c.effective_from, (c.c.effective_until.is_(None)) | (at < c.c.effective_until))
    )
    prices = {
        "input_per_1m": p.c.input_per_1m,
        "output_per_1m": p.c.output_per_1m,
        "cache_read_per_1m": func.coalesce(p.c.cache_read_per_1m, p.c.input_per_1m),
        "cache_write_per_1m": func.coalesce(p.c.cache_write_per_1m, p.c.input_per_1m),
        "usd_per_credit": c.c.usd_per_credit,
    }
    return priced, prices


def _money(
    g: Callable[[str], ColumnElement[Any]], total: Callable[[ColumnElement[Any]], ColumnElement[Any]]
) -> list[ColumnElement[Any]]:
    """`PER_MODEL_SUMS` from sums `g(name)` that each have one price (`g` gives the prices too),
    each added up by `total` (a SUM over a group, or the value itself for one row)."""
    priced_group = g("input_per_1m").is_not(None)
    with_margin = and_(priced_group, g("usd_per_credit") > 0)

    def priced_tokens(suffix: str) -> ColumnElement[Any]:
        """The contract's cost in USD x 1e6: uncached input, cache reads and writes, output, each
        at its price (cache reads and writes are parts of tokens_in)."""
        read, write = g(f"cache_read_tokens{suffix}"), g(f"cache_write_tokens{suffix}")
        return (
            (g(f"tokens_in{suffix}") - read - write) * g("input_per_1m")
            + read * g("cache_read_per_1m")
            + write * g("cache_write_per_1m")
            + g(f"tokens_out{suffix}") * g("output_per_1m")
        )

    # margin = 1 - cost / revenue per action, so over a group with one price the margins add up to
    # credited - (the cost formula over the sums of each token count / credits) / (1e6 * usd).
    cost_per_revenue = priced_tokens("_per_credit") / _divisor(_ONE_MILLION * g("usd_per_credit"))
    return [
        total(g("count")).label("count"),
        total(g("tokens_in")).label("tokens_in"),
        total(g("tokens_out")).label("tokens_out"),
        total(g("credits_charged")).label("total_credits"),
        total(g("latency_ms_sum")).label("latency_ms_sum"),
        total(case((priced_group, 0), else_=g("count"))).label("unpriced_count"),
        *(total(g(name)).label(name) for name in COUNTED),
        func.coalesce(total(priced_tokens("") / _ONE_MILLION), 0).label("cost"),
        func.coalesce(total(g("credits_charged") * g("usd_per_credit")), 0).label("revenue"),
        total(case((with_margin, cast(g("credited_count"), Double) - cast(cost_per_revenue, Double)))).label(
            "margin_sum"
        ),
        total(case((with_margin, g("credited_count")))).label("margin_count"),
    ]


def sums_per_model(parts: NamedFromClause, keys: Sequence[str] = ()) -> NamedFromClause:
    """Counts, sums and money per model (and keys). Parts are grouped by the prices in force at their
    start and each group's sums are multiplied by its prices once."""
    priced, prices = _price_join(parts)
    price_columns = [column.label(name) for name, column in prices.items()]
    per_price = (
        select(
            parts.c.model,
            *(parts.c[key] for key in keys),
            *price_columns,
            *(sum_of_counts(parts.c[name]).label(name) for name in SUM_COLUMNS),
        )
        .select_from(priced)
        .group_by(parts.c.model, *(parts.c[key] for key in keys), *price_columns)
        .subquery("per_price")
    )
    g = per_price.c
    return (
        select(g.model, *(g[key] for key in keys), *_money(g.__getitem__, sum_of_counts))
        .group_by(g.model, *(g[key] for key in keys))
        .cte("per_model")
    )


def priced_parts(parts: NamedFromClause, keys: Sequence[str] = ()) -> NamedFromClause:
    """`sums_per_model`'s columns for each part alone, priced by a join: for parts already summed
    per model, price period and keys, where grouping them per price first would only sort them
    again."""
    priced, prices = _price_join(parts)

    def g(name: str) -> ColumnElement[Any]:
        return prices[name] if name in prices else parts.c[name]

    def alone(value: ColumnElement[Any]) -> ColumnElement[Any]:
        return value

    return (
        select(parts.c.model, *(parts.c[key] for key in keys), *_money(g, alone))
        .select_from(priced)
        .subquery("per_part")
    )


PER_MODEL_SUMS: Final = (
    "count",
    "tokens_in",
    "tokens_out",
    "total_credits",
    "latency_ms_sum",
    "unpriced_count",
    *COUNTED,
    "cost",
    "revenue",
    "margin_sum",
    "margin_count",
)
"""The columns of `per_model` that add up over models (and over any grouping)."""


# --- percentiles --------------------------------------------------------------------------------


def weighted_percentiles(latencies: NamedFromClause, keys: Sequence[str]) -> NamedFromClause:
    """Percentiles of weighted values, interpolated as percentile_cont: the value of rank
    floor((N - 1) * f), plus the fraction of the way to the next rank's value. An entry of weight n
    holds the ranks [upto - n, upto) in value order."""
    v = latencies.c
    partition = [v[key] for key in keys]
    ranked = select(
        *partition,
        v.value,
        v.n,
        v.approximate,
        # Bigints: PostgreSQL's SUM of bigints is NUMERIC, whose arithmetic in every comparison below
        # costs more than the rest of the statement.
        cast(func.sum(v.n).over(partition_by=partition, order_by=v.value, rows=(None, 0)), BigInteger).label(
            "upto"
        ),
        cast(func.sum(v.n).over(partition_by=partition), BigInteger).label("total"),
    ).subquery("weighted")
    w = ranked.c
    first = w.upto - w.n

    def value_at(rank: ColumnElement[Any]) -> ColumnElement[float]:
        return func.max(case((and_(first <= rank, rank < w.upto), w.value)))

    columns: list[ColumnElement[Any]] = []
    for name, fraction in PERCENTILES.items():
        position = cast(w.total - 1, Double) * literal(fraction, Double)
        low_rank = func.floor(position)
        low, high = value_at(low_rank), value_at(low_rank + 1)
        weight = func.max(position - low_rank)
        columns.append((low + weight * (func.coalesce(high, low) - low)).label(name))
    columns.append(func.coalesce(func.max(w.approximate), 0).label("approximate"))
    statement = select(*(w[key] for key in keys), *columns)
    return (statement.group_by(*(w[key] for key in keys)) if keys else statement).subquery("percentiles")


def exact_percentiles(raw: Subquery, keys: Sequence[str], backend: Backend) -> NamedFromClause:
    """Percentiles of the raw rows, the backend's fastest exact way (percentile_cont on PostgreSQL)."""
    ranked = backend.rank_latencies(raw, keys, list(PERCENTILES.values()))
    statement = select(
        *(ranked.c[key] for key in keys),
        *(backend.latency_percentile(ranked, fraction).label(name) for name, fraction in PERCENTILES.items()),
        literal(0, Integer).label("approximate"),
    ).select_from(ranked)
    return (statement.group_by(*(ranked.c[key] for key in keys)) if keys else statement).subquery(
        "percentiles"
    )


MAX_MODELS_RANKED_IN_ONE_SORT: Final = 8
"""Up to this many models stored, `_ranked_in_one_pass` ranks each row within its model by a running
count per model in the one sort by latency, rather than by a second sort per model: at 10M actions
on SQLite the second sort cost ~6 s more than five running counts, each ~1.2 s."""


def _ranked_in_one_pass(
    succeeded: Subquery, per_model: NamedFromClause, models: Sequence[str] | None = None
) -> tuple[NamedFromClause, NamedFromClause]:
    """Exact percentiles overall and per model from one read of the rows: each row ranked among all
    and within its model, only the rows at the ranks the interpolation reads kept, once, and grouped
    both ways. How many latencies each model has comes from the sums (actions less errors), so no
    window counts them. Ranked by two window sorts (by latency; by model, then latency), or, given
    the few `models` stored, by one: a row's rank within its model is how many rows of its model
    the sort by latency has reached."""
    counts = select(per_model.c.model, (per_model.c["count"] - per_model.c.error_count).label("n")).subquery(
        "latency_counts"
    )
    total = select(func.sum(counts.c.n)).scalar_subquery()
    model: ColumnElement[Any] = not_indexed(succeeded.c.model)
    latency = succeeded.c.latency_ms
    overall_rank: ColumnElement[Any]
    model_rank: ColumnElement[Any]
    if models and len(models) <= MAX_MODELS_RANKED_IN_ONE_SORT:
        # One window for every count, so that the database sorts once; no partition by the model,
        # hence the column itself (an expression of it is computed again in each comparison).
        model = succeeded.c.model
        running: dict[str, Any] = {"order_by": latency, "rows": (None, 0)}
        overall_rank = func.count().over(**running)
        model_rank = case(
            *((model == name, func.count().filter(model == name).over(**running)) for name in models)
        )
    else:
        overall_rank = func.row_number().over(order_by=latency)
        model_rank = func.row_number().over(partition_by=model, order_by=latency)
    ranked = select(
        model.label("model"),
        latency.label("latency_ms"),
        (overall_rank - 1).label("overall_rank"),
        (model_rank - 1).label("model_rank"),
    ).subquery("ranked_both")
    r = ranked.c

    def lowers(n: ColumnElement[Any]) -> list[ColumnElement[int]]:
        lows = [cast((n - 1) * literal(fraction, Double), Integer) for fraction in PERCENTILES.values()]
        return [*lows, *(low + 1 for low in lows)]

    model_ranks = union_all(*(select(counts.c.model, rank) for rank in lowers(counts.c.n)))
    picked = (
        select(ranked)
        .where(or_(r.overall_rank.in_(lowers(total)), tuple_(r.model, r.model_rank).in_(model_ranks)))
        .cte("picked")
        .prefix_with("MATERIALIZED")
    )
    p = picked.c

    def figures(rank: ColumnElement[Any], n: ColumnElement[Any]) -> list[ColumnElement[Any]]:
        return [
            *(
                interpolated_percentile(rank, n, p.latency_ms, fraction).label(name)
                for name, fraction in PERCENTILES.items()
            ),
            literal(0, Integer).label("approximate"),
        ]

    overall = select(*figures(p.overall_rank, total)).subquery("percentiles")
    per_model_percentiles = (
        select(p.model, *figures(p.model_rank, counts.c.n))
        .select_from(picked.join(counts, counts.c.model == p.model))
        .group_by(p.model)
        .subquery("model_percentiles")
    )
    return overall, per_model_percentiles


# --- the statement --------------------------------------------------------------------------------


def figure_columns(sums: NamedFromClause, percentiles: NamedFromClause) -> list[ColumnElement[Any]]:
    cost, revenue = sums.c.cost, sums.c.revenue
    return [
        _as_int(sums.c["count"]).label("count"),
        _as_int(sums.c.tokens_in).label("tokens_in"),
        _as_int(sums.c.tokens_out).label("tokens_out"),
        _as_int(sums.c.total_credits).label("total_credits"),
        *(_as_int(sums.c[name]).label(name) for name in COUNTED),
        (sums.c.latency_ms_sum / func.nullif(cast(sums.c["count"], Double), 0)).label("avg_latency_ms"),
        *(percentiles.c[name] for name in PERCENTILES),
        _as_float(func.coalesce(cost, 0)).label("total_cost_usd"),
        _as_float(func.coalesce(revenue, 0)).label("total_revenue_usd"),
        _as_float(func.coalesce(revenue, 0) - func.coalesce(cost, 0)).label("total_profit_usd"),
        (sums.c.margin_sum / func.nullif(cast(sums.c.margin_count, Double), 0)).label("avg_margin"),
        _as_float(case((revenue > 0, (revenue - cost) / _divisor(revenue)))).label("gross_margin"),
        _as_int(sums.c.unpriced_count).label("unpriced_count"),
        percentiles.c.approximate,
    ]


def aggregate_statement(
    metric_filter: MetricFilter,
    plan: ReadPlan,
    backend: Backend,
    price_starts: Sequence[datetime],
    models: Sequence[str] | None = None,
) -> CompoundSelect[Any]:
    """The statement; `price_starts` are every instant a model or credit price begins, sorted;
    `models`: every model stored, where `searches_per_model`."""
    selection = raw_rows(metric_filter, plan)
    raw: NamedFromClause = selection
    once = reads_once(metric_filter, backend) and not models
    if once:
        raw = selection.element.cte("selection").prefix_with("MATERIALIZED")
    parts = summed_parts(metric_filter, plan, raw, price_starts, models=models, one_pass=once)
    per_model = sums_per_model(parts)
    if plan.uses_rollups:
        latencies = latency_values(metric_filter, plan, raw, bin_raw=plan.binned_raw)
        overall_percentiles = weighted_percentiles(latencies, [])
        model_percentiles = weighted_percentiles(latencies, ["model"])
    else:
        succeeded = select(*raw.c).where(raw.c.error.is_(None)).subquery("succeeded")
        if backend.ranks_in_one_pass:
            overall_percentiles, model_percentiles = _ranked_in_one_pass(succeeded, per_model, models)
        else:
            overall_percentiles = exact_percentiles(succeeded, [], backend)
            model_percentiles = exact_percentiles(succeeded, ["model"], backend)
    overall = select(*(sum_of_counts(per_model.c[name]).label(name) for name in PER_MODEL_SUMS)).subquery(
        "overall"
    )
    overall_figures = figure_columns(overall, overall_percentiles)
    return union_all(
        select(cast(null(), String).label("model"), *overall_figures).select_from(
            overall.join(overall_percentiles, true())
        ),
        select(per_model.c.model, *figure_columns(per_model, model_percentiles)).select_from(
            per_model.outerjoin(model_percentiles, model_percentiles.c.model == per_model.c.model)
        ),
    )


# --- one statement per shape ---------------------------------------------------------------------

_STAND_IN_TIME: Final = datetime(4000, 1, 1, tzinfo=UTC)
"""Where the stand-ins of a statement's instants begin: later than any constant the statement holds."""
_STAND_IN_TEXT: Final = "\ue000"
"""What the stand-ins of a filter's values begin with (a private-use character no constant holds)."""


@dataclass(frozen=True)
class Shape:
    """What decides the text of an aggregate statement: the filter, plan and price starts with each
    instant replaced by a stand-in that keeps their order (every choice the statement's builder
    makes compares instants with each other, never with a constant), and each filter value by a
    stand-in; the stand-ins' real values (`values`, by parameter name) are bound at execution."""

    key: tuple[Any, ...]
    metric_filter: MetricFilter
    plan: ReadPlan
    price_starts: tuple[datetime, ...]
    models: tuple[str, ...] | None
    names: Mapping[Any, str]
    """The parameter name of each stand-in."""
    values: dict[str, Any]

    @classmethod
    def of(
        cls,
        metric_filter: MetricFilter,
        plan: ReadPlan,
        price_starts: Sequence[datetime],
        models: Sequence[str] | None = None,
    ) -> Shape:
        moments: set[datetime | None] = {metric_filter.since, metric_filter.until, *price_starts}
        for _, since, rollup_until in plan.rollup_ranges:
            moments.update((since, rollup_until))
        for since, until in plan.raw_ranges:
            moments.update((since, until))
        ordered = sorted(moment for moment in moments if moment is not None)
        stand_in = {moment: _STAND_IN_TIME + timedelta(microseconds=n) for n, moment in enumerate(ordered)}
        names: dict[Any, str] = {stand_in[moment]: f"am_t{n}" for n, moment in enumerate(ordered)}
        values: dict[str, Any] = {f"am_t{n}": moment for n, moment in enumerate(ordered)}

        def instant(moment: datetime | None) -> datetime | None:
            return None if moment is None else stand_in[moment]

        texts: dict[str, Any] = {}
        for name in EQUALITY_FILTERS:
            value = getattr(metric_filter, name)
            if value is not None:
                texts[name] = f"{_STAND_IN_TEXT}{name}"
                names[texts[name]] = f"am_{name}"
                values[f"am_{name}"] = value
        shaped_filter = replace(
            metric_filter,
            since=instant(metric_filter.since),
            until=instant(metric_filter.until),
            **texts,
        )
        shaped_plan = ReadPlan(
            rollup_ranges=tuple(
                (level, instant(since), stand_in[until]) for level, since, until in plan.rollup_ranges
            ),
            raw_ranges=tuple((instant(since), instant(until)) for since, until in plan.raw_ranges),
            binned_raw=plan.binned_raw,
        )
        shaped_starts = tuple(stand_in[start] for start in price_starts)
        shaped_models = None if models is None else tuple(models)
        key = (
            shaped_filter,
            shaped_plan,
            shaped_starts,
            shaped_models,
            MAX_PRICE_PERIODS_APART,
            MAX_MODEL_SEARCHES,
            MAX_MODELS_RANKED_IN_ONE_SORT,
        )
        return cls(key, shaped_filter, shaped_plan, shaped_starts, shaped_models, names, values)


class AggregateStatements:
    """`aggregate_statement`s built once per shape and reused with the values bound by name: building
    and compiling the statement (~20k characters of SQL) cost 10-40 ms of Python a call, more than
    the database spends on many selections. A reused statement's cache key is memoized and its
    compiled form is in SQLAlchemy's compiled cache. A statement and its column collections take
    ~1.5 MB: the most recently used `size` shapes are kept (a dashboard asks a dozen or so).

    A statement holds no URL, engine or value, only the SQL of its kind of database: the shapes built
    are shared by every store of the process on that kind (a store opened per request or per command
    builds nothing its predecessors built: the first aggregate of a new store took ~170 ms more,
    building). Stores in other threads share them too, under a lock; a built statement is only
    read."""

    _built_by_backend: ClassVar[dict[str, OrderedDict[tuple[Any, ...], CompoundSelect[Any]]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, backend: Backend, size: int = 32) -> None:
        self.backend = backend
        self.size = size
        with self._lock:
            self._built = self._built_by_backend.setdefault(backend.name, OrderedDict())

    def statement(
        self,
        metric_filter: MetricFilter,
        plan: ReadPlan,
        price_starts: Sequence[datetime],
        models: Sequence[str] | None = None,
    ) -> tuple[CompoundSelect[Any], dict[str, Any]]:
        """The statement and the parameters to execute it with."""
        if not metric_filter.storable:  # its statement holds no filter value: nothing to reuse
            return aggregate_statement(metric_filter, plan, self.backend, price_starts, models), {}
        shape = Shape.of(metric_filter, plan, price_starts, models)
        with self._lock:
            statement = self._built.get(shape.key)
            if statement is not None:
                self._built.move_to_end(shape.key)
        if statement is None:  # built outside the lock: two threads may both build it, alike
            statement = self._build(shape)
            with self._lock:
                self._built[shape.key] = statement
                while len(self._built) > self.size:
                    self._built.popitem(last=False)
        return statement, shape.values

    def _build(self, shape: Shape) -> CompoundSelect[Any]:
        built = aggregate_statement(
            shape.metric_filter, shape.plan, self.backend, shape.price_starts, shape.models
        )

        def named(element: Any, **_: Any) -> Any:
            if isinstance(element, BindParameter) and _is_stand_in(element.value):
                return bindparam(shape.names[element.value], element.value, type_=element.type)
            return None

        statement = replacement_traverse(built, {}, named)
        assert isinstance(statement, CompoundSelect)
        cache_key = statement._generate_cache_key()
        assert cache_key is not None, "an aggregate statement is cacheable"
        for parameter in cache_key.bindparams:
            if _is_stand_in(parameter.value):
                assert parameter.key == shape.names[parameter.value], parameter
        return statement


def _is_stand_in(value: Any) -> bool:
    if isinstance(value, datetime):
        return value >= _STAND_IN_TIME
    return isinstance(value, str) and value.startswith(_STAND_IN_TEXT)


def aggregate_from_rows(rows: Sequence[Mapping[str, Any]]) -> Aggregate:
    overall: Mapping[str, Any] | None = None
    by_model: dict[str, ModelAggregate] = {}
    for row in rows:
        if row["model"] is None:
            overall = row
            continue
        by_model[row["model"]] = ModelAggregate(
            count=_integer(row["count"]),
            total_tokens=_integer(row["tokens_in"]) + _integer(row["tokens_out"]),
            avg_latency_ms=row["avg_latency_ms"],
            p95_latency_ms=row["p95_latency_ms"],
            total_cost_usd=row["total_cost_usd"],
            unpriced_count=_integer(row["unpriced_count"]),
        )
    assert overall is not None, "an ungrouped aggregate always returns one row"
    ordered = dict(sorted(by_model.items(), key=lambda item: (-item[1].count, item[0])))
    return Aggregate(
        count=_integer(overall["count"]),
        tokens_in=_integer(overall["tokens_in"]),
        tokens_out=_integer(overall["tokens_out"]),
        total_credits=_integer(overall["total_credits"]),
        cache_read_tokens=_integer(overall["cache_read_tokens"]),
        cache_write_tokens=_integer(overall["cache_write_tokens"]),
        reasoning_tokens=_integer(overall["reasoning_tokens"]),
        avg_latency_ms=overall["avg_latency_ms"],
        p50_latency_ms=overall["p50_latency_ms"],
        p95_latency_ms=overall["p95_latency_ms"],
        p99_latency_ms=overall["p99_latency_ms"],
        total_cost_usd=overall["total_cost_usd"],
        total_revenue_usd=overall["total_revenue_usd"],
        total_profit_usd=overall["total_profit_usd"],
        avg_margin=overall["avg_margin"],
        gross_margin=overall["gross_margin"],
        unpriced_count=_integer(overall["unpriced_count"]),
        error_count=_integer(overall["error_count"]),
        percentiles_exact=not overall["approximate"],
        by_model=ordered,
    )
