"""Closed buckets kept (issue 13): action_metrics_closed_buckets, a breakdown's rows for each closed
local day, week or month, and rollup_state.closed_buckets_generation.

A breakdown by town and local day over 90 days summed some 85,000 rollup rows on every call (about a
second at 10M actions): the local days of a zone are not the UTC days the rollups keep. Now the first
call stores each closed bucket's rows, and later calls read one row per bucket and compute only the
buckets still open (or cut by the window). A write that changes a closed bucket (an action that
arrives late, a price, a prune) deletes the stored rows from that moment on and counts the change in
`closed_buckets_generation`; a reader stores only if the count has not moved since its snapshot.

The table starts empty and fills as breakdowns are asked: nothing to backfill.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "action_metrics_closed_buckets"
STATE = "action_metrics_rollup_state"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("bucket_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rows", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("question", "bucket_start", name=f"pk_{TABLE}"),
    )
    op.create_index(f"ix_{TABLE}_bucket_end", TABLE, ["bucket_end"])
    op.add_column(
        STATE, sa.Column("closed_buckets_generation", sa.BigInteger(), nullable=False, server_default="0")
    )


def downgrade() -> None:
    op.drop_column(STATE, "closed_buckets_generation")
    op.drop_index(f"ix_{TABLE}_bucket_end", table_name=TABLE)
    op.drop_table(TABLE)
