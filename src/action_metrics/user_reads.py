"""`breakdown()` by user from the user levels: a window is covered by the UTC months of the per-user
rollup inside it (each holds its closed days, so the current month is one row per user and model up
to the last closed day), then its closed days, then the open day's closed hours (its user rows hold
them as each hour closes), then raw rows for the rest (the open hour, the partial days at its edges,
and days before the user levels were built), read as `sketch_reads` reads a cover: sums exact and
priced per price period, percentiles merged from the user/month and user/day sketches with the raw
rows' bins.

1,000 users over 90 days are ~20k month rows (5 models, 4 months), not 450k day rows or 10M actions.
Breakdowns by user with another dimension, a bucket, a filter the level does not keep (town, citizen,
action type, model), exact percentiles or a sort by a percentile are read by `breakdown` as before.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from action_metrics.aggregate import PERCENTILES
from action_metrics.breakdown import BreakdownRequest
from action_metrics.latency_sketches import USER_DAILY, USER_MONTHLY
from action_metrics.query import MetricFilter
from action_metrics.rollup import (
    DAILY_BY_USER,
    MONTHLY_BY_USER,
    Grain,
    RollupState,
    ceil_to,
    floor_to,
    next_start,
    open_user_day,
)
from action_metrics.sketch_reads import Piece, Shape

SHAPE: Final = Shape(
    "user_id",
    {"day": USER_DAILY, "month": USER_MONTHLY},
    {"day": DAILY_BY_USER, "month": MONTHLY_BY_USER},
    subtract=False,
)


def answers(metric_filter: MetricFilter, request: BreakdownRequest) -> bool:
    """Whether the user levels answer this breakdown exactly (with percentiles within 1%)."""
    if request.exact or request.bucket is not None or request.by != ("user_id",):
        return False
    unkept = (
        metric_filter.limit,
        metric_filter.town_id,
        metric_filter.citizen_id,
        metric_filter.action_type,
        metric_filter.model,
    )
    return request.sort not in PERCENTILES and metric_filter.storable and all(v is None for v in unkept)


def cover(since: datetime, until: datetime, state: RollupState) -> list[Piece]:
    """[since, until) as months of the user levels from `users_from` on (each holding its closed
    days: the current month's up to the last closed day), then whole closed days; raw rows for the
    rest. One bucket (index 0)."""
    days_closed = state.days_closed_until
    if days_closed is None:
        return [Piece(1, None, since, until, 0)]
    built = since if state.users_from is None else max(since, state.users_from)
    pieces: list[Piece] = []
    spans = [(since, until)]
    first = month = ceil_to(built, "month")
    while month < days_closed:
        end = min(next_start(month, "month"), days_closed)
        if end > until:
            break
        pieces.append(Piece(1, "month", month, end, 0))
        month = end
    if pieces:
        spans = [(since, first), (month, until)]
    for low, high in spans:
        if low >= high:
            continue
        first = ceil_to(max(low, built), "day")
        last = min(floor_to(high, "day"), days_closed)
        if first < last:
            pieces += _steps(first, last, "day")
            for a, b in ((low, first), (last, high)):
                if a < b:
                    pieces += _rest(a, b, state)
        else:
            pieces += _rest(low, high, state)
    return pieces


def _rest(since: datetime, until: datetime, state: RollupState) -> list[Piece]:
    """Raw rows for [since, until); where it holds the open day's start and all its closed hours,
    the open day's user rows stand for those (`rollup.open_user_day`)."""
    open_day = open_user_day(state)
    if open_day is None or not (since <= open_day[0] and open_day[1] <= until):
        return [Piece(1, None, since, until, 0)]
    day, reached = open_day
    return [
        *([Piece(1, None, since, day, 0)] if since < day else []),
        Piece(1, "day", day, reached, 0),
        *([Piece(1, None, reached, until, 0)] if reached < until else []),
    ]


def _steps(since: datetime, until: datetime, grain: Grain) -> list[Piece]:
    pieces = []
    while since < until:
        following = next_start(since, grain)
        pieces.append(Piece(1, grain, since, following, 0))
        since = following
    return pieces
