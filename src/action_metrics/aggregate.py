"""`aggregate()`: one SQL statement over `action_metrics_priced` answers every dashboard number.

Totals and by-model figures come from a single statement (a UNION ALL of the two groupings), so
they are read from one snapshot and always agree with each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    CompoundSelect,
    Double,
    Numeric,
    Select,
    String,
    and_,
    case,
    cast,
    func,
    literal_column,
    not_,
    null,
    select,
    true,
    union_all,
)
from sqlalchemy.sql.selectable import NamedFromClause

from action_metrics.dialects import Backend
from action_metrics.query import MetricFilter
from action_metrics.schema import action_metrics_priced

PERCENTILES = {"p50_latency_ms": 0.50, "p95_latency_ms": 0.95, "p99_latency_ms": 0.99}


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
    avg_latency_ms: float | None
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    p99_latency_ms: float | None
    total_cost_usd: float
    total_revenue_usd: float
    avg_margin: float | None
    gross_margin: float | None
    unpriced_count: int
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
            "avg_latency_ms": self.avg_latency_ms,
            "p50_latency_ms": self.p50_latency_ms,
            "p95_latency_ms": self.p95_latency_ms,
            "p99_latency_ms": self.p99_latency_ms,
            "total_cost_usd": self.total_cost_usd,
            "total_revenue_usd": self.total_revenue_usd,
            "avg_margin": self.avg_margin,
            "gross_margin": self.gross_margin,
            "unpriced_count": self.unpriced_count,
            "by_model": {model: stats.to_dict() for model, stats in self.by_model.items()},
        }


def _as_float(expression: ColumnElement[Any]) -> ColumnElement[float]:
    """PostgreSQL computes money in NUMERIC (exact); the API reports it as a float."""
    return cast(expression, Double)


def _as_int(expression: ColumnElement[Any]) -> ColumnElement[int]:
    """SUM(bigint) is NUMERIC on PostgreSQL."""
    return cast(func.coalesce(expression, 0), BigInteger)


def _latency_and_counts(rows: NamedFromClause, keys: Sequence[str], backend: Backend) -> NamedFromClause:
    ranked = backend.rank_latencies(rows, keys)
    c = ranked.c
    return (
        select(
            *(c[key] for key in keys),
            func.count().label("count"),
            _as_int(func.sum(c.tokens_in)).label("tokens_in"),
            _as_int(func.sum(c.tokens_out)).label("tokens_out"),
            _as_int(func.sum(c.credits_charged)).label("total_credits"),
            func.avg(c.latency_ms).label("avg_latency_ms"),
            *(
                backend.latency_percentile(ranked, fraction).label(name)
                for name, fraction in PERCENTILES.items()
            ),
            _as_float(func.avg(c.margin)).label("avg_margin"),
            func.count().filter(not_(c.priced)).label("unpriced_count"),
        )
        .select_from(ranked)
        .group_by(*(c[key] for key in keys))
        .subquery()
    )


def _money(rows: NamedFromClause, keys: Sequence[str]) -> NamedFromClause:
    """Cost and revenue, summed exactly on both backends.

    Tokens and credits are summed as integers per price in force, and each sum is multiplied by
    its price once: SQLite's REAL arithmetic then rounds a handful of times instead of once per
    row, which keeps a million-row total within 1e-9 USD of the decimal answer.
    """
    c = rows.c
    prices = (c.input_per_1m, c.output_per_1m, c.usd_per_credit)
    per_price = (
        select(
            *(c[key] for key in keys),
            *prices,
            func.sum(c.tokens_in).label("tokens_in"),
            func.sum(c.tokens_out).label("tokens_out"),
            func.sum(c.credits_charged).label("credits"),
        )
        .group_by(*(c[key] for key in keys), *prices)
        .subquery()
    )
    p = per_price.c
    # Unpriced groups have NULL prices and drop out of SUM: they add no cost.
    cost = func.sum((p.tokens_in * p.input_per_1m + p.tokens_out * p.output_per_1m) / _ONE_MILLION)
    return (
        select(
            *(p[key] for key in keys),
            func.coalesce(cost, 0).label("cost"),
            func.coalesce(func.sum(p.credits * p.usd_per_credit), 0).label("revenue"),
        )
        .group_by(*(p[key] for key in keys))
        .subquery()
    )


_ONE_MILLION = literal_column("1000000.0", Numeric)
"""A decimal literal: NUMERIC on PostgreSQL (a bound float would make the division inexact)."""


def _grouped(rows: NamedFromClause, keys: Sequence[str], backend: Backend) -> Select[Any]:
    stats, money = _latency_and_counts(rows, keys, backend), _money(rows, keys)
    joined = stats.join(money, and_(true(), *(stats.c[key] == money.c[key] for key in keys)))
    cost, revenue = money.c.cost, money.c.revenue
    return select(
        (stats.c.model if keys else cast(null(), String)).label("model"),
        *(column for column in stats.c if column.name not in keys),
        _as_float(cost).label("total_cost_usd"),
        _as_float(revenue).label("total_revenue_usd"),
        _as_float(case((revenue > 0, (revenue - cost) / revenue))).label("gross_margin"),
    ).select_from(joined)


def aggregate_statement(metric_filter: MetricFilter, backend: Backend) -> CompoundSelect[Any]:
    view = action_metrics_priced
    if metric_filter.limit is None:
        selection = select(view).where(*metric_filter.conditions(view.c))
    else:  # the newest `limit` metrics
        selection = metric_filter.newest_first(select(view), view.c)
    rows = selection.cte("selection")
    return union_all(_grouped(rows, [], backend), _grouped(rows, ["model"], backend))


def aggregate_from_rows(rows: Sequence[Mapping[str, Any]]) -> Aggregate:
    overall: Mapping[str, Any] | None = None
    by_model: dict[str, ModelAggregate] = {}
    for row in rows:
        if row["model"] is None:
            overall = row
            continue
        by_model[row["model"]] = ModelAggregate(
            count=row["count"],
            total_tokens=row["tokens_in"] + row["tokens_out"],
            avg_latency_ms=row["avg_latency_ms"],
            p95_latency_ms=row["p95_latency_ms"],
            total_cost_usd=row["total_cost_usd"],
            unpriced_count=row["unpriced_count"],
        )
    assert overall is not None, "an ungrouped aggregate always returns one row"
    ordered = dict(sorted(by_model.items(), key=lambda item: (-item[1].count, item[0])))
    return Aggregate(
        count=overall["count"],
        tokens_in=overall["tokens_in"],
        tokens_out=overall["tokens_out"],
        total_credits=overall["total_credits"],
        avg_latency_ms=overall["avg_latency_ms"],
        p50_latency_ms=overall["p50_latency_ms"],
        p95_latency_ms=overall["p95_latency_ms"],
        p99_latency_ms=overall["p99_latency_ms"],
        total_cost_usd=overall["total_cost_usd"],
        total_revenue_usd=overall["total_revenue_usd"],
        avg_margin=overall["avg_margin"],
        gross_margin=overall["gross_margin"],
        unpriced_count=overall["unpriced_count"],
        by_model=ordered,
    )
