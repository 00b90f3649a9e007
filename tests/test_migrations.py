"""Migrations are the only way the schema changes: they round-trip, and the models never drift."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect

from action_metrics import MetricsStore, migrate
from action_metrics.dialects import backend_for
from action_metrics.schema import Base

TABLES = {"action_metrics", "model_prices", "credit_prices", "alembic_version"}
VIEWS = {"action_metrics_priced", "action_metrics_daily"}


def _on_database(url: str, inspect_with: Any) -> Any:
    backend = backend_for(url)

    async def run() -> Any:
        engine = backend.create_engine()
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(inspect_with)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _schema(connection: Connection) -> tuple[set[str], set[str], str | None]:
    inspector = inspect(connection)
    return (
        set(inspector.get_table_names()),
        set(inspector.get_view_names()),
        migrate.current_revision(connection),
    )


def _drift(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "action_metrics", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ACTION_METRICS_URL": ""},
    )


def test_upgrade_downgrade_and_upgrade_again(empty_database_url: str) -> None:
    url = empty_database_url
    assert _cli("db", "upgrade", "--url", url).returncode == 0
    tables, views, revision = _on_database(url, _schema)
    assert tables >= TABLES
    assert views >= VIEWS
    assert revision == migrate.head_revision()

    downgraded = _cli("db", "downgrade", "base", "--url", url)
    assert downgraded.returncode == 0, downgraded.stderr
    tables, views, revision = _on_database(url, _schema)
    assert tables <= {"alembic_version"}
    assert not views & VIEWS
    assert revision is None

    assert _cli("db", "upgrade", "--url", url).returncode == 0
    with MetricsStore(url) as store:  # the re-created schema is usable, prices seeded again
        assert store.aggregate().count == 0
    tables, views, revision = _on_database(url, _schema)
    assert tables >= TABLES
    assert views >= VIEWS


def test_models_match_the_migrations(database_url: str) -> None:
    assert _on_database(database_url, _drift) == []


def test_db_current_reports_the_revision(empty_database_url: str) -> None:
    before = _cli("db", "current", "--url", empty_database_url)
    assert before.returncode == 0
    assert "no schema" in before.stdout
    _cli("db", "upgrade", "--url", empty_database_url)
    after = _cli("db", "current", "--url", empty_database_url)
    assert after.stdout.strip() == f"{migrate.head_revision()} (head)"


def test_the_url_may_come_from_the_environment(empty_database_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "action_metrics", "db", "upgrade"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ACTION_METRICS_URL": empty_database_url},
    )
    assert result.returncode == 0, result.stderr
    assert _on_database(empty_database_url, _schema)[2] == migrate.head_revision()


@pytest.mark.parametrize("dialect_url", ["sqlite:///dba.db", "postgresql://dba@db.example/metrics"])
def test_sql_flag_prints_the_migration_for_a_dba_without_connecting(dialect_url: str) -> None:
    upgrade = _cli("db", "upgrade", "--sql", "--url", dialect_url)
    assert upgrade.returncode == 0, upgrade.stderr
    for statement in [
        "CREATE TABLE action_metrics",
        "CREATE TABLE model_prices",
        "CREATE VIEW action_metrics_priced",
        "CREATE VIEW action_metrics_daily",
        "INSERT INTO model_prices",
        "INSERT INTO alembic_version",
    ]:
        assert statement in upgrade.stdout
    downgrade = _cli("db", "downgrade", "base", "--sql", "--url", dialect_url)
    assert downgrade.returncode == 0, downgrade.stderr
    assert "DROP VIEW IF EXISTS action_metrics_daily" in downgrade.stdout
    assert "DROP TABLE action_metrics" in downgrade.stdout


def test_unreachable_database_is_one_line_and_non_zero() -> None:
    result = _cli("db", "current", "--url", "postgresql://nobody@127.0.0.1:1/none")
    assert result.returncode != 0
    assert result.stderr.startswith("Error: cannot reach the database")
    assert "Traceback" not in result.stderr


def test_an_unsupported_url_is_refused_with_the_supported_ones() -> None:
    result = _cli("db", "upgrade", "--url", "mysql://root@localhost/x")
    assert result.returncode != 0
    assert "sqlite:///" in result.stderr
    assert "Traceback" not in result.stderr
