"""The write path on both backends: emit() never waits, nothing is lost silently, exit flushes."""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import metric
from sqlalchemy import make_url

from action_metrics import AsyncMetricsStore, FlushTimeout, InvalidValue, MetricsStore, migrate

SRC = str(Path(__file__).resolve().parents[1] / "src")


def stored(url: str) -> int:
    """How many metrics the database holds, read through a store of its own."""
    with MetricsStore(url) as reader:
        return reader.aggregate().count


def eventually(predicate, timeout: float = 20.0) -> bool:
    """For outcomes with nothing to wait on (a timer firing in another thread)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_emit_returns_before_the_write_and_flush_commits(database_url: str) -> None:
    with MetricsStore(database_url, flush_interval=3600, batch_size=1000) as store:
        sent = [metric(user_id=f"user-{i}") for i in range(10)]
        for m in sent:
            store.emit(m)
        assert store.writer.pending == 10
        assert stored(database_url) == 0
        store.flush()
        assert stored(database_url) == 10
        assert store.dropped == 0


def test_a_query_sees_every_metric_emitted_before_it(database_url: str) -> None:
    with MetricsStore(database_url, flush_interval=3600) as store:
        sent = metric()
        store.emit(sent)
        assert store.query() == [sent]
        assert store.aggregate().count == 1


def test_the_buffer_is_written_on_a_timer_without_flush(database_url: str) -> None:
    with MetricsStore(database_url, flush_interval=0.05) as store:
        store.emit(metric())
        assert eventually(lambda: stored(database_url) == 1)


def test_a_full_batch_is_written_without_waiting_for_the_timer(database_url: str) -> None:
    with MetricsStore(database_url, flush_interval=3600, batch_size=5) as store:
        for i in range(5):
            store.emit(metric(user_id=f"user-{i}"))
        assert eventually(lambda: stored(database_url) == 5)


def test_durable_emit_returns_after_the_commit(database_url: str) -> None:
    with MetricsStore(database_url, durable=True, flush_interval=3600) as store:
        store.emit(metric())
        assert stored(database_url) == 1


def test_a_full_buffer_drops_new_metrics_counts_them_and_warns(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="action_metrics"),
        MetricsStore(database_url, buffer_size=3, batch_size=100, flush_interval=3600) as store,
    ):
        for i in range(5):
            store.emit(metric(user_id=f"user-{i}"))
        assert store.dropped == 2
        store.flush()
        assert sorted(m.user_id for m in store.query()) == ["user-0", "user-1", "user-2"]
    assert "buffer is full" in caplog.text


def test_close_writes_what_is_buffered(database_url: str) -> None:
    store = MetricsStore(database_url, flush_interval=3600)
    store.emit(metric())
    store.close()
    assert stored(database_url) == 1


def test_emit_refuses_what_is_not_a_metric(database_url: str) -> None:
    with MetricsStore(database_url) as store, pytest.raises(TypeError, match="ActionMetric"):
        store.emit({"action_type": "lod3"})  # type: ignore[arg-type]


def test_writer_settings_are_checked() -> None:
    with pytest.raises(InvalidValue, match=r"^buffer_size:"):
        MetricsStore("sqlite:///:memory:", buffer_size=0)
    with pytest.raises(InvalidValue, match=r"^batch_size:"):
        MetricsStore("sqlite:///:memory:", batch_size=np.True_)  # type: ignore[arg-type]
    with MetricsStore("sqlite:///:memory:", buffer_size=np.int64(10), batch_size=np.int32(5)) as store:
        assert (store.writer.settings.buffer_size, store.writer.settings.batch_size) == (10, 5)
        assert type(store.writer.settings.batch_size) is int  # NumPy's integers are integers
    with pytest.raises(InvalidValue, match=r"^flush_interval:"):
        AsyncMetricsStore("sqlite:///:memory:", flush_interval=-1)


@pytest.mark.anyio
async def test_the_async_store_buffers_the_same_way(database_url: str) -> None:
    async with AsyncMetricsStore(database_url, flush_interval=3600) as store:
        await store.emit(metric())
        assert store.writer.pending == 1
        await store.flush()
        assert store.writer.pending == 0
        assert store.writer.written == 1


@pytest.mark.anyio
async def test_the_first_write_loads_no_alembic_scripts_on_the_callers_event_loop(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # emit() never waits for the database, so the first write's schema check must not stall the
    # application's loop for the ~0.3 s alembic takes to load (it stalled it 221-648 ms).
    ran_in: list[threading.Thread] = []
    for name in ("_scripts", "current_revision"):
        alembic_step = getattr(migrate, name)

        def recording(*args: object, alembic_step=alembic_step) -> object:
            ran_in.append(threading.current_thread())
            return alembic_step(*args)

        monkeypatch.setattr(migrate, name, recording)
    store = AsyncMetricsStore(database_url, flush_interval=3600)
    await store.emit(metric())
    await store.flush()
    await store.close()
    assert threading.current_thread() not in ran_in
    assert stored(database_url) == 1


# --- interpreter exit ------------------------------------------------------------------------

EXIT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from action_metrics import ActionMetric, AsyncMetricsStore, MetricsStore

    url, mode, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    metrics = [ActionMetric("lod3", f"user-{i}", "town", None, 1, 1, "haiku", 1.0, 10) for i in range(count)]
    if mode == "blocking":
        store = MetricsStore(url, flush_interval=3600)
        for m in metrics:
            store.emit(m)
    elif mode == "asyncio.run":
        async def main():
            store = AsyncMetricsStore(url, flush_interval=3600)
            for m in metrics:
                await store.emit(m)
        asyncio.run(main())
    else:  # a loop left behind, never closed: the exit hook writes on a loop of its own
        store = AsyncMetricsStore(url, flush_interval=3600)
        async def main():
            for m in metrics:
                await store.emit(m)
        asyncio.new_event_loop().run_until_complete(main())
    """
)


def run_until_exit(script: str, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`script` in a fresh interpreter given the database's URL and `args`, run to its exit."""
    url = database_url
    if make_url(url).host == "127.0.0.1":  # a host name needs a resolver thread, late in shutdown
        url = url.replace("@127.0.0.1", "@localhost")
    result = subprocess.run(
        [sys.executable, "-c", script, url, *args],
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("mode", ["blocking", "asyncio.run", "abandoned loop"])
def test_metrics_emitted_without_flush_are_written_at_exit(database_url: str, mode: str) -> None:
    result = run_until_exit(EXIT_SCRIPT, database_url, mode, "1234")
    assert "dropped" not in result.stderr
    assert stored(database_url) == 1234


EMIT_AFTER_EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from action_metrics import ActionMetric, MetricsStore

    store = MetricsStore(sys.argv[1], flush_interval=3600)

    def finishing_late():
        threading.main_thread().join()  # the interpreter is exiting: its hook closed the store
        store.emit(ActionMetric("lod3", "late", "town", None, 1, 1, "haiku", 1.0, 10))
        print("dropped", store.dropped)

    threading.Thread(target=finishing_late).start()
    store.emit(ActionMetric("lod3", "early", "town", None, 1, 1, "haiku", 1.0, 10))
    if sys.argv[2] == "flushed":
        store.flush()  # nothing left to write at exit: the hook closes the store all the same
    """
)


@pytest.mark.parametrize("at_exit", ["buffered", "flushed"])
def test_a_thread_emitting_after_the_exit_flush_is_not_raised_at_but_counted(
    database_url: str, at_exit: str
) -> None:
    # The exit hook closes a store no caller closed, while non-daemon threads still run: their
    # emits are counted in `dropped` and logged, not raised at as after close(); with nothing
    # buffered at exit too (such an emit was buffered, then lost with the store's daemon thread).
    result = run_until_exit(EMIT_AFTER_EXIT_SCRIPT, database_url, at_exit)
    assert "StoreClosed" not in result.stderr
    assert result.stdout.strip() == "dropped 1"
    assert "the writer is closed, dropping metrics" in result.stderr
    assert stored(database_url) == 1


# --- an outage -------------------------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a server; `cut()` severs every connection and refuses new ones."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.restore()
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]

    def _call(self, coroutine) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, upstream_writer}
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    def cut(self) -> None:
        self._call(self._stop())

    def restore(self) -> None:
        self._call(self._start())

    def close(self) -> None:
        self._call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture
def proxy(backend, database_url: str) -> Iterator[tuple[TcpProxy, str]]:
    if backend.name != "postgresql":
        pytest.skip("a TCP proxy stands between us and a server; SQLite's outage is a lock, below")
    url = make_url(database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        yield proxy, url.set(port=proxy.port).render_as_string(hide_password=False)
    finally:
        proxy.close()


def test_metrics_emitted_while_postgres_is_unreachable_arrive_once_it_is_back(
    proxy: tuple[TcpProxy, str], database_url: str
) -> None:
    tcp, url = proxy
    with MetricsStore(url, flush_interval=3600) as store:
        store.emit(metric(user_id="before"))
        store.flush()
        tcp.cut()
        for i in range(20):
            store.emit(metric(user_id=f"during-{i}"))
        with pytest.raises(FlushTimeout, match="still waiting"):
            store.flush(timeout=0.5)
        tcp.restore()
        store.flush()
        assert store.dropped == 0
    assert stored(database_url) == 21


OUTAGE_SECONDS = 3.0


def test_a_service_emitting_through_a_three_second_outage_loses_nothing(
    proxy: tuple[TcpProxy, str], database_url: str
) -> None:
    # A service keeps emitting (about a thousand actions a second) for the whole outage. Every emit
    # must return while the database is unreachable (if one blocked, this loop would never reach its
    # deadline and restore the connection), and everything must arrive once it is back: the default
    # buffer holds the whole outage, so nothing may be dropped.
    tcp, url = proxy
    with MetricsStore(url, flush_interval=0.2) as store:
        store.open()
        tcp.cut()
        emitted, slowest = 0, 0.0
        deadline = time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < deadline:
            started = time.perf_counter()
            store.emit(metric(user_id=f"outage-{emitted}"))
            slowest = max(slowest, time.perf_counter() - started)
            emitted += 1
            time.sleep(0.001)  # pacing a load generator, not synchronisation
        tcp.restore()
        store.flush(timeout=60)
        assert store.dropped == 0
    assert stored(database_url) == emitted > 1000
    print(f"outage {OUTAGE_SECONDS}s: {emitted} emitted, slowest emit {slowest * 1e3:.2f} ms, 0 dropped")


def test_an_outage_longer_than_the_buffer_drops_the_overflow_and_counts_it(
    proxy: tuple[TcpProxy, str], database_url: str
) -> None:
    tcp, url = proxy
    with MetricsStore(url, buffer_size=5, batch_size=100, flush_interval=3600) as store:
        store.open()
        tcp.cut()
        for i in range(5):
            store.emit(metric(user_id=f"first-{i}"))
        with pytest.raises(FlushTimeout):
            store.flush(timeout=0.3)  # the writer now holds those 5, retrying; the buffer is empty
        for i in range(8):
            store.emit(metric(user_id=f"second-{i}"))
        assert store.dropped == 3
        tcp.restore()
        store.flush()
    assert stored(database_url) == 10


def test_metrics_emitted_while_sqlite_is_locked_arrive_once_it_is_released(
    backend, database_url: str
) -> None:
    if backend.name != "sqlite":
        pytest.skip("PostgreSQL's outage is the proxy above")
    with MetricsStore(database_url, flush_interval=3600) as store:
        store.open()
        holder = sqlite3.connect(make_url(database_url).database or "", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # another process's long write transaction
        try:
            store.emit(metric())
            with pytest.raises(FlushTimeout):
                store.flush(timeout=0.3)
        finally:
            holder.execute("COMMIT")
            holder.close()
        store.flush()
        assert store.dropped == 0
    assert stored(database_url) == 1


@pytest.fixture
def unreachable_url(backend, tmp_path: Path) -> str:
    """A database every write fails to reach at once: an outage without a proxy to cut."""
    return {
        "sqlite": f"sqlite:///{tmp_path / 'missing-directory' / 'metrics.db'}",
        "postgresql": "postgresql://postgres@127.0.0.1:1/nowhere",
    }[backend.name]


def test_closing_after_a_flush_timed_out_leaves_asyncio_no_error_to_report(
    unreachable_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = MetricsStore(unreachable_url, flush_interval=3600)
    store.emit(metric())
    with pytest.raises(FlushTimeout, match="still waiting"):
        store.flush(timeout=0.3)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        store.close(timeout=0.3)
        del store
        gc.collect()  # a future whose error nobody retrieved is reported when it is collected
    assert "never retrieved" not in caplog.text
    assert not [record for record in caplog.records if record.name == "asyncio"]


@pytest.mark.anyio
async def test_a_flush_waiting_when_close_gives_up_raises_instead_of_waiting_forever(
    unreachable_url: str,
) -> None:
    store = AsyncMetricsStore(unreachable_url, flush_interval=3600)
    await store.emit(metric())
    with pytest.raises(FlushTimeout):
        await store.flush(timeout=0.3)  # the writer now holds the metric, retrying
    # The flush starts first and waits behind the metric the writer retries; close() then gives up.
    waited, closed = await asyncio.wait_for(
        asyncio.gather(store.flush(), store.close(timeout=0.3), return_exceptions=True), 30
    )
    assert isinstance(waited, FlushTimeout)
    assert "the store was closed before these metrics were written" in str(waited)
    assert closed is None
    assert store.dropped == 1


def test_close_gives_up_after_its_timeout_and_counts_what_is_lost(
    proxy: tuple[TcpProxy, str], caplog: pytest.LogCaptureFixture
) -> None:
    tcp, url = proxy
    store = MetricsStore(url, flush_interval=3600)
    store.open()
    tcp.cut()
    for i in range(4):
        store.emit(metric(user_id=f"lost-{i}"))
    with caplog.at_level(logging.WARNING, logger="action_metrics"):
        store.close(timeout=0.3)
    assert store.dropped == 4
    assert "4 metrics dropped" in caplog.text


# --- rows the database refuses, and a schema that went missing ---------------------------------

POISON = "poison"


def refuse_poison(backend, url: str) -> None:
    """Make the database itself reject any metric of user `poison`, as a constraint added by a DBA."""
    if backend.name == "postgresql":
        asyncio.run(
            _postgres(url, "ALTER TABLE action_metrics ADD CONSTRAINT no_poison CHECK (user_id <> 'poison')")
        )
    else:
        _sqlite(
            url,
            "CREATE TRIGGER no_poison BEFORE INSERT ON action_metrics WHEN NEW.user_id = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'poison refused'); END",
        )


async def _postgres(url: str, statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(url, timeout=10)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def _sqlite(url: str, statement: str) -> None:
    connection = sqlite3.connect(make_url(url).database or "", isolation_level=None)
    try:
        connection.execute(statement)
    finally:
        connection.close()


def run_sql(backend, url: str, statement: str) -> None:
    if backend.name == "postgresql":
        asyncio.run(_postgres(url, statement))
    else:
        _sqlite(url, statement)


# 5 metrics take the plain INSERT on PostgreSQL, 1000 its COPY path; SQLite's executemany both.
@pytest.mark.parametrize("count", [5, 1000])
def test_metrics_the_database_rejects_are_dropped_and_the_rest_of_their_batch_is_written(
    backend, database_url: str, count: int, caplog: pytest.LogCaptureFixture
) -> None:
    refuse_poison(backend, database_url)
    poisoned = {1, count - 1}
    sent = [metric(user_id=POISON if i in poisoned else f"user-{i}") for i in range(count)]
    with (
        caplog.at_level(logging.WARNING, logger="action_metrics"),
        MetricsStore(database_url, flush_interval=3600, batch_size=count) as store,
    ):
        for m in sent:
            store.emit(m)
        store.flush()
        assert store.rejected == store.writer.rejected == 2
        assert store.dropped == 2
        later = metric(user_id="user-after")
        store.emit(later)  # the writer is not stuck on the rejected rows
        store.flush()
        kept = {m.id for m in sent if m.user_id != POISON} | {later.id}
        assert {m.id for m in store.query()} == kept
        assert store.writer.written == count - 2 + 1
    rejected_ids = [str(m.id) for m in sent if m.user_id == POISON]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "rejected 2 metrics" in errors[0]
    assert all(rejected_id in errors[0] for rejected_id in rejected_ids)


def test_a_table_gone_while_running_is_retried_until_it_is_back_and_nothing_is_dropped(
    backend, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An operator problem (a schema dropped or behind, a revoked grant): rejecting the rows would
    # lose everything, so the writer logs it and retries until the operator has fixed it.
    with (
        caplog.at_level(logging.WARNING, logger="action_metrics"),
        MetricsStore(database_url, flush_interval=3600) as store,
    ):
        store.open()
        run_sql(backend, database_url, "ALTER TABLE action_metrics RENAME TO action_metrics_away")
        try:
            for i in range(3):
                store.emit(metric(user_id=f"user-{i}"))
            with pytest.raises(FlushTimeout):
                store.flush(timeout=0.5)
        finally:
            run_sql(backend, database_url, "ALTER TABLE action_metrics_away RENAME TO action_metrics")
        store.flush()
        assert store.dropped == 0
        assert store.rejected == 0
    assert stored(database_url) == 3
    failure = next(r.getMessage() for r in caplog.records if "retrying" in r.getMessage())
    assert "does not exist" in failure or "no such table" in failure
