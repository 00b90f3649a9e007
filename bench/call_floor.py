"""The fixed cost of one read through the library's async stack, against the raw driver, on one file.

    PYTHONPATH=src python bench/call_floor.py /tmp/am-1m.db    # a SQLite store (bench/dashboard.py's)

`aggregate(exact=True)` of a small selection runs a few statements in one snapshot through
SQLAlchemy's async engine and aiosqlite; the hand-written SQL it is compared with in
bench/dashboard.py runs one statement through `sqlite3` directly. Below a few milliseconds that
difference is the stack's, not the SQL's. In one run, median of `--runs` calls each, ms:
- raw: one indexed count through `sqlite3` (the floor of the hand side);
- engine, one statement: the same SQL through `create_async_engine("sqlite+aiosqlite://")`;
- engine, snapshot of four: BEGIN, the same statement four times, COMMIT (what a read in a snapshot
  with its state, prices and figures costs before any of its SQL does work);
- aggregate(exact=True): town-7 since the newest action's UTC midnight, through `AsyncMetricsStore`.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from action_metrics import AsyncMetricsStore

COUNT = "SELECT count(*) FROM action_metrics WHERE town_id = :town AND timestamp >= :since"


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def _timed(call: Callable[[], Awaitable[object]], runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return _median_ms(samples)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", help="a SQLite store's file")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--town", default="town-7")
    arguments = parser.parse_args()

    async with AsyncMetricsStore(f"sqlite:///{arguments.path}") as store:
        newest = (await store.query(limit=1))[0].timestamp
        midnight = newest.replace(hour=0, minute=0, second=0, microsecond=0)
        parameters = {"town": arguments.town, "since": _stored(midnight)}

        connection = sqlite3.connect(arguments.path)
        raw_samples = []
        for _ in range(arguments.runs):
            started = time.perf_counter()
            connection.execute(COUNT, parameters).fetchall()  # sqlite3 binds :name from a dict too
            raw_samples.append(time.perf_counter() - started)
        connection.close()

        engine = create_async_engine(f"sqlite+aiosqlite:///{arguments.path}")

        async def one() -> None:
            async with engine.connect() as c:
                (await c.execute(text(COUNT), parameters)).all()

        async def snapshot() -> None:
            async with engine.connect() as c, c.begin():
                for _ in range(4):
                    (await c.execute(text(COUNT), parameters)).all()

        async def exact() -> None:
            await store.aggregate(town_id=arguments.town, since=midnight, exact=True)

        figures = {
            "raw sqlite3, one statement": _median_ms(raw_samples),
            "async engine, one statement": await _timed(one, arguments.runs),
            "async engine, snapshot of four": await _timed(snapshot, arguments.runs),
            "aggregate(exact=True), town today": await _timed(exact, arguments.runs),
        }
        await engine.dispose()
    reference = figures["raw sqlite3, one statement"]
    for name, ms in figures.items():
        print(f"{name:36} {ms:8.3f} ms   {ms / reference:8.1f}x raw")


def _stored(moment: datetime) -> str:
    """The instant as the SQLite store writes timestamps (ISO text, compared as text)."""
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


if __name__ == "__main__":
    asyncio.run(main())
