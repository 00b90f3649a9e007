"""ClickHouse's repository: what the stores ask of a database, answered by ClickHouse with the same
numbers `repository.MetricsRepository` gives on SQLite and PostgreSQL.

clickhouse-connect's client is synchronous (its own async client needs aiohttp and refuses chdb), so
every call runs in a worker thread (`asyncio.to_thread`): the event loop never waits on ClickHouse.
The HTTP client has no session, so the writer's inserts and the readers' queries may overlap; chdb
serialises the calls on its handle itself. A streamed breakdown reads on a client of its own, since
a handle with an open stream answers nothing else.

The figures: money in Decimal (sums of tokens x price are exact, divided by 1e6 once, in Python),
tokens and credits summed as integers per price period and each period priced once: in SQL by ASOF
JOIN of a few groups for breakdowns and `exact=True`, in Python for `aggregate()` (`_tally`), whose
statement then only sums. Without `exact`, whole UTC months, days and hours come from the rollups
that materialized views keep (sql/clickhouse/0004_rollups.sql, 0006, 0007) and the rest of the window
from the timeline, the narrow copy of the actions ordered by time (`plan`), percentiles from their
merged latency histograms (in NumPy); an hour holding a price change from the timeline too, or once
pruned from its hourly rollup rows, which prune split at the change. A user's questions read the
user rollups' whole days and months (0008) and the timeline for the rest; a citizen's the timeline
alone, through its projection. A day or a month holding a price change is read whole and corrected
(`corrected_plan`). With `exact`, or for the newest `limit`,
the raw rows (FINAL) only. Exact percentiles are `quantilesExactInclusive` (NumPy's 'linear') over
the successful actions. Inserts are first id wins, so that the views count an action once.
ClickHouse has no transactions: a statement is atomic, a price sync of several statements is not, and
the ids an insert skips are read just before it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import threading
import uuid
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, localcontext
from itertools import chain, pairwise
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any, Final, TypeVar

import numpy as np

from action_metrics.aggregate import PERCENTILES, Aggregate, ModelAggregate
from action_metrics.breakdown import BreakdownRequest, BreakdownRow, bucket_starts
from action_metrics.charges import ChargeAudit, CreditClaim, InheritedCredits, RememberedClaims
from action_metrics.clickhouse import (
    DAILY_ROLLUPS,
    EARLIEST,
    LATEST,
    MONTHLY_ROLLUPS,
    ROLLUPS,
    TIMELINE,
    USER_ROLLUPS,
    USER_ROLLUPS_FROM,
    VERSION_QUERY,
    ClickHouseURL,
    applied_version,
    check_version,
    upgrade_on,
    version_on,
)
from action_metrics.errors import (
    ActionMetricsError,
    DatabaseError,
    DatabaseUnavailable,
    DataRejected,
    InvalidFilter,
    InvalidPrice,
    RawRowsPruned,
    StatementRefused,
    StoreClosed,
    translated,
)
from action_metrics.model import ActionMetric, refuse_before
from action_metrics.pricing import BEGINNING_OF_TIME, CreditPrice, ModelPrice
from action_metrics.query import EQUALITY_FILTERS, CopyCheckpoint, CopyPosition, MetricFilter
from action_metrics.repository import CatalogueWrite, PruneResult
from action_metrics.rollup import (
    GRAINS,
    LN_GAMMA,
    REPRESENTATIVE_FACTOR,
    ZERO_BIN,
    Grain,
    ceil_to,
    floor_to,
    next_start,
)
from action_metrics.sketch import FRACTIONS, Counted, merged_percentiles

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

T = TypeVar("T")

_MICROSECOND: Final = timedelta(microseconds=1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MILLION: Final = Decimal(1_000_000)

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
_FIELDS: Final = tuple("metadata_json" if column == "metadata" else column for column in _COLUMNS)
"""The `ActionMetric` attribute of each column."""
_HOUR_MICROS: Final = 3_600_000_000
_UUID7_TIME_SHIFT: Final = 80
"""A UUIDv7's top 48 bits are the Unix millisecond it was minted."""
_RANGE_LOOKUP_SPREAD_MS: Final = 86_400_000
"""A batch whose ids' top 48 bits lie within a day of each other (UUIDv7 minted within a day) is
looked up as one range of ids; wider (random UUIDv4), id by id."""
_PRUNED_ANSWERED_FOR: Final = "UTC hours"
"""What the hourly rollups still answer for over a pruned period (`RawRowsPruned` says so)."""
_READ_SETTINGS: Final = {"do_not_merge_across_partitions_select_final": 1}
"""FINAL per partition is enough: copies of one action share its timestamp, hence its month."""
_FIGURE_SETTINGS: Final = {**_READ_SETTINGS, "join_use_nulls": 1, "group_by_use_nulls": 1}


_RAW: Final = "action_metrics FINAL"
"""The raw rows, a re-sent action once."""


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _moment(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


# --- which actions ------------------------------------------------------------------------------------


def _selection(
    metric_filter: MetricFilter,
    columns: str,
    ranges: Sequence[Range] | None = None,
    table: str = _RAW,
) -> tuple[str, dict[str, Any]]:
    """The actions a filter selects (the newest `limit` when it has one) from `table`: SQL and its
    parameters. With `ranges`, only those within them (the filter's window already cut into them)."""
    terms: list[str] = []
    parameters: dict[str, Any] = {}
    for name in EQUALITY_FILTERS:
        value = getattr(metric_filter, name)
        if value is not None:
            terms.append(f"{name} = {{{name}:String}}")
            parameters[name] = value
    if not metric_filter.storable:
        terms.append("0")
    if ranges is not None:
        terms.append(_ranges_sql("timestamp", ranges))
    elif metric_filter.since is not None:
        terms.append("timestamp >= fromUnixTimestamp64Micro({since:Int64}, 'UTC')")
        parameters["since"] = _micros(max(metric_filter.since, EARLIEST))
        if metric_filter.since >= LATEST:
            terms.append("0")
    if ranges is None and metric_filter.until is not None:
        terms.append("timestamp < fromUnixTimestamp64Micro({until:Int64}, 'UTC')")
        parameters["until"] = _micros(min(metric_filter.until, LATEST))
        if metric_filter.until <= EARLIEST:
            terms.append("0")
    where = f" WHERE {' AND '.join(terms)}" if terms else ""
    statement = f"SELECT {columns} FROM {table}{where}"
    if metric_filter.limit is not None:
        # toString: ClickHouse orders UUIDs by their halves swapped; their text orders as Python does.
        statement += " ORDER BY timestamp DESC, toString(id) DESC LIMIT {limit:UInt64}"
        parameters["limit"] = metric_filter.limit
    return statement, parameters


# --- the figures --------------------------------------------------------------------------------------

Range = tuple[datetime | None, datetime | None]
"""A time range [start, end) in UTC; None: unbounded on that side."""

_HOUR: Final = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class _Sources:
    """Where a question's figures come from. Exact: the rows of `table` the filter selects,
    percentiles by `quantilesExactInclusive`. Otherwise the whole UTC months of `months` from
    `monthly_rollup`, the whole UTC days of `days` from `daily_rollup`, the whole UTC hours of
    `hours` from `rollup` (and the pruned parts of hours that a price change cuts, split there by
    prune), the rest of the window (`raw`: its partial hours, and the hours holding a price change)
    from `table`, percentiles from their merged latency histograms. `corrections`: the days and
    months read whole although a price changes inside them (`corrected_plan`, `aggregate()` only)."""

    exact: bool
    table: str = _RAW
    rollup: str = ""
    daily_rollup: str = ""
    monthly_rollup: str = ""
    raw: tuple[Range, ...] = ()
    hours: tuple[Range, ...] = ()
    days: tuple[Range, ...] = ()
    months: tuple[Range, ...] = ()
    corrections: tuple[Correction, ...] = ()


_EXACT: Final = _Sources(exact=True)
_TIMELINE_EXACT: Final = _Sources(exact=True, table=TIMELINE)


def _merged(ranges: Sequence[Range]) -> tuple[Range, ...]:
    """The non-empty ranges, oldest first, those that touch made one."""
    kept: list[Range] = []
    for start, end in ranges:
        if start is not None and end is not None and start >= end:
            continue
        if kept and kept[-1][1] is not None and kept[-1][1] == start:
            kept[-1] = (kept[-1][0], end)
        else:
            kept.append((start, end))
    return tuple(kept)


@dataclass(frozen=True, slots=True)
class Plan:
    """A window cut into what each source reads: raw rows, whole UTC hours, days and months."""

    raw: tuple[Range, ...] = ()
    hours: tuple[Range, ...] = ()
    days: tuple[Range, ...] = ()
    months: tuple[Range, ...] = ()


def plan(since: datetime | None, until: datetime | None, cuts: Sequence[datetime]) -> Plan:
    """Split [since, until) at `cuts` (the buckets' starts, the price changes): each piece's whole
    UTC months come from a monthly rollup, its whole UTC days around them from a daily one, its whole
    UTC hours around those from an hourly one, and its partial hours at either end from raw rows."""
    inside = sorted({c for c in cuts if (since is None or c > since) and (until is None or c < until)})
    levels: list[list[Range]] = [[] for _ in range(len(GRAINS) + 1)]  # raw rows, then each grain's

    def split(start: datetime | None, end: datetime | None, level: int) -> None:
        """[start, end) at `level` or coarser: its whole buckets of the next grain one level up, the
        rest (all of it when it holds none) here."""
        if level == len(GRAINS):
            levels[level].append((start, end))
            return
        grain = GRAINS[level]
        first = None if start is None else ceil_to(start, grain)
        last = None if end is None else floor_to(end, grain)
        if first is not None and last is not None and first >= last:
            levels[level].append((start, end))
            return
        if start is not None:
            levels[level].append((start, first))
        split(first, last, level + 1)
        if end is not None:
            levels[level].append((last, end))

    for start, end in pairwise([since, *inside, until]):
        split(start, end, 0)
    raw, hours, days, months = (_merged(ranges) for ranges in levels)
    return Plan(raw, hours, days, months)


@dataclass(frozen=True, slots=True)
class Correction:
    """The part of a UTC day or month after a price change inside it: the bucket's rollup row is
    priced by the period in force at its `base` (the bucket's start), so this part's sums are read
    again, finer (`plan` cut at every change: each piece in one period), and added at their own
    prices less the base's. Money is linear in the sums; counts and latencies are the row's alone."""

    base: datetime
    plan: Plan


def corrected_plan(
    since: datetime | None,
    until: datetime | None,
    changes: Sequence[datetime],
    cuts: Sequence[datetime] = (),
) -> tuple[Plan, tuple[Correction, ...]]:
    """[since, until) as whole months, days and hours whatever the prices did (`plan` cut only at
    `cuts`, a breakdown's buckets), and what a price change inside them needs: an hour holding one is
    read from raw rows (each priced by its own period), a day or a month holding one from its rollup
    with a `Correction` from the first change on. Over all time that reads a month where `plan` read
    the days around a change. (No cut lies inside a day or a month read whole, so a correction's rows
    fall in its bucket's.)"""
    coarse = plan(since, until, cuts)
    raw, hours = list(coarse.raw), coarse.hours
    corrections: dict[datetime, Correction] = {}
    inside = {c for c in changes if (since is None or c > since) and (until is None or c < until)}
    for change in sorted(inside):
        hour = floor_to(change, "hour")
        if change != hour and _holds(hours, change):
            before, rest = _cut_at(hours, hour)
            hours = _merged([*before, *_cut_at(rest, hour + _HOUR)[1]])
            raw.append((hour, hour + _HOUR))
            continue
        levels: tuple[tuple[Grain, tuple[Range, ...]], ...] = (("day", coarse.days), ("month", coarse.months))
        for grain, ranges in levels:
            start = floor_to(change, grain)
            if change != start and start not in corrections and _holds(ranges, change):
                corrections[start] = Correction(start, plan(change, next_start(start, grain), changes))
    raw_ranges = _merged(sorted(raw, key=_range_start))
    return replace(coarse, raw=raw_ranges, hours=hours), tuple(corrections.values())


def _holds(ranges: Sequence[Range], moment: datetime) -> bool:
    return any((start is None or start <= moment) and (end is None or moment < end) for start, end in ranges)


def _cut_at(ranges: Sequence[Range], moment: datetime) -> tuple[tuple[Range, ...], tuple[Range, ...]]:
    """The parts of `ranges` before `moment` and from it on (a range across it cut in two)."""
    before: list[Range] = []
    after: list[Range] = []
    for start, end in ranges:
        if start is None or start < moment:
            before.append((start, moment if end is None else min(end, moment)))
        if end is None or end > moment:
            after.append((moment if start is None else max(start, moment), end))
    return tuple(before), tuple(after)


def _pruned_raw_from_hours(cut: Plan, cutoff: datetime, bounds: Sequence[int], question: str) -> Plan:
    """`cut` with its raw ranges before the prune's `cutoff` read from the hourly rollup instead, which
    holds them only when they begin and end on an hour or a price change (`_on_split_edges`)."""
    pruned, raw = _cut_at(cut.raw, cutoff)
    if not _on_split_edges(pruned, bounds):
        raise RawRowsPruned(cutoff, question, whole=_PRUNED_ANSWERED_FOR)
    return replace(cut, raw=raw, hours=_merged(sorted((*cut.hours, *pruned), key=_range_start)))


def _hours_as_raw(cut: Plan) -> Plan:
    """`cut` for a rollup without an hourly level (the user rollups): its whole hours read from the
    timeline with its raw rows."""
    return replace(cut, raw=_merged(sorted((*cut.raw, *cut.hours), key=_range_start)), hours=())


def _range_start(bounded: Range) -> datetime:
    return EARLIEST if bounded[0] is None else bounded[0]


def _on_split_edges(ranges: Sequence[Range], changes: Sequence[int]) -> bool:
    """Whether every range begins and ends on a UTC hour or a price change (microseconds): where
    prune split the hourly rollups' rows of an hour (`_split_hours`), so they hold just the range."""
    edges = {_moment(change) for change in changes}
    return all(
        edge is not None and (edge in edges or edge == floor_to(edge, "hour"))
        for bounded in ranges
        for edge in bounded
    )


_CHAINED_RANGES: Final = 4
"""Up to this many ranges are written as an OR of comparisons; past it the whole hours of the short
ones become one set (see `_ranges_sql`)."""
_SHORT_RANGE: Final = timedelta(hours=6)
_MOST_HOURS_IN_A_SET: Final = 5_000
"""A statement holds at most 256 KiB of text (ClickHouse's `max_query_size`)."""
_DATETIME_HOURS: Final = (datetime(1970, 1, 1, tzinfo=UTC), datetime(2106, 2, 7, tzinfo=UTC))
"""Where `toStartOfHour`, which returns a 32-bit DateTime, is exact: outside it, it clamps."""


def _between(column: str, start: datetime | None, end: datetime | None) -> str:
    terms = []
    if start is not None:
        terms.append(f"{column} >= fromUnixTimestamp64Micro({_micros(start)}, 'UTC')")
    if end is not None:
        terms.append(f"{column} < fromUnixTimestamp64Micro({_micros(end)}, 'UTC')")
    return f"({' AND '.join(terms) or '1'})"


def _whole_hours(ranges: Sequence[Range]) -> tuple[list[datetime], list[Range]]:
    """The whole UTC hours within the short `ranges` (at most `_SHORT_RANGE` of whole hours, between
    1970 and 2106), sorted, and what is left over: the longer ranges, and the short ones' pieces
    before and after their whole hours. The ranges may come in any order (a window's and its
    corrections')."""
    hours: list[datetime] = []
    pieces: list[Range] = []
    low, high = _DATETIME_HOURS
    for start, end in ranges:
        if start is None or end is None:
            pieces.append((start, end))
            continue
        first = floor_to(start, "hour")
        first = max(first if first == start else first + _HOUR, low)
        last = min(floor_to(end, "hour"), high)
        if first >= last or last - first > _SHORT_RANGE:
            pieces.append((start, end))
            continue
        if start < first:
            pieces.append((start, first))
        if last < end:
            pieces.append((last, end))
        hours.extend(first + _HOUR * n for n in range((last - first) // _HOUR))
    return sorted(hours), pieces


def _hour_gaps(ranges: Sequence[Range]) -> tuple[Range, list[datetime]] | None:
    """The hull of `ranges` and the whole UTC hours between them, when what lies between them is
    short whole hours (at most `_SHORT_RANGE` each, none at an end of `_DATETIME_HOURS`, where
    `toStartOfHour` clamps): a local day's hours from an hourly rollup, each day's edge hour left
    to raw rows. None otherwise."""
    merged = _merged(sorted(ranges, key=_range_start))
    hours: list[datetime] = []
    low, high = _DATETIME_HOURS
    for (_, end), (start, _) in pairwise(merged):
        if end is None or start is None or end >= start:
            return None  # overlapping: not a window's ranges
        if floor_to(end, "hour") != end or floor_to(start, "hour") != start or start - end > _SHORT_RANGE:
            return None
        if end <= low or start >= high - _HOUR:
            return None
        hours.extend(end + _HOUR * n for n in range((start - end) // _HOUR))
    if not hours or len(hours) > _MOST_HOURS_IN_A_SET:
        return None
    return (merged[0][0], merged[-1][1]), hours


def _ranges_sql(column: str, ranges: Sequence[Range]) -> str:
    """`column` within any of `ranges` (microseconds computed here, never a user's text). Many ranges
    (a local day's edge hours, read from raw rows, are one each) are one set of their short ones'
    whole hours, `toUnixTimestamp(toStartOfHour(column)) IN (...)`, and an OR of what is left over:
    ClickHouse plans an OR of 95 hours in 125-140 ms and such a set in 10-20, and skips the same
    granules with either (the timeline at 10M: 131 of 1,286; README). Many ranges with only short
    whole hours between them (a rollup's hours around a local day's edges) are their hull less the
    set of those hours (`_hour_gaps`)."""
    if not ranges:
        return "0"
    gaps = _hour_gaps(ranges) if len(ranges) > _CHAINED_RANGES else None
    if gaps is not None:
        (start, end), between = gaps
        listed = ", ".join(str(int(hour.timestamp())) for hour in between)
        return (
            f"({_between(column, start, end)} AND toUnixTimestamp(toStartOfHour({column})) NOT IN ({listed}))"
        )
    hours, pieces = _whole_hours(ranges) if len(ranges) > _CHAINED_RANGES else ([], list(ranges))
    if len(hours) > _MOST_HOURS_IN_A_SET:
        hours, pieces = [], list(ranges)
    alternatives = [_between(column, start, end) for start, end in pieces]
    if hours:
        # toStartOfHour clamps outside 1970-2106: the hull keeps it to where it is exact.
        listed = ", ".join(str(int(hour.timestamp())) for hour in hours)
        hull = _between(column, hours[0], hours[-1] + _HOUR)
        alternatives.append(f"({hull} AND toUnixTimestamp(toStartOfHour({column})) IN ({listed}))")
    return f"({' OR '.join(alternatives)})"


_LATENCY_BIN: Final = (
    f"if(s.latency_ms > 0, toInt32(ceil(log(s.latency_ms) / {LN_GAMMA!r})), toInt32({ZERO_BIN}))"
)
"""`rollup.bin_of` in SQL, as sql/clickhouse/0004_rollups.sql computes it for the rollups."""

_RAW_SOURCE: Final = """
    SELECT
        {keys}
        s.model AS model,
        s.credits_charged AS credits,
        -- Every instant a price changes, sorted: an action's price period is how many it is at or after.
        arrayCount(b -> b <= s.timestamp, bounds) AS period,
        count() AS g_count,
        sum(toUInt128(s.tokens_in)) AS g_tokens_in,
        sum(toUInt128(s.tokens_out)) AS g_tokens_out,
        sum(toUInt128(s.cache_read_tokens)) AS g_cache_read,
        sum(toUInt128(s.cache_write_tokens)) AS g_cache_write,
        sum(toUInt128(s.reasoning_tokens)) AS g_reasoning,
        sum(toDecimal256(s.latency_ms, 30)) AS g_latency_sum,
        countIf(s.succeeded) AS g_succeeded,
        {latencies} AS g_latencies
    FROM ({selection}) AS s{where}
    GROUP BY {group}model, credits, period"""
_ROLLUP_SOURCE: Final = """
    SELECT
        {keys}
        r.model AS model,
        r.credits AS credits,
        -- A row is priced by the period in force at its start (a `Correction` adds a change inside it).
        arrayCount(b -> b <= r.start, bounds) AS period,
        sum(r.count) AS g_count,
        sum(r.tokens_in) AS g_tokens_in,
        sum(r.tokens_out) AS g_tokens_out,
        sum(r.cache_read_tokens) AS g_cache_read,
        sum(r.cache_write_tokens) AS g_cache_write,
        sum(r.reasoning_tokens) AS g_reasoning,
        sum(r.latency_ms_sum) AS g_latency_sum,
        sum(r.succeeded) AS g_succeeded,
        {latencies} AS g_latencies
    FROM {rollup} AS r
    WHERE {where}
    GROUP BY {group}model, credits, period"""
_BOUNDS: Final = "\n    arrayMap(m -> fromUnixTimestamp64Micro(m, 'UTC'), {bounds:Array(Int64)}) AS bounds"
"""Every instant a price changes, sorted: an action's price period is how many it is at or after."""
_PERIODS: Final = """
WITH{bounds},
periods AS ({sources}
),
priced AS (
    SELECT
        {carried}
        g.weight AS weight, toUInt8(g.base < 0) AS counted,
        g.model AS model, g.credits AS credits, g.g_count AS g_count, g.g_tokens_in AS g_tokens_in,
        g.g_tokens_out AS g_tokens_out, g.g_cache_read AS g_cache_read, g.g_cache_write AS g_cache_write,
        g.g_reasoning AS g_reasoning, g.g_latency_sum AS g_latency_sum, g.g_succeeded AS g_succeeded,
        g.g_latencies AS g_latencies,
        -- USD x 1e6, exact: the division by 1e6 is done once, on the sum. Period 0 is before any
        -- price: unpriced, no revenue.
        if(g.priced_period = 0, NULL,
            toDecimal256(g.g_tokens_in - g.g_cache_read - g.g_cache_write, 0) * p.input_per_1m
            + toDecimal256(g.g_cache_read, 0) * coalesce(p.cache_read_per_1m, p.input_per_1m)
            + toDecimal256(g.g_cache_write, 0) * coalesce(p.cache_write_per_1m, p.input_per_1m)
            + toDecimal256(g.g_tokens_out, 0) * p.output_per_1m) AS cost_e6,
        toDecimal256(g.credits, 0)
            * if(g.priced_period = 0, toDecimal128(0, 9), coalesce(c.usd_per_credit, toDecimal128(0, 9)))
            AS unit_revenue
    FROM (
        SELECT *, pw.1 AS priced_period, pw.2 AS weight, bounds[greatest(priced_period, 1)] AS starts,
            toUInt8(1) AS one
        FROM periods
        -- A correction's sums (base >= 0) at their own period's prices less its bucket row's.
        ARRAY JOIN if(
            base < 0, [(period, toInt8(1))], [(period, toInt8(1)), (toUInt64(base), toInt8(-1))]
        ) AS pw
    ) AS g
    ASOF LEFT JOIN (SELECT * FROM model_prices FINAL) AS p
        ON g.model = p.model AND g.starts >= p.effective_from
    ASOF LEFT JOIN (SELECT toUInt8(1) AS one, effective_from, usd_per_credit FROM credit_prices FINAL) AS c
        ON g.one = c.one AND g.starts >= c.effective_from
)"""
"""Raw rows and rollup rows summed per (group, model, credit charge, price period, base), as integers,
and only those few sums priced: a price is looked up per period, not per action (the ASOF JOINs meet
a few rows). `bounds` is every instant a price changes, read just before (`_prices`). `base` is -1
for what the window reads, or for a `Correction`'s sums the price period its bucket's row is priced
by: those rows count no action (`counted` 0) and add their money at their own period's prices
(`weight` 1) less the base's (-1)."""
_PRICED_COLUMNS: Final = {
    _RAW: "model, timestamp, tokens_in, tokens_out, cache_read_tokens, cache_write_tokens, "
    "reasoning_tokens, credits_charged, latency_ms, error IS NULL AS succeeded",
    TIMELINE: "model, timestamp, tokens_in, tokens_out, cache_read_tokens, cache_write_tokens, "
    "reasoning_tokens, credits_charged, latency_ms, succeeded",
}
_FIGURES: Final = """
    sumIf(g_count, counted) AS f_count,
    sumIf(g_tokens_in, counted) AS f_tokens_in,
    sumIf(g_tokens_out, counted) AS f_tokens_out,
    sumIf(toUInt128(credits) * g_count, counted) AS f_credits,
    sumIf(g_cache_read, counted) AS f_cache_read,
    sumIf(g_cache_write, counted) AS f_cache_write,
    sumIf(g_reasoning, counted) AS f_reasoning,
    sumIf(g_latency_sum, counted) AS f_latency_sum,
    sumIf(g_succeeded, counted) AS f_succeeded,
    {latencies}    ifNull(sum(cost_e6 * weight), toDecimal256(0, 9)) AS f_cost_e6,
    sumIf(toInt64(g_count) * weight, cost_e6 IS NULL) AS f_unpriced,
    sum(unit_revenue * g_count * weight) AS f_revenue,
    -- The actions of one period and credit charge share their revenue: their margins add up to
    -- n - cost / revenue (20 places, so that no sum overflows Decimal256).
    sumIf(
        (g_count - toDecimal256(ifNull(cost_e6, 0), 20) / if(unit_revenue > 0, unit_revenue * 1000000, 1))
            * weight,
        unit_revenue > 0 AND cost_e6 IS NOT NULL
    ) AS f_margin_sum,
    sumIf(toInt64(g_count) * weight, unit_revenue > 0 AND cost_e6 IS NOT NULL) AS f_margin_count,
    sumIf(g_count - g_succeeded, counted) AS f_errors"""
_FIGURE_COUNT: Final = 16
"""Latencies and margins are summed as Decimal, so the figures do not depend on the order in which
threads add rows up: `top` gives the same rows."""
_EXACT_MERGE: Final = "quantilesExactInclusiveIfMerge(0.5, 0.95, 0.99)"
_HISTOGRAM: Final = """
hist AS ({parts}
)"""
"""The latency histogram of each group (and model, when grouped by it): (bin, count) rows of the raw
rows binned and of the rollups' bins unnested (an ARRAY JOIN and a GROUP BY: faster than merging maps
with sumMap). Not by model unless asked: by user over all time at 10M, 918 -> 451 ms (README)."""
_RAW_BINS: Final = """
    SELECT {keys}{bin} AS b, countIf(s.succeeded) AS n
    FROM ({selection}) AS s{where}
    GROUP BY {group}b"""
_ROLLUP_BINS: Final = """
    SELECT {keys}b, sum(n) AS n
    FROM {rollup} AS r ARRAY JOIN r.latency_bins.1 AS b, r.latency_bins.2 AS n
    WHERE {where}
    GROUP BY {group}b"""


def _bin_value(bin_number: str) -> str:
    """`rollup.bin_value_of` in SQL."""
    scaled = f"exp({bin_number} * {LN_GAMMA!r} + {math.log(REPRESENTATIVE_FACTOR)!r})"
    return f"if({bin_number} = {ZERO_BIN}, 0., {scaled})"


def _percentiles_of_histograms(leading: str, group_by: str) -> str:
    """p50, p95 and p99 of each group's histogram in `hist` (`f_latencies`): NumPy's 'linear'
    interpolation between the representatives of the ranks it needs, as `sketch.merged_percentiles`
    computes them. The counts are sorted by their bins, not added up per bin first: a bin that
    several sources hold comes as a run, and the first running count above a rank falls in the run of
    the bin holding that rank (the counts are never negative). Two sorts of numbers, not one of
    (bin, count) tuples: town x Berlin day at 10M 1,388 -> 1,242 ms. In SQL, not in NumPy: that
    breakdown returned ~2M (bin, count) pairs that Python took ~300 ms to read and merge (README)."""

    def value(rank: str) -> str:
        return _bin_value(f"bins[arrayFirstIndex(c -> c > {rank}, running)]")

    return (
        f"SELECT {leading}arrayMap(\n"
        f"    (p, v) -> v.1 + (p - floor(p)) * (v.2 - v.1),\n"
        f"    positions,\n"
        f"    arrayMap(p -> ({value('floor(p)')}, {value('least(floor(p) + 1, total - 1)')}), positions)\n"
        f") AS f_latencies FROM (\n"
        f"SELECT {leading}bins, arrayCumSum(counts) AS running, toFloat64(running[-1]) AS total,\n"
        f"    arrayMap(f -> (total - 1) * f, [0.5, 0.95, 0.99]) AS positions\n"
        f"FROM (SELECT {leading}groupArray(b) AS unsorted, arraySort(unsorted) AS bins,\n"
        f"    arraySort((count, bin) -> bin, groupArray(n), unsorted) AS counts\n"
        f"FROM hist{group_by}))"
    )


_OUTER: Final = (
    "f_count, f_tokens_in, f_tokens_out, f_credits, f_cache_read, f_cache_write, f_reasoning, "
    "f_latency_sum, f_succeeded, f_latencies AS f_percentiles, f_cost_e6, f_unpriced, f_revenue, "
    "f_margin_sum, f_margin_count, f_errors"
)
"""The figures a statement returns, the percentiles as [p50, p95, p99] (`_EXACT_MERGE`'s, or
`_percentiles_of_histograms`')."""


def _rollup_terms(metric_filter: MetricFilter) -> list[str]:
    """The filter's terms on a rollup's rows besides their start (a detail rollup keeps town and
    action type, a user rollup the user; every rollup the model)."""
    terms = [
        f"r.{name} = {{{name}:String}}" for name in _ROLLUP_KEYS if getattr(metric_filter, name) is not None
    ]
    return [*terms, *([] if metric_filter.storable else ["0"])]


@dataclass(frozen=True, slots=True)
class _Level:
    """One source a window reads: its table, the column placing its rows in time, the ranges read for
    the window, and each `Correction`'s ranges there with the price period of its bucket's row."""

    table: str
    moment: str
    ranges: tuple[Range, ...]
    corrected: tuple[tuple[int, tuple[Range, ...]], ...]

    @property
    def read(self) -> tuple[Range, ...]:
        return (*self.ranges, *(r for _, within in self.corrected for r in within))

    def base(self) -> str:
        """`base` (see `_PERIODS`): -1, or the period of the bucket row a corrected range belongs to."""
        cases = "".join(f"{_ranges_sql(self.moment, within)}, {base}, " for base, within in self.corrected)
        return f"multiIf({cases}-1) AS base," if self.corrected else "toInt64(-1) AS base,"


def _levels(sources: _Sources, bounds: Sequence[int]) -> list[_Level]:
    """The sources a window reads (the raw edges, the hours, the days, the months), those it reads
    nothing from left out."""
    levels: list[tuple[str, str, tuple[Range, ...], Callable[[Plan], tuple[Range, ...]]]] = [
        (sources.table, "s.timestamp", sources.raw, attrgetter("raw")),
        (sources.rollup, "r.start", sources.hours, attrgetter("hours")),
        (sources.daily_rollup, "r.start", sources.days, attrgetter("days")),
        (sources.monthly_rollup, "r.start", sources.months, attrgetter("months")),
    ]
    read = []
    for table, moment, ranges, of in levels:
        corrected = [(bisect_right(bounds, _micros(c.base)), of(c.plan)) for c in sources.corrections]
        level = _Level(table, moment, ranges, tuple((base, within) for base, within in corrected if within))
        if level.read:
            read.append(level)
    return read


def _summed_sources(
    metric_filter: MetricFilter,
    sources: _Sources,
    dimensions: Sequence[str],
    starts: Sequence[datetime] | None,
    binned_by_model: bool,
    bounds: Sequence[int],
    chosen: Sequence[Any] | None = None,
) -> tuple[list[str], list[str], dict[str, Any]]:
    """Each source's sums per (`dimensions`, the bucket when `starts` is given, base, model, credit
    charge, price period) (`_RAW_SOURCE`, `_ROLLUP_SOURCE`; `base`: see `_PERIODS`), each source's
    latency histogram per (`dimensions`, bucket, the model when `binned_by_model`, bin) (`_RAW_BINS`,
    `_ROLLUP_BINS`; a correction's ranges have none: its bucket's row holds their latencies), and
    their parameters. `chosen`: only the groups with these values of `dimensions` (a tuple each when
    there are several; None: every group)."""
    grouped = [*dimensions, *(["bucket"] if starts is not None else [])]
    group = "".join(f"{g}, " for g in grouped)

    def keys(alias: str, moment: str) -> list[str]:
        made = [f"{alias}.{d} AS {d}," for d in dimensions]
        if starts is not None:
            made.append(f"{_bucket_index(starts, moment)} AS bucket,")
        return made

    def bin_keys(alias: str, moment: str) -> str:
        return "".join(
            f"{m} " for m in keys(alias, moment) + ([f"{alias}.model AS model,"] if binned_by_model else [])
        )

    bin_group = group + ("model, " if binned_by_model else "")
    columns = ", ".join((*dimensions, _PRICED_COLUMNS[sources.table]))
    nothing, parameters = _selection(metric_filter, columns, (), sources.table)  # the filter's values
    kind = "String" if len(dimensions) == 1 else f"Tuple({', '.join(['String'] * len(dimensions))})"
    if chosen is not None:
        parameters["chosen"] = list(chosen)

    def among_chosen(alias: str) -> list[str]:
        """The term keeping the chosen groups' rows (none when every group is read)."""
        if chosen is None:
            return []
        return [f"({', '.join(f'{alias}.{d}' for d in dimensions)}) IN {{chosen:Array({kind})}}"]

    def raw_where() -> str:
        return "".join(f"\n    WHERE {term}" for term in among_chosen("s"))

    parts = []
    bins = []

    def add_raw(level: _Level, sums: str, latencies: str, binned: str | None) -> None:
        parts.append(
            _RAW_SOURCE.format(
                keys="\n        ".join([*keys("s", "s.timestamp"), level.base()]),
                latencies=latencies,
                selection=sums,
                where=raw_where(),
                group=group + "base, ",
            )
        )
        if binned is not None:
            bins.append(
                _RAW_BINS.format(
                    keys=bin_keys("s", "s.timestamp"),
                    bin=_LATENCY_BIN,
                    selection=binned,
                    where=raw_where(),
                    group=bin_group,
                )
            )

    if sources.exact:
        latencies = f"{_EXACT_MERGE.replace('Merge', 'State')}(s.latency_ms, s.succeeded)"
        every, parameters = _selection(metric_filter, columns, table=sources.table)
        add_raw(_Level(sources.table, "s.timestamp", (), ()), every, latencies, None)
        return parts, bins, parameters
    for level in _levels(sources, bounds):
        terms = [*_rollup_terms(metric_filter), *among_chosen("r")]
        if level.table == sources.table:
            rows, _ = _selection(metric_filter, columns, level.read, level.table)
            binned = (
                _selection(metric_filter, columns, level.ranges, level.table)[0] if level.ranges else None
            )
            add_raw(level, rows, "toUInt8(0)", binned)  # the histograms are summed apart (`_HISTOGRAM`)
            continue
        parts.append(
            _ROLLUP_SOURCE.format(
                keys="\n        ".join([*keys("r", "r.start"), level.base()]),
                latencies="toUInt8(0)",
                rollup=level.table,
                where=" AND ".join([_ranges_sql("r.start", level.read), *terms]),
                group=group + "base, ",
            )
        )
        if level.ranges:
            where = " AND ".join([_ranges_sql("r.start", level.ranges), *terms])
            bins.append(
                _ROLLUP_BINS.format(
                    keys=bin_keys("r", "r.start"), rollup=level.table, where=where, group=bin_group
                )
            )
    if not parts:  # an empty window: one source that selects nothing
        add_raw(_Level(sources.table, "s.timestamp", (), ()), nothing + " LIMIT 0", "toUInt8(0)", None)
    if not bins:
        bins.append(
            _RAW_BINS.format(
                keys=bin_keys("s", "s.timestamp"),
                bin=_LATENCY_BIN,
                selection=nothing + " LIMIT 0",
                where="",
                group=bin_group,
            )
        )
    return parts, bins, parameters


def _priced(
    metric_filter: MetricFilter,
    sources: _Sources,
    dimensions: Sequence[str],
    starts: Sequence[datetime] | None,
    bounds: Sequence[int],
    *,
    binned_by_model: bool = False,
    chosen: Sequence[Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The WITH clause that ends in `priced` (see `_PERIODS`), grouped by `dimensions` (not the model)
    and the bucket when `starts` is given, and `hist` (the histograms, by model too when
    `binned_by_model`), and its parameters."""
    grouped = [*dimensions, *(["bucket"] if starts is not None else [])]
    parts, bins, parameters = _summed_sources(
        metric_filter, sources, dimensions, starts, binned_by_model, bounds, chosen
    )
    statement = _PERIODS.format(
        bounds=_BOUNDS,
        sources="\n    UNION ALL".join(parts),
        carried="".join(f"g.{g} AS {g}, " for g in grouped),
    )
    if not sources.exact:
        statement += "," + _HISTOGRAM.format(parts="\n    UNION ALL".join(bins))
    return statement, {**parameters, "bounds": list(bounds)}


def _exact_statement(
    metric_filter: MetricFilter, sources: _Sources, bounds: Sequence[int]
) -> tuple[str, dict[str, Any]]:
    """`aggregate(exact=True)`: every figure of the selection (model NULL) and of each model, in SQL."""
    priced, parameters = _priced(metric_filter, sources, (), None, bounds)
    figures = _FIGURES.format(latencies=f"{_EXACT_MERGE}(g_latencies) AS f_latencies,\n")
    statement = (
        f"{priced}\nSELECT model, {_OUTER} FROM (\nSELECT model,{figures}"
        "\nFROM priced\nGROUP BY GROUPING SETS ((model), ())\n)"
    )
    return statement, parameters


_NO_BINS: Final = "CAST(([], []), 'Tuple(Array(Int32), Array(UInt64))')"
"""A source read only for corrections (sums only: their bucket's row holds their latencies) reads no
bins: their column is the largest a rollup row has."""


def _summed_statement(
    metric_filter: MetricFilter, sources: _Sources, bounds: Sequence[int]
) -> tuple[str, dict[str, Any]]:
    """`aggregate()` from the rollups: one read of each source (the raw edges, the hours, the days,
    the months), its sums per (base, model, credit charge, price period) with the group's latency
    histogram, priced and added up by `_tally` (a statement that also priced, grouped and merged them
    in SQL took 2-3x as long, most of it planning; see README). `base` is -1 for what the window
    reads there, or, for a `Correction`'s rows, the price period its bucket's row is priced by (their
    sums only: the bucket's row holds their count and latencies)."""
    columns = _PRICED_COLUMNS[sources.table]
    parts = []
    nothing, parameters = _selection(metric_filter, columns, (), sources.table)  # the filter's values
    for level in _levels(sources, bounds):
        if level.table == sources.table:
            selection, _ = _selection(metric_filter, columns, level.read, level.table)
            bins = (
                f"sumMapIf([{_LATENCY_BIN}], [toUInt64(s.succeeded)], base < 0)" if level.ranges else _NO_BINS
            )
            parts.append(
                _RAW_SOURCE.format(
                    keys=level.base(), latencies=bins, selection=selection, where="", group="base, "
                )
            )
        else:
            where = " AND ".join([_ranges_sql("r.start", level.read), *_rollup_terms(metric_filter)])
            bins = "sumMapIf(r.latency_bins, base < 0)" if level.ranges else _NO_BINS
            parts.append(
                _ROLLUP_SOURCE.format(
                    keys=level.base(), latencies=bins, rollup=level.table, where=where, group="base, "
                )
            )
    if not parts:  # an empty window: one source that selects nothing
        selection = nothing
        bins = f"sumMap([{_LATENCY_BIN}], [toUInt64(s.succeeded)])"
        parts.append(
            _RAW_SOURCE.format(
                keys="toInt64(-1) AS base,", latencies=bins, selection=selection, where="", group="base, "
            )
        )
    return f"WITH {_BOUNDS}" + "\n    UNION ALL".join(parts), {**parameters, "bounds": list(bounds)}


_MONEY: Final = Context(prec=100)
"""Exact for any sum of tokens (below 2**128) times a price (20 digits), and for the margins'
quotients far past the 1e-9 they are compared to."""


@dataclass(frozen=True, slots=True)
class _Rate:
    """A model's price per million tokens, each cache price its own or the input price."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal


@dataclass(frozen=True, slots=True)
class _Prices:
    """Every price stored. `bounds`: every instant a model or credit price starts (microseconds,
    sorted); an action's price period is how many of them are at or before it, and period n > 0 is
    priced by what is in force at bounds[n - 1] (as `_PERIODS`' ASOF JOINs find it). Period 0, before
    any price, is unpriced and earns nothing."""

    bounds: list[int]
    models: Mapping[str, Sequence[tuple[int, _Rate]]]
    """Each model's rates by start, oldest first."""
    credits: Sequence[tuple[int, Decimal]]
    """The credit's price by start, oldest first."""

    def rate(self, model: str, period: int) -> _Rate | None:
        return _in_force(self.models.get(model, ()), self.bounds, period)

    def per_credit(self, period: int) -> Decimal:
        return _in_force(self.credits, self.bounds, period) or Decimal(0)


def _in_force(history: Sequence[tuple[int, T]], bounds: Sequence[int], period: int) -> T | None:
    """The value of `history` in force in price period `period` (see `_Prices`)."""
    if period == 0:
        return None
    at = bisect_right(history, bounds[period - 1], key=itemgetter(0))
    return history[at - 1][1] if at else None


_PRICES_QUERY: Final = (
    "SELECT model, toUnixTimestamp64Micro(effective_from), input_per_1m, output_per_1m, "
    "cache_read_per_1m, cache_write_per_1m FROM model_prices FINAL "
    "UNION ALL SELECT NULL, toUnixTimestamp64Micro(effective_from), usd_per_credit, NULL, NULL, NULL "
    "FROM credit_prices FINAL"
)
"""Every model price, and every credit price (model NULL, its price as the input's)."""


def _prices_of(rows: Sequence[Sequence[Any]]) -> _Prices:
    models: dict[str, list[tuple[int, _Rate]]] = {}
    credits: list[tuple[int, Decimal]] = []
    for model, start, price, output, cache_read, cache_write in sorted(rows, key=itemgetter(1)):
        if model is None:
            credits.append((start, Decimal(price)))
            continue
        rate = _Rate(
            input=Decimal(price),
            output=Decimal(output),
            cache_read=Decimal(price if cache_read is None else cache_read),
            cache_write=Decimal(price if cache_write is None else cache_write),
        )
        models.setdefault(model, []).append((start, rate))
    return _Prices(sorted({int(row[1]) for row in rows}), models, credits)


@dataclass(slots=True)
class _Tally:
    """The figures of a selection or a model, added up from `_summed_statement`'s rows as `_FIGURES`
    adds up priced groups in SQL: money exact (Decimal), USD x 1e6 until the end."""

    count: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    credits: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    latency_sum: Decimal = Decimal(0)
    succeeded: int = 0
    cost_e6: Decimal = Decimal(0)
    unpriced: int = 0
    revenue: Decimal = Decimal(0)
    margin_sum: Decimal = Decimal(0)
    margin_count: int = 0

    def add(self, sums: Sequence[Any], credits: int) -> None:
        """A group's counts, tokens and latencies."""
        count, tokens_in, tokens_out, cache_read, cache_write, reasoning, latency_sum, succeeded = sums
        self.count += count
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        self.credits += credits * count
        self.cache_read_tokens += cache_read
        self.cache_write_tokens += cache_write
        self.reasoning_tokens += reasoning
        self.latency_sum += Decimal(latency_sum)
        self.succeeded += succeeded

    def price(self, count: int, money: tuple[Decimal | None, Decimal], sign: int = 1) -> None:
        """A group's money (`_money`), or with `sign` -1 taken back: all of it is linear in the sums."""
        cost_e6, unit_revenue = money
        if cost_e6 is None:
            self.unpriced += sign * count
        else:
            self.cost_e6 += sign * cost_e6
        self.revenue += sign * unit_revenue * count
        if cost_e6 is not None and unit_revenue > 0:
            # The actions of one group share their revenue: their margins add up to n - cost / revenue.
            self.margin_sum += sign * (count - cost_e6 / (unit_revenue * _ONE_MILLION))
            self.margin_count += sign * count

    def figures(self, percentiles: Sequence[float]) -> _Figures:
        return _Figures(
            count=self.count,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            credits=self.credits,
            cache_read_tokens=self.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens,
            avg_latency_ms=float(self.latency_sum / self.count) if self.count else None,
            succeeded=self.succeeded,
            percentiles=percentiles,
            cost=self.cost_e6 / _ONE_MILLION,
            unpriced=self.unpriced,
            revenue=self.revenue,
            margin_sum=self.margin_sum,
            margin_count=self.margin_count,
            errors=self.count - self.succeeded,
        )


def _money(
    prices: _Prices, model: str, credits: int, period: int, sums: Sequence[Any]
) -> tuple[Decimal | None, Decimal]:
    """The cost (USD x 1e6; None: unpriced) and the unit revenue of a group of `model`, credit charge
    and price `period` with these `sums` (tokens in, out, cache read, cache write at 1-4), as
    `_PERIODS` prices them in SQL."""
    rate = prices.rate(model, period)
    cost_e6 = None
    if rate is not None:
        tokens_in, tokens_out, cache_read, cache_write = sums[1:5]
        cost_e6 = (
            (tokens_in - cache_read - cache_write) * rate.input
            + cache_read * rate.cache_read
            + cache_write * rate.cache_write
            + tokens_out * rate.output
        )
    return cost_e6, credits * prices.per_credit(period)


def _tally(rows: Sequence[Sequence[Any]], prices: _Prices) -> tuple[_Figures, dict[str, _Figures]]:
    """The selection's figures and each model's from `_summed_statement`'s rows: each row priced by its
    period (a correction's less its base period's), its histogram merged into its model's and the
    selection's (in NumPy)."""
    total = _Tally()
    tallies: dict[str, _Tally] = {}
    index: dict[str, int] = {}
    groups: list[int] = []
    histograms: list[tuple[Sequence[int], Sequence[int]]] = []
    with localcontext(_MONEY):
        for base, model, credits, period, *sums, (bins, counts) in rows:
            money = _money(prices, model, credits, period, sums)
            index.setdefault(model, len(index))
            for one in (tallies.setdefault(model, _Tally()), total):
                if base < 0:
                    one.add(sums, credits)
                    one.price(sums[0], money)
                else:  # a correction: its sums at their own price, less their bucket row's
                    one.price(sums[0], money)
                    one.price(sums[0], _money(prices, model, credits, base, sums), -1)
            if base < 0:
                groups.append(index[model])
                histograms.append((bins, counts))
    lengths = [len(bins) for bins, _ in histograms]
    bins_all = np.fromiter(chain.from_iterable(bins for bins, _ in histograms), np.int64, sum(lengths))
    counts_all = np.fromiter(chain.from_iterable(counts for _, counts in histograms), np.int64, sum(lengths))
    per_model = np.repeat(np.asarray(groups, np.int64), lengths)
    merged = merged_percentiles(
        len(tallies) + 1,
        [
            Counted(per_model, bins_all, counts_all),
            Counted(np.full(bins_all.size, len(tallies), np.int64), bins_all.copy(), counts_all),
        ],
    ).values
    p50, p95, p99 = (merged[name].tolist() for name in FRACTIONS)
    figures = {
        model: tally.figures([p50[i], p95[i], p99[i]]) for i, (model, tally) in enumerate(tallies.items())
    }
    last = len(tallies)
    return total.figures([p50[last], p95[last], p99[last]]), figures


_SORT_KEYS: Final = {
    "count": "f_count",
    "tokens_in": "f_tokens_in",
    "tokens_out": "f_tokens_out",
    "total_tokens": "f_tokens_in + f_tokens_out",
    "total_credits": "f_credits",
    "cache_read_tokens": "f_cache_read",
    "cache_write_tokens": "f_cache_write",
    "reasoning_tokens": "f_reasoning",
    "avg_latency_ms": "f_latency_sum / greatest(f_count, 1)",
    "p50_latency_ms": "if(f_succeeded > 0, f_latencies[1], NULL)",
    "p95_latency_ms": "if(f_succeeded > 0, f_latencies[2], NULL)",
    "p99_latency_ms": "if(f_succeeded > 0, f_latencies[3], NULL)",
    "total_cost_usd": "f_cost_e6",
    "total_revenue_usd": "f_revenue",
    "total_profit_usd": "f_revenue * 1000000 - f_cost_e6",
    "avg_margin": "if(f_margin_count > 0, f_margin_sum / f_margin_count, NULL)",
    "gross_margin": (
        "if(f_revenue > 0, toFloat64(f_revenue * 1000000 - f_cost_e6) / toFloat64(f_revenue * 1000000), NULL)"
    ),
    "unpriced_count": "f_unpriced",
    "error_count": "f_errors",
}
"""Each numeric key of a breakdown row (`breakdown.SORT_KEYS`) as SQL over the figures."""


@dataclass(frozen=True, slots=True)
class _Figures:
    """The figures of a selection, a model or a group, as `_FIGURES` reads them."""

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
    margin_sum: Decimal
    margin_count: int
    errors: int

    @classmethod
    def of(cls, row: Sequence[Any]) -> _Figures:
        (count, tokens_in, tokens_out, credits, read, write, reasoning, latency_sum, succeeded,
         percentiles, cost_e6, unpriced, revenue, margin_sum, margin_count, errors) = row  # fmt: skip
        return cls(
            count=int(count),
            tokens_in=int(tokens_in),
            tokens_out=int(tokens_out),
            credits=int(credits),
            cache_read_tokens=int(read),
            cache_write_tokens=int(write),
            reasoning_tokens=int(reasoning),
            avg_latency_ms=float(Decimal(latency_sum) / count) if count else None,
            succeeded=int(succeeded),
            percentiles=percentiles,
            cost=Decimal(cost_e6) / _ONE_MILLION,
            unpriced=int(unpriced),
            revenue=Decimal(revenue),
            margin_sum=Decimal(margin_sum or 0),
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

    def aggregate(self, by_model: Mapping[str, ModelAggregate], *, exact: bool) -> Aggregate:
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
            avg_margin=float(self.margin_sum / self.margin_count) if self.margin_count else None,
            gross_margin=float((self.revenue - self.cost) / self.revenue) if self.revenue else None,
            unpriced_count=self.unpriced,
            error_count=self.errors,
            percentiles_exact=exact,
            by_model=by_model,
        )


_EMPTY: Final = _Figures(0, 0, 0, 0, 0, 0, 0, None, 0, (), Decimal(0), 0, Decimal(0), Decimal(0), 0, 0)


# --- breakdowns -----------------------------------------------------------------------------------------


def _bucket_index(starts: Sequence[datetime], column: str) -> str:
    """SQL giving the index of the bucket that holds `column`, from the buckets' UTC starts and the
    last one's end: runs of buckets of one length (the days between two changes of the clocks) by
    arithmetic on the microseconds, the run by a multiIf over the runs' starts. Every number is
    computed here from the starts, none comes from a user."""
    runs: list[tuple[int, int, int]] = []  # first bucket index, start, length (microseconds)
    for index, (start, end) in enumerate(pairwise(starts)):
        length = _micros(end) - _micros(start)
        if not runs or runs[-1][2] != length:
            runs.append((index, _micros(start), length))
    moment = f"toUnixTimestamp64Micro({column})"

    def within(run: tuple[int, int, int]) -> str:
        first, start, length = run
        return f"intDiv({moment} - {start}, {length}) + {first}"

    if len(runs) == 1:
        return within(runs[0])
    branches = [f"{moment} < {runs[i + 1][1]}, {within(run)}" for i, run in enumerate(runs[:-1])]
    return f"multiIf({', '.join(branches)}, {within(runs[-1])})"


@dataclass(frozen=True, slots=True)
class _BreakdownQuery:
    statement: str
    parameters: dict[str, Any]
    starts: list[datetime] | None
    """The buckets' UTC starts, then the last one's end (None when not bucketed)."""
    exact: bool


def _chooses_top(request: BreakdownRequest, sources: _Sources) -> bool:
    """Whether the top groups are chosen first (`_breakdown_query`'s `choosing`): cut to the top
    groups, sorted by a sum, grouped by something besides the model and the bucket."""
    return (
        not sources.exact
        and request.top is not None
        and request.sort not in PERCENTILES
        and any(d != "model" for d in request.by)
    )


def _breakdown_query(
    metric_filter: MetricFilter,
    request: BreakdownRequest,
    starts: list[datetime] | None,
    sources: _Sources,
    bounds: Sequence[int],
    *,
    choosing: bool = False,
    chosen: Sequence[Any] | None = None,
) -> _BreakdownQuery:
    """The breakdown's statement. `choosing`: the statement choosing its top groups instead, their
    values of the dimensions besides the model (`_chooses_top`); `chosen`: those values, the
    statement then reading only those groups' sums and histograms."""
    dimensions = [d for d in request.by if d != "model"]
    priced, parameters = _priced(
        metric_filter,
        sources,
        dimensions,
        starts,
        bounds,
        binned_by_model="model" in request.by,
        chosen=chosen,
    )
    grouped = [*request.by, *(["bucket"] if starts is not None else [])]
    group_by = f"\nGROUP BY {', '.join(grouped)}" if grouped else ""
    order = "DESC" if request.descending else "ASC"
    leading = "".join(f"{g}, " for g in grouped)
    ordering = f"ORDER BY {_SORT_KEYS[request.sort]} {order} NULLS LAST" + "".join(
        f", {g} ASC" for g in grouped
    )
    if sources.exact:
        figures = _FIGURES.format(latencies=f"{_EXACT_MERGE}(g_latencies) AS f_latencies,\n")
        source = f"(\nSELECT {leading}{figures}\nFROM priced{group_by}\n)"
    else:
        summed = f"SELECT {leading}{_FIGURES.format(latencies='')}\nFROM priced{group_by}"
        if choosing:
            source = f"(\n{summed}\n)"
        else:
            histograms = _percentiles_of_histograms(leading, group_by)
            join = f"USING ({', '.join(grouped)})" if grouped else ""
            source = (
                f"(\n{summed}\n) AS f\n{'LEFT' if grouped else 'CROSS'} JOIN (\n{histograms}\n) AS q {join}"
            )
    columns = ", ".join(dimensions) if choosing else f"{leading}{_OUTER}"
    statement = priced + f"\nSELECT {columns} FROM {source}\nWHERE f_count > 0\n{ordering}"
    if request.top is not None:
        statement += "\nLIMIT {top:UInt64}"
        parameters["top"] = request.top
    return _BreakdownQuery(statement, parameters, starts, sources.exact)


def _breakdown_row(
    row: Sequence[Any], request: BreakdownRequest, starts: list[datetime] | None, exact: bool
) -> BreakdownRow:
    keys = dict(zip(request.by, row, strict=False))
    offset = len(request.by)
    bucket = None
    if starts is not None:
        bucket = starts[int(row[offset])].astimezone(request.zone)
        offset += 1
    figures = _Figures.of(row[offset : offset + _FIGURE_COUNT])
    return BreakdownRow(keys, bucket, figures.aggregate({}, exact=exact))


def _open_stream(client: Client, query: _BreakdownQuery) -> Any:
    """The query's blocks of rows, one per `next()`, until closed with `__exit__`."""
    stream: Any = client.query_row_block_stream(
        query.statement, parameters=query.parameters, settings=_FIGURE_SETTINGS
    )
    return stream.__enter__()


# --- rows in and out ---------------------------------------------------------------------------------------


def _columns(metrics: Sequence[ActionMetric]) -> list[list[Any]]:
    """The batch in `_COLUMNS`' order, column by column as clickhouse-connect inserts it, the
    timestamps as microseconds since 1970 (which it writes as they are, where it would convert each
    datetime); a metric ClickHouse cannot store refuses the whole batch."""
    for metric in metrics:
        if not isinstance(metric, ActionMetric):
            raise TypeError(f"expected an ActionMetric, got {type(metric).__name__}")
    columns = [list(map(attrgetter(name), metrics)) for name in _FIELDS]
    timestamps = columns[1]
    if min(timestamps) < EARLIEST or max(timestamps) >= LATEST:
        metric = next(m for m in metrics if not EARLIEST <= m.timestamp < LATEST)
        reason = f"timestamp: ClickHouse stores 1900-01-01 to 2299-12-31 UTC, got {metric.timestamp}"
        raise DataRejected(f"metric {metric.id} refused: {reason}", reason)
    columns[1] = [(moment - _EPOCH) // _MICROSECOND for moment in timestamps]
    return columns


def _deduplicated(columns: list[list[Any]], numbers: list[int]) -> dict[str, Any]:
    """The settings of a batch's insert (`columns`, their ids as `numbers`): a deduplication token
    naming its actions by their keys as the raw table replaces on (id, town, action type, UTC hour),
    in the order of their ids, so that the same actions in another order name the same insert.
    ClickHouse keeps the tokens of each table's last inserts (schema version 9), so the same actions
    inserted again at once by another process are dropped by the raw table and by every table its
    views feed (`_insert_counting`). ~8 ms for 20,000 actions (a tuple per action sorted: ~15)."""
    order = sorted(range(len(numbers)), key=numbers.__getitem__)
    ids, micros, actions, towns = columns[0], columns[1], columns[2], columns[4]
    token = hashlib.sha256(b"".join([ids[i].bytes for i in order]))
    for texts in (towns, actions):
        token.update("\x1f".join([texts[i] for i in order]).encode() + b"\x1e")
    token.update(repr([micros[i] // _HOUR_MICROS for i in order]).encode())
    return {
        "insert_deduplication_token": token.hexdigest(),
        "deduplicate_blocks_in_dependent_materialized_views": 1,
    }


def _hours(micros: Sequence[int]) -> list[int]:
    """The UTC hours (as microseconds since 1970) that the moments fall in: every hour from the
    earliest to the latest when they span a day or less (no work per row), else each one found."""
    first, last = min(micros) // _HOUR_MICROS, max(micros) // _HOUR_MICROS
    if last - first <= 24:
        return [hour * _HOUR_MICROS for hour in range(first, last + 1)]
    return sorted({moment // _HOUR_MICROS * _HOUR_MICROS for moment in micros})


def _metric(row: Sequence[Any]) -> ActionMetric:
    fields = dict(zip(_COLUMNS, row, strict=True))
    fields["timestamp"] = _moment(fields["timestamp"])
    fields["metadata"] = json.loads(fields["metadata"])
    fields["latency_ms"] = float(fields["latency_ms"])
    if not isinstance(fields["id"], uuid.UUID):
        fields["id"] = uuid.UUID(str(fields["id"]))
    return ActionMetric.stored(**fields)


def _after(position: CopyPosition | None) -> tuple[str, dict[str, Any]]:
    """The WHERE clause of the actions after `position` in copy order, and its parameters."""
    if position is None:
        return "", {}
    return (
        " WHERE (timestamp, toString(id))"
        " > (fromUnixTimestamp64Micro({after:Int64}, 'UTC'), {after_id:String})",
        {"after": _micros(position.timestamp), "after_id": str(position.id)},
    )


def _price_start(effective_from: datetime) -> datetime:
    """No action is stamped before EARLIEST, so a price from earlier is in force from EARLIEST."""
    return max(effective_from, EARLIEST)


def _shown_start(effective_from: datetime) -> datetime:
    """EARLIEST read back: the beginning of time, as the other backends keep it."""
    return BEGINNING_OF_TIME if effective_from <= EARLIEST else effective_from


_MODEL_PRICE_COLUMNS: Final = (
    "model",
    "effective_from",
    "input_per_1m",
    "output_per_1m",
    "cache_read_per_1m",
    "cache_write_per_1m",
    "source",
    "tiered_above_tokens",
)


def _model_price_row(price: ModelPrice) -> list[Any]:
    return [
        price.model,
        _price_start(price.effective_from),
        price.input_per_1m,
        price.output_per_1m,
        price.cache_read_per_1m,
        price.cache_write_per_1m,
        price.source,
        price.tiered_above_tokens,
    ]


def _amount(value: Decimal | None) -> Decimal | None:
    """A Decimal(20, 9) without the trailing zeros of its scale: 0.15, not 0.150000000."""
    if value is None:
        return None
    return value.quantize(Decimal(1)) if value == value.to_integral() else value.normalize()


_DETAIL_KEYS: Final = ("town_id", "action_type", "model")
"""The filters the hourly detail rollup keeps (sql/clickhouse/0004_rollups.sql)."""
_ROLLUP_KEYS: Final = (*_DETAIL_KEYS, "user_id")
"""The filters some rollup keeps: a question is read from one that keeps all of its own."""
_USER_KEPT: Final = frozenset({"user_id"})
"""What the user rollups keep besides the model and the credit charge (sql/clickhouse/0008_users.sql)."""

_PARTITION: Final = re.compile(r"^(\d{4})(\d{2})$")

_PART_START: Final = (
    "arrayMax(arrayFilter(b -> b <= t, "
    "arrayPushFront({changes:Array(Int64)}, t - positiveModulo(t, 3600000000))))"
)
"""Where the part of its UTC hour that holds the instant `t` starts (microseconds): the latest of
the hour's start and the price `changes` at or before `t` (those of earlier hours are before it)."""
_TIMELINE_PARTS: Final = """
SELECT {part} AS part, count()
FROM (SELECT toUnixTimestamp64Micro(timestamp) AS t FROM action_metrics_timeline WHERE {hours})
GROUP BY part"""
_SPLIT_PARTS: Final = """
INSERT INTO {rollup} (start, {keys}model, credits, count, tokens_in, tokens_out, cache_read_tokens,
    cache_write_tokens, reasoning_tokens, latency_ms_sum, succeeded, latency_bins)
SELECT
    fromUnixTimestamp64Micro({part}, 'UTC') AS start, {keys}model, credits_charged AS credits,
    count(),
    sum(toUInt128(s.tokens_in)),
    sum(toUInt128(s.tokens_out)),
    sum(toUInt128(s.cache_read_tokens)),
    sum(toUInt128(s.cache_write_tokens)),
    sum(toUInt128(s.reasoning_tokens)),
    sum(toDecimal256(s.latency_ms, 30)),
    countIf(s.succeeded),
    sumMap([{bin}], [toUInt64(s.succeeded)])
FROM (SELECT *, toUnixTimestamp64Micro(timestamp) AS t FROM action_metrics_timeline WHERE {hours}) AS s
GROUP BY start, {keys}model, credits"""
"""A rollup's rows of some hours summed again from the timeline as sql/clickhouse/0004_rollups.sql
sums them, but each part of an hour between price changes in a row of its own, from the part's start."""


def _hour_of(start: int) -> Range:
    """The UTC hour starting at `start` (microseconds)."""
    return _moment(start), _moment(start + _HOUR_MICROS)


def _parts_per_hour(rows: Sequence[Sequence[Any]]) -> dict[int, dict[int, int]]:
    """(part start, count) rows by their UTC hour (microseconds)."""
    hours: dict[int, dict[int, int]] = {}
    for start, count in rows:
        hours.setdefault(start - start % _HOUR_MICROS, {})[int(start)] = int(count)
    return hours


# --- the repository -------------------------------------------------------------------------------------


def translate(error: BaseException, where: str) -> DatabaseError | None:
    """Our exception for a failure of ClickHouse at `where`; None for anything else (a bug)."""
    if isinstance(error, ActionMetricsError):
        return None
    from clickhouse_connect.driver import exceptions

    reason = f"{type(error).__name__}: {next(iter(str(error).strip().splitlines()), '')}"
    if isinstance(error, exceptions.OperationalError | exceptions.InterfaceError | OSError):
        return DatabaseUnavailable(f"cannot use {where}: {reason}", reason)
    if isinstance(error, exceptions.DataError):
        return DataRejected(f"{where} rejected the data: {reason}", reason)
    if isinstance(error, exceptions.Error):
        return StatementRefused(
            f"{where} refused the statement: {reason}; is its schema at head (action-metrics db upgrade) "
            "and may this user use it?",
            reason,
        )
    return None


_WRITER_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_WRITER_LOCKS_GUARD = threading.Lock()


def _writer_lock(url: ClickHouseURL) -> threading.Lock:
    """The lock every store of this process holds from its lookup of stored ids to its insert, one
    per database (`ClickHouseURL.location`): ClickHouse enforces no unique key, so two inserts of
    one new id that both looked it up first would both store it. chdb runs in one process, so there
    this makes first id wins exact; writers in several processes on one server are not covered."""
    with _WRITER_LOCKS_GUARD:
        return _WRITER_LOCKS.setdefault(url.location, threading.Lock())


def _delete_prices_where(client: Client, condition: str, parameters: dict[str, Any]) -> None:
    """Delete the model prices meeting `condition`, if there are any: a DELETE is a mutation of
    the table's parts however few rows it removes (0.3-1.5 s in process), a count is a read."""
    found = client.query(f"SELECT count() FROM model_prices WHERE {condition}", parameters=parameters)
    if found.result_rows[0][0]:
        client.command(f"DELETE FROM model_prices WHERE {condition}", parameters=parameters)


class ClickHouseRepository:
    """Reads and writes action metrics and prices on one ClickHouse database (see the module)."""

    def __init__(self, url: ClickHouseURL) -> None:
        self.url = url
        self._where = url.shown()
        self._client: Client | None = None
        self._closed = False
        self._claims = RememberedClaims()

    def _database_errors(self) -> AbstractContextManager[None]:
        """Re-raise a database failure inside the block as the `DatabaseError` `translate` makes."""
        return translated(translate, self._where)

    async def _run(self, function: Callable[..., T], *arguments: Any) -> T:
        """`function(*arguments)` in a worker thread, its ClickHouse errors made ours."""
        with self._database_errors():
            return await asyncio.to_thread(function, *arguments)

    def _open(self) -> Client:
        if self._client is None:
            raise StoreClosed(f"{self._where} is closed: open a new store to use the database again")
        return self._client

    # -- schema and connection --

    async def ensure_schema(self) -> None:
        """Create and upgrade a chdb directory on first use, as a new SQLite file is; a server's
        schema must be at head already (`action-metrics db upgrade`)."""
        await self._run(self._connect)

    def _connect(self) -> None:
        client = self.url.connect(with_database=False)  # one client: each costs a handshake
        try:
            version = version_on(client, self.url)
            if version is None and self.url.in_process:
                version = upgrade_on(client, self.url)
            check_version(version, self.url)
        except BaseException:
            client.close()
            raise
        self._client = client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await self._run(client.close)

    # -- writes --

    async def insert(self, metrics: Sequence[ActionMetric]) -> None:
        """Store a batch in one insert, first id wins (see `_insert_counting`)."""
        await self._run(self._insert_counting, list(metrics))

    async def insert_counting(
        self, metrics: Sequence[ActionMetric], credits: InheritedCredits | None = None
    ) -> int:
        """`insert`, and how many of the batch's ids were not stored before it. `credits`: what the
        batch's calls may inherit, claimed in this process's memory (`RememberedClaims`: ClickHouse
        enforces no unique key that would decide the first claim across processes)."""
        if credits is not None:
            metrics = credits.settled(metrics, self._claims.claim(credits.claims(metrics)))
        return await self._run(self._insert_counting, list(metrics))

    def _insert_counting(self, metrics: Sequence[ActionMetric]) -> int:
        """Insert the batch's actions whose key (id, town, action type, UTC hour: what the raw
        table replaces on) is not stored yet, the first of each id in the batch: the rollups' views
        see every insert, so a re-sent action must not reach the table. The stored keys are read just
        before the insert (`_stored_ids`), the two one step for every store of this process on this
        database (`_writer_lock`). Writers in two processes sending the same new actions at once both
        find them not stored: the insert's deduplication token (`_deduplicated`) makes the second
        insert of the same actions a no-op in every table (schema version 9); two batches sharing
        only some new actions, sent at once, still both insert those, and the rollups then count
        them twice (the raw rows, read with FINAL, once). An id re-sent with another town, action
        type or hour is a second action, as the raw table always kept it.

        A batch stores nothing when the schema is not at this package's head any more (another
        release upgraded or downgraded it since this store opened: `SchemaTooNew`, `SchemaOutOfDate`),
        read in the same query as the stored keys; ClickHouse has no transaction to hold it to the
        insert, so an upgrade within that one query's run is not seen.

        A batch holding a metric from before the prune cut-off stores nothing
        (`MetricInPrunedPeriod`): prune removed the ids there, so a re-sent action would count twice.
        The cut-off comes back with the stored keys, in the same query, so it is never stale by more
        than that query: `prune` (in any process) records it before it removes a row or an id, and a
        lookup that misses an id it removed has therefore read the cut-off that refuses it, unless
        the prune recorded it within that one query's run."""
        if not metrics:
            return 0
        columns = _columns(metrics)  # refused before anything is read
        client = self._open()
        numbers = [id_.int for id_ in columns[0]]
        with _writer_lock(self.url):  # no other insert of this process between the lookup and ours
            stored, cutoff, version = self._stored_ids(client, columns, numbers)
            check_version(version, self.url)
            refuse_before(cutoff, metrics)
            if stored or len(set(numbers)) < len(numbers):
                kept = []
                for index, number in enumerate(numbers):
                    if number not in stored:
                        stored.add(number)
                        kept.append(index)
                columns = [[column[index] for index in kept] for column in columns]
                numbers = [numbers[index] for index in kept]
            if columns[0]:
                client.insert(
                    "action_metrics",
                    columns,
                    column_names=list(_COLUMNS),
                    column_oriented=True,
                    settings=_deduplicated(columns, numbers),
                )
        return len(columns[0])

    def _stored_ids(
        self, client: Client, columns: list[list[Any]], numbers: list[int]
    ) -> tuple[set[int], datetime | None, int | None]:
        """The batch's ids (as numbers) stored already with the town, action type and UTC hour of
        the batch's action, the prune cut-off (None: never pruned) and the schema's version. Ids
        minted close together (UUIDv7, the default) are looked up as one range of the ids table's order
        (sql/clickhouse/0005), which reads a granule or two per part however full the hours are; ids
        spread wider (random UUIDv4) are sent one by one, and the lookup then reads the ids of
        everything stored in the batch's hours."""
        ids, micros = columns[0], columns[1]
        low, high = min(numbers), max(numbers)
        parameters: dict[str, Any] = {"hours": _hours(micros)}
        if (high >> _UUID7_TIME_SHIFT) - (low >> _UUID7_TIME_SHIFT) <= _RANGE_LOOKUP_SPREAD_MS:
            wanted = "toUInt128(id) BETWEEN {low:UInt128} AND {high:UInt128}"
            parameters.update(low=low, high=high)
        else:
            wanted = "id IN {ids:Array(UUID)}"
            parameters["ids"] = ids
        ((rows, cutoff_micros, version),) = client.query(
            "SELECT groupArray((id, town_id, action_type, toUnixTimestamp(hour))), "
            "(SELECT toUnixTimestamp64Micro(maxOrNull(kept_from)) FROM raw_kept_from), "
            f"({VERSION_QUERY}) "
            "FROM action_metrics_ids "
            "WHERE hour IN arrayMap(x -> toStartOfHour(fromUnixTimestamp64Micro(x, 'UTC')), "
            f"{{hours:Array(Int64)}}) AND {wanted}",
            parameters=parameters,
        ).result_rows
        cutoff = None if cutoff_micros is None else _moment(cutoff_micros)
        keys = {(uuid.UUID(str(id_)).int, town, action, hour) for id_, town, action, hour in rows}
        found = {key[0] for key in keys}
        candidates = [index for index, number in enumerate(numbers) if number in found] if found else []
        version = applied_version(version)
        if not candidates:
            return set(), cutoff, version
        # Each candidate's hour as the raw table's sorting key has it (toStartOfHour stops at 1970).
        (their_hours,) = client.query(
            "SELECT arrayMap(x -> toUnixTimestamp(toStartOfHour(fromUnixTimestamp64Micro(x, 'UTC'))), "
            "{micros:Array(Int64)})",
            parameters={"micros": [micros[index] for index in candidates]},
        ).result_rows[0]
        stored = {
            numbers[index]
            for index, hour in zip(candidates, their_hours, strict=True)
            if (numbers[index], columns[4][index], columns[2][index], hour) in keys
        }
        return stored, cutoff, version

    def _check_still_at_head(self, client: Client) -> None:
        """Refuse a write when another release moved the schema since this store opened (as every
        insert does, `_insert_counting`): prices and prunes, one query each."""
        check_version(applied_version(client.query(VERSION_QUERY).result_rows[0][0]), self.url)

    # -- reads --

    def _raw_kept_from(self, client: Client) -> datetime | None:
        """The cut-off of the last `prune` (None: never pruned)."""
        count, micros = client.query(
            "SELECT count(), toUnixTimestamp64Micro(max(kept_from)) FROM raw_kept_from"
        ).result_rows[0]
        return _moment(micros) if count else None

    def _user_rollups_from(self, client: Client) -> datetime | None:
        """Where the user rollups begin: the prune cut-off in force when they were filled (None: all)."""
        count, micros = client.query(
            f"SELECT count(), toUnixTimestamp64Micro(max(kept_from)) FROM {USER_ROLLUPS_FROM}"
        ).result_rows[0]
        return _moment(micros) if count else None

    def _check_not_pruned(self, client: Client, metric_filter: MetricFilter, question: str) -> None:
        """Raise unless the selection holds no pruned period, or is the newest `limit` and all kept."""
        cutoff = self._raw_kept_from(client)
        if cutoff is None or (metric_filter.since is not None and metric_filter.since >= cutoff):
            return
        if metric_filter.limit is None:
            raise RawRowsPruned(cutoff, question, whole=_PRUNED_ANSWERED_FOR)
        statement, parameters = _selection(metric_filter, "timestamp")
        count, oldest = client.query(
            f"SELECT count(), toUnixTimestamp64Micro(min(timestamp)) FROM ({statement})",
            parameters=parameters,
            settings=_READ_SETTINGS,
        ).result_rows[0]
        if count < metric_filter.limit or _moment(oldest) < cutoff:
            raise RawRowsPruned(cutoff, question, whole=_PRUNED_ANSWERED_FOR)

    def _prices(self, client: Client) -> _Prices:
        """Every model and credit price, and the instants they start (`_Prices`)."""
        return _prices_of(client.query(_PRICES_QUERY).result_rows)

    def _sources(
        self,
        client: Client,
        metric_filter: MetricFilter,
        *,
        exact: bool,
        by: Sequence[str],
        bounds: Sequence[int],
        starts: Sequence[datetime] | None,
        question: str,
    ) -> _Sources:
        """Where the figures come from: the rollups and the raw rows around them, unless the question
        needs exact percentiles or something no rollup keeps (a citizen, a user with a town or an
        action type, the newest `limit`). A user's questions read the user rollups' whole days and
        months, and the timeline for the rest (they have no hourly level, and keep nothing from
        before `USER_ROLLUPS_FROM`). Whole days and months holding a price change are read whole too,
        with their `Correction`s."""
        needed = {
            *(d for d in by if d != "model"),
            *(
                name
                for name in ("user_id", "citizen_id", "town_id", "action_type")
                if getattr(metric_filter, name)
            ),
        }
        users = bool(needed) and needed <= _USER_KEPT
        rollup = None if users else next((t for t, keeps in ROLLUPS.items() if needed <= set(keeps)), None)
        if exact or (rollup is None and not users) or metric_filter.limit is not None:
            self._check_not_pruned(client, metric_filter, question)
            # The newest `limit` are ordered by id, which only the raw rows keep.
            return _EXACT if exact or metric_filter.limit is not None else _TIMELINE_EXACT
        since = None if metric_filter.since is None else min(max(metric_filter.since, EARLIEST), LATEST)
        until = None if metric_filter.until is None else max(min(metric_filter.until, LATEST), EARLIEST)
        changes = [_moment(micros) for micros in bounds]
        corrections: tuple[Correction, ...] = ()
        if since is not None and until is not None and since >= until:
            cut = Plan()
        else:
            cut, corrections = corrected_plan(since, until, changes, starts or ())
        cutoff = self._raw_kept_from(client)
        if users:
            users_from = self._user_rollups_from(client)
            if users_from is not None and (since is None or since < users_from):
                raise RawRowsPruned(users_from, question, whole="UTC days")
            cut = _hours_as_raw(cut)
            corrections = tuple(replace(c, plan=_hours_as_raw(c.plan)) for c in corrections)
            pieces = (cut, *(c.plan for c in corrections))
            if cutoff is not None and any(_cut_at(piece.raw, cutoff)[0] for piece in pieces):
                raise RawRowsPruned(cutoff, question, whole="UTC days")
            hourly, (daily, monthly) = "", USER_ROLLUPS
        else:
            assert rollup is not None  # a question no rollup keeps was answered exactly above
            if cutoff is not None:
                # The pruned parts of hours that a price change cuts are read from the hourly rollup,
                # which prune split there.
                cut = _pruned_raw_from_hours(cut, cutoff, bounds, question)
                corrections = tuple(
                    replace(c, plan=_pruned_raw_from_hours(c.plan, cutoff, bounds, question))
                    for c in corrections
                )
            hourly, daily, monthly = rollup, DAILY_ROLLUPS[rollup], MONTHLY_ROLLUPS[rollup]
        return _Sources(
            exact=False,
            table=TIMELINE,
            rollup=hourly,
            daily_rollup=daily,
            monthly_rollup=monthly,
            raw=cut.raw,
            hours=cut.hours,
            days=cut.days,
            months=cut.months,
            corrections=corrections,
        )

    async def select(self, metric_filter: MetricFilter) -> list[ActionMetric]:
        return await self._run(self._select, metric_filter)

    def _select(self, metric_filter: MetricFilter) -> list[ActionMetric]:
        client = self._open()
        columns = ", ".join("toUnixTimestamp64Micro(timestamp)" if c == "timestamp" else c for c in _COLUMNS)
        statement, parameters = _selection(metric_filter, columns)
        if metric_filter.limit is None:
            statement += " ORDER BY timestamp DESC, toString(id) DESC"
        rows = client.query(statement, parameters=parameters, settings=_READ_SETTINGS).result_rows
        metrics = [_metric(row) for row in rows]
        self._check_not_pruned(client, metric_filter, "query()")
        return metrics

    async def aggregate(self, metric_filter: MetricFilter, *, exact: bool = False) -> Aggregate:
        """From the rollups (percentiles from their histograms) unless `exact` or the filter needs
        raw rows."""
        return await self._run(self._aggregate, metric_filter, exact)

    def _aggregate(self, metric_filter: MetricFilter, exact: bool) -> Aggregate:
        client = self._open()
        question = "aggregate()" if metric_filter.limit is None else "aggregate(limit=...)"
        prices = self._prices(client)
        sources = self._sources(
            client,
            metric_filter,
            exact=exact,
            by=(),
            bounds=prices.bounds,
            starts=None,
            question=question,
        )
        if sources.exact:
            statement, parameters = _exact_statement(metric_filter, sources, prices.bounds)
            rows = client.query(statement, parameters=parameters, settings=_FIGURE_SETTINGS).result_rows
            total, by_model = _EMPTY, {}
            for model, *figures in rows:
                if model is None:
                    total = _Figures.of(figures)
                else:
                    by_model[model] = _Figures.of(figures)
        else:
            statement, parameters = _summed_statement(metric_filter, sources, prices.bounds)
            rows = client.query(statement, parameters=parameters, settings=_READ_SETTINGS).result_rows
            total, by_model = _tally(rows, prices)
        # Busiest first, then by name, as the other backends list them.
        ordered = dict(
            sorted(((m, f.for_model()) for m, f in by_model.items()), key=lambda i: (-i[1].count, i[0]))
        )
        return total.aggregate(ordered, exact=sources.exact)

    def _breakdown_query(
        self, metric_filter: MetricFilter, request: BreakdownRequest
    ) -> _BreakdownQuery | None:
        """The statement of a breakdown (None when it has no rows: an empty window)."""
        client = self._open()
        bounds = self._prices(client).bounds
        starts = None
        if request.bucket is not None:
            # The buckets span only what is stored (the rollups keep what `prune` removed): a window
            # reaching centuries out asks for no more. A town's, action type's or model's span only
            # its own hours, so that another town's metric stamped far ahead does not stretch them.
            equal = {name: getattr(metric_filter, name) for name in _DETAIL_KEYS}
            equal = {name: value for name, value in equal.items() if value is not None}
            rollup, terms = "action_metrics_rollup_hourly", ""
            if equal and metric_filter.user_id is None and metric_filter.citizen_id is None:
                rollup = "action_metrics_rollup_hourly_detail"
                terms = " WHERE " + " AND ".join(f"{name} = {{{name}:String}}" for name in equal)
            count, first, last = client.query(
                "SELECT count(), toUnixTimestamp64Micro(min(start)), toUnixTimestamp64Micro(max(start)) "
                f"FROM {rollup}{terms}",
                parameters=equal,
            ).result_rows[0]
            if not count:
                return None
            first_stored, after_last = _moment(first), _moment(last) + _HOUR
            since = first_stored if metric_filter.since is None else max(metric_filter.since, first_stored)
            until = after_last if metric_filter.until is None else min(metric_filter.until, after_last)
            if since >= until:
                return None
            local = bucket_starts(request.bucket, request.zone, since, until)
            starts = [start.astimezone(UTC) for start in local]
            # Nothing is stored outside the buckets: a window open at either end would add sources
            # that read nothing, each costing ClickHouse ~10-20 ms to plan.
            metric_filter = replace(metric_filter, since=since, until=until)
        sources = self._sources(
            client,
            metric_filter,
            exact=request.exact,
            by=request.by,
            bounds=bounds,
            starts=starts,
            question="breakdown()",
        )
        chosen = None
        if _chooses_top(request, sources):
            # The top groups by their sums first: then only theirs are summed again with their
            # histograms (top 10 users by loss over 90 days at 10M: README).
            first = _breakdown_query(metric_filter, request, starts, sources, bounds, choosing=True)
            rows = client.query(first.statement, parameters=first.parameters, settings=_FIGURE_SETTINGS)
            chosen = [row[0] if len(row) == 1 else tuple(row) for row in rows.result_rows]
        return _breakdown_query(metric_filter, request, starts, sources, bounds, chosen=chosen)

    async def breakdown(self, metric_filter: MetricFilter, request: BreakdownRequest) -> list[BreakdownRow]:
        return await self._run(self._breakdown, metric_filter, request)

    def _breakdown(self, metric_filter: MetricFilter, request: BreakdownRequest) -> list[BreakdownRow]:
        query = self._breakdown_query(metric_filter, request)
        if query is None:
            return []
        result = self._open().query(query.statement, parameters=query.parameters, settings=_FIGURE_SETTINGS)
        return [_breakdown_row(row, request, query.starts, query.exact) for row in result.result_rows]

    async def stream_breakdown(
        self, metric_filter: MetricFilter, request: BreakdownRequest
    ) -> AsyncIterator[BreakdownRow]:
        """`breakdown()`'s rows block by block as ClickHouse sends them, on a client of its own."""
        query = await self._run(self._breakdown_query, metric_filter, request)
        if query is None:
            return
        client = await self._run(self.url.connect)
        try:
            stream = await self._run(_open_stream, client, query)
            try:
                while (block := await self._run(next, stream, None)) is not None:
                    for row in block:
                        yield _breakdown_row(row, request, query.starts, query.exact)
            finally:
                await self._run(stream.__exit__, None, None, None)
        finally:
            await self._run(client.close)

    async def audit_charges(self, metric_filter: MetricFilter, credits: int) -> ChargeAudit:
        return await self._run(self._audit_charges, metric_filter, credits)

    def _audit_charges(self, metric_filter: MetricFilter, credits: int) -> ChargeAudit:
        selection, parameters = _selection(
            metric_filter, "credits_charged, error IS NOT NULL AND credits_charged = 0 AS failed"
        )
        count, failed, under, over = (
            self._open()
            .query(
                "SELECT count(), countIf(failed), countIf(NOT failed AND credits_charged < {credits:Int64}), "
                f"countIf(NOT failed AND credits_charged > {{credits:Int64}}) FROM ({selection})",
                parameters={**parameters, "credits": credits},
                settings=_READ_SETTINGS,
            )
            .result_rows[0]
        )
        return ChargeAudit(count=int(count), failed=int(failed), under=int(under), over=int(over))

    # -- prices --

    async def set_model_price(self, price: ModelPrice) -> None:
        """Insert, or replace the price of the same model from the same instant (the latest set
        wins). A manual price also removes the catalogue's prices of the model from its start on."""
        await self._run(self._set_model_price, price)

    def _set_model_price(self, price: ModelPrice) -> None:
        client = self._open()
        self._check_still_at_head(client)
        self._refuse_a_new_start_inside_a_pruned_day(client, price.effective_from, price.model)
        if price.source == "manual":
            _delete_prices_where(
                client,
                "model = {model:String} AND source = 'catalogue' "
                "AND effective_from >= fromUnixTimestamp64Micro({start:Int64}, 'UTC')",
                {"model": price.model, "start": _micros(_price_start(price.effective_from))},
            )
        client.insert("model_prices", [_model_price_row(price)], column_names=list(_MODEL_PRICE_COLUMNS))

    async def set_credit_price(self, price: CreditPrice) -> None:
        await self._run(self._set_credit_price, price)

    def _set_credit_price(self, price: CreditPrice) -> None:
        client = self._open()
        self._check_still_at_head(client)
        self._refuse_a_new_start_inside_a_pruned_day(client, price.effective_from, None)
        row = [_price_start(price.effective_from), price.usd_per_credit]
        client.insert("credit_prices", [row], column_names=["effective_from", "usd_per_credit"])

    def _refuse_a_new_start_inside_a_pruned_day(
        self, client: Client, start: datetime, model: str | None
    ) -> None:
        """Raise `InvalidPrice` for a price of `model` (None: of a credit) from inside a pruned UTC
        day, not its midnight, unless one starts at that very instant already: prune split the
        rollups at the price changes it found (`_split_hours`), and the raw rows that would split
        them at a new one are gone. SQLite and PostgreSQL refuse it alike."""
        cutoff = self._refusing_cutoff(client, start, model)
        if cutoff is not None:
            raise InvalidPrice.inside_pruned_day(start, cutoff)

    def _refusing_cutoff(self, client: Client, start: datetime, model: str | None) -> datetime | None:
        cutoff = self._raw_kept_from(client)
        if cutoff is None or start >= cutoff or start == floor_to(start, "day"):
            return None
        same_start = "effective_from = fromUnixTimestamp64Micro({start:Int64}, 'UTC')"
        statement = (
            f"SELECT count() FROM credit_prices FINAL WHERE {same_start}"
            if model is None
            else f"SELECT count() FROM model_prices FINAL WHERE model = {{model:String}} AND {same_start}"
        )
        parameters = {"model": model, "start": _micros(_price_start(start))}
        return None if client.query(statement, parameters=parameters).result_rows[0][0] else cutoff

    async def price_start_refused(self, start: datetime, model: str | None) -> datetime | None:
        """The prune cut-off for which `set_model_price` (`model`) or `set_credit_price` (None)
        would refuse a price from `start` now (`InvalidPrice.inside_pruned_day`), else None."""
        return await self._run(self._refusing_cutoff, self._open(), start, model)

    async def model_prices(self) -> list[ModelPrice]:
        """Every model price stored, by model and start."""
        return await self._run(self._model_prices)

    def _model_prices(self) -> list[ModelPrice]:
        columns = ", ".join(
            "toUnixTimestamp64Micro(effective_from)" if c == "effective_from" else c
            for c in _MODEL_PRICE_COLUMNS
        )
        rows = (
            self._open()
            .query(f"SELECT {columns} FROM model_prices FINAL ORDER BY model, effective_from")
            .result_rows
        )
        return [
            ModelPrice(
                model=model,
                effective_from=_shown_start(_moment(start)),
                input_per_1m=_amount(input_price) or Decimal(0),
                output_per_1m=_amount(output_price) or Decimal(0),
                cache_read_per_1m=_amount(cache_read),
                cache_write_per_1m=_amount(cache_write),
                source=source,
                tiered_above_tokens=None if tier is None else int(tier),
            )
            for model, start, input_price, output_price, cache_read, cache_write, source, tier in rows
        ]

    async def seen_models(self) -> list[str]:
        """Every model an action was recorded for (the rollups keep those of pruned periods)."""
        return await self._run(self._seen_models)

    def _seen_models(self) -> list[str]:
        rows = (
            self._open()
            .query("SELECT DISTINCT model FROM action_metrics_rollup_hourly ORDER BY model")
            .result_rows
        )
        return [model for (model,) in rows]

    async def replace_catalogue_prices(self, histories: Mapping[str, Sequence[ModelPrice]]) -> CatalogueWrite:
        """Make each model's catalogue prices its `histories` entry, but never at or after the model's
        first manual price: those are held back (and removed if stored). Statement by statement: a
        sync interrupted half-way is finished by running it again."""
        return await self._run(self._replace_catalogue_prices, histories)

    def _replace_catalogue_prices(self, histories: Mapping[str, Sequence[ModelPrice]]) -> CatalogueWrite:
        client = self._open()
        self._check_still_at_head(client)
        models = sorted(histories)
        manual_from = {
            model: _moment(start)
            for model, start in client.query(
                "SELECT model, toUnixTimestamp64Micro(min(effective_from)) FROM model_prices FINAL "
                "WHERE model IN {models:Array(String)} AND source = 'manual' GROUP BY model",
                parameters={"models": models},
            ).result_rows
        }
        written: dict[str, tuple[ModelPrice, ...]] = {}
        held_back: dict[str, datetime] = {}
        rows: list[list[Any]] = []
        for model in models:
            manual = manual_from.get(model)
            kept = tuple(
                p for p in histories[model] if manual is None or _price_start(p.effective_from) < manual
            )
            if manual is not None and len(kept) < len(histories[model]):
                held_back[model] = _shown_start(manual)
            rows.extend(_model_price_row(price) for price in kept)
            written[model] = kept
        _delete_prices_where(  # the catalogue's prices of these models that it no longer has
            client,
            "model IN {models:Array(String)} AND source = 'catalogue' "
            "AND (model, toUnixTimestamp64Micro(effective_from)) NOT IN {kept:Array(Tuple(String, Int64))}",
            {
                "models": models,
                "kept": [(m, _micros(_price_start(p.effective_from))) for m in models for p in written[m]],
            },
        )
        if rows:
            client.insert("model_prices", rows, column_names=list(_MODEL_PRICE_COLUMNS))
        return CatalogueWrite(written=written, held_back=held_back)

    # -- what `db copy` reads and writes --

    async def read_after(self, position: CopyPosition | None, limit: int) -> list[ActionMetric]:
        """The next `limit` raw actions after `position`, by timestamp then id (as text)."""
        return await self._run(self._read_after, position, limit)

    def _read_after(self, position: CopyPosition | None, limit: int) -> list[ActionMetric]:
        columns = ", ".join("toUnixTimestamp64Micro(timestamp)" if c == "timestamp" else c for c in _COLUMNS)
        where, parameters = _after(position)
        rows = (
            self._open()
            .query(
                f"SELECT {columns} FROM action_metrics FINAL{where} "
                "ORDER BY timestamp, toString(id) LIMIT {limit:UInt64}",
                parameters={**parameters, "limit": limit},
                settings=_READ_SETTINGS,
            )
            .result_rows
        )
        return [_metric(row) for row in rows]

    async def credit_claims_after(self, after: tuple[str, str] | None, limit: int) -> list[CreditClaim]:
        """None: ClickHouse keeps credit claims in the server process's memory (`RememberedClaims`),
        not in the database, so a copy from it brings none."""
        return []

    async def copy_credit_claims(self, claims: Sequence[CreditClaim]) -> int:
        """Nothing: a claim copied into this process's memory would be lost when the copy ends; the
        server that takes spans keeps its own (see `RememberedClaims`)."""
        return 0

    async def count_after(self, position: CopyPosition | None) -> int:
        return await self._run(self._count_after, position)

    def _count_after(self, position: CopyPosition | None) -> int:
        where, parameters = _after(position)
        statement = f"SELECT count() FROM action_metrics FINAL{where}"
        return int(
            self._open().query(statement, parameters=parameters, settings=_READ_SETTINGS).result_rows[0][0]
        )

    async def credit_prices(self) -> list[CreditPrice]:
        """Every credit price stored, oldest first."""
        return await self._run(self._credit_prices)

    def _credit_prices(self) -> list[CreditPrice]:
        rows = (
            self._open()
            .query(
                "SELECT toUnixTimestamp64Micro(effective_from), usd_per_credit FROM credit_prices FINAL "
                "ORDER BY effective_from"
            )
            .result_rows
        )
        return [
            CreditPrice(
                usd_per_credit=_amount(price) or Decimal(0), effective_from=_shown_start(_moment(start))
            )
            for start, price in rows
        ]

    async def raw_kept_from(self) -> datetime | None:
        """The cut-off of the last `prune` (None: never pruned)."""
        return await self._run(lambda: self._raw_kept_from(self._open()))

    async def record_raw_kept_from(self, cutoff: datetime) -> None:
        """Mark the actions before `cutoff` as gone: every read that reaches before it raises."""
        await self._run(self._record_raw_kept_from, cutoff)

    def _record_raw_kept_from(self, cutoff: datetime) -> None:
        client = self._open()
        kept_from = self._raw_kept_from(client)
        if kept_from is None or kept_from < cutoff:
            client.insert("raw_kept_from", [[max(cutoff, EARLIEST)]], column_names=["kept_from"])

    async def copy_checkpoint(self, source: str) -> CopyCheckpoint | None:
        """Where the last `db copy` from `source` into this database got to (None: never run)."""
        return await self._run(self._copy_checkpoint, source)

    def _copy_checkpoint(self, source: str) -> CopyCheckpoint | None:
        rows = (
            self._open()
            .query(
                "SELECT toUnixTimestamp64Micro(last_timestamp), last_id, copied FROM copy_checkpoints FINAL "
                "WHERE source = {source:String}",
                parameters={"source": source},
            )
            .result_rows
        )
        if not rows:
            return None
        micros, last_id, copied = rows[0]
        return CopyCheckpoint(source, CopyPosition(_moment(micros), uuid.UUID(last_id)), int(copied))

    async def save_copy_checkpoint(self, checkpoint: CopyCheckpoint) -> None:
        """Record how far a copy got (written after the batch's insert: a crash between the two
        re-sends the batch, which counts once)."""
        await self._run(self._save_copy_checkpoint, checkpoint)

    def _save_copy_checkpoint(self, checkpoint: CopyCheckpoint) -> None:
        row = [
            checkpoint.source,
            checkpoint.position.timestamp,
            str(checkpoint.position.id),
            checkpoint.copied,
        ]
        self._open().insert(
            "copy_checkpoints", [row], column_names=["source", "last_timestamp", "last_id", "copied"]
        )

    # -- pruning --

    async def prune(
        self,
        before: datetime,
        *,
        dry_run: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> PruneResult:
        """Delete raw rows older than the UTC midnight at or before `before`; the rollups keep them,
        their hours split at the price changes inside them (`_split_hours`). The cut-off is recorded
        before any row goes, and from then on every read that needs raw rows before it raises
        `RawRowsPruned` and every insert of a metric before it `MetricInPrunedPeriod`, so a cut-off
        after today's midnight is refused. Whole months go as partitions, the rest by a lightweight
        DELETE. `progress` gets 0 once the cut-off is accepted, then the rows removed."""
        cutoff = floor_to(before, "day")
        today = floor_to(datetime.now(UTC), "day")
        if cutoff > today:  # a dry run refuses it too
            raise InvalidFilter(
                "before",
                f"cannot prune up to {cutoff.isoformat()}: it is after today's UTC midnight "
                f"({today.isoformat()}), and every metric from before the cut-off is refused from then "
                "on; choose an earlier cut-off",
            )
        if progress is not None and not dry_run:
            progress(0)
        result = await self._run(self._prune, cutoff, bool(dry_run))
        if progress is not None and not dry_run:
            progress(result.rows)
        return result

    def _prune(self, cutoff: datetime, dry_run: bool) -> PruneResult:
        client = self._open()
        parameters = {"cutoff": _micros(max(cutoff, EARLIEST))}
        older = "timestamp < fromUnixTimestamp64Micro({cutoff:Int64}, 'UTC')"
        rows = int(
            client.query(
                f"SELECT count() FROM action_metrics FINAL WHERE {older}",
                parameters=parameters,
                settings=_READ_SETTINGS,
            ).result_rows[0][0]
        )
        if dry_run:
            return PruneResult(cutoff, rows, dry_run=True)
        self._check_still_at_head(client)
        self._split_hours(client, cutoff)  # before any reader takes the parts for the raw rows
        kept_from = self._raw_kept_from(client)
        if kept_from is None or kept_from < cutoff:
            client.insert("raw_kept_from", [[max(cutoff, EARLIEST)]], column_names=["kept_from"])
        self._split_hours(client, cutoff)  # again for a metric written meanwhile (refused from now on)
        # The ids that first id wins looks up go with their rows (a cut-off is a UTC midnight, so
        # an hour is either all before it or all after).
        tables = (("action_metrics", "timestamp"), ("action_metrics_ids", "hour"), (TIMELINE, "timestamp"))
        for table, column in tables:
            partitions = client.query(
                "SELECT DISTINCT partition_id FROM system.parts "
                "WHERE database = currentDatabase() AND table = {table:String} AND active",
                parameters={"table": table},
            ).result_rows
            for (partition,) in partitions:
                month = _PARTITION.match(partition)
                if month is None:
                    continue
                year, number = int(month[1]), int(month[2])
                month_end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=UTC)
                if month_end <= cutoff:
                    # partition_id is ClickHouse's own (six digits, checked above), never a user's.
                    client.command(f"ALTER TABLE {table} DROP PARTITION ID '{partition}'")
            client.command(
                f"DELETE FROM {table} WHERE {column} < fromUnixTimestamp64Micro({{cutoff:Int64}}, 'UTC')",
                parameters=parameters,
            )
        return PruneResult(cutoff, rows, dry_run=False)

    def _split_hours(self, client: Client, cutoff: datetime) -> None:
        """Split the hourly rollups' rows of each UTC hour before `cutoff` that a price change falls
        inside at those changes, from the timeline, so that each part is still priced from its own
        start once the raw rows are gone (SQLite and PostgreSQL split their rollups when a price is
        set). An hour is rewritten only while the timeline holds all of it and its parts differ
        there: run again (a prune interrupted, or the next one), this changes nothing else."""
        changes = [c for c in self._prices(client).bounds if c < _micros(cutoff) and c % _HOUR_MICROS]
        if not changes:
            return
        hours = [_hour_of(start) for start in sorted({c - c % _HOUR_MICROS for c in changes})]
        parameters = {"changes": changes}
        statement = _TIMELINE_PARTS.format(part=_PART_START, hours=_ranges_sql("timestamp", hours))
        timeline = _parts_per_hour(client.query(statement, parameters=parameters).result_rows)
        for rollup, dimensions in ROLLUPS.items():
            rolled_up = _parts_per_hour(
                client.query(
                    f"SELECT toUnixTimestamp64Micro(start) AS part, sum(count) FROM {rollup} "
                    f"WHERE {_ranges_sql('start', hours)} GROUP BY part"
                ).result_rows
            )
            stale = [
                _hour_of(hour)
                for hour, parts in timeline.items()
                if parts != rolled_up.get(hour, {})
                and sum(parts.values()) >= sum(rolled_up.get(hour, {}).values())
            ]
            if not stale:
                continue
            client.command(f"DELETE FROM {rollup} WHERE {_ranges_sql('start', stale)}")
            keys = "".join(f"{dimension}, " for dimension in dimensions)
            client.command(
                _SPLIT_PARTS.format(
                    rollup=rollup,
                    keys=keys,
                    part=_PART_START,
                    bin=_LATENCY_BIN,
                    hours=_ranges_sql("timestamp", stale),
                ),
                parameters=parameters,
                # The rows just deleted, written again: not a duplicate of an earlier insert (with
                # schema version 9's window, an insert without a token is compared by its content).
                settings={"insert_deduplicate": 0},
            )
