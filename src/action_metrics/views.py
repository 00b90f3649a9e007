"""What migrations do with the SQL views: create them from their versioned definitions in
`sql/views/<view>/<revision>[.<dialect>].sql`, drop them, and keep what was granted on them.

Used inside migrations only, where alembic's `op` is set up.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Final

from sqlalchemy import text

from action_metrics.migrate import read_view_sql

# Plain SQL, so that `db upgrade --sql` prints it for a DBA too. Grants to the owner are implicit.
# Table-level grants (pg_class.relacl) have no column_name; column-level ones (pg_attribute.attacl,
# `GRANT SELECT (day, count) ON view TO role`) have one row per column.
_SAVE_GRANTS: Final = """
CREATE TEMPORARY TABLE action_metrics_saved_grants ON COMMIT DROP AS
SELECT
    c.relname AS view_name,
    CAST(NULL AS name) AS column_name,
    a.privilege_type,
    CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee,
    a.is_grantable
FROM pg_class AS c
CROSS JOIN LATERAL aclexplode(c.relacl) AS a
LEFT JOIN pg_roles AS r ON r.oid = a.grantee
WHERE c.oid IN ({views}) AND a.grantee <> c.relowner
UNION ALL
SELECT
    c.relname,
    col.attname,
    a.privilege_type,
    CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END,
    a.is_grantable
FROM pg_class AS c
JOIN pg_attribute AS col ON col.attrelid = c.oid AND col.attnum > 0 AND NOT col.attisdropped
CROSS JOIN LATERAL aclexplode(col.attacl) AS a
LEFT JOIN pg_roles AS r ON r.oid = a.grantee
WHERE c.oid IN ({views}) AND a.grantee <> c.relowner
"""
# A column grant is re-granted only if the re-created view still has the column (else a NOTICE).
_RESTORE_GRANTS: Final = """
DO $$
DECLARE saved record;
BEGIN
    FOR saved IN SELECT * FROM action_metrics_saved_grants LOOP
        IF saved.column_name IS NULL THEN
            EXECUTE format(
                'GRANT %s ON %I TO %s%s', saved.privilege_type, saved.view_name, saved.grantee,
                CASE WHEN saved.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END
            );
        ELSIF EXISTS (
            SELECT FROM pg_attribute
            WHERE attrelid = to_regclass(quote_ident(saved.view_name))
                AND attname = saved.column_name AND attnum > 0 AND NOT attisdropped
        ) THEN
            EXECUTE format(
                'GRANT %s (%I) ON %I TO %s%s', saved.privilege_type, saved.column_name, saved.view_name,
                saved.grantee, CASE WHEN saved.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END
            );
        ELSE
            RAISE NOTICE 'not re-granted, the view no longer has the column: GRANT % (%) ON % TO %',
                saved.privilege_type, quote_ident(saved.column_name), quote_ident(saved.view_name),
                saved.grantee;
        END IF;
    END LOOP;
END
$$
"""


@contextmanager
def grants_kept(views: Sequence[str]) -> Iterator[None]:
    """In a migration: re-grant, after the block, what was granted on `views` before it (PostgreSQL;
    DROP VIEW would otherwise revoke a dashboard role's SELECT silently): table-level grants, and
    column-level ones on the columns the views still have after the block (one no longer there is
    skipped with a NOTICE)."""
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


def redefine_views(revisions: Mapping[str, str]) -> None:
    """In a migration: replace each view by its definition at the revision given (view -> revision),
    keeping what was granted on them."""
    views = list(revisions)
    with grants_kept(views):
        drop_views(views)
        create_views(list(revisions.items()))
