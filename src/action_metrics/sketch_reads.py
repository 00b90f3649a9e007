"""`breakdown()` from the sketch levels: a town's (or every town's) local days, weeks, months or hours,
each model's hours, and a town's action types per local day, with sums from the rollups and
percentiles merged from latency sketches in NumPy, the open buckets' raw rows joined as `breakdown`
joins them.

A bucket is covered by pieces, each a closed UTC day or hour (its rollup rows and sketch) or a raw
time range, with a sign: a local day is either the closed days and hours inside it plus raw rows for
the rest, or, when fewer rows, the UTC day holding its middle less the edge hours that day has too
much plus those it lacks (Berlin: 1 day and 2-4 hours instead of 23-25 hours; Kathmandu: also the
hours at 18:00 less their raw rows before 18:15). Sums subtract exactly (integers; money is priced
per row's prices, which never span a price change); sketches subtract their counts
(`sketch.merged_percentiles`).

Users over any window are covered by `user_reads` and read here the same way. Everything else
(citizens, action types of every town, exact percentiles, a sort by a percentile) is read by
`breakdown` as before.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Select,
    String,
    and_,
    case,
    cast,
    func,
    literal,
    select,
    union,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.selectable import NamedFromClause
from sqlalchemy.types import TypeEngine

from action_metrics.aggregate import (
    PERCENTILES,
    Grouping,
    priced_parts,
    raw_rows,
    summed_parts,
)
from action_metrics.breakdown import (
    BreakdownRequest,
    BreakdownRow,
    bucket_index,
    group_key,
    group_keys,
    group_rows,
    row_from,
)
from action_metrics.dialects import Backend, not_indexed, sum_of_counts
from action_metrics.latency_sketches import (
    MODEL_HOURLY,
    TOWN_ACTION_DAILY,
    TOWN_DAILY,
    TOWN_HOURLY,
    SketchLevel,
)
from action_metrics.pricing import BEGINNING_OF_TIME
from action_metrics.query import MetricFilter
from action_metrics.rollup import (
    DAILY,
    DAILY_BY_TOWN,
    DAILY_DETAIL,
    GRAIN_LENGTH,
    HOURLY,
    HOURLY_BY_TOWN,
    HOURLY_DETAIL,
    SUM_COLUMNS,
    Grain,
    Level,
    Range,
    ReadPlan,
    RollupState,
    any_range,
    ceil_to,
    floor_to,
    latency_bin,
    next_start,
    range_terms,
    rows_in_ranges,
)
from action_metrics.schema import UTCDateTime, action_metrics, latency_sketch, rollup, rollup_detail
from action_metrics.sketch import Counted, blob_counts, merged_percentiles

RAW_HOUR_COST: Final = 20
"""How many rollup rows and sketches an hour of raw rows is worth, when choosing a bucket's cover."""


@dataclass(frozen=True)
class Piece:
    """A part of a bucket's cover: a closed UTC day or hour (`grain`) or raw rows (None) in
    [since, until), added (+1) or subtracted (-1)."""

    sign: int
    grain: Grain | None
    since: datetime
    until: datetime
    bucket: int


@dataclass(frozen=True)
class Shape:
    """What the sketch levels answer: sketches per `key` (town, model or a town's action type) at
    each grain read, and the rollup levels whose sums go with them. The percentiles of a grain with
    sums but no sketches (a town's action types' hours) come from its raw rows."""

    key: str
    sketches: dict[Grain, SketchLevel]
    sums: dict[Grain, Level]
    subtract: bool


def shape_of(metric_filter: MetricFilter, request: BreakdownRequest, state: RollupState) -> Shape | None:
    """The sketch levels that answer this breakdown, if any."""
    if request.exact or request.bucket is None or request.sort in PERCENTILES:
        return None
    unread = (metric_filter.limit, metric_filter.user_id, metric_filter.citizen_id, metric_filter.action_type)
    if any(value is not None for value in unread) or not metric_filter.storable:
        return None
    by = set(request.by)
    if by <= {"town_id"} and metric_filter.model is None and not (request.bucket == "hour" and not by):
        per_town = "town_id" in by or metric_filter.town_id is not None
        if per_town:
            return Shape(
                "town_id",
                {"day": TOWN_DAILY, "hour": TOWN_HOURLY},
                {"day": DAILY_BY_TOWN, "hour": HOURLY_BY_TOWN},
                subtract=True,
            )
        # Every town at once: an hour's actions are in its 5 sketches per model as in its 50 per
        # town (a day has no sketch per model), a third of the blobs to decode (per Kathmandu day
        # at 10M actions: 18k -> 6k).
        return Shape(
            "town_id",
            {"day": TOWN_DAILY, "hour": MODEL_HOURLY},
            {"day": DAILY, "hour": HOURLY},
            subtract=True,
        )
    if by <= {"model"} and request.bucket == "hour" and metric_filter.town_id is None:
        return Shape("model", {"hour": MODEL_HOURLY}, {"hour": HOURLY}, subtract=False)
    if by == {"action_type"} and metric_filter.town_id is not None and metric_filter.model is None:
        # The page's latency chart: a town's closed days from their sketches per action type, the
        # edge hours' percentiles from the town's raw rows.
        return Shape(
            "action_type",
            {"day": TOWN_ACTION_DAILY},
            {"day": DAILY_DETAIL, "hour": HOURLY_DETAIL},
            subtract=True,
        )
    return None


def readable(shape: Shape, state: RollupState, since: datetime, starts: Sequence[datetime]) -> bool:
    """Whether the sketches the covers may read exist: from a day before the window on (the cover of
    a local day may take the UTC day before it), and, for model hours, buckets of whole UTC hours."""
    day = floor_to(since, "day")
    earliest = (
        day - GRAIN_LENGTH["day"] if day - datetime.min.replace(tzinfo=UTC) >= GRAIN_LENGTH["day"] else day
    )
    for level in shape.sketches.values():
        built = getattr(state, level.built_from)
        if built is not None and earliest < built:
            return False
    return shape.key != "model" or all(start == floor_to(start, "hour") for start in starts)


# --- covers --------------------------------------------------------------------------------------


def _steps(since: datetime, until: datetime, grain: Grain) -> list[datetime]:
    length = GRAIN_LENGTH[grain]
    return [since + index * length for index in range((until - since) // length)]


def positive_cover(
    since: datetime, until: datetime, sign: int, bucket: int, state: RollupState, grains: Sequence[Grain]
) -> list[Piece]:
    """Whole closed days, then whole closed hours, then raw rows for the rest."""
    pieces: list[Piece] = []
    spans = [(since, until)]
    days_closed = state.days_closed_until
    if "day" in grains and days_closed is not None:
        first, last = ceil_to(since, "day"), min(floor_to(until, "day"), days_closed)
        if first < last:
            pieces += [
                Piece(sign, "day", day, day + GRAIN_LENGTH["day"], bucket)
                for day in _steps(first, last, "day")
            ]
            spans = [(since, first), (last, until)]
    hours_closed = state.hours_closed_until
    for low, high in spans:
        if low >= high:
            continue
        if hours_closed is not None:
            first, last = ceil_to(low, "hour"), min(floor_to(high, "hour"), hours_closed)
            if first < last:
                hours = _steps(first, last, "hour")
                pieces += [Piece(sign, "hour", hour, hour + GRAIN_LENGTH["hour"], bucket) for hour in hours]
                for a, b in ((low, first), (last, high)):
                    pieces += _raw_part(a, b, sign, bucket, hours_closed)
                continue
        pieces += _raw_part(low, high, sign, bucket, hours_closed)
    return pieces


def _raw_part(
    since: datetime, until: datetime, sign: int, bucket: int, hours_closed: datetime | None
) -> list[Piece]:
    """Raw rows for [since, until); or, when that is more than half of one closed hour (Kathmandu's
    18:15-19:00), the hour less the raw rows of the rest of it: fewer raw rows. The rest lies on the
    other side of the window's bound, so raw rows added always lie in their bucket, and raw rows
    taken back never in the bucket they are taken from."""
    if since >= until:
        return []
    hour = floor_to(since, "hour")
    end = hour + GRAIN_LENGTH["hour"]
    if hours_closed is None or until > end or end > hours_closed or until - since <= GRAIN_LENGTH["hour"] / 2:
        return [Piece(sign, None, since, until, bucket)]
    rest = [(a, b) for a, b in ((hour, since), (until, end)) if a < b]
    return [Piece(sign, "hour", hour, end, bucket), *(Piece(-sign, None, a, b, bucket) for a, b in rest)]


def subtracted_cover(since: datetime, until: datetime, bucket: int, state: RollupState) -> list[Piece] | None:
    """The closed UTC day holding the window's middle hour, less what it has outside the window,
    plus what the window has outside it; None when there is no such day."""
    day_length = GRAIN_LENGTH["day"]
    days_closed = state.days_closed_until
    if days_closed is None:
        return None
    for day in (floor_to(since, "day"), floor_to(since, "day") + day_length):
        middle = day + day_length / 2
        if since <= middle < until and day + day_length <= days_closed:
            break
    else:
        return None
    end = day + day_length
    if since <= day and end <= until:
        return None  # inside the window: the positive cover takes it
    pieces = [Piece(1, "day", day, end, bucket)]
    hourly: list[Grain] = ["hour"]
    if since > day:
        pieces += positive_cover(day, since, -1, bucket, state, hourly)
    if until < end:
        pieces += positive_cover(until, end, -1, bucket, state, hourly)
    if since < day:
        pieces += positive_cover(since, day, 1, bucket, state, hourly)
    if until > end:
        pieces += positive_cover(end, until, 1, bucket, state, hourly)
    return pieces


def _cost(pieces: Sequence[Piece]) -> float:
    hours = timedelta(hours=1)
    return sum(RAW_HOUR_COST * ((p.until - p.since) / hours) if p.grain is None else 1 for p in pieces)


def cover(shape: Shape, windows: Sequence[tuple[datetime, datetime]], state: RollupState) -> list[Piece]:
    """Every bucket's pieces, bucket `index` covering `windows[index]`."""
    grains = list(shape.sums)
    pieces: list[Piece] = []
    for index, (since, until) in enumerate(windows):
        if since >= until:
            continue
        chosen = positive_cover(since, until, 1, index, state, grains)
        if shape.subtract:
            other = subtracted_cover(since, until, index, state)
            if other is not None and _cost(other) < _cost(chosen):
                chosen = other
        pieces += chosen
    return pieces


def raw_ranges(pieces: Sequence[Piece]) -> list[Range]:
    return [(piece.since, piece.until) for piece in pieces if piece.grain is None]


# --- the statements --------------------------------------------------------------------------------


def _bucket_of_piece(moment: ColumnElement[Any], pieces: Sequence[Piece]) -> ColumnElement[int]:
    """The bucket of the piece (of `pieces`, sorted, none overlapping) holding `moment`: a binary
    search over their starts written as nested CASEs."""
    if len(pieces) == 1:  # a CAST, not a bare integer, which a GROUP BY reads as a column position
        return cast(literal(pieces[0].bucket, BigInteger, literal_execute=True), BigInteger)
    middle = len(pieces) // 2
    bound = literal(pieces[middle].since, action_metrics.c.timestamp.type)
    return case(
        (moment < bound, _bucket_of_piece(moment, pieces[:middle])),
        else_=_bucket_of_piece(moment, pieces[middle:]),
    )


def _segments(pieces: Sequence[Piece]) -> list[tuple[datetime, datetime, tuple[tuple[int, int], ...]]]:
    """The time the pieces cover cut where the pieces holding it change: (since, until, the
    (bucket, sign) of each piece holding it), in order, none overlapping."""
    events = sorted(
        [(piece.since, 1, piece.bucket, piece.sign) for piece in pieces]
        + [(piece.until, -1, piece.bucket, piece.sign) for piece in pieces]
    )
    holding: Counter[tuple[int, int]] = Counter()
    segments: list[tuple[datetime, datetime, tuple[tuple[int, int], ...]]] = []
    for index, (moment, change, bucket, sign) in enumerate(events):
        holding[bucket, sign] += change
        if not holding[bucket, sign]:
            del holding[bucket, sign]  # or every piece ever met is looked at again at each moment
        following = events[index + 1][0] if index + 1 < len(events) else moment
        if following == moment:
            continue
        takers = tuple(sorted(holding.elements()))
        if not takers:
            continue
        if segments and segments[-1][1] == moment and segments[-1][2] == takers:
            segments[-1] = (segments[-1][0], following, takers)
        else:
            segments.append((moment, following, takers))
    return segments


SLOT_LENGTHS: Final = (3600, 900, 60)
"""The grids `_slot_grid` tries, coarsest first, in seconds from 1970: every zone's offset today is
a multiple of 15 minutes, so a local hour's or day's edges lie on the 900 s grid."""
MAX_SLOTS: Final = 100_000
GRID_FROM_SEGMENTS: Final = 256
"""Fewer segments are found by the nested CASEs, which compare the stored timestamp alone (the grid
computes epoch seconds per row: SQLite parses the text for it). A 90-day breakdown per Kathmandu day
reads 92, where the CASEs were 4-9% faster at 10M on PostgreSQL (`bench/segment_grid.py`); its
hours over 90 days ~2,200, whose CASEs took longer to build than the read."""


@dataclass(frozen=True)
class SlotGrid:
    """Raw rows found by their slot of a grid (whole `length`-second slots from `origin`, epoch
    seconds), each slot within one segment: arithmetic on the timestamp instead of a binary search
    over every segment's start written as nested CASEs (10,000 segments: Kathmandu's hours over a
    year, 1 s of Python to build)."""

    origin: int
    length: int
    segment: dict[int, int]
    """Slot -> the index of the segment holding it."""

    def slot_of(self, moment: ColumnElement[Any], backend: Backend) -> ColumnElement[int]:
        # Every row read lies in a segment, so at or after `origin`: the division truncates as floor.
        shifted = backend.epoch_seconds(moment) - literal(self.origin, BigInteger, literal_execute=True)
        return shifted // literal(self.length, BigInteger, literal_execute=True)


def _slot_grid(segments: Sequence[tuple[datetime, datetime, Any]]) -> SlotGrid | None:
    """The coarsest grid of `SLOT_LENGTHS` no slot of which meets two segments (None: none, or more
    than `MAX_SLOTS` slots); segments sorted and not overlapping, as `_segments` gives them."""
    microsecond = timedelta(microseconds=1)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    bounds = [
        ((since - epoch) // microsecond, (until - epoch) // microsecond) for since, until, _ in segments
    ]
    for length in SLOT_LENGTHS:
        step = length * 1_000_000
        origin = bounds[0][0] // step * step
        segment: dict[int, int] = {}
        reached = 0
        for index, (since, until) in enumerate(bounds):
            first, last = (since - origin) // step, -((origin - until) // step)
            if first < reached or len(segment) + last - first > MAX_SLOTS:
                break
            segment.update(dict.fromkeys(range(first, last), index))
            reached = last
        else:
            return SlotGrid(origin // 1_000_000, length, segment)
    return None


def _raw_bucket_of(
    sign: int, members: Sequence[Piece], starts: Sequence[datetime], backend: Backend
) -> Callable[[ColumnElement[Any]], ColumnElement[int]]:
    """How raw rows find their bucket: added ones lie in it, subtracted ones in the UTC day it took."""
    if sign > 0:
        return bucket_index(starts, backend)

    def of(moment: ColumnElement[Any]) -> ColumnElement[int]:
        return _bucket_of_piece(moment, members)

    return of


def _groups_of_pieces(pieces: Sequence[Piece]) -> dict[tuple[Grain | None, int], list[Piece]]:
    """The pieces per grain and sign, sorted by start: within one, none overlap."""
    grouped: dict[tuple[Grain | None, int], list[Piece]] = {}
    for piece in pieces:
        grouped.setdefault((piece.grain, piece.sign), []).append(piece)
    return {group: sorted(members, key=lambda piece: piece.since) for group, members in grouped.items()}


def _joined_ranges(pieces: Sequence[Piece]) -> list[Range]:
    return _joined([(piece.since, piece.until) for piece in pieces])


def _joined(spans: Sequence[Range]) -> list[Range]:
    """Sorted time ranges, those that touch made one."""
    ranges: list[Range] = []
    for since, until in spans:
        if ranges and ranges[-1][1] == since:
            ranges[-1] = (ranges[-1][0], until)
        else:
            ranges.append((since, until))
    return ranges


def _signed(parts: NamedFromClause, keys: Sequence[str], sign: int) -> Select[Any]:
    return select(
        parts.c.model,
        parts.c.at,
        *(parts.c[key] for key in keys),
        *((parts.c[name] if sign > 0 else -parts.c[name]).label(name) for name in SUM_COLUMNS),
    )


def sums_statement(
    metric_filter: MetricFilter,
    request: BreakdownRequest,
    shape: Shape,
    pieces: Sequence[Piece],
    starts: Sequence[datetime],
    backend: Backend,
    price_starts: Sequence[datetime],
    towns: Sequence[str] | None,
) -> Select[Any]:
    """Every group's figures but its percentiles (NULL here), sorted and cut as `breakdown` does.
    `towns`: every town a per-town level's rows may hold (see `towns_of`), if it keeps towns."""
    dimensions = request.grouped
    keys = (*dimensions, "bucket")
    selects: list[Select[Any]] = []
    rolled = [piece for piece in pieces if piece.grain is not None]
    if rolled:
        selects.append(_rolled_sums(metric_filter, backend, shape, rolled, dimensions, price_starts, towns))
    for (grain, sign), members in _groups_of_pieces(pieces).items():
        if grain is not None:
            continue
        bucket_of = _raw_bucket_of(sign, members, starts, backend)
        grouping = Grouping(dimensions, bucket_of)
        plan_raw = raw_rows(metric_filter, _raw_plan(members), grouping)
        parts = summed_parts(metric_filter, _raw_plan(members), plan_raw, price_starts, grouping)
        selects.append(_signed(parts, keys, sign))
    parts = union_all(*selects).subquery("signed_parts")
    return group_rows(priced_parts(parts, keys), request, approximate=1)


COVER_COLUMNS: Final[tuple[tuple[str, TypeEngine[Any]], ...]] = (
    ("grain", String()),
    ("start", UTCDateTime()),
    ("bucket", BigInteger()),
    ("sign", Integer()),
    ("at", UTCDateTime()),
)
"""The table `cover_rows` fills."""


def cover_rows(pieces: Sequence[Piece], price_starts: Sequence[datetime]) -> list[tuple[Any, ...]]:
    """(grain, start, bucket, sign, price period) for every rollup row the pieces may hold: each
    piece's start, and the price starts inside it, where rows are split. The period is the latest
    price start at or before the row's (the beginning of time before the first): rows summed per
    period are priced once per sum."""
    rows: list[tuple[Any, ...]] = []
    for piece in pieces:
        inside = bisect_right(price_starts, piece.since)
        period = price_starts[inside - 1] if inside else BEGINNING_OF_TIME
        rows.append((piece.grain, piece.since, piece.bucket, piece.sign, period))
        for moment in price_starts[inside:]:
            if moment >= piece.until:
                break
            rows.append((piece.grain, moment, piece.bucket, piece.sign, moment))
    return rows


def _rolled_sums(
    metric_filter: MetricFilter,
    backend: Backend,
    shape: Shape,
    pieces: Sequence[Piece],
    dimensions: Sequence[str],
    price_starts: Sequence[datetime],
    towns: Sequence[str] | None,
) -> Select[Any]:
    """The rollup rows of every closed day and hour piece, each joined to its bucket and sign by a
    table of the pieces (a row of an hour taken from one bucket and added to the next joins
    twice), summed per model, price period, group and bucket: no expression per row, where a
    search for each row's bucket and period made this part 5-8x slower."""
    cover = backend.rows_table("cover", COVER_COLUMNS, cover_rows(pieces, price_starts))
    c = cover.c
    levels = [shape.sums[grain] for grain in sorted({piece.grain for piece in pieces if piece.grain})]
    # The levels read keep the same dimensions: one table, one grain term, then their dimensions' terms.
    assert len({level.keeps for level in levels}) == 1, levels
    r = levels[0].table
    terms = [r.c.grain.in_([level.grain for level in levels]), *levels[0].dimension_terms(r)]
    for name in ("town_id", "user_id", "model"):
        value = getattr(metric_filter, name)
        if value is not None and name in r.c:
            terms.append(r.c[name] == value)
    if towns is not None and metric_filter.town_id is None:
        # A list to search the key (grain, town, action, start) by: SQLite then takes each town's
        # rows of each piece's start in one step instead of scanning the level.
        terms.append(r.c.town_id.in_(towns))
    grouped = [r.c.model, c.at, *(r.c[name] for name in dimensions), c.bucket]
    # Added pieces alone (a positive cover: by user) are summed without a product per row and sum.
    signed = any(piece.sign < 0 for piece in pieces)
    return (
        select(
            *grouped,
            *(sum_of_counts(c.sign * r.c[name] if signed else r.c[name]).label(name) for name in SUM_COLUMNS),
        )
        .select_from(r.join(cover, and_(r.c.grain == c.grain, r.c.start == c.start)))
        .where(*terms)
        .group_by(*grouped)
    )


async def towns_of(connection: AsyncConnection, pieces: Sequence[Piece], state: RollupState) -> list[str]:
    """Every town with actions in the closed days and hours of `pieces`: those of the days holding
    them (one range of the daily rows per town), and of the hourly rows per town, action and model
    after the last closed day."""
    rolled = [piece for piece in pieces if piece.grain is not None]
    if not rolled:
        return []
    r, d = rollup, rollup_detail
    first = floor_to(min(piece.since for piece in rolled), "day")
    last = max(piece.until for piece in rolled)
    days_closed = state.days_closed_until or first
    daily = select(r.c.town_id).where(
        *DAILY_BY_TOWN.rows(r), *range_terms(r.c.start, first, min(last, days_closed))
    )
    hourly = select(d.c.town_id).where(
        d.c.grain == "hour", *range_terms(d.c.start, max(first, days_closed), last)
    )
    return sorted(set((await connection.execute(union(daily, hourly))).scalars()))


def _raw_plan(pieces: Sequence[Piece]) -> ReadPlan:
    return ReadPlan(raw_ranges=tuple(_joined_ranges(pieces)))


def _raw_bins(
    metric_filter: MetricFilter,
    key: str | None,
    members: Sequence[Piece],
    bucket_of: Any,
    backend: Backend,
) -> Select[Any]:
    """The raw rows' latency bins per group and bucket, counted per bin."""
    m = action_metrics
    columns: list[ColumnElement[Any]] = [m.c.timestamp, m.c.latency_ms]
    if key is not None:
        columns.append(not_indexed(m.c[key]).label("key"))
    chosen: Select[Any] = select(*columns)
    ranged = rows_in_ranges(
        chosen,
        m.c.timestamp,
        _joined_ranges(members),
        [*metric_filter.conditions(m.c, times=False), m.c.error.is_(None)],
        backend,
    ).subquery("ranged")
    r = ranged.c
    binned = select(
        *([r.key] if key is not None else []),
        bucket_of(r.timestamp).label("bucket"),
        latency_bin(r.latency_ms).label("bin"),
    ).subquery("binned")
    b = binned.c
    grouped = [*([b.key] if key is not None else []), b.bucket, b.bin]
    return select(*grouped, func.count().label("n")).group_by(*grouped)


def _bins_per_group(binned: Select[Any], keyed: bool, backend: Backend) -> Select[Any]:
    """`_raw_bins`' rows, one per group and bucket with its bins and counts as two lists: a group's
    bins in one row rather than a row each (Kathmandu's raw quarter hours at 10M actions: ~100k rows
    fetched each way, most of the merge's time)."""
    rows = binned.subquery("bins")
    b = rows.c
    keys = [*([b.key] if keyed else []), b.bucket]
    return select(
        *keys, backend.int_list(b.bin).label("bins"), backend.int_list(b.n).label("counts")
    ).group_by(*keys)


async def percentiles_of_groups(
    connection: AsyncConnection,
    metric_filter: MetricFilter,
    request: BreakdownRequest,
    shape: Shape,
    pieces: Sequence[Piece],
    starts: Sequence[datetime],
    backend: Backend,
    values: Collection[str],
) -> dict[tuple[Any, ...], dict[str, float | None]]:
    """Each group's p50/p95/p99, by `breakdown.group_key`: its pieces' sketches and raw rows' bins,
    signed, merged. `values`: the values of `shape.key` in the groups wanted."""
    keyed = shape.key in request.by
    numbers: dict[tuple[Any, ...], int] = {}
    keys = group_keys(request)

    def number(key: Any, bucket: int) -> int:
        values = {shape.key: key, "bucket": bucket}
        return numbers.setdefault(tuple(values[name] for name in keys), len(numbers))

    counted: list[Counted] = []
    # Raw rows, and whole closed hours of a grain without sketches, read once however many buckets
    # take them (an edge hour taken from one local day is added to the next): binned per segment
    # of time with the same buckets and signs.
    segments = _segments([piece for piece in pieces if piece.grain not in shape.sketches])
    if segments:
        spans = [Piece(1, None, since, until, index) for index, (since, until, _) in enumerate(segments)]
        grid = _slot_grid(segments) if len(segments) >= GRID_FROM_SEGMENTS else None

        def segment_of(moment: ColumnElement[Any]) -> ColumnElement[int]:
            return _bucket_of_piece(moment, spans) if grid is None else grid.slot_of(moment, backend)

        binned = _raw_bins(metric_filter, shape.key if keyed else None, spans, segment_of, backend)
        rows = (await connection.execute(_bins_per_group(binned, keyed, backend))).all()
        groups: list[int] = []
        bins: list[int] = []
        counts: list[int] = []
        for row in rows:
            row_bins, row_counts = backend.ints_of(row[-2]), backend.ints_of(row[-1])
            index = row[-3] if grid is None else grid.segment[row[-3]]
            for bucket, sign in segments[index][2]:
                groups += [number(row[0] if keyed else None, bucket)] * len(row_bins)
                bins += row_bins
                counts += row_counts if sign > 0 else [-count for count in row_counts]
        if groups:
            counted.append(Counted(np.array(groups), np.array(bins), np.array(counts)))
    s = latency_sketch
    for grain, level in shape.sketches.items():
        # Each sketch read once, however many buckets take it (an edge hour is taken from one
        # local day and added to the next).
        taken: dict[datetime, list[tuple[int, int]]] = {}
        for piece in pieces:
            if piece.grain == grain:
                taken.setdefault(piece.since, []).append((piece.bucket, piece.sign))
        if not taken:
            continue
        moments = sorted(taken)
        when = (
            s.c.start.in_(moments)
            if grain == "hour"
            else any_range(s.c.start, _joined([(m, next_start(m, grain)) for m in moments]))
        )
        chosen, key_of = _chosen_keys(level, shape, metric_filter, values)
        statement = select(s.c.start, s.c.key, s.c.zero_count, s.c.bins).where(
            s.c.level == level.name, when, *chosen
        )
        group_of: list[int] = []
        signs: list[int] = []
        blobs: list[bytes] = []
        zero_counts: list[int] = []
        for row in (await connection.execute(statement)).all():
            key = key_of(row[1])
            for bucket, taken_sign in taken.get(row[0], ()):
                group_of.append(number(key, bucket))
                signs.append(taken_sign)
                zero_counts.append(row[2])
                blobs.append(row[3])
        if blobs:
            counted.append(blob_counts(group_of, signs, blobs, zero_counts))
    merged = merged_percentiles(len(numbers), counted)
    return {group: merged.of(index) for group, index in numbers.items()}


def _chosen_keys(
    level: SketchLevel, shape: Shape, metric_filter: MetricFilter, values: Collection[str]
) -> tuple[list[ColumnElement[bool]], Callable[[str], str]]:
    """Which of the level's sketches the filter takes (WHERE terms on their key), and the value of
    `shape.key` each stands for. A town's action types: the keys 'town/action' of the `values`
    (those of the rows found), searched by the index on (level, start, key)."""
    s = latency_sketch
    if level.then is None:
        value = getattr(metric_filter, level.key)
        return ([] if value is None else [s.c.key == value]), lambda key: key
    assert level.then == shape.key
    town = getattr(metric_filter, level.key)
    assert town is not None, "a town's action types are read for one town"
    keys = {level.stored_key(town, value): value for value in values}
    return [s.c.key.in_(sorted(keys))], keys.__getitem__


async def breakdown_rows(
    connection: AsyncConnection,
    metric_filter: MetricFilter,
    request: BreakdownRequest,
    shape: Shape,
    pieces: Sequence[Piece],
    state: RollupState,
    starts: Sequence[datetime],
    backend: Backend,
    price_starts: Sequence[datetime],
) -> list[BreakdownRow]:
    """The breakdown's rows, read by the pieces of a cover."""
    if not pieces:
        return []
    towns = None
    if "town_id" in shape.sums.get("hour", HOURLY).keeps:
        towns = (
            [metric_filter.town_id]
            if metric_filter.town_id is not None
            else await towns_of(connection, pieces, state)
        )
    statement = sums_statement(metric_filter, request, shape, pieces, starts, backend, price_starts, towns)
    result = await connection.execute(statement)
    # Plain dicts from the tuples: a RowMapping per row builds its keys anew (a third of the
    # Python time of a breakdown of 4,550 groups).
    names = list(result.keys())
    rows = [dict(zip(names, values, strict=True)) for values in result.all()]
    if not rows:
        return []
    values = {row[shape.key] for row in rows if shape.key in row}
    percentiles = await percentiles_of_groups(
        connection, metric_filter, request, shape, pieces, starts, backend, values
    )
    empty = dict.fromkeys(PERCENTILES)
    for row in rows:
        row.update(percentiles.get(group_key(row, request), empty))
    bucketed = starts if request.bucket is not None else None
    return [row_from(row, request, bucketed) for row in rows]


def pruned_pieces(pieces: Sequence[Piece], state: RollupState, shape: Shape) -> bool:
    """Whether any piece read from raw rows (for its sums, or its percentiles where its grain has
    no sketches) lies before the prune cut-off."""
    cutoff = state.raw_kept_from
    raw = [piece for piece in pieces if piece.grain is None or piece.grain not in shape.sketches]
    return cutoff is not None and any(piece.since < cutoff for piece in raw)
