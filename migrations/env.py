"""Alembic environment: one async engine for SQLite (aiosqlite) and PostgreSQL (asyncpg).

Three ways in: `action-metrics db ...` and the store hand over an open connection
(`config.attributes["connection"]`); `--sql` renders offline; plain `alembic` connects itself.
"""

from __future__ import annotations

import asyncio
import logging.config

from alembic import context
from sqlalchemy import Connection

from action_metrics.dialects import backend_for
from action_metrics.schema import Base, compared_on

config = context.config
target_metadata = Base.metadata


def database_url() -> str | None:
    return context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")


def configure(dialect: str, **options: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        include_object=compared_on(dialect),
        # SQLite cannot ALTER most things: alembic's batch mode copies the table instead.
        render_as_batch=True,
        **options,
    )


def run_offline() -> None:
    backend = backend_for(database_url())
    # One transaction for the whole script on every backend, as online: applied by hand
    # (`sqlite3 -bail db < upgrade.sql`), a statement that fails leaves the database as it was, not
    # between revisions with a half-copied table. alembic's SQLite default (no transactional DDL)
    # would print no BEGIN/COMMIT at all. SQLite runs every statement of the scripts in a
    # transaction: they hold no PRAGMA, VACUUM or ATTACH.
    configure(backend.name, url=backend.url, literal_binds=True, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


def run_on(connection: Connection) -> None:
    configure(connection.dialect.name, connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    engine = backend_for(database_url()).create_engine()
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_on)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_offline()
elif (connection := config.attributes.get("connection")) is not None:
    run_on(connection)
else:
    if config.config_file_name is not None:
        logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)
    asyncio.run(run_online())
