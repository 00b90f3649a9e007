"""What an action costs ClickHouse (in process, chdb), the inputs of the README's three-node
cluster on paper: bytes on disk per action in every table, CPU time per action of an insert, and
CPU and wall time of the dashboard's reads. CPU time is this process's (chdb runs in it, so its
threads count), read with `getrusage` around each call.

    PYTHONPATH=src python bench/dashboard.py --backends clickhouse --actions 10000000 \\
        --clickhouse-path /tmp/ch10m --repeat 1               # loads the directory once
    PYTHONPATH=src python bench/clickhouse_costs.py --clickhouse-path /tmp/ch10m

The inserts go into a database of their own in the same directory (dropped afterwards): the raw
insert of the rows' columns, as bench/ingest.py times it, and `emit_many`.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from ingest import clickhouse_columns, generate, raw_clickhouse
from rich.console import Console
from rich.table import Table

from action_metrics import AsyncMetricsStore
from action_metrics.clickhouse import ClickHouseURL

console = Console()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measured(call: Callable[[], Awaitable[Any]], repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `repeat` calls, after one untimed."""
    await call()
    walls, cpus = [], []
    for _ in range(repeat):
        cpu, wall = cpu_seconds(), time.perf_counter()
        await call()
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def storage(url: str) -> int:
    """Print each table's rows and bytes on disk per action; the actions counted."""
    client = ClickHouseURL.parse(url).connect()
    try:
        actions = client.query("SELECT count() FROM action_metrics FINAL").result_rows[0][0]
        rows = client.query(
            "SELECT table, sum(rows), sum(bytes_on_disk) FROM system.parts"
            " WHERE active AND database = currentDatabase() GROUP BY table ORDER BY 3 DESC"
        ).result_rows
    finally:
        client.close()
    table = Table(title=f"bytes on disk per action ({actions:,} actions)")
    for column in ("table", "rows", "MB", "bytes per action"):
        table.add_column(column, justify="left" if column == "table" else "right")
    for name, count, size in rows:
        table.add_row(name, f"{count:,}", f"{size / 1e6:,.1f}", f"{size / max(actions, 1):.1f}")
    total = sum(size for _, _, size in rows)
    table.add_row("all", "", f"{total / 1e6:,.1f}", f"{total / max(actions, 1):.1f}")
    console.print(table)
    return int(actions)


async def reads(url: str, repeat: int) -> None:
    async with AsyncMetricsStore(url) as store:
        newest = (await store.query(limit=1))[0].timestamp
        ninety = {"since": newest - timedelta(days=90)}
        questions: dict[str, Callable[[], Awaitable[Any]]] = {
            "aggregate(), all time": lambda: store.aggregate(),
            "aggregate(exact=True), all time": lambda: store.aggregate(exact=True),
            "per Berlin day, 90d": lambda: store.breakdown(bucket="day", tz="Europe/Berlin", **ninety),
            "by town x Berlin day, 90d": lambda: store.breakdown(
                "town_id", bucket="day", tz="Europe/Berlin", **ninety
            ),
            "by user, all time": lambda: store.breakdown("user_id"),
        }
        table = Table(title=f"reads, median of {repeat}")
        for column in ("question", "wall ms", "CPU ms", "cores busy"):
            table.add_column(column, justify="left" if column == "question" else "right")
        for name, call in questions.items():
            wall, cpu = await measured(call, repeat)
            table.add_row(name, f"{wall * 1000:,.0f}", f"{cpu * 1000:,.0f}", f"{cpu / wall:.2f}")
        console.print(table)


async def inserts(url: str, count: int, runs: int) -> None:
    metrics = list(generate(count))
    columns = clickhouse_columns(metrics)
    base = ClickHouseURL.parse(url)
    table = Table(title=f"one insert of {count:,} actions, {runs} runs each")
    for column in ("path", "actions/s", "CPU us per action", "cores busy"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for run in range(-1, runs):  # run -1 warms the paths up, untimed (a first insert pays more)
        for name in ("raw client.insert", "emit_many"):
            database = f"am_bench_costs_{uuid.uuid4().hex[:8]}"
            target = url.replace(f"database={base.database}", f"database={database}")
            async with AsyncMetricsStore(target) as store:
                await store.open()  # the schema made before the clock
                cpu, wall = cpu_seconds(), time.perf_counter()
                if name == "emit_many":
                    await store.emit_many(metrics)
                else:
                    await raw_clickhouse(target, columns)
                wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            client = ClickHouseURL.parse(target).connect(with_database=False)
            try:
                client.command(f"DROP DATABASE IF EXISTS `{database}`")
            finally:
                client.close()
            if run >= 0:
                rate, per_action = f"{count / wall:,.0f}", f"{cpu / count * 1e6:.1f}"
                table.add_row(f"{name} (run {run + 1})", rate, per_action, f"{cpu / wall:.2f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clickhouse-path", required=True, help="a chdb directory bench/dashboard.py loaded")
    parser.add_argument("--clickhouse-database", default="am_bench_dashboard")
    parser.add_argument("--metrics", type=int, default=300_000, help="actions per timed insert")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per read, inserts per path")
    arguments = parser.parse_args()
    url = f"chdb://{arguments.clickhouse_path}?database={arguments.clickhouse_database}"
    storage(url)
    asyncio.run(reads(url, arguments.repeat))
    asyncio.run(inserts(url, arguments.metrics, arguments.repeat))


if __name__ == "__main__":
    main()
