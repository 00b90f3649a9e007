"""Latency sketches (issue 13): action_metrics_latency_sketch, one row per bucket (town x UTC hour,
town x UTC day, model x UTC hour) holding its latency histogram as one blob; the rollup's sums per
town, model and UTC hour (the edge hours of a town's local day); rollup_state.sketches_from.

The hourly sums per town are summed here from the hourly rows per town, action and model (which
every closed hour has, pruned or not). The sketches of the buckets already closed are written by
`action-metrics db upgrade` right after this migration, from the raw rows, a day per transaction
back from `sketches_from` (interrupted, it resumes); until then `breakdown()` reads those days the
way it did before.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SUMS = (
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
"""The rollup's summed columns at 0007."""


def upgrade() -> None:
    op.create_table(
        "action_metrics_latency_sketch",
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key", sa.String(256), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("latency_sum", sa.Double(), nullable=False),
        sa.Column("zero_count", sa.BigInteger(), nullable=False),
        sa.Column("bins", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("level", "start", "key", name="pk_action_metrics_latency_sketch"),
    )
    op.add_column("action_metrics_rollup_state", sa.Column("sketches_from", sa.DateTime(timezone=True)))
    op.execute("UPDATE action_metrics_rollup_state SET sketches_from = hours_closed_until")
    # SQLite's SUM fails past 2**63; TOTAL is a double, stored back as an INTEGER whenever it is one.
    total = "TOTAL" if op.get_context().dialect.name == "sqlite" else "SUM"
    columns = ", ".join(f'"{name}"' for name in SUMS)
    sums = ", ".join(f'{total}("{name}")' for name in SUMS)
    op.execute(
        f"INSERT INTO action_metrics_rollup (grain, town_id, action_type, start, model, {columns}) "
        f"SELECT 'hour', town_id, '', start, model, {sums} FROM action_metrics_rollup_detail "
        "WHERE grain = 'hour' GROUP BY town_id, start, model"
    )


def downgrade() -> None:
    op.execute(
        "DELETE FROM action_metrics_rollup WHERE grain = 'hour' AND town_id <> '' AND action_type = ''"
    )
    op.drop_column("action_metrics_rollup_state", "sketches_from")
    op.drop_table("action_metrics_latency_sketch")
