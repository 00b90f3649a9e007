"""SQLite: the town index carries what the aggregates read of each action, as PostgreSQL's has since
0008. SQLite has no INCLUDE, so the columns follow the key (town, timestamp): the index still serves
every search by town and time, and one town's actions are read from it alone, not looked up one by
one in the table (a town's 200k actions over 90 days at 10M: ~0.2 s a pass, most of it reading the
table's pages, against ~0.02 s). The dashboard page of one town at 10M actions: 2.4 s -> 0.85-1.07 s.

Costs: 30-36 s to build at 10M actions, ~6% more disk (360 MB at 10M), and a wider index entry per
write. The model declares the index as PostgreSQL has it; `schema.compared_on` leaves the SQLite one
out of autogenerate's comparison (SQLAlchemy's Index cannot say "these columns after the key" for
SQLite alone).

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_action_metrics_town_id_timestamp"
CARRIED = (
    "user_id",
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
"""The columns the aggregates and breakdowns read of a town's actions, at 0011."""


def _define(columns: Sequence[str]) -> None:
    if op.get_context().dialect.name != "sqlite":
        return
    op.drop_index(NAME, table_name="action_metrics")
    op.create_index(NAME, "action_metrics", ["town_id", "timestamp", *columns])


def upgrade() -> None:
    _define(CARRIED)


def downgrade() -> None:
    _define(())
