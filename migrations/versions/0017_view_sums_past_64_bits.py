"""The views action_metrics_daily, action_metrics_hourly, action_metrics_daily_by_town and
action_metrics_daily_by_model sum tokens and credits past 2**63 instead of failing. Each action's
tokens and credits may be up to 2**63 - 1 (the row checks allow it), so a group's sum need not fit
64 bits, and two such actions in one group failed every query over the view (so the dashboards
reading it):

- SQLite's SUM raised "integer overflow". The sums are now TOTAL, a double, as the Python API's
  (`dialects.sum_of_counts`), read as an INTEGER below 9.2e18 and as a REAL from there: exact
  integers below 2**53, never an error. revenue_usd is a TOTAL too, since a whole-dollar credit
  price is stored as an INTEGER.
- PostgreSQL cast each sum to bigint ("bigint out of range"). Tokens and credits are now the
  NUMERIC sums themselves, exact at any size (drivers read them as Decimal); the counts of actions
  stay bigint.

On SQLite the views also price the open hour's raw rows on their sums per bucket, group and price
period, as they price rollup rows, instead of row by row: a group's money was the sum of many rounded
doubles (one huge action among 20,000 tiny ones drifted 7e-6 USD; PostgreSQL's NUMERIC was exact),
and their money columns are REALs in every row (an INTEGER 0 where nothing was priced).

Each view's header comment says what its sums are. Downgrading restores the previous definitions.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from action_metrics.views import redefine_views

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PREVIOUS: dict[str, dict[str, str]] = {
    "sqlite": {
        "action_metrics_daily": "0004",
        "action_metrics_hourly": "0004",
        "action_metrics_daily_by_town": "0014",
        "action_metrics_daily_by_model": "0004",
    },
    "postgresql": {
        "action_metrics_daily": "0004",
        "action_metrics_hourly": "0004",
        "action_metrics_daily_by_town": "0010",
        "action_metrics_daily_by_model": "0004",
    },
}
"""Each view's definition before this revision, per dialect (sql/views/<view>/<revision>.<dialect>.sql)."""


def upgrade() -> None:
    redefine_views(dict.fromkeys(PREVIOUS[op.get_context().dialect.name], "0017"))


def downgrade() -> None:
    redefine_views(PREVIOUS[op.get_context().dialect.name])
