"""The repository: owns the engine's connections and transactions, so callers never touch one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from action_metrics.aggregate import Aggregate, aggregate_from_rows, aggregate_statement
from action_metrics.dialects import WRITE, Backend
from action_metrics.model import ActionMetric
from action_metrics.pricing import CreditPrice, ModelPrice
from action_metrics.query import MetricFilter, metric_from_row, metric_rows, metrics_statement
from action_metrics.schema import action_metrics, credit_prices, model_prices


class MetricsRepository:
    """Reads and writes action metrics and prices on one database."""

    def __init__(self, engine: AsyncEngine, backend: Backend) -> None:
        self.engine = engine
        self.backend = backend
        self._insert_metrics = backend.insert(action_metrics).on_conflict_do_nothing(index_elements=["id"])

    @asynccontextmanager
    async def _write_transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as connection:
            connection = await connection.execution_options(**{WRITE: True})
            async with connection.begin():
                yield connection

    async def insert(self, metrics: Sequence[ActionMetric]) -> None:
        """Store a batch atomically; ids already stored are skipped, so a re-sent batch is harmless.

        Batches big enough go through the driver's bulk path (COPY, executemany), which stores the
        same values as the plain INSERT at the driver's speed.
        """
        if not metrics:
            return
        async with self._write_transaction() as connection:
            if len(metrics) >= self.backend.bulk_insert_minimum:
                await self.backend.bulk_insert_metrics(connection, metrics)
            else:
                await connection.execute(self._insert_metrics, metric_rows(metrics))

    async def select(self, metric_filter: MetricFilter) -> list[ActionMetric]:
        async with self.engine.connect() as connection:
            result = await connection.execute(metrics_statement(metric_filter))
            return [metric_from_row(row) for row in result]

    async def aggregate(self, metric_filter: MetricFilter) -> Aggregate:
        async with self.engine.connect() as connection:
            result = await connection.execute(aggregate_statement(metric_filter, self.backend))
            return aggregate_from_rows(result.mappings().all())

    async def set_model_price(self, price: ModelPrice) -> None:
        """Insert, or replace the price of the same model from the same instant."""
        statement = self.backend.insert(model_prices).values(
            model=price.model,
            effective_from=price.effective_from,
            input_per_1m=price.input_per_1m,
            output_per_1m=price.output_per_1m,
        )
        statement = statement.on_conflict_do_update(
            index_elements=["model", "effective_from"],
            set_={
                "input_per_1m": statement.excluded.input_per_1m,
                "output_per_1m": statement.excluded.output_per_1m,
            },
        )
        async with self._write_transaction() as connection:
            await connection.execute(statement)

    async def set_credit_price(self, price: CreditPrice) -> None:
        statement = self.backend.insert(credit_prices).values(
            effective_from=price.effective_from, usd_per_credit=price.usd_per_credit
        )
        statement = statement.on_conflict_do_update(
            index_elements=["effective_from"],
            set_={"usd_per_credit": statement.excluded.usd_per_credit},
        )
        async with self._write_transaction() as connection:
            await connection.execute(statement)

    async def close(self) -> None:
        await self.engine.dispose()
