"""Token kinds, cache prices and errors.

- cache_read_tokens, cache_write_tokens and reasoning_tokens on every action and in every rollup
  (summed, with their sums per credit for the mean margin); existing actions get 0 of each, which is
  what they had. Cache read and write prices per model (NULL: the input price). The views are
  re-created with the cost of the contract:

      ((tokens_in - cache_read - cache_write) x input + cache_read x cache_read_price
       + cache_write x cache_write_price + tokens_out x output) / 1e6

- `error` on every action (NULL: a success), moved from the `error` key of the metadata where
  `@instrument_action` and the span processor put it until now, and `error_count` in the rollups,
  whose latency histograms now count successful actions only. So the rollups of the actions still
  stored are emptied here and rebuilt from them (by `action-metrics db upgrade` right after, as in
  0003: a day per transaction, resumable); those of actions pruned before this upgrade are kept as
  they are, with no errors counted (their raw rows are gone).

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


# What failed, from the metadata's `error` key (its text, or 'error' when it holds no text).
_ERROR_FROM_METADATA = {
    "postgresql": """
UPDATE action_metrics
SET error = left(COALESCE(metadata ->> 'error', 'error'), 256)
WHERE metadata ? 'error'
""",
    "sqlite": """
UPDATE action_metrics
SET error = substr(COALESCE(CAST(json_extract(metadata, '$.error') AS TEXT), 'error'), 1, 256)
WHERE json_type(metadata, '$.error') IS NOT NULL
""",
}
_KEPT = "(SELECT raw_kept_from FROM action_metrics_rollup_state)"


def _rebuild_kept_rollups() -> None:
    """Empty the rollups of the actions still stored and mark them unbuilt, so that `action-metrics
    db upgrade` builds them again; the rollups of pruned actions stay."""
    kept = f"({_KEPT} IS NULL OR start >= {_KEPT})"
    for table in (*ROLLUPS, "action_metrics_latency_histogram"):
        op.execute(f"DELETE FROM {table} WHERE {kept}")
    op.execute(
        f"UPDATE action_metrics_rollup_state SET hours_closed_until = {_KEPT}, days_closed_until = {_KEPT}"
    )


def upgrade() -> None:
    with grants_kept(VIEWS):
        drop_views(reversed(VIEWS))
        for kind in TOKEN_KINDS:
            op.add_column(
                "action_metrics", sa.Column(kind, sa.BigInteger(), nullable=False, server_default="0")
            )
        op.add_column("action_metrics", sa.Column("error", sa.String(256), nullable=True))
        op.execute(_ERROR_FROM_METADATA[op.get_context().dialect.name])
        for table in ROLLUPS:
            for kind in TOKEN_KINDS:
                op.add_column(table, sa.Column(kind, TOKEN_SUM, nullable=False, server_default="0"))
            for kind in TOKEN_KINDS[:2]:
                op.add_column(
                    table, sa.Column(f"{kind}_per_credit", sa.Double(), nullable=False, server_default="0")
                )
            op.add_column(
                table, sa.Column("error_count", sa.BigInteger(), nullable=False, server_default="0")
            )
        for kind in ("cache_read_per_1m", "cache_write_per_1m"):
            op.add_column("model_prices", sa.Column(kind, PRICE, nullable=True))
        _rebuild_kept_rollups()
        create_views([(view, "0004") for view in VIEWS])


def downgrade() -> None:
    with grants_kept(VIEWS):
        drop_views(reversed(VIEWS))
        # ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later): no table copy, WITHOUT ROWID kept.
        for kind in ("cache_read_per_1m", "cache_write_per_1m"):
            op.drop_column("model_prices", kind)
        for table in ROLLUPS:
            op.drop_column(table, "error_count")
            for kind in TOKEN_KINDS[:2]:
                op.drop_column(table, f"{kind}_per_credit")
            for kind in TOKEN_KINDS:
                op.drop_column(table, kind)
        for kind in TOKEN_KINDS:
            op.drop_column("action_metrics", kind)
        # Lost for good, as `action-metrics db downgrade` warns: the token kinds, and every error the
        # metadata does not also hold (`@instrument_action` writes it there, `ActionMetric(error=...)`
        # alone does not); the rollups of a pruned period keep no such sums or counts either.
        op.drop_column("action_metrics", "error")
        _rebuild_kept_rollups()  # 0003's histograms count failed actions too
        create_views(
            [
                ("model_price_periods", "0002"),
                ("action_metrics_priced", "0002"),
                *((view, "0003") for view in VIEWS[2:]),
            ]
        )
