"""The price period views model_price_periods and credit_price_periods, for dashboards to read on
their own, and action_metrics_priced re-created on top of them (same columns, same results).

action_metrics_daily reads action_metrics_priced, so it is dropped first and re-created unchanged.
On PostgreSQL the privileges granted on the two re-created views (a dashboard role's SELECT) are
carried over: DROP VIEW would otherwise revoke them silently.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

from action_metrics.views import create_views, drop_views, grants_kept

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PERIOD_VIEWS = ("model_price_periods", "credit_price_periods")
REPLACED_VIEWS = ("action_metrics_priced", "action_metrics_daily")  # in dependency order


def upgrade() -> None:
    with grants_kept(REPLACED_VIEWS):
        drop_views(reversed(REPLACED_VIEWS))
        create_views(
            [
                ("model_price_periods", "0002"),
                ("credit_price_periods", "0002"),
                ("action_metrics_priced", "0002"),
                ("action_metrics_daily", "0001"),
            ]
        )


def downgrade() -> None:
    with grants_kept(REPLACED_VIEWS):
        drop_views(reversed(REPLACED_VIEWS))
        drop_views(PERIOD_VIEWS)
        create_views([("action_metrics_priced", "0001"), ("action_metrics_daily", "0001")])
