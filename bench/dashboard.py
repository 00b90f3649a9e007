"""Dashboard queries: `aggregate()` against the best exact SQL we can write by hand, same database.

    PYTHONPATH=src python bench/dashboard.py                        # 1M actions, both backends
    PYTHONPATH=src python bench/dashboard.py --actions 200000 --backends sqlite
    PYTHONPATH=src python bench/dashboard.py --actions 10000000 \\
        --sqlite-path /tmp/am-10m.db --postgres-db am_bench_10m     # the documented 10M run, kept
    PYTHONPATH=src python bench/dashboard.py --backends clickhouse --clickhouse-path /tmp/am-ch-1m

N actions of `shape.generate`'s shape (11 action types, 50 towns, 1,000 users, 5,000 citizens, the 5
seeded models with lognormal latencies, evenly over the last 90 days) go into a fresh database
migrated by the package, through `AsyncMetricsStore.emit_many`; the load time is printed. Before the
load, prices change at unaligned instants inside the data (sonnet 30 days ago, opus 61 days ago, the
credit 45 days ago; `--no-price-changes` keeps the seed's prices), so effective dating is exercised.
`--sqlite-path` / `--postgres-db` keep the database and reuse it when it already holds actions
(loading 10M takes minutes); the clock of every "last 24 hours" is then the newest stored action.

Selections: everything, one action type (lod3), one town (town-7), one model (sonnet), each over all
time, the last 24 hours, this week (from Monday 00:00 UTC), today (from 00:00 UTC) and an unaligned
window (13:37:11 ten days before the newest action until 04:12:09 two days later); one user and one
citizen over all time; the daily view summed per day, per town and per model, and the narrower views a
panel would read for the same sums (action_metrics_daily_by_town per day and per town,
action_metrics_daily_by_model per model). Breakdowns: per day
(the page's first chart) and by town x day in Europe/Berlin and in Asia/Kathmandu over 90 days, by model
x hour (Berlin) over the last 7 days, by user over all time, the top 10 users by loss over 90 days (the
hand side cut the same way); their hand SQL sums cost, revenue and count per group from action_metrics
and the price tables (the daily view's statement with the group as its key; the local bucket by `AT TIME
ZONE` on PostgreSQL, by the zone's offsets between its changes, found with zoneinfo, on SQLite), and the
check compares those per group (the API also computes each group's percentiles, which the hand SQL does
not).

Per backend and selection, the median of `--repeat` runs (sides rotated each run) in ms of:
- api: `store.aggregate(**filters)`; exact: the same with `exact=True` (n/a while that keyword does
  not exist); for the daily rows, api is `SELECT key, SUM(cost_usd), SUM(revenue_usd), SUM(count)
  FROM action_metrics_daily GROUP BY key` through the raw driver.
- hand: hand-written SQL computing the same numbers (overall and by model) from action_metrics and the
  price tables, through the raw driver (sqlite3, asyncpg): no SQLAlchemy, no views.
- api/hand and exact/hand: how many times slower than the hand SQL (below 1: faster).
- pct err: the largest relative error of the api's p50/p95/p99 against the hand SQL's exact ones.
- check: the hand SQL agrees with `aggregate(exact=True)` (with plain `aggregate()` while it is exact):
  counts and tokens equal, money within 1e-9 USD, averages, percentiles and margins within 1e-9
  relative; with `exact=True` available the default's percentiles need only be within 1%. Daily rows
  compare the view's sums with the hand SQL's (counts equal, money within 1e-9 USD + 1e-12 relative:
  SQLite's view adds up a rounded double per action). A MISMATCH line names every difference, and the
  bench exits 1.

How the hand SQL is made fast (all of it exact): prices are found once per group of actions, not per
action; tokens and credits are summed as integers and multiplied by their price once; the mean margin
comes from per-group sums; p50/p95/p99 take one sort and the by-model p95 one more.
- PostgreSQL: `width_bucket` places each timestamp in the sorted array of all price changes, so one
  hash aggregate by model, credits and bucket needs no join per action; `percentile_cont` over an
  array of fractions.
- SQLite, no filter but model and time: each price period drives a range scan of the (model, timestamp)
  index, in the price tables' index order, so there is no GROUP BY sort; with a user, town, citizen or
  action type: that filter's index finds the actions once, six columns of them are kept and priced by
  a join. Percentiles: ROW_NUMBER, reading back only the rows at the interpolation points.

`--without-sketches` reads every breakdown the way it was read before the sketch levels (rollup
histograms merged in SQL, raw rows for a local day's edge hours): the same database, for a comparison.

- ClickHouse (`--backends clickhouse`, in process through chdb; `--clickhouse-path DIR` keeps the
  directory, database `--clickhouse-database`): every price change is one sorted array, each action's
  period is how many changes it is at or after, so one GROUP BY model, credits and period sums the raw
  rows and only those groups meet their prices (ASOF JOIN of a few rows); FINAL, so a re-sent action
  counts once; `quantilesExactInclusive` overall and by model in one GROUPING SETS; local buckets by
  `toStartOfDay/Hour(toTimeZone(timestamp, tz))`. It runs on a clickhouse-connect client of its own on
  the same directory: chdb opens one directory per process, and a second client of that directory
  shares the engine the store has open. ClickHouse has no daily view: those rows show api n/a (and
  the hand SQL's time over the raw rows alone), and are not checked.

PostgreSQL runs with the server's settings (jit=on by default, work_mem 4MB): `--postgres-setting
jit=off` (repeatable, any NAME=VALUE) applies a setting to both sides' sessions. After a load the bench
runs `VACUUM (ANALYZE)` on the raw, rollup and sketch tables, as autovacuum soon would; it leaves the
price tables unanalyzed, as autovacuum does with a table of a few rows.

PostgreSQL: $ACTION_METRICS_BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres)
must allow CREATE DATABASE; the bench drops only the databases it created (never a `--postgres-db`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import asyncpg
from rich.console import Console
from rich.table import Table
from shape import DEFAULT_SEED, generate
from sqlalchemy import make_url

from action_metrics import AsyncMetricsStore, migrate
from action_metrics.dialects import backend_for

CLOSED_BUCKETS: Final = "action_metrics_closed_buckets"
POSTGRES_ADMIN_URL: Final = os.environ.get(
    "ACTION_METRICS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
EQUALITY_FILTERS: Final = ("user_id", "town_id", "citizen_id", "action_type", "model")
MONEY_TOLERANCE: Final = 1e-9
RELATIVE_TOLERANCE: Final = 1e-9
APPROXIMATE_PERCENTILE_TOLERANCE: Final = 0.01
PERCENTILE_KEYS: Final = ("p50_latency_ms", "p95_latency_ms", "p99_latency_ms")
SQLITE_TEXT_TIME: Final = "%Y-%m-%d %H:%M:%S.%f"
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
CLICKHOUSE_EARLIEST: Final = datetime(1900, 1, 1, tzinfo=UTC)
"""DateTime64's first instant: no action is stored before it."""

Filters = dict[str, Any]


# --- what is asked ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grouped:
    """A breakdown's grouping: `breakdown(by, bucket=bucket, tz=tz, **filters)`."""

    by: tuple[str, ...]
    bucket: str | None = None
    tz: str = "UTC"
    sort: str = "total_cost_usd"
    """total_cost_usd or total_profit_usd: what the hand side's groups are cut by, given `top`."""
    descending: bool = True
    top: int | None = None

    def cut(self, groups: dict[str, tuple[Decimal, Decimal, int]]) -> dict[str, tuple[Decimal, Decimal, int]]:
        """The hand SQL's groups cut to `top` as `breakdown()` sorts them (ties by key)."""
        if self.top is None:
            return groups

        def value(item: tuple[str, tuple[Decimal, Decimal, int]]) -> Decimal:
            cost, revenue, _ = item[1]
            figure = cost if self.sort == "total_cost_usd" else revenue - cost
            return -figure if self.descending else figure

        return dict(sorted(groups.items(), key=lambda item: (value(item), item[0]))[: self.top])


@dataclass(frozen=True)
class Selection:
    """One dashboard question: `aggregate(**filters)`, or (`daily_key`) the daily view summed by a key,
    or (`grouped`) a breakdown."""

    name: str
    filters: Filters = field(default_factory=dict)
    daily_key: str | None = None
    daily_view: str = "action_metrics_daily"
    grouped: Grouped | None = None


def selections(now: datetime) -> list[Selection]:
    """The issue's selections, with every window relative to `now` (the newest stored action)."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    unaligned_day = midnight - timedelta(days=10)
    windows: list[tuple[str, Filters]] = [
        ("all time", {}),
        ("last 24h", {"since": now - timedelta(hours=24)}),
        ("this week", {"since": midnight - timedelta(days=midnight.weekday())}),
        ("today", {"since": midnight}),
        (
            "unaligned",
            {
                "since": unaligned_day.replace(hour=13, minute=37, second=11),
                "until": unaligned_day + timedelta(days=2, hours=4, minutes=12, seconds=9),
            },
        ),
    ]
    subjects: list[tuple[str, Filters]] = [
        ("everything", {}),
        ("lod3", {"action_type": "lod3"}),
        ("town-7", {"town_id": "town-7"}),
        ("sonnet", {"model": "sonnet"}),
    ]
    chosen = [
        Selection(f"{subject}, {window}", {**subject_filters, **window_filters})
        for subject, subject_filters in subjects
        for window, window_filters in windows
    ]
    chosen.append(Selection("user-7, all time", {"user_id": "user-7"}))
    chosen.append(Selection("citizen-7, all time", {"citizen_id": "citizen-7"}))
    chosen.extend(Selection(f"daily view per {key}", daily_key=key) for key in ("day", "town_id", "model"))
    chosen += [
        Selection(f"{short} view per {key}", daily_key=key, daily_view=view)
        for short, view, key in (
            ("by-town", "action_metrics_daily_by_town", "day"),
            ("by-town", "action_metrics_daily_by_town", "town_id"),
            ("by-model", "action_metrics_daily_by_model", "model"),
        )
    ]
    ninety_days = {"since": now - timedelta(days=90)}
    chosen += [
        Selection("per Berlin day, 90d", ninety_days, grouped=Grouped((), "day", "Europe/Berlin")),
        Selection("per Kathmandu day, 90d", ninety_days, grouped=Grouped((), "day", "Asia/Kathmandu")),
        Selection(
            "by town x Berlin day, 90d", ninety_days, grouped=Grouped(("town_id",), "day", "Europe/Berlin")
        ),
        Selection(
            "by town x Kathmandu day, 90d",
            ninety_days,
            grouped=Grouped(("town_id",), "day", "Asia/Kathmandu"),
        ),
        Selection(
            "by model x Berlin hour, 7d",
            {"since": now - timedelta(days=7)},
            grouped=Grouped(("model",), "hour", "Europe/Berlin"),
        ),
        Selection("by user, all time", grouped=Grouped(("user_id",))),
        Selection(
            "top 10 users by loss, 90d",
            ninety_days,
            grouped=Grouped(("user_id",), sort="total_profit_usd", descending=False, top=10),
        ),
    ]
    return chosen


# --- the hand-written SQL: SQLite ----------------------------------------------------------------
#
# Two ways to find the actions and their prices, chosen by the filters as a DBA would:
# - no filter but model and time (everything, one model, any window): each price period of each model,
#   crossed with each credit price period, drives one range scan of the (model, timestamp) index, and
#   the scans come out grouped by period in the order of the price tables' unique indexes, so there is
#   neither a price lookup per action nor a sort for the GROUP BY. Actions with no model price in force
#   (before a model's first price, or a model never priced) and actions before the first credit price
#   come from two more scans, empty unless such actions exist.
# - a user, town, citizen or action type: that filter's index finds the few actions once; they are kept
#   (six columns) and each is priced by a join with the price periods, the GROUP BY sorting few rows.
# Both sum tokens and credits as integers per price and multiply each sum by its price once, as
# `aggregate()` does. The mean margin over priced actions with revenue > 0 is, per price period,
# n - (input * sum(tokens_in / credits) + output * sum(tokens_out / credits)) / (1e6 * usd_per_credit):
# a sum of doubles, as `aggregate()`'s AVG(margin) is.
# Percentiles: ROW_NUMBER over the selection and within each model (one sort each), then only the
# rows at the ranks the interpolation needs are read back. '~' sorts after every stored timestamp.

SQLITE_PERIOD_SCANS: Final = """
WITH RECURSIVE
models(model) AS (
    SELECT min(model) FROM action_metrics
    UNION ALL
    SELECT (SELECT min(model) FROM action_metrics WHERE model > models.model) FROM models
    WHERE model IS NOT NULL
),
first_credit_price AS (
    SELECT coalesce(min(effective_from), '~') AS starts FROM credit_prices
),
priced AS (
    SELECT p.model, p.input_per_1m AS i, p.output_per_1m AS o, c.usd_per_credit AS c{key_column},
           count(*) AS n, sum(s.tokens_in) AS ti, sum(s.tokens_out) AS tout,
           sum(s.credits_charged) AS credits, sum(s.latency_ms) AS lat, 0 AS unpriced,
           count(CASE WHEN s.credits_charged > 0 THEN 1 END) AS margin_n,
           total(CASE WHEN s.credits_charged > 0 THEN s.tokens_in * 1.0 / s.credits_charged END)
               AS ti_per_credit,
           total(CASE WHEN s.credits_charged > 0 THEN s.tokens_out * 1.0 / s.credits_charged END)
               AS tout_per_credit
    FROM model_prices AS p CROSS JOIN credit_prices AS c CROSS JOIN action_metrics AS s
    WHERE s.model = p.model
      AND s."timestamp" >= max(p.effective_from, c.effective_from, :since)
      AND s."timestamp" < min(
          coalesce((SELECT min(q.effective_from) FROM model_prices AS q
                    WHERE q.model = p.model AND q.effective_from > p.effective_from), '~'),
          coalesce((SELECT min(q.effective_from) FROM credit_prices AS q
                    WHERE q.effective_from > c.effective_from), '~'),
          :until)
      {conditions}
    GROUP BY p.model, p.effective_from, c.effective_from{key_group}
),
credit_unpriced AS (
    SELECT p.model, p.input_per_1m, p.output_per_1m, NULL{key_column},
           count(*), sum(s.tokens_in), sum(s.tokens_out), sum(s.credits_charged), sum(s.latency_ms),
           0, 0, 0, 0
    FROM model_prices AS p CROSS JOIN action_metrics AS s
    WHERE s.model = p.model
      AND s."timestamp" >= max(p.effective_from, :since)
      AND s."timestamp" < min(
          coalesce((SELECT min(q.effective_from) FROM model_prices AS q
                    WHERE q.model = p.model AND q.effective_from > p.effective_from), '~'),
          (SELECT starts FROM first_credit_price),
          :until)
      {conditions}
    GROUP BY p.model, p.effective_from{key_group}
),
model_unpriced AS (
    SELECT m.model, NULL, NULL,
           (SELECT q.usd_per_credit FROM credit_prices AS q WHERE q.effective_from <= s."timestamp"
            ORDER BY q.effective_from DESC LIMIT 1) AS c{key_column},
           count(*), sum(s.tokens_in), sum(s.tokens_out), sum(s.credits_charged), sum(s.latency_ms),
           count(*), 0, 0, 0
    FROM models AS m CROSS JOIN action_metrics AS s
    WHERE m.model IS NOT NULL AND s.model = m.model
      AND s."timestamp" >= :since
      AND s."timestamp" < min(
          coalesce((SELECT min(q.effective_from) FROM model_prices AS q WHERE q.model = m.model), '~'),
          :until)
      {conditions}
    GROUP BY m.model, c{key_group}
),
periods AS (
    SELECT * FROM priced UNION ALL SELECT * FROM credit_unpriced UNION ALL SELECT * FROM model_unpriced
)"""

SQLITE_SELECTION_JOIN: Final = """
WITH
model_periods AS (
    SELECT model, effective_from AS starts, input_per_1m AS i, output_per_1m AS o,
           coalesce(LEAD(effective_from) OVER (PARTITION BY model ORDER BY effective_from), '~') AS ends
    FROM model_prices
),
credit_periods AS (
    SELECT effective_from AS starts, usd_per_credit AS c,
           coalesce(LEAD(effective_from) OVER (ORDER BY effective_from), '~') AS ends
    FROM credit_prices
),
selection AS MATERIALIZED (
    SELECT model, "timestamp", tokens_in, tokens_out, credits_charged, latency_ms
    FROM action_metrics AS s
    {where}
),
periods AS (
    SELECT s.model, m.i, m.o, c.c,
           count(*) AS n, sum(s.tokens_in) AS ti, sum(s.tokens_out) AS tout,
           sum(s.credits_charged) AS credits, sum(s.latency_ms) AS lat, count(*) - count(m.model) AS unpriced,
           count(CASE WHEN s.credits_charged > 0 THEN 1 END) AS margin_n,
           total(CASE WHEN s.credits_charged > 0 THEN s.tokens_in * 1.0 / s.credits_charged END)
               AS ti_per_credit,
           total(CASE WHEN s.credits_charged > 0 THEN s.tokens_out * 1.0 / s.credits_charged END)
               AS tout_per_credit
    FROM selection AS s
    LEFT JOIN model_periods AS m
        ON m.model = s.model AND s."timestamp" >= m.starts AND s."timestamp" < m.ends
    LEFT JOIN credit_periods AS c ON s."timestamp" >= c.starts AND s."timestamp" < c.ends
    GROUP BY s.model, m.starts, c.starts
)"""

SQLITE_TOTALS_AND_PERCENTILES: Final = """,
per_price AS (
    SELECT model, i, o, c, sum(n) AS n, sum(ti) AS ti, sum(tout) AS tout, sum(credits) AS credits,
           sum(lat) AS lat, sum(unpriced) AS unpriced,
           sum(CASE WHEN c > 0 AND i IS NOT NULL THEN margin_n END) AS margin_n,
           sum(CASE WHEN c > 0 AND i IS NOT NULL
                    THEN margin_n - (i * ti_per_credit + o * tout_per_credit) / (1000000.0 * c) END)
               AS margin_sum
    FROM periods GROUP BY model, i, o, c
),
totals AS (
    SELECT NULL AS model, coalesce(sum(n), 0) AS n, coalesce(sum(ti), 0) AS ti,
           coalesce(sum(tout), 0) AS tout, coalesce(sum(credits), 0) AS credits,
           sum(lat) / sum(n) AS avg_latency, coalesce(sum(unpriced), 0) AS unpriced,
           sum(margin_sum) / sum(margin_n) AS avg_margin,
           coalesce(sum(cost), 0) AS cost, coalesce(sum(revenue), 0) AS revenue
    FROM (
        SELECT sum(n) AS n, sum(ti) AS ti, sum(tout) AS tout, sum(credits) AS credits, sum(lat) AS lat,
               sum(unpriced) AS unpriced, sum(margin_sum) AS margin_sum, sum(margin_n) AS margin_n,
               (sum(ti) * i + sum(tout) * o) / 1000000.0 AS cost, sum(credits) * c AS revenue
        FROM per_price GROUP BY i, o, c
    )
    UNION ALL
    SELECT model, sum(n), sum(ti), sum(tout), sum(credits), sum(lat) / sum(n), sum(unpriced),
           sum(margin_sum) / sum(margin_n), coalesce(sum((ti * i + tout * o) / 1000000.0), 0),
           coalesce(sum(credits * c), 0)
    FROM per_price GROUP BY model
),
positions AS (
    SELECT t.model, f.fraction, (t.n - 1) * f.fraction AS position,
           CAST((t.n - 1) * f.fraction AS INTEGER) AS lo
    FROM totals AS t
    JOIN (SELECT 0.5 AS fraction UNION ALL SELECT 0.95 UNION ALL SELECT 0.99) AS f
        ON t.model IS NULL OR f.fraction = 0.95
    WHERE t.n > 0
),
ranked AS NOT MATERIALIZED (
    SELECT model, latency_ms,
           ROW_NUMBER() OVER (ORDER BY latency_ms) - 1 AS overall_rank,
           -- +model: not the model index's order, which would cost a scan of the whole index
           ROW_NUMBER() OVER (PARTITION BY +model ORDER BY latency_ms) - 1 AS model_rank
    FROM {ranked_source}
),
picked AS (
    SELECT model, overall_rank, model_rank, latency_ms FROM ranked
    WHERE overall_rank IN (SELECT lo FROM positions WHERE model IS NULL
                           UNION ALL SELECT lo + 1 FROM positions WHERE model IS NULL)
       OR (model, model_rank) IN (SELECT model, lo FROM positions WHERE model IS NOT NULL
                                  UNION ALL SELECT model, lo + 1 FROM positions WHERE model IS NOT NULL)
),
percentiles AS (
    SELECT model, fraction, low + (position - lo) * (coalesce(high, low) - low) AS value
    FROM (
        SELECT p.model, p.fraction, p.position, p.lo,
               max(CASE WHEN k.rank = p.lo THEN k.latency_ms END) AS low,
               max(CASE WHEN k.rank = p.lo + 1 THEN k.latency_ms END) AS high
        FROM positions AS p
        JOIN (SELECT NULL AS model, overall_rank AS rank, latency_ms FROM picked
              UNION ALL SELECT model, model_rank, latency_ms FROM picked) AS k
            ON k.model IS p.model
        GROUP BY p.model, p.fraction
    )
)
SELECT t.model, t.n, t.ti, t.tout, t.credits, t.avg_latency,
       (SELECT value FROM percentiles AS p WHERE p.model IS t.model AND p.fraction = 0.5),
       (SELECT value FROM percentiles AS p WHERE p.model IS t.model AND p.fraction = 0.95),
       (SELECT value FROM percentiles AS p WHERE p.model IS t.model AND p.fraction = 0.99),
       t.cost, t.revenue, t.avg_margin,
       CASE WHEN t.revenue > 0 THEN (t.revenue - t.cost) / t.revenue END, t.unpriced
FROM totals AS t
"""

SQLITE_DAILY: Final = (
    SQLITE_PERIOD_SCANS
    + """
SELECT key, coalesce(sum(cost), 0), coalesce(sum(revenue), 0), sum(n)
FROM (
    SELECT key, (sum(ti) * i + sum(tout) * o) / 1000000.0 AS cost, sum(credits) * c AS revenue, sum(n) AS n
    FROM periods GROUP BY key, i, o, c
)
GROUP BY key
"""
)

SQLITE_DAILY_KEYS: Final = {"day": 'substr(s."timestamp", 1, 10)', "town_id": "s.town_id", "model": "s.model"}
SQLITE_NARROW_FILTERS: Final = ("user_id", "town_id", "citizen_id", "action_type")
"""Filters whose index finds few enough actions to keep them and price each by a join."""


def sqlite_aggregate_sql(filters: Filters) -> tuple[str, dict[str, Any]]:
    """The statement and its parameters; only names of columns are formatted in, values are bound."""
    equalities = [name for name in EQUALITY_FILTERS if filters.get(name) is not None]
    parameters: dict[str, Any] = {name: filters[name] for name in equalities}
    parameters["since"] = sqlite_time(filters["since"]) if filters.get("since") else ""
    parameters["until"] = sqlite_time(filters["until"]) if filters.get("until") else "~"
    conditions = [f"s.{name} = :{name}" for name in equalities]
    if filters.get("since"):
        conditions.append('s."timestamp" >= :since')
    if filters.get("until"):
        conditions.append('s."timestamp" < :until')
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    if any(name in SQLITE_NARROW_FILTERS for name in equalities):
        sql = SQLITE_SELECTION_JOIN.format(where=where) + SQLITE_TOTALS_AND_PERCENTILES.format(
            ranked_source="selection AS s"
        )
    else:
        period_scans = SQLITE_PERIOD_SCANS.format(
            key_column="",
            key_group="",
            conditions="".join(f" AND s.{name} = :{name}" for name in equalities),
        )
        # With no filter at all, a plain scan of the table beats walking an index for the windows.
        source = f"action_metrics AS s {where}" if where else "action_metrics AS s NOT INDEXED"
        sql = period_scans + SQLITE_TOTALS_AND_PERCENTILES.format(ranked_source=source)
    return sql, parameters


def sqlite_daily_sql(key: str) -> str:
    return SQLITE_DAILY.format(
        key_column=f", {SQLITE_DAILY_KEYS[key]} AS key", key_group=", key", conditions=""
    )


def sqlite_breakdown_sql(grouped: Grouped, since: datetime | None, until: datetime) -> str:
    """Money and counts per group: the daily statement with the group as its key. SQLite knows no
    zones: the local time is the UTC time shifted by the zone's offset in force, a CASE over the
    offsets' changes between `since` and `until` (found with zoneinfo)."""
    parts = [f"s.{name}" for name in grouped.by]
    if grouped.bucket is not None:
        shape = {"day": "%Y-%m-%d", "hour": "%Y-%m-%d %H"}[grouped.bucket]
        # Whole seconds first: SQLite's date functions round sub-millisecond digits (a bucket late).
        offset = sqlite_offset(grouped.tz, since, until)
        parts.append(f"strftime('{shape}', substr(s.\"timestamp\", 1, 19), {offset})")
    key = " || ' ' || ".join(parts)
    return SQLITE_DAILY.format(key_column=f", {key} AS key", key_group=", key", conditions="")


def offset_changes(tz: str, since: datetime, until: datetime) -> list[tuple[datetime, int]]:
    """(from, seconds east of UTC) for each offset of `tz` in force between `since` and `until`."""
    zone = ZoneInfo(tz)
    moment = since.replace(minute=0, second=0, microsecond=0)
    changes: list[tuple[datetime, int]] = []
    while moment < until:
        offset = moment.astimezone(zone).utcoffset()
        assert offset is not None
        if not changes or changes[-1][1] != int(offset.total_seconds()):
            changes.append((moment, int(offset.total_seconds())))
        moment += timedelta(minutes=15)
    return changes


def sqlite_offset(tz: str, since: datetime | None, until: datetime) -> str:
    """A modifier of SQLite's date functions: the zone's offset at each timestamp (a CASE over its
    changes). Only bench-computed numbers and times are formatted in."""
    changes = offset_changes(tz, since or until - timedelta(days=400), until)
    modifier = f"'{changes[0][1]:+d} seconds'"
    for start, seconds in changes[1:]:
        shifted = f"'{seconds:+d} seconds'"
        modifier = f"CASE WHEN s.\"timestamp\" < '{sqlite_time(start)}' THEN {modifier} ELSE {shifted} END"
    return modifier


def sqlite_time(moment: datetime) -> str:
    """How SQLAlchemy stores a timestamp on SQLite: UTC text with six decimals."""
    return moment.astimezone(UTC).strftime(SQLITE_TEXT_TIME)


# --- the hand-written SQL: PostgreSQL ------------------------------------------------------------
#
# Money: width_bucket() places each timestamp among all price changes (model and credit: one sorted
# array, computed once), so a hash aggregate by model, credits and bucket needs no join per action;
# the few groups then join the prices in force from each bucket's start (a handful of rows, built from
# the price periods; bucket 0, before any price, has none: unpriced). Sums of bigint are exact NUMERIC,
# and so is every product and sum after them but each group's division by 1e6 (16+ significant digits).
# The price rows are joined rather than looked up per group so that the planner's estimates stay
# small: the price tables are never analyzed, and an inflated cost estimate buys a JIT compilation
# (~0.3-1 s) for a query that runs in milliseconds.
# Percentiles: percentile_cont over an array of fractions sorts the selection once for p50/p95/p99;
# the by-model p95 is one more ordered-set aggregate grouped by model.

POSTGRES_PRICES: Final = """
WITH bounds AS MATERIALIZED (
    SELECT array_agg(starts ORDER BY starts) AS starts
    FROM (
        SELECT effective_from AS starts FROM model_prices UNION SELECT effective_from FROM credit_prices
    ) AS changes
),
buckets AS MATERIALIZED (
    SELECT bucket::int AS bucket, starts
    FROM unnest((SELECT starts FROM bounds)) WITH ORDINALITY AS changes(starts, bucket)
),
model_bucket_prices AS MATERIALIZED (
    SELECT b.bucket, p.model, p.i, p.o
    FROM (
        SELECT model, input_per_1m AS i, output_per_1m AS o, effective_from AS starts,
               lead(effective_from) OVER (PARTITION BY model ORDER BY effective_from) AS ends
        FROM model_prices
    ) AS p
    JOIN buckets AS b ON b.starts >= p.starts AND (p.ends IS NULL OR b.starts < p.ends)
),
credit_bucket_prices AS MATERIALIZED (
    SELECT b.bucket, p.c
    FROM (
        SELECT usd_per_credit AS c, effective_from AS starts,
               lead(effective_from) OVER (ORDER BY effective_from) AS ends
        FROM credit_prices
    ) AS p
    JOIN buckets AS b ON b.starts >= p.starts AND (p.ends IS NULL OR b.starts < p.ends)
)"""

POSTGRES_AGGREGATE: Final = (
    POSTGRES_PRICES
    + """,
groups AS (
    SELECT model, credits_charged AS credits,
           width_bucket("timestamp", (SELECT starts FROM bounds)) AS bucket,
           count(*) AS n, sum(tokens_in) AS ti, sum(tokens_out) AS tout, sum(latency_ms) AS lat
    FROM action_metrics {where}
    GROUP BY 1, 2, 3
),
priced AS (
    SELECT g.*, m.i, m.o, c.c
    FROM groups AS g
    LEFT JOIN model_bucket_prices AS m ON m.bucket = g.bucket AND m.model = g.model
    LEFT JOIN credit_bucket_prices AS c ON c.bucket = g.bucket
),
totals AS (
    SELECT model, coalesce(sum(n), 0) AS n, coalesce(sum(ti), 0) AS ti, coalesce(sum(tout), 0) AS tout,
           coalesce(sum(credits * n), 0) AS credits, sum(lat) / sum(n) AS avg_latency,
           coalesce(sum(n) FILTER (WHERE i IS NULL), 0) AS unpriced,
           sum(n - (ti * i + tout * o) / (1000000.0 * credits * c))
               FILTER (WHERE credits * c > 0 AND i IS NOT NULL)
               / sum(n) FILTER (WHERE credits * c > 0 AND i IS NOT NULL) AS avg_margin,
           coalesce(sum((ti * i + tout * o) / 1000000.0), 0) AS cost,
           coalesce(sum(credits * n * c), 0) AS revenue
    FROM priced
    GROUP BY GROUPING SETS ((), (model))
),
overall AS (
    SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY latency_ms) AS p
    FROM action_metrics {where}
),
by_model AS (
    SELECT model, percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95
    FROM action_metrics {where}
    GROUP BY model
)
SELECT t.model, t.n::bigint, t.ti::bigint, t.tout::bigint, t.credits::bigint, t.avg_latency,
       CASE WHEN t.model IS NULL THEN (SELECT p[1] FROM overall) END,
       coalesce(b.p95, CASE WHEN t.model IS NULL THEN (SELECT p[2] FROM overall) END),
       CASE WHEN t.model IS NULL THEN (SELECT p[3] FROM overall) END,
       t.cost::float8, t.revenue::float8, t.avg_margin::float8,
       (CASE WHEN t.revenue > 0 THEN (t.revenue - t.cost) / t.revenue END)::float8, t.unpriced::bigint
FROM totals AS t LEFT JOIN by_model AS b ON b.model = t.model
"""
)

POSTGRES_DAILY: Final = (
    POSTGRES_PRICES
    + """,
groups AS (
    SELECT {key} AS key, model, width_bucket("timestamp", (SELECT starts FROM bounds)) AS bucket,
           count(*) AS n, sum(tokens_in) AS ti, sum(tokens_out) AS tout, sum(credits_charged) AS credits
    FROM action_metrics {where}
    GROUP BY 1, 2, 3
)
SELECT g.key, coalesce(sum((g.ti * m.i + g.tout * m.o) / 1000000.0), 0), coalesce(sum(g.credits * c.c), 0),
       sum(g.n)
FROM groups AS g
LEFT JOIN model_bucket_prices AS m ON m.bucket = g.bucket AND m.model = g.model
LEFT JOIN credit_bucket_prices AS c ON c.bucket = g.bucket
GROUP BY g.key
"""
)

POSTGRES_DAILY_KEYS: Final = {
    "day": """("timestamp" AT TIME ZONE 'UTC')::date""",
    "town_id": "town_id",
    "model": "model",
}


def postgres_aggregate_sql(filters: Filters) -> tuple[str, list[Any]]:
    conditions: list[str] = []
    parameters: list[Any] = []
    for name in EQUALITY_FILTERS:
        if filters.get(name) is not None:
            parameters.append(filters[name])
            conditions.append(f"{name} = ${len(parameters)}")
    for name, operator in (("since", ">="), ("until", "<")):
        if filters.get(name) is not None:
            parameters.append(filters[name])
            conditions.append(f'"timestamp" {operator} ${len(parameters)}')
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    return POSTGRES_AGGREGATE.format(where=where), parameters


def postgres_daily_sql(key: str) -> str:
    return POSTGRES_DAILY.format(key=POSTGRES_DAILY_KEYS[key], where="")


def postgres_breakdown_sql(grouped: Grouped) -> str:
    """Money and counts per group, the local bucket by `AT TIME ZONE $2`; `$1` is since."""
    parts = [name for name in grouped.by]
    if grouped.bucket is not None:
        shape = {"day": "YYYY-MM-DD", "hour": "YYYY-MM-DD HH24"}[grouped.bucket]
        parts.append(f"""to_char("timestamp" AT TIME ZONE $2::text, '{shape}')""")
    return POSTGRES_DAILY.format(key=" || ' ' || ".join(parts), where='WHERE "timestamp" >= $1')


# --- the hand-written SQL: ClickHouse ------------------------------------------------------------
#
# Prices per price period, not per action: every instant a price changes (model or credit) is one
# sorted array, computed once; each action's period is how many of them it is at or after, so one
# GROUP BY model, credits and period sums the raw rows, and only those few groups meet the prices in
# force at their period's start (ASOF JOIN of a handful of rows; period 0, before any price, has none:
# unpriced). Tokens are summed as integers and multiplied by their Decimal price once per group, so
# the money is exact; cost is divided by 1e6 once, at 18 places. The mean margin comes from the groups
# too: actions of one credit charge and one price period share revenue, so their margins add up to
# n - cost / revenue. Percentiles: quantilesExactInclusive (NumPy's 'linear') over the successful
# actions, overall and by model in one GROUP BY GROUPING SETS. FINAL: a re-sent action counts once.
# The whole selection's row has model '' (GROUPING SETS' default): no model is empty (check_model).

CLICKHOUSE_PERIODS: Final = """
WITH
    (SELECT arraySort(groupUniqArray(effective_from)) FROM (
        SELECT effective_from FROM model_prices FINAL
        UNION ALL SELECT effective_from FROM credit_prices FINAL)) AS bounds,
groups AS (
    SELECT {keys}model, credits_charged AS credits, arrayCount(b -> b <= timestamp, bounds) AS period,
           count() AS n, sum(tokens_in) AS ti, sum(tokens_out) AS tout,
           sum(cache_read_tokens) AS cr, sum(cache_write_tokens) AS cw, sum(latency_ms) AS lat
    FROM action_metrics FINAL {where}
    GROUP BY {key_group}model, credits, period
),
priced AS (
    SELECT {priced_keys}g.model AS model, g.credits AS credits, g.n AS n, g.ti AS ti, g.tout AS tout,
           g.lat AS lat,
           if(g.period = 0, NULL,
              toDecimal256(g.ti - g.cr - g.cw, 0) * p.input_per_1m
              + toDecimal256(g.cr, 0) * coalesce(p.cache_read_per_1m, p.input_per_1m)
              + toDecimal256(g.cw, 0) * coalesce(p.cache_write_per_1m, p.input_per_1m)
              + toDecimal256(g.tout, 0) * p.output_per_1m) AS cost_e6,
           if(g.period = 0, NULL, c.usd_per_credit) AS c,
           toDecimal256(g.credits, 0) * ifNull(c, toDecimal128(0, 9)) AS unit_revenue,
           unit_revenue * g.n AS revenue
    FROM (SELECT *, bounds[greatest(period, 1)] AS starts, toUInt8(1) AS one FROM groups) AS g
    ASOF LEFT JOIN (SELECT * FROM model_prices FINAL) AS p
        ON g.model = p.model AND g.starts >= p.effective_from
    ASOF LEFT JOIN (SELECT toUInt8(1) AS one, effective_from, usd_per_credit FROM credit_prices FINAL) AS c
        ON g.one = c.one AND g.starts >= c.effective_from
)"""

CLICKHOUSE_AGGREGATE: Final = (
    CLICKHOUSE_PERIODS
    + """,
totals AS (
    SELECT model, sum(n) AS t_n, sum(ti) AS t_ti, sum(tout) AS t_tout, sum(credits * n) AS t_credits,
           sum(lat) / sum(n) AS t_latency, sumIf(n, cost_e6 IS NULL) AS t_unpriced,
           sumIf(n - toFloat64(cost_e6) / toFloat64(unit_revenue * 1000000),
                 unit_revenue > 0 AND cost_e6 IS NOT NULL)
               / sumIf(n, unit_revenue > 0 AND cost_e6 IS NOT NULL) AS t_margin,
           ifNull(sum(cost_e6), 0) AS t_cost_e6, ifNull(sum(revenue), 0) AS t_revenue
    FROM priced
    GROUP BY GROUPING SETS ((model), ())
),
percentiles AS (
    SELECT model, countIf(error IS NULL) AS succeeded,
           quantilesExactInclusiveIf(0.5, 0.95, 0.99)(latency_ms, error IS NULL) AS p
    FROM action_metrics FINAL {where}
    GROUP BY GROUPING SETS ((model), ())
)
SELECT nullIf(t.model, ''), t.t_n, t.t_ti, t.t_tout, t.t_credits, t.t_latency,
       if(q.succeeded > 0, q.p[1], NULL), if(q.succeeded > 0, q.p[2], NULL),
       if(q.succeeded > 0, q.p[3], NULL),
       toDecimal256(t.t_cost_e6, 18) / 1000000, t.t_revenue, t.t_margin,
       if(t.t_revenue > 0,
          toFloat64(t.t_revenue * 1000000 - t.t_cost_e6) / toFloat64(t.t_revenue * 1000000), NULL),
       t.t_unpriced
FROM totals AS t LEFT JOIN percentiles AS q ON q.model = t.model
"""
)

CLICKHOUSE_GROUPED: Final = (
    CLICKHOUSE_PERIODS
    + """
SELECT {key} AS key, toDecimal256(ifNull(sum(cost_e6), 0), 18) / 1000000, ifNull(sum(revenue), 0), sum(n)
FROM priced
GROUP BY key
"""
)

CLICKHOUSE_DAILY_KEYS: Final = {"day": "toDate(timestamp, 'UTC')", "town_id": "town_id", "model": "model"}
CLICKHOUSE_SETTINGS: Final = {
    "join_use_nulls": 1,
    # Copies of one action share its timestamp, hence its month: FINAL within each partition suffices.
    "do_not_merge_across_partitions_select_final": 1,
}


def clickhouse_where(filters: Filters) -> tuple[str, dict[str, Any]]:
    """The WHERE clause and its parameters; only names of columns are formatted in, values are bound."""
    conditions: list[str] = []
    parameters: dict[str, Any] = {}
    for name in EQUALITY_FILTERS:
        if filters.get(name) is not None:
            conditions.append(f"{name} = {{{name}:String}}")
            parameters[name] = filters[name]
    for name, operator in (("since", ">="), ("until", "<")):
        if filters.get(name) is not None:
            conditions.append(f"timestamp {operator} fromUnixTimestamp64Micro({{{name}:Int64}}, 'UTC')")
            parameters[name] = micros(filters[name])
    return (f"WHERE {' AND '.join(conditions)}" if conditions else ""), parameters


def micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def clickhouse_aggregate_sql(filters: Filters) -> tuple[str, dict[str, Any]]:
    where, parameters = clickhouse_where(filters)
    return CLICKHOUSE_AGGREGATE.format(keys="", key_group="", priced_keys="", where=where), parameters


def clickhouse_grouped_sql(keys: Sequence[tuple[str, str]], where: str) -> str:
    """Cost, revenue and count per key: each (SQL over a row, its text from `{}`) joined by spaces."""
    columns = "".join(f"{key} AS k{index}, " for index, (key, _) in enumerate(keys))
    group = "".join(f"k{index}, " for index in range(len(keys)))
    priced = "".join(f"g.k{index} AS k{index}, " for index in range(len(keys)))
    texts = [text.format(f"k{index}") for index, (_, text) in enumerate(keys)]
    separator = ", ' ', "
    key = texts[0] if len(texts) == 1 else f"concat({separator.join(texts)})"
    return CLICKHOUSE_GROUPED.format(keys=columns, key_group=group, priced_keys=priced, where=where, key=key)


def clickhouse_daily_sql(key: str) -> str:
    return clickhouse_grouped_sql([(CLICKHOUSE_DAILY_KEYS[key], "toString({})")], "")


def clickhouse_breakdown_sql(grouped: Grouped) -> str:
    """The local bucket by toStartOfDay/Hour(toTimeZone(timestamp, tz)) (any offset: Kathmandu's
    +05:45, Berlin's changes); `since` and `tz` are bound."""
    keys = [(name, "{}") for name in grouped.by]
    if grouped.bucket is not None:
        start = {"day": "toStartOfDay", "hour": "toStartOfHour"}[grouped.bucket]
        shape = {"day": "%Y-%m-%d", "hour": "%Y-%m-%d %H"}[grouped.bucket]
        keys.append((f"{start}(toTimeZone(timestamp, {{tz:String}}))", f"formatDateTime({{}}, '{shape}')"))
    where = "WHERE timestamp >= fromUnixTimestamp64Micro({since:Int64}, 'UTC')"
    return clickhouse_grouped_sql(keys, where)


DAILY_VIEW_SQL: Final = "SELECT {key}, SUM(cost_usd), SUM(revenue_usd), SUM(count) FROM {view} GROUP BY {key}"


# --- results in one shape ------------------------------------------------------------------------

AGGREGATE_COLUMNS: Final = (
    "model",
    "count",
    "tokens_in",
    "tokens_out",
    "total_credits",
    "avg_latency_ms",
    "p50_latency_ms",
    "p95_latency_ms",
    "p99_latency_ms",
    "total_cost_usd",
    "total_revenue_usd",
    "avg_margin",
    "gross_margin",
    "unpriced_count",
)


def aggregate_from_rows(rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """The hand SQL's rows (model NULL: the whole selection) as `Aggregate.to_dict()` has them."""
    overall: dict[str, Any] = {}
    by_model: dict[str, dict[str, Any]] = {}
    for row in rows:
        values = dict(zip(AGGREGATE_COLUMNS, row, strict=True))
        values = {
            name: float(value) if isinstance(value, Decimal) else value for name, value in values.items()
        }
        if values["model"] is None:
            overall = values
            continue
        by_model[values["model"]] = {
            "count": values["count"],
            "total_tokens": values["tokens_in"] + values["tokens_out"],
            "avg_latency_ms": values["avg_latency_ms"],
            "p95_latency_ms": values["p95_latency_ms"],
            "total_cost_usd": values["total_cost_usd"],
            "unpriced_count": values["unpriced_count"],
        }
    del overall["model"]
    if not overall["count"]:  # an empty selection: averages and margins are None, sums 0
        overall.update(avg_latency_ms=None, avg_margin=None, gross_margin=None)
    overall["total_tokens"] = overall["tokens_in"] + overall["tokens_out"]
    overall["by_model"] = by_model
    return overall


def daily_from_rows(rows: Sequence[Sequence[Any]]) -> dict[str, tuple[Decimal, Decimal, int]]:
    return {
        str(key): (Decimal(str(cost)), Decimal(str(revenue)), int(count))
        for key, cost, revenue, count in rows
    }


# --- the two sides of each backend ---------------------------------------------------------------


class HandSQL:
    """The raw driver's side: hand-written aggregate SQL and the daily view, no SQLAlchemy."""

    name: str

    async def aggregate(self, filters: Filters) -> dict[str, Any]:
        raise NotImplementedError

    async def daily_view(self, key: str, view: str) -> dict[str, tuple[Decimal, Decimal, int]]:
        raise NotImplementedError

    async def daily(self, key: str) -> dict[str, tuple[Decimal, Decimal, int]]:
        raise NotImplementedError

    async def breakdown(
        self, grouped: Grouped, since: datetime | None, until: datetime
    ) -> dict[str, tuple[Decimal, Decimal, int]]:
        """Cost, revenue and count per group key: the `by` values and the local bucket, space-separated."""
        raise NotImplementedError

    async def forget_closed_buckets(self) -> bool:
        """Empty the stored closed buckets, so that the next breakdown computes and stores them all:
        whether this backend stores any (ClickHouse does not)."""
        return False

    async def newest(self) -> datetime | None:
        raise NotImplementedError

    async def explain(self, filters: Filters) -> str:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class SQLiteHandSQL(HandSQL):
    name = "sqlite"

    def __init__(self, path: str) -> None:
        # Autocommit: each SELECT reads its own snapshot, as a pooled SQLAlchemy connection's does.
        self.connection = sqlite3.connect(path, isolation_level=None)
        self.connection.execute("PRAGMA busy_timeout=30000")

    async def aggregate(self, filters: Filters) -> dict[str, Any]:
        sql, parameters = sqlite_aggregate_sql(filters)
        return aggregate_from_rows(self.connection.execute(sql, parameters).fetchall())

    async def daily_view(self, key: str, view: str) -> dict[str, tuple[Decimal, Decimal, int]]:
        return daily_from_rows(self.connection.execute(DAILY_VIEW_SQL.format(key=key, view=view)).fetchall())

    async def daily(self, key: str) -> dict[str, tuple[Decimal, Decimal, int]]:
        parameters = {"since": "", "until": "~"}
        return daily_from_rows(self.connection.execute(sqlite_daily_sql(key), parameters).fetchall())

    async def breakdown(
        self, grouped: Grouped, since: datetime | None, until: datetime
    ) -> dict[str, tuple[Decimal, Decimal, int]]:
        parameters = {"since": sqlite_time(since) if since else "", "until": "~"}
        sql = sqlite_breakdown_sql(grouped, since, until)
        return daily_from_rows(self.connection.execute(sql, parameters).fetchall())

    async def forget_closed_buckets(self) -> bool:
        self.connection.execute(f"DELETE FROM {CLOSED_BUCKETS}")
        return True

    async def newest(self) -> datetime | None:
        (stamp,) = self.connection.execute('SELECT max("timestamp") FROM action_metrics').fetchone()
        return None if stamp is None else datetime.strptime(stamp, SQLITE_TEXT_TIME).replace(tzinfo=UTC)

    async def explain(self, filters: Filters) -> str:
        sql, parameters = sqlite_aggregate_sql(filters)
        plan = self.connection.execute(f"EXPLAIN QUERY PLAN {sql}", parameters).fetchall()
        return "\n".join(f"{row[0]:>5} {row[1]:>5} {row[3]}" for row in plan)

    async def close(self) -> None:
        self.connection.close()


class PostgresHandSQL(HandSQL):
    name = "postgresql"

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    @classmethod
    async def connect(cls, url: str, settings: Mapping[str, str]) -> PostgresHandSQL:
        return cls(await asyncpg.connect(url, server_settings=dict(settings)))

    async def aggregate(self, filters: Filters) -> dict[str, Any]:
        sql, parameters = postgres_aggregate_sql(filters)
        return aggregate_from_rows(await self.connection.fetch(sql, *parameters))

    async def daily_view(self, key: str, view: str) -> dict[str, tuple[Decimal, Decimal, int]]:
        return daily_from_rows(await self.connection.fetch(DAILY_VIEW_SQL.format(key=key, view=view)))

    async def daily(self, key: str) -> dict[str, tuple[Decimal, Decimal, int]]:
        return daily_from_rows(await self.connection.fetch(postgres_daily_sql(key)))

    async def breakdown(
        self, grouped: Grouped, since: datetime | None, until: datetime
    ) -> dict[str, tuple[Decimal, Decimal, int]]:
        since = since or datetime.min.replace(tzinfo=UTC)
        zone = () if grouped.bucket is None else (grouped.tz,)
        rows = await self.connection.fetch(postgres_breakdown_sql(grouped), since, *zone)
        return daily_from_rows(rows)

    async def forget_closed_buckets(self) -> bool:
        await self.connection.execute(f"DELETE FROM {CLOSED_BUCKETS}")
        return True

    async def newest(self) -> datetime | None:
        stamp: datetime | None = await self.connection.fetchval('SELECT max("timestamp") FROM action_metrics')
        return stamp

    async def explain(self, filters: Filters) -> str:
        sql, parameters = postgres_aggregate_sql(filters)
        rows = await self.connection.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *parameters)
        return "\n".join(row[0] for row in rows)

    async def close(self) -> None:
        await self.connection.close()


class ClickHouseHandSQL(HandSQL):
    """Its own clickhouse-connect client on the store's chdb directory: chdb opens one directory per
    process, and a second client of the same directory shares that engine (the store's is untouched)."""

    name = "clickhouse"

    def __init__(self, url: str) -> None:
        import clickhouse_connect

        parts = urlsplit(url)
        database = parse_qs(parts.query).get("database", ["default"])[0]
        self.client = clickhouse_connect.get_client(dsn=f"chdb://{parts.path}", database=database)

    def rows(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Sequence[Sequence[Any]]:
        result = self.client.query(sql, parameters=dict(parameters or {}), settings=CLICKHOUSE_SETTINGS)
        rows: Sequence[Sequence[Any]] = result.result_rows
        return rows

    async def aggregate(self, filters: Filters) -> dict[str, Any]:
        return aggregate_from_rows(self.rows(*clickhouse_aggregate_sql(filters)))

    async def daily_view(self, key: str, view: str) -> dict[str, tuple[Decimal, Decimal, int]]:
        raise NotImplementedError("ClickHouse has no daily views")

    async def daily(self, key: str) -> dict[str, tuple[Decimal, Decimal, int]]:
        return daily_from_rows(self.rows(clickhouse_daily_sql(key)))

    async def breakdown(
        self, grouped: Grouped, since: datetime | None, until: datetime
    ) -> dict[str, tuple[Decimal, Decimal, int]]:
        parameters = {"since": micros(since or CLICKHOUSE_EARLIEST), "tz": grouped.tz}
        return daily_from_rows(self.rows(clickhouse_breakdown_sql(grouped), parameters))

    async def newest(self) -> datetime | None:
        count, newest = self.rows(
            "SELECT count(), toUnixTimestamp64Micro(max(timestamp)) FROM action_metrics"
        )[0]
        return EPOCH + timedelta(microseconds=newest) if count else None

    async def explain(self, filters: Filters) -> str:
        sql, parameters = clickhouse_aggregate_sql(filters)
        return "\n".join(str(row[0]) for row in self.rows(f"EXPLAIN PIPELINE {sql}", parameters))

    async def close(self) -> None:
        self.client.close()


# --- checking that the two sides agree -----------------------------------------------------------


def differences(
    want: Mapping[str, Any],
    got: Mapping[str, Any],
    *,
    where: str = "",
    percentiles_within: float | None = None,
) -> list[str]:
    """What `got` (an API result) gets wrong against `want` (the hand SQL's), one line each.

    Integers exactly, money to 1e-9 USD, the rest to 1e-9 relative; `percentiles_within` loosens
    the percentiles (an approximate aggregate's). Keys only the API has are not compared."""
    found: list[str] = []
    for key, expected in want.items():
        if key not in got:
            found.append(f"{where}{key}: missing from the api's result")
            continue
        actual = got[key]
        label = f"{where}{key}"
        if key == "by_model":
            if set(actual) != set(expected):
                found.append(f"{label}: models {sorted(actual)} != {sorted(expected)}")
                continue
            for model, stats in expected.items():
                found += differences(
                    stats, actual[model], where=f"{label}[{model}].", percentiles_within=percentiles_within
                )
        elif expected is None or actual is None:
            if expected is not actual:
                found.append(f"{label}: api {actual!r} != hand {expected!r}")
        elif isinstance(expected, int) and not isinstance(expected, bool):
            if actual != expected:
                found.append(f"{label}: api {actual!r} != hand {expected!r}")
        elif key.endswith("_usd"):
            if abs(float(actual) - float(expected)) > MONEY_TOLERANCE:
                found.append(
                    f"{label}: api {actual!r} vs hand {expected!r} (off by {actual - expected:.3g} USD)"
                )
        else:
            tolerance = RELATIVE_TOLERANCE
            if percentiles_within is not None and key.endswith("_latency_ms") and key != "avg_latency_ms":
                tolerance = percentiles_within
            if not math.isclose(actual, expected, rel_tol=tolerance, abs_tol=1e-12):
                found.append(
                    f"{label}: api {actual!r} vs hand {expected!r} ({relative_error(actual, expected):.3g})"
                )
    return found


def daily_differences(
    view: Mapping[str, tuple[Decimal, Decimal, int]], hand: Mapping[str, tuple[Decimal, Decimal, int]]
) -> list[str]:
    found: list[str] = []
    if set(view) != set(hand):
        return [f"keys: view has {len(view)}, hand {len(hand)}; e.g. {sorted(set(view) ^ set(hand))[:3]}"]
    for key, (cost, revenue, count) in view.items():
        hand_cost, hand_revenue, hand_count = hand[key]
        if count != hand_count:
            found.append(f"{key}.count: view {count} != hand {hand_count}")
        for name, got, want in (("cost", cost, hand_cost), ("revenue", revenue, hand_revenue)):
            if abs(got - want) > Decimal(MONEY_TOLERANCE) + abs(want) * Decimal("1e-12"):
                found.append(f"{key}.{name}: view {got} vs hand {want} (off by {got - want:.3g} USD)")
    return found


def breakdown_key(row: Any, grouped: Grouped) -> str:
    """A breakdown row's key as the hand SQL writes it: the `by` values, then the local bucket."""
    parts = [row.keys[name] for name in grouped.by]
    if row.bucket_start is not None:
        parts.append(row.bucket_start.strftime({"day": "%Y-%m-%d", "hour": "%Y-%m-%d %H"}[grouped.bucket]))
    return " ".join(parts)


def money_and_count(figures: Any) -> tuple[Decimal, Decimal, int]:
    return Decimal(str(figures.total_cost_usd)), Decimal(str(figures.total_revenue_usd)), figures.count


def relative_error(actual: float, expected: float) -> float:
    return abs(actual - expected) / abs(expected) if expected else abs(actual - expected)


def percentile_error(api: Mapping[str, Any], hand: Mapping[str, Any]) -> float | None:
    """The largest relative error of the api's p50/p95/p99 against the hand SQL's exact ones."""
    errors = [
        relative_error(api[key], hand[key])
        for key in PERCENTILE_KEYS
        if api.get(key) is not None and hand.get(key) is not None
    ]
    return max(errors) if errors else None


# --- timing --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One selection on one backend: median ms per side (None: not available), and the check."""

    backend: str
    selection: Selection
    rows: int
    api_ms: float | None
    """None: the API has no answer here (ClickHouse has no daily view)."""
    exact_ms: float | None
    hand_ms: float
    percentile_error: float | None
    mismatches: list[str]
    groups: int | None = None
    """A breakdown's rows."""
    first_ms: float | None = None
    """A breakdown's first call, which computes and stores its closed buckets (None: it stores none,
    or not a breakdown); `api_ms` then times the calls that read them back."""

    @property
    def check(self) -> str:
        return "n/a" if self.api_ms is None else "mismatch" if self.mismatches else "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "selection": self.selection.name,
            "filters": {key: str(value) for key, value in self.selection.filters.items()},
            "daily_key": self.selection.daily_key,
            "groups": self.groups,
            "actions": self.rows,
            "first_ms": _rounded(self.first_ms),
            "api_ms": _rounded(self.api_ms),  # None on ClickHouse's daily view
            "exact_ms": _rounded(self.exact_ms),
            "hand_ms": _rounded(self.hand_ms),
            "api_over_hand": None if self.api_ms is None else _rounded(self.api_ms / self.hand_ms),
            "exact_over_hand": None if self.exact_ms is None else _rounded(self.exact_ms / self.hand_ms),
            "percentile_error": self.percentile_error,
            "check": self.check,
            "mismatches": self.mismatches,
        }


def _rounded(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 3)


async def timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await call()
    return (time.perf_counter() - started) * 1000, result


class Bench:
    """Times one backend's selections: the store's `aggregate()` and the hand SQL, side by side."""

    def __init__(self, store: AsyncMetricsStore, hand: HandSQL, repeat: int) -> None:
        self.store = store
        self.hand = hand
        self.repeat = repeat
        self.exact_supported: bool | None = None  # unknown until the first call

    async def exact_aggregate(self, filters: Filters) -> Any:
        if self.exact_supported is False:
            return None
        try:
            result = await self.store.aggregate(**filters, exact=True)  # type: ignore[call-arg]
        except TypeError:
            self.exact_supported = False
            return None
        self.exact_supported = True
        return result

    async def run(self, selection: Selection) -> Outcome:
        if selection.daily_key is not None:
            return await self.run_daily(selection, selection.daily_key)
        if selection.grouped is not None:
            return await self.run_breakdown(selection, selection.grouped)
        filters = selection.filters
        sides: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("api", lambda: self.store.aggregate(**filters)),
            ("exact", lambda: self.exact_aggregate(filters)),
            ("hand", lambda: self.hand.aggregate(filters)),
        ]
        times, results = await self.rotate(sides)
        api, hand = results["api"].to_dict(), results["hand"]
        exact = results["exact"].to_dict() if results["exact"] is not None else None
        if exact is not None:
            mismatches = differences(hand, exact)
            mismatches += [
                f"default {line}"
                for line in differences(hand, api, percentiles_within=APPROXIMATE_PERCENTILE_TOLERANCE)
            ]
        else:
            mismatches = differences(hand, api)
        return Outcome(
            backend=self.hand.name,
            selection=selection,
            rows=hand["count"],
            api_ms=statistics.median(times["api"]),
            exact_ms=statistics.median(times["exact"]) if exact is not None else None,
            hand_ms=statistics.median(times["hand"]),
            percentile_error=percentile_error(api, hand),
            mismatches=mismatches,
        )

    async def run_daily(self, selection: Selection, key: str) -> Outcome:
        if isinstance(self.hand, ClickHouseHandSQL):
            return await self.run_without_view(selection, key)
        sides: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("view", lambda: self.hand.daily_view(key, selection.daily_view)),
            ("hand", lambda: self.hand.daily(key)),
        ]
        times, results = await self.rotate(sides)
        return Outcome(
            backend=self.hand.name,
            selection=selection,
            rows=sum(count for _, _, count in results["hand"].values()),
            api_ms=statistics.median(times["view"]),
            exact_ms=None,
            hand_ms=statistics.median(times["hand"]),
            percentile_error=None,
            mismatches=daily_differences(results["view"], results["hand"]),
        )

    async def run_without_view(self, selection: Selection, key: str) -> Outcome:
        """The hand SQL's sums alone: there is no view to compare them with (n/a, not zero)."""
        times, results = await self.rotate([("hand", lambda: self.hand.daily(key))])
        return Outcome(
            backend=self.hand.name,
            selection=selection,
            rows=sum(count for _, _, count in results["hand"].values()),
            api_ms=None,
            exact_ms=None,
            hand_ms=statistics.median(times["hand"]),
            percentile_error=None,
            mismatches=[],
        )

    async def run_breakdown(self, selection: Selection, grouped: Grouped) -> Outcome:
        since = selection.filters.get("since")
        until = await self.hand.newest() or datetime.now(UTC)

        async def hand_cut() -> dict[str, tuple[Decimal, Decimal, int]]:
            return grouped.cut(await self.hand.breakdown(grouped, since, until))

        async def api() -> dict[str, tuple[Decimal, Decimal, int]]:
            rows = await self.store.breakdown(
                grouped.by,
                bucket=grouped.bucket,
                tz=grouped.tz,
                sort=grouped.sort,
                descending=grouped.descending,
                top=grouped.top,
                since=since,
            )
            return {breakdown_key(row, grouped): money_and_count(row.figures) for row in rows}

        sides: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("api", api),
            ("hand", hand_cut),
        ]
        first_ms, first = None, None
        if await self.hand.forget_closed_buckets():  # the first call computes and stores them
            first_ms, first = await timed(api)
        times, results = await self.rotate(sides)
        mismatches = daily_differences(results["api"], results["hand"])
        if first is not None:
            mismatches += [f"first call: {line}" for line in daily_differences(first, results["hand"])]
        return Outcome(
            backend=self.hand.name,
            selection=selection,
            rows=sum(count for _, _, count in results["hand"].values()),
            api_ms=statistics.median(times["api"]),
            exact_ms=None,
            hand_ms=statistics.median(times["hand"]),
            percentile_error=None,
            mismatches=mismatches,
            groups=len(results["api"]),
            first_ms=first_ms,
        )

    async def rotate(
        self, sides: list[tuple[str, Callable[[], Awaitable[Any]]]]
    ) -> tuple[dict[str, list[float]], dict[str, Any]]:
        """Run every side `repeat` times, rotating which goes first, so drift on a shared machine
        hits every side; keep each side's first result for the check."""
        times: dict[str, list[float]] = {name: [] for name, _ in sides}
        results: dict[str, Any] = {}
        for number in range(self.repeat):
            shift = number % len(sides)
            for name, call in sides[shift:] + sides[:shift]:
                elapsed, result = await timed(call)
                times[name].append(elapsed)
                results.setdefault(name, result)
        return times, results


# --- databases -----------------------------------------------------------------------------------


async def postgres_admin(*statements: str) -> None:
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=10)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def postgres_database_exists(name: str) -> bool:
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=10)
    try:
        return bool(await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await connection.close()


def postgres_url(name: str) -> str:
    return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


async def migrate_to_head(url: str) -> None:
    engine = backend_for(url).create_engine()
    try:
        await migrate.run_migrations(engine, migrate.upgrade_to("head"))
    finally:
        await engine.dispose()


async def stored_actions(hand: HandSQL) -> int:
    if isinstance(hand, ClickHouseHandSQL):
        return int(hand.rows("SELECT count() FROM action_metrics FINAL")[0][0])
    if isinstance(hand, SQLiteHandSQL):
        count: int = hand.connection.execute("SELECT count(*) FROM action_metrics").fetchone()[0]
        return count
    assert isinstance(hand, PostgresHandSQL)
    count = await hand.connection.fetchval("SELECT count(*) FROM action_metrics")
    return count


async def load(url: str, arguments: argparse.Namespace, console: Console) -> None:
    """Fill a migrated, empty database through the public API, with prices changing inside the data."""
    end = datetime.now(UTC)
    async with AsyncMetricsStore(url) as store:
        if arguments.price_changes:
            await store.set_model_price(
                "sonnet", "2.50", "12.50", effective_from=end - timedelta(days=30, hours=5, seconds=13.25)
            )
            await store.set_model_price(
                "opus", "12.00", "60.00", effective_from=end - timedelta(days=61, hours=3, minutes=1)
            )
            await store.set_credit_price("0.0055", effective_from=end - timedelta(days=45, minutes=7))
        started = time.perf_counter()
        await store.emit_many(generate(arguments.actions, days=arguments.days, end=end, seed=arguments.seed))
        seconds = time.perf_counter() - started
    console.print(
        f"loaded {arguments.actions:,} actions through emit_many in {seconds:.1f} s"
        f" ({arguments.actions / seconds:,.0f} actions/s)"
    )


async def open_hand(backend: str, url: str, settings: Mapping[str, str] | None = None) -> HandSQL:
    if backend == "sqlite":
        return SQLiteHandSQL(make_url(url).database or "")
    if backend == "clickhouse":
        return ClickHouseHandSQL(url)
    return await PostgresHandSQL.connect(url, settings or {})


def with_settings(url: str, settings: Mapping[str, str]) -> str:
    """The store's URL with PostgreSQL settings for its sessions (libpq's `options`, which the
    package passes on to asyncpg), so both sides run under the same settings."""
    if not settings:
        return url
    options = " ".join(f"-c {name}={value}" for name, value in settings.items())
    return make_url(url).update_query_dict({"options": options}).render_as_string(hide_password=False)


async def database(backend: str, arguments: argparse.Namespace, workdir: Path) -> tuple[str, bool]:
    """The database to measure: (url, whether this run created it and must drop it)."""
    if backend == "sqlite":
        path = Path(arguments.sqlite_path) if arguments.sqlite_path else workdir / "dashboard.db"
        return f"sqlite:///{path}", False
    if backend == "clickhouse":
        directory = Path(arguments.clickhouse_path) if arguments.clickhouse_path else workdir / "chdb"
        return f"chdb://{directory.resolve()}?database={arguments.clickhouse_database}", False
    name = arguments.postgres_db or f"am_bench_dashboard_{uuid.uuid4().hex[:8]}"
    if await postgres_database_exists(name):
        return postgres_url(name), False
    await postgres_admin(f'CREATE DATABASE "{name}"')
    return postgres_url(name), not arguments.postgres_db


async def fill(backend: str, url: str, arguments: argparse.Namespace, console: Console) -> None:
    """Migrate to head, then load unless the database already holds actions (a kept one)."""
    started = time.perf_counter()
    if backend == "clickhouse":
        async with AsyncMetricsStore(url):  # a chdb directory's schema is created on first use
            pass
    else:
        await migrate_to_head(url)
    console.print(f"{backend}: migrated to head in {time.perf_counter() - started:.1f} s")
    hand = await open_hand(backend, url)
    try:
        stored = await stored_actions(hand)
    finally:
        await hand.close()
    if stored:
        console.print(f"{backend}: reusing {stored:,} stored actions in {display(url)}")
        if stored != arguments.actions:
            console.print(
                f"{backend}: [yellow]note: --actions is {arguments.actions:,}, the database has {stored:,}"
            )
        return
    console.print(f"{backend}: loading {arguments.actions:,} actions into {display(url)}")
    await load(url, arguments, console)
    if backend == "postgresql":
        # What autovacuum would soon do: statistics for the planner, hint bits and visibility map set,
        # so every side reads a settled table.
        started = time.perf_counter()
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(
                "VACUUM (ANALYZE) action_metrics, action_metrics_rollup, action_metrics_rollup_detail,"
                " action_metrics_latency_histogram, action_metrics_latency_sketch"
            )
        finally:
            await connection.close()
        console.print(f"{backend}: VACUUM ANALYZE in {time.perf_counter() - started:.1f} s")


def display(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


async def server_facts(hand: HandSQL) -> str:
    if isinstance(hand, SQLiteHandSQL):
        return f"SQLite {sqlite3.sqlite_version}"
    if isinstance(hand, ClickHouseHandSQL):
        (version,) = hand.rows("SELECT version()")[0]
        return f"ClickHouse {version} in process (chdb)"
    assert isinstance(hand, PostgresHandSQL)
    version = await hand.connection.fetchval("SHOW server_version")
    settings = [
        f"{name}={await hand.connection.fetchval(f'SHOW {name}')}"
        for name in ("work_mem", "shared_buffers", "max_parallel_workers_per_gather", "jit")
    ]
    return f"PostgreSQL {version} ({', '.join(settings)})"


# --- output --------------------------------------------------------------------------------------


def milliseconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def ratio(numerator: float | None, denominator: float) -> str:
    return "n/a" if numerator is None else f"{numerator / denominator:.2f}"


def report_table(backend: str, title: str, outcomes: Sequence[Outcome]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("selection")
    for heading in (
        "actions",
        "first ms",
        "api ms",
        "exact ms",
        "hand ms",
        "api/hand",
        "exact/hand",
        "pct err",
    ):
        table.add_column(heading, justify="right")
    table.add_column("check")
    for outcome in outcomes:
        error = outcome.percentile_error
        table.add_row(
            outcome.selection.name,
            f"{outcome.rows:,}",
            "-" if outcome.first_ms is None else milliseconds(outcome.first_ms),
            milliseconds(outcome.api_ms),
            "-" if outcome.exact_ms is None else milliseconds(outcome.exact_ms),
            milliseconds(outcome.hand_ms),
            ratio(outcome.api_ms, outcome.hand_ms),
            "-" if outcome.exact_ms is None else ratio(outcome.exact_ms, outcome.hand_ms),
            "-" if error is None else f"{error:.1e}",
            {"mismatch": "[red bold]MISMATCH", "ok": "[green]ok", "n/a": "n/a"}[outcome.check],
        )
    return table


def progress_line(outcome: Outcome) -> str:
    return (
        f"{outcome.backend:<10} {outcome.selection.name:<24} {outcome.rows:>11,} actions"
        f" | api {milliseconds(outcome.api_ms):>10} ms | exact {milliseconds(outcome.exact_ms):>10} ms"
        f" | hand {milliseconds(outcome.hand_ms):>10} ms | api/hand {ratio(outcome.api_ms, outcome.hand_ms)}"
    )


# --- main ----------------------------------------------------------------------------------------


async def run_backend(
    backend: str, arguments: argparse.Namespace, workdir: Path, console: Console
) -> list[Outcome]:
    url, created = await database(backend, arguments, workdir)
    outcomes: list[Outcome] = []
    try:
        await fill(backend, url, arguments, console)
        outcomes = await measure(backend, url, arguments, console)
    finally:
        if created:
            await postgres_admin(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
    return outcomes


async def measure(backend: str, url: str, arguments: argparse.Namespace, console: Console) -> list[Outcome]:
    settings = arguments.postgres_settings if backend == "postgresql" else {}
    hand = await open_hand(backend, url, settings)
    outcomes: list[Outcome] = []
    try:
        now = await hand.newest()
        if now is None:
            raise SystemExit(f"{backend}: no actions stored in {display(url)}")
        chosen = [
            s for s in selections(now) if not arguments.only or any(o in s.name for o in arguments.only)
        ]
        console.print(f"{backend}: {await server_facts(hand)}; clock: the newest action, {now.isoformat()}")
        async with AsyncMetricsStore(with_settings(url, settings)) as store:
            bench = Bench(store, hand, arguments.repeat)
            for selection in chosen:
                outcome = await bench.run(selection)
                outcomes.append(outcome)
                if arguments.json:
                    print(json.dumps(outcome.to_json()), flush=True)
                console.print(progress_line(outcome), highlight=False)
                for line in outcome.mismatches:
                    console.print(f"[red bold]MISMATCH {backend} {selection.name}: {line}", highlight=False)
                if arguments.explain and selection.daily_key is None and selection.grouped is None:
                    console.print(await hand.explain(selection.filters), highlight=False, markup=False)
        total = await stored_actions(hand)
        title = f"{backend}: {total:,} actions, median of {arguments.repeat} runs"
        console.print(report_table(backend, title, outcomes))
    finally:
        await hand.close()
    return outcomes


async def main(arguments: argparse.Namespace) -> int:
    stream = sys.stderr if arguments.json else sys.stdout
    if arguments.without_sketches:  # breakdown() as before the sketch levels, on the same database
        from action_metrics import sketch_reads

        sketch_reads.shape_of = lambda *_: None  # type: ignore[assignment]
    console = Console(stderr=arguments.json, highlight=False, width=None if stream.isatty() else 150)
    console.print(
        f"action-metrics dashboard bench: {arguments.actions:,} actions over {arguments.days:g} days,"
        f" {arguments.repeat} runs per side, {os.cpu_count()} CPUs, backends {', '.join(arguments.backends)}"
    )
    mismatched = 0
    with tempfile.TemporaryDirectory(prefix="am-dashboard-") as directory:
        for backend in arguments.backends:
            outcomes = await run_backend(backend, arguments, Path(directory), console)
            mismatched += sum(1 for outcome in outcomes if outcome.mismatches)
    if mismatched:
        console.print(f"[red bold]MISMATCH: the hand SQL and the API disagree on {mismatched} selections")
        return 1
    return 0


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--actions", type=int, default=1_000_000, help="actions to load (default 1,000,000)")
    parser.add_argument("--days", type=float, default=90, help="the span the actions cover, ending now")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="the generator's seed")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per side (the median is shown)")
    parser.add_argument(
        "--backends",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=["sqlite", "postgresql"],
        help="comma-separated: sqlite,postgresql,clickhouse (default sqlite,postgresql)",
    )
    parser.add_argument("--sqlite-path", help="SQLite file to keep; reused if it already holds actions")
    parser.add_argument(
        "--postgres-db", help="PostgreSQL database to keep; reused if it already holds actions"
    )
    parser.add_argument(
        "--clickhouse-path", help="chdb directory to keep; reused if its database already holds actions"
    )
    parser.add_argument(
        "--clickhouse-database", default="am_bench_dashboard", help="the database in that directory"
    )
    parser.add_argument(
        "--no-price-changes", dest="price_changes", action="store_false", help="keep the seed's prices"
    )
    parser.add_argument(
        "--only",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=[],
        help="run only selections whose name contains one of these, comma-separated (e.g. 'town-7,daily')",
    )
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout (the tables go to stderr)")
    parser.add_argument(
        "--postgres-setting",
        dest="postgres_settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a PostgreSQL setting for both sides' sessions, e.g. jit=off or work_mem=64MB (repeatable)",
    )
    parser.add_argument(
        "--without-sketches",
        action="store_true",
        help="breakdown() without the sketch levels (as before them), to compare on the same database",
    )
    parser.add_argument(
        "--explain", action="store_true", help="print the hand SQL's plan after each selection (diagnosis)"
    )
    arguments = parser.parse_args(argv)
    unknown = set(arguments.backends) - {"sqlite", "postgresql", "clickhouse"}
    if unknown or not arguments.backends:
        parser.error(
            f"--backends takes sqlite, postgresql, clickhouse, not {', '.join(sorted(unknown)) or 'nothing'}"
        )
    settings = [setting.partition("=") for setting in arguments.postgres_settings]
    if any(not name or not equals or not value for name, equals, value in settings):
        parser.error("--postgres-setting takes NAME=VALUE")
    arguments.postgres_settings = {name.strip(): value.strip() for name, _, value in settings}
    if arguments.actions < 1 or arguments.repeat < 1:
        parser.error("--actions and --repeat must be at least 1")
    return arguments


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
