"""`aggregate()` over all time per subject on a kept database: a first call, then the median of five.

For an A/B of two code versions on the same database (how the README's "Monthly levels" and "The day
being filled" tables were measured): run it with one version's `src` on `PYTHONPATH`, migrate, run it
with the other's. `--reclose` migrates to this code's head without the build `db upgrade` runs (which
closes every bucket up to now) and closes the buckets up to the newest action only, as the writers
had left them, so that both sides read the same open hour:

    PYTHONPATH=<previous>/src python bench/all_time.py --url URL    # the previous code (a worktree)
    PYTHONPATH=src python bench/all_time.py --url URL --reclose     # migrate, close as writers had
    PYTHONPATH=src python bench/all_time.py --url URL               # this code
    action-metrics db downgrade <previous head> --url URL           # and round again

It prints milliseconds per question, not a ratio: the reference is the other version's run on the
same database (bench/dashboard.py gives each question's ratio to hand-written SQL).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from sqlalchemy import func, select

from action_metrics import MetricsStore, migrate, rollup
from action_metrics.dialects import backend_for
from action_metrics.repository import MetricsRepository
from action_metrics.schema import action_metrics

SUBJECTS: dict[str, dict[str, Any]] = {
    "everything": {},
    "lod3": {"action_type": "lod3"},
    "town-7": {"town_id": "town-7"},
    "sonnet": {"model": "sonnet"},
    "user-7": {"user_id": "user-7"},
    "citizen-7": {"citizen_id": "citizen-7"},
}


async def reclose(url: str) -> None:
    """Migrate to head, then close the buckets up to the newest action (less the writers' delay)."""
    backend = backend_for(url)
    engine = backend.create_engine()
    try:
        await migrate.run_migrations(engine, migrate.upgrade_to("head"))
        async with engine.connect() as connection:
            newest = (await connection.execute(select(func.max(action_metrics.c.timestamp)))).scalar()
        repository = MetricsRepository(engine, backend)
        started = time.perf_counter()
        state = await rollup.build(repository._write_transaction, backend, now=newest)
        seconds = time.perf_counter() - started
        print(f"closed to {state.hours_closed_until} (days {state.days_closed_until}) in {seconds:.1f} s")
    finally:
        await engine.dispose()


def measure(url: str, runs: int) -> None:
    with MetricsStore(url) as store:
        store.aggregate()  # the store opened, its state read once
        for name, filters in SUBJECTS.items():
            started = time.perf_counter()
            store.aggregate(**filters)
            first = (time.perf_counter() - started) * 1000
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                store.aggregate(**filters)
                times.append((time.perf_counter() - started) * 1000)
            print(f"{name:10s} first {first:7.1f} ms   median of {runs} {statistics.median(times):7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the kept database (bench/dashboard.py loads one)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls after the first (default 5)")
    parser.add_argument(
        "--reclose", action="store_true", help="migrate to head and close to the newest action only"
    )
    arguments = parser.parse_args()
    if arguments.reclose:
        asyncio.run(reclose(arguments.url))
    else:
        measure(arguments.url, arguments.runs)


if __name__ == "__main__":
    main()
