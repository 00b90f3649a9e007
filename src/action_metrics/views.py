"""What migrations do with the SQL views: create them from their versioned definitions in
`sql/views/<view>/<revision>[.<dialect>].sql`, drop them, and keep what was granted on them.

Used inside migrations only, where alembic's `op` is set up.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Final

from sqlalchemy import text

from action_metrics.migrate import read_view_sql

# Plain SQL, so that `db upgrade --sql` prints it for a DBA too. Grants to the owner are implicit.
_SAVE_GRANTS: Final = """
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
_RESTORE_GRANTS: Final = """
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
    """In a migration: re-grant, after the block, what was granted on `views` before it (PostgreSQL;
    DROP VIEW would otherwise revoke a dashboard role's SELECT silently)."""
    from alembic import op

    if op.get_context().dialect.name != "postgresql":
        yield
        return
    op.execute(_SAVE_GRANTS.format(views=", ".join(f"to_regclass('{view}')" for view in views)))
    yield
    op.execute(_RESTORE_GRANTS)
    op.execute("DROP TABLE action_metrics_saved_grants")


def create_views(views: Sequence[tuple[str, str]]) -> None:
    """In a migration: create each (view, revision of its definition) from sql/views/."""
    from alembic import op

    dialect = op.get_context().dialect.name
    for view, view_revision in views:
        op.execute(text(read_view_sql(view, view_revision, dialect)))


def drop_views(views: Iterable[str]) -> None:
    from alembic import op

    for view in views:
        op.execute(f"DROP VIEW IF EXISTS {view}")
