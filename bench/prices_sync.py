"""`prices sync` against the naive way of finding the models seen, same database.

    PYTHONPATH=src python bench/prices_sync.py                       # 1M actions, both backends
    PYTHONPATH=src python bench/prices_sync.py --actions 200000 --backends sqlite

N actions of 12 real model names (and the seed's 5), evenly over the last 60 days, go into a fresh
database through `AsyncMetricsStore.emit_many` (so the rollups are closed up to the newest hour).
Then, per backend, the median of `--repeat` runs in ms of:
- sync: `store.sync_prices()`: the models seen (rollups plus the raw rows of open hours), the
  catalogue's lookup of each, and one write transaction of their prices;
- distinct: `SELECT DISTINCT model FROM action_metrics` through the raw driver (sqlite3, asyncpg),
  what a sync reading the raw table would pay for its first step alone;
- sync/distinct: below 1, the sync costs less than that one scan.
The first sync writes the prices; the timed ones rewrite the same rows.

PostgreSQL: $ACTION_METRICS_BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres)
must allow CREATE DATABASE; the bench drops the database it created.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from sqlalchemy import make_url

from action_metrics import ActionMetric, AsyncMetricsStore
from action_metrics.dialects import backend_for
from action_metrics.migrate import upgrade_to
from action_metrics.repository import MetricsRepository

POSTGRES_ADMIN_URL = os.environ.get(
    "ACTION_METRICS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
MODELS = (
    "gpt-4o-mini-2024-07-18",
    "gpt-4o-2024-08-06",
    "openai/gpt-4o-mini",
    "o3",
    "o3-mini",
    "gpt-5",
    "claude-sonnet-4-5-20250929",
    "anthropic/claude-sonnet-4.5",
    "claude-3-5-haiku-20241022",
    "claude-opus-4-1-20250805",
    "claude-sonnet-4-6",
    "our-own-fine-tune",
    "haiku",
    "sonnet",
    "opus",
    "template",
    "cached",
)


def actions(count: int, now: datetime) -> Iterator[ActionMetric]:
    rng = random.Random(7)
    span = timedelta(days=60).total_seconds()
    for number in range(count):
        tokens_in = rng.randint(10, 20_000)
        yield ActionMetric(
            action_type="chat",
            user_id=f"user-{number % 1000}",
            town_id=f"town-{number % 50}",
            citizen_id=f"citizen-{number % 5000}",
            tokens_in=tokens_in,
            cache_read_tokens=rng.randint(0, tokens_in),
            tokens_out=rng.randint(0, 2_000),
            model=MODELS[number % len(MODELS)],
            latency_ms=rng.uniform(50, 3000),
            credits_charged=10,
            timestamp=now - timedelta(seconds=span * number / count),
        )


async def timed(run: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await run()
    return (time.perf_counter() - start) * 1000


async def bench(url: str, count: int, repeat: int, distinct: Callable[[], Awaitable[object]]) -> None:
    async with AsyncMetricsStore(url) as store:
        start = time.perf_counter()
        await store.emit_many(actions(count, datetime.now(UTC)))
        print(f"  loaded {count:,} actions in {time.perf_counter() - start:.1f} s")
        first = await store.sync_prices()
        print(
            f"  first sync: {len(first.lookup.found)} models priced by the catalogue, "
            f"{len(first.unpriced)} unpriced ({', '.join(first.unpriced)})"
        )
        syncs, scans = [], []
        for _ in range(repeat):
            syncs.append(await timed(store.sync_prices))
            scans.append(await timed(distinct))
    sync_ms, scan_ms = statistics.median(syncs), statistics.median(scans)
    print(f"  sync {sync_ms:.0f} ms, distinct {scan_ms:.0f} ms, sync/distinct {sync_ms / scan_ms:.2f}")


async def on_sqlite(count: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "prices.db"

        async def distinct() -> object:
            with sqlite3.connect(path) as connection:
                return connection.execute("SELECT DISTINCT model FROM action_metrics").fetchall()

        await bench(f"sqlite:///{path}", count, repeat, distinct)


async def on_postgres(count: int, repeat: int) -> None:
    name = f"am_bench_prices_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        backend = backend_for(url)
        repository = MetricsRepository(backend.create_engine(), backend)
        await repository.run_migrations(upgrade_to("head"))
        await repository.close()

        async def distinct() -> object:
            connection = await asyncpg.connect(url)
            try:
                return await connection.fetch("SELECT DISTINCT model FROM action_metrics")
            finally:
                await connection.close()

        await bench(url, count, repeat, distinct)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--actions", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    arguments = parser.parse_args()
    for backend in arguments.backends:
        print(f"{backend}:")
        run = on_sqlite if backend == "sqlite" else on_postgres
        asyncio.run(run(arguments.actions, arguments.repeat))


if __name__ == "__main__":
    main()
