"""Alembic migrations run from the installed package, and the schema-version check of every store.

The wheel carries `migrations/` and `sql/` inside the package (see pyproject.toml); a source checkout
reads them from the project's top level, where a DBA finds them. alembic is imported by the functions
that use it, as MLflow does: a process that never checks or changes a schema never loads it.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

from sqlalchemy import URL, Connection, inspect

from action_metrics.dialects import WRITE, Backend, backend_for, display_url
from action_metrics.errors import SchemaNotCreated, SchemaOutOfDate, SchemaTooNew

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

_PACKAGE_DIR: Final = Path(__file__).resolve().parent
_SOURCE_ROOT: Final = _PACKAGE_DIR.parent.parent


def _resource(name: str) -> Path:
    for candidate in (_PACKAGE_DIR / name, _SOURCE_ROOT / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"action-metrics is installed without its {name}/ directory")


def migrations_dir() -> Path:
    return _resource("migrations")


def sql_dir() -> Path:
    return _resource("sql")


def read_view_sql(view: str, revision: str, dialect: str) -> str:
    """A view's definition as of `revision`: `sql/views/<view>/<revision>[.<dialect>].sql`."""
    folder = sql_dir() / "views" / view
    for candidate in (folder / f"{revision}.{dialect}.sql", folder / f"{revision}.sql"):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise FileNotFoundError(f"no definition of view {view} at revision {revision} for {dialect}")


def alembic_config(url: str | URL | None = None, stdout: TextIO | None = None) -> Config:
    """An alembic Config for the packaged migrations, as `alembic.ini` gives for a checkout."""
    from alembic.config import Config

    config = Config(stdout=stdout or sys.stdout)
    config.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        backend = backend_for(url)
        # Percent signs would be read as ConfigParser interpolation.
        config.set_main_option(
            "sqlalchemy.url", backend.url.render_as_string(hide_password=False).replace("%", "%%")
        )
    return config


def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None, "the packaged migrations have no head"
    return head


def current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


_ALEMBIC_IN_USE = threading.Lock()
"""alembic's `context` and `op` are module-level proxies: one migration at a time per process."""


def _run_with_connection(
    connection: Connection, action: Callable[[Config], None], stdout: TextIO | None = None
) -> None:
    config = alembic_config(stdout=stdout)
    config.attributes["connection"] = connection
    with _ALEMBIC_IN_USE:
        action(config)


async def run_migrations(
    engine: AsyncEngine, action: Callable[[Config], None], stdout: TextIO | None = None
) -> None:
    """Run an alembic command on `engine`'s database, in one transaction where the backend allows."""
    async with engine.connect() as connection:
        connection = await connection.execution_options(**{WRITE: True})
        async with connection.begin():
            await connection.run_sync(_run_with_connection, action, stdout)


def upgrade_to(revision: str) -> Callable[[Config], None]:
    def upgrade(config: Config) -> None:
        from alembic import command

        command.upgrade(config, revision)

    return upgrade


def downgrade_to(revision: str) -> Callable[[Config], None]:
    def downgrade(config: Config) -> None:
        from alembic import command

        command.downgrade(config, revision)

    return downgrade


def offline_sql(url: str | URL | None, action: str, revision: str) -> str:
    """The SQL a migration would run, for a DBA to review and run by hand."""
    from alembic import command

    buffer = io.StringIO()
    config = alembic_config(url, stdout=buffer)
    config.output_buffer = buffer
    if action != "upgrade" and ":" not in revision:
        revision = f"{head_revision()}:{revision}"
    with _ALEMBIC_IN_USE:
        if action == "upgrade":
            command.upgrade(config, revision, sql=True)
        else:
            command.downgrade(config, revision, sql=True)
    return buffer.getvalue()


async def ensure_schema(engine: AsyncEngine, backend: Backend) -> None:
    """Migrate a brand-new database if the backend does that (SQLite); otherwise insist the schema is
    exactly at head. PostgreSQL is never migrated implicitly: schema changes there are an operator's.
    """
    head = head_revision()
    may_migrate = backend.migrates_on_first_use
    async with engine.connect() as connection:
        connection = await connection.execution_options(**{WRITE: may_migrate})
        async with connection.begin():
            revision, has_tables = await connection.run_sync(_inspect_schema)
            if revision is None and not has_tables and may_migrate:
                # Inside the same write transaction, so two processes opening one new file
                # cannot both migrate it.
                await connection.run_sync(_run_with_connection, upgrade_to("head"), io.StringIO())
                return
    command_hint = f"action-metrics db upgrade --url '{display_url(backend.given_url)}'"
    where = display_url(backend.given_url)
    if revision is None:
        raise SchemaNotCreated(f"{where} has no action-metrics schema; create it with: {command_hint}")
    if revision == head:
        return
    known = {script.revision for script in _scripts().walk_revisions()}
    if revision in known:
        raise SchemaOutOfDate(
            f"{where} is at schema revision {revision}, this action-metrics needs {head}; "
            f"upgrade it with: {command_hint}"
        )
    raise SchemaTooNew(
        f"{where} is at schema revision {revision}, newer than this action-metrics knows "
        f"(head {head}); upgrade the action-metrics package"
    )


def _inspect_schema(connection: Connection) -> tuple[str | None, bool]:
    tables = set(inspect(connection).get_table_names()) - {"alembic_version"}
    return current_revision(connection), bool(tables)


async def revision_of(connection: AsyncConnection) -> str | None:
    return await connection.run_sync(current_revision)
