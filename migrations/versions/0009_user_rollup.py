"""The per-user rollup (issues 13, 14): action_metrics_rollup_user, the sums per user, model and UTC
day or month, and sketches per user and UTC day or month (levels 'user/day', 'user/month' of
action_metrics_latency_sketch); rollup_state.users_from.

The table starts empty, with `users_from` where the days are closed: `action-metrics db upgrade`
fills the closed days right after this migration, from the raw rows, a day per transaction back from
`users_from` (interrupted, it resumes), and each month once its first day is done; until then
`breakdown()` by user reads those days the way it did before.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TOKEN_SUM = sa.BigInteger().with_variant(sa.Numeric(38, 0), "postgresql")


def upgrade() -> None:
    op.create_table(
        "action_metrics_rollup_user",
        sa.Column("grain", sa.String(8), nullable=False),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("tokens_in", TOKEN_SUM, nullable=False),
        sa.Column("tokens_out", TOKEN_SUM, nullable=False),
        sa.Column("credits_charged", TOKEN_SUM, nullable=False),
        sa.Column("latency_ms_sum", sa.Double(), nullable=False),
        sa.Column("cache_read_tokens", TOKEN_SUM, nullable=False, server_default="0"),
        sa.Column("cache_write_tokens", TOKEN_SUM, nullable=False, server_default="0"),
        sa.Column("reasoning_tokens", TOKEN_SUM, nullable=False, server_default="0"),
        sa.Column("error_count", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("credited_count", sa.BigInteger(), nullable=False),
        sa.Column("tokens_in_per_credit", sa.Double(), nullable=False),
        sa.Column("tokens_out_per_credit", sa.Double(), nullable=False),
        sa.Column("cache_read_tokens_per_credit", sa.Double(), nullable=False, server_default="0"),
        sa.Column("cache_write_tokens_per_credit", sa.Double(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("grain", "start", "user_id", "model", name="pk_action_metrics_rollup_user"),
        sqlite_with_rowid=False,
    )
    op.add_column("action_metrics_rollup_state", sa.Column("users_from", sa.DateTime(timezone=True)))
    op.execute("UPDATE action_metrics_rollup_state SET users_from = days_closed_until")


def downgrade() -> None:
    op.execute("DELETE FROM action_metrics_latency_sketch WHERE level IN ('user/day', 'user/month')")
    op.drop_column("action_metrics_rollup_state", "users_from")
    op.drop_table("action_metrics_rollup_user")
