"""The action_metrics table, effective-dated model and credit prices seeded with the seed's values,
and the views action_metrics_priced and action_metrics_daily (from sql/views/).

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from action_metrics.migrate import read_view_sql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEGINNING_OF_TIME = datetime(1, 1, 1, tzinfo=UTC)
SEED_MODEL_PRICES = {  # USD per 1M (input, output) tokens; template and cached are known to be free
    "haiku": ("0.25", "1.25"),
    "sonnet": ("3.00", "15.00"),
    "opus": ("15.00", "75.00"),
    "template": ("0", "0"),
    "cached": ("0", "0"),
}
SEED_USD_PER_CREDIT = "0.006"
VIEWS = ("action_metrics_priced", "action_metrics_daily")  # in dependency order


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    price = sa.Numeric(20, 9)
    op.create_table(
        "action_metrics",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("timestamp", timestamp, nullable=False),
        sa.Column("action_type", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("town_id", sa.String(256), nullable=False),
        sa.Column("citizen_id", sa.String(256), nullable=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("tokens_in", sa.BigInteger(), nullable=False),
        sa.Column("tokens_out", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("credits_charged", sa.BigInteger(), nullable=False),
        sa.Column("metadata", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_action_metrics"),
    )
    for columns in (
        ["timestamp"],
        ["town_id", "timestamp"],
        ["user_id", "timestamp"],
        ["action_type", "timestamp"],
        ["model", "timestamp"],
        ["citizen_id", "timestamp"],
    ):
        op.create_index(f"ix_action_metrics_{'_'.join(columns)}", "action_metrics", columns)

    model_prices = op.create_table(
        "model_prices",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("effective_from", timestamp, nullable=False),
        sa.Column("input_per_1m", price, nullable=False),
        sa.Column("output_per_1m", price, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_model_prices"),
    )
    op.create_index(
        "ix_model_prices_model_effective_from",
        "model_prices",
        ["model", "effective_from"],
        unique=True,
    )
    credit_prices = op.create_table(
        "credit_prices",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("effective_from", timestamp, nullable=False),
        sa.Column("usd_per_credit", price, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_credit_prices"),
    )
    op.create_index("ix_credit_prices_effective_from", "credit_prices", ["effective_from"], unique=True)

    op.bulk_insert(
        model_prices,
        [
            {
                "model": model,
                "effective_from": BEGINNING_OF_TIME,
                "input_per_1m": Decimal(input_price),
                "output_per_1m": Decimal(output_price),
            }
            for model, (input_price, output_price) in SEED_MODEL_PRICES.items()
        ],
    )
    op.bulk_insert(
        credit_prices,
        [{"effective_from": BEGINNING_OF_TIME, "usd_per_credit": Decimal(SEED_USD_PER_CREDIT)}],
    )

    dialect = op.get_context().dialect.name
    for view in VIEWS:
        op.execute(sa.text(read_view_sql(view, revision, dialect)))


def downgrade() -> None:
    for view in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {view}")
    op.drop_table("credit_prices")
    op.drop_table("model_prices")
    op.drop_table("action_metrics")
