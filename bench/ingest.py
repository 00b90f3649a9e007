"""Ingest speed of `emit_many` against the raw driver, on the same rows in the same run.

    PYTHONPATH=src python bench/ingest.py                 # 1M metrics, 3 runs per backend, 10M streamed
    PYTHONPATH=src python bench/ingest.py --metrics 100000 --stream 0
    PYTHONPATH=src python bench/ingest.py --backend clickhouse --stream 0   # in process (chdb)

For each backend and run, two fresh databases migrated to head (same table, same indexes) take the
same metrics: one through the raw driver, given rows already in its own format (untimed) and
writing them in one transaction (sqlite3 `executemany` of a plain INSERT; asyncpg binary `COPY`
straight into action_metrics), the other through `AsyncMetricsStore.emit_many`, given the
`ActionMetric` objects and doing all its work: conversion, batches of 20,000 each in its own
transaction, and skipping stored ids. The ratio is emit_many's rows/s over the raw driver's.
On ClickHouse (in process through chdb: one directory for the run, a database per side) the raw side
is the engine's own bulk insert through clickhouse-connect, `client.insert` of the rows' columns in
one call; emit_many inserts batches of 20,000 into the same ReplacingMergeTree.

A third side times the background writer: a producer thread calls `MetricsStore.emit()` for the
same metrics as fast as it can, then `flush()`; the clock runs from the first emit to flush's
return. The store has the library's default buffer and batch size, and the producer respects
back-pressure: when the buffer is nearly full it sleeps 1 ms at a time (what a batch producer
that must not drop does), so `dropped` must be 0; it is printed.

What the metrics look like decides what the rollups cost (see the README): `--shape service` (the
default) is a busy service, a metric every millisecond, so an hour's bucket holds a million actions
and the rollups are small beside them; `--shape dashboard` is bench/shape.py's 10M-actions-over-90-
days product, a metric every 0.78 s, where the hourly rollup of town x action x model is nearly as
large as the raw rows.

The streaming part runs in a child process per backend: `emit_many` draws M metrics from a
generator, and the child reports its peak RSS (the whole process: interpreter, libraries, data).

PostgreSQL: $ACTION_METRICS_BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres)
must allow CREATE DATABASE; the bench drops only the databases it creates.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from pathlib import Path
from typing import Any

import asyncpg
import shape
from sqlalchemy import func, make_url, select

from action_metrics import (
    ACTION_CREDITS,
    ActionMetric,
    ActionType,
    AsyncMetricsStore,
    MetricsStore,
    ModelName,
    migrate,
)
from action_metrics.clickhouse import ClickHouseURL, is_clickhouse_url, upgrade
from action_metrics.dialects import WRITE, backend_for
from action_metrics.ingest import CLICKHOUSE_INGEST_BATCH, INGEST_BATCH, metric_batches
from action_metrics.query import metric_rows
from action_metrics.schema import action_metrics
from action_metrics.writer import (
    CLICKHOUSE_BATCH_SIZE,
    CLICKHOUSE_BUFFER_SIZE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_BUFFER_SIZE,
)

TARGET_RATIO = 0.7
RSS_LIMIT_MB = 300
POSTGRES_ADMIN_URL = os.environ.get(
    "ACTION_METRICS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
COLUMNS = [column.name for column in action_metrics.columns]
START = datetime(2026, 11, 1, tzinfo=UTC)
ACTIONS = [action.value for action in ActionType]
MODELS = [model.value for model in ModelName]


def generate(count: int, seed: int = 5) -> Iterator[ActionMetric]:
    """Metrics as a product records them: in time order, ids by uuid7, a town's mix of users."""
    rng = random.Random(seed)
    for index in range(count):
        action = rng.choice(ACTIONS)
        yield ActionMetric(
            action_type=action,
            user_id=f"user-{rng.randrange(1000)}",
            town_id=f"town-{rng.randrange(50)}",
            citizen_id=f"citizen-{rng.randrange(5000)}" if rng.random() < 0.8 else None,
            tokens_in=rng.randrange(50, 4000),
            tokens_out=rng.randrange(10, 1500),
            model=rng.choice(MODELS),
            latency_ms=rng.lognormvariate(6, 1),
            credits_charged=ACTION_CREDITS.get(action, 1),
            timestamp=START + timedelta(milliseconds=index + rng.random()),
            metadata={"lod": rng.randrange(3, 6), "cached": rng.random() < 0.1} if index % 2 else {},
        )


# --- the raw drivers' rows, made here independently of the package's bulk path -----------------


def sqlite_rows(metrics: Sequence[ActionMetric]) -> list[tuple[Any, ...]]:
    """What SQLAlchemy's types bind on SQLite: hex UUID, 'YYYY-MM-DD HH:MM:SS.ffffff' UTC, JSON text."""
    as_bound = {
        "id": lambda metric: metric.id.hex,
        "timestamp": lambda metric: metric.timestamp.strftime("%Y-%m-%d %H:%M:%S.%f"),
    }
    return _rows(metrics, as_bound)


def postgres_rows(metrics: Sequence[ActionMetric]) -> list[tuple[Any, ...]]:
    """asyncpg's binary COPY takes UUIDs, aware datetimes and jsonb text as they are."""
    return _rows(metrics, {})


def clickhouse_columns(metrics: Sequence[ActionMetric]) -> list[list[Any]]:
    """clickhouse-connect's column-oriented insert takes UUIDs, aware datetimes and the JSON text."""
    return [list(column) for column in zip(*_rows(metrics, {}), strict=True)]


def _rows(
    metrics: Sequence[ActionMetric], as_bound: dict[str, Callable[[ActionMetric], Any]]
) -> list[tuple[Any, ...]]:
    """Each metric as a tuple in COLUMNS' order: the metadata as its JSON text, `as_bound` as given."""
    readers = [
        as_bound.get(name) or attrgetter("metadata_json" if name == "metadata" else name) for name in COLUMNS
    ]
    return [tuple(read(metric) for read in readers) for metric in metrics]


# --- databases ---------------------------------------------------------------------------------


async def migrate_to_head(url: str) -> None:
    engine = backend_for(url).create_engine()
    try:
        await migrate.run_migrations(engine, migrate.upgrade_to("head"))
    finally:
        await engine.dispose()


async def postgres_admin(*statements: str) -> None:
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=10)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


class Databases:
    """Fresh migrated databases of one backend, cloned from a template migrated once."""

    def __init__(self, backend: str, workdir: Path, prefix: str = "am_bench") -> None:
        self.backend = backend
        self.workdir = workdir
        self.prefix = prefix  # of every database made here: a bench's own names, no one else's
        self.created: list[str] = []
        self.template: str | None = None

    async def fresh(self) -> str:
        token = uuid.uuid4().hex[:12]
        if self.backend == "clickhouse":
            # One chdb directory for the whole run (chdb opens one per process), a database per side.
            url = f"chdb://{self.workdir.resolve()}/chdb?database={self.prefix}_{token}"
            await asyncio.to_thread(upgrade, ClickHouseURL.parse(url))
            self.created.append(url)
            return url
        if self.backend == "sqlite":
            if self.template is None:
                self.template = f"sqlite:///{self.workdir / 'template.db'}"
                await migrate_to_head(self.template)
            path = self.workdir / f"{token}.db"
            shutil.copyfile(make_url(self.template).database or "", path)
            return f"sqlite:///{path}"
        if self.template is None:
            self.template = await self._create(f"{self.prefix}_{token}_template")
            await migrate_to_head(self.template)
            token = uuid.uuid4().hex[:12]
        template = make_url(self.template).database
        return await self._create(f"{self.prefix}_{token}", f' TEMPLATE "{template}"')

    async def _create(self, name: str, clause: str = "") -> str:
        await postgres_admin(f'CREATE DATABASE "{name}"{clause}')
        self.created.append(name)
        return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    async def drop(self, url: str) -> None:
        if self.backend == "clickhouse":
            await asyncio.to_thread(clickhouse_command, url, "DROP DATABASE IF EXISTS {database:Identifier}")
            self.created.remove(url)
            return
        database = make_url(url).database or ""
        if self.backend == "sqlite":
            remove_sqlite_files(database)
        elif database in self.created:
            await postgres_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            self.created.remove(database)

    async def drop_all(self) -> None:
        if self.backend == "clickhouse":
            for url in list(self.created):
                await self.drop(url)
        if self.backend == "postgresql" and self.created:
            await postgres_admin(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in self.created))
            self.created.clear()


def remove_sqlite_files(database: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(database + suffix).unlink(missing_ok=True)


async def settle(backend: str) -> None:
    """Start each timed phase from the same state: PostgreSQL's dirty pages written out."""
    if backend == "postgresql":
        await postgres_admin("CHECKPOINT")


def clickhouse_command(url: str, statement: str) -> Any:
    """One statement on the chdb directory of `url`, `{database:Identifier}` bound to its database."""
    target = ClickHouseURL.parse(url)
    client = target.connect(with_database=False)
    try:
        return client.command(statement, parameters={"database": target.database})
    finally:
        client.close()


async def stored_count(url: str) -> int:
    if is_clickhouse_url(url):
        statement = "SELECT count() FROM {database:Identifier}.action_metrics FINAL"
        return int(await asyncio.to_thread(clickhouse_command, url, statement))
    engine = backend_for(url).create_engine()
    try:
        async with engine.connect() as connection:
            return (await connection.execute(select(func.count()).select_from(action_metrics))).scalar_one()
    finally:
        await engine.dispose()


# --- the timed paths ---------------------------------------------------------------------------


async def raw_sqlite(url: str, rows: Sequence[tuple[Any, ...]]) -> float:
    connection = sqlite3.connect(make_url(url).database or "", isolation_level=None)
    try:
        # The project's connect-time settings (dialects.SQLiteBackend), so only the path differs.
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA busy_timeout=30000")
        placeholders = ", ".join("?" * len(COLUMNS))
        statement = f"INSERT INTO action_metrics ({', '.join(COLUMNS)}) VALUES ({placeholders})"
        started = time.perf_counter()
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(statement, rows)
        connection.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        connection.close()


async def raw_postgres(url: str, rows: Sequence[tuple[Any, ...]]) -> float:
    connection = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        async with connection.transaction():
            await connection.copy_records_to_table("action_metrics", records=rows, columns=COLUMNS)
        return time.perf_counter() - started
    finally:
        await connection.close()


async def raw_clickhouse(url: str, columns: Sequence[list[Any]]) -> float:
    client = ClickHouseURL.parse(url).connect()
    try:
        started = time.perf_counter()
        client.insert("action_metrics", columns, column_names=COLUMNS, column_oriented=True)
        return time.perf_counter() - started
    finally:
        client.close()


async def project_path(url: str, metrics: Sequence[ActionMetric]) -> float:
    async with AsyncMetricsStore(url) as store:  # connected and schema-checked before the clock
        started = time.perf_counter()
        await store.emit_many(metrics)
        return time.perf_counter() - started


async def plain_sqlalchemy(url: str, metrics: Sequence[ActionMetric]) -> float:
    """The path before the bulk insert: Core INSERT ... ON CONFLICT DO NOTHING, same batches."""
    return sum(await plain_inserts(url, metric_batches(metrics)))


async def plain_inserts(url: str, batches: Iterable[Sequence[ActionMetric]]) -> list[float]:
    """Each batch written by a Core INSERT ... ON CONFLICT DO NOTHING in a transaction of its own,
    on one connection: the seconds each took."""
    backend = backend_for(url)
    engine = backend.create_engine()
    statement = backend.insert(action_metrics).on_conflict_do_nothing(index_elements=["id"])
    try:
        async with engine.connect() as connection:
            connection = await connection.execution_options(**{WRITE: True})
            times = []
            for batch in batches:
                started = time.perf_counter()
                async with connection.begin():
                    await connection.execute(statement, metric_rows(batch))
                times.append(time.perf_counter() - started)
            return times
    finally:
        await engine.dispose()


BACK_PRESSURE_CHECK = 1_000
"""The producer looks at the writer's backlog every this many emits."""


@dataclass(frozen=True)
class WriterSettings:
    """The writer's sizes; None: the store's default for its backend."""

    buffer_size: int | None = None
    batch_size: int | None = None


def produce(url: str, metrics: Sequence[ActionMetric], settings: WriterSettings) -> tuple[float, int]:
    """Emit every metric from this thread, waiting while the buffer is nearly full, then flush."""
    with MetricsStore(url, buffer_size=settings.buffer_size, batch_size=settings.batch_size) as store:
        writer = store.writer
        full = max(writer.settings.buffer_size - BACK_PRESSURE_CHECK, 1)
        emit = store.emit
        started = time.perf_counter()
        for start in range(0, len(metrics), BACK_PRESSURE_CHECK):
            while writer.pending >= full:
                time.sleep(0.001)  # back-pressure: let the writer catch up rather than drop
            for metric in metrics[start : start + BACK_PRESSURE_CHECK]:
                emit(metric)
        store.flush()
        seconds = time.perf_counter() - started
        return seconds, store.dropped


def writer_path(
    settings: WriterSettings, dropped: list[int]
) -> Callable[[str, Sequence[ActionMetric]], Awaitable[float]]:
    """The writer side; appends each run's `dropped` to `dropped` (a drop also fails the count)."""

    async def path(url: str, metrics: Sequence[ActionMetric]) -> float:
        # The producer is a thread of its own, as in a service; MetricsStore runs its loop in another.
        seconds, run_dropped = await asyncio.to_thread(produce, url, metrics, settings)
        dropped.append(run_dropped)
        return seconds

    return path


@dataclass(frozen=True)
class Run:
    raw_rate: float
    project_rate: float
    writer_rate: float

    @property
    def ratio(self) -> float:
        return self.project_rate / self.raw_rate

    @property
    def writer_ratio(self) -> float:
        return self.writer_rate / self.raw_rate


async def timed(
    databases: Databases, path: Callable[[str, Any], Awaitable[float]], data: Any, expected: int
) -> float:
    url = await databases.fresh()
    try:
        await settle(databases.backend)
        seconds = await path(url, data)
        stored = await stored_count(url)
        if stored != expected:
            raise SystemExit(f"{databases.backend}: stored {stored} rows, expected {expected}")
        return expected / seconds
    finally:
        await databases.drop(url)


async def compare(
    backend: str,
    metrics: Sequence[ActionMetric],
    runs: int,
    plain: bool,
    workdir: Path,
    writer_settings: WriterSettings,
) -> list[Run]:
    raw_path, make_rows = {
        "sqlite": (raw_sqlite, sqlite_rows),
        "postgresql": (raw_postgres, postgres_rows),
        "clickhouse": (raw_clickhouse, clickhouse_columns),
    }[backend]
    raw_name = {
        "sqlite": "raw sqlite3 executemany",
        "postgresql": "raw asyncpg COPY",
        "clickhouse": "raw client.insert columns",
    }[backend]
    rows = make_rows(metrics)
    gc.freeze()  # the 1M objects held for the comparison are not what a streaming producer holds
    databases = Databases(backend, workdir / backend)
    databases.workdir.mkdir()
    results: list[Run] = []
    try:
        dropped: list[int] = []
        sides: list[tuple[str, Callable[[str, Any], Awaitable[float]], Any]] = [
            ("raw", raw_path, rows),
            ("emit_many", project_path, metrics),
            ("writer", writer_path(writer_settings, dropped), metrics),
        ]
        for number in range(1, runs + 1):
            # Rotate which side goes first, so drift on a shared machine hits every side.
            shift = (number - 1) % len(sides)
            rates = {}
            for name, path, data in sides[shift:] + sides[:shift]:
                rates[name] = await timed(databases, path, data, len(metrics))
            run = Run(rates["raw"], rates["emit_many"], rates["writer"])
            results.append(run)
            print(
                f"{backend:<10} run {number}: {raw_name:<24} {run.raw_rate:>9,.0f} rows/s"
                f" | emit_many {run.project_rate:>9,.0f} rows/s, ratio {run.ratio:.2f}"
                f" | writer {run.writer_rate:>9,.0f} rows/s, ratio {run.writer_ratio:.2f},"
                f" dropped {dropped[-1]}",
                flush=True,
            )
        if plain and backend != "clickhouse":  # no SQLAlchemy dialect for ClickHouse here
            rate = await timed(databases, plain_sqlalchemy, metrics, len(metrics))
            print(f"{backend:<10} for reference, the plain SQLAlchemy Core insert: {rate:>9,.0f} rows/s")
    finally:
        await databases.drop_all()
        gc.unfreeze()
    return results


# --- streaming a generator, in a child process so its RSS is its own -----------------------------


async def stream_child(url: str, count: int) -> None:
    async with AsyncMetricsStore(url) as store:
        started = time.perf_counter()
        await store.emit_many(generate(count, seed=7))
        seconds = time.perf_counter() - started
    # Counted here: a chdb directory can be opened by one process only, this one.
    print(f"{peak_rss_mb():.1f} {count / seconds:.0f} {await stored_count(url)}")


def peak_rss_mb() -> float:
    """This process's peak resident set. Linux's ru_maxrss survives exec, so it would count the
    parent's RSS at fork time: read the high-water mark of this process's own memory instead."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kib) / 1024


async def stream(backend: str, count: int, workdir: Path) -> float:
    databases = Databases(backend, workdir / f"{backend}-stream")
    databases.workdir.mkdir()
    if backend == "clickhouse":
        # The child's own chdb directory (this process has another open), created by its store.
        url = f"chdb://{databases.workdir.resolve()}/chdb?database=am_bench_stream"
    else:
        url = await databases.fresh()
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--stream-child", url, str(count), stdout=subprocess.PIPE
        )
        output, _ = await child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"{backend}: the streaming child failed ({child.returncode})")
        peak, rate, counted = output.split()
        peak_mb, rate_per_s, stored = float(peak), float(rate), int(counted)
        verdict = "PASS" if peak_mb < RSS_LIMIT_MB and stored == count else "FAIL"
        print(
            f"{backend:<10} streamed {stored:,} metrics at {rate_per_s:,.0f} rows/s (generation included):"
            f" peak RSS {peak_mb:.0f} MB, target < {RSS_LIMIT_MB} MB: {verdict}",
            flush=True,
        )
        return peak_mb if stored == count else float("inf")
    finally:
        if backend != "clickhouse":
            await databases.drop(url)
        await databases.drop_all()


def _size(chosen: int | None, default: int, clickhouse: int) -> str:
    return f"{chosen:,}" if chosen is not None else f"{default:,} (ClickHouse {clickhouse:,})"


async def main(arguments: argparse.Namespace) -> int:
    if arguments.without_sketches:  # the write path as before the sketch levels, for a comparison
        from action_metrics import latency_sketches, rollup

        latency_sketches.levels_of = lambda grains: ()  # type: ignore[assignment]
        rollup.LEVELS = tuple(level for level in rollup.LEVELS if level is not rollup.HOURLY_BY_TOWN)  # type: ignore[misc]
    buffer = _size(arguments.writer_buffer, DEFAULT_BUFFER_SIZE, CLICKHOUSE_BUFFER_SIZE)
    batch = _size(arguments.writer_batch, DEFAULT_BATCH_SIZE, CLICKHOUSE_BATCH_SIZE)
    print(
        f"action-metrics ingest bench: {arguments.metrics:,} metrics ({arguments.shape} shape),"
        f" {arguments.runs} runs per backend,"
        f" {os.cpu_count()} CPUs, emit_many batches of {INGEST_BATCH:,} (ClickHouse"
        f" {CLICKHOUSE_INGEST_BATCH:,}); writer buffer {buffer}, batches up to {batch}",
        flush=True,
    )
    writer_settings = WriterSettings(arguments.writer_buffer, arguments.writer_batch)
    started = time.perf_counter()
    if arguments.shape == "dashboard":
        days = 90 * arguments.metrics / 10_000_000
        metrics = list(
            shape.generate(arguments.metrics, days=days, end=datetime.now(UTC) - timedelta(hours=1))
        )
    else:
        metrics = list(generate(arguments.metrics))
    print(f"generated {len(metrics):,} metrics in {time.perf_counter() - started:.1f} s\n", flush=True)
    passed = True
    with tempfile.TemporaryDirectory(prefix="am-bench-") as directory:
        workdir = Path(directory)
        for backend in arguments.backend:
            results = await compare(
                backend, metrics, arguments.runs, arguments.plain, workdir, writer_settings
            )
            for side, ratios, rates in (
                ("emit_many", [r.ratio for r in results], [r.project_rate for r in results]),
                ("writer", [r.writer_ratio for r in results], [r.writer_rate for r in results]),
            ):
                median = statistics.median(ratios)
                verdict = "PASS" if median >= TARGET_RATIO else "FAIL"
                passed &= median >= TARGET_RATIO
                print(
                    f"{backend:<10} {side:<9} ratio median {median:.2f} (min {min(ratios):.2f},"
                    f" max {max(ratios):.2f}); raw {statistics.median(r.raw_rate for r in results):,.0f}"
                    f" rows/s, {side} {statistics.median(rates):,.0f} rows/s; target >= {TARGET_RATIO}:"
                    f" {verdict}",
                    flush=True,
                )
            print(flush=True)
        del metrics
        if arguments.stream:
            print(f"streaming {arguments.stream:,} metrics from a generator through emit_many:", flush=True)
            for backend in arguments.backend:
                passed &= await stream(backend, arguments.stream, workdir) < RSS_LIMIT_MB
    return 0 if passed else 1


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--metrics", type=int, default=1_000_000, help="metrics per timed run")
    parser.add_argument("--runs", type=int, default=3, help="paired runs per backend")
    parser.add_argument(
        "--shape",
        choices=["service", "dashboard"],
        default="service",
        help="service: a metric every millisecond; dashboard: bench/shape.py's, one every 0.78 s",
    )
    parser.add_argument("--stream", type=int, default=10_000_000, help="metrics to stream (0: skip)")
    parser.add_argument(
        "--writer-buffer", type=int, help="the writer's buffer_size (default: the store's for the backend)"
    )
    parser.add_argument(
        "--writer-batch", type=int, help="the writer's batch_size (default: the store's for the backend)"
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=["sqlite", "postgresql", "clickhouse"],
        help="default: sqlite and postgresql (clickhouse: in process, chdb)",
    )
    parser.add_argument(
        "--without-sketches",
        action="store_true",
        help="write no sketches and no hourly sums per town (the write path before them)",
    )
    parser.add_argument(
        "--no-plain", dest="plain", action="store_false", help="skip the plain SQLAlchemy reference"
    )
    arguments = parser.parse_args(argv)
    arguments.backend = arguments.backend or ["sqlite", "postgresql"]
    return arguments


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stream-child"]:
        asyncio.run(stream_child(sys.argv[2], int(sys.argv[3])))
    else:
        sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
