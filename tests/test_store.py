"""The store's contract on both backends: what is emitted is what is queried, once, verbatim."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
from conftest import metric

from action_metrics import (
    ActionMetric,
    AsyncMetricsStore,
    DatabaseUnavailable,
    InvalidFilter,
    InvalidPrice,
    InvalidValue,
    MetricsStore,
    SchemaNotCreated,
    SchemaTooNew,
    StoreClosed,
)
from action_metrics.dialects import SQLITE_CACHE_KIB, SQLITE_WAL_PAGES_BEFORE_CHECKPOINT, backend_for
from action_metrics.rollup import read_state

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(database_url: str):
    with MetricsStore(database_url) as store:
        yield store


def test_emitted_metric_reads_back_equal(store: MetricsStore) -> None:
    sent = metric(metadata={"lod": 3, "nested": {"list": [1, 2.5, None, True, "é"]}})
    store.emit(sent)
    assert store.query() == [sent]


def test_emitting_the_same_id_twice_stores_it_once(store: MetricsStore) -> None:
    first = metric()
    store.emit(first)
    store.emit(first)
    store.emit_many([first, first])
    assert store.query() == [first]


def test_a_batch_mixing_new_and_stored_ids_stores_only_the_new(store: MetricsStore) -> None:
    stored = [metric(timestamp=NOW - timedelta(minutes=i)) for i in range(5)]
    store.emit_many(stored[:3])
    store.emit_many([stored[1], stored[3], stored[0], stored[4], stored[2]])
    assert store.query() == stored
    assert store.aggregate().count == 5


@pytest.mark.parametrize(
    "user_id",
    [
        "o'brien",
        'say "hi"',
        "100%",
        "snake_case_",
        "back\\slash",
        "'; DROP TABLE action_metrics; --",
        "%' OR '1'='1",
        "ünïcødé 用户 🙂",
        " padded ",
    ],
)
def test_hostile_user_ids_are_stored_and_found_verbatim(store: MetricsStore, user_id: str) -> None:
    store.emit_many([metric(user_id=user_id), metric(user_id="someone-else")])
    found = store.query(user_id=user_id)
    assert [m.user_id for m in found] == [user_id]
    assert store.aggregate(user_id=user_id).count == 1


def test_filters_that_no_stored_value_can_hold_match_nothing(store: MetricsStore) -> None:
    store.emit(metric())
    assert store.query(user_id="nul\x00byte") == []
    assert store.aggregate(town_id="\ud800").count == 0


def test_naive_timestamps_are_local_time_and_aware_ones_any_zone(store: MetricsStore) -> None:
    naive = datetime(2026, 6, 1, 9, 30)
    plus_five = datetime(2026, 6, 1, 9, 30, tzinfo=timezone(timedelta(hours=5)))
    store.emit_many([metric(timestamp=naive), metric(timestamp=plus_five)])
    stored = {m.timestamp for m in store.query()}
    assert stored == {naive.astimezone(UTC), plus_five.astimezone(UTC)}
    assert all(t.tzinfo is not None and t.utcoffset() == timedelta(0) for t in stored)


def test_since_is_inclusive_and_until_exclusive(store: MetricsStore) -> None:
    metrics = [metric(timestamp=NOW + timedelta(seconds=s)) for s in range(4)]
    store.emit_many(metrics)
    found = store.query(since=NOW + timedelta(seconds=1), until=NOW + timedelta(seconds=3))
    assert found == [metrics[2], metrics[1]]


def test_query_is_newest_first_and_limited(store: MetricsStore) -> None:
    metrics = [metric(timestamp=NOW + timedelta(minutes=m)) for m in range(10)]
    store.emit_many(reversed(metrics))
    assert store.query(limit=3) == metrics[:-4:-1]


def test_real_provider_model_names_are_kept(store: MetricsStore) -> None:
    names = ["claude-sonnet-4-5@20250929", "openai/gpt-4o-mini", "Llama 3.1 70B (fp8)"]
    store.emit_many(metric(model=name) for name in names)
    assert {m.model for m in store.query()} == set(names)
    assert set(store.aggregate().by_model) == set(names)


@pytest.mark.parametrize(
    ("filters", "field"),
    [
        ({"user_id": 42}, "user_id"),
        ({"since": "yesterday"}, "since"),
        ({"until": 1700000000}, "until"),
        ({"limit": -1}, "limit"),
        ({"limit": 2.5}, "limit"),
        ({"limit": True}, "limit"),
        ({"limit": np.True_}, "limit"),
        ({"limit": np.int64(-1)}, "limit"),
    ],
)
def test_bad_filters_name_the_field(store: MetricsStore, filters: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidFilter, match=f"^{field}:"):
        store.query(**filters)  # type: ignore[arg-type]
    with pytest.raises(InvalidFilter, match=f"^{field}:"):
        store.aggregate(**filters)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("", 1, 1), "model"),
        (("m", -1, 1), "input_per_1m"),
        (("m", 1, float("nan")), "output_per_1m"),
        (("m", "abc", 1), "input_per_1m"),
        (("m", 1, "0.0000000001"), "output_per_1m"),
    ],
)
def test_bad_prices_name_the_field(store: MetricsStore, args: tuple[object, ...], field: str) -> None:
    with pytest.raises(InvalidPrice, match=f"^{field}:"):
        store.set_model_price(*args)  # type: ignore[arg-type]


def test_numpy_integers_are_whole_numbers_for_every_integer_argument(store: MetricsStore) -> None:
    """A dashboard's `limit` or `top` from NumPy (anything with `__index__`) is an integer."""
    metrics = [metric(timestamp=NOW + timedelta(minutes=m), tokens_in=np.int64(m)) for m in range(5)]
    store.emit_many(reversed(metrics))
    assert store.query(limit=np.int64(3)) == metrics[:-4:-1]
    assert [row.keys for row in store.breakdown("model", top=np.int64(1))] == [{"model": "haiku"}]
    assert store.audit_charges(np.int64(10)).exact == 5
    store.set_model_price("numpy-priced", np.int64(1), np.int64(2))
    [price] = [price for price in store.model_prices() if price.model == "numpy-priced"]
    assert (price.input_per_1m, price.output_per_1m) == (1, 2)
    with pytest.raises(InvalidFilter, match=r"^credits:"):
        store.audit_charges("10")  # type: ignore[arg-type]


@pytest.mark.parametrize("flag", ["false", "no", 0, 1, None, np.True_])
def test_yes_or_no_arguments_are_bools_never_read_as_truthy(
    database_url: str, store: MetricsStore, flag: object
) -> None:
    """`exact="false"` is not exact, and not the other mode either: refused, naming the argument."""
    kept = metric(timestamp=NOW - timedelta(days=2))
    store.emit(kept)
    with pytest.raises(InvalidFilter, match=r"^exact: expected True or False"):
        store.aggregate(exact=flag)  # type: ignore[arg-type]
    for name in ("descending", "exact"):
        with pytest.raises(InvalidFilter, match=f"^{name}: expected True or False"):
            store.breakdown("model", **{name: flag})
    with pytest.raises(InvalidFilter, match=r"^dry_run: expected True or False"):
        store.prune(NOW, dry_run=flag)  # type: ignore[arg-type]
    assert store.query() == [kept]
    with pytest.raises(InvalidValue, match=r"^durable: expected True or False"):
        MetricsStore(database_url, durable=flag)  # type: ignore[arg-type]


def test_bad_input_loses_nothing_already_accepted(store: MetricsStore) -> None:
    kept = metric()
    store.emit(kept)
    with pytest.raises(TypeError, match=r"metrics\[1\]"):
        store.emit_many([metric(), {"action_type": "lod3"}])  # type: ignore[list-item]
    assert store.query() == [kept]


def test_blocking_store_works_inside_a_running_event_loop(database_url: str) -> None:
    async def notebook_cell() -> int:
        with MetricsStore(database_url) as store:
            store.emit(metric())
            return store.aggregate().count

    assert asyncio.run(notebook_cell()) == 1


@pytest.mark.anyio
async def test_async_store_has_the_same_methods(database_url: str) -> None:
    async with AsyncMetricsStore(database_url) as store:
        sent = [metric(timestamp=NOW - timedelta(seconds=i)) for i in range(3)]
        await store.emit(sent[0])
        await store.emit_many(sent)
        await store.flush()
        assert await store.query(town_id="town-1") == sent
        await store.set_model_price("haiku", 1, 2, effective_from=NOW - timedelta(days=1))
        await store.set_credit_price(0.01, effective_from=NOW - timedelta(days=1))
        aggregate = await store.aggregate()
        assert aggregate.count == 3
        assert aggregate.total_revenue_usd == pytest.approx(3 * 10 * 0.01, abs=1e-12)
        assert aggregate.total_cost_usd == pytest.approx(3 * (100 * 1 + 50 * 2) / 1e6, abs=1e-12)


def test_a_new_sqlite_file_is_created_and_migrated(tmp_path) -> None:
    path = tmp_path / "new.db"
    with MetricsStore(f"sqlite:///{path}") as store:
        store.emit(metric())
        assert store.aggregate().count == 1
    assert path.exists()


def test_default_url_comes_from_the_environment(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "from-env.db"
    monkeypatch.setenv("ACTION_METRICS_URL", f"sqlite:///{path}")
    with MetricsStore() as store:
        store.emit(metric())
    assert path.exists()


def test_an_unmigrated_postgres_database_names_the_command_to_run(backend, empty_database_url: str) -> None:
    if backend.name != "postgresql":
        pytest.skip("a new SQLite file is migrated on first use (see the test above)")
    with pytest.raises(SchemaNotCreated, match="action-metrics db upgrade --url"):
        MetricsStore(empty_database_url).open()


def test_a_postgres_database_that_does_not_exist_says_to_create_it(postgres_available: None) -> None:
    """Not "is its schema at head": there is no database to upgrade yet."""
    from conftest import postgres_url

    from action_metrics import StatementRefused

    missing = f"am_missing_{uuid.uuid4().hex[:12]}"
    store = MetricsStore(postgres_url(missing))
    try:
        with pytest.raises(
            StatementRefused, match=r"does not exist; create the database \(createdb\)"
        ) as raised:
            store.open()
        assert "schema at head" not in str(raised.value)
    finally:
        store.close()


def _stamp(database_url: str, revision: str) -> None:
    """Set the schema's revision as an upgrade (or downgrade) by another process would."""
    import sqlite3

    import asyncpg
    from sqlalchemy import make_url

    url = make_url(database_url)
    statement = f"UPDATE alembic_version SET version_num = '{revision}'"
    if url.get_backend_name() == "sqlite":
        with sqlite3.connect(url.database or "") as connection:
            connection.execute(statement)
    else:

        async def stamp() -> None:
            connection = await asyncpg.connect(database_url)
            await connection.execute(statement)
            await connection.close()

        asyncio.run(stamp())


def test_a_database_from_a_newer_release_is_refused(database_url: str) -> None:
    _stamp(database_url, "9999")
    store = MetricsStore(database_url)
    try:
        with pytest.raises(SchemaTooNew, match="upgrade the action-metrics package"):
            store.open()
    finally:
        store.close()


def test_a_store_open_while_the_schema_moves_stops_writing_and_says_why(database_url: str) -> None:
    """A process already running when another release upgrades (or downgrades) the schema would keep
    the rollups as its own release keeps them: every write refuses instead, naming the revisions,
    and nothing of the refused batch is stored; at head again, it writes."""
    from action_metrics import SchemaOutOfDate, migrate

    head = migrate.head_revision()

    def hours_closed(store: MetricsStore) -> Any:
        async def read() -> Any:
            repository = await store._store._open()
            async with repository.engine.connect() as connection:
                return (await read_state(connection)).hours_closed_until

        return store._call(read())

    with MetricsStore(database_url) as store:
        # Its hour is not closed yet: a prune would close it first (the build), but must not when
        # refused.
        store.emit_many([metric(timestamp=datetime.now(UTC) - timedelta(hours=2))])
        closed = hours_closed(store)
        for revision, refusal, says in [
            (f"{int(head) + 1:04d}", SchemaTooNew, "upgrade the action-metrics package"),
            (migrate.revisions()[-2], SchemaOutOfDate, "action-metrics db upgrade --url"),
        ]:
            _stamp(database_url, revision)
            with pytest.raises(refusal, match=f"at schema revision {revision}.*{says}"):
                store.emit_many([metric(), metric()])
            with pytest.raises(refusal):
                store.set_credit_price("0.007", effective_from=datetime(2026, 1, 1, tzinfo=UTC))
            with pytest.raises(refusal):
                store.prune(datetime.now(UTC) - timedelta(days=10))
            assert hours_closed(store) == closed  # the prune's build closed nothing first
            assert store.aggregate(exact=True).count == 1  # nothing of the refused batch
        _stamp(database_url, head)
        store.emit_many([metric()])
        assert store.aggregate(exact=True).count == 2


def test_ids_are_time_ordered_uuid7(store: MetricsStore) -> None:
    metrics = [metric() for _ in range(100)]
    assert all(m.id.version == 7 for m in metrics)
    assert [m.id for m in metrics] == sorted(m.id for m in metrics)
    assert isinstance(metrics[0].id, uuid.UUID)


def test_stores_opening_new_sqlite_files_at_once_each_migrate_their_own(tmp_path) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    starting = Barrier(8)

    def open_and_count(index: int) -> int:
        store = MetricsStore(f"sqlite:///{tmp_path / f'new-{index}.db'}", durable=True)
        starting.wait()
        try:
            store.emit(metric())
            return store.aggregate().count
        finally:
            store.close()

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(open_and_count, range(8))) == [1] * 8


def test_charges_are_audited_in_sql(store: MetricsStore) -> None:
    force = {"action_type": "force", "model": "sonnet"}
    store.emit_many(
        [
            metric(**force, credits_charged=50),
            metric(**force, credits_charged=50, error="Timeout"),  # failed, yet charged
            metric(**force, credits_charged=0, error="ConsentRefused"),  # failed: exempt
            metric(**force, credits_charged=0, error="ToolError"),  # failed: exempt
            metric(**force, credits_charged=0, metadata={"error": "x"}),  # not failed: undercharged
            metric(**force, credits_charged=10),
            metric(**force, credits_charged=60, metadata={"nested": {"error": "x"}}),
            metric(**force, credits_charged=50, town_id="town-2"),
            metric(credits_charged=0),  # another action type
        ]
    )
    audit = store.audit_charges(50, action_type="force", town_id="town-1")
    assert (audit.count, audit.failed, audit.under, audit.over) == (7, 2, 2, 1)
    assert (audit.charged, audit.exact) == (5, 2)
    assert store.audit_charges(50, action_type="force").count == 8
    assert store.audit_charges(50, action_type="force", limit=1).count == 1
    nothing = store.audit_charges(50, action_type="branch")
    assert (nothing.count, nothing.charged, nothing.exact) == (0, 0, 0)


def test_calls_after_close_raise_store_closed(database_url: str) -> None:
    store = MetricsStore(database_url)
    store.emit(metric())
    store.close()
    for call in (
        store.open,
        store.query,
        store.aggregate,
        lambda: store.audit_charges(50),
        lambda: store.emit_many([metric()]),
        lambda: store.set_model_price("haiku", 1, 2),
        lambda: store.set_credit_price("0.01"),
        lambda: store.emit(metric()),  # the caller is told: the metric does not vanish unseen
        lambda: store.emit_nowait(metric()),
    ):
        with pytest.raises(StoreClosed, match=r"MetricsStore\(.* is closed"):
            call()
    store.flush()  # nothing left to write
    store.close()  # closing twice is harmless
    assert store.dropped == 0
    with MetricsStore(database_url) as reopened:
        assert reopened.aggregate().count == 1


@pytest.mark.anyio
async def test_calls_after_close_raise_store_closed_on_the_async_store_too(database_url: str) -> None:
    store = AsyncMetricsStore(database_url)
    await store.emit(metric())
    await store.close()
    with pytest.raises(StoreClosed, match="is closed"):
        await store.query()
    with pytest.raises(StoreClosed):
        await store.emit_many([metric()])
    with pytest.raises(StoreClosed, match="is closed"):
        await store.emit(metric())
    with pytest.raises(StoreClosed, match="is closed"):
        store.emit_nowait(metric())
    await store.flush()
    await store.close()
    assert store.dropped == 0
    assert not store.writer.running


def test_a_thread_emitting_while_the_store_closes_is_told_and_nothing_vanishes(database_url: str) -> None:
    emitted = 0
    refused: list[StoreClosed] = []
    emitting, stop = threading.Event(), threading.Event()

    def emit_until_refused(store: MetricsStore) -> None:
        nonlocal emitted
        while not stop.is_set():
            try:
                store.emit(metric())
            except StoreClosed as error:
                refused.append(error)
                return
            emitted += 1
            if emitted == 50:
                emitting.set()
            time.sleep(0.0005)  # pacing a load generator, not synchronisation

    with MetricsStore(database_url) as store:
        worker = threading.Thread(target=emit_until_refused, args=(store,), daemon=True)
        worker.start()
        assert emitting.wait(30)
    worker.join(10)  # its next emit after close() raises
    stop.set()
    assert refused, "emit() after close() returned as if the metric were kept"
    with MetricsStore(database_url) as reader:  # a racing emit may be dropped, never lost unseen
        assert reader.aggregate().count + store.dropped == emitted


class _StallingBuffer(deque[Any]):
    """The writer's buffer, whose next append of a metric (once armed) waits to be released: an
    emit() descheduled between its check that the store is open and its append."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.stalled, self.released = threading.Event(), threading.Event()

    def append(self, item: Any) -> None:
        if self.armed and isinstance(item, ActionMetric):
            self.armed = False
            self.stalled.set()
            self.released.wait(10)
        super().append(item)


def test_a_metric_emitted_as_close_begins_is_written_not_left_in_the_buffer(database_url: str) -> None:
    """emit() checks that the store takes metrics, then appends: close() may begin in between. The
    metric is in the buffer before close()'s last write looks (close waits for the append), never
    after it (it was: left unwritten, not counted as dropped, close() none the wiser)."""
    store = MetricsStore(database_url)
    store.emit(metric())
    store.flush()
    buffer = _StallingBuffer()
    store.writer._buffer = buffer
    buffer.armed = True
    emitter = threading.Thread(target=store.emit, args=(metric(),), daemon=True)
    emitter.start()
    assert buffer.stalled.wait(10)
    closer = threading.Thread(target=store.close, daemon=True)
    closer.start()
    time.sleep(0.3)  # close() under way: without the lock it has written its last batch by now
    buffer.released.set()
    emitter.join(10)
    closer.join(30)
    assert not closer.is_alive()
    assert store.dropped == 0
    with MetricsStore(database_url) as reader:
        assert reader.aggregate().count == 2


def test_a_sqlite_file_that_cannot_open_leaves_no_driver_thread_behind(tmp_path, monkeypatch) -> None:
    """aiosqlite stops a connection that failed to open on its worker thread and tells the event
    loop when done; that thread, descheduled for a moment as on a loaded machine, must still end
    before the failure reaches the caller, or it reports to a loop closed by then."""
    import aiosqlite.core

    workers: list[threading.Thread] = []
    unhandled: list[BaseException | None] = []
    run_worker = aiosqlite.core._connection_worker_thread

    def descheduled_worker(queue: Any) -> None:
        workers.append(threading.current_thread())

        class Late:
            def get(self) -> Any:
                item = queue.get()
                if getattr(item[1], "__name__", "") == "close_and_stop":
                    time.sleep(0.3)
                return item

        run_worker(Late())

    monkeypatch.setattr(aiosqlite.core, "_connection_worker_thread", descheduled_worker)
    monkeypatch.setattr(threading, "excepthook", lambda failure: unhandled.append(failure.exc_value))

    async def open_and_fail() -> None:
        store = AsyncMetricsStore(f"sqlite:///{tmp_path / 'missing-directory' / 'metrics.db'}")
        with pytest.raises(DatabaseUnavailable):
            await store.open()
        assert workers
        assert not [worker for worker in workers if worker.is_alive()]
        await store.close()

    asyncio.run(open_and_fail())  # the loop is closed as soon as the store is
    for worker in workers:
        worker.join(timeout=10)
    assert unhandled == []


def test_an_unreachable_database_raises_database_unavailable(backend, tmp_path) -> None:
    url = {
        "sqlite": f"sqlite:///{tmp_path / 'missing-directory' / 'metrics.db'}",
        "postgresql": "postgresql://postgres@127.0.0.1:1/nowhere",
    }[backend.name]
    store = MetricsStore(url)
    with pytest.raises(DatabaseUnavailable, match=r"^cannot use ") as raised:
        store.aggregate()
    store.close()
    assert raised.value.reason  # the driver's words, in one line
    assert "\n" not in raised.value.reason


def test_sqlite_connections_keep_a_large_cache_and_wal(tmp_path) -> None:
    """Small batches (an HTTP request's, the buffered writer's) dirty a page of most indexes per
    metric: the pages stay cached, and a checkpoint copies them once for many commits."""
    backend = backend_for(f"sqlite:///{tmp_path / 'metrics.db'}")

    async def settings() -> tuple[Any, ...]:
        engine = backend.create_engine()
        try:
            async with engine.connect() as connection:
                names = ("journal_mode", "cache_size", "wal_autocheckpoint")
                return tuple(
                    [(await connection.exec_driver_sql(f"PRAGMA {name}")).scalar() for name in names]
                )
        finally:
            await engine.dispose()

    assert asyncio.run(settings()) == ("wal", -SQLITE_CACHE_KIB, SQLITE_WAL_PAGES_BEFORE_CHECKPOINT)
    assert SQLITE_CACHE_KIB >= 16 * 1024
    assert SQLITE_WAL_PAGES_BEFORE_CHECKPOINT > 1_000  # SQLite's default
