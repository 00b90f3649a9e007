"""The `action-metrics` command: database migrations (and, later, demo, report and serve)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import click
from alembic.config import Config
from sqlalchemy.exc import InterfaceError, OperationalError

from action_metrics import migrate
from action_metrics.dialects import URL_VARIABLE, Backend, UnsupportedDatabase, backend_for, display_url
from action_metrics.errors import DatabaseUnavailable, InvalidValue, SchemaError

P = ParamSpec("P")
T = TypeVar("T")

url_option = click.option(
    "--url",
    envvar=URL_VARIABLE,
    default=None,
    help=f"Database URL (sqlite:///file.db or postgresql://user@host/db); default ${URL_VARIABLE}, "
    "else sqlite:///action_metrics.db.",
)


def friendly_errors(command: Callable[P, T]) -> Callable[P, T]:
    """Expected failures print one line and exit non-zero; a traceback is for bugs only."""

    @wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return command(*args, **kwargs)
        except (DatabaseUnavailable, SchemaError, UnsupportedDatabase, InvalidValue) as error:
            raise click.ClickException(str(error)) from None
        except (OSError, OperationalError, InterfaceError) as error:
            reason = getattr(error, "orig", None) or error
            raise click.ClickException(f"cannot reach the database: {reason}") from None

    return run


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="action-metrics")
def main() -> None:
    """Unit economics of LLM-powered products, in SQL."""


@main.group()
def db() -> None:
    """Migrate the database schema with the migrations this package carries."""


async def _migrate(backend: Backend, action: Callable[[Config], None]) -> None:
    engine = backend.create_engine()
    try:
        await migrate.run_migrations(engine, action)
    finally:
        await engine.dispose()


async def _current(backend: Backend) -> str | None:
    engine = backend.create_engine()
    try:
        async with engine.connect() as connection:
            return await migrate.revision_of(connection)
    finally:
        await engine.dispose()


@db.command()
@click.argument("revision", default="head")
@url_option
@click.option("--sql", is_flag=True, help="Print the SQL for a DBA instead of running it.")
@friendly_errors
def upgrade(revision: str, url: str | None, sql: bool) -> None:
    """Upgrade the schema to REVISION (default: head)."""
    backend = backend_for(url)
    if sql:
        click.echo(migrate.offline_sql(backend.given_url, "upgrade", revision), nl=False)
        return
    run_async(_migrate(backend, migrate.upgrade_to(revision)))
    click.echo(f"{display_url(backend.given_url)} is at revision {revision}", err=True)


@db.command()
@click.argument("revision")
@url_option
@click.option("--sql", is_flag=True, help="Print the SQL for a DBA instead of running it.")
@friendly_errors
def downgrade(revision: str, url: str | None, sql: bool) -> None:
    """Downgrade the schema to REVISION ('base' removes every action-metrics table)."""
    backend = backend_for(url)
    if sql:
        click.echo(migrate.offline_sql(backend.given_url, "downgrade", revision), nl=False)
        return
    run_async(_migrate(backend, migrate.downgrade_to(revision)))
    click.echo(f"{display_url(backend.given_url)} is at revision {revision}", err=True)


@db.command()
@url_option
@friendly_errors
def current(url: str | None) -> None:
    """Print the database's schema revision and whether it is the newest this package knows."""
    backend = backend_for(url)
    revision = run_async(_current(backend))
    head = migrate.head_revision()
    state = "head" if revision == head else f"behind head {head}" if revision else "no schema"
    click.echo(f"{revision or '-'} ({state})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
