"""Migrations are the only way the schema changes: they round-trip, and the models never drift.

The `db` commands run in this process (see test_cli.py for their errors and one run in a subprocess).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import re
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import Result
from conftest import Databases, assert_one_line_error, metric, postgres_admin, run_cli
from sqlalchemy import Connection, insert, inspect, literal, make_url, null, select, text
from test_least_privilege import run as _sql

from action_metrics import ActionMetric, MetricsStore, SchemaOutOfDate, migrate, rollup
from action_metrics.dialects import backend_for
from action_metrics.errors import DowngradeRefused, RawRowsPruned
from action_metrics.pricing import BEGINNING_OF_TIME, MODEL_COSTS_PER_1M, CreditPrice, ModelPrice
from action_metrics.query import MetricFilter, metric_from_row, metric_rows
from action_metrics.repository import MetricsRepository
from action_metrics.rollup import CLOSE_DELAY, SUM_COLUMNS
from action_metrics.schema import (
    AGGREGATED_COLUMNS,
    Base,
    action_metrics,
    compared_on,
    credit_prices,
    model_prices,
)

from reference import PriceBook, assert_matches, expected_aggregate, select_like_the_store

TABLES = {"action_metrics", "model_prices", "credit_prices", "alembic_version"}
VIEWS = {
    "action_metrics_priced",
    "action_metrics_daily",
    "action_metrics_hourly",
    "action_metrics_daily_by_model",
    "action_metrics_daily_by_town",
}


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
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "include_object": compared_on(connection.dialect.name)}
    )
    return list(compare_metadata(context, Base.metadata))


def test_the_head_read_from_the_file_names_is_alembics_head() -> None:
    """A store reads the head from the migrations' file names, without loading alembic."""
    scripts = migrate._scripts()
    assert migrate.head_revision() == scripts.get_current_head()
    for script in scripts.walk_revisions():
        assert script.path is not None
        assert Path(script.path).name.startswith(f"{script.revision}_")


def test_upgrade_downgrade_and_upgrade_again(empty_database_url: str) -> None:
    url = empty_database_url
    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    tables, views, revision = _on_database(url, _schema)
    assert tables >= TABLES
    assert views >= VIEWS
    assert revision == migrate.head_revision()

    downgraded = run_cli("db", "downgrade", "base", "--yes", "--url", url)
    assert downgraded.exit_code == 0, downgraded.output
    tables, views, revision = _on_database(url, _schema)
    assert tables <= {"alembic_version"}
    assert not views & VIEWS
    assert revision is None

    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    with MetricsStore(url) as store:  # the re-created schema is usable, prices seeded again
        assert store.aggregate().count == 0
    tables, views, revision = _on_database(url, _schema)
    assert tables >= TABLES
    assert views >= VIEWS


def test_models_match_the_migrations(database_url: str) -> None:
    assert _on_database(database_url, _drift) == []


def _index(table: str, name: str) -> Callable[[Connection], tuple[list[str], list[str]] | None]:
    """Reads an index's key columns and the columns it carries besides (PostgreSQL's INCLUDE); None
    if the table has no such index."""

    def read(connection: Connection) -> tuple[list[str], list[str]] | None:
        for index in inspect(connection).get_indexes(table):
            if index["name"] == name:
                included = index.get("dialect_options", {}).get("postgresql_include", [])
                return list(index["column_names"]), list(included)
        return None

    return read


_town_index = _index("action_metrics", "ix_action_metrics_town_id_timestamp")


def test_the_town_index_carries_what_the_aggregates_read(empty_database_url: str) -> None:
    """PostgreSQL since 0008 as INCLUDE, SQLite since 0011 after the key: a town's actions are read
    from the index alone. Autogenerate leaves SQLite's out (`compared_on`), so it is checked here."""
    url = empty_database_url
    carried = {"user_id", *AGGREGATED_COLUMNS}
    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    key, included = _on_database(url, _town_index)
    assert key[:2] == ["town_id", "timestamp"]
    assert set(key[2:]) | set(included) == carried
    assert run_cli("db", "downgrade", "0010", "--url", url).exit_code == 0
    key, included = _on_database(url, _town_index)
    assert key == ["town_id", "timestamp"]
    assert set(included) == (carried if backend_for(url).name == "postgresql" else set())
    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    key, included = _on_database(url, _town_index)
    assert set(key[2:]) | set(included) == carried


_rollup_time_index = _index("action_metrics_rollup", "ix_action_metrics_rollup_time")


def test_the_rollup_in_time_order_carries_its_sums(empty_database_url: str) -> None:
    """PostgreSQL since 0008 (INCLUDE), SQLite since 0014 (after the key): the per-town view and the
    breakdowns read a grain's rows by time from the index alone. Autogenerate leaves it out
    (`compared_on`), so it is checked here, through a downgrade to 0013 and back."""
    url = empty_database_url
    sums = set(SUM_COLUMNS)
    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    columns = _on_database(url, _rollup_time_index)
    assert columns is not None
    key, included = columns
    assert key[:5] == ["grain", "action_type", "start", "town_id", "model"]
    assert set(key[5:]) | set(included) == sums
    assert run_cli("db", "downgrade", "0013", "--url", url).exit_code == 0
    kept = _on_database(url, _rollup_time_index)
    assert kept == (columns if backend_for(url).name == "postgresql" else None)
    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    assert _on_database(url, _rollup_time_index) == columns


def test_db_current_reports_the_revision(empty_database_url: str) -> None:
    before = run_cli("db", "current", "--url", empty_database_url)
    assert before.exit_code == 0
    assert before.stdout.strip() == "- (no schema)"
    assert run_cli("db", "upgrade", FIRST_REVISION, "--url", empty_database_url).exit_code == 0
    behind = run_cli("db", "current", "--url", empty_database_url)
    assert behind.stdout.strip() == f"{FIRST_REVISION} (behind head {migrate.head_revision()})"
    assert run_cli("db", "upgrade", "--url", empty_database_url).exit_code == 0
    after = run_cli("db", "current", "--url", empty_database_url)
    assert after.stdout.strip() == f"{migrate.head_revision()} (head)"


@pytest.mark.parametrize("dialect_url", ["sqlite:///dba.db", "postgresql://dba@db.example/metrics"])
def test_sql_flag_prints_the_migration_for_a_database_out_of_reach(dialect_url: str) -> None:
    """A database that cannot be read (a SQLite file not there, which is not created, or a server out
    of reach): the upgrade from base, saying so at the top, and the range form for the others."""
    upgrade = run_cli("db", "upgrade", "--sql", "--url", dialect_url)
    assert upgrade.exit_code == 0, upgrade.output
    for statement in [
        "CREATE TABLE action_metrics",
        "CREATE TABLE model_prices",
        "CREATE VIEW action_metrics_priced",
        "CREATE VIEW action_metrics_daily",
        "INSERT INTO model_prices",
        "INSERT INTO alembic_version",
    ]:
        assert statement in upgrade.stdout
    head = migrate.head_revision()
    assert upgrade.stdout.startswith("-- action-metrics db upgrade: ")
    assert "the SQL from base" in upgrade.stdout.split("\n\n")[0]
    if dialect_url.startswith("postgresql"):
        assert "could not read the revision of postgresql://dba@db.example/metrics" in upgrade.stdout
        assert "give the range FROM:TO" in upgrade.stdout
    else:
        assert not Path(make_url(dialect_url).database or "").exists()
    downgrade = run_cli("db", "downgrade", "head:base", "--sql", "--url", dialect_url)
    assert downgrade.exit_code == 0, downgrade.output
    header = downgrade.stdout.split("\n\n")[0]
    assert f"the SQL from {head} to base, the range given" in header
    assert "-- warning: this downgrade drops every action-metrics table" in header
    assert "DROP VIEW IF EXISTS action_metrics_daily" in downgrade.stdout
    assert "DROP TABLE action_metrics" in downgrade.stdout


def test_sql_flag_starts_from_the_revision_the_database_is_at(empty_database_url: str) -> None:
    url = empty_database_url
    assert run_cli("db", "upgrade", "0009", "--url", url).exit_code == 0
    upgrade = run_cli("db", "upgrade", "--sql", "--url", url)
    assert upgrade.exit_code == 0, upgrade.output
    assert upgrade.stdout.startswith(f"-- action-metrics db upgrade: the SQL from 0009 (where {url} is) to ")
    assert "CREATE TABLE alembic_version" not in upgrade.stdout
    ran = re.findall(r"-- Running upgrade (\w+) -> (\w+)", upgrade.stdout)
    assert ran[0] == ("0009", "0010")
    assert ran[-1][1] == migrate.head_revision()
    # The range form prints the same migrations.
    given = run_cli("db", "upgrade", "0009:head", "--sql", "--url", url)
    assert given.stdout.split("\n", 1)[1] == upgrade.stdout.split("\n", 1)[1]

    assert upgrade.stdout.rstrip().endswith(
        "resumable), run: action-metrics db upgrade --url <this database>"
    )
    assert "Part of the rollups is left unwritten" in upgrade.stdout  # 0012 and 0013 leave some
    # From 0013 on every migration writes its rollup rows in its SQL (0019 re-opens the open day's
    # hours, which the next batch written closes again): no build is asked for.
    for since in ("0013", "0017"):
        later = run_cli("db", "upgrade", f"{since}:head", "--sql", "--url", url)
        assert later.exit_code == 0, later.output
        assert "run: action-metrics db upgrade" not in later.stdout
        assert later.stdout.rstrip().endswith("COMMIT;")

    downgrade = run_cli("db", "downgrade", "0002", "--sql", "--url", url)
    assert downgrade.exit_code == 0, downgrade.output
    ran = re.findall(r"-- Running downgrade (\w+) -> (\w+)", downgrade.stdout)
    assert (ran[0], ran[-1]) == (("0009", "0008"), ("0003", "0002"))
    assert "-- warning: this downgrade drops every action's cache_read_tokens" in downgrade.stdout
    assert _on_database(url, _schema)[2] == "0009"  # printed, not run

    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    at_head = run_cli("db", "upgrade", "--sql", "--url", url)
    assert at_head.exit_code == 0
    assert at_head.stdout.strip().endswith(f"is at revision {migrate.head_revision()} already: no SQL to run")


def test_migrations_go_the_way_asked_or_refuse_in_one_line(empty_database_url: str) -> None:
    """An upgrade to a revision behind the database, a downgrade to one ahead of it and an unknown
    revision are usage errors (exit 2), never a silent no-op or alembic's traceback."""
    url = empty_database_url
    assert run_cli("db", "upgrade", "0009", "--url", url).exit_code == 0
    back = run_cli("db", "upgrade", "0002", "--url", url)
    assert_one_line_error(back, 2, "is at revision 0009, already past 0002: nothing to upgrade")
    assert "db downgrade 0002" in back.stderr
    assert_one_line_error(run_cli("db", "downgrade", "0012", "--url", url), 2, "below 0012")
    for command in (["downgrade", "nonsense"], ["upgrade", "9999"], ["upgrade", "0009:nonsense", "--sql"]):
        assert_one_line_error(run_cli("db", *command, "--url", url), 2, "unknown revision")
    assert_one_line_error(run_cli("db", "upgrade", "0002", "--sql", "--url", url), 2, "already past 0002")
    assert _on_database(url, _schema)[2] == "0009"

    same = run_cli("db", "upgrade", "0009", "--url", url)
    assert same.exit_code == 0
    assert "is at revision 0009 already" in same.stderr
    stepped = run_cli("db", "downgrade", "--url", url, "--", "-1")  # a step back, as alembic's
    assert stepped.exit_code == 0, stepped.output
    assert _on_database(url, _schema)[2] == "0008"
    assert run_cli("db", "downgrade", "base", "--yes", "--url", url).exit_code == 0
    assert_one_line_error(run_cli("db", "downgrade", "0001", "--url", url), 2, "nothing to downgrade")


def _sqlite_file(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """A SQLite file's revision, schema (every table, view, index and trigger with its SQL, spaces
    aside: `--sql` prints tabs as spaces) and actions, read as the sqlite3 module reads them."""
    with closing(sqlite3.connect(path)) as connection:
        schema = connection.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")
        return (
            connection.execute("SELECT version_num FROM alembic_version").fetchall(),
            [(*names, " ".join((sql or "").split())) for *names, sql in schema],
            connection.execute("SELECT * FROM action_metrics ORDER BY id").fetchall(),
        )


_ACTION_AT_0002 = (
    "INSERT INTO action_metrics (id, timestamp, action_type, user_id, town_id, citizen_id, model, "
    "tokens_in, tokens_out, latency_ms, credits_charged, metadata) VALUES ('{id}', "
    "'2026-10-01 12:00:00.000000', 'lod3', 'user-1', 'town-1', NULL, 'haiku', {tokens_in}, 50, 120.5, "
    "10, '{{}}')"
)


def test_the_sqlite_sql_output_is_one_transaction(tmp_path: Path) -> None:
    """`db upgrade --sql` applied by hand to a SQLite file is all or nothing, as on PostgreSQL: with a
    row breaking a rule of 0005, the script fails there and the file is as it was (its revision, its
    views, no half-copied `_alembic_tmp_` table), by Python's sqlite3 and by the sqlite3 shell with
    -bail; on a good file it reaches head with the schema `db upgrade` makes."""
    files = {name: tmp_path / f"{name}.db" for name in ("bad", "good", "online")}
    for name, path in files.items():
        assert run_cli("db", "upgrade", "0002", "--url", f"sqlite:///{path}").exit_code == 0
        with closing(sqlite3.connect(path)) as connection, connection:
            connection.execute(_ACTION_AT_0002.format(id="0" * 32, tokens_in=100))
            if name == "bad":
                connection.execute(_ACTION_AT_0002.format(id=uuid.uuid4().hex, tokens_in=-5))
    printed = run_cli("db", "upgrade", "--sql", "--url", f"sqlite:///{files['bad']}")
    assert printed.exit_code == 0, printed.output
    script = printed.stdout
    assert "the SQL from 0002" in script.split("\n", 1)[0]
    statements = [line for line in script.splitlines() if line and not line.startswith("--")]
    assert (statements[0], statements[-1]) == ("BEGIN;", "COMMIT;")

    before = _sqlite_file(files["bad"])
    with (
        closing(sqlite3.connect(files["bad"])) as connection,
        pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"),
    ):
        connection.executescript(script)
    assert _sqlite_file(files["bad"]) == before
    if shutil.which("sqlite3"):
        shell = subprocess.run(
            ["sqlite3", "-bail", str(files["bad"])], input=script, capture_output=True, text=True, check=False
        )
        assert shell.returncode != 0
        assert "CHECK constraint failed" in shell.stderr
        assert _sqlite_file(files["bad"]) == before

    with closing(sqlite3.connect(files["good"])) as connection:
        connection.executescript(script)
    assert run_cli("db", "upgrade", "--url", f"sqlite:///{files['online']}").exit_code == 0
    upgraded, online = _sqlite_file(files["good"]), _sqlite_file(files["online"])
    assert upgraded[0] == [(migrate.head_revision(),)]
    assert upgraded == online
    assert {name for kind, name, *_ in upgraded[1] if kind == "view"} >= VIEWS


def test_db_commands_create_no_sqlite_file_to_read(tmp_path: Path) -> None:
    path = tmp_path / "nonexistent.db"
    current = run_cli("db", "current", "--url", f"sqlite:///{path}")
    assert current.exit_code == 0
    assert current.stdout.strip() == "- (no schema)"
    # Refused in one line (exit 1) rather than creating the file (see test_cli.py).
    downgrade = run_cli("db", "downgrade", "base", "--url", f"sqlite:///{path}")
    assert_one_line_error(downgrade, 1, "there is no file")
    assert run_cli("db", "upgrade", "--sql", "--url", f"sqlite:///{path}").exit_code == 0
    assert not path.exists()


# --- migrations with data ---------------------------------------------------------------------
# Data is written at 0001 as any SQL client would (the repository needs the newest schema), then
# the database goes to head, where the rollups are built from it, back to 0001 and to head again.

FIRST_REVISION = "0001"
START = datetime(2026, 10, 1, tzinfo=UTC)
DATA_ROWS = 3000
FILTERS: list[dict[str, Any]] = [
    {},
    {"town_id": "town-b"},
    {"model": "custom-llm"},
    {"action_type": "lod4", "since": START + timedelta(days=12)},
    {"since": START + timedelta(days=3, hours=7, minutes=13), "until": START + timedelta(days=25, hours=1)},
    {"user_id": "user-3", "until": START + timedelta(days=20)},
    {"limit": 250},
]


PRICE_CHANGES = [
    ModelPrice.of("haiku", "0.8", "4", START + timedelta(days=10)),
    ModelPrice.of("custom-llm", "1.1", "2.2", START + timedelta(days=15, hours=6, minutes=30)),
    ModelPrice.of("sonnet", "2.5", "12.5", START + timedelta(days=20)),
]
CREDIT_CHANGES = [CreditPrice.of("0.008", START + timedelta(days=5, seconds=1))]


def _book() -> PriceBook:
    models: dict[str, list[tuple[datetime, Decimal, Decimal]]] = {
        model: [(BEGINNING_OF_TIME, Decimal(str(i)), Decimal(str(o)))]
        for model, (i, o) in MODEL_COSTS_PER_1M.items()
    }
    for price in PRICE_CHANGES:
        models.setdefault(price.model, []).append(
            (price.effective_from, price.input_per_1m, price.output_per_1m)
        )
    credits = [(BEGINNING_OF_TIME, Decimal("0.006"))]
    credits += [(credit.effective_from, credit.usd_per_credit) for credit in CREDIT_CHANGES]
    return PriceBook(models, credits)


def _data() -> list[ActionMetric]:
    rng = random.Random(6)
    # Exactly at each price change: the instant where one price period ends and the next begins.
    boundaries = [change.effective_from for change in [*PRICE_CHANGES, *CREDIT_CHANGES]]
    at_boundaries = [
        ActionMetric("lod4", "user-1", "town-a", None, 1000, 100, model, 9.5, 100, at)
        for at in boundaries
        for model in ("haiku", "custom-llm", "sonnet")
    ]
    return at_boundaries + [
        ActionMetric(
            action_type=rng.choice(["lod3", "lod4", "lod5", "dialogue", "custom.op"]),
            user_id=f"user-{rng.randrange(8)}",
            town_id=rng.choice(["town-a", "town-b", "town-c"]),
            citizen_id=rng.choice([None, "citizen-1", "citizen-2"]),
            tokens_in=rng.randrange(0, 50_000),
            tokens_out=rng.randrange(0, 5_000),
            model=rng.choice(["haiku", "sonnet", "opus", "template", "custom-llm"]),
            latency_ms=rng.lognormvariate(5, 1),
            credits_charged=rng.choice([0, 10, 100, 400]),
            timestamp=START + timedelta(seconds=rng.uniform(0, 30 * 86400)),
            # 0.1 recorded a failure in the metadata; 0004 moves it to `error`.
            metadata={"n": rng.randrange(1000), "tag": rng.choice(["a", "b", None])}
            | rng.choice([{}, {}, {}, {"error": "TimeoutError"}]),
        )
        for _ in range(DATA_ROWS - len(at_boundaries))
    ]


def _as_at_head(metric: ActionMetric) -> ActionMetric:
    """The metric as head reads it: the metadata's `error` is the metric's `error`."""
    error = metric.metadata.get("error")
    return metric if error is None else dataclasses.replace(metric, error=error)


def _at_revision(url: str, action: Any) -> Any:
    """Run `action(repository)` on `url` whatever its revision (the store would refuse one behind)."""
    backend = backend_for(url)

    async def run() -> Any:
        engine = backend.create_engine()
        try:
            return await action(MetricsRepository(engine, backend))
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _migrate(url: str, action: Any) -> None:
    async def run(repository: MetricsRepository) -> None:
        await migrate.run_migrations(repository.engine, action)
        if action is UPGRADE_TO_HEAD:  # what `action-metrics db upgrade` does next
            await repository.build_rollups()

    _at_revision(url, run)


UPGRADE_TO_HEAD = migrate.upgrade_to("head")


async def _fill_as_a_sql_client(repository: MetricsRepository) -> None:
    async with repository.engine.begin() as connection:
        # 0001's columns: the token kinds and `error` came with 0004 (errors were in the metadata).
        rows = [{k: v for k, v in row.items() if k not in NEW_IN_0004} for row in metric_rows(_data())]
        await connection.execute(insert(action_metrics), rows)
        for price in PRICE_CHANGES:
            await connection.execute(
                insert(model_prices).values(
                    model=price.model,
                    effective_from=price.effective_from,
                    input_per_1m=price.input_per_1m,
                    output_per_1m=price.output_per_1m,
                )
            )
        for credit in CREDIT_CHANGES:
            await connection.execute(
                insert(credit_prices).values(
                    effective_from=credit.effective_from, usd_per_credit=credit.usd_per_credit
                )
            )


TOKEN_KINDS = ("cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
NEW_IN_0004 = (*TOKEN_KINDS, "error")


def _every_action(at_head: bool) -> Any:
    """Every stored action. Before 0004 its token kinds read as 0 and its error as none (it is in
    the metadata, where `_as_at_head` finds it)."""
    if at_head:
        return select(action_metrics).order_by(action_metrics.c.id)
    columns = [column for column in action_metrics.c if column.name not in NEW_IN_0004]
    added = [*(literal(0).label(kind) for kind in TOKEN_KINDS), null().label("error")]
    return select(*columns, *added).order_by(action_metrics.c.id)


async def _views(
    repository: MetricsRepository, views: list[tuple[str, str]], *, at_head: bool
) -> dict[str, Any]:
    """The rows, as head reads them whatever the revision, and `views` row by row."""
    snapshot: dict[str, Any] = {}
    async with repository.engine.connect() as connection:
        snapshot["revision"] = await migrate.revision_of(connection)
        rows = await connection.execute(_every_action(at_head))
        snapshot["rows"] = [metric_from_row(row) for row in rows]
        if not at_head:
            snapshot["rows"] = [_as_at_head(metric) for metric in snapshot["rows"]]
        for view, order in views:
            rows = await connection.execute(text(f"SELECT * FROM {view} ORDER BY {order}"))
            snapshot[view] = [dict(row) for row in rows.mappings()]
    return snapshot


PRICED = ("action_metrics_priced", "id")
DAILY = ("action_metrics_daily", "day, town_id, action_type, model")
HOURLY = ("action_metrics_hourly", "hour, town_id, action_type, model")


async def _raw_snapshot(repository: MetricsRepository) -> dict[str, Any]:
    """What a dashboard reads at any revision: the rows and the views of 0001."""
    return await _views(repository, [PRICED, DAILY], at_head=False)


async def _head_snapshot(repository: MetricsRepository) -> dict[str, Any]:
    """Everything a user or a dashboard can read at head: query(), aggregates (from the rollups
    and exact), and every view row by row."""
    snapshot = await _views(repository, [PRICED, DAILY, HOURLY], at_head=True)
    snapshot["query"] = await repository.select(MetricFilter())
    for number, filters in enumerate(FILTERS):
        for exact in (False, True):
            aggregate = await repository.aggregate(MetricFilter(**filters), exact=exact)
            snapshot[f"aggregate {number} exact={exact}"] = aggregate.to_dict()
    return snapshot


NEW_COLUMNS_ARE = {  # what the columns added since 0001 hold for actions stored at 0001
    "cache_read_tokens": 0,
    "cache_write_tokens": 0,
    "reasoning_tokens": 0,
    "cache_read_per_1m": None,
    "cache_write_per_1m": None,
}


def _without(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{column: value for column, value in row.items() if column not in columns} for row in rows]


def _error_in(metadata: str | dict[str, Any]) -> Any:
    """The error 0004 moved out of an action's metadata (JSON text on SQLite)."""
    return (json.loads(metadata) if isinstance(metadata, str) else metadata).get("error")


def _as_at(older: dict[str, Any], newer: dict[str, Any], view: str) -> list[dict[str, Any]]:
    """`newer`'s rows of `view` with only `older`'s columns, after checking what the others hold."""
    kept = set(older[view][0]) if older[view] else set()
    rows = []
    for row in newer[view]:
        for column in set(row) - kept - {"error_count"}:
            expected = _error_in(row["metadata"]) if column == "error" else NEW_COLUMNS_ARE[column]
            assert row[column] == expected, (view, column, row[column])
        rows.append({column: value for column, value in row.items() if column in kept})
    if newer[view] and "error_count" in set(newer[view][0]) - kept:  # every failed action, once
        errors = sum(metric.error is not None for metric in newer["rows"])
        assert sum(row["error_count"] for row in newer[view]) == errors > 0, view
    return rows


def _assert_same(before: Any, after: Any, where: str = "") -> None:
    """Equal, numbers with fractions to 1e-12 relative: sums may be added up in another order."""
    fractional = (float, Decimal)
    if isinstance(before, fractional) and isinstance(after, fractional):
        assert math.isclose(before, after, rel_tol=1e-12, abs_tol=1e-15), f"{where}: {before} != {after}"
    elif isinstance(before, dict) and isinstance(after, dict):
        assert before.keys() == after.keys(), where
        for key in before:
            _assert_same(before[key], after[key], f"{where}.{key}")
    elif isinstance(before, list) and isinstance(after, list):
        assert len(before) == len(after), f"{where}: {len(before)} rows != {len(after)}"
        for index, (left, right) in enumerate(zip(before, after, strict=True)):
            _assert_same(left, right, f"{where}[{index}]")
    else:
        assert before == after, f"{where}: {before!r} != {after!r}"


def test_data_written_at_the_first_revision_survives_upgrade_downgrade_and_upgrade(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    _migrate(url, migrate.upgrade_to(FIRST_REVISION))
    _at_revision(url, _fill_as_a_sql_client)
    first = _at_revision(url, _raw_snapshot)
    assert first["revision"] == FIRST_REVISION
    assert len(first["rows"]) == DATA_ROWS
    head = migrate.head_revision()

    _migrate(url, UPGRADE_TO_HEAD)  # builds the rollups from the rows already there
    at_head = _at_revision(url, _head_snapshot)
    assert at_head["revision"] == head
    _assert_same(first["rows"], at_head["rows"], "rows")
    _assert_same(first["action_metrics_priced"], _as_at(first, at_head, "action_metrics_priced"), "priced")
    # The daily view now answers from the rollups: the same numbers as 0001's over raw rows, but
    # for the percentiles, which describe successful actions since 0004 (test_views checks them).
    percentiles = ("p50_latency_ms", "p95_latency_ms")
    daily = _as_at(first, at_head, "action_metrics_daily")
    _assert_same(_without(first["action_metrics_daily"], percentiles), _without(daily, percentiles), "daily")
    book, data = _book(), [_as_at_head(metric) for metric in _data()]
    assert any(metric.error for metric in data)
    for number, filters in enumerate(FILTERS):
        expected = expected_aggregate(select_like_the_store(data, filters), book)
        for exact in (False, True):
            assert_matches(at_head[f"aggregate {number} exact={exact}"], expected, f"{filters} {exact}: ")
    assert not at_head["aggregate 0 exact=False"]["percentiles_exact"]  # the rollups answered

    _migrate(url, migrate.downgrade_to(FIRST_REVISION))
    _assert_same(first, _at_revision(url, _raw_snapshot), FIRST_REVISION)
    _migrate(url, UPGRADE_TO_HEAD)
    _assert_same(at_head, _at_revision(url, _head_snapshot), "head again")

    with MetricsStore(url) as store:  # at head again: the store opens, and reads the same
        assert store.query() == at_head["query"]
        _assert_same(store.aggregate().to_dict(), at_head["aggregate 0 exact=False"], "store")


def test_db_upgrade_builds_the_rollups_from_the_rows_already_stored(
    empty_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted (Ctrl-C) and run again, it resumes where it stopped."""
    url = empty_database_url
    assert run_cli("db", "upgrade", "0002", "--url", url).exit_code == 0
    _at_revision(url, _fill_as_a_sql_client)
    sql = run_cli("db", "upgrade", "--sql", "--url", url)
    assert "run: action-metrics db upgrade" in sql.stdout  # after the DBA's SQL, the build
    today = {rollup.floor_to(datetime.now(UTC) - CLOSE_DELAY, "day")}
    upgraded = _interrupted_then_resumed(
        url, "days_closed_until", "the rollups are built up to {} only", monkeypatch
    )
    today.add(rollup.floor_to(datetime.now(UTC) - CLOSE_DELAY, "day"))  # the build may cross midnight
    assert any(f"rollups built: whole days up to {day.isoformat()}" in upgraded.stderr for day in today)
    with MetricsStore(url) as store:
        everything = store.aggregate()
    assert not everything.percentiles_exact  # answered from the rollups
    assert everything.error_count > 0  # moved out of the metadata by 0004
    assert_matches(everything.to_dict(), expected_aggregate([_as_at_head(m) for m in _data()], _book()))


def test_db_upgrade_writes_back_the_sketches_resumably(
    empty_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From 0006, with the rollups built: 0007's write-back of the sketches, interrupted, resumes."""
    url = empty_database_url
    assert run_cli("db", "upgrade", "0002", "--url", url).exit_code == 0
    _at_revision(url, _fill_as_a_sql_client)
    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    assert run_cli("db", "downgrade", "0006", "--url", url).exit_code == 0
    _interrupted_then_resumed(
        url, "sketches_from", "the latency sketches are written back to {} only", monkeypatch
    )


def _record_days_of(mark: str, monkeypatch: pytest.MonkeyPatch, interrupt_at: int | None = None) -> list[Any]:
    """The value of `mark` in the rollup state before each day the build writes that moves it;
    with `interrupt_at`, Ctrl-C (KeyboardInterrupt) as that day is about to be written."""
    moved_from: list[Any] = []
    write_state = rollup.write_state

    async def recording(connection: Any, before: rollup.RollupState, after: rollup.RollupState) -> None:
        if getattr(after, mark) != getattr(before, mark):
            moved_from.append(getattr(before, mark))
            if len(moved_from) == interrupt_at:
                raise KeyboardInterrupt
        await write_state(connection, before, after)

    monkeypatch.setattr(rollup, "write_state", recording)
    return moved_from


def _interrupted_then_resumed(url: str, mark: str, left: str, monkeypatch: pytest.MonkeyPatch) -> Result:
    """`db upgrade` interrupted in the build it runs after migrating, on its third day moving `mark`:
    it says in one line that the schema is at head and how to resume; `db current` says what is left
    (`left`, at the day it stopped); `db upgrade` again resumes there and finishes (its result)."""
    head = migrate.head_revision()
    with monkeypatch.context() as interrupting:
        written = _record_days_of(mark, interrupting, interrupt_at=3)
        interrupted = run_cli("db", "upgrade", "--url", url)
    assert interrupted.exit_code == 130, interrupted.output
    assert "Aborted!" not in interrupted.output
    said = interrupted.stderr.splitlines()[-1]
    assert said.startswith(f"interrupted: {url} is at revision {head} "), said
    assert said.endswith(f"run again: action-metrics db upgrade --url '{url}'"), said
    stopped_at = written[-1]  # the day under way was rolled back, the two before it stay

    current = run_cli("db", "current", "--url", url).stdout.strip()
    assert current.startswith(f"{head} (head, but the build db upgrade runs after migrating is unfinished: ")
    assert left.format(stopped_at.isoformat()) in current
    assert current.endswith(f"to finish it, run: action-metrics db upgrade --url '{url}')")

    with monkeypatch.context() as recording:
        resumed = _record_days_of(mark, recording)
        upgraded = run_cli("db", "upgrade", "--url", url)
    assert upgraded.exit_code == 0, upgraded.output
    assert resumed[0] == stopped_at  # where it stopped, not from the start again
    assert run_cli("db", "current", "--url", url).stdout == f"{head} (head)\n"
    return upgraded


def test_the_price_period_views_show_each_price_until_the_next(database_url: str) -> None:
    with MetricsStore(database_url) as store:
        store.set_model_price("haiku", "0.8", "4", START)
        store.set_model_price("haiku", "1", "5", START + timedelta(days=1))
        store.set_credit_price("0.008", START)

    async def periods(repository: MetricsRepository) -> tuple[list[Any], list[Any]]:
        async with repository.engine.connect() as connection:
            models = await connection.execute(
                text(
                    "SELECT effective_from, effective_until, input_per_1m, output_per_1m "
                    "FROM model_price_periods WHERE model = 'haiku' ORDER BY effective_from"
                )
            )
            credits = await connection.execute(
                text(
                    "SELECT effective_from, effective_until, usd_per_credit "
                    "FROM credit_price_periods ORDER BY effective_from"
                )
            )
            return [tuple(row) for row in models], [tuple(row) for row in credits]

    models, credits = _at_revision(database_url, periods)
    assert [(float(i), float(o)) for *_, i, o in models] == [(0.25, 1.25), (0.8, 4.0), (1.0, 5.0)]
    # effective_until of each period is the next effective_from; the last is open-ended.
    assert [row[1] for row in models[:-1]] == [row[0] for row in models[1:]]
    assert models[-1][1] is None
    assert [float(row[2]) for row in credits] == [0.006, 0.008]
    assert credits[0][1] == credits[1][0]
    assert credits[-1][1] is None


def test_a_database_at_an_older_revision_names_the_upgrade_command(empty_database_url: str) -> None:
    _migrate(empty_database_url, migrate.upgrade_to(FIRST_REVISION))
    store = MetricsStore(empty_database_url)
    try:
        with pytest.raises(SchemaOutOfDate, match=r"action-metrics db upgrade --url '[^']+'") as raised:
            store.open()
    finally:
        store.close()
    assert f"revision {FIRST_REVISION}" in str(raised.value)
    # Nothing was changed on the way: the database is still at the old revision.
    assert _on_database(empty_database_url, _schema)[2] == FIRST_REVISION


# --- what a downgrade loses ----------------------------------------------------------------------


def test_a_pruned_store_is_not_downgraded_below_0003_without_forget_prune(database_url: str) -> None:
    """Below 0003 the rollups go, which alone hold the pruned period, with the cut-off: upgraded
    again, the store would answer partial numbers without a word. So it is refused, in one line
    naming the option that allows it, by the command, its --sql and the library alike."""
    url = database_url
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    with MetricsStore(url, durable=True) as store:
        store.emit_many([metric(timestamp=today - timedelta(days=days, hours=3)) for days in (9, 8, 2)])
        store.prune(today - timedelta(days=5))
        before = store.aggregate().count
    assert before == 3

    for command in (
        ["db", "downgrade", "0002"],
        ["db", "downgrade", "base"],
        ["db", "downgrade", "0002", "--sql"],
    ):
        assert_one_line_error(run_cli(*command, "--url", url), 1, "add --forget-prune")
    with pytest.raises(DowngradeRefused, match="pruned before"):
        _migrate(url, migrate.downgrade_to("0002"))
    assert _on_database(url, _schema)[2] == migrate.head_revision()
    with MetricsStore(url) as store:
        assert store.aggregate().count == before  # nothing was dropped on the way

    # The rollups and the cut-off stay at 0003, but not the levels of later revisions (see below).
    kept = run_cli("db", "downgrade", "0003", "--forget-prune", "--url", url)
    assert kept.exit_code == 0, kept.output
    assert_one_line_error(run_cli("db", "downgrade", "0002", "--url", url), 1, "--forget-prune")
    forgotten = run_cli("db", "downgrade", "0002", "--forget-prune", "--url", url)
    assert forgotten.exit_code == 0, forgotten.output
    assert "warning: --forget-prune: the store was pruned before" in forgotten.stderr
    assert _on_database(url, _schema)[2] == "0002"


def test_a_pruned_store_is_not_downgraded_past_the_levels_only_its_rollups_hold(database_url: str) -> None:
    """Upgrading again rebuilds 0007's latency sketches per town, 0009's per-user rollup and 0012's
    sketches per town and action type from raw rows, which the prune removed: downgraded below
    those and upgraded again, breakdowns over the pruned period that answered would raise
    `RawRowsPruned` for good. So a pruned store is refused there too, in one line naming what goes
    and the option that allows it, by the command, its --sql and the library in the migration's
    own transaction; down to 0012 nothing of the pruned period goes (0016's closed buckets are a
    cache)."""
    url = database_url
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    with MetricsStore(url, durable=True) as store:
        store.emit_many(
            [
                metric(
                    timestamp=today - timedelta(days=days), user_id=f"user-{days % 2}", latency_ms=days * 1.0
                )
                for days in (9, 8, 2)
            ]
        )
        store.prune(today - timedelta(days=5))
    questions: dict[str, Callable[[MetricsStore], list[Any]]] = {
        "by town per hour (0007)": lambda store: store.breakdown(("town_id",), bucket="hour"),
        "by user (0009)": lambda store: store.breakdown(("user_id",)),
        "a town's by action type per day (0012)": lambda store: store.breakdown(
            ("action_type",), bucket="day", town_id="town-1"
        ),
    }

    def answers() -> dict[str, Any]:
        found: dict[str, Any] = {}
        with MetricsStore(url) as store:
            for name, ask in questions.items():
                try:
                    found[name] = [row.to_dict() for row in ask(store)]
                except RawRowsPruned:
                    found[name] = "RawRowsPruned"
        return found

    before = answers()
    for name, rows in before.items():  # over all time, the pruned period included
        assert sum(row["count"] for row in rows) == 3, name

    for target in ("0011", "0008", "0006", "0003"):
        refused = run_cli("db", "downgrade", target, "--url", url)
        assert_one_line_error(refused, 1, "add --forget-prune")
        assert f"pruned before {(today - timedelta(days=5)).isoformat()}" in refused.stderr
    lost = run_cli("db", "downgrade", "0006", "--url", url).stderr
    for what in ("by action_type", "by user_id", "by town_id", "RawRowsPruned"):
        assert what in lost
    assert "by user_id" not in run_cli("db", "downgrade", "0011", "--url", url).stderr  # only 0012's
    assert_one_line_error(run_cli("db", "downgrade", "0006", "--sql", "--url", url), 1, "add --forget-prune")
    with pytest.raises(DowngradeRefused, match="pruned before"):
        _migrate(url, migrate.downgrade_to("0006"))
    assert _on_database(url, _schema)[2] == migrate.head_revision()
    assert answers() == before  # nothing was dropped on the way

    kept = run_cli("db", "downgrade", "0012", "--url", url)
    assert kept.exit_code == 0, kept.output
    assert "pruned" not in kept.stderr
    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    assert answers() == before

    forgotten = run_cli("db", "downgrade", "0006", "--forget-prune", "--url", url)
    assert forgotten.exit_code == 0, forgotten.output
    assert "warning: --forget-prune: the store was pruned before" in forgotten.stderr
    assert _on_database(url, _schema)[2] == "0006"
    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    assert answers() == dict.fromkeys(questions, "RawRowsPruned")  # as the refusal said


def test_a_downgrade_below_0004_warns_of_the_columns_it_drops(database_url: str) -> None:
    """Going below 0004 drops the token kinds, the errors and the cache prices; an error recorded as
    `ActionMetric(error=...)` is not in the metadata, so it does not come back."""
    url = database_url
    with MetricsStore(url, durable=True) as store:
        store.set_model_price("haiku", "1", "5", cache_read_per_1m="0.1")
        store.emit(metric(error="TimeoutError", tokens_in=1000, cache_read_tokens=800))
        assert store.aggregate().error_count == 1
    downgraded = run_cli("db", "downgrade", "0003", "--url", url)
    assert downgraded.exit_code == 0, downgraded.output
    warning = next(line for line in downgraded.stderr.splitlines() if "cache_read_tokens" in line)
    assert warning.startswith("warning: this downgrade drops")
    for dropped in ("cache_write_tokens", "reasoning_tokens", "error", "cache prices"):
        assert dropped in warning
    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    with MetricsStore(url) as store:
        (again,) = store.query()
        assert (again.error, again.cache_read_tokens) == (None, 0)  # as the warning said


# --- what a migration that re-creates views keeps, and what of the user's stops it (PostgreSQL) ---
# DROP VIEW takes with it what was granted on the view and is refused under a view of the user's;
# SQLite has neither grants nor that check. Table-level grants: see test_least_privilege.py.


@pytest.fixture
def postgres_at_0016(backend: Databases, empty_database_url: str) -> str:
    """A PostgreSQL database at 0016, the revision before 0017 re-creates action_metrics_daily_by_town."""
    if backend.name != "postgresql":
        pytest.skip("SQLite has no grants, and its DROP VIEW does not check the views depending on it")
    upgraded = run_cli("db", "upgrade", "0016", "--url", empty_database_url)
    assert upgraded.exit_code == 0, upgraded.output
    return empty_database_url


@pytest.fixture
def reader(postgres_at_0016: str) -> Iterator[str]:
    """A login role that may connect to the database and use its schema, and nothing else yet."""
    url = postgres_at_0016
    role = f"am_reader_{uuid.uuid4().hex[:10]}"
    postgres_admin(f'CREATE ROLE "{role}" LOGIN')
    try:
        _sql(
            url,
            f'GRANT CONNECT ON DATABASE "{make_url(url).database}" TO "{role}"',
            f'GRANT USAGE ON SCHEMA public TO "{role}"',
        )
        yield role
    finally:
        _sql(url, f'DROP OWNED BY "{role}"')  # its privileges there, so that the role can go
        postgres_admin(f'DROP ROLE "{role}"')


BY_TOWN = "action_metrics_daily_by_town"


def test_column_grants_on_a_view_survive_the_migrations_that_re_create_it(
    postgres_at_0016: str, reader: str
) -> None:
    url = postgres_at_0016
    _sql(
        url,
        f'GRANT SELECT (day, town_id, count, cost_usd) ON {BY_TOWN} TO "{reader}"',
        f'GRANT SELECT (tokens_in) ON {BY_TOWN} TO "{reader}" WITH GRANT OPTION',
        f'GRANT SELECT ON action_metrics_hourly TO "{reader}"',  # a table-level one beside them
    )

    def granted_as_before() -> None:
        rows = _sql(url, f"SELECT day, town_id, count, cost_usd, tokens_in FROM {BY_TOWN}", user=reader)
        assert rows == []
        assert _sql(url, "SELECT count(*) FROM action_metrics_hourly", user=reader)[0][0] == 0
        for denied in (
            f"SELECT model FROM {BY_TOWN}",
            f"SELECT * FROM {BY_TOWN}",
            "SELECT * FROM action_metrics_daily",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                _sql(url, denied, user=reader)
        options = _sql(
            url,
            f"SELECT has_column_privilege('{reader}', '{BY_TOWN}', 'tokens_in', 'SELECT WITH GRANT OPTION'), "
            f"has_column_privilege('{reader}', '{BY_TOWN}', 'day', 'SELECT WITH GRANT OPTION')",
        )
        assert tuple(options[0]) == (True, False)

    for command in (["upgrade", "0017"], ["downgrade", "0016"]):  # 0017 re-creates the view both ways
        migrated = run_cli("db", *command, "--url", url)
        assert migrated.exit_code == 0, migrated.output
        assert _on_database(url, _schema)[2] == command[1]
        granted_as_before()


def test_a_column_grant_on_a_column_a_migration_drops_is_skipped(postgres_at_0016: str, reader: str) -> None:
    """Below 0004 the views have no error_count: its grant cannot be restored, the others are."""
    url = postgres_at_0016
    _sql(url, f'GRANT SELECT (day, error_count) ON action_metrics_daily TO "{reader}"')
    downgraded = run_cli("db", "downgrade", "0003", "--url", url)
    assert downgraded.exit_code == 0, downgraded.output
    assert _sql(url, "SELECT day FROM action_metrics_daily", user=reader) == []
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        _sql(url, "SELECT count FROM action_metrics_daily", user=reader)


def test_a_view_of_the_users_on_a_view_a_migration_re_creates_is_named_in_one_line(
    postgres_at_0016: str,
) -> None:
    url = postgres_at_0016
    _sql(url, f"CREATE VIEW my_town_panel AS SELECT * FROM {BY_TOWN}")

    def refused(*command: str, revision: str) -> None:
        result = run_cli("db", *command, "--url", url)
        assert_one_line_error(result, 1, "view my_town_panel depends on view action_metrics_daily_by_town")
        assert "drop view my_town_panel, run the migration, then re-create it" in result.stderr
        # Nothing was changed: the migration's transaction was rolled back, the user's view kept.
        _, views, at = _on_database(url, _schema)
        assert (at, "my_town_panel" in views) == (revision, True)

    refused("upgrade", revision="0016")
    # As the error says: drop it, migrate, re-create it; then going back is refused the same way.
    _sql(url, "DROP VIEW my_town_panel")
    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    _sql(url, f"CREATE VIEW my_town_panel AS SELECT * FROM {BY_TOWN}")
    refused("downgrade", "0016", revision=migrate.head_revision())


async def _month_rows(repository: MetricsRepository) -> dict[str, Any]:
    """The rollup's and the latency histogram's month rows, in key order."""
    from action_metrics.schema import latency_histogram, rollup

    async with repository.engine.connect() as connection:
        rows = {}
        for table in (rollup, latency_histogram):
            key = list(table.primary_key.columns)
            result = await connection.execute(select(table).where(table.c.grain == "month").order_by(*key))
            rows[table.name] = [dict(row) for row in result.mappings()]
        return rows


def test_the_monthly_levels_migration_sums_the_days_as_the_writers_do(empty_database_url: str) -> None:
    """0018 writes the month rows of a database whose days are closed from its day rows, split at the
    prices beginning inside a month as the writers split them when days close: downgraded to 0017 and
    upgraded again, the month rows are the same and every answer the reference's."""
    url = empty_database_url
    _migrate(url, UPGRADE_TO_HEAD)
    rng = random.Random(18)
    spread = [
        dataclasses.replace(
            metric,
            id=uuid.uuid4(),
            timestamp=START + timedelta(seconds=rng.uniform(-20 * 86_400, 50 * 86_400)),
        )
        for metric in rng.sample(_data(), 1_000)
    ]
    data = sorted([_as_at_head(metric) for metric in _data()] + spread, key=lambda metric: metric.timestamp)
    with MetricsStore(url) as store:
        for price in PRICE_CHANGES:
            store.set_model_price(
                price.model, price.input_per_1m, price.output_per_1m, effective_from=price.effective_from
            )
        for credit in CREDIT_CHANGES:
            store.set_credit_price(credit.usd_per_credit, effective_from=credit.effective_from)
        for start in range(0, len(data), 500):
            store.emit_many(data[start : start + 500])
    written = _at_revision(url, _month_rows)
    months = {
        row["start"].replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        for row in written["action_metrics_rollup"]
    }
    assert len(months) >= 3
    assert written["action_metrics_latency_histogram"]
    assert any(row["start"].day != 1 for row in written["action_metrics_rollup"])  # split at a price

    _migrate(url, migrate.downgrade_to("0017"))
    assert _at_revision(url, _month_rows) == {
        "action_metrics_rollup": [],
        "action_metrics_latency_histogram": [],
    }
    _migrate(url, UPGRADE_TO_HEAD)
    _assert_same(written, _at_revision(url, _month_rows), "months")
    with MetricsStore(url) as store:
        for filters in [
            {},
            {"action_type": "lod4"},
            {"model": "sonnet"},
            {"since": START, "until": START + timedelta(days=31)},
        ]:
            expected = expected_aggregate(select_like_the_store(data, filters), _book())
            assert_matches(store.aggregate(**filters).to_dict(), expected, f"{filters}: ")


async def _open_day_rows(repository: MetricsRepository) -> dict[str, Any]:
    """What the hours' close writes (the hour and day rows of the rollups and histograms, the hour
    sketches) and the state, in key order."""
    from action_metrics.schema import latency_histogram, latency_sketch, rollup, rollup_detail, rollup_state

    async with repository.engine.connect() as connection:
        rows: dict[str, Any] = {}
        for table in (rollup, rollup_detail, latency_histogram):
            key = list(table.primary_key.columns)
            result = await connection.execute(
                select(table).where(table.c.grain.in_(["hour", "day"])).order_by(*key)
            )
            rows[table.name] = [dict(row) for row in result.mappings()]
        s = latency_sketch.c
        result = await connection.execute(
            select(latency_sketch)
            .where(s.level.in_(["town/hour", "model/hour"]))
            .order_by(s.level, s.start, s.key)
        )
        rows[latency_sketch.name] = [dict(row) for row in result.mappings()]
        state = await connection.execute(
            select(rollup_state.c.hours_closed_until, rollup_state.c.days_closed_until)
        )
        rows["state"] = list(state.one())
        return rows


def test_the_open_day_migration_reopens_its_hours_and_the_next_batch_closes_them_as_before(
    empty_database_url: str,
) -> None:
    """0019 re-opens the open day's closed hours (their hour rows and sketches go, and the local
    buckets stored past the day's start) for the next batch to close again, filling the day rows:
    then every row is what the writers at 0019 wrote. Answers are exact on the way; an action for a
    re-opened hour is counted in a stored bucket; downgraded, the open day's day rows go."""
    from test_breakdown import _expected_with, _key
    from test_rollups import _book as book
    from test_rollups import _spread

    async def upgrade_without_the_build(repository: MetricsRepository) -> None:
        # The build `db upgrade` runs next closes every hour up to now, which `day` is days before.
        await migrate.run_migrations(repository.engine, UPGRADE_TO_HEAD)

    url = empty_database_url
    _at_revision(url, upgrade_without_the_build)
    rng = random.Random(19)
    day = rollup.floor_to(datetime.now(UTC) - timedelta(days=3), "day")
    end = day + timedelta(hours=20, minutes=20)
    data = _spread(rng, 1_200, day - timedelta(days=2), end)
    # Kathmandu's days end at 18:15 UTC: the one ending inside the open day's closed hours is stored.
    kathmandu = {"by": ("town_id",), "bucket": "day", "tz": "Asia/Kathmandu"}

    def breakdown(store: MetricsStore, metrics: list[ActionMetric]) -> None:
        rows = [row.to_dict() for row in store.breakdown(**kathmandu)]
        expected = _expected_with(metrics, ("town_id",), "day", "Asia/Kathmandu", book())
        assert sorted(repr(_key(row, ("town_id",), "day")) for row in rows) == sorted(map(repr, expected))
        for row in rows:
            assert_matches(row, expected[_key(row, ("town_id",), "day")], "by town and Kathmandu day: ")

    with MetricsStore(url) as store:
        for start in range(0, len(data), 100):
            store.emit_many(data[start : start + 100])
        breakdown(store, data)
    assert day + timedelta(hours=18, minutes=15) in _at_revision(url, _stored_bucket_ends)
    written = _at_revision(url, _open_day_rows)
    assert written["state"] == [day + timedelta(hours=20), day]
    assert any(row["grain"] == "day" and row["start"] >= day for row in written["action_metrics_rollup"])

    _migrate(url, migrate.downgrade_to("0018"))
    at_0018 = _at_revision(url, _open_day_rows)
    for table in ("action_metrics_rollup", "action_metrics_latency_histogram"):
        kept = [row for row in written[table] if row["grain"] == "hour" or row["start"] < day]
        _assert_same(kept, at_0018[table], f"{table} at 0018")

    _at_revision(url, upgrade_without_the_build)
    reopened = _at_revision(url, _open_day_rows)
    assert reopened["state"] == [day, day]
    for table in (
        "action_metrics_rollup",
        "action_metrics_rollup_detail",
        "action_metrics_latency_histogram",
    ):
        assert all(row["start"] < day for row in reopened[table])
    assert all(row["start"] < day for row in reopened["action_metrics_latency_sketch"])
    assert all(ended <= day for ended in _at_revision(url, _stored_bucket_ends))
    with MetricsStore(url) as store:
        for filters in [{}, {"action_type": "lod3"}, {"since": day}, {"town_id": "town-a"}]:
            expected = expected_aggregate(select_like_the_store(data, filters), book())
            assert_matches(store.aggregate(**filters).to_dict(), expected, f"re-opened {filters}: ")
        # The next batch (an action in the open hour) closes the hours again as the writers had.
        closing = dataclasses.replace(data[-1], id=uuid.uuid4(), timestamp=end)
        store.emit_many([closing])
    _assert_same(written, _at_revision(url, _open_day_rows), "closed again")

    # An action for a re-opened hour is not late: the buckets stored past the day's start went with
    # the migration, or the next breakdown would read them without it.
    _migrate(url, migrate.downgrade_to("0018"))
    _at_revision(url, upgrade_without_the_build)
    arrived = dataclasses.replace(data[-1], id=uuid.uuid4(), timestamp=day + timedelta(hours=3))
    newest = dataclasses.replace(closing, id=uuid.uuid4())
    with MetricsStore(url) as store:
        store.emit_many([arrived, newest])  # closes the hours again, the stored bucket's among them
        everything = [*data, closing, arrived, newest]
        breakdown(store, everything)
        for filters in [{}, {"action_type": "lod3"}, {"since": day}, {"town_id": "town-a"}]:
            expected = expected_aggregate(select_like_the_store(everything, filters), book())
            assert_matches(store.aggregate(**filters).to_dict(), expected, f"{filters}: ")


async def _stored_bucket_ends(repository: MetricsRepository) -> list[datetime]:
    from action_metrics.schema import closed_buckets

    async with repository.engine.connect() as connection:
        return list((await connection.execute(select(closed_buckets.c.bucket_end))).scalars())


def test_the_sql_for_a_url_with_a_search_path_builds_the_schema_where_the_store_looks(
    backend: Databases, empty_database_url: str
) -> None:
    """A store whose URL sets `?options=-csearch_path=metrics` migrates into `metrics` with `db
    upgrade`; the `--sql` a DBA runs with psql did the same only if it sets the options too (it
    built every table in `public`, and the store then found no schema)."""
    if backend.name != "postgresql":
        pytest.skip("a search_path is PostgreSQL's")
    _sql(empty_database_url, "CREATE SCHEMA metrics")
    url = str(make_url(empty_database_url).update_query_dict({"options": "-csearch_path=metrics"}))
    printed = run_cli("db", "upgrade", "--sql", "--url", url)
    assert printed.exit_code == 0, printed.output
    assert "SELECT pg_catalog.set_config('search_path', 'metrics', false);" in printed.stdout
    parsed = make_url(empty_database_url)
    psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", parsed.host or "127.0.0.1"]
    psql += ["-p", str(parsed.port or 5432), "-U", parsed.username or "postgres", "-d", parsed.database or ""]
    ran = subprocess.run(
        psql,
        input=printed.stdout,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    (placed,) = _sql(
        empty_database_url,
        "SELECT array_agg(DISTINCT table_schema::text) FROM information_schema.tables "
        "WHERE table_name IN ('action_metrics', 'alembic_version', 'action_metrics_rollup')",
    )
    assert list(placed[0]) == ["metrics"]
    with MetricsStore(url) as store:
        store.emit_many([metric()])
        assert store.aggregate().count == 1


def test_ctrl_c_during_a_migration_rolls_it_back_and_says_where_the_database_is(
    empty_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The migrations run in one transaction: interrupted (here as the last of them finishes, its
    work done but not committed), nothing of them stays, and the command says so in one line with
    the revision read anew, rather than click's bare "Aborted!"; run again, it migrates."""
    url = empty_database_url
    assert run_cli("db", "upgrade", "0016", "--url", url).exit_code == 0
    migrated = migrate._run_with_connection

    def interrupted(*arguments: Any) -> None:
        migrated(*arguments)
        raise KeyboardInterrupt

    with monkeypatch.context() as interrupting:
        interrupting.setattr(migrate, "_run_with_connection", interrupted)
        result = run_cli("db", "upgrade", "--url", url)
    assert result.exit_code == 130, result.output
    assert "Aborted!" not in result.output
    assert result.stderr.splitlines()[-1] == (
        f"interrupted: the migration was rolled back, {url} is at revision 0016; "
        "run the command again to migrate"
    )
    assert run_cli("db", "current", "--url", url).stdout == f"0016 (behind head {migrate.head_revision()})\n"
    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    assert run_cli("db", "current", "--url", url).stdout == f"{migrate.head_revision()} (head)\n"
