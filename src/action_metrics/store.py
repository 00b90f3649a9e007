"""The stores users hold: `AsyncMetricsStore`, and `MetricsStore`, the same store for blocking code.

There is one implementation. `MetricsStore` runs an `AsyncMetricsStore` on an event loop of its own,
in a daemon thread, so it also works inside a program that already runs a loop (a notebook, a
FastAPI handler), where `asyncio.run()` would refuse.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Self, TypedDict, TypeVar, Unpack

from sqlalchemy import URL
from sqlalchemy.exc import InterfaceError, OperationalError

from action_metrics.aggregate import Aggregate
from action_metrics.dialects import backend_for, display_url
from action_metrics.errors import DatabaseUnavailable
from action_metrics.ingest import metric_batches
from action_metrics.migrate import ensure_schema
from action_metrics.model import ActionMetric
from action_metrics.pricing import CreditPrice, ModelPrice
from action_metrics.query import MetricFilter
from action_metrics.repository import MetricsRepository

T = TypeVar("T")
Amount = float | int | str | Decimal


class Filters(TypedDict, total=False):
    """The filters of `query()` and `aggregate()`; see `MetricFilter`."""

    user_id: str | None
    town_id: str | None
    citizen_id: str | None
    action_type: str | None
    model: str | None
    since: datetime | None
    until: datetime | None
    limit: int | None


class AsyncMetricsStore:
    """Action metrics in SQLite or PostgreSQL. Connects, and checks the schema, on first use."""

    def __init__(self, url: str | URL | None = None) -> None:
        self.backend = backend_for(url)
        self.url = self.backend.given_url
        self._repository: MetricsRepository | None = None
        self._opening = asyncio.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({display_url(self.url)!r})"

    async def open(self) -> Self:
        """Connect and check the schema now rather than at the first call."""
        await self._open()
        return self

    async def _open(self) -> MetricsRepository:
        if self._repository is not None:
            return self._repository
        async with self._opening:
            if self._repository is None:
                engine = self.backend.create_engine()
                try:
                    await ensure_schema(engine, self.backend)
                except (OSError, OperationalError, InterfaceError) as error:
                    await engine.dispose()
                    reason = getattr(error, "orig", None) or error
                    raise DatabaseUnavailable(f"cannot use {display_url(self.url)}: {reason}") from error
                except BaseException:
                    await engine.dispose()
                    raise
                self._repository = MetricsRepository(engine, self.backend)
        return self._repository

    async def emit(self, metric: ActionMetric) -> None:
        """Store one metric (once: emitting the same id again changes nothing)."""
        await self.emit_many([metric])

    async def emit_many(self, metrics: Iterable[ActionMetric]) -> None:
        """Store metrics; ids already stored are skipped.

        Streams: every `INGEST_BATCH` (20,000) metrics are one atomic transaction, so a generator of
        any length runs in bounded memory; a failure keeps the batches committed before it.
        """
        repository = await self._open()
        for batch in metric_batches(metrics):
            await repository.insert(batch)

    async def flush(self) -> None:
        """Return once every metric emitted so far is committed.

        Emits are written before they return, so nothing is pending; this is the point where a
        buffered writer would drain.
        """
        await self._open()

    async def query(self, **filters: Unpack[Filters]) -> list[ActionMetric]:
        """Metrics matching every filter given, newest first."""
        metric_filter = MetricFilter(**filters)
        return await (await self._open()).select(metric_filter)

    async def aggregate(self, **filters: Unpack[Filters]) -> Aggregate:
        """The dashboard numbers of the metrics matching every filter, computed in SQL."""
        metric_filter = MetricFilter(**filters)
        return await (await self._open()).aggregate(metric_filter)

    async def set_model_price(
        self,
        model: str,
        input_per_1m: Amount,
        output_per_1m: Amount,
        effective_from: datetime | None = None,
    ) -> None:
        """Price `model` from `effective_from` (default now) until its next price."""
        price = ModelPrice.of(model, input_per_1m, output_per_1m, effective_from)
        await (await self._open()).set_model_price(price)

    async def set_credit_price(self, usd_per_credit: Amount, effective_from: datetime | None = None) -> None:
        """Set the revenue of one credit from `effective_from` (default now) until the next price."""
        price = CreditPrice.of(usd_per_credit, effective_from)
        await (await self._open()).set_credit_price(price)

    async def close(self) -> None:
        repository, self._repository = self._repository, None
        if repository is not None:
            await repository.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class _LoopThread:
    """An event loop running in a daemon thread, for calling coroutines from blocking code."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coroutine.close()
            raise RuntimeError("a blocking MetricsStore method was called from its own event loop")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class MetricsStore:
    """The blocking face of `AsyncMetricsStore`: the same methods, the same behaviour."""

    def __init__(self, url: str | URL | None = None) -> None:
        self._store = AsyncMetricsStore(url)
        self.url = self._store.url
        self._loop = _LoopThread(name=f"action-metrics {display_url(self.url)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({display_url(self.url)!r})"

    def open(self) -> Self:
        self._loop.call(self._store.open())
        return self

    def emit(self, metric: ActionMetric) -> None:
        self._loop.call(self._store.emit(metric))

    def emit_many(self, metrics: Iterable[ActionMetric]) -> None:
        for batch in metric_batches(metrics):  # drawn here: the caller's iterable stays on its thread
            self._loop.call(self._store.emit_many(batch))

    def flush(self) -> None:
        self._loop.call(self._store.flush())

    def query(self, **filters: Unpack[Filters]) -> list[ActionMetric]:
        return self._loop.call(self._store.query(**filters))

    def aggregate(self, **filters: Unpack[Filters]) -> Aggregate:
        return self._loop.call(self._store.aggregate(**filters))

    def set_model_price(
        self,
        model: str,
        input_per_1m: Amount,
        output_per_1m: Amount,
        effective_from: datetime | None = None,
    ) -> None:
        self._loop.call(self._store.set_model_price(model, input_per_1m, output_per_1m, effective_from))

    def set_credit_price(self, usd_per_credit: Amount, effective_from: datetime | None = None) -> None:
        self._loop.call(self._store.set_credit_price(usd_per_credit, effective_from))

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.call(self._store.close())
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
