"""SQLite: the rollup in time order with its sums (`ix_action_metrics_rollup_time`, PostgreSQL's since
0008), and `action_metrics_daily_by_town` taking the closed hours of the open day from the rollup's
hourly rows per town and model through it, as PostgreSQL's has since 0010: ~250 rows an hour instead
of ~2,750 (every town, action and model) at 50 towns, 11 action types and 5 models. SQLite has no
INCLUDE, so the sums follow the key (grain, action_type, start, town_id, model): the view reads both
its daily and its hourly rows from the index alone. Summed per town over 90 days at 10M actions late
in a UTC day (23 closed hours in the open day): 196 ms -> 98 ms.

Costs: ~1.4 s to build at 10M actions (580k rollup rows), and a second copy of each rollup row,
written when a bucket closes. The index is on an expression-free column list but carries columns
after its key that PostgreSQL's INCLUDEs, so the models do not declare it (`schema.EXPRESSION_INDEXES`
leaves it out of autogenerate's comparison); tests/test_migrations.py checks it on SQLite itself.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from action_metrics.views import redefine_views

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_action_metrics_rollup_time"
VIEW = "action_metrics_daily_by_town"
ROLLUP_SUMS = (
    "count",
    "tokens_in",
    "tokens_out",
    "credits_charged",
    "latency_ms_sum",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "error_count",
    "credited_count",
    "tokens_in_per_credit",
    "tokens_out_per_credit",
    "cache_read_tokens_per_credit",
    "cache_write_tokens_per_credit",
)
"""The rollup's summed columns at 0014 (a summed column added later is added here by its migration)."""


def upgrade() -> None:
    if op.get_context().dialect.name != "sqlite":
        return
    op.create_index(
        NAME, "action_metrics_rollup", ["grain", "action_type", "start", "town_id", "model", *ROLLUP_SUMS]
    )
    redefine_views({VIEW: "0014"})


def downgrade() -> None:
    if op.get_context().dialect.name != "sqlite":
        return
    redefine_views({VIEW: "0004"})
    op.drop_index(NAME, table_name="action_metrics_rollup")
