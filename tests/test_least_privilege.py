"""Least privilege on PostgreSQL: a dashboard role that reads the views and nothing else, and a
store that runs as a role owning only its own schema.

Roles are cluster-wide, so each test makes its own with a unique name and drops it afterwards
(after DROP OWNED in every database it touched), so parallel runs never collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import POSTGRES_ADMIN_URL, Databases, metric, run_cli
from sqlalchemy import make_url

from action_metrics import ActionMetric, MetricsStore, UnsupportedDatabase, migrate
from action_metrics.dialects import backend_for

DASHBOARD_VIEWS = (
    "action_metrics_priced",
    "action_metrics_daily",
    "model_price_periods",
    "credit_price_periods",
)
TABLES = ("action_metrics", "model_prices", "credit_prices", "alembic_version")
START = datetime(2026, 11, 25, tzinfo=UTC)
EXAMPLES = Path(__file__).resolve().parent.parent / "sql" / "examples"


async def _run(url: str, *statements: str, user: str | None = None) -> list[Any]:
    """Run statements on `url`'s database, as `user` if given; the rows of the last one."""
    parsed = make_url(url)
    if user is not None:
        parsed = parsed.set(username=user, password=None)
    connection = await asyncpg.connect(parsed.render_as_string(hide_password=False), timeout=10)
    try:
        rows: list[Any] = []
        for statement in statements:
            rows = await connection.fetch(statement)
        return rows
    finally:
        await connection.close()


def run(url: str, *statements: str, user: str | None = None) -> list[Any]:
    return asyncio.run(_run(url, *statements, user=user))


class Roles:
    """Makes login roles with unique names; drops them, and what they own, at teardown."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self.databases: set[str] = set()

    def make(self, purpose: str) -> str:
        name = f"am_{purpose}_{uuid.uuid4().hex[:10]}"
        run(POSTGRES_ADMIN_URL, f'CREATE ROLE "{name}" LOGIN')
        self.made.append(name)
        return name

    def used_in(self, url: str) -> None:
        self.databases.add(url)

    def drop_all(self) -> None:
        for url in self.databases:
            for name in self.made:
                # A database dropped already took with it all the role had there.
                with contextlib.suppress(asyncpg.InvalidCatalogNameError):
                    run(url, f'REASSIGN OWNED BY "{name}" TO CURRENT_USER', f'DROP OWNED BY "{name}"')
        for name in self.made:
            run(POSTGRES_ADMIN_URL, f'DROP ROLE IF EXISTS "{name}"')


@pytest.fixture
def roles(backend: Databases) -> Iterator[Roles]:
    if backend.name != "postgresql":
        pytest.skip("SQLite has no roles or privileges: access is the file's permissions")
    made = Roles()
    yield made
    made.drop_all()


def _metrics(count: int) -> list[ActionMetric]:
    return [metric(user_id=f"user-{n % 3}", timestamp=START + timedelta(minutes=n)) for n in range(count)]


def test_a_dashboard_role_reads_the_views_and_cannot_write_or_read_the_tables(
    roles: Roles, empty_database_url: str
) -> None:
    url = empty_database_url
    database = make_url(url).database
    assert run_cli("db", "upgrade", "0001", "--url", url).exit_code == 0
    dashboard = roles.make("dashboard")
    roles.used_in(url)
    run(
        url,
        f'GRANT CONNECT ON DATABASE "{database}" TO "{dashboard}"',
        f'GRANT USAGE ON SCHEMA public TO "{dashboard}"',
        f'GRANT SELECT ON action_metrics_priced, action_metrics_daily TO "{dashboard}"',
    )
    # An upgrade that re-creates the views keeps what was granted on them.
    upgraded = run_cli("db", "upgrade", "--url", url)
    assert upgraded.exit_code == 0, upgraded.output
    run(url, f'GRANT SELECT ON model_price_periods, credit_price_periods TO "{dashboard}"')
    with MetricsStore(url) as store:
        store.emit_many(_metrics(30))

    assert run(url, "SELECT count(*) FROM action_metrics_priced", user=dashboard)[0][0] == 30
    daily = run(url, "SELECT count, cost_usd FROM action_metrics_daily", user=dashboard)
    assert [row["count"] for row in daily] == [30]
    assert run(url, "SELECT count(*) FROM model_price_periods", user=dashboard)[0][0] >= 5
    assert run(url, "SELECT count(*) FROM credit_price_periods", user=dashboard)[0][0] == 1

    denied = [
        *(f"SELECT * FROM {table}" for table in TABLES),
        # (The views are not updatable at all: writes to them fail before privileges are checked.)
        "DELETE FROM action_metrics",
        "UPDATE model_prices SET input_per_1m = 0",
        "INSERT INTO credit_prices (effective_from, usd_per_credit) VALUES (now(), 1)",
        "TRUNCATE action_metrics",
        "CREATE TABLE public.dashboard_scratch (x int)",
        "CREATE VIEW public.dashboard_view AS SELECT 1 AS x",
        "DROP VIEW action_metrics_daily",
    ]
    for statement in denied:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            run(url, statement, user=dashboard)
    with MetricsStore(url) as store:  # and nothing changed
        assert store.aggregate().count == 30

    # Granted the README's list of views, it runs every example dashboard query of sql/examples/.
    run(
        url,
        "GRANT SELECT ON action_metrics_hourly, action_metrics_daily_by_town, "
        f'action_metrics_daily_by_model TO "{dashboard}"',
    )
    examples = [  # PostgreSQL's own, and those of every dialect (no dialect in the name)
        path
        for path in sorted(EXAMPLES.glob("*.sql"))
        if path.name.endswith(".postgresql.sql") or path.name.count(".") == 1
    ]
    assert {"average_lod3_latency_today.postgresql.sql", "model_usage.sql"} <= {p.name for p in examples}
    for path in examples:
        run(url, path.read_text(), user=dashboard)


def test_db_current_as_a_role_that_reads_only_the_revision_says_so(
    roles: Roles, empty_database_url: str
) -> None:
    """A monitoring role granted `alembic_version` alone: `db current` gives the revision, and says
    that whether the rollups' build is done could not be read (it reads the raw table and the
    rollup state), not an error."""
    url = empty_database_url
    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    monitor = roles.make("monitor")
    roles.used_in(url)
    run(
        url,
        f'GRANT CONNECT ON DATABASE "{make_url(url).database}" TO "{monitor}"',
        f'GRANT USAGE ON SCHEMA public TO "{monitor}"',
        f'GRANT SELECT ON alembic_version TO "{monitor}"',
    )
    as_monitor = make_url(url).set(username=monitor).render_as_string(hide_password=False)
    result = run_cli("db", "current", "--url", as_monitor)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{migrate.head_revision()} (head; whether the build")
    assert "could not be read" in result.stdout
    assert "permission denied" in result.stdout


@pytest.mark.parametrize("search_path_from", ["role setting", "url options"])
def test_the_store_runs_as_a_role_that_owns_only_its_own_schema(
    roles: Roles, empty_database_url: str, search_path_from: str
) -> None:
    admin_url = empty_database_url
    database = make_url(admin_url).database
    app = roles.make("app")
    roles.used_in(admin_url)
    run(
        admin_url,
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC",  # PostgreSQL 15's default, made explicit
        f'CREATE SCHEMA metrics AUTHORIZATION "{app}"',
    )
    app_url = make_url(admin_url).set(username=app, password=None)
    if search_path_from == "role setting":
        run(admin_url, f'ALTER ROLE "{app}" IN DATABASE "{database}" SET search_path = metrics')
    else:
        app_url = app_url.update_query_dict({"options": "-csearch_path=metrics"})
    url = app_url.render_as_string(hide_password=False)

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        run(admin_url, "CREATE TABLE public.app_scratch (x int)", user=app)
    upgraded = run_cli("db", "upgrade", "--url", url)
    assert upgraded.exit_code == 0, upgraded.output
    sent = _metrics(20)
    with MetricsStore(url) as store:
        store.emit_many(sent)
        store.emit_many(sent)  # once only
        store.set_model_price("haiku", "1", "2", START)
        assert store.query() == sorted(sent, key=lambda m: m.timestamp, reverse=True)
        aggregate = store.aggregate()
    assert aggregate.count == 20
    assert aggregate.total_cost_usd == pytest.approx(20 * (100 * 1 + 50 * 2) / 1e6, abs=1e-12)
    assert run_cli("db", "current", "--url", url).stdout.strip() == f"{migrate.head_revision()} (head)"

    placed = run(
        admin_url,
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_schema IN ('public', 'metrics') ORDER BY 1, 2",
    )
    assert {row["table_schema"] for row in placed} == {"metrics"}
    assert {row["table_name"] for row in placed} >= {*TABLES, *DASHBOARD_VIEWS}
    owners = run(admin_url, "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'metrics'")
    assert [row["tableowner"] for row in owners] == [app]


@pytest.mark.parametrize(
    ("options", "settings"),
    [
        ("-csearch_path=metrics", {"search_path": "metrics"}),
        (
            "-c search_path=metrics,public -c statement_timeout=5000",
            {"search_path": "metrics,public", "statement_timeout": "5000"},
        ),
        ("--search-path=metrics", {"search_path": "metrics"}),
        ("-cjit=on", {"jit": "on"}),
    ],
)
def test_libpq_options_in_the_url_become_server_settings(options: str, settings: dict[str, str]) -> None:
    backend = backend_for(
        make_url("postgresql://app@db.example/metrics").update_query_dict({"options": options})
    )
    # JIT is off unless the URL turns it on: it only slowed the short dashboard queries down.
    assert backend.engine_options()["connect_args"] == {"server_settings": {"jit": "off", **settings}}
    assert "options" not in backend.url.query


def test_unreadable_options_in_the_url_are_refused_before_connecting() -> None:
    with pytest.raises(UnsupportedDatabase, match="options"):
        backend_for("postgresql://app@db.example/metrics?options=search_path")
