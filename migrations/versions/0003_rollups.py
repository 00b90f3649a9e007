"""Rollups: action_metrics_rollup and action_metrics_rollup_detail (sums per hour or day and level; the
second for the levels of every town, action and model), action_metrics_latency_histogram
(latency bins per bucket) and action_metrics_rollup_state (how far they reach); the views
action_metrics_daily (re-created to read from them), action_metrics_hourly, and for dashboards that
sum per day, town or model, action_metrics_daily_by_model and action_metrics_daily_by_town.

The tables start empty, with nothing closed: every question reads raw rows until the rollups are
built. `action-metrics db upgrade` builds them right after this migration, a day per transaction
with its progress on the console (interrupted, it resumes where it stopped); otherwise the writers
build them a bounded step per batch. Downgrading drops them; the raw rows are untouched.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from action_metrics.views import create_views, drop_views, grants_kept

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY_COLUMNS = (
    ("grain", sa.String(8)),
    ("town_id", sa.String(256)),
    ("action_type", sa.String(64)),
    ("start", sa.DateTime(timezone=True)),
    ("model", sa.String(128)),
)
# Each action's tokens and credits fit 64 bits, their sums need not: NUMERIC on PostgreSQL.
TOKEN_SUM = sa.BigInteger().with_variant(sa.Numeric(38, 0), "postgresql")
SUM_COLUMNS = (
    ("count", sa.BigInteger()),
    ("tokens_in", TOKEN_SUM),
    ("tokens_out", TOKEN_SUM),
    ("credits_charged", TOKEN_SUM),
    ("latency_ms_sum", sa.Double()),
    ("credited_count", sa.BigInteger()),
    ("tokens_in_per_credit", sa.Double()),
    ("tokens_out_per_credit", sa.Double()),
)


NEW_VIEWS = (
    "action_metrics_daily",
    "action_metrics_hourly",
    "action_metrics_daily_by_model",
    "action_metrics_daily_by_town",
)


def _key() -> list[sa.Column[object]]:
    return [sa.Column(name, type_, nullable=False) for name, type_ in KEY_COLUMNS]


def upgrade() -> None:
    op.create_table(
        "action_metrics_rollup",
        *_key(),
        *(sa.Column(name, type_, nullable=False) for name, type_ in SUM_COLUMNS),
        sa.PrimaryKeyConstraint(*(name for name, _ in KEY_COLUMNS), name="pk_action_metrics_rollup"),
        sqlite_with_rowid=False,
    )
    # The levels of every town, action and model, read an hour or a day at a time: time first.
    op.create_table(
        "action_metrics_rollup_detail",
        *_key(),
        *(sa.Column(name, type_, nullable=False) for name, type_ in SUM_COLUMNS),
        sa.PrimaryKeyConstraint(
            "grain", "start", "town_id", "action_type", "model", name="pk_action_metrics_rollup_detail"
        ),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "action_metrics_latency_histogram",
        *_key(),
        sa.Column("bin", sa.Integer(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        # On PostgreSQL the key's index also holds the count: a level's bins are read from it alone.
        sa.PrimaryKeyConstraint(
            *(name for name, _ in KEY_COLUMNS),
            "bin",
            name="pk_action_metrics_latency_histogram",
            postgresql_include=["count"],
        ),
        sqlite_with_rowid=False,
    )
    state = op.create_table(
        "action_metrics_rollup_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("hours_closed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("days_closed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("raw_kept_from", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_action_metrics_rollup_state"),
    )
    op.bulk_insert(state, [{"id": 1}])
    if op.get_context().dialect.name == "postgresql":
        # A level is a grain and which of town and action are '': the planner must know how these
        # go together, or it takes a read of one level for a good part of the table and scans it
        # whole (measured: 66 ms instead of 10 for a day-level histogram at 1M actions).
        for table in ("action_metrics_rollup", "action_metrics_latency_histogram"):
            op.execute(f"CREATE STATISTICS {table}_level (mcv) ON grain, town_id, action_type FROM {table}")
        # The daily and hourly views group by the UTC day or hour of `start`: with these, a view
        # asked for a range of days or hours reads those rows only (at 10M actions the hourly view
        # over the last 24 hours went from 800 ms to 134). PostgreSQL pushes the view's filter down
        # to the expression; SQLite does not push it through the views' GROUP BY.
        op.execute(
            "CREATE INDEX ix_action_metrics_rollup_detail_day ON action_metrics_rollup_detail "
            "(((start AT TIME ZONE 'UTC')::date)) WHERE grain = 'day'"
        )
        op.execute(
            "CREATE INDEX ix_action_metrics_rollup_detail_hour ON action_metrics_rollup_detail "
            "((date_trunc('hour', start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')) WHERE grain = 'hour'"
        )
        # The price tables stay below autovacuum's thresholds; without statistics the planner
        # misjudges every join on them.
        op.execute("ANALYZE model_prices, credit_prices")
    with grants_kept(["action_metrics_daily"]):
        drop_views(["action_metrics_daily"])
        create_views([(view, "0003") for view in NEW_VIEWS])


def downgrade() -> None:
    with grants_kept(["action_metrics_daily"]):
        drop_views(reversed(NEW_VIEWS))
        create_views([("action_metrics_daily", "0001")])
    op.drop_table("action_metrics_rollup_state")
    op.drop_table("action_metrics_latency_histogram")
    op.drop_table("action_metrics_rollup_detail")
    op.drop_table("action_metrics_rollup")
