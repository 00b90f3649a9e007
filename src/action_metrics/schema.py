"""The tables as SQLAlchemy models, and the views as read-only table shapes.

The migrations in `migrations/` create all of this; `tests/test_migrations.py` checks with alembic's
autogenerate that these models and the migrated database never drift apart.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Dialect,
    Double,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    TypeDecorator,
    Uuid,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

PRICE = Numeric(20, 9)
"""USD with nine decimals: exact on PostgreSQL; SQLite keeps it as a REAL."""

MONEY = Numeric(38, 15)
"""A computed amount of USD in the views."""


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC and gives back aware UTC datetimes on both backends.

    SQLite has no time zones: SQLAlchemy stores its text form, which sorts in time order as long as
    every value is UTC, so values are converted before they are bound.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime reached the database layer; convert it to UTC first")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSON_DOCUMENT = JSON().with_variant(postgresql.JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class ActionMetricRow(Base):
    """One row per action."""

    __tablename__ = "action_metrics"

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    action_type: Mapped[str] = mapped_column(String(64), nullable=False)
    user_id: Mapped[str] = mapped_column(String(256), nullable=False)
    town_id: Mapped[str] = mapped_column(String(256), nullable=False)
    citizen_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    model: Mapped[str] = mapped_column(String(128), nullable=False)
    tokens_in: Mapped[int] = mapped_column(BigInteger(), nullable=False)
    tokens_out: Mapped[int] = mapped_column(BigInteger(), nullable=False)
    latency_ms: Mapped[float] = mapped_column(Double(), nullable=False)
    credits_charged: Mapped[int] = mapped_column(BigInteger(), nullable=False)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON_DOCUMENT, nullable=False)

    __table_args__ = (
        # Every filter of query()/aggregate() is an equality plus a time range, newest first.
        Index(None, "timestamp"),
        Index(None, "town_id", "timestamp"),
        Index(None, "user_id", "timestamp"),
        Index(None, "action_type", "timestamp"),
        Index(None, "model", "timestamp"),
        Index(None, "citizen_id", "timestamp"),
    )


class ModelPriceRow(Base):
    """USD per 1M tokens of one model, in force from `effective_from` until the next row's."""

    __tablename__ = "model_prices"

    id: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), nullable=False)
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    input_per_1m: Mapped[Decimal] = mapped_column(PRICE, nullable=False)
    output_per_1m: Mapped[Decimal] = mapped_column(PRICE, nullable=False)

    __table_args__ = (Index(None, "model", "effective_from", unique=True),)


class CreditPriceRow(Base):
    """USD earned per credit, in force from `effective_from` until the next row's."""

    __tablename__ = "credit_prices"

    id: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=True)
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    usd_per_credit: Mapped[Decimal] = mapped_column(PRICE, nullable=False)

    __table_args__ = (Index(None, "effective_from", unique=True),)


action_metrics = cast(Table, ActionMetricRow.__table__)
model_prices = cast(Table, ModelPriceRow.__table__)
credit_prices = cast(Table, CreditPriceRow.__table__)

# The views, for building queries against them. They live in their own MetaData so that
# create_all() and autogenerate never mistake them for tables: migrations create them from sql/.
view_metadata = MetaData()

_METRIC_COLUMNS = [(column.name, column.type) for column in action_metrics.columns]

action_metrics_priced = Table(
    "action_metrics_priced",
    view_metadata,
    *(Column(name, type_) for name, type_ in _METRIC_COLUMNS),
    Column("cost_usd", MONEY),
    Column("revenue_usd", MONEY),
    Column("margin", Double()),
    Column("priced", Boolean()),
    Column("input_per_1m", PRICE),
    Column("output_per_1m", PRICE),
    Column("usd_per_credit", PRICE),
)

action_metrics_daily = Table(
    "action_metrics_daily",
    view_metadata,
    Column("day", Date()),
    Column("town_id", String()),
    Column("action_type", String()),
    Column("model", String()),
    Column("count", BigInteger()),
    Column("tokens_in", BigInteger()),
    Column("tokens_out", BigInteger()),
    Column("credits_charged", BigInteger()),
    Column("cost_usd", MONEY),
    Column("revenue_usd", MONEY),
    Column("unpriced_count", BigInteger()),
    Column("avg_latency_ms", Double()),
    Column("p50_latency_ms", Double()),
    Column("p95_latency_ms", Double()),
)
