"""Token kinds and cache prices: cache_read_tokens, cache_write_tokens and reasoning_tokens on every action
and in every rollup (summed, with their sums per credit for the mean margin), cache read and write
prices per model (NULL: the input price), and the views re-created with the cost of the contract:

    ((tokens_in - cache_read - cache_write) x input + cache_read x cache_read_price
     + cache_write x cache_write_price + tokens_out x output) / 1e6

Existing actions and rollups get 0 of each kind, which is what they had.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from action_metrics.views import create_views, drop_views, grants_kept

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TOKEN_KINDS = ("cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
TOKEN_SUM = sa.BigInteger().with_variant(sa.Numeric(38, 0), "postgresql")
PRICE = sa.Numeric(20, 9)
ROLLUPS = ("action_metrics_rollup", "action_metrics_rollup_detail")
# Every view that reads a changed table or prices tokens, in dependency order.
VIEWS = (
    "model_price_periods",
    "action_metrics_priced",
    "action_metrics_daily",
    "action_metrics_hourly",
    "action_metrics_daily_by_model",
    "action_metrics_daily_by_town",
)


def upgrade() -> None:
    with grants_kept(VIEWS):
        drop_views(reversed(VIEWS))
        for kind in TOKEN_KINDS:
            op.add_column(
                "action_metrics", sa.Column(kind, sa.BigInteger(), nullable=False, server_default="0")
            )
        for table in ROLLUPS:
            for kind in TOKEN_KINDS:
                op.add_column(table, sa.Column(kind, TOKEN_SUM, nullable=False, server_default="0"))
            for kind in TOKEN_KINDS[:2]:
                op.add_column(
                    table, sa.Column(f"{kind}_per_credit", sa.Double(), nullable=False, server_default="0")
                )
        for kind in ("cache_read_per_1m", "cache_write_per_1m"):
            op.add_column("model_prices", sa.Column(kind, PRICE, nullable=True))
        create_views([(view, "0004") for view in VIEWS])


def downgrade() -> None:
    with grants_kept(VIEWS):
        drop_views(reversed(VIEWS))
        # ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later): no table copy, WITHOUT ROWID kept.
        for kind in ("cache_read_per_1m", "cache_write_per_1m"):
            op.drop_column("model_prices", kind)
        for table in ROLLUPS:
            for kind in TOKEN_KINDS[:2]:
                op.drop_column(table, f"{kind}_per_credit")
            for kind in TOKEN_KINDS:
                op.drop_column(table, kind)
        for kind in TOKEN_KINDS:
            op.drop_column("action_metrics", kind)
        create_views(
            [
                ("model_price_periods", "0002"),
                ("action_metrics_priced", "0002"),
                *((view, "0003") for view in VIEWS[2:]),
            ]
        )
