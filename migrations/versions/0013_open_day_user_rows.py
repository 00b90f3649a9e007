"""The open day's user rows: action_metrics_rollup_user's day rows and the 'user/day' sketches of
the day not closed yet hold its closed hours, added as each hour closes; rollup_state.user_hours_until
says how far. By user then reads that day as it reads a closed one, and only the actions since the
last closed hour raw: at 10M actions late in the day, ~5k rows instead of ~100k raw actions.

No data moves here: the next hour to close (a write, or `action-metrics db upgrade`) sums the open
day's closed hours from its raw rows. Downgrading deletes the open day's user rows and sketches,
which the earlier revisions write only when the day closes.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATE = "action_metrics_rollup_state"


def upgrade() -> None:
    op.add_column(STATE, sa.Column("user_hours_until", sa.DateTime(timezone=True)))


def downgrade() -> None:
    opened = f"(SELECT days_closed_until FROM {STATE})"
    op.execute(f"DELETE FROM action_metrics_rollup_user WHERE grain = 'day' AND start >= {opened}")
    op.execute(f"DELETE FROM action_metrics_latency_sketch WHERE level = 'user/day' AND start >= {opened}")
    op.drop_column(STATE, "user_hours_until")
