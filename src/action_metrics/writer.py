"""The write path of `emit()`: a bounded buffer that a background task drains into the database.

The pattern of OpenTelemetry's BatchSpanProcessor. `put()` appends to a buffer and returns at once,
from any thread; a task on the store's event loop writes the buffer in batches (one transaction
each, everything pending up to `batch_size`), at least every `flush_interval` seconds and as soon
as a batch fills.

A failed batch is retried with exponential backoff until it is written, so an outage delays
metrics rather than losing them; the buffer is bounded, so an outage longer than the buffer can
hold drops the newest metrics, and those are counted in `dropped` and logged as a warning on the
`action_metrics` logger. Two failures (as the repository translates them, see `errors`) are not
an outage:
- rows the database refuses (a constraint or trigger, a value out of range: `DataRejected`) fail on
  every retry, so the batch is bisected, the rest written, and only the refused metrics dropped,
  counted in `rejected` (and `dropped`) and logged as an error; metrics from before the prune
  cut-off (`MetricInPrunedPeriod`, which names them) are taken out at once, without bisecting;
- a statement the database refuses whatever the rows (schema missing or behind, no INSERT grant:
  `StatementRefused`, `SchemaError`) is the operator's to fix, so it is retried like an outage,
  logged as an error that names the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from action_metrics.errors import (
    DatabaseError,
    DataRejected,
    FlushTimeout,
    InvalidValue,
    MetricInPrunedPeriod,
    SchemaError,
    StatementRefused,
)
from action_metrics.ingest import CLICKHOUSE_INGEST_BATCH
from action_metrics.model import ActionMetric
from action_metrics.validation import as_integer

logger: Final = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE: Final = 20_000
"""The most metrics per transaction (SQLite, PostgreSQL). Under load the writer takes everything
pending up to this: measured (bench/ingest.py), batches of 500 reach 0.3-0.4x the raw driver, 5,000
about 0.7x, 20,000 0.8x and more, and 50,000 no better; emit_many's batch is the same size."""
DEFAULT_BUFFER_SIZE: Final = 50_000
"""Metrics held while the database is slow or down: 50 s of an outage at 1,000 metrics/s. An
ActionMetric takes ~700 bytes with a small metadata dict, so the buffer plus a batch in flight
hold ~50 MB at most (metadata up to its 64 KiB limit makes each metric that much bigger)."""
CLICKHOUSE_BATCH_SIZE: Final = CLICKHOUSE_INGEST_BATCH
"""The most metrics per insert into ClickHouse, emit_many's batch: each insert writes a part into
the raw table and, through the materialized views, into ten more, a fixed cost that ClickHouse's
documentation says to pay about once a second. Measured (bench/ingest.py, 300,000 metrics, 3 runs,
twice each): the writer's ratio to the raw insert 0.78 and 0.68 (min 0.52) with batches of 20,000,
0.91 and 0.86 (min 0.84) with 100,000 (README)."""
CLICKHOUSE_BUFFER_SIZE: Final = 2 * CLICKHOUSE_BATCH_SIZE
"""Metrics held for ClickHouse: room for the next batch while one is in flight; ~200 MB at most
with a batch in flight, 200 s of an outage at 1,000 metrics/s."""
DEFAULT_FLUSH_INTERVAL: Final = 1.0
DEFAULT_CLOSE_TIMEOUT: Final = 10.0
MAX_LOGGED_REJECTS: Final = 10

InsertBatch = Callable[[Sequence[ActionMetric]], Awaitable[None]]


def _reason(error: BaseException) -> str:
    """The driver's error in one line, for the log."""
    return error.reason if isinstance(error, DatabaseError) else repr(error)


@dataclass(frozen=True, slots=True)
class WriterSettings:
    """How much the writer buffers, how often it writes, and how it waits out an outage."""

    buffer_size: int = DEFAULT_BUFFER_SIZE
    """Metrics held while the database is slow or down; beyond this, new metrics are dropped."""
    batch_size: int = DEFAULT_BATCH_SIZE
    """The most metrics per transaction; once this many wait, they are written at once rather than
    at the next interval, and a writer that falls behind takes everything pending up to this."""
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    """Seconds a metric may wait in the buffer before it is written."""
    first_retry_delay: float = 0.05
    max_retry_delay: float = 5.0
    """Backoff after a failed write doubles from `first_retry_delay` up to this."""
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT
    """Seconds `close()` (and interpreter exit) keeps trying to write what is buffered."""

    def __post_init__(self) -> None:
        for name in ("buffer_size", "batch_size"):
            value = getattr(self, name)
            count = as_integer(value)  # NumPy's int64 too, never a bool
            if count is None or count < 1:
                raise InvalidValue(name, f"expected a whole number >= 1, got {value!r}")
            object.__setattr__(self, name, count)  # frozen: the plain int, once
        for name in ("flush_interval", "first_retry_delay", "max_retry_delay", "close_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise InvalidValue(name, f"expected a number of seconds > 0, got {value!r}")


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a future's error as seen, so asyncio does not report it when the future is collected."""
    if not future.cancelled():
        future.exception()


class _Barrier:
    """A mark in the buffer: `done` resolves once every metric put before it is written.

    A fail-fast barrier (a read that wants to see earlier emits) fails with the write error instead
    of waiting out an outage.
    """

    __slots__ = ("done", "fail_fast")

    def __init__(self, done: asyncio.Future[None], fail_fast: bool) -> None:
        self.done = done
        self.fail_fast = fail_fast

    def resolve(self, error: BaseException | None = None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)


class BatchWriter:
    """Buffers metrics from any thread and writes them in batches from one event loop."""

    def __init__(self, insert: InsertBatch, settings: WriterSettings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.dropped = 0
        """Metrics given up on: the buffer was full, they were still unwritten at close, or the
        database rejected them (those are also counted in `rejected`)."""
        self.rejected = 0
        """Metrics the database refused on their own (a constraint or trigger), logged as errors."""
        self.written = 0
        """Metrics committed by this writer."""
        self._insert = insert
        self._buffer: deque[ActionMetric | _Barrier] = deque()
        self._buffered_barriers = 0  # so `pending` is cheap enough for a producer to poll
        self._in_flight: list[ActionMetric] = []
        self._in_flight_barriers: list[_Barrier] = []
        self._fail_fast_barriers: set[_Barrier] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._wake_pending = False
        self._closing = False
        self._giving_up = False
        self._accepting = True
        self._accepting_lock = threading.Lock()
        """Held by `put` from its check of `_accepting` to its append, and by `close` to clear it: a
        metric taken while `close` begins is in the buffer before the last write looks, never after."""
        self._last_error: BaseException | None = None
        self._drop_lock = threading.Lock()
        self._dropping = False
        self._dropped_reported = 0

    def __repr__(self) -> str:
        return f"<BatchWriter {self.name}: {self.pending} pending, {self.dropped} dropped>"

    # --- any thread ----------------------------------------------------------------------------

    def put(self, metric: ActionMetric) -> bool:
        """Buffer `metric` and return at once; never waits, never raises for a database problem (a
        full buffer drops it: counted in `dropped` and logged). False, taking nothing, once `close()`
        has begun: the store's `emit()` then raises `StoreClosed`."""
        buffer = self._buffer
        with self._accepting_lock:
            if not self._accepting:
                return False
            full = len(buffer) >= self.settings.buffer_size
            if not full:
                buffer.append(metric)
        if full:
            self._drop(1, "the buffer is full")
            return True
        if len(buffer) >= self.settings.batch_size and not self._wake_pending:
            self._wake_pending = True
            self._wake_from_any_thread()
        return True

    def drop_closed(self, count: int = 1) -> None:
        """Count metrics that came after `close()` from callers that must not raise (the decorator,
        the span processor): in `dropped`, logged once per run of drops."""
        self._drop(count, "the writer is closed")

    @property
    def pending(self) -> int:
        """Metrics accepted and not yet written (approximate while other threads emit)."""
        return max(0, len(self._in_flight) + len(self._buffer) - self._buffered_barriers)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def take_pending(self) -> list[ActionMetric]:
        """Remove and return every unwritten metric, for a last write on another event loop."""
        pending = list(self._in_flight)
        self._in_flight.clear()
        while self._buffer:
            item = self._buffer.popleft()
            if type(item) is ActionMetric:
                pending.append(item)
            else:
                self._buffered_barriers -= 1
        return pending

    def count_lost(self, count: int, why: str) -> None:
        """Count and log metrics that will never be written (the store's exit path uses it too)."""
        if not count:
            return
        with self._drop_lock:
            self.dropped += count
            self._dropped_reported += count
        logger.warning("action-metrics %s: %d metrics dropped: %s", self.name, count, why)

    def _drop(self, count: int, why: str) -> None:
        with self._drop_lock:
            self.dropped += count
            first = not self._dropping
            self._dropping = True
        if first:
            logger.warning(
                "action-metrics %s: %s, dropping metrics (%d dropped so far, %d waiting); see "
                "`dropped` on the store",
                self.name,
                why,
                self.dropped,
                len(self._buffer),
            )

    def _wake_from_any_thread(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return  # not started: the first start() drains what is buffered
        # A closed loop raises RuntimeError: the store's exit path writes what is left.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(wake.set)

    # --- the store's event loop ----------------------------------------------------------------

    def start(self) -> None:
        """Start (or restart after close) the background task on the running loop."""
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._closing = False
        self._giving_up = False
        self._accepting = True
        self._task = self._loop.create_task(self._run(), name=f"action-metrics writer {self.name}")

    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - as MetricsStore's
        """Return once every metric put before this call is written; keeps retrying through an outage.

        Raises `FlushTimeout` after `timeout` seconds (None: wait as long as it takes); nothing is
        discarded then, the writer keeps trying.
        """
        barrier = self._barrier(fail_fast=False)
        if barrier is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(barrier.done), timeout)
        except TimeoutError:
            if barrier.done.done():
                raise  # close() gave up on these metrics: its own FlushTimeout says so
            # Nobody awaits the barrier any more: close() may yet fail it, and asyncio would log
            # that error as never retrieved.
            barrier.done.add_done_callback(_retrieve)
            raise FlushTimeout(
                f"{self.pending} metrics still waiting for the database after {timeout} s "
                f"(last error: {self._last_error!r}); they stay buffered and are retried, "
                "call flush() again or check the database"
            ) from self._last_error

    async def settle(self) -> None:
        """Let a read see every metric put before it: wait for them, or raise the write's error."""
        barrier = self._barrier(fail_fast=True)
        if barrier is not None:
            await barrier.done

    async def close(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - as MetricsStore's
        """Write what is buffered (up to `timeout`, default `close_timeout`) and stop.

        Metrics still unwritten then are counted in `dropped` and logged: never lost silently.
        """
        self._stop_accepting()
        if (self._buffer or self._in_flight) and not self.running:
            self.start()  # metrics put before the writer ever started
            self._stop_accepting()  # start() accepts again
        task = self._task
        if task is None or task.done():
            return
        self._closing = True
        self._wake_now()
        timeout = self.settings.close_timeout if timeout is None else timeout
        done, _ = await asyncio.wait([task], timeout=timeout)
        buffered: list[_Barrier] = []
        if not done:
            self._giving_up = True  # the task's cancellation must not start another last write
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            buffered = [item for item in self._buffer if type(item) is _Barrier]
            lost = self.take_pending()
            self.count_lost(
                len(lost),
                f"still unwritten {timeout} s into close() (last write error: {self._last_error!r})",
            )
        for barrier in (*self._in_flight_barriers, *buffered):  # a flush() still waiting must not hang
            barrier.resolve(FlushTimeout("the store was closed before these metrics were written"))
        self._in_flight_barriers.clear()
        self._task = None

    def _stop_accepting(self) -> None:
        with self._accepting_lock:  # a put under way finishes its append first
            self._accepting = False

    def _barrier(self, fail_fast: bool) -> _Barrier | None:
        if not self._buffer and not self._in_flight:
            return None
        barrier = _Barrier(asyncio.get_running_loop().create_future(), fail_fast)
        if fail_fast:
            self._fail_fast_barriers.add(barrier)
            barrier.done.add_done_callback(lambda _: self._fail_fast_barriers.discard(barrier))
            if self._last_error is not None and self._in_flight:
                barrier.resolve(self._last_error)  # the writer is in backoff: do not wait it out
                return barrier
        self._buffer.append(barrier)
        self._buffered_barriers += 1
        if not self.running:
            self.start()
        self._wake_now()
        return barrier

    def _wake_now(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep up to `seconds`, or until woken (a full batch, a flush, close)."""
        wake = self._wake
        assert wake is not None
        if not wake.is_set():
            try:
                async with asyncio.timeout(seconds):
                    await wake.wait()
            except TimeoutError:
                pass
        wake.clear()
        self._wake_pending = False

    async def _run(self) -> None:
        try:
            while True:
                await self._drain()
                if self._closing and not self._buffer:
                    return
                await self._sleep(self.settings.flush_interval)
        except asyncio.CancelledError:
            if self._giving_up or not (self._buffer or self._in_flight):
                raise
            # The loop is shutting down (asyncio.run() ends by cancelling every task): one last
            # bounded attempt, so a program that never calls flush() keeps its metrics.
            self._closing = True
            try:
                async with asyncio.timeout(self.settings.close_timeout):
                    await self._drain()
            except TimeoutError:
                pass  # what is left is written by the store's exit hook, or counted there
            raise

    async def _drain(self) -> None:
        """Write batches until the buffer is empty, retrying each failed batch with backoff."""
        delay = self.settings.first_retry_delay
        failures = 0
        while True:
            if not self._in_flight and not self._in_flight_barriers:
                self._take_batch()
                if not self._in_flight and not self._in_flight_barriers:
                    return
            try:
                rejected = await self._write_rejecting(self._in_flight)
            except Exception as error:
                failures += 1
                self._failed(error, failures)
                self._wake_pending = True  # a filling buffer must not cut the backoff short
                await self._sleep(delay)
                delay = min(delay * 2, self.settings.max_retry_delay)
                continue
            if failures:
                logger.warning(
                    "action-metrics %s: the database is back, writing again after %d failed attempts",
                    self.name,
                    failures,
                )
                failures, delay = 0, self.settings.first_retry_delay
            self._last_error = None
            self.written += len(self._in_flight) - len(rejected)
            if rejected:
                self._reject(rejected)
            self._in_flight.clear()
            for barrier in self._in_flight_barriers:
                barrier.resolve()
            self._in_flight_barriers.clear()
            self._report_drops()

    async def _write_rejecting(self, batch: Sequence[ActionMetric]) -> list[tuple[ActionMetric, Exception]]:
        """Write `batch`; if the database rejects rows of it, write the rest and return those rows.

        A rejected batch is bisected until the metrics the database refuses on their own are found:
        about 2 x log2(len(batch)) extra transactions per rejected metric. Every other error is
        raised for the caller to retry; halves already committed are skipped then, by their ids.
        """
        if not batch:
            return []
        try:
            await self._insert(batch)
            return []
        except MetricInPrunedPeriod as error:  # it names every refused metric: no need to bisect
            refused = set(error.indexes)
            kept = [metric for index, metric in enumerate(batch) if index not in refused]
            return [(batch[index], error) for index in error.indexes] + await self._write_rejecting(kept)
        except DataRejected as error:  # the same rows fail on every retry; the rest of the batch succeeds
            if len(batch) == 1:
                return [(batch[0], error)]
        middle = len(batch) // 2
        return await self._write_rejecting(batch[:middle]) + await self._write_rejecting(batch[middle:])

    def _reject(self, rejected: Sequence[tuple[ActionMetric, Exception]]) -> None:
        with self._drop_lock:
            self.rejected += len(rejected)
            self.dropped += len(rejected)
            self._dropped_reported += len(rejected)
        logged = rejected[:MAX_LOGGED_REJECTS]
        shown = ", ".join(f"id {metric.id} ({_reason(error)})" for metric, error in logged)
        more = f" and {len(rejected) - len(logged)} more" if len(rejected) > len(logged) else ""
        logger.error(
            "action-metrics %s: the database rejected %d metrics, dropped (the rest of their batch "
            "is written): %s%s",
            self.name,
            len(rejected),
            shown,
            more,
        )

    def _take_batch(self) -> None:
        buffer, batch, barriers = self._buffer, self._in_flight, self._in_flight_barriers
        limit = self.settings.batch_size
        while buffer and len(batch) < limit:
            item = buffer.popleft()
            if type(item) is _Barrier:
                barriers.append(item)
                self._buffered_barriers -= 1
            else:
                batch.append(item)  # type: ignore[arg-type]

    def _failed(self, error: Exception, failures: int) -> None:
        self._last_error = error
        if failures == 1:
            if isinstance(error, StatementRefused | SchemaError):
                logger.error(
                    "action-metrics %s: the database refuses to store metrics (%d waiting): %s; "
                    "its schema is missing, behind, or the role lacks INSERT. Run `action-metrics "
                    "db upgrade` or grant the privilege; retrying with backoff until then",
                    self.name,
                    len(self._in_flight),
                    _reason(error),
                )
            else:
                logger.warning(
                    "action-metrics %s: writing %d metrics failed, retrying with backoff: %r",
                    self.name,
                    len(self._in_flight),
                    error,
                )
        for barrier in list(self._fail_fast_barriers):
            barrier.resolve(error)

    def _report_drops(self) -> None:
        if not self._dropping:
            return
        with self._drop_lock:
            self._dropping = False
            newly = self.dropped - self._dropped_reported
            self._dropped_reported = self.dropped
        logger.warning(
            "action-metrics %s: writing again; %d metrics were dropped meanwhile (%d in all)",
            self.name,
            newly,
            self.dropped,
        )
