"""Small late batches: what `emit_many` costs for metrics that land in buckets already closed.

    PYTHONPATH=src python bench/late_batches.py                        # SQLite and PostgreSQL
    PYTHONPATH=src python bench/late_batches.py --backend sqlite --batches 100 --size 50

A store first takes `--days` days of history (a metric every 7 minutes, in time order), which
closes their hours and days. Then `--batches` batches of `--size` metrics each arrive late, each
batch inside one closed hour of that history (a retried upload, a queue drained after an outage,
the HTTP endpoint's requests): every one of them adds its metrics to the closed rollups, sketches
and user rows in its own transaction. The reference is the same rows written by a plain SQLAlchemy
Core INSERT ... ON CONFLICT DO NOTHING in a transaction of their own, into a second database that
holds the same history: the cost of storing the rows without keeping any rollup. Per backend:
the median and p90 ms per batch of both, and their ratio (emit_many over plain: how many times the
plain write the whole late batch costs).

PostgreSQL: $ACTION_METRICS_BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres)
must allow CREATE DATABASE; the bench drops the databases it creates.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from ingest import plain_inserts
from sqlalchemy import make_url

from action_metrics import ActionMetric, AsyncMetricsStore, migrate
from action_metrics.dialects import backend_for

POSTGRES_ADMIN_URL = os.environ.get(
    "ACTION_METRICS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
NOW = datetime(2026, 11, 29, tzinfo=UTC)


def one(at: datetime, serial: int) -> ActionMetric:
    return ActionMetric(
        action_type=("lod3", "lod4", "dialogue")[serial % 3],
        user_id=f"user-{serial % 40}",
        town_id=f"town-{serial % 5}",
        citizen_id=f"citizen-{serial % 90}",
        tokens_in=100 + serial % 400,
        tokens_out=20 + serial % 150,
        model=("haiku", "sonnet", "opus")[serial % 3],
        latency_ms=50.0 + (serial * 37) % 900,
        credits_charged=(1, 10, 100)[serial % 3],
        timestamp=at,
    )


def history(days: int) -> list[ActionMetric]:
    start = NOW - timedelta(days=days)
    return [one(start + timedelta(minutes=7 * n), n) for n in range(days * 24 * 60 // 7)]


def late_batches(days: int, batches: int, size: int) -> list[list[ActionMetric]]:
    """Batch b inside the closed hour b hours after the history's start (a minute apart)."""
    start = NOW - timedelta(days=days)
    return [
        [
            one(start + timedelta(hours=b % (days * 24 - 2), minutes=1 + m), 10_000 + b * size + m)
            for m in range(size)
        ]
        for b in range(batches)
    ]


async def migrated(backend: str, workdir: Path) -> str:
    if backend == "sqlite":
        url = f"sqlite:///{workdir / f'{uuid.uuid4().hex}.db'}"
    else:
        database = f"am_bench_late_{uuid.uuid4().hex[:10]}"
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            await connection.execute(f'CREATE DATABASE "{database}"')
        finally:
            await connection.close()
        url = make_url(POSTGRES_ADMIN_URL).set(database=database).render_as_string(hide_password=False)
    engine = backend_for(url).create_engine()
    try:
        await migrate.run_migrations(engine, migrate.upgrade_to("head"))
    finally:
        await engine.dispose()
    return url


async def drop(url: str) -> None:
    if url.startswith("postgresql"):
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
        finally:
            await connection.close()


async def through_the_store(
    url: str, past: list[ActionMetric], batches: Sequence[list[ActionMetric]]
) -> list[float]:
    async with AsyncMetricsStore(url) as store:
        await store.emit_many(past)
        times = []
        for batch in batches:
            started = time.perf_counter()
            await store.emit_many(batch)
            times.append(time.perf_counter() - started)
        return times


async def plain(url: str, past: list[ActionMetric], batches: Sequence[list[ActionMetric]]) -> list[float]:
    async with AsyncMetricsStore(url) as store:  # the same history, so the same table size
        await store.emit_many(past)
    return await plain_inserts(url, batches)


def summary(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered) * 1000, ordered[int(0.9 * (len(ordered) - 1))] * 1000


async def main(arguments: argparse.Namespace) -> int:
    past = history(arguments.days)
    batches = late_batches(arguments.days, arguments.batches, arguments.size)
    print(
        f"late batches: {len(past):,} metrics of history over {arguments.days} days, then"
        f" {arguments.batches} batches of {arguments.size} late metrics, each in a closed hour"
    )
    with tempfile.TemporaryDirectory() as workdir:
        for backend in arguments.backend:
            urls = [await migrated(backend, Path(workdir)) for _ in range(2)]
            try:
                emitted = summary(await through_the_store(urls[0], past, batches))
                written = summary(await plain(urls[1], past, batches))
            finally:
                for url in urls:
                    await drop(url)
            print(
                f"{backend:10} emit_many median {emitted[0]:7.1f} ms, p90 {emitted[1]:7.1f} ms |"
                f" plain INSERT median {written[0]:6.1f} ms, p90 {written[1]:6.1f} ms |"
                f" ratio {emitted[0] / written[0]:5.1f}"
            )
    return 0


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--days", type=int, default=3, help="days of history, closed before the late batches")
    parser.add_argument("--batches", type=int, default=60, help="late batches timed")
    parser.add_argument("--size", type=int, default=10, help="metrics per late batch")
    parser.add_argument("--backend", action="append", choices=["sqlite", "postgresql"])
    arguments = parser.parse_args(argv)
    arguments.backend = arguments.backend or ["sqlite", "postgresql"]
    return arguments


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
