"""One fixture, `backend`, parametrises every database test over SQLite and PostgreSQL, and the
modules marked `clickhouse` over ClickHouse too.

PostgreSQL tests need a server (default postgresql://postgres@127.0.0.1:5432/test, or
$ACTION_METRICS_TEST_POSTGRES_URL). Each test gets a throwaway database cloned from a migrated
template, dropped afterwards; the server is never assumed empty. Without a server the PostgreSQL
half is skipped with the reason, unless ACTION_METRICS_REQUIRE_POSTGRES=1 (as in CI) makes it fail.

ClickHouse runs in process through chdb (the `.[clickhouse]` extra), one engine directory per test
process (chdb opens one per process), a database of its own per test. Within a marked module, a
test marked `not_on_clickhouse(reason)` is skipped there with its reason. Without chdb the
ClickHouse third is skipped, unless ACTION_METRICS_REQUIRE_CLICKHOUSE=1 (as in CI).

Also the two things every test file builds: a metric (`metric`) and a command line (`run_cli`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import make_url

from action_metrics import ActionMetric, clickhouse, migrate
from action_metrics.cli import main
from action_metrics.dialects import backend_for

POSTGRES_ADMIN_URL = os.environ.get(
    "ACTION_METRICS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("ACTION_METRICS_REQUIRE_POSTGRES") == "1"
REQUIRE_CLICKHOUSE = os.environ.get("ACTION_METRICS_REQUIRE_CLICKHOUSE") == "1"
BACKENDS = ["sqlite", "postgresql"]
"""Every database test's backends; a module marked `clickhouse` adds "clickhouse"."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "clickhouse: the module's database tests run on ClickHouse (chdb) too")
    config.addinivalue_line(
        "markers", "not_on_clickhouse(reason): in a `clickhouse` module, skipped on ClickHouse for `reason`"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        names = [*BACKENDS, *(["clickhouse"] if metafunc.definition.get_closest_marker("clickhouse") else [])]
        metafunc.parametrize("backend", names, indirect=True, scope="session")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("not_on_clickhouse")
        callspec = getattr(item, "callspec", None)
        if marker is not None and callspec is not None and callspec.params.get("backend") == "clickhouse":
            item.add_marker(pytest.mark.skip(reason=f"not on ClickHouse: {marker.args[0]}"))


METRIC_FIELDS: dict[str, Any] = {
    "action_type": "lod3",
    "user_id": "user-1",
    "town_id": "town-1",
    "citizen_id": "citizen-1",
    "tokens_in": 100,
    "tokens_out": 50,
    "model": "haiku",
    "latency_ms": 120.5,
    "credits_charged": 10,
}
"""A valid metric's required fields: an LOD3 query answered by haiku."""


def metric(**fields: Any) -> ActionMetric:
    """`METRIC_FIELDS` with `fields` changed; timestamp (now), metadata and id are ActionMetric's own
    defaults unless given."""
    return ActionMetric(**{**METRIC_FIELDS, **fields})


CLI_VARIABLES = (
    "ACTION_METRICS_URL",
    "ACTION_METRICS_API_TOKEN",
    "ACTION_METRICS_API_TOKENS",
    "ACTION_METRICS_LOD3_P95_BUDGET_MS",
    "ACTION_METRICS_TZ",
)


def run_cli(*args: str, stdin: str | None = None, **environment: str) -> Result:
    """`action-metrics ARGS` in this process, with none of our variables set but `environment`,
    reading `stdin` (none: end of input, as a script without a terminal gives).

    An exception the command does not turn into its one-line error is raised here, failing the test.
    """
    variables: dict[str, str | None] = {name: None for name in CLI_VARIABLES}
    variables.update({"COLUMNS": "120", **environment})
    return CliRunner().invoke(main, list(args), input=stdin, env=variables, catch_exceptions=False)


def assert_one_line_error(result: Result, exit_code: int, fragment: str) -> None:
    """The command failed with `exit_code` and one `Error:` line, which holds `fragment`."""
    assert result.exit_code == exit_code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _admin(*statements: str) -> None:
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


def postgres_admin(*statements: str) -> None:
    asyncio.run(_admin(*statements))


def postgres_url(database: str) -> str:
    return make_url(POSTGRES_ADMIN_URL).set(database=database).render_as_string(hide_password=False)


def migrate_to_head(url: str) -> None:
    backend = backend_for(url)

    async def run() -> None:
        engine = backend.create_engine()
        try:
            await migrate.run_migrations(engine, migrate.upgrade_to("head"))
        finally:
            await engine.dispose()

    asyncio.run(run())


@pytest.fixture(scope="session")
def postgres_available() -> None:
    try:
        postgres_admin("SELECT 1")
    except (OSError, asyncpg.PostgresError) as error:
        message = f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {error}"
        if REQUIRE_POSTGRES:
            pytest.fail(f"{message} (ACTION_METRICS_REQUIRE_POSTGRES=1)")
        pytest.skip(message)


class Databases:
    """Makes throwaway databases of one backend: empty, or migrated to head."""

    has_rollups: bool
    """Whether aggregates and breakdowns may answer from rollups (percentiles from histograms)."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.has_rollups = True
        self.name = name
        self.workdir = workdir
        self._created: list[str] = []
        self._template: str | None = None
        self._clickhouse_admin: Any = None

    def _clickhouse_client(self, url: str) -> Any:
        """One client without a database for this process's engine directory, kept for the session:
        opening one takes ~0.15 s (it asks the server its version and settings), twice a test."""
        if self._clickhouse_admin is None:
            self._clickhouse_admin = clickhouse.ClickHouseURL.parse(url).connect(with_database=False)
        return self._clickhouse_admin

    def empty(self) -> str:
        token = uuid.uuid4().hex[:12]
        if self.name == "sqlite":
            return f"sqlite:///{self.workdir / f'{token}.db'}"
        if self.name == "clickhouse":  # created by the store on first use, as a SQLite file is
            return f"chdb://{self.workdir}?database=am_test_{token}"
        database = f"am_test_{token}"
        postgres_admin(f'CREATE DATABASE "{database}"')
        self._created.append(database)
        return postgres_url(database)

    def migrated(self) -> str:
        """A database at head, cloned from a template migrated once per session."""
        if self.name == "clickhouse":
            return self._clickhouse_clone()
        if self._template is None:
            self._template = self.empty()
            migrate_to_head(self._template)
        token = uuid.uuid4().hex[:12]
        if self.name == "sqlite":
            path = self.workdir / f"{token}.db"
            shutil.copyfile(make_url(self._template).database or "", path)
            return f"sqlite:///{path}"
        database = f"am_test_{token}"
        template = make_url(self._template).database
        postgres_admin(f'CREATE DATABASE "{database}" TEMPLATE "{template}"')
        self._created.append(database)
        return postgres_url(database)

    def _clickhouse_clone(self) -> str:
        """A ClickHouse database at head: the template's tables and views (migrated once per process
        through every schema version) created again from their final DDL, and the rows the
        migrations put in (the version, the seeded prices) copied. ClickHouse has no CREATE DATABASE
        ... TEMPLATE, and replaying seven versions' DDL took ~1 s a test (this: ~0.25 s).
        test_clickhouse.py's migration tests upgrade empty databases themselves."""
        if self._template is None:
            self._template = self.empty()
            clickhouse.upgrade(clickhouse.ClickHouseURL.parse(self._template))
        template = clickhouse.ClickHouseURL.parse(self._template).database
        url = self.empty()
        database = clickhouse.ClickHouseURL.parse(url).database
        client = self._clickhouse_client(url)
        objects = client.query(
            "SELECT name, create_table_query, total_rows FROM system.tables WHERE database = {d:String} "
            "ORDER BY engine = 'MaterializedView', name",  # a view after the tables it reads and writes
            parameters={"d": template},
        ).result_rows
        client.command("CREATE DATABASE {d:Identifier}", parameters={"d": database})
        for _, create, _ in objects:
            client.command(create.replace(f"{template}.", f"{database}."))
        for name, _, rows in objects:
            if rows:
                client.command(f"INSERT INTO {database}.{name} SELECT * FROM {template}.{name}")
        return url

    def drop(self, url: str) -> None:
        if self.name == "clickhouse":
            database = clickhouse.ClickHouseURL.parse(url).database
            self._clickhouse_client(url).command(
                "DROP DATABASE IF EXISTS {database:Identifier}", parameters={"database": database}
            )
            return
        database = make_url(url).database or ""
        if self.name == "postgresql" and database in self._created:
            postgres_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            self._created.remove(database)

    def drop_all(self) -> None:
        if self._clickhouse_admin is not None:
            self._clickhouse_admin.close()
            self._clickhouse_admin = None
        if self.name == "postgresql" and self._created:
            postgres_admin(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in self._created))
            self._created.clear()


@pytest.fixture(scope="session")
def chdb_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chdb engine directory of this test process: chdb opens one directory per process."""
    try:
        import chdb  # noqa: F401
    except ModuleNotFoundError as error:
        message = f"chdb is not installed (the optional extra .[clickhouse]): {error}"
        if REQUIRE_CLICKHOUSE:
            pytest.fail(f"{message} (ACTION_METRICS_REQUIRE_CLICKHOUSE=1)")
        pytest.skip(message)
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    """The backend under test: SQLite, PostgreSQL or (in `clickhouse` modules) ClickHouse."""
    if request.param == "postgresql":
        request.getfixturevalue("postgres_available")
    if request.param == "clickhouse":
        workdir = request.getfixturevalue("chdb_directory")
    else:
        workdir = tmp_path_factory.mktemp(request.param)
    databases = Databases(request.param, workdir)
    yield databases
    databases.drop_all()


@pytest.fixture
def database_url(backend: Databases) -> Iterator[str]:
    """A fresh database at the newest schema revision."""
    url = backend.migrated()
    yield url
    backend.drop(url)


def serving_a_database(backend: Databases) -> Iterator[Any]:
    """`action-metrics serve` (tests/serving.py) of a database of its own, dropped after it stops:
    a module-scoped fixture's server, shared by its tests (starting one is most of such a test's time)."""
    from serving import serving

    url = backend.migrated()
    try:
        with serving(url) as running:
            yield running
    finally:
        backend.drop(url)


@pytest.fixture(scope="module")
def refusing_server(backend: Databases) -> Iterator[Any]:
    """One server per module and backend for the tests that send only what it must refuse, so store
    nothing."""
    yield from serving_a_database(backend)


@pytest.fixture
def empty_database_url(backend: Databases) -> Iterator[str]:
    """A fresh database with nothing in it."""
    url = backend.empty()
    yield url
    backend.drop(url)
