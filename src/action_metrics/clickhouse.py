"""ClickHouse, the third backend (preview): where its database is, and its versioned schema.

A ClickHouse server is reached over HTTP (`clickhouse://user:password@host:8123/db`, or
`clickhouses://` for HTTPS) and the same engine runs in process through chdb
(`chdb:///path/to/dir?database=name`), both through `clickhouse-connect` (the optional extra
`.[clickhouse]`). `MetricsStore(url)` and `AsyncMetricsStore(url)` open these URLs; their reads and
writes are `clickhouse_repository`'s. ClickHouse is not a SQLAlchemy dialect here: the package
speaks ClickHouse SQL itself, with every user value sent as a bound parameter.

The schema lives in `sql/clickhouse/<NNNN>_<name>.sql`, each version's way back in
`<NNNN>_<name>.down.sql`; the version applied is recorded in `action_metrics_schema_version`.
Every statement is idempotent (DDL is not transactional here): an interrupted upgrade or
downgrade is finished by running it again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

from action_metrics.errors import SchemaNotCreated, SchemaOutOfDate, SchemaTooNew, UnsupportedDatabase
from action_metrics.migrate import sql_dir

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

SCHEMES: Final = ("chdb", "clickhouse", "clickhouses")
VERSION_TABLE: Final = "action_metrics_schema_version"
VERSION_QUERY: Final = f"SELECT max(version) FROM {VERSION_TABLE}"
"""The version applied (0: none), read by every write to refuse one the schema moved under."""
EARLIEST: Final = datetime(1900, 1, 1, tzinfo=UTC)
"""DateTime64's first instant: the beginning of time of this backend (prices seeded from it)."""
LATEST: Final = datetime(2300, 1, 1, tzinfo=UTC)
"""DateTime64's end (exclusive): a metric stamped outside [EARLIEST, LATEST) cannot be stored."""

ROLLUPS: Final = {
    "action_metrics_rollup_hourly": (),
    "action_metrics_rollup_hourly_detail": ("town_id", "action_type"),
}
"""The hourly rollup tables (sql/clickhouse/0004_rollups.sql), fewest rows first, and the dimensions
each keeps besides the model and the credit charge: a question is read from the first that keeps all
its filters' and groups' dimensions."""
DAILY_ROLLUPS: Final = {
    "action_metrics_rollup_hourly": "action_metrics_rollup_daily",
    "action_metrics_rollup_hourly_detail": "action_metrics_rollup_daily_detail",
}
"""Each hourly rollup's sums per UTC day (sql/clickhouse/0006_timeline_and_days.sql)."""
MONTHLY_ROLLUPS: Final = {
    "action_metrics_rollup_hourly": "action_metrics_rollup_monthly",
    "action_metrics_rollup_hourly_detail": "action_metrics_rollup_monthly_detail",
}
"""Each hourly rollup's sums per UTC month (sql/clickhouse/0007_months.sql)."""
USER_ROLLUPS: Final = ("action_metrics_rollup_daily_user", "action_metrics_rollup_monthly_user")
"""The sums per user, model and credit charge per UTC day and per UTC month (sql/clickhouse/0008_users.sql):
no hourly level. They hold every action from `USER_ROLLUPS_FROM` on."""
USER_ROLLUPS_FROM: Final = "user_rollups_from"
"""The prune cut-off in force when version 8 filled the user rollups (no row: never pruned then)."""
TIMELINE: Final = "action_metrics_timeline"
"""The actions, narrow, ordered by time, by user and by citizen (sql/clickhouse/0006): what the
rollups leave to raw rows is read there, counted as the rollups count it."""

_VERSION_FILE: Final = re.compile(r"^(\d{4})_(\w+)\.sql$")


def is_clickhouse_url(url: str | None) -> bool:
    return url is not None and urlsplit(url).scheme in SCHEMES


# --- where the database is ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClickHouseURL:
    """A ClickHouse database: a server over HTTP, or a chdb directory in this process."""

    given: str
    database: str
    in_process: bool

    @classmethod
    def parse(cls, url: str) -> ClickHouseURL:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise UnsupportedDatabase(f"not a ClickHouse URL (chdb:///path or clickhouse://host): {url!r}")
        if parts.scheme == "chdb":
            if parts.netloc or not parts.path:
                raise UnsupportedDatabase(
                    f"expected chdb:///absolute/path/to/a/directory[?database=name], got {url!r}"
                )
            database = parse_qs(parts.query).get("database", ["default"])[0]
            return cls(url, database, in_process=True)
        database = parts.path.strip("/") or "default"
        return cls(url, database, in_process=False)

    @property
    def location(self) -> tuple[str, str]:
        """Where the database is, whoever connects: the chdb directory or the server's host and port,
        and the database's name."""
        parts = urlsplit(self.given)
        place = parts.path if self.in_process else f"{parts.hostname}:{parts.port or 8123}"
        return place, self.database

    def shown(self) -> str:
        """The URL without its password, for messages."""
        parts = urlsplit(self.given)
        if parts.password is None:
            return self.given
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()

    def connect(self, *, with_database: bool = True) -> Client:
        """A clickhouse-connect client, on the database or (to create it) on the server's default."""
        try:
            import clickhouse_connect
        except ModuleNotFoundError:
            raise UnsupportedDatabase(
                "ClickHouse needs the optional extra: pip install 'action-metrics[clickhouse]'"
            ) from None
        parts = urlsplit(self.given)
        if self.in_process:
            return clickhouse_connect.get_client(
                dsn=f"chdb://{parts.path}", database=self.database if with_database else None
            )
        dsn = parts._replace(scheme="https" if parts.scheme == "clickhouses" else "http", path="").geturl()
        # No session: a store's calls run in worker threads and may overlap, which one session refuses.
        return clickhouse_connect.get_client(
            dsn=dsn, database=self.database if with_database else None, autogenerate_session_id=False
        )


# --- the versioned schema ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    """One file of `sql/clickhouse/`: the statements that take the schema to `number`."""

    number: int
    name: str
    path: Path

    @property
    def down_path(self) -> Path:
        return self.path.with_name(f"{self.path.stem}.down.sql")

    def statements(self) -> list[str]:
        """The file's statements: `--` comment lines dropped, split at each `;` that ends a line."""
        return _statements(self.path)

    def down_statements(self) -> list[str]:
        """The statements that take the schema back from `number` to the version before it."""
        return _statements(self.down_path)


def _statements(path: Path) -> list[str]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not _comment(line)]
    return [
        statement.strip()
        for statement in re.split(r";\s*$", "\n".join(lines), flags=re.M)
        if statement.strip()
    ]


def _comment(line: str) -> bool:
    return line.lstrip().startswith("--")


def schema_versions() -> list[SchemaVersion]:
    """Every version this package carries, oldest first."""
    found = []
    for path in sorted((sql_dir() / "clickhouse").iterdir()):
        if match := _VERSION_FILE.match(path.name):
            found.append(SchemaVersion(int(match[1]), match[2], path))
    return found


def head_version() -> int:
    return schema_versions()[-1].number


def parse_version(revision: str) -> int:
    """A version as `db upgrade`/`db downgrade` take it: `head`, `base` (no schema) or a number."""
    if revision == "head":
        return head_version()
    if revision == "base":
        return 0
    if revision.isdecimal() and 0 <= int(revision) <= head_version():
        return int(revision)
    raise UnsupportedDatabase(
        f"ClickHouse schema versions are head, base or 1 to {head_version()} (sql/clickhouse/), "
        f"got {revision!r}"
    )


_VERSION_TABLE_DDL: Final = f"""CREATE TABLE IF NOT EXISTS {VERSION_TABLE}
(
    version UInt32,
    name String,
    applied_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = MergeTree
ORDER BY version"""


def _version_row(version: SchemaVersion) -> str:
    # Both values come from this package's own file names (`_VERSION_FILE`), never from a user.
    return f"INSERT INTO {VERSION_TABLE} (version, name) VALUES ({version.number}, '{version.name}')"


def _forget_rows(number: int) -> str:
    # `number` is a version of this package's own files, never a user's.
    return f"DELETE FROM {VERSION_TABLE} WHERE version > {number}"


def upgrade_statements(url: ClickHouseURL, target: int | None = None, after: int = 0) -> list[str]:
    """Every statement from version `after` to `target` (default head), `--` lines marking versions."""
    statements = [
        f"CREATE DATABASE IF NOT EXISTS `{url.database}`",
        f"USE `{url.database}`",
        _VERSION_TABLE_DDL,
    ]
    for version in schema_versions():
        if after < version.number <= (head_version() if target is None else target):
            statements.extend([f"-- version {version.number}: {version.name}", *version.statements()])
            statements.append(_version_row(version))
    return statements


def printed(statements: list[str]) -> str:
    """Statements as `--sql` prints them: each ended by `;` and a blank line, comments as they are."""
    return "".join(s + "\n" if s.startswith("--") else s + ";\n\n" for s in statements)


def upgrade_sql(url: ClickHouseURL, after: int = 0, target: int | None = None) -> str:
    """What `db upgrade --sql` prints: every statement from version `after` to `target`, for a DBA."""
    return printed(upgrade_statements(url, target, after))


def downgrade_sql(url: ClickHouseURL, target: int) -> str:
    """What `db downgrade --sql` prints: from the head down to `target`, each version's down file
    and the forgetting of its row (idempotent, so it also fits a database below the head)."""
    statements = [f"USE `{url.database}`"]
    for version in reversed(schema_versions()):
        if version.number > target:
            statements.extend(
                [f"-- down from version {version.number}: {version.name}", *version.down_statements()]
            )
            statements.append(_forget_rows(version.number - 1))
    if target == 0:
        statements.append(f"DROP TABLE IF EXISTS {VERSION_TABLE}")
    return printed(statements)


def current_version(client: Client) -> int | None:
    """The version applied, or None when the database has no action-metrics schema."""
    if not client.command(f"EXISTS TABLE {VERSION_TABLE}"):
        return None
    return applied_version(client.query(VERSION_QUERY).result_rows[0][0])


def applied_version(number: Any) -> int | None:
    """`VERSION_QUERY`'s answer as a version: None when none is applied (its max is 0)."""
    return int(number) or None


def upgrade(url: ClickHouseURL, target: int | None = None) -> int:
    """Create the database if needed and apply the versions it lacks up to `target` (default
    head); the version reached."""
    client = url.connect(with_database=False)
    try:
        return upgrade_on(client, url, target)
    finally:
        client.close()


def upgrade_on(client: Client, url: ClickHouseURL, target: int | None = None) -> int:
    """`upgrade` through a client of the server, left on the database."""
    target = head_version() if target is None else target
    client.command(
        "CREATE DATABASE IF NOT EXISTS {database:Identifier}", parameters={"database": url.database}
    )
    client.database = url.database
    client.command(_VERSION_TABLE_DDL)
    applied = current_version(client) or 0
    for version in schema_versions():
        if applied < version.number <= target:
            for statement in version.statements():
                client.command(statement)
            client.command(_version_row(version))
    return max(applied, target)


def downgrade(url: ClickHouseURL, target: int) -> int | None:
    """Run the down files of the versions above `target`, newest first; the version reached
    (None: no schema, `base`). A version is forgotten only after its down file has run, so an
    interrupted downgrade is finished by running it again."""
    client = url.connect(with_database=False)
    try:
        applied = version_on(client, url)
        if applied is None:
            return None
        for version in reversed(schema_versions()):
            if target < version.number <= applied:
                for statement in version.down_statements():
                    client.command(statement)
                client.command(_forget_rows(version.number - 1))
        if target == 0:
            client.command(f"DROP TABLE IF EXISTS {VERSION_TABLE}")
            return None
        return min(applied, target)
    finally:
        client.close()


def version_of(url: ClickHouseURL) -> int | None:
    """`db current`: the version applied to the database (None: no schema, or no database)."""
    client = url.connect(with_database=False)
    try:
        return version_on(client, url)
    finally:
        client.close()


def actions_stored(url: ClickHouseURL) -> int | None:
    """How many actions the database holds, each id once (None: it has no action table)."""
    client = url.connect()
    try:
        if not client.command("EXISTS TABLE action_metrics"):
            return None
        return int(client.query("SELECT count() FROM action_metrics FINAL").result_rows[0][0])
    finally:
        client.close()


def version_on(client: Client, url: ClickHouseURL) -> int | None:
    """`version_of` through a client of the server, left on the database if it exists."""
    if not client.command("EXISTS DATABASE {database:Identifier}", parameters={"database": url.database}):
        return None
    client.database = url.database
    return current_version(client)


def describe_version(url: ClickHouseURL) -> str:
    """`db current`'s line: the version applied and whether it is this package's newest."""
    version, head = version_of(url), head_version()
    state = "head" if version == head else f"behind head {head}" if version else "no schema"
    return f"{version or '-'} ({state})"


def check_version(version: int | None, url: ClickHouseURL) -> None:
    """Insist that the database's `version` is this package's head; the error names the fix."""
    head = head_version()
    command = f"action-metrics db upgrade --url {url.shown()}"
    if version is None:
        raise SchemaNotCreated(f"{url.shown()} has no action-metrics schema: run {command}")
    if version < head:
        raise SchemaOutOfDate(f"{url.shown()} is at version {version}, not {head}: run {command}")
    if version > head:
        raise SchemaTooNew(
            f"{url.shown()} is at version {version}, newer than this package's {head}: upgrade action-metrics"
        )
