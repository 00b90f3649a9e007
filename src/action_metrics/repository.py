"""The repository: owns the engine's connections and transactions, so callers never touch one.

It is also the one place where the database's exceptions become action-metrics' own (`DatabaseError`s,
see `errors`): everything above it catches those alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from action_metrics import migrate
from action_metrics.aggregate import Aggregate, aggregate_from_rows, aggregate_statement
from action_metrics.charges import ChargeAudit, audit_statement
from action_metrics.dialects import WRITE, Backend, display_url
from action_metrics.errors import (
    ActionMetricsError,
    DatabaseError,
    DatabaseUnavailable,
    DataRejected,
    StatementRefused,
)
from action_metrics.model import ActionMetric
from action_metrics.pricing import CreditPrice, ModelPrice
from action_metrics.query import MetricFilter, metric_from_row, metric_rows, metrics_statement
from action_metrics.schema import action_metrics, credit_prices, model_prices

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


def _one_line(error: BaseException) -> str:
    """The driver's error in one line, without SQLAlchemy's statement and parameters."""
    reason = getattr(error, "orig", None) or error
    first_line = next(iter(str(reason).strip().splitlines()), "")
    return f"{type(reason).__name__}: {first_line}"


def _rejects_data(error: DBAPIError) -> bool:
    """SQLSTATE classes 22 and 23 (DataError, IntegrityError in DB-API terms; also when a driver's
    bulk path surfaced them as a plain DBAPIError)."""
    if isinstance(error, IntegrityError | DataError):
        return True
    sqlstate = getattr(error.orig, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in ("22", "23")


def translate(error: BaseException, where: str) -> DatabaseError | None:
    """Our exception for a failure of the database at `where`; None for anything else (a bug)."""
    if isinstance(error, ActionMetricsError):
        return None  # already ours (a schema check, a closed store)
    reason = _one_line(error)
    if isinstance(error, DBAPIError):
        if not error.connection_invalidated and _rejects_data(error):
            return DataRejected(f"{where} rejected the data: {reason}", reason)
        if error.connection_invalidated or isinstance(error, OperationalError | InterfaceError):
            return DatabaseUnavailable(f"cannot use {where}: {reason}", reason)
        return StatementRefused(
            f"{where} refused the statement: {reason}; is its schema at head (action-metrics db upgrade) "
            "and may this role use it?",
            reason,
        )
    if isinstance(error, OSError | PoolTimeout):  # refused, unresolvable, timed out, unopenable
        return DatabaseUnavailable(f"cannot use {where}: {reason}", reason)
    return None


class MetricsRepository:
    """Reads and writes action metrics and prices on one database."""

    def __init__(self, engine: AsyncEngine, backend: Backend) -> None:
        self.engine = engine
        self.backend = backend
        self._insert_metrics = backend.insert(action_metrics).on_conflict_do_nothing(index_elements=["id"])
        self._where = display_url(backend.given_url)

    @contextmanager
    def _database_errors(self) -> Iterator[None]:
        """Re-raise a database failure inside the block as the `DatabaseError` `translate` makes."""
        try:
            yield
        except Exception as error:
            translated = translate(error, self._where)
            if translated is None:
                raise
            raise translated from error

    @asynccontextmanager
    async def _write_transaction(self) -> AsyncIterator[AsyncConnection]:
        with self._database_errors():
            async with self.engine.connect() as connection:
                connection = await connection.execution_options(**{WRITE: True})
                async with connection.begin():
                    yield connection

    @asynccontextmanager
    async def _read_connection(self) -> AsyncIterator[AsyncConnection]:
        with self._database_errors():
            async with self.engine.connect() as connection:
                yield connection

    async def ensure_schema(self) -> None:
        """Migrate a brand-new SQLite file; otherwise insist that the schema is at head (see `migrate`)."""
        with self._database_errors():
            await migrate.ensure_schema(self.engine, self.backend)

    async def run_migrations(self, action: Callable[[Config], None]) -> None:
        """An alembic command (`migrate.upgrade_to`, `migrate.downgrade_to`) on this database."""
        with self._database_errors():
            await migrate.run_migrations(self.engine, action)

    async def schema_revision(self) -> str | None:
        async with self._read_connection() as connection:
            return await migrate.revision_of(connection)

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
        async with self._read_connection() as connection:
            result = await connection.execute(metrics_statement(metric_filter))
            return [metric_from_row(row) for row in result]

    async def aggregate(self, metric_filter: MetricFilter) -> Aggregate:
        async with self._read_connection() as connection:
            result = await connection.execute(aggregate_statement(metric_filter, self.backend))
            return aggregate_from_rows(result.mappings().all())

    async def audit_charges(self, metric_filter: MetricFilter, credits: int) -> ChargeAudit:
        async with self._read_connection() as connection:
            result = await connection.execute(audit_statement(metric_filter, credits, self.backend))
            return ChargeAudit(**result.mappings().one())

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
