"""The views' latency percentiles as a dashboard panel reads them, against exact hand-written SQL over
the raw rows, on a kept database (bench/dashboard.py loads one), through the bare driver.

    PYTHONPATH=src python bench/view_percentiles.py --url sqlite:////tmp/am-10m.db
    PYTHONPATH=src python bench/view_percentiles.py --url postgresql://postgres@127.0.0.1/am_bench_10m

Panels: p50 and p95 per day and model over all the days stored (90 at the bench's shape) and over the
last 7, from `action_metrics_daily_by_model`; p95 per day, town and model over the last 7 days and
p50 and p95 over all days, from `action_metrics_daily_by_town`. The hand SQL computes the same
groups' exact percentiles from `action_metrics` (PostgreSQL: `percentile_cont` per group; SQLite:
each row's rank in its group by a window function, the two rows around each fraction's position
interpolated). Per panel: the groups, the median of `--runs` of each side in ms, api/hand, and the
largest relative difference between the two (since migration 0020 the views merge histograms, so
within 1%; at 0017 they sorted raw rows, so equal). A panel whose difference passes 1% exits 1.

For a before/after on the same database, run it, `action-metrics db downgrade 0019 --url URL` (the
views' previous definitions), run it again, `action-metrics db upgrade --url URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import make_url

Key = tuple[str, ...]
Percentiles = dict[Key, tuple[float | None, float | None]]


@dataclass(frozen=True)
class Panel:
    name: str
    view: str
    dimensions: tuple[str, ...]
    last_days: int | None  # None: every day stored


PANELS = (
    Panel("by model, p50+p95 per day, all days", "action_metrics_daily_by_model", ("model",), None),
    Panel("by model, p50+p95 per day, last 7 days", "action_metrics_daily_by_model", ("model",), 7),
    Panel("by town, p50+p95 per day, last 7 days", "action_metrics_daily_by_town", ("town_id", "model"), 7),
    Panel("by town, p50+p95 per day, all days", "action_metrics_daily_by_town", ("town_id", "model"), None),
)


def view_sql(panel: Panel, dialect: str) -> str:
    columns = ", ".join(("day", *panel.dimensions))
    where = ""
    if panel.last_days is not None:
        newest = f"(SELECT max(day) FROM {panel.view})"
        where = (
            f"WHERE day > {newest} - {panel.last_days}"
            if dialect == "postgresql"
            else f"WHERE day > date({newest}, '-{panel.last_days} days')"
        )
    return f"SELECT {columns}, p50_latency_ms, p95_latency_ms FROM {panel.view} {where}"


def hand_sql(panel: Panel, dialect: str) -> str:
    """Exact percentiles of the successful actions per UTC day and group, from the raw rows."""
    dimensions = ", ".join(panel.dimensions)
    if dialect == "postgresql":
        day = "CAST(\"timestamp\" AT TIME ZONE 'UTC' AS date)"
        where = "error IS NULL"
        if panel.last_days is not None:
            where += (
                ' AND "timestamp" >= CAST(CAST((SELECT max("timestamp") FROM action_metrics)'
                f" AT TIME ZONE 'UTC' AS date) - {panel.last_days - 1} AS timestamp) AT TIME ZONE 'UTC'"
            )
        return (
            f"SELECT {day} AS day, {dimensions}, percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),"
            f" percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms)"
            f" FROM action_metrics WHERE {where} GROUP BY 1, {dimensions}"
        )
    where = "error IS NULL"
    if panel.last_days is not None:
        where += (
            f' AND "timestamp" >= date((SELECT max("timestamp") FROM action_metrics),'
            f" '-{panel.last_days - 1} days')"
        )
    partition = f'date("timestamp"), {dimensions}'
    picks = []
    for fraction in (0.5, 0.95):
        position = f"(n - 1) * {fraction}"
        low = f"CAST({position} AS INTEGER)"
        picks.append(
            f"MAX(CASE WHEN r = {low} THEN latency_ms END)"
            f" + ({position} - {low})"
            f" * (COALESCE(MAX(CASE WHEN r = {low} + 1 THEN latency_ms END),"
            f" MAX(CASE WHEN r = {low} THEN latency_ms END)) - MAX(CASE WHEN r = {low} THEN latency_ms END))"
        )
    return (
        f"SELECT day, {dimensions}, {', '.join(picks)} FROM ("
        f' SELECT date("timestamp") AS day, {dimensions}, latency_ms,'
        f" ROW_NUMBER() OVER (PARTITION BY {partition} ORDER BY latency_ms) - 1 AS r,"
        f" COUNT(*) OVER (PARTITION BY {partition}) AS n"
        f" FROM action_metrics WHERE {where}"
        f") GROUP BY day, {dimensions}"
    )


def as_percentiles(rows: Sequence[Sequence[Any]]) -> Percentiles:
    return {
        tuple(str(part) for part in row[:-2]): (
            None if row[-2] is None else float(row[-2]),
            None if row[-1] is None else float(row[-1]),
        )
        for row in rows
    }


def largest_difference(api: Percentiles, hand: Percentiles) -> float:
    """The largest relative difference of a percentile (a group whose every action failed has none:
    it is in the view, NULL, and not in the hand SQL's rows)."""
    worst = 0.0
    for key, got in api.items():
        want = hand.get(key, (None, None))
        for got_value, want_value in zip(got, want, strict=True):
            if got_value is None or want_value is None:
                if got_value != want_value:
                    return float("inf")
                continue
            worst = max(worst, abs(got_value - want_value) / max(abs(want_value), 1e-300))
    return worst


def timed(run: Callable[[], Percentiles], runs: int) -> tuple[float, Percentiles]:
    times, answer = [], {}
    for _ in range(runs):
        started = time.perf_counter()
        answer = run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), answer


async def postgres_runner(url: str) -> tuple[Callable[[str], Percentiles], Callable[[], None]]:
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    await connection.execute("SET jit = off")
    loop = asyncio.get_running_loop()

    def run(sql: str) -> Percentiles:
        return as_percentiles(loop.run_until_complete(connection.fetch(sql)))

    def close() -> None:
        loop.run_until_complete(connection.close())

    return run, close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a kept database (sqlite:///... or postgresql://...)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side per panel (default 3)")
    parser.add_argument("--only", default="", help="panels whose name contains this")
    arguments = parser.parse_args()
    parsed = make_url(arguments.url)
    dialect = parsed.get_backend_name()
    if dialect == "sqlite":
        connection = sqlite3.connect(parsed.database or "")

        def run(sql: str) -> Percentiles:
            return as_percentiles(connection.execute(sql).fetchall())

        close: Callable[[], None] = connection.close
    else:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        run, close = loop.run_until_complete(postgres_runner(arguments.url))
    failed = False
    try:
        for panel in PANELS:
            if arguments.only not in panel.name:
                continue
            api_ms, api = timed(lambda panel=panel: run(view_sql(panel, dialect)), arguments.runs)
            hand_ms, hand = timed(lambda panel=panel: run(hand_sql(panel, dialect)), arguments.runs)
            difference = largest_difference(api, hand)
            failed |= difference > 0.01
            print(
                f"{dialect} {panel.name:42s} {len(api):>7,} groups | view {api_ms:9.1f} ms | "
                f"hand {hand_ms:9.1f} ms | view/hand {api_ms / hand_ms:5.2f} | largest difference "
                f"{difference:.4%}{'  OVER 1%' if difference > 0.01 else ''}",
                flush=True,
            )
    finally:
        close()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
