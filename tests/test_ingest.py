"""The bulk ingest path stores exactly what the plain SQLAlchemy INSERT stores, once per id, per batch.

Every comparison reads back two fresh databases of the same backend: one written through the
driver's bulk path (COPY on PostgreSQL, executemany on SQLite), one through the plain
`INSERT ... ON CONFLICT DO NOTHING` that SQLAlchemy's column types bind.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Text, cast, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from action_metrics import ActionMetric, AsyncMetricsStore, DataRejected, MetricsStore
from action_metrics.dialects import WRITE, Backend, backend_for
from action_metrics.ingest import INGEST_BATCH, metric_batches
from action_metrics.query import metric_rows
from action_metrics.schema import action_metrics
from action_metrics.validation import MAX_LATENCY_MS

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
MODELS = ["haiku", "sonnet", "claude-sonnet-4-5@20250929", "openai/gpt-4o-mini", "unpriced-model"]


def varied_metrics(count: int, start: datetime = NOW, *, extremes: bool = True) -> list[ActionMetric]:
    """Metrics that exercise every column's storage: odd text, NULLs, nested metadata, and (the
    first few, with `extremes`) the limits of each type."""
    specials: list[dict[str, Any]] = [
        # The first and last instants a datetime holds are refused (PostgreSQL's driver writes them as
        # -infinity and infinity): one microsecond inside them.
        {"timestamp": datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC)},
        {"timestamp": datetime(9999, 12, 31, 23, 59, 59, 999998, tzinfo=UTC)},
        {"timestamp": datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=5, minutes=30)))},
        {"timestamp": datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC)},
        {"tokens_in": 2**63 - 1, "tokens_out": 0, "credits_charged": 2**63 - 1},
        {"latency_ms": 0.0},
        {"latency_ms": 0.000123},
        {"latency_ms": MAX_LATENCY_MS},
        {
            "tokens_in": 900,
            "cache_read_tokens": 600,
            "cache_write_tokens": 300,
            "tokens_out": 7,
            "reasoning_tokens": 7,
        },
        {"user_id": 'o\'brien "quoted" \\ % _ ; --', "citizen_id": None},
        {"town_id": "町-ü-😀", "metadata": {"text": "é 😀 \u2028", "list": [1, 2.5, None, True, "x"]}},
        {"metadata": {"nested": {"deeper": {"value": -0.0, "big": 12345678901234567890}}}},
        {"metadata": {"float": 0.1, "exp": 1e-7, "empty": {}, "empty_list": []}},
    ]
    metrics = []
    for index in range(count):
        fields: dict[str, Any] = {
            "action_type": ["lod3", "dialogue", "trade", "custom.action-1"][index % 4],
            "user_id": f"user-{index % 37}",
            "town_id": f"town-{index % 5}",
            "citizen_id": f"citizen-{index % 101}" if index % 3 else None,
            "tokens_in": index * 7 % 5000,
            "tokens_out": index * 3 % 2000,
            "model": MODELS[index % len(MODELS)],
            "latency_ms": index % 997 + 0.25,
            "credits_charged": index % 30,
            "timestamp": start + timedelta(milliseconds=index * 1.5),
            "metadata": {"lod": index % 5, "seq": index} if index % 2 else {},
        }
        if extremes and index < len(specials):
            fields.update(specials[index])
        metrics.append(ActionMetric(**fields))
    return metrics


def bulk_size(backend: Backend) -> int:
    """A batch the repository sends through the bulk path."""
    return max(backend.bulk_insert_minimum, len(varied_metrics(0)) + 40)


@asynccontextmanager
async def write_transaction(url: str) -> AsyncIterator[tuple[Backend, AsyncConnection]]:
    """A transaction as the repository opens one (SQLite: BEGIN IMMEDIATE), on a fresh engine."""
    backend = backend_for(url)
    engine = backend.create_engine()
    try:
        async with engine.connect() as connection:
            connection = await connection.execution_options(**{WRITE: True})
            async with connection.begin():
                yield backend, connection
    finally:
        await engine.dispose()


async def insert_in_bulk(url: str, metrics: Sequence[ActionMetric]) -> None:
    async with write_transaction(url) as (backend, connection):
        await backend.bulk_insert_metrics(connection, metrics)


async def insert_plainly(url: str, metrics: Sequence[ActionMetric]) -> None:
    """The plain path: SQLAlchemy's INSERT ... ON CONFLICT (id) DO NOTHING, its types binding values."""
    async with write_transaction(url) as (backend, connection):
        statement = backend.insert(action_metrics).on_conflict_do_nothing(index_elements=["id"])
        await connection.execute(statement, metric_rows(metrics))


async def stored_rows(url: str) -> list[tuple[str | None, ...]]:
    """Every stored value as the database's own text of it, so a difference in type shows too."""
    backend = backend_for(url)
    engine = backend.create_engine()
    try:
        async with engine.connect() as connection:
            columns = [cast(column, Text) for column in action_metrics.columns]
            result = await connection.execute(select(*columns).order_by(action_metrics.c.id))
            return [tuple(row) for row in result]
    finally:
        await engine.dispose()


async def queried(url: str) -> list[ActionMetric]:
    async with AsyncMetricsStore(url) as store:
        return await store.query()


def newest_first(metrics: Sequence[ActionMetric]) -> list[ActionMetric]:
    return sorted(metrics, key=lambda metric: (metric.timestamp, metric.id), reverse=True)


@pytest.fixture
def second_database_url(backend) -> Iterator[str]:
    """Another fresh migrated database of the same backend, for the plain path."""
    url = backend.migrated()
    yield url
    backend.drop(url)


@pytest.mark.anyio
async def test_bulk_path_stores_what_the_plain_insert_stores(
    database_url: str, second_database_url: str
) -> None:
    metrics = varied_metrics(bulk_size(backend_for(database_url)))
    await insert_in_bulk(database_url, metrics)
    await insert_plainly(second_database_url, metrics)

    bulk_rows = await stored_rows(database_url)
    assert len(bulk_rows) == len(metrics)
    assert bulk_rows == await stored_rows(second_database_url)
    assert await queried(database_url) == await queried(second_database_url) == newest_first(metrics)


@pytest.mark.anyio
async def test_store_batches_take_the_bulk_path_and_read_back_equal(
    database_url: str, second_database_url: str
) -> None:
    # Without extremes: a sum of 2**63 - 1 token counts overflows the aggregate's BIGINT.
    metrics = varied_metrics(bulk_size(backend_for(database_url)) + 3, extremes=False)
    async with AsyncMetricsStore(database_url) as store:
        await store.emit_many(metrics)
        assert await store.query() == newest_first(metrics)
        aggregate = (await store.aggregate()).to_dict()
    await insert_plainly(second_database_url, metrics)
    assert await stored_rows(database_url) == await stored_rows(second_database_url)
    async with AsyncMetricsStore(second_database_url) as store:
        assert (await store.aggregate()).to_dict() == aggregate


@pytest.mark.anyio
async def test_a_resent_batch_mixing_new_and_stored_ids_stores_only_the_new(
    database_url: str, second_database_url: str
) -> None:
    size = bulk_size(backend_for(database_url))
    metrics = varied_metrics(2 * size)
    stored, new = metrics[:size], metrics[size:]
    # The re-sent batch interleaves stored and new ids, and repeats some ids within itself.
    resent = [metric for pair in zip(new, stored, strict=True) for metric in pair] + new[:7] + stored[:5]

    for url, insert in ((database_url, insert_in_bulk), (second_database_url, insert_plainly)):
        await insert(url, stored)
        await insert(url, resent)
        await insert(url, resent)

    assert await stored_rows(database_url) == await stored_rows(second_database_url)
    assert await queried(database_url) == newest_first(metrics)


@pytest.mark.anyio
async def test_a_stored_id_keeps_its_first_values(database_url: str, second_database_url: str) -> None:
    size = bulk_size(backend_for(database_url))
    first = varied_metrics(size)
    # The same ids again with other values: idempotent on id means the stored row stays as it was.
    changed = [
        ActionMetric(**{**vars_of(metric), "tokens_out": metric.tokens_out + 1, "metadata": {"v": 2}})
        for metric in first
    ]
    for url, insert in ((database_url, insert_in_bulk), (second_database_url, insert_plainly)):
        await insert(url, first)
        await insert(url, changed)
    assert await stored_rows(database_url) == await stored_rows(second_database_url)
    assert await queried(database_url) == newest_first(first)


def vars_of(metric: ActionMetric) -> dict[str, Any]:
    names = ["action_type", "user_id", "town_id", "citizen_id", "tokens_in", "tokens_out", "model"]
    names += ["latency_ms", "credits_charged", "timestamp", "metadata", "id"]
    return {name: getattr(metric, name) for name in names}


def corrupted(metric: ActionMetric) -> ActionMetric:
    """A metric that bypassed validation: the database refuses its NULL user_id."""
    object.__setattr__(metric, "user_id", None)
    return metric


@pytest.mark.anyio
async def test_a_failing_row_leaves_none_of_its_batch_stored(
    database_url: str, second_database_url: str
) -> None:
    size = bulk_size(backend_for(database_url))
    kept = varied_metrics(3, start=NOW - timedelta(days=1))
    batch = varied_metrics(size)
    batch[size // 2] = corrupted(batch[size // 2])
    for url, insert in ((database_url, insert_in_bulk), (second_database_url, insert_plainly)):
        await insert(url, kept)
        with pytest.raises(IntegrityError):
            await insert(url, batch)
    assert await stored_rows(database_url) == await stored_rows(second_database_url)
    assert await queried(database_url) == newest_first(kept)

    async with AsyncMetricsStore(database_url) as store:
        with pytest.raises(DataRejected, match=r"null value|NOT NULL|action_metrics.user_id") as rejected:
            await store.emit_many(batch)  # the repository says it in our terms, the driver's as cause
        assert isinstance(rejected.value.__cause__, IntegrityError)
        assert await store.query() == newest_first(kept)


def test_emit_many_streams_a_generator_one_committed_batch_at_a_time(database_url: str) -> None:
    counts_seen: list[int] = []
    template = varied_metrics(1, extremes=False)[0]

    with MetricsStore(database_url) as store:

        def generated() -> Iterator[ActionMetric]:
            for index in range(2 * INGEST_BATCH + 5):
                if index % INGEST_BATCH == 0 and index:
                    counts_seen.append(store.aggregate().count)  # what is committed so far
                yield ActionMetric(**{**vars_of(template), "id": uuid.UUID(int=index + 1)})

        store.emit_many(generated())
        assert counts_seen == [INGEST_BATCH, 2 * INGEST_BATCH]
        assert store.aggregate().count == 2 * INGEST_BATCH + 5


def test_a_non_metric_fails_its_batch_and_keeps_the_batches_before(database_url: str) -> None:
    metrics: list[object] = list(varied_metrics(INGEST_BATCH + 2, extremes=False))
    metrics[INGEST_BATCH + 1] = {"action_type": "lod3"}
    with MetricsStore(database_url) as store:
        with pytest.raises(TypeError, match=rf"^metrics\[{INGEST_BATCH + 1}\]: expected an ActionMetric"):
            store.emit_many(metrics)  # type: ignore[arg-type]
        assert store.aggregate().count == INGEST_BATCH


def test_batches_are_bounded_and_keep_order() -> None:
    metrics = varied_metrics(25)
    batches = list(metric_batches(iter(metrics), size=10))
    assert [len(batch) for batch in batches] == [10, 10, 5]
    assert [metric for batch in batches for metric in batch] == metrics
    assert list(metric_batches([], size=10)) == []
