"""The stores users hold: `AsyncMetricsStore`, and `MetricsStore`, the same store for blocking code.

There is one implementation. `MetricsStore` runs an `AsyncMetricsStore` on an event loop of its own,
in a daemon thread, so it also works inside a program that already runs a loop (a notebook, a
FastAPI handler), where `asyncio.run()` would refuse.

`emit()` does not wait for the database: it hands the metric to the store's `BatchWriter` (see
`writer`), which writes in batches in the background; `durable=True` makes `emit()` return only
after the commit. `emit_many()` always writes before it returns.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import concurrent.futures.thread
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol, Self, TypedDict, TypeVar, Unpack

from sqlalchemy import URL

from action_metrics.aggregate import Aggregate
from action_metrics.breakdown import BreakdownRequest, BreakdownRow
from action_metrics.charges import ChargeAudit, CreditClaim, InheritedCredits
from action_metrics.clickhouse import SCHEMES as CLICKHOUSE_SCHEMES
from action_metrics.clickhouse import ClickHouseURL
from action_metrics.dialects import backend_for, display_url, resolve_url
from action_metrics.errors import InvalidFilter, InvalidValue, MetricInPrunedPeriod, StoreClosed
from action_metrics.ingest import CLICKHOUSE_INGEST_BATCH, INGEST_BATCH, metric_batches
from action_metrics.model import ActionMetric
from action_metrics.pricing import CreditPrice, ModelPrice
from action_metrics.query import CopyPosition, MetricFilter
from action_metrics.repository import CatalogueWrite, MetricsRepository, PruneResult
from action_metrics.validation import as_utc, check_count, check_flag
from action_metrics.writer import (
    CLICKHOUSE_BATCH_SIZE,
    CLICKHOUSE_BUFFER_SIZE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_BUFFER_SIZE,
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_FLUSH_INTERVAL,
    BatchWriter,
    WriterSettings,
)

if TYPE_CHECKING:
    from action_metrics.catalogue import PriceSync

T = TypeVar("T")
Amount = float | int | str | Decimal


class SelectionFilters(TypedDict, total=False):
    """The filters of `breakdown()`; see `MetricFilter`."""

    user_id: str | None
    town_id: str | None
    citizen_id: str | None
    action_type: str | None
    model: str | None
    since: datetime | None
    until: datetime | None


class Filters(SelectionFilters, total=False):
    """The filters of `query()` and `aggregate()`; see `MetricFilter`."""

    limit: int | None


class Repository(Protocol):
    """What a store asks of its database: `repository.MetricsRepository` on SQLite and PostgreSQL,
    `clickhouse_repository.ClickHouseRepository` on ClickHouse."""

    async def ensure_schema(self) -> None: ...
    async def close(self) -> None: ...
    async def insert(self, metrics: Sequence[ActionMetric]) -> None: ...
    async def insert_counting(
        self, metrics: Sequence[ActionMetric], credits: InheritedCredits | None = None
    ) -> int: ...
    async def select(self, metric_filter: MetricFilter) -> list[ActionMetric]: ...
    async def aggregate(self, metric_filter: MetricFilter, *, exact: bool = False) -> Aggregate: ...
    async def breakdown(
        self, metric_filter: MetricFilter, request: BreakdownRequest
    ) -> list[BreakdownRow]: ...
    def stream_breakdown(
        self, metric_filter: MetricFilter, request: BreakdownRequest
    ) -> AsyncIterator[BreakdownRow]: ...
    async def audit_charges(self, metric_filter: MetricFilter, credits: int) -> ChargeAudit: ...
    async def prune(
        self, before: datetime, *, dry_run: bool = False, progress: Callable[[int], None] | None = None
    ) -> PruneResult: ...
    async def set_model_price(self, price: ModelPrice) -> None: ...
    async def set_credit_price(self, price: CreditPrice) -> None: ...
    async def price_start_refused(self, start: datetime, model: str | None) -> datetime | None: ...
    async def model_prices(self) -> list[ModelPrice]: ...
    async def seen_models(self) -> list[str]: ...
    async def replace_catalogue_prices(
        self, histories: Mapping[str, Sequence[ModelPrice]]
    ) -> CatalogueWrite: ...
    async def read_after(self, position: CopyPosition | None, limit: int) -> list[ActionMetric]: ...
    async def count_after(self, position: CopyPosition | None) -> int: ...
    async def credit_claims_after(self, after: tuple[str, str] | None, limit: int) -> list[CreditClaim]: ...
    async def copy_credit_claims(self, claims: Sequence[CreditClaim]) -> int: ...
    async def credit_prices(self) -> list[CreditPrice]: ...
    async def raw_kept_from(self) -> datetime | None: ...
    async def record_raw_kept_from(self, cutoff: datetime) -> None: ...


def repository_for(url: URL) -> Callable[[], Repository]:
    """How a store makes its repository: ClickHouse's for clickhouse://, clickhouses:// and chdb://
    URLs (imported then: its driver is the optional extra), SQLAlchemy's for every other URL."""
    if url.get_backend_name() in CLICKHOUSE_SCHEMES:
        from action_metrics.clickhouse_repository import ClickHouseRepository

        target = ClickHouseURL.parse(url.render_as_string(hide_password=False))
        return lambda: ClickHouseRepository(target)
    backend = backend_for(url)
    return lambda: MetricsRepository(backend.create_engine(), backend)


def _call_at_exit(hook: Callable[[], None]) -> None:
    """Run `hook` when the interpreter exits, while thread pools still accept work.

    Plain `atexit` hooks run after `concurrent.futures` has shut its pools down, and asyncio needs
    one to resolve a host name, so a store could not reconnect to `localhost` from there.
    `threading._register_atexit` (what concurrent.futures itself uses) runs earlier, in reverse
    order of registration; concurrent.futures.thread is imported above so its hook comes after ours.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - CPython has had it since 3.9
        atexit.register(hook)
        return
    try:
        register(hook)
    except RuntimeError:  # already shutting down
        atexit.register(hook)


_EXIT_MARGIN_SECONDS: Final = 5.0
"""How long past its close_timeout interpreter exit waits for a store's close() on its own loop."""


def _write_at_exit(store_ref: weakref.ref[AsyncMetricsStore]) -> None:
    store = store_ref()
    if store is not None:
        store._write_at_exit()


def _check_metric(metric: object) -> None:
    if not isinstance(metric, ActionMetric):
        raise TypeError(f"expected an ActionMetric, got {type(metric).__name__}")


class AsyncMetricsStore:
    """Action metrics in SQLite, PostgreSQL or ClickHouse. Connects, and checks the schema, on first use.

    `emit()` buffers; the buffer is written at least every `flush_interval` seconds, on `flush()`,
    on `close()` and at interpreter exit, in batches of up to `batch_size` metrics while up to
    `buffer_size` wait (default 20,000 and 50,000; on ClickHouse 100,000 and 200,000, where every
    insert pays a part per table). `durable=True` makes `emit()` wait for the commit.
    After `prune()`, metrics from before its cut-off are refused: `emit_many` raises
    `MetricInPrunedPeriod`, the writer counts them in `rejected` and logs them.
    Database failures raise `DatabaseError`s; after `close()` every call that needs the database
    raises `StoreClosed`, `emit()` too (`flush()` and `close()` do nothing); `@instrument_action` and
    the span processor, which never raise into the application, count such metrics in `dropped`.
    """

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        durable: bool = False,
        buffer_size: int | None = None,
        batch_size: int | None = None,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        self.url = resolve_url(url)
        self._new_repository = repository_for(self.url)
        clickhouse = self.url.get_backend_name() in CLICKHOUSE_SCHEMES
        self.ingest_batch = CLICKHOUSE_INGEST_BATCH if clickhouse else INGEST_BATCH
        """Metrics per atomic batch when `emit_many` streams."""
        self.durable = check_flag("durable", durable, InvalidValue)
        if buffer_size is None:
            buffer_size = CLICKHOUSE_BUFFER_SIZE if clickhouse else DEFAULT_BUFFER_SIZE
        if batch_size is None:
            batch_size = CLICKHOUSE_BATCH_SIZE if clickhouse else DEFAULT_BATCH_SIZE
        settings = WriterSettings(
            buffer_size=buffer_size,
            batch_size=batch_size,
            flush_interval=flush_interval,
            close_timeout=close_timeout,
        )
        self.writer = BatchWriter(self._insert, settings, name=display_url(self.url))
        self._repository: Repository | None = None
        self._opening = asyncio.Lock()
        self._exit_hook_registered = False
        self._closed = False
        self._closed_at_exit = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({display_url(self.url)!r})"

    async def open(self) -> Self:
        """Connect and check the schema now rather than at the first call."""
        await self._open()
        return self

    async def _open(self) -> Repository:
        if self._repository is not None:
            return self._repository
        if self._closed:
            raise _closed_error(self)
        async with self._opening:
            if self._repository is None:
                repository = self._new_repository()
                try:
                    await repository.ensure_schema()
                except BaseException:
                    await repository.close()
                    raise
                self._repository = repository
        return self._repository

    @property
    def dropped(self) -> int:
        """Metrics emitted but never written: the buffer overflowed, the database was down at close,
        or it refused them (those are also in `rejected`)."""
        return self.writer.dropped

    @property
    def rejected(self) -> int:
        """Emitted metrics the database refused (a constraint of its own); logged with their ids."""
        return self.writer.rejected

    async def emit(self, metric: ActionMetric) -> None:
        """Store one metric (once: emitting the same id again changes nothing).

        Returns at once, before the write, unless the store is durable; `StoreClosed` after `close()`.
        """
        _check_metric(metric)
        if self.durable:
            await self.emit_many([metric])
            return
        if not self.writer.put(metric):
            self._emitted_after_close(self)
        elif not self._closed:
            self._start_writer()

    def emit_nowait(self, metric: ActionMetric) -> None:
        """Buffer one metric without awaiting, from any thread, even on a durable store; `StoreClosed`
        after `close()`, as `emit()`."""
        _check_metric(metric)
        if not self.writer.put(metric):
            self._emitted_after_close(self)
            return
        if not self.writer.running and not self._closed:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop here: written when the store is next used, or at exit
            self._start_writer()

    def _emitted_after_close(self, caller: AsyncMetricsStore | MetricsStore) -> None:
        """An emit after `close()` raises `StoreClosed`, so its metric does not vanish unseen. Not
        after the interpreter exit's close, which no caller asked for: threads still finishing then
        have their metrics counted in `dropped` and logged."""
        if not self._closed_at_exit:
            raise _closed_error(caller)
        self.writer.drop_closed()

    def _start_writer(self) -> None:
        if self.writer.running:
            return
        self.writer.start()
        if not self._exit_hook_registered:
            # A weak reference: a closed store can go. A running writer's task keeps an open one.
            _call_at_exit(partial(_write_at_exit, weakref.ref(self)))
            self._exit_hook_registered = True

    async def _insert(self, batch: Sequence[ActionMetric]) -> None:
        await (await self._open()).insert(batch)

    async def emit_many(self, metrics: Iterable[ActionMetric]) -> None:
        """Store metrics; ids already stored are skipped.

        Streams: every `ingest_batch` metrics (20,000; 100,000 into ClickHouse, one insert each) are
        one atomic transaction, so a generator of any length runs in bounded memory; a failure keeps
        the batches committed before it. A metric from before the prune cut-off raises
        `MetricInPrunedPeriod` naming its position in `metrics`; its batch stores nothing.
        """
        repository = await self._open()
        start = 0
        for batch in metric_batches(metrics, self.ingest_batch):
            try:
                await repository.insert(batch)
            except MetricInPrunedPeriod as error:
                raise error.offset(start) from None
            start += len(batch)

    async def emit_batch(
        self, metrics: Sequence[ActionMetric], *, credits: InheritedCredits | None = None
    ) -> int:
        """Store `metrics` in one transaction, committed when this returns; the number whose ids were
        not stored before (the rest were duplicates and changed nothing). For a bounded batch, such
        as one request of the HTTP endpoint: unlike `emit_many`, it does not split the batch.

        `credits` (an OTLP receiver's, such as `POST /v1/traces`): calls that may carry the credits
        of the action above them. Each action is claimed for its first call here, in the
        transaction that stores them; the first claim made of it holds, whichever process made it
        (on ClickHouse, which enforces no unique key and has no transactions, within this process),
        and the call holding it is stored with the credits."""
        for metric in metrics:
            _check_metric(metric)
        return await (await self._open()).insert_counting(metrics, credits)

    @property
    def batches_commit_together(self) -> bool:
        """Whether `emit_batches` commits its batches in one transaction (SQLite, PostgreSQL), so a
        refused batch stores none of them; ClickHouse has no transactions: each is stored in turn."""
        return self.url.get_backend_name() not in CLICKHOUSE_SCHEMES

    async def emit_batches(
        self,
        batches: Sequence[Sequence[ActionMetric]],
        *,
        credits: Sequence[InheritedCredits | None] | None = None,
    ) -> list[int]:
        """`emit_batch` of each batch (with its `credits`, if any), all in one transaction where the
        database has transactions (SQLite, PostgreSQL): one commit for several concurrent requests
        of the HTTP endpoint. Each batch's count is the one `emit_batch` would give it after the
        batches before it."""
        for batch in batches:
            for metric in batch:
                _check_metric(metric)
        inherited = list(credits) if credits is not None else [None] * len(batches)
        repository = await self._open()
        if isinstance(repository, MetricsRepository):
            return await repository.insert_counting_groups(batches, inherited)
        return [
            await repository.insert_counting(batch, each)
            for batch, each in zip(batches, inherited, strict=True)
        ]

    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - as MetricsStore's
        """Return once every metric emitted so far is committed.

        While the database is down this keeps retrying; after `timeout` seconds (None: no limit) it
        raises `FlushTimeout`, and the metrics stay buffered.
        """
        await self.writer.flush(timeout)

    async def query(self, **filters: Unpack[Filters]) -> list[ActionMetric]:
        """Metrics matching every filter given, newest first (including every metric emitted before)."""
        metric_filter = MetricFilter(**filters)
        await self.writer.settle()
        return await (await self._open()).select(metric_filter)

    async def aggregate(self, *, exact: bool = False, **filters: Unpack[Filters]) -> Aggregate:
        """The dashboard numbers of the metrics matching every filter, computed in SQL.

        Served from the rollups where they keep the filters (every figure exact; percentiles within
        1%, `percentiles_exact` False); `exact=True` reads raw rows only, percentiles exact too.
        """
        exact = check_flag("exact", exact, InvalidFilter)
        metric_filter = MetricFilter(**filters)
        await self.writer.settle()
        return await (await self._open()).aggregate(metric_filter, exact=exact)

    async def breakdown(
        self,
        by: Sequence[str] | str = (),
        *,
        bucket: str | None = None,
        tz: str | None = None,
        sort: str = "total_cost_usd",
        descending: bool = True,
        top: int | None = None,
        exact: bool = False,
        **filters: Unpack[SelectionFilters],
    ) -> list[BreakdownRow]:
        """The numbers of `aggregate()` per group of `by` (user_id, town_id, citizen_id, action_type,
        model) and per `bucket` (hour, day, week from Monday, month) in the IANA zone `tz` (default
        `$ACTION_METRICS_TZ`, else UTC), sorted by `sort`, the first `top` kept."""
        request = BreakdownRequest.of(
            by, bucket=bucket, tz=tz, sort=sort, descending=descending, top=top, exact=exact
        )
        metric_filter = MetricFilter(**filters)
        await self.writer.settle()
        return await (await self._open()).breakdown(metric_filter, request)

    async def stream_breakdown(
        self,
        by: Sequence[str] | str = (),
        *,
        bucket: str | None = None,
        tz: str | None = None,
        sort: str = "total_cost_usd",
        descending: bool = True,
        top: int | None = None,
        exact: bool = False,
        **filters: Unpack[SelectionFilters],
    ) -> AsyncIterator[BreakdownRow]:
        """`breakdown()`'s rows one at a time, as the database sends them, for breakdowns too long to
        hold in memory (an hourly one over months, per user). The read stays open until the last row
        or `aclose()`: stop early inside `contextlib.aclosing(...)`."""
        request = BreakdownRequest.of(
            by, bucket=bucket, tz=tz, sort=sort, descending=descending, top=top, exact=exact
        )
        metric_filter = MetricFilter(**filters)
        await self.writer.settle()
        async for row in (await self._open()).stream_breakdown(metric_filter, request):
            yield row

    async def prune(
        self, before: datetime, *, dry_run: bool = False, progress: Callable[[int], None] | None = None
    ) -> PruneResult:
        """Delete raw rows from before the UTC midnight at or before `before`; the rollups stay, so
        aggregates over whole days before it still answer. `dry_run` only counts them; `progress`
        is called with 0 once the cut-off is accepted (a refused one raises first), then with the
        number removed so far. From then on a metric from before the cut-off is
        refused (`MetricInPrunedPeriod`): its id went with its row, so a re-sent one would count twice."""
        cutoff = as_utc("before", before, InvalidFilter)
        dry_run = check_flag("dry_run", dry_run, InvalidFilter)
        await self.writer.settle()
        return await (await self._open()).prune(cutoff, dry_run=dry_run, progress=progress)

    async def set_model_price(
        self,
        model: str,
        input_per_1m: Amount,
        output_per_1m: Amount,
        effective_from: datetime | None = None,
        *,
        cache_read_per_1m: Amount | None = None,
        cache_write_per_1m: Amount | None = None,
    ) -> None:
        """Price `model` from `effective_from` (default now) until its next price. A cache price left
        out means the input price for those tokens."""
        price = ModelPrice.of(
            model,
            input_per_1m,
            output_per_1m,
            effective_from,
            cache_read_per_1m=cache_read_per_1m,
            cache_write_per_1m=cache_write_per_1m,
        )
        await (await self._open()).set_model_price(price)

    async def model_prices(self) -> list[ModelPrice]:
        """Every model price stored, by model and start, with its source (manual or catalogue)."""
        return await (await self._open()).model_prices()

    async def sync_prices(self) -> PriceSync:
        """Load the catalogue's prices (genai-prices, offline), with their history, of every model
        the store has seen, in one transaction. A manual price wins: see `catalogue`."""
        from action_metrics import catalogue  # genai-prices' data takes ~0.3 s to load

        await self.writer.settle()
        repository = await self._open()
        lookup = await asyncio.to_thread(catalogue.look_up, await repository.seen_models())
        written = await repository.replace_catalogue_prices(
            {found.model: found.prices for found in lookup.found}
        )
        by_hand = frozenset(
            price.model for price in await repository.model_prices() if price.source == "manual"
        )
        return catalogue.PriceSync(lookup=lookup, held_back=written.held_back, priced_by_hand=by_hand)

    async def set_credit_price(self, usd_per_credit: Amount, effective_from: datetime | None = None) -> None:
        """Set the revenue of one credit from `effective_from` (default now) until the next price."""
        price = CreditPrice.of(usd_per_credit, effective_from)
        await (await self._open()).set_credit_price(price)

    async def audit_charges(self, credits: int, **filters: Unpack[Filters]) -> ChargeAudit:
        """How the matching actions were charged against `credits` each, counted in SQL.

        An action that failed (its `error` is set) and was charged nothing counts as `failed`, not under.
        """
        credits = check_count("credits", credits, InvalidFilter)
        metric_filter = MetricFilter(**filters)
        await self.writer.settle()
        return await (await self._open()).audit_charges(metric_filter, credits)

    async def close(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - as MetricsStore's
        """Write what is buffered (for up to `timeout`, default `close_timeout` seconds), then disconnect.

        Metrics the database still refuses after that are counted in `dropped` and logged. Closing
        again does nothing.
        """
        try:
            await self.writer.close(timeout)  # which may still need to open the database
        finally:
            self._closed = True
            repository, self._repository = self._repository, None
            if repository is not None:
                await repository.close()

    def _write_at_exit(self) -> None:
        """Interpreter exit: write what is still buffered, so a program need not call flush()."""
        writer = self.writer
        loop = writer.loop
        if loop is not None and loop.is_running():  # in another thread, as a MetricsStore's is
            # Closed even with nothing to write: a thread still running emits into a closed store
            # (counted and logged), not into a buffer that goes with the store's daemon thread.
            self._closed_at_exit = True
            closing = asyncio.run_coroutine_threadsafe(self.close(), loop)
            try:  # close() gives up after close_timeout; a loop that never runs it must not hang exit
                closing.result(writer.settings.close_timeout + _EXIT_MARGIN_SECONDS)
            except concurrent.futures.TimeoutError:
                writer.count_lost(
                    writer.pending, "not written at interpreter exit: the store's event loop is stuck"
                )
            return
        if not writer.pending:
            return
        timeout = writer.settings.close_timeout
        # The store's loop has ended (asyncio.run() returned): write on a loop and engine of our own.
        pending = writer.take_pending()
        rescue = AsyncMetricsStore(self.url, durable=True)

        async def write() -> None:
            try:
                async with asyncio.timeout(timeout):
                    await rescue.emit_many(pending)
            finally:
                await rescue.close()

        try:
            asyncio.run(write())
        except Exception as error:
            writer.count_lost(len(pending), f"not written at interpreter exit: {error!r}")

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def _closed_error(store: AsyncMetricsStore | MetricsStore) -> StoreClosed:
    return StoreClosed(f"{store!r} is closed: make a new store (or use one in a `with` block)")


class _LoopThread:
    """An event loop running in a daemon thread, for calling coroutines from blocking code."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T], closed: Callable[[], Exception]) -> T:
        """Run `coroutine` on the loop and wait for its result; raise `closed()` once it is stopped."""
        if threading.current_thread() is self.thread:
            coroutine.close()
            raise RuntimeError("a blocking MetricsStore method was called from its own event loop")
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        except RuntimeError:  # the loop is closed
            coroutine.close()
            raise closed() from None
        return future.result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class MetricsStore:
    """The blocking face of `AsyncMetricsStore`: the same methods, the same behaviour.

    Its signatures repeat the async store's on purpose, so that help() and editors show them here.
    """

    # The same parameters as AsyncMetricsStore's, on purpose (see above).
    def __init__(
        self,
        url: str | URL | None = None,
        *,
        durable: bool = False,
        buffer_size: int | None = None,
        batch_size: int | None = None,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        self._store = AsyncMetricsStore(
            url,
            durable=durable,
            buffer_size=buffer_size,
            batch_size=batch_size,
            flush_interval=flush_interval,
            close_timeout=close_timeout,
        )
        self.url = self._store.url
        self.durable = self._store.durable
        self._loop = _LoopThread(name=f"action-metrics {display_url(self.url)}")
        self._call(self._start_writer())
        self._put = self._store.writer.put

    async def _start_writer(self) -> None:
        self._store._start_writer()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop.call(coroutine, lambda: _closed_error(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({display_url(self.url)!r})"

    def open(self) -> Self:
        self._call(self._store.open())
        return self

    @property
    def dropped(self) -> int:
        """See `AsyncMetricsStore.dropped`."""
        return self._store.dropped

    @property
    def rejected(self) -> int:
        """See `AsyncMetricsStore.rejected`."""
        return self._store.rejected

    @property
    def writer(self) -> BatchWriter:
        return self._store.writer

    def emit(self, metric: ActionMetric) -> None:
        """Buffer one metric and return without waiting for the database (unless durable)."""
        if type(metric) is not ActionMetric:
            _check_metric(metric)
        if self.durable:
            self._call(self._store.emit_many([metric]))
        elif not self._put(metric):
            self._store._emitted_after_close(self)

    def emit_nowait(self, metric: ActionMetric) -> None:
        """Buffer one metric and return at once, even on a durable store."""
        if type(metric) is not ActionMetric:
            _check_metric(metric)
        if not self._put(metric):
            self._store._emitted_after_close(self)

    def emit_many(self, metrics: Iterable[ActionMetric]) -> None:
        # Drawn here: the caller's iterable stays on its thread.
        for batch in metric_batches(metrics, self._store.ingest_batch):
            self._call(self._store.emit_many(batch))

    def emit_batch(self, metrics: Sequence[ActionMetric]) -> int:
        return self._call(self._store.emit_batch(list(metrics)))

    def emit_batches(self, batches: Sequence[Sequence[ActionMetric]]) -> list[int]:
        return self._call(self._store.emit_batches([list(batch) for batch in batches]))

    def flush(self, timeout: float | None = None) -> None:
        if self._loop.loop.is_closed():
            return  # close() wrote everything, or counted it in `dropped`
        self._call(self._store.flush(timeout))

    def query(self, **filters: Unpack[Filters]) -> list[ActionMetric]:
        return self._call(self._store.query(**filters))

    def aggregate(self, *, exact: bool = False, **filters: Unpack[Filters]) -> Aggregate:
        return self._call(self._store.aggregate(exact=exact, **filters))

    def breakdown(
        self,
        by: Sequence[str] | str = (),
        *,
        bucket: str | None = None,
        tz: str | None = None,
        sort: str = "total_cost_usd",
        descending: bool = True,
        top: int | None = None,
        exact: bool = False,
        **filters: Unpack[SelectionFilters],
    ) -> list[BreakdownRow]:
        return self._call(
            self._store.breakdown(
                by, bucket=bucket, tz=tz, sort=sort, descending=descending, top=top, exact=exact, **filters
            )
        )

    def audit_charges(self, credits: int, **filters: Unpack[Filters]) -> ChargeAudit:
        return self._call(self._store.audit_charges(credits, **filters))

    def prune(
        self, before: datetime, *, dry_run: bool = False, progress: Callable[[int], None] | None = None
    ) -> PruneResult:
        return self._call(self._store.prune(before, dry_run=dry_run, progress=progress))

    def set_model_price(
        self,
        model: str,
        input_per_1m: Amount,
        output_per_1m: Amount,
        effective_from: datetime | None = None,
        *,
        cache_read_per_1m: Amount | None = None,
        cache_write_per_1m: Amount | None = None,
    ) -> None:
        self._call(
            self._store.set_model_price(
                model,
                input_per_1m,
                output_per_1m,
                effective_from,
                cache_read_per_1m=cache_read_per_1m,
                cache_write_per_1m=cache_write_per_1m,
            )
        )

    def model_prices(self) -> list[ModelPrice]:
        return self._call(self._store.model_prices())

    def sync_prices(self) -> PriceSync:
        return self._call(self._store.sync_prices())

    def set_credit_price(self, usd_per_credit: Amount, effective_from: datetime | None = None) -> None:
        self._call(self._store.set_credit_price(usd_per_credit, effective_from))

    def close(self, timeout: float | None = None) -> None:
        if self._loop.loop.is_closed():
            return
        try:
            self._call(self._store.close(timeout))
        finally:
            self._loop.stop()

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
