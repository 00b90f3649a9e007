"""The per-model and per-town daily views take their percentiles from the rollups' latency
histograms (issue 9): action_metrics_latency_bins, and action_metrics_daily_by_model and
action_metrics_daily_by_town redefined.

Their p50/p95_latency_ms columns sorted each group's raw rows: a panel of p95 per model and day over
90 days took 1.5 s at 1M actions and grew with the actions stored (ten times that at 10M), and
gave NULL for every day `db prune` had removed. Now a day's percentiles are merged from its
histogram (per model; per town and model) and the open hour's (per town: the open day's) raw
latencies, interpolated as percentile_cont over the bins' representatives: within 1% of the exact
value, as `aggregate()`'s, whatever the number of actions, and kept after a prune.

The histograms hold bins, not latencies; a new table, action_metrics_latency_bins, gives the latency
each bin stands for, so that SQLite's views need no exp() (a SQLite may be built without its math
functions, and a view must read in any client); PostgreSQL's compute it with exp(), a fifth faster
than the join. It is filled here with every bin a stored latency can fall in (43,277 rows,
sql/latency_bins/0020.sql) and never changes.

On PostgreSQL both percentiles come from one read of a group's bins (a LATERAL subquery, left out of
a query that selects neither); on SQLite each is a subquery of its own.

action_metrics_daily and action_metrics_hourly keep exact percentiles over raw rows: no histogram is
kept per town, action type and model.

Downgrading restores 0017's view definitions and drops the table.

Revision ID: 0020
Revises: 0019
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from action_metrics.migrate import read_sql
from action_metrics.views import redefine_views

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BINS = "action_metrics_latency_bins"
VIEWS = ("action_metrics_daily_by_model", "action_metrics_daily_by_town")
PREVIOUS = "0017"
"""Both views' definition before this revision (sql/views/<view>/0017.<dialect>.sql)."""


def upgrade() -> None:
    op.create_table(
        BINS,
        sa.Column("bin", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("value_ms", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("bin", name=f"pk_{BINS}"),
        sqlite_with_rowid=False,
    )
    op.execute(read_sql("latency_bins", "0020.sql"))
    redefine_views(dict.fromkeys(VIEWS, "0020"))


def downgrade() -> None:
    redefine_views(dict.fromkeys(VIEWS, PREVIOUS))
    op.drop_table(BINS)
