"""PostgreSQL: action_metrics_daily_by_town takes the closed hours of the open day from the rollup's
hourly rows per town and model (kept since 0007) instead of those per town, action and model: ~250
rows an hour instead of ~2,750 at 50 towns, 11 action types and 5 models, read from the rollup's
time-ordered index (0008). Summed per town over 90 days at 10M actions late in a UTC day: 140-147 ms
-> 68-98 ms.

SQLite keeps revision 0004's definition: its rollup is keyed by town before time, so the same rows
would be found by reading every hour of every town.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from action_metrics.views import redefine_views

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEW = "action_metrics_daily_by_town"


def _define(view_revision: str) -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    redefine_views({VIEW: view_revision})


def upgrade() -> None:
    _define("0010")


def downgrade() -> None:
    _define("0004")
