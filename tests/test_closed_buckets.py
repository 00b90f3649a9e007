"""Closed buckets kept (`closed_buckets`, migration 0016): a breakdown's closed local days, weeks and
months are stored by the first call and read back by the next, and every write that changes a closed
bucket (a late action, a price, a prune, one that commits while a reader computes) leaves no stored
row that disagrees with the raw rows. Each answer is checked against the zoneinfo reference over the
raw rows (`test_breakdown._expected_with`), on SQLite and PostgreSQL (ClickHouse keeps none)."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from conftest import Databases, postgres_admin
from sqlalchemy import make_url, select, update
from test_breakdown import AUTUMN, SPRING, _book, _expected_with, _floats_within, _key, _late, _metrics
from test_views import plain_sql

from action_metrics import ActionMetric, AsyncMetricsStore, MetricsStore, closed_buckets, sketch_reads
from action_metrics.cli import run_async
from action_metrics.dialects import backend_for
from action_metrics.pricing import BEGINNING_OF_TIME
from action_metrics.repository import MetricsRepository
from action_metrics.schema import closed_buckets as closed_buckets_table

from reference import PriceBook, assert_matches

ASKED: list[tuple[tuple[str, ...], str, str, dict[str, Any]]] = [
    (("town_id",), "day", "Europe/Berlin", {}),  # 23- and 25-hour days
    (("town_id",), "day", "Asia/Kathmandu", {}),  # edge quarter hours from raw rows
    ((), "day", "America/St_Johns", {"town_id": "town-b"}),  # a town's days (the page)
    (("action_type",), "day", "Asia/Kolkata", {"town_id": "town-c"}),  # a town's action types
    (("town_id",), "week", "America/New_York", {}),
    ((), "month", "Europe/Berlin", {}),
]


@contextmanager
def _store_with(url: str, metrics: list[ActionMetric]) -> Iterator[MetricsStore]:
    """A store holding `metrics`, its rollups closed up to the last of them."""
    with MetricsStore(url) as store:
        store.emit_many(metrics)
        store.flush()
        yield store


def _fill(url: str, metrics: list[ActionMetric]) -> None:
    with _store_with(url, metrics):
        pass


def _stored(url: str) -> list[tuple[str, str]]:
    """(question, bucket start as text) of every stored bucket."""
    rows = plain_sql(url, "SELECT question, bucket_start FROM action_metrics_closed_buckets")
    return sorted((row["question"], str(row["bucket_start"])) for row in rows)


def _utc(text: str) -> datetime:
    """A stored start as `_stored` gives it: SQLite's text is UTC without an offset."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _check(
    rows: list[dict[str, Any]],
    metrics: list[ActionMetric],
    by: tuple[str, ...],
    bucket: str,
    zone: str,
    filters: dict[str, Any],
    book: PriceBook,
) -> None:
    chosen = [metric for metric in metrics if all(getattr(metric, k) == v for k, v in filters.items())]
    expected = _expected_with(chosen, by, bucket, zone, book)
    assert sorted(map(repr, (_key(row, by, bucket) for row in rows))) == sorted(map(repr, expected))
    for row in rows:
        assert_matches(row, expected[_key(row, by, bucket)], f"{by} {bucket} {zone}: ")


def _computed_buckets(monkeypatch: pytest.MonkeyPatch) -> list[set[int]]:
    """The buckets each breakdown computed from the sketch levels (rather than read back)."""
    computed: list[set[int]] = []
    read = sketch_reads.breakdown_rows

    async def counted(
        connection: Any, metric_filter: Any, request: Any, shape: Any, pieces: Any, *rest: Any
    ) -> Any:
        computed.append({piece.bucket for piece in pieces})
        return await read(connection, metric_filter, request, shape, pieces, *rest)

    monkeypatch.setattr(sketch_reads, "breakdown_rows", counted)
    return computed


@pytest.mark.parametrize(("by", "bucket", "zone", "filters"), ASKED)
def test_closed_buckets_are_computed_once_then_read_back_with_the_same_rows(
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    by: tuple[str, ...],
    bucket: str,
    zone: str,
    filters: dict[str, Any],
) -> None:
    metrics = _metrics(seed=5, per_window=250)
    computed = _computed_buckets(monkeypatch)
    with _store_with(database_url, metrics) as store:
        first = [
            row.to_dict()
            for row in store.breakdown(by, bucket=bucket, tz=zone, sort="total_profit_usd", **filters)
        ]
        _check(first, metrics, by, bucket, zone, filters, _book())
        stored = _stored(database_url)
        assert stored, "the closed buckets were stored"
        again = [
            row.to_dict()
            for row in store.breakdown(by, bucket=bucket, tz=zone, sort="total_profit_usd", **filters)
        ]
        # In the same order; the bucket still open is computed again (its float sums may differ
        # in their last bits with the order they are added in).
        assert again == [_floats_within(row, 1e-12) for row in first]
        assert _stored(database_url) == stored
        # The second call computed only what is not stored: the first bucket, which the window
        # (from the first action on) cuts, and the last, still open.
        assert len(computed) == 2
        assert computed[1] == {min(computed[0]), max(computed[0])}
        # Sorted, cut to a top, either way: as the statements sort.
        for sort, descending in (("count", False), ("gross_margin", True), ("total_tokens", True)):
            top = store.breakdown(
                by, bucket=bucket, tz=zone, sort=sort, descending=descending, top=3, **filters
            )
            whole = store.breakdown(by, bucket=bucket, tz=zone, sort=sort, descending=descending, **filters)
            assert [row.to_dict() for row in top] == [row.to_dict() for row in whole[:3]]
            values = [
                getattr(row.figures, sort) if sort != "total_tokens" else row.figures.total_tokens
                for row in whole
            ]
            present = [value for value in values if value is not None]
            assert present == sorted(present, reverse=descending)
            assert values[len(present) :] == [None] * (len(values) - len(present))


def test_a_late_action_or_a_price_set_afterwards_changes_the_stored_buckets_it_falls_in(
    database_url: str,
) -> None:
    metrics = _metrics(seed=7, per_window=200)
    by, bucket, zone = ("town_id",), "day", "Europe/Berlin"
    with _store_with(database_url, metrics) as store:

        def answer_matches(book: PriceBook) -> None:
            rows = [row.to_dict() for row in store.breakdown(by, bucket=bucket, tz=zone)]
            _check(rows, metrics, by, bucket, zone, {}, book)

        store.breakdown(by, bucket=bucket, tz=zone)
        before = _stored(database_url)
        # A late action in a closed (stored) spring day: the days from it on are forgotten.
        late = _late(SPRING + timedelta(days=2, hours=10, minutes=7))
        store.emit(late)
        store.flush()
        left = _stored(database_url)
        assert left
        assert set(left) < set(before)
        assert all(start < str(late.timestamp) for _, start in left)
        metrics.append(late)
        answer_matches(_book())
        assert _stored(database_url) == before  # stored again
        # The same action sent again changes nothing: nothing is forgotten.
        store.emit(late)
        store.flush()
        assert _stored(database_url) == before
        # The same prices written again (as `prices sync` from cron does) change nothing.
        for price in store.model_prices():
            store.set_model_price(
                price.model, price.input_per_1m, price.output_per_1m, effective_from=price.effective_from
            )
        store.set_credit_price("0.006", effective_from=BEGINNING_OF_TIME)  # the seed's, as migrated
        assert not store.sync_prices().lookup.found  # the catalogue knows none of these names
        assert _stored(database_url) == before
        # A price set afterwards, inside a stored day: money follows it in every stored bucket.
        dearer = AUTUMN + timedelta(days=1, hours=3, minutes=13)
        store.set_model_price("opus", "20", "80", effective_from=dearer)
        assert _stored(database_url) == []
        book = _book()
        book.models["opus"].append((dearer, Decimal("20"), Decimal("80")))
        answer_matches(book)
        store.set_credit_price("0.01", effective_from=datetime(2024, 1, 1, tzinfo=UTC))
        assert _stored(database_url) == []
        book.credits.append((datetime(2024, 1, 1, tzinfo=UTC), Decimal("0.01")))
        answer_matches(book)


def test_a_prune_forgets_the_stored_buckets_before_its_cut_off(database_url: str) -> None:
    metrics = _metrics(seed=9, per_window=250)
    with _store_with(database_url, metrics) as store:
        store.breakdown("town_id", bucket="day", tz="Europe/Berlin")
        before = _stored(database_url)
        store.prune(before=AUTUMN)
        kept = _stored(database_url)
        assert kept == [(question, start) for question, start in before if start >= str(AUTUMN)]
        assert 0 < len(kept) < len(before)
        rows = [r.to_dict() for r in store.breakdown("town_id", bucket="day", tz="Europe/Berlin")]
        _check(rows, metrics, ("town_id",), "day", "Europe/Berlin", {}, _book())


def test_a_write_that_commits_while_a_reader_computes_keeps_it_from_storing(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's snapshot misses the late action; a write committed between its snapshot and its
    store moves the generation, so what it computed is not stored, and the next call is right."""
    metrics = _metrics(seed=11, per_window=250)
    late = _late(SPRING + timedelta(days=2, hours=1), id=uuid.uuid4())
    store_rows = closed_buckets.store
    writes: list[bool] = []

    async def counted(*args: Any) -> bool:
        stored = await store_rows(*args)
        writes.append(stored)
        return stored

    with_closed_buckets = MetricsRepository._with_closed_buckets

    async def written_meanwhile(self: MetricsRepository, *args: Any) -> Any:
        """Between the reader's snapshot and its store, another process's write commits."""
        if not writes:
            async with AsyncMetricsStore(database_url) as writer:
                await writer.emit_many([late])
        return await with_closed_buckets(self, *args)

    monkeypatch.setattr(closed_buckets, "store", counted)
    monkeypatch.setattr(MetricsRepository, "_with_closed_buckets", written_meanwhile)

    async def breakdown() -> list[dict[str, Any]]:
        async with AsyncMetricsStore(database_url) as store:
            return [
                row.to_dict() for row in await store.breakdown("town_id", bucket="day", tz="Europe/Berlin")
            ]

    _fill(database_url, metrics)
    first = run_async(breakdown())
    assert writes == [False]
    assert _stored(database_url) == []
    second = run_async(breakdown())
    assert writes == [False, True]
    _check(first, metrics, ("town_id",), "day", "Europe/Berlin", {}, _book())  # its snapshot's answer
    _check(second, [*metrics, late], ("town_id",), "day", "Europe/Berlin", {}, _book())
    assert _stored(database_url)


def test_a_role_that_may_only_read_computes_and_stores_nothing(database_url: str, backend: Databases) -> None:
    if backend.name != "postgresql":
        pytest.skip("roles and privileges are PostgreSQL's (a SQLite file's reader may write it)")
    metrics = _metrics(seed=13, per_window=200)
    _fill(database_url, metrics)
    role = f"am_reader_{uuid.uuid4().hex[:8]}"
    database = make_url(database_url).database
    postgres_admin(f'CREATE ROLE "{role}" LOGIN')
    try:
        postgres_admin(f'GRANT CONNECT ON DATABASE "{database}" TO "{role}"')
        plain_sql(database_url, f'GRANT USAGE ON SCHEMA public TO "{role}"')
        plain_sql(database_url, f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
        reader_url = make_url(database_url).set(username=role).render_as_string(hide_password=False)
        with MetricsStore(reader_url) as reader:
            rows = [r.to_dict() for r in reader.breakdown("town_id", bucket="day", tz="Europe/Berlin")]
        _check(rows, metrics, ("town_id",), "day", "Europe/Berlin", {}, _book())
        assert _stored(database_url) == []
    finally:
        plain_sql(database_url, f'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM "{role}"')
        plain_sql(database_url, f'REVOKE ALL ON SCHEMA public FROM "{role}"')
        postgres_admin(f'REVOKE ALL ON DATABASE "{database}" FROM "{role}"')
        postgres_admin(f'DROP ROLE "{role}"')


def test_a_stored_bucket_ending_elsewhere_is_computed_again_and_replaced(database_url: str) -> None:
    """A tzdata update can move a zone's midnight: a stored bucket with the same start but another
    end (as its old rules had it) is not read; it is computed and stored anew."""
    metrics = _metrics(seed=17, per_window=200)
    with _store_with(database_url, metrics) as store:
        store.breakdown("town_id", bucket="day", tz="Europe/Berlin")
        stored = _stored(database_url)
        question, start = stored[len(stored) // 2]

        async def move_its_end(hours: int) -> datetime:
            engine = backend_for(database_url).create_engine()
            try:
                async with engine.begin() as connection:
                    c = closed_buckets_table.c
                    chosen = (c.question == question) & (c.bucket_start == _utc(start))
                    end = (await connection.execute(select(c.bucket_end).where(chosen))).scalar_one()
                    await connection.execute(
                        update(closed_buckets_table)
                        .where(chosen)
                        .values(bucket_end=end + timedelta(hours=hours))
                    )
                    return end
            finally:
                await engine.dispose()

        end = run_async(move_its_end(1))
        rows = [row.to_dict() for row in store.breakdown("town_id", bucket="day", tz="Europe/Berlin")]
        _check(rows, metrics, ("town_id",), "day", "Europe/Berlin", {}, _book())
        assert run_async(move_its_end(0)) == end  # replaced by the bucket as computed now


def test_a_reader_does_not_wait_for_a_busy_writer_to_store(database_url: str, backend: Databases) -> None:
    """A writer holding the write lock (SQLite) or the state row (PostgreSQL) for as long as it likes:
    the breakdown answers without waiting for it (at most `LOCK_WAIT_MS`, where SQLite's writers
    otherwise wait 30 s and PostgreSQL's without end) and stores nothing; once it is gone, it stores."""
    metrics = _metrics(seed=19, per_window=200)
    _fill(database_url, metrics)

    async def breakdown_while_locked() -> list[dict[str, Any]]:
        async with AsyncMetricsStore(database_url) as store:
            if backend.name == "sqlite":
                holder = sqlite3.connect(make_url(database_url).database or "", isolation_level=None)
                holder.execute("BEGIN IMMEDIATE")
                release: Any = lambda: holder.close()  # noqa: E731 - the lock ends with the connection
            else:
                holder = await asyncpg.connect(database_url)
                transaction = holder.transaction()
                await transaction.start()
                await holder.execute("SELECT * FROM action_metrics_rollup_state FOR UPDATE")

                async def release() -> None:
                    await transaction.rollback()
                    await holder.close()

            try:
                rows = await asyncio.wait_for(
                    store.breakdown("town_id", bucket="day", tz="Europe/Berlin"), 10
                )
            finally:
                done = release()
                if asyncio.iscoroutine(done):
                    await done
            return [row.to_dict() for row in rows]

    rows = run_async(breakdown_while_locked())
    _check(rows, metrics, ("town_id",), "day", "Europe/Berlin", {}, _book())
    assert _stored(database_url) == []
    with MetricsStore(database_url) as store:
        store.breakdown("town_id", bucket="day", tz="Europe/Berlin")
    assert _stored(database_url)
