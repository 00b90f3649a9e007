"""Alembic migrations run from the installed package, and the schema-version check of every store.

The wheel carries `migrations/` and `sql/` inside the package (see pyproject.toml); a source checkout
reads them from the project's top level, where a DBA finds them. alembic is imported by the functions
that use it, as MLflow does: a process that never checks or changes a schema never loads it.
"""

from __future__ import annotations

import asyncio
import io
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

from sqlalchemy import URL, Connection, column, inspect, select, table

from action_metrics.dialects import WRITE, Backend, backend_for, display_url, server_settings
from action_metrics.errors import (
    DowngradeRefused,
    InvalidValue,
    SchemaError,
    SchemaNotCreated,
    SchemaOutOfDate,
    SchemaTooNew,
    SchemaUnknown,
)
from action_metrics.schema import rollup_state

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


def read_sql(*parts: str) -> str:
    """A file of `sql/` (hand-written SQL a migration runs), by its path's parts."""
    return sql_dir().joinpath(*parts).read_text(encoding="utf-8")


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


@cache
def head_revision() -> str:
    """The packaged migrations' head: the highest-numbered file of `migrations/versions`, as ours are
    numbered in one line (tests/test_migrations.py holds this to alembic's head). Read without
    alembic, whose import and script loading take ~0.3 s: a store checks its schema on the caller's
    event loop, which must not stall that long (`ensure_schema`)."""
    scripts = (migrations_dir() / "versions").glob("[0-9][0-9][0-9][0-9]_*.py")
    return max(script.name[:4] for script in scripts)


def current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


@cache
def revisions() -> tuple[str, ...]:
    """The packaged revisions, oldest first: the history is one line."""
    return tuple(reversed([script.revision for script in _scripts().walk_revisions()]))


def unknown_to_this_package() -> str:
    """How a revision missing from `revisions()` is named, with the ones this package has."""
    known = revisions()
    return f"unknown to this action-metrics, whose revisions are {known[0]} to {known[-1]}"


BUILT_AFTER_THE_SQL: Final = ("0003", "0007", "0009", "0012", "0013")
"""The revisions that leave rollups or sketches for `db upgrade` to write from the rows already stored
(`rollup.build`), which a migration's SQL cannot do a day per transaction: an upgrade printed by
`--sql` across any of them is followed by that build."""


def needs_a_build(start: str | None, target: str) -> bool:
    """Whether an upgrade from `start` (None: base) to `target` crosses `BUILT_AFTER_THE_SQL`."""
    return any(position(start) < position(revision) <= position(target) for revision in BUILT_AFTER_THE_SQL)


def is_newer(revision: str) -> bool:
    """Whether `revision`, not one of `revisions()`, can be a newer release's: a number past head
    (ours are numbered). Anything else is not an action-metrics revision."""
    return revision.isascii() and revision.isdigit() and int(revision) > int(revisions()[-1])


def position(revision: str | None) -> int:
    """Where `revision` stands in `revisions()`: -1 for base (no schema); ValueError for one this
    package does not know."""
    return -1 if revision is None else revisions().index(revision)


_STEPS: Final = re.compile(r"[+-][0-9]{1,4}")


def resolve_revision(name: str, current: str | None) -> str | None:
    """The revision `name` means: `head`, `base` (None), a revision id, or `+N`/`-N` steps from
    `current` (None: no schema). Raises `InvalidValue` naming `revision`."""
    known = revisions()
    if name == "head":
        return known[-1]
    if name == "base":
        return None
    if name in known:
        return name
    if _STEPS.fullmatch(name):
        reached = position(current) + int(name)
        if -1 <= reached < len(known):
            return None if reached == -1 else known[reached]
        raise InvalidValue(
            "revision",
            f"{name} from {current or 'base'} leaves the revisions (base, {known[0]} to {known[-1]})",
        )
    raise InvalidValue(
        "revision",
        f"unknown revision {name!r}: expected head, base, one of {known[0]} to {known[-1]}, "
        "or -N/+N steps from the database's revision",
    )


PRUNE_RECORDED: Final = "0003"
"""The migration that keeps the rollups and the prune cut-off (`rollup_state.raw_kept_from`)."""

DOWNGRADE_DROPS: Final = {
    "0015": "the credit claims of POST /v1/traces (action_metrics_credit_claims)",
    "0004": "every action's cache_read_tokens, cache_write_tokens, reasoning_tokens and error, the "
    "rollups' sums of them and error counts, and the models' cache prices: upgrading again brings "
    "back only the errors the metadata also holds (as @instrument_action writes them; "
    "ActionMetric(error=...) alone does not), so error_count and the cost of cached tokens change",
}
"""What the downgrade of each revision drops that upgrading again does not bring back."""


def downgrade_losses(current: str | None, target: str | None) -> list[str]:
    """What going from `current` down to `target` drops for good, the first dropped first."""
    if target is None and current is not None:
        return ["every action-metrics table, every action and price with them"]
    return _dropped(DOWNGRADE_DROPS, current, target)


def _dropped(drops: dict[str, str], current: str | None, target: str | None) -> list[str]:
    """The `drops` of the revisions a downgrade from `current` to `target` undoes."""
    high, low = position(current), position(target)
    return [what for revision, what in drops.items() if low < position(revision) <= high]


def pruned_before(connection: Connection) -> datetime | None:
    """The cut-off of `action-metrics db prune` (None: never pruned), at any revision."""
    current = current_revision(connection)
    if current is None or (current in revisions() and position(current) < position(PRUNE_RECORDED)):
        return None
    return connection.execute(select(rollup_state.c.raw_kept_from)).scalar()


@dataclass(frozen=True, slots=True)
class SchemaState:
    """What a downgrade or `--sql` needs to know of a database: its revision and prune cut-off."""

    revision: str | None
    pruned_before: datetime | None


async def schema_state(engine: AsyncEngine) -> SchemaState:
    async with engine.connect() as connection:
        return await connection.run_sync(
            lambda sync: SchemaState(current_revision(sync), pruned_before(sync))
        )


PRUNED_DOWNGRADE_DROPS: Final = {
    "0012": "the latency sketches per town, action type and day (a town's breakdown by action_type "
    "per day or month would then raise RawRowsPruned)",
    "0009": "the per-user rollup and sketches (every breakdown by user_id would then raise RawRowsPruned)",
    "0007": "the latency sketches per town and model (a breakdown by town_id per hour, day or month "
    "could then raise RawRowsPruned)",
    "0004": "the rollups' cache and reasoning token sums and error counts (they would read 0, and cached "
    "tokens would cost the input price)",
}
"""What the downgrade of each revision drops of a pruned period for good, besides `DOWNGRADE_DROPS`:
the rollups or sketches alone hold it, and upgrading again rebuilds them from the raw rows, which the
prune removed (the cut-off stays, so what needs them raises `RawRowsPruned`). Below `PRUNE_RECORDED`
the rollups go with the cut-off (`PRUNED_BELOW_0003`)."""

PRUNED_BELOW_0003: Final = (
    f"below {PRUNE_RECORDED} the rollups, which alone hold the pruned period, go with the cut-off, so "
    "upgraded again the store would answer partial numbers for that period without a word"
)

_DROPS_FOR_GOOD: Final = (
    "drops for good what only the rollups and sketches hold of the pruned period, as upgrading again "
    "rebuilds them from raw rows, which the prune removed"
)

PRUNED_PERIOD_LOST: Final = (
    f"a downgrade {_DROPS_FOR_GOOD}: "
    + "; ".join(f"below {revision} {what}" for revision, what in PRUNED_DOWNGRADE_DROPS.items())
    + f"; and {PRUNED_BELOW_0003}"
)
"""What a downgrade of a pruned store may lose, whatever the target (see `pruned_period_losses`)."""


def pruned_period_losses(current: str | None, target: str | None) -> list[str]:
    """What going from `current` down to `target` drops for good of a pruned period, the first
    dropped first; below 0003 only `PRUNED_BELOW_0003`, which takes all the rest with it."""
    if current is not None and current not in revisions():
        current = revisions()[-1]  # newer than this package: all it knows of may go
    if position(current) < position(PRUNE_RECORDED):
        return []  # no rollups, no cut-off: nothing was pruned
    if position(target) < position(PRUNE_RECORDED):
        return [PRUNED_BELOW_0003]
    return _dropped(PRUNED_DOWNGRADE_DROPS, current, target)


def loses_the_pruned_period(target: str | None, current: str | None) -> bool:
    """Whether a downgrade from `current` to `target` loses some of a pruned period for good."""
    return bool(pruned_period_losses(current, target))


def keep_the_pruned_period(cutoff: datetime | None, target: str | None, current: str | None) -> None:
    """Refuse (`DowngradeRefused`) a downgrade of a pruned store from `current` to `target` that
    loses some of the pruned period for good (`pruned_period_losses`): below 0003 the rollups go
    with the cut-off that makes questions about that period raise `RawRowsPruned`; below 0012,
    0009, 0007 and 0004 rollup levels and sketches go that only the pruned raw rows could rebuild."""
    if cutoff is None:
        return
    lost = pruned_period_losses(current, target)
    if not lost:
        return
    if lost == [PRUNED_BELOW_0003]:
        what = PRUNED_BELOW_0003
    else:
        what = f"a downgrade to {target} {_DROPS_FOR_GOOD}: {'; '.join(lost)}"
    raise DowngradeRefused(
        f"the store was pruned before {cutoff.isoformat()} (db prune): {what}; to give that up and "
        "downgrade anyway, add --forget-prune"
    )


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


UPGRADED_FROM: Final = "action_metrics_upgraded_from"
"""alembic `config.attributes` key: the revision an upgrade starts from (None: base), which `db
upgrade` sets for a migration's messages (0005 names what 0004 filled in a database that was behind
it: `error` from `metadata.error`); absent, the start is not known."""


def upgrade_to(revision: str) -> Callable[[Config], None]:
    def upgrade(config: Config) -> None:
        from alembic import command

        command.upgrade(config, revision)

    return upgrade


def downgrade_to(revision: str, *, forget_prune: bool = False) -> Callable[[Config], None]:
    """Downgrade to `revision`; on a pruned store refused (`DowngradeRefused`) where it loses some of
    the pruned period for good (`pruned_period_losses`) unless `forget_prune`, checked in the
    migration's own transaction."""

    def downgrade(config: Config) -> None:
        from alembic import command

        connection = config.attributes.get("connection")
        if connection is not None and not forget_prune:
            current = current_revision(connection)
            target = resolve_revision(revision, current)
            keep_the_pruned_period(pruned_before(connection), target, current)
        command.downgrade(config, revision)

    return downgrade


def offline_sql(url: str | URL | None, action: str, revision: str) -> str:
    """The SQL a migration would run, for a DBA to review and run by hand. `revision` is a range
    `FROM:TO`, or a target alone: an upgrade from base, a downgrade from head."""
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
    return _session_settings(url) + buffer.getvalue()


def _session_settings(url: str | URL | None) -> str:
    """The settings a PostgreSQL URL's `options` give its sessions (`?options=-csearch_path%3Dmetrics`),
    as statements run first, so that the DBA's session creates the tables where the store's sessions
    look for them, as a migration run by `db upgrade` does (without them the script built the schema
    in `public`, the store then finding none in `metrics`). `set_config` reads each value as `-c`
    does: a search_path list stays a list."""
    if url is None:
        return ""
    backend = backend_for(url)
    options = backend.given_url.query.get("options")
    if backend.name != "postgresql" or options is None:
        return ""
    lines = ["-- the settings of this URL's options, as its sessions have them"]
    for name, value in server_settings(options).items():
        quoted = [text.replace("'", "''") for text in (name, value)]
        lines.append(f"SELECT pg_catalog.set_config('{quoted[0]}', '{quoted[1]}', false);")
    return "\n".join(lines) + "\n\n"


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
                # cannot both migrate it. alembic is loaded off the caller's event loop first.
                await asyncio.to_thread(revisions)
                await connection.run_sync(_run_with_connection, upgrade_to("head"), io.StringIO())
                return
    if revision != head:
        raise await asyncio.to_thread(_schema_refusal, revision, head, backend)  # alembic, off the loop


async def check_still_at_head(connection: AsyncConnection, backend: Backend) -> None:
    """Raise `_schema_refusal`'s error unless the schema, read in the connection's transaction, is
    at this package's head (one plain SELECT; alembic only to word a refusal, off the event loop)."""
    revision = (await connection.execute(select(_alembic_version.c.version_num))).scalar()
    head = head_revision()
    if revision != head:
        raise await asyncio.to_thread(_schema_refusal, revision, head, backend)


def _schema_refusal(revision: str | None, head: str, backend: Backend) -> SchemaError:
    """Why a store cannot use a schema not at `head`, with the command that fixes it."""
    command_hint = f"action-metrics db upgrade --url '{display_url(backend.given_url)}'"
    where = display_url(backend.given_url)
    if revision is None:
        return SchemaNotCreated(f"{where} has no action-metrics schema; create it with: {command_hint}")
    if revision in revisions():
        return SchemaOutOfDate(
            f"{where} is at schema revision {revision}, this action-metrics needs {head}; "
            f"upgrade it with: {command_hint}"
        )
    if is_newer(revision):
        return SchemaTooNew(
            f"{where} is at schema revision {revision}, newer than this action-metrics knows "
            f"(head {head}); upgrade the action-metrics package"
        )
    return SchemaUnknown(
        f"{where} is at schema revision {revision}, {unknown_to_this_package()}: not an action-metrics "
        "revision (another project's alembic_version?); check that the URL names an action-metrics "
        "database"
    )


_alembic_version: Final = table("alembic_version", column("version_num"))


def _inspect_schema(connection: Connection) -> tuple[str | None, bool]:
    """The stored revision, and whether other tables exist: read without alembic (see head_revision)."""
    tables = set(inspect(connection).get_table_names())
    if "alembic_version" not in tables:
        return None, bool(tables)
    stored = connection.execute(select(_alembic_version.c.version_num)).scalars().all()
    if len(stored) > 1:  # a branched history, not ours: alembic's own reading says what is wrong
        return current_revision(connection), True
    return (stored[0] if stored else None), len(tables) > 1


async def revision_of(connection: AsyncConnection) -> str | None:
    return await connection.run_sync(current_revision)
