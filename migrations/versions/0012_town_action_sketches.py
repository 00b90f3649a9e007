"""Latency sketches per town, action type and UTC day (level 'town-action/day' of
action_metrics_latency_sketch, keyed 'town/action'); rollup_state.town_actions_from.

The dashboard page's latency chart (p50/p95/p99 per action type and local day of one town) binned
all the town's raw rows over the window: at 10M actions, 200k rows for 90 days, 0.27 s (PostgreSQL)
to 0.33 s (SQLite) of the page's ~0.8-1.1 s. With a sketch per town, action and day it reads ~1,000
sketches and the raw rows of the local days' edge hours.

The key grows to 321 characters (a town of at most 256, '/', an action type of at most 64); on
SQLite the table is rebuilt for it (SQLite cannot change a column's type in place; ~220k sketches,
90 MB at 10M actions: seconds). The sketches of the days already closed are written by `action-metrics
db upgrade` right after this migration, from the raw rows, a day per transaction back from
`town_actions_from` (interrupted, it resumes; with progress); until then `breakdown()` reads those
days as it did before.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "action_metrics_latency_sketch"


def _sketch_table(key_length: int) -> sa.Table:
    """The table as it stands before the change (to rebuild it on SQLite without reflecting it:
    `--sql` has no database to reflect)."""
    return sa.Table(
        TABLE,
        sa.MetaData(),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key", sa.String(key_length), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("latency_sum", sa.Double(), nullable=False),
        sa.Column("zero_count", sa.BigInteger(), nullable=False),
        sa.Column("bins", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("level", "start", "key", name="pk_action_metrics_latency_sketch"),
    )


def _key_length(before: int, after: int) -> None:
    with op.batch_alter_table(TABLE, copy_from=_sketch_table(before)) as batch:
        batch.alter_column(
            "key", existing_type=sa.String(before), type_=sa.String(after), existing_nullable=False
        )


def upgrade() -> None:
    _key_length(256, 256 + 1 + 64)
    op.add_column("action_metrics_rollup_state", sa.Column("town_actions_from", sa.DateTime(timezone=True)))
    op.execute("UPDATE action_metrics_rollup_state SET town_actions_from = days_closed_until")


def downgrade() -> None:
    op.execute(f"DELETE FROM {TABLE} WHERE level = 'town-action/day'")
    op.drop_column("action_metrics_rollup_state", "town_actions_from")
    _key_length(256 + 1 + 64, 256)
