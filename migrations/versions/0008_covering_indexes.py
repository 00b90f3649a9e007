"""Covering indexes (issues 9, 13, 14): on PostgreSQL the indexes of the raw actions by town, user and
citizen also carry the columns that `aggregate()`, `breakdown()` and the checks read of those
actions, so one town's (user's, citizen's) actions are read by an index-only scan rather than one
heap fetch per action, scattered over the whole table (the page's top users of one town at 1M
actions: 616 ms before, 141 ms after; its LOD3 check 594 ms and 120 ms).

Each index is built under a temporary name, then swapped in for the plain one, in the migration's
transaction: writers of action_metrics wait while it builds (about a minute per index at 10M actions
on a small machine). SQLite has no INCLUDE: its indexes stay as they are.

Also on PostgreSQL: the rollup in time order with its sums (`ix_action_metrics_rollup_time`), which
`breakdown()` reads closed days and hours of every town by (grain, start) from: an index-only scan
instead of a scan of the whole rollup (400 -> 320 ms of the server's CPU for towns x Berlin days over
90 days). SQLite reads those by its primary key, a town at a time.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READ = (
    "action_type",
    "model",
    "tokens_in",
    "tokens_out",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "credits_charged",
    "latency_ms",
    "error",
)
"""The columns the aggregates read of each action, at 0008."""

COVERED = {
    "town_id": ("user_id", *READ),
    "user_id": ("town_id", *READ),
    "citizen_id": ("town_id", "user_id", *READ),
}
"""Each index's first column and the columns it carries besides its key (first column, timestamp)."""


def _swap(first: str, included: Sequence[str]) -> None:
    name = f"ix_action_metrics_{first}_timestamp"
    building = f"{name}_new"
    op.create_index(building, "action_metrics", [first, "timestamp"], postgresql_include=list(included))
    op.drop_index(name, table_name="action_metrics")
    op.execute(f"ALTER INDEX {building} RENAME TO {name}")


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
"""The rollup's summed columns at 0008 (a summed column added later is added here by its migration)."""


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for first, included in COVERED.items():
        _swap(first, included)
    op.create_index(
        "ix_action_metrics_rollup_time",
        "action_metrics_rollup",
        ["grain", "action_type", "start", "town_id", "model"],
        postgresql_include=list(ROLLUP_SUMS),
    )


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.drop_index("ix_action_metrics_rollup_time", table_name="action_metrics_rollup")
    for first in COVERED:
        _swap(first, ())
