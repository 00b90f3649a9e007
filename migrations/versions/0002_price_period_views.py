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

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

from action_metrics.migrate import read_view_sql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PERIOD_VIEWS = ("model_price_periods", "credit_price_periods")
REPLACED_VIEWS = ("action_metrics_priced", "action_metrics_daily")  # in dependency order

# Plain SQL, so that `db upgrade --sql` prints it for a DBA too. Grants to the owner are implicit.
_SAVE_GRANTS = """
CREATE TEMPORARY TABLE action_metrics_saved_grants ON COMMIT DROP AS
SELECT
    c.relname AS view_name,
    a.privilege_type,
    CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee,
    a.is_grantable
FROM pg_class AS c
CROSS JOIN LATERAL aclexplode(c.relacl) AS a
LEFT JOIN pg_roles AS r ON r.oid = a.grantee
WHERE c.oid IN ({views}) AND a.grantee <> c.relowner
"""
_RESTORE_GRANTS = """
DO $$
DECLARE saved record;
BEGIN
    FOR saved IN SELECT * FROM action_metrics_saved_grants LOOP
        EXECUTE format(
            'GRANT %s ON %I TO %s%s', saved.privilege_type, saved.view_name, saved.grantee,
            CASE WHEN saved.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END
        );
    END LOOP;
END
$$
"""


@contextmanager
def grants_kept(views: Sequence[str]) -> Iterator[None]:
    """Re-grant, after the block, what was granted on `views` before it (PostgreSQL only)."""
    if op.get_context().dialect.name != "postgresql":
        yield
        return
    op.execute(_SAVE_GRANTS.format(views=", ".join(f"to_regclass('{view}')" for view in views)))
    yield
    op.execute(_RESTORE_GRANTS)
    op.execute("DROP TABLE action_metrics_saved_grants")


def create_views(views: Sequence[tuple[str, str]]) -> None:
    dialect = op.get_context().dialect.name
    for view, view_revision in views:
        op.execute(sa.text(read_view_sql(view, view_revision, dialect)))


def drop_views(views: Iterable[str]) -> None:
    for view in views:
        op.execute(f"DROP VIEW IF EXISTS {view}")


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
