"""Credit claims in the database (issue 12): action_metrics_credit_claims, which call of an action was
charged the credits its ancestor span names, one row per ancestor span (trace id, span id).

`POST /v1/traces` kept these claims in the server's memory, so one process had to take every
request: two processes (`serve --workers 2`) given the same action in two requests (an exporter's
or a Collector's retry cut into other batches) would each charge it. Now each request claims the
action for its first call in the transaction that writes its calls, and the first claim committed
wins, in any process: a later request finds the action claimed, and the call charged is stored
already. The table starts empty: what the old in-memory claims knew was lost with each restart
anyway.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "action_metrics_credit_claims"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("trace_id", sa.String(32), nullable=False),
        sa.Column("span_id", sa.String(16), nullable=False),
        sa.Column("metric_id", sa.Uuid(), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("trace_id", "span_id", name=f"pk_{TABLE}"),
    )
    op.create_index(f"ix_{TABLE}_timestamp", TABLE, ["timestamp"])


def downgrade() -> None:
    op.drop_index(f"ix_{TABLE}_timestamp", table_name=TABLE)
    op.drop_table(TABLE)
