"""`breakdown()`: the dashboard numbers of a selection per user, town, citizen, action type or model
and per hour, day, week or month in the reader's time zone, in one statement.

Bucket bounds are computed in Python with `zoneinfo` (a Berlin day may last 23 or 25 hours; Kathmandu's
days begin at 18:15 UTC), then each bucket is covered the way `aggregate()` covers a window: whole
closed rollup days and hours where they fall inside it, raw rows for the rest (the partial hours at the
edges of a half- or quarter-hour zone's day). The covers of every bucket are read by `aggregate`'s one
statement, grouped by a bucket index that a binary search over the bounds gives each row.

Percentiles: with `exact=False` raw rows are binned into the rollups' latency histograms by a GROUP BY
(no sort of every row, within 1%), and merged with the rollups' bins; `exact=True` reads raw rows only
and interpolates exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from typing import Any, Final, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Double,
    Integer,
    Select,
    and_,
    case,
    cast,
    func,
    literal,
    null,
    select,
    true,
)
from sqlalchemy.sql.selectable import NamedFromClause, Subquery

from action_metrics.aggregate import (
    PER_MODEL_SUMS,
    PERCENTILES,
    Aggregate,
    Grouping,
    Restriction,
    aggregate_from_rows,
    exact_percentiles,
    figure_columns,
    latency_values,
    raw_rows,
    reads_once,
    summed_parts,
    sums_per_model,
    weighted_percentiles,
)
from action_metrics.dialects import Backend, sum_of_counts
from action_metrics.errors import InvalidFilter
from action_metrics.query import MetricFilter
from action_metrics.rollup import Level, Range, ReadPlan
from action_metrics.schema import UTCDateTime
from action_metrics.validation import MAX_INT64, as_integer, check_flag, shown

Bucket = Literal["hour", "day", "week", "month"]
BUCKETS: Final[tuple[str, ...]] = get_args(Bucket)
DIMENSIONS: Final = ("user_id", "town_id", "citizen_id", "action_type", "model")
"""What a breakdown groups by (any of them, in the order given)."""
TZ_VARIABLE: Final = "ACTION_METRICS_TZ"
MAX_BUCKETS: Final = 20_000
"""About two years of hours: more makes a statement too long to be worth sending."""

_NOT_SORTABLE: Final = {"percentiles_exact"}
SORT_KEYS: Final = (
    *(key for key in Aggregate.__dataclass_fields__ if key not in ("by_model", *_NOT_SORTABLE)),
    "total_tokens",
)
"""The numeric keys of a row, any of which a breakdown sorts by."""


# --- the reader's time zone and the buckets ----------------------------------------------------------


def reader_zone(tz: str | None = None) -> ZoneInfo:
    """The IANA zone `tz`, else `$ACTION_METRICS_TZ`, else UTC."""
    name = tz if tz is not None else (os.environ.get(TZ_VARIABLE) or "UTC")
    argument = "tz" if tz is not None else TZ_VARIABLE
    if not isinstance(name, str):
        raise InvalidFilter(argument, f"expected an IANA time zone name, got {shown(name)}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidFilter(
            argument, f"unknown time zone {name!r}: expected an IANA name such as 'Europe/Berlin'"
        ) from None


def bucket_floor(moment: datetime, bucket: Bucket, zone: ZoneInfo) -> datetime:
    """The start (in `zone`) of the `bucket` holding `moment`: weeks begin on Monday."""
    local = moment.astimezone(zone)
    if bucket == "hour":
        return local.replace(minute=0, second=0, microsecond=0)
    day = local.date()
    if bucket == "week":
        day -= timedelta(days=day.weekday())
    elif bucket == "month":
        day = day.replace(day=1)
    return _midnight(day, zone)


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(), tzinfo=zone)


def next_bucket(start: datetime, bucket: Bucket, zone: ZoneInfo) -> datetime:
    """The start of the bucket after the one starting at `start` (a local time in `zone`)."""
    if bucket == "hour":
        following = bucket_floor(start.astimezone(UTC) + timedelta(hours=1), "hour", zone)
        # A zone whose offset changes by half an hour can floor back onto the same instant.
        later = following.astimezone(UTC) > start.astimezone(UTC)
        return following if later else (start.astimezone(UTC) + timedelta(hours=1)).astimezone(zone)
    day = start.date()
    if bucket == "day":
        return _midnight(day + timedelta(days=1), zone)
    if bucket == "week":
        return _midnight(day + timedelta(days=7), zone)
    return _midnight((day.replace(day=28) + timedelta(days=4)).replace(day=1), zone)


def bucket_starts(bucket: Bucket, zone: ZoneInfo, since: datetime, until: datetime) -> list[datetime]:
    """The starts (in `zone`) of the buckets meeting [since, until), then the end of the last one."""
    try:
        starts = [bucket_floor(since, bucket, zone)]
    except OverflowError:  # in a zone west of UTC, the year 1's first moments are in the year 0
        raise InvalidFilter(
            "bucket",
            f"the {bucket} holding {since.isoformat()} in {zone.key} starts before the first moment a date "
            f"can hold (0001-01-01): give a since a {bucket} later",
        ) from None
    while starts[-1] < until:
        if len(starts) > MAX_BUCKETS:
            raise InvalidFilter(
                "bucket",
                f"more than {MAX_BUCKETS} {bucket}s between {since} and {until}: narrow since/until (a "
                "window without until ends at the newest action stored for the selection, which may be "
                "one stamped far in the future: give until)",
            )
        try:
            starts.append(next_bucket(starts[-1], bucket, zone))
        except OverflowError:  # the year 10000, which no datetime holds
            raise InvalidFilter(
                "bucket",
                f"the {bucket} starting {starts[-1].isoformat()} ends after the last moment a date can hold "
                f"(9999-12-31): give an until at or before {starts[-1].astimezone(UTC).isoformat()}",
            ) from None
    return starts


def bucket_index(
    starts: Sequence[datetime], backend: Backend
) -> Callable[[ColumnElement[Any]], ColumnElement[int]]:
    """How a statement finds the bucket of a moment, given the buckets' starts and the last one's end
    (UTC): buckets of one length in a row (a run: the days between two changes of the clocks, every
    hour of most zones) by arithmetic on the moment's epoch seconds, the run by a binary search over
    the runs' starts written as nested CASEs. Every bound is written into the statement, which has
    few of them whatever the number of buckets."""
    runs: list[tuple[int, datetime, int]] = []  # first bucket index, start, length in seconds
    for index, (start, end) in enumerate(pairwise(starts)):
        length = int((end - start).total_seconds())
        if not runs or runs[-1][2] != length:
            runs.append((index, start, length))

    def inline(value: Any, type_: Any) -> ColumnElement[Any]:
        return literal(value, type_, literal_execute=True)

    def within(run: tuple[int, datetime, int], seconds: ColumnElement[int]) -> ColumnElement[int]:
        first, start, length = run
        shift = first * length - int(start.timestamp())  # starts are whole minutes
        return (seconds + inline(shift, BigInteger)) // inline(length, BigInteger)

    def of(moment: ColumnElement[Any]) -> ColumnElement[int]:
        if len(starts) == 2:  # one bucket: the rows read lie in it (by user over a window)
            # Not a bare 0: in a GROUP BY both databases read an integer literal as a column's
            # position ("GROUP BY position 0 is not in select list").
            return cast(inline(0, BigInteger), BigInteger)
        seconds = backend.epoch_seconds(moment)

        def search(low: int, high: int) -> ColumnElement[int]:
            if high - low == 1:
                return within(runs[low], seconds)
            middle = (low + high) // 2
            bound = inline(runs[middle][1], UTCDateTime())
            return case((moment < bound, search(low, middle)), else_=search(middle, high))

        return search(0, len(runs))

    return of


def bucket_index_of_seconds(starts: Sequence[datetime]) -> Callable[[ColumnElement[int]], ColumnElement[int]]:
    """`bucket_index` for a moment given as whole epoch seconds (an expression of them: a row's
    start moved to the middle of its hour or day, `sketch_reads`)."""
    runs: list[tuple[int, int, int]] = []  # first bucket index, start (epoch seconds), length
    for index, (start, end) in enumerate(pairwise(starts)):
        length = int((end - start).total_seconds())
        if not runs or runs[-1][2] != length:
            runs.append((index, int(start.timestamp()), length))

    def inline(value: int) -> ColumnElement[int]:
        return literal(value, BigInteger, literal_execute=True)

    def of(seconds: ColumnElement[int]) -> ColumnElement[int]:
        def search(low: int, high: int) -> ColumnElement[int]:
            if high - low == 1:
                first, start, length = runs[low]
                return (seconds + inline(first * length - start)) // inline(length)
            middle = (low + high) // 2
            return case((seconds < inline(runs[middle][1]), search(low, middle)), else_=search(middle, high))

        return search(0, len(runs))

    return of


# --- the request and its rows --------------------------------------------------------------------------


@dataclass(frozen=True)
class BreakdownRequest:
    """What `breakdown()` was asked, checked: each bad argument is an `InvalidFilter` naming it."""

    by: tuple[str, ...]
    bucket: Bucket | None
    zone: ZoneInfo
    sort: str
    descending: bool
    top: int | None
    exact: bool

    @classmethod
    def of(
        cls,
        by: Sequence[str] | str,
        *,
        bucket: str | None,
        tz: str | None,
        sort: str,
        descending: bool,
        top: int | None,
        exact: bool,
    ) -> BreakdownRequest:
        dimensions = (by,) if isinstance(by, str) else tuple(by)
        for dimension in dimensions:
            if dimension not in DIMENSIONS:
                expected = ", ".join(DIMENSIONS)
                raise InvalidFilter("by", f"unknown dimension {shown(dimension)}: expected any of {expected}")
        if len(set(dimensions)) != len(dimensions):
            raise InvalidFilter("by", f"a dimension is named twice in {dimensions}")
        if bucket is not None and bucket not in BUCKETS:
            raise InvalidFilter("bucket", f"unknown bucket {shown(bucket)}: expected one of {BUCKETS}")
        if sort not in SORT_KEYS:
            raise InvalidFilter("sort", f"cannot sort by {shown(sort)}: expected one of {SORT_KEYS}")
        count = None if top is None else as_integer(top)
        if top is not None and (count is None or not 1 <= count <= MAX_INT64):
            raise InvalidFilter("top", f"expected a whole number from 1 to 2**63 - 1, got {shown(top)}")
        valid_bucket: Bucket | None = bucket  # type: ignore[assignment]  # checked against BUCKETS above
        descending = check_flag("descending", descending, InvalidFilter)
        exact = check_flag("exact", exact, InvalidFilter)
        return cls(dimensions, valid_bucket, reader_zone(tz), sort, descending, count, exact)

    @property
    def grouped(self) -> tuple[str, ...]:
        """The dimensions grouped besides the model, which every statement groups by anyway."""
        return tuple(dimension for dimension in self.by if dimension != "model")


@dataclass(frozen=True, slots=True)
class BreakdownRow:
    """One group of a breakdown: its dimensions' values, its bucket's local start, and its figures."""

    keys: Mapping[str, str]
    """The value of each dimension grouped by, in the order asked."""
    bucket_start: datetime | None
    """The bucket's start in the reader's zone (None when not bucketed)."""
    figures: Aggregate = field(repr=False)
    """The group's numbers (`by_model` is empty)."""

    def to_dict(self) -> dict[str, Any]:
        figures = self.figures.to_dict()
        del figures["by_model"]
        bucket = {} if self.bucket_start is None else {"bucket_start": self.bucket_start.isoformat()}
        return {**self.keys, **bucket, **figures}


# --- the statement -----------------------------------------------------------------------------------


def combined_plan(plans: Sequence[ReadPlan]) -> ReadPlan:
    """The buckets' plans as one: each level's ranges and the raw ranges, adjacent ones joined."""
    by_level: dict[Level, list[tuple[datetime | None, datetime]]] = {}
    raw: list[Range] = []
    for plan in plans:
        for level, since, until in plan.rollup_ranges:
            by_level.setdefault(level, []).append((since, until))
        raw.extend(plan.raw_ranges)
    rollup_ranges = tuple(
        (level, since, until) for level, ranges in by_level.items() for since, until in _joined(ranges)
    )
    return ReadPlan(rollup_ranges=rollup_ranges, raw_ranges=tuple(_joined(raw)))


def _joined(ranges: list[Any]) -> list[Any]:
    """Ranges in order (none overlap), each run of adjacent ones made one."""
    joined: list[Any] = []
    for since, until in ranges:
        if joined and joined[-1][1] is not None and joined[-1][1] == since:
            joined[-1] = (joined[-1][0], until)
        else:
            joined.append((since, until))
    return joined


def ranks_by_sums(request: BreakdownRequest) -> bool:
    """Whether the top groups can be chosen before any percentile is computed: `top` is asked and the
    sort key is not a percentile. The groups' percentiles are then computed for those groups alone
    (`percentiles_statement`), which spares merging the latencies of every group that is cut."""
    return request.top is not None and request.sort not in PERCENTILES


def breakdown_statement(
    metric_filter: MetricFilter,
    request: BreakdownRequest,
    plan: ReadPlan,
    starts: Sequence[datetime] | None,
    backend: Backend,
    price_starts: Sequence[datetime],
    *,
    percentiles: bool = True,
) -> Select[Any]:
    """Every group's figures, sorted and cut to `top`. `starts` are the buckets' UTC starts, then the
    last one's end. Without `percentiles` the rows carry NULL percentiles (see `ranks_by_sums`)."""
    grouping = _grouping(request, starts, backend)
    raw = raw_rows(metric_filter, plan, grouping)
    one_pass = reads_once(metric_filter, backend) and not grouping.keys
    parts = summed_parts(metric_filter, plan, raw, price_starts, grouping, one_pass=one_pass)
    per_model = sums_per_model(parts, grouping.keys)
    if not percentiles:
        return group_rows(per_model, request)
    keys = group_keys(request)
    summed = _summed_groups(per_model, keys)
    per_group = backend.computed_once(
        select(_percentiles(metric_filter, request, plan, raw, grouping, backend)), "group_percentiles"
    )
    same_group = and_(true(), *(_joinable(per_group.c[key]) == _joinable(summed.c[key]) for key in keys))
    return _sorted_rows(summed.outerjoin(per_group, same_group), summed, per_group, request)


def _summed_groups(per_model: NamedFromClause, keys: Sequence[str]) -> Subquery:
    grouped = [per_model.c[key] for key in keys]
    sums = select(*grouped, *(sum_of_counts(per_model.c[name]).label(name) for name in PER_MODEL_SUMS))
    return (sums.group_by(*grouped) if keys else sums).subquery("sums")


def group_rows(per_model: NamedFromClause, request: BreakdownRequest, *, approximate: int = 0) -> Select[Any]:
    """Every group's figures from its per-model sums, sorted and cut to `top`, with NULL percentiles
    (filled in afterwards: `ranks_by_sums`, `sketch_reads`); `approximate` says how they will be."""
    summed = _summed_groups(per_model, group_keys(request))
    per_group = select(
        *(cast(null(), Double).label(name) for name in PERCENTILES),
        literal(approximate, Integer).label("approximate"),
    ).subquery("no_percentiles")
    return _sorted_rows(summed.join(per_group, true()), summed, per_group, request)


def _sorted_rows(
    joined: Any, summed: Subquery, per_group: NamedFromClause, request: BreakdownRequest
) -> Select[Any]:
    keys = group_keys(request)
    rows = (
        select(*(summed.c[key] for key in keys), *figure_columns(summed, per_group))
        .select_from(joined)
        .where(summed.c["count"] > 0)
        .subquery("rows")
    )
    statement: Select[Any] = select(rows).order_by(_sort_key(rows, request), *(rows.c[key] for key in keys))
    return statement if request.top is None else statement.limit(request.top)


def percentiles_statement(
    metric_filter: MetricFilter,
    request: BreakdownRequest,
    plan: ReadPlan,
    starts: Sequence[datetime] | None,
    backend: Backend,
    only: Restriction,
) -> Select[Any]:
    """The percentiles of the groups whose dimensions take the values in `only` (a first pass's
    groups: dimension -> the values they hold; other groups those values also select are returned
    too, and ignored): the group's keys, p50/p95/p99 and `approximate`."""
    grouping = _grouping(request, starts, backend)
    raw = raw_rows(metric_filter, plan, grouping, only=only)
    return select(_percentiles(metric_filter, request, plan, raw, grouping, backend, only=only))


def _grouping(request: BreakdownRequest, starts: Sequence[datetime] | None, backend: Backend) -> Grouping:
    return Grouping(request.grouped, None if starts is None else bucket_index(starts, backend))


def group_keys(request: BreakdownRequest) -> tuple[str, ...]:
    """What a row's group is keyed by in the statements: the dimensions but the model, the bucket's
    index, then the model."""
    bucket = ("bucket",) if request.bucket is not None else ()
    return (*request.grouped, *bucket, *(("model",) if "model" in request.by else ()))


def _percentiles(
    metric_filter: MetricFilter,
    request: BreakdownRequest,
    plan: ReadPlan,
    raw: Subquery,
    grouping: Grouping,
    backend: Backend,
    *,
    only: Restriction | None = None,
) -> NamedFromClause:
    keys = group_keys(request)
    if request.exact:
        return exact_percentiles(_succeeded(raw), keys, backend)
    latencies = latency_values(metric_filter, plan, raw, grouping, bin_raw=True, only=only)
    return weighted_percentiles(latencies, keys)


def group_key(row: Mapping[str, Any], request: BreakdownRequest) -> tuple[Any, ...]:
    return tuple(row[key] for key in group_keys(request))


def _joinable(key: ColumnElement[Any]) -> ColumnElement[Any]:
    """A key that equals itself when missing (a metric without a citizen): '' is never an id, and an
    equality of expressions still hash-joins where IS NOT DISTINCT FROM would not."""
    return func.coalesce(key, "") if key.name == "citizen_id" else key


def _succeeded(raw: Subquery) -> Subquery:
    return select(raw).where(raw.c.error.is_(None)).subquery("succeeded")


def _sort_key(rows: Subquery, request: BreakdownRequest) -> ColumnElement[Any]:
    """The sort column; groups without a value (no revenue, no latencies) last either way."""
    if request.sort == "total_tokens":
        column: ColumnElement[Any] = rows.c.tokens_in + rows.c.tokens_out
    else:
        column = rows.c[request.sort]
    return (column.desc() if request.descending else column.asc()).nulls_last()


def row_from(
    result: Mapping[str, Any], request: BreakdownRequest, starts: Sequence[datetime] | None
) -> BreakdownRow:
    figures = aggregate_from_rows([{**result, "model": None}])
    bucket = None if starts is None else starts[result["bucket"]].astimezone(request.zone)
    return BreakdownRow({name: result[name] for name in request.by}, bucket, figures)
