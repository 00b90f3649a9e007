"""The `action-metrics` command: database migrations, the demo town, reports and the metrics endpoint."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, ParamSpec, TypeVar

import click
from click.core import ParameterSource
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import URL

from action_metrics import clickhouse, migrate, page, report
from action_metrics import demo as town
from action_metrics.aggregate import Aggregate
from action_metrics.breakdown import BUCKETS, SORT_KEYS, TZ_VARIABLE, BreakdownRow, reader_zone
from action_metrics.breakdown_report import (
    DIMENSION_OPTIONS,
    Offender,
    render_table,
    write_csv,
    write_json,
)
from action_metrics.dialects import (
    URL_VARIABLE,
    Backend,
    SQLiteBackend,
    backend_for,
    display_url,
    resolve_url,
)
from action_metrics.errors import (
    ActionMetricsError,
    InvalidFilter,
    InvalidPrice,
    InvalidValue,
    SchemaNotCreated,
    SchemaTooNew,
    StatementRefused,
    translated,
)
from action_metrics.pricing import ModelPrice
from action_metrics.repository import MetricsRepository, PruneResult, translate
from action_metrics.rollup import BuildProgress, RollupState
from action_metrics.store import AsyncMetricsStore, repository_for
from action_metrics.transfer import (
    DEFAULT_COPY_BATCH,
    CopyProgress,
    CopyResult,
    Totals,
    compare_totals,
    copy_store,
)
from action_metrics.validation import check_action_type, check_id, check_model

if TYPE_CHECKING:
    from alembic.config import Config

    from action_metrics.catalogue import PriceSync

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
    """Expected failures (action-metrics' own exceptions) print one line and exit 1; a traceback is
    for bugs only."""

    @wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return command(*args, **kwargs)
        except ActionMetricsError as error:
            raise click.ClickException(str(error)) from None

    return run


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run()`, but the loop closes only after aiosqlite's worker threads have finished.

    When a SQLite file cannot be opened, aiosqlite stops its worker thread without awaiting it, and
    the thread then posts to the loop; if `asyncio.run()` has closed the loop by then, the thread
    prints a traceback after our one-line error (aiosqlite issue #259). The store has closed its
    connections by the time the coroutine returns, so these threads are ending. Only the threads
    started meanwhile are awaited: another store of the same process keeps its own.
    """
    running_before = set(threading.enumerate())
    with asyncio.Runner() as runner:
        try:
            return runner.run(coroutine)
        finally:
            for thread in set(threading.enumerate()) - running_before:
                if thread.name.endswith("(_connection_worker_thread)"):
                    thread.join(timeout=10)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="action-metrics")
def main() -> None:
    """Unit economics of LLM-powered products, in SQL."""


def _since(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """`--since` (or `--until`, `--before`): a duration back from now (30m, 24h, 7d, 2w) or an ISO
    8601 date or time."""
    if value is None:
        return None
    try:
        return report.parse_since(value, field="until" if param.name == "until" else "since")
    except InvalidValue as error:
        raise click.BadParameter(error.problem, ctx, param) from None


@main.group()
def db() -> None:
    """Migrate the database schema with the migrations this package carries."""


async def _on_database(backend: Backend, use: Callable[[MetricsRepository], Awaitable[T]]) -> T:
    """`use` a repository of the database, whatever its schema revision (a store would refuse one behind)."""
    repository = MetricsRepository(backend.create_engine(), backend)
    try:
        return await use(repository)
    finally:
        await repository.close()


sql_option = click.option(
    "--sql",
    is_flag=True,
    help="Print the SQL for a DBA instead of running it: from the revision the database is at when "
    "it can be read (else an upgrade from base, a downgrade from head), or give the range as "
    "REVISION, e.g. 0009:head.",
)
SQL_READ_TIMEOUT_S: Final = 15.0
"""How long `--sql` waits to read the database's revision before printing from base (or head)."""


def _sqlite_file_missing(backend: Backend) -> bool:
    """A SQLite file not there yet, in a directory that is: opening it would create it."""
    if not isinstance(backend, SQLiteBackend) or backend.in_memory or "uri" in backend.url.query:
        return False
    path = Path(backend.url.database or "")
    return not path.exists() and path.parent.is_dir()


def _require_store_file(url: str | None) -> None:
    """Refuse (`SchemaNotCreated`) a SQLite file that is not there: a command that reads or changes a
    store would create a new one, and answer from it (a mistyped path read as an empty store). `db
    upgrade` and `demo` make stores; `serve` too (see the README)."""
    if clickhouse.is_clickhouse_url(url):
        return
    backend = backend_for(url)
    if _sqlite_file_missing(backend):
        where = display_url(backend.given_url)
        raise SchemaNotCreated(
            f"{where}: there is no file {Path(backend.url.database or '').absolute()} (a mistyped path?); "
            f"to create a store there: action-metrics db upgrade --url '{where}'"
        )


def _is_known(revision: str | None) -> bool:
    return revision is None or revision in migrate.revisions()


def _refuse_unknown(revision: str | None, where: str) -> None:
    """Refuse a database at a revision this package does not know before changing anything: neither
    steps from it (-1) nor a direction to it mean anything."""
    if not _is_known(revision):
        raise SchemaTooNew(
            f"{where} is at schema revision {revision}, {migrate.unknown_to_this_package()}; nothing was "
            "changed. If a newer action-metrics migrated it, upgrade the package; else it is not an "
            "action-metrics schema"
        )


async def _read_schema(backend: Backend) -> migrate.SchemaState:
    """The database's revision and prune cut-off, without creating a SQLite file to read them. At a
    revision this package does not know, the cut-off is not read (its table may not be there)."""
    if _sqlite_file_missing(backend):
        return migrate.SchemaState(None, None)

    async def read(repository: MetricsRepository) -> migrate.SchemaState:
        with translated(translate, display_url(backend.given_url)):
            revision = await repository.schema_revision()
            if not _is_known(revision):
                return migrate.SchemaState(revision, None)
            return await migrate.schema_state(repository.engine)

    return await _on_database(backend, read)


def _position(revision: str | None, where: str) -> int:
    _refuse_unknown(revision, where)
    return migrate.position(revision)


def _resolve(name: str, current: str | None) -> str | None:
    try:
        return migrate.resolve_revision(name, current)
    except InvalidValue as error:
        raise click.BadParameter(error.problem, param_hint="'REVISION'") from None


def _named(revision: str | None) -> str:
    return revision or "base"


def _check_direction(
    direction: Literal["upgrade", "downgrade"], start: str | None, target: str | None, where: str
) -> None:
    """An upgrade goes up and a downgrade down: the other way is a usage error, never a silent no-op."""
    below, above = (
        _position(target, where) < _position(start, where),
        _position(target, where) > _position(start, where),
    )
    command = f"--url '{where}'"
    if direction == "upgrade" and below:
        raise click.UsageError(
            f"{where} is at revision {start}, already past {_named(target)}: nothing to upgrade; "
            f"to go back run: action-metrics db downgrade {_named(target)} {command}"
        )
    if direction == "downgrade" and above:
        raise click.UsageError(
            f"{where} is at revision {_named(start)}, below {target}: nothing to downgrade; "
            f"to go forward run: action-metrics db upgrade {target} {command}"
        )


def _downgrade_warnings(state: migrate.SchemaState, target: str | None, *, forget_prune: bool) -> list[str]:
    """What a downgrade from `state` to `target` loses for good; refused (`DowngradeRefused`) if it
    loses a pruned period without `forget_prune`."""
    if not forget_prune:
        migrate.keep_the_pruned_period(state.pruned_before, target, state.revision)
    warnings = [f"this downgrade drops {what}" for what in migrate.downgrade_losses(state.revision, target)]
    if state.pruned_before is not None and migrate.loses_the_pruned_period(target, state.revision):
        warnings.append(
            f"--forget-prune: the store was pruned before {state.pruned_before.isoformat()}; "
            f"{migrate.PRUNED_PERIOD_LOST}"
        )
    return warnings


def _upgrade_from(start: str | None, upgrade: Callable[[Config], None]) -> Callable[[Config], None]:
    def run(config: Config) -> None:
        config.attributes[migrate.UPGRADED_FROM] = start
        upgrade(config)

    return run


def _migrate(
    direction: Literal["upgrade", "downgrade"],
    revision: str,
    url: str | None,
    *,
    forget_prune: bool = False,
    confirm_base: bool = False,
) -> str | None:
    """Migrate the database to `revision`; the revision reached. `confirm_base`: ask before a
    downgrade to base."""
    backend = backend_for(url)
    where = display_url(backend.given_url)
    state = run_async(_read_schema(backend))
    current = state.revision
    _refuse_unknown(current, where)
    if direction == "downgrade" and current is None:
        _require_store_file(url)  # a mistyped file: not "at revision base already"
    target = _resolve(revision, current)
    _check_direction(direction, current, target, where)
    if target == current:
        click.echo(f"{where} is at revision {_named(current)} already", err=True)
        return target
    if direction == "upgrade":
        action = _upgrade_from(current, migrate.upgrade_to(_named(target)))
    else:
        # Checked again in the migration's transaction; here so that nothing is printed before.
        for warning in _downgrade_warnings(state, target, forget_prune=forget_prune):
            click.echo(f"warning: {warning}", err=True)
        if target is None and confirm_base:
            stored = run_async(_on_database(backend, lambda repository: repository.count_after(None)))
            _confirm_dropping_everything(where, stored)
        action = migrate.downgrade_to(_named(target), forget_prune=forget_prune)
    try:
        run_async(_on_database(backend, lambda database: database.run_migrations(action)))
    except KeyboardInterrupt:
        _interrupted_migration(backend, where)
    click.echo(f"{where} is at revision {_named(target)}", err=True)
    return target


def _interrupted_migration(backend: Backend, where: str) -> NoReturn:
    """Ctrl-C during a migration: its one transaction was rolled back (the connection closed with it);
    say where the database is, read anew, and how to go on, rather than click's bare "Aborted!"."""
    try:
        revision = _named(run_async(_read_schema(backend)).revision)
    except (ActionMetricsError, KeyboardInterrupt):
        revision = "it was at before (a migration runs in one transaction)"
    click.echo(
        f"interrupted: the migration was rolled back, {where} is at revision {revision}; "
        "run the command again to migrate",
        err=True,
    )
    raise click.exceptions.Exit(130) from None


def _print_sql(
    direction: Literal["upgrade", "downgrade"], revision: str, url: str | None, *, forget_prune: bool = False
) -> str | None:
    """Print the SQL from the database's revision (or the range given) to the target; the target."""
    backend = backend_for(url)
    where = display_url(backend.given_url)
    header = f"-- action-metrics db {direction}"
    if ":" in revision:
        first, _, last = revision.partition(":")
        if any(name[:1] in ("+", "-") for name in (first, last)):
            raise click.BadParameter(
                "a range FROM:TO takes revision ids, head or base", param_hint="'REVISION'"
            )
        start, target = _resolve(first, None), _resolve(last, None)
        comment = f"{header}: the SQL from {_named(start)} to {_named(target)}, the range given"
        state = None
    else:
        if direction == "downgrade":
            _require_store_file(url)  # else "at revision base already: no SQL to run"
        try:
            state = run_async(asyncio.wait_for(_read_schema(backend), SQL_READ_TIMEOUT_S))
        except (ActionMetricsError, TimeoutError) as error:
            reason = str(error) or f"no answer in {SQL_READ_TIMEOUT_S:g} s"
            start = None if direction == "upgrade" else migrate.head_revision()
            target = _resolve(revision, start)
            comment = (
                f"{header}: could not read the revision of {where} ({reason});\n-- so the SQL from "
                f"{_named(start)} to {_named(target)}; for a database at another revision, give the range "
                "FROM:TO as REVISION, FROM being the revision `db current` shows"
            )
            state = None
        else:
            start = state.revision
            _refuse_unknown(start, where)
            target = _resolve(revision, start)
            at = f"where {where} is" if start is not None else f"{where} has no action-metrics schema"
            comment = f"{header}: the SQL from {_named(start)} ({at}) to {_named(target)}"
    _check_direction(direction, start, target, where)
    if target == start:
        click.echo(f"{header}: {where} is at revision {_named(start)} already: no SQL to run")
        return target
    if direction == "downgrade":
        known = state or migrate.SchemaState(start, None)
        warnings = _downgrade_warnings(known, target, forget_prune=forget_prune)
        if state is None and migrate.loses_the_pruned_period(target, start):
            warnings.append(f"if the database was pruned (db prune), {migrate.PRUNED_PERIOD_LOST}")
        comment = "\n".join([comment, *(f"-- warning: {warning}" for warning in warnings)])
    click.echo(f"{comment}\n")
    click.echo(
        migrate.offline_sql(backend.given_url, direction, f"{_named(start)}:{_named(target)}"), nl=False
    )
    if direction == "upgrade" and target == migrate.head_revision() and migrate.needs_a_build(start, target):
        left = (
            "The rollups start empty. To build them"
            if migrate.needs_a_build(start, "0003")
            else "Part of the rollups is left unwritten. To write it"
        )
        click.echo(
            f"-- {left} from the rows already stored (a day per\n"
            "-- transaction, resumable), run: action-metrics db upgrade --url <this database>"
        )
    return target


cluster_option = click.option(
    "--cluster",
    metavar="NAME",
    help="ClickHouse with --sql: print the DDL ON CLUSTER NAME (replicated tables, the actions "
    "sharded behind a Distributed table).",
)


# upgrade and downgrade repeat their options on purpose: click reads them from each command.
@db.command()
@click.argument("revision", default="head")
@url_option
@sql_option
@cluster_option
@friendly_errors
def upgrade(revision: str, url: str | None, sql: bool, cluster: str | None) -> None:
    """Upgrade the schema to REVISION (default: head); with --sql, REVISION may be a range FROM:TO."""
    if clickhouse.is_clickhouse_url(url):
        _upgrade_clickhouse(revision, url or "", sql, cluster)
        return
    if cluster is not None:
        raise click.UsageError("--cluster is for ClickHouse URLs (clickhouse://, chdb://) only")
    if sql:
        _print_sql("upgrade", revision, url)
    elif _migrate("upgrade", revision, url) == migrate.head_revision():
        _build_rollups(backend_for(url))


def _upgrade_clickhouse(revision: str, url: str, sql: bool, cluster: str | None) -> None:
    """ClickHouse keeps its own numbered DDL (`sql/clickhouse/`), not alembic's revisions."""
    target = clickhouse.ClickHouseURL.parse(url)
    if cluster is not None:
        if not sql:
            raise click.UsageError("--cluster prints the DDL only: add --sql and run it as an operator")
        from action_metrics.clickhouse_cluster import check_cluster_name

        check_cluster_name(cluster)  # before anything is read
    if sql:
        _print_clickhouse_sql(target, revision, cluster)
        return
    if ":" in revision:
        raise click.BadParameter("a range FROM:TO is for --sql", param_hint="'REVISION'")
    reached = clickhouse.upgrade(target, clickhouse.parse_version(revision))
    click.echo(f"{target.shown()} is at ClickHouse schema version {reached}", err=True)


def _print_clickhouse_sql(url: clickhouse.ClickHouseURL, revision: str, cluster: str | None) -> None:
    """`db upgrade --sql` on ClickHouse, as on the SQL backends: the statements from the version the
    database is at (or the range FROM:TO given) to the target. Printed from base, a database already
    at a version would run its fills again: a pruned one would lose the period its rollups keep."""
    header = "-- action-metrics db upgrade"
    where = url.shown()
    if ":" in revision:
        first, _, last = revision.partition(":")
        start, version = clickhouse.parse_version(first), clickhouse.parse_version(last)
        comment = f"{header}: the ClickHouse SQL from version {start} to {version}, the range given"
    else:
        version = clickhouse.parse_version(revision)
        try:
            start = _clickhouse_version_for_sql(url) or 0
        except _clickhouse_read_errors() as error:
            start = 0
            comment = (
                f"{header}: could not read the version of {where} ({' '.join(str(error).split())});\n"
                "-- so the ClickHouse SQL "
                f"from base to version {version}; for a database at another version, give the range "
                "FROM:TO as REVISION, FROM being the version `db current` shows"
            )
        else:
            at = f"where {where} is" if start else f"{where} has no action-metrics schema"
            comment = f"{header}: the ClickHouse SQL from version {start or 'base'} ({at}) to {version}"
    if version < start:
        raise click.UsageError(f"version {version} is below {start}: db downgrade goes down")
    if version == start:
        click.echo(f"{header}: {where} is at ClickHouse schema version {start} already: no SQL to run")
        return
    if cluster is not None:
        from action_metrics.clickhouse_cluster import cluster_statements

        statements = cluster_statements(url, cluster, version, after=start)
        comment += f", ON CLUSTER {cluster}"
    else:
        statements = clickhouse.upgrade_statements(url, version, after=start)
    click.echo(comment)
    click.echo(clickhouse.printed(statements), nl=False)


def _clickhouse_read_errors() -> tuple[type[BaseException], ...]:
    """What reading a ClickHouse database's version raises when it cannot be read."""
    try:
        from clickhouse_connect.driver.exceptions import ClickHouseError
    except ImportError:  # the extra is not installed: connecting says so
        return (ActionMetricsError, OSError)
    return (ActionMetricsError, OSError, ClickHouseError)


def _clickhouse_version_for_sql(url: clickhouse.ClickHouseURL) -> int | None:
    """The version the database is at, read without creating anything: a chdb directory that is not
    there has no schema (opening it would create it)."""
    if url.in_process and not Path(url.location[0]).exists():
        return None
    return clickhouse.version_of(url)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


@contextmanager
def _bar_from_first_report(console: Console, description: str) -> Iterator[Callable[..., None]]:
    """A progress bar shown from its first report on, which comes once the command's refusals are
    behind it: a refused command prints its one line without a bar at 0/? above it."""
    progress = _progress(console)
    task = progress.add_task(description, total=None, start=False)

    def report(completed: int, total: int | None = None) -> None:
        if not progress.live.is_started:
            progress.start()
            progress.start_task(task)
        progress.update(task, completed=completed, total=total)

    try:
        yield report
    finally:
        progress.stop()


def _build_rollups(backend: Backend) -> None:
    """Sum the rows already stored into the rollups, a day per transaction: run again, it resumes."""

    async def build(repository: MetricsRepository) -> RollupState:
        with _progress(_stderr()) as progress:
            task = progress.add_task("Building the rollups (days)", total=None)

            def report_progress(done: BuildProgress) -> None:
                progress.update(task, completed=done.done, total=done.total)

            return await repository.build_rollups(report_progress)

    try:
        state = run_async(_on_database(backend, build))
    except KeyboardInterrupt:
        # A day per transaction: what was written stays, the day under way was rolled back.
        where = display_url(backend.given_url)
        click.echo(
            f"interrupted: {where} is at revision {migrate.head_revision()} with its rollups built in "
            "part (every answer is still right, read from raw rows meanwhile); to resume where it "
            f"stopped, run again: action-metrics db upgrade --url '{where}'",
            err=True,
        )
        raise click.exceptions.Exit(130) from None
    reach = state.days_closed_until.isoformat() if state.days_closed_until else "nothing stored yet"
    click.echo(f"rollups built: whole days up to {reach}", err=True)


@db.command()
@click.argument("revision")
@url_option
@sql_option
@click.option(
    "--forget-prune",
    is_flag=True,
    help="Downgrade a pruned store below 0012 anyway: rollup levels go that alone hold the period "
    "before the prune cut-off (below 0003 the cut-off with them; upgraded again, the store cannot "
    "answer some breakdowns of that period, or answers from what is left without a word).",
)
@click.option(
    "--yes",
    "-y",
    is_flag=True,
    help="Downgrade to base without asking: it drops every action-metrics table, the actions stored "
    "with them.",
)
@friendly_errors
def downgrade(revision: str, url: str | None, sql: bool, forget_prune: bool, yes: bool) -> None:
    """Downgrade the schema to REVISION ('base' removes every action-metrics table, and asks first
    unless --yes); with --sql, REVISION may be a range FROM:TO.

    Below 0004 every action's cache, reasoning token counts and error go, and the cache prices (a
    warning names them); a pruned store is refused below 0012, whose levels alone hold the pruned
    period, without --forget-prune.
    """
    if clickhouse.is_clickhouse_url(url):
        target = clickhouse.ClickHouseURL.parse(url or "")
        version = clickhouse.parse_version(revision)
        if sql:
            click.echo(clickhouse.downgrade_sql(target, version), nl=False)
            return
        if version == 0 and not yes and clickhouse.version_of(target) is not None:
            _confirm_dropping_everything(target.shown(), clickhouse.actions_stored(target))
        reached = clickhouse.downgrade(target, version)
        click.echo(f"{target.shown()} is at ClickHouse schema version {reached or 'base'}", err=True)
        return
    if sql:
        _print_sql("downgrade", revision, url, forget_prune=forget_prune)
    else:
        _migrate("downgrade", revision, url, forget_prune=forget_prune, confirm_base=not yes)


def _confirm_dropping_everything(where: str, actions: int | None) -> None:
    """Ask before a downgrade to base (which drops the actions with the tables); no answer (a script,
    no terminal) is no."""
    held = (
        ""
        if actions is None
        else f", with the {actions:,} action{'' if actions == 1 else 's'} stored and the rollups"
    )
    click.confirm(
        f"Downgrading {where} to base drops every action-metrics table{held}. Go on? (--yes: do not ask)",
        abort=True,
        err=True,
    )


@db.command()
@url_option
@click.option(
    "--older-than",
    "older_than",
    metavar="AGE",
    callback=_since,
    help="Remove raw rows older than this: 90d, 12w, 24h.",
)
@click.option(
    "--before",
    metavar="DATE",
    callback=_since,
    help="Remove raw rows before the UTC midnight at or before this date/time (no zone: local time).",
)
@click.option("--dry-run", is_flag=True, help="Print what would be removed, remove nothing.")
@friendly_errors
def prune(url: str | None, older_than: datetime | None, before: datetime | None, dry_run: bool) -> None:
    """Remove raw rows before a cut-off and keep the rollups, so all-time dashboards still answer.

    The cut-off is the UTC midnight at or before the time given. Afterwards aggregates over whole
    days before it still answer from the rollups; what needs raw rows there (exact=True, query(),
    a user or citizen filter) raises an error naming the cut-off, and metrics from before it are
    refused (their ids are gone, so a re-sent one would count twice).
    """
    if (older_than is None) == (before is None):
        raise click.UsageError("give exactly one of --older-than and --before")
    cutoff = older_than if older_than is not None else before
    assert cutoff is not None
    _require_store_file(url)
    err = _stderr()

    async def run() -> tuple[PruneResult, datetime | None]:
        async with AsyncMetricsStore(url) as store:
            if dry_run:
                result = await store.prune(cutoff, dry_run=True)
            else:
                with _bar_from_first_report(err, "Removing raw rows") as report:  # the cut-off accepted
                    result = await store.prune(cutoff, progress=report)
        return result, await _cutoff_in_force(store.url)  # once the store is closed (chdb: one client)

    result, in_force = run_async(run())
    when = result.cutoff.isoformat()
    # The cut-off only moves forward: an earlier one leaves the store's own standing.
    later = in_force.isoformat() if in_force is not None and in_force > result.cutoff else None
    if result.dry_run:
        stands = "" if later is None else f"; the store is pruned before {later} already, which stands"
        click.echo(
            f"would remove {result.rows:,} raw rows from before {when}; the rollups keep their sums{stands}"
        )
    elif later is not None:
        click.echo(
            f"removed {result.rows:,} raw rows from before {when}: the store was pruned before {later} "
            f"already, a later cut-off, which stands; metrics from before {later} are refused, as they were"
        )
    else:
        click.echo(
            f"removed {result.rows:,} raw rows from before {when}; the rollups keep their sums; "
            f"metrics from before {when} are refused from now on"
        )


async def _cutoff_in_force(url: URL) -> datetime | None:
    """The prune cut-off of the store at `url` (None: never pruned)."""
    repository = repository_for(url)()
    try:
        await repository.ensure_schema()  # ClickHouse's connects here
        return await repository.raw_kept_from()
    finally:
        await repository.close()


@db.command(name="copy")
@click.option("--from", "source", required=True, metavar="URL", help="The store to copy (it is only read).")
@click.option("--to", "destination", required=True, metavar="URL", help="The store to copy into.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_COPY_BATCH,
    show_default=True,
    help="Actions per read and per insert.",
)
@click.option(
    "--skip-pruned-period",
    is_flag=True,
    help="Copy a pruned source anyway: its actions from the prune cut-off on, giving up every figure "
    "before it (only the source's rollups hold them; the copy refuses questions about that period).",
)
@friendly_errors
def copy_command(source: str, destination: str, batch_size: int, skip_pruned_period: bool) -> None:
    """Copy a store (its prices, then its raw actions) into another database, e.g. SQLite or
    PostgreSQL into ClickHouse, then compare both stores' totals.

    Interrupted, run it again: into ClickHouse it resumes after the last batch it recorded, into
    SQLite or PostgreSQL it starts over and skips the actions already there. Nothing counts twice.
    Stop the source's writers first: an action written to it during the copy, older than the
    last one copied, is left behind.
    """
    err = _stderr()
    with _bar_from_first_report(err, "Copying actions") as report:  # after the refusals: a pruned source, ...

        def report_progress(done: CopyProgress) -> None:
            report(done.sent, done.total)

        result = run_async(
            copy_store(
                source,
                destination,
                batch_size=batch_size,
                skip_pruned_period=skip_pruned_period,
                progress=report_progress,
            )
        )
    _report_copy(result)
    with err.status("Comparing the totals..."):
        totals = run_async(compare_totals(source, destination, result.pruned_before))
    _report_totals(totals, result)


def _report_copy(result: CopyResult) -> None:
    resumed = (
        f", resuming after {result.resumed_after.timestamp.isoformat()}"
        if result.resumed_after is not None
        else ""
    )
    click.echo(
        f"copied {result.sent:,} actions ({result.copied:,} in all{resumed}), {result.model_prices} model "
        f"prices, {result.credit_prices} credit prices and {result.credit_claims:,} credit claims from "
        f"{result.source} to {result.destination}",
        err=True,
    )
    if result.pruned_before is not None:
        click.echo(
            f"skipped the pruned period: {result.destination} holds no actions from before "
            f"{result.pruned_before.isoformat()}; what needs them raises RawRowsPruned",
            err=True,
        )
    for price in result.destination_only_prices:
        click.echo(
            f"warning: {result.destination} also has a {price.source} price of {price.model} from "
            f"{price.effective_from.isoformat()} that {result.source} lacks; it prices copied actions too",
            err=True,
        )


def _report_totals(totals: Totals, result: CopyResult) -> None:
    for name, aggregate in ((result.source, totals.source), (result.destination, totals.destination)):
        click.echo(
            f"{name}: {aggregate.count:,} actions, {aggregate.total_cost_usd:.9f} USD cost, "
            f"{aggregate.total_revenue_usd:.9f} USD revenue",
            err=True,
        )
    compared = (
        "the totals"
        if result.pruned_before is None
        else f"the totals of the copied period, from {result.pruned_before.isoformat()} on,"
    )
    if totals.agree:
        click.echo(f"{compared} agree", err=True)
    else:
        click.echo(
            f"warning: {compared} differ: the destination held other actions or prices before the "
            "copy, or the source was written to during it",
            err=True,
        )


@db.command()
@url_option
@friendly_errors
def current(url: str | None) -> None:
    """Print the database's schema revision and whether it is the newest this package knows."""
    if clickhouse.is_clickhouse_url(url):
        click.echo(clickhouse.describe_version(clickhouse.ClickHouseURL.parse(url or "")))
        return
    backend = backend_for(url)
    head = migrate.head_revision()

    async def read(repository: MetricsRepository) -> tuple[str | None, list[str] | str]:
        """The revision, and at head what the build has left (or why that could not be read)."""
        revision = await repository.schema_revision()
        if revision != head:
            return revision, []
        try:
            return revision, await repository.unfinished_build()
        except StatementRefused as refused:  # a role that may read alembic_version only
            return revision, refused.reason

    revision, unfinished = (
        (None, [])  # not created just to say it has no schema
        if _sqlite_file_missing(backend)
        else run_async(_on_database(backend, read))
    )
    if not _is_known(revision):
        state = f"{migrate.unknown_to_this_package()}: a newer release's, or not an action-metrics revision"
    else:
        state = "head" if revision == head else f"behind head {head}" if revision else "no schema"
    if isinstance(unfinished, str):
        state += (
            f"; whether the build db upgrade runs after migrating is done could not be read: {unfinished}"
        )
    elif unfinished:
        where = display_url(backend.given_url)
        state += (
            f", but the build db upgrade runs after migrating is unfinished: {'; '.join(unfinished)} "
            "(every answer is still right, read from raw rows meanwhile); to finish it, run: "
            f"action-metrics db upgrade --url '{where}'"
        )
    click.echo(f"{revision or '-'} ({state})")


# --- report and demo ------------------------------------------------------------------------


def _checked(check: Callable[[object], str]) -> Callable[[click.Context, click.Parameter, Any], str | None]:
    """A click callback that applies one of the library's field checks to an optional value."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> str | None:
        if value is None:
            return None
        try:
            return check(value)
        except InvalidValue as error:
            raise click.BadParameter(error.problem, ctx, param) from None

    return callback


def _town_id(value: object) -> str:
    return check_id("town_id", value)


budget_option = click.option(
    "--lod3-p95-budget-ms",
    type=click.FloatRange(min=0, min_open=True),
    default=report.DEFAULT_LOD3_P95_BUDGET_MS,
    show_default=True,
    envvar="ACTION_METRICS_LOD3_P95_BUDGET_MS",
    help="SLO: the p95 latency LOD3 queries must stay within (env ACTION_METRICS_LOD3_P95_BUDGET_MS).",
)


PIPED_WIDTH: Final = 200
"""The width of tables written to a pipe or a file: Rich takes 80 columns when it finds no terminal
(and no `$COLUMNS`), which cut `prices list` and the breakdowns' tables to `effecti…`."""


def _stdout() -> Console:
    return _console(Console(highlight=False))


def _stderr() -> Console:
    return _console(Console(stderr=True, highlight=False))


def _console(console: Console) -> Console:
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = PIPED_WIDTH
    return console


def _exit_if_failed(checks: tuple[report.CheckResult, ...], offenders: tuple[Offender, ...] = ()) -> None:
    for offender in offenders:
        click.echo(f"check failed: {offender.describe()}", err=True)
    if report.any_failed(checks):
        failed = ", ".join(check.name for check in checks if check.failed)
        click.echo(f"checks failed: {failed}", err=True)
        raise click.exceptions.Exit(report.CHECKS_FAILED_EXIT_CODE)


def _zone(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """`--tz`: an IANA zone, checked whatever else is asked (a bad one is never silently unused)."""
    if value is None:
        return None
    try:
        reader_zone(value)
    except InvalidFilter as error:
        raise click.BadParameter(error.problem, ctx, param) from None
    return value


def _sort_key(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value not in SORT_KEYS:
        raise click.BadParameter(
            f"cannot sort by {value!r}: expected one of {', '.join(SORT_KEYS)}", ctx, param
        )
    return value


def _html_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """`--html`: a file in a directory that exists, checked before the page is computed."""
    if value is None:
        return None
    folder = Path(value).absolute().parent
    if not folder.is_dir():
        raise click.BadParameter(f"{value!r}: there is no directory {folder}", ctx, param)
    return value


_REPORT_OPTIONS: Final = {
    "town_id": "--town",
    "action_type": "--action",
    "model": "--model",
    "since": "--since",
    "until": "--until",
    "by": "--by",
    "bucket": "--bucket",
    "tz": "--tz",
    "sort": "--sort",
    "top": "--top",
}
"""The `report` option of each filter or breakdown argument, for the errors that name one."""


def _refuse_unused(ctx: click.Context, why: str, *names: str) -> None:
    """A usage error naming the options given (of `names`) that the command could only ignore."""
    given = [
        param.opts[0]
        for param in ctx.command.params
        if param.name in names and ctx.get_parameter_source(param.name) is not ParameterSource.DEFAULT
    ]
    if given:
        raise click.UsageError(f"{' and '.join(given)} {why}")


@main.command(name="report")
@url_option
@click.option("--town", "town_id", metavar="TOWN", callback=_checked(_town_id), help="Only this town.")
@click.option(
    "--action",
    "action_type",
    metavar="ACTION",
    callback=_checked(check_action_type),
    help="Only this action type.",
)
@click.option("--model", metavar="MODEL", callback=_checked(check_model), help="Only this model.")
@click.option(
    "--since",
    metavar="WHEN",
    callback=_since,
    help="Only actions since then: 30m, 24h, 7d, 2w, or an ISO date/time such as 2025-12-01.",
)
@click.option(
    "--until",
    metavar="WHEN",
    callback=_since,
    help="Only actions before then (default: up to now): 30m, 24h, 7d, 2w ago, or an ISO date/time.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON: the filters and Aggregate.to_dict() (with --by or --bucket, the rows).",
)
@click.option(
    "--check",
    is_flag=True,
    help="Also run the SLO and ethics checks (over --town and --since) and the limits given, in every "
    f"mode (a breakdown, --html); exit {report.CHECKS_FAILED_EXIT_CODE} when one fails.",
)
@budget_option
@click.option(
    "--by",
    "by",
    multiple=True,
    type=click.Choice(list(DIMENSION_OPTIONS)),
    help="Break down by this dimension (repeatable).",
)
@click.option("--bucket", type=click.Choice(list(BUCKETS)), help="Break down by time bucket, in --tz.")
@click.option(
    "--tz",
    metavar="ZONE",
    envvar=TZ_VARIABLE,
    callback=_zone,
    help="IANA time zone of the buckets and days (env ACTION_METRICS_TZ; default UTC).",
)
@click.option(
    "--sort",
    default="total_cost_usd",
    show_default=True,
    callback=_sort_key,
    help="Sort the breakdown by this figure (any numeric key of a row).",
)
@click.option("--ascending", is_flag=True, help="Sort the breakdown smallest first.")
@click.option("--top", type=click.IntRange(min=1), help="Keep the breakdown's first N rows.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the breakdown as CSV.")
@click.option(
    "--html",
    "html_path",
    metavar="FILE",
    type=click.Path(dir_okay=False, writable=True),
    callback=_html_file,
    help="Write the dashboard page of --town (else all towns) from --since (default 7d before --until) "
    "until --until (default now), in --tz, as one self-contained HTML file.",
)
@click.option(
    "--min-gross-margin",
    type=float,
    help="With --check: fail when the gross margin (per town with --by town) is below this.",
)
@click.option(
    "--max-cost-usd-per-day",
    type=click.FloatRange(min=0),
    help="With --check: fail when a day's cost (per town with --by town, days in --tz) is above this.",
)
@click.pass_context
@friendly_errors
def report_command(
    ctx: click.Context,
    url: str | None,
    town_id: str | None,
    action_type: str | None,
    model: str | None,
    since: datetime | None,
    until: datetime | None,
    as_json: bool,
    check: bool,
    lod3_p95_budget_ms: float,
    by: tuple[str, ...],
    bucket: str | None,
    tz: str | None,
    sort: str,
    ascending: bool,
    top: int | None,
    as_csv: bool,
    html_path: str | None,
    min_gross_margin: float | None,
    max_cost_usd_per_day: float | None,
) -> None:
    """Totals and a by-model breakdown of recorded actions (a table, or --json), or with --by and
    --bucket a breakdown (a table, --json or --csv), or with --html the dashboard page as a file.

    --check runs the checks whatever is printed, and the exit code is theirs: 3 when one fails."""
    if since is not None and until is not None and until <= since:
        raise click.BadParameter("must be after --since", param_hint="'--until'")
    if as_csv:
        _refuse_unused(ctx, "cannot be used with --csv", "as_json")
    if html_path is not None:
        _refuse_unused(
            ctx, "cannot be used with --html", "as_json", "as_csv", "by", "bucket", "action_type", "model"
        )
    if not check:
        _refuse_unused(
            ctx,
            "given without --check, whose limits they are: add --check",
            "min_gross_margin",
            "max_cost_usd_per_day",
        )
    _require_store_file(url)  # after the options: a bad one is a usage error whatever the URL
    selection = report.Selection(town_id, action_type, model, since, until)

    async def verdict(store: AsyncMetricsStore, checked: report.Selection) -> report.Verdict | None:
        if not check:
            return None
        return await report.run_report_checks(
            store,
            checked,
            per_town="town" in by,
            tz=tz,
            lod3_p95_budget_ms=lod3_p95_budget_ms,
            min_gross_margin=min_gross_margin,
            max_cost_usd_per_day=max_cost_usd_per_day,
        )

    try:
        if html_path is not None:
            checks = _write_html(url, html_path, selection, tz, lod3_p95_budget_ms, verdict)
        elif by or bucket or as_csv:
            form: Literal["csv", "json", "table"] = "csv" if as_csv else "json" if as_json else "table"
            asked = _Breakdown(by, bucket, tz, sort, not ascending, top)
            checks = _print_breakdown(url, selection, asked, form, verdict)
        else:
            checks = _print_report(url, selection, as_json, verdict)
    except InvalidFilter as error:
        if error.field not in _REPORT_OPTIONS:
            raise
        raise click.BadParameter(error.problem, param_hint=f"'{_REPORT_OPTIONS[error.field]}'") from None
    if checks is None:
        return
    if html_path is not None or by or bucket or as_csv:
        # Beside a page or a breakdown; stdout stays the rows when it is CSV or JSON.
        (_stderr() if as_csv or as_json else _stdout()).print(report.render_checks(checks.checks))
    _exit_if_failed(checks.checks, checks.offenders)


Verdicts = Callable[[AsyncMetricsStore, report.Selection], Awaitable[report.Verdict | None]]


@dataclass(frozen=True, slots=True)
class _Breakdown:
    """What `report` was asked to break down by, and how to order and cut the rows."""

    by: tuple[str, ...]
    bucket: str | None
    tz: str | None
    sort: str
    descending: bool
    top: int | None


def _print_breakdown(
    url: str | None,
    selection: report.Selection,
    asked: _Breakdown,
    form: Literal["csv", "json", "table"],
    verdict: Verdicts,
) -> report.Verdict | None:
    """CSV and JSON are written as the rows arrive; a table needs them all. The checks follow."""
    dimensions = tuple(DIMENSION_OPTIONS[word] for word in asked.by)

    async def read() -> tuple[list[BreakdownRow], report.Verdict | None]:
        async with AsyncMetricsStore(url) as store:
            rows = store.stream_breakdown(
                dimensions,
                bucket=asked.bucket,
                tz=asked.tz,
                sort=asked.sort,
                descending=asked.descending,
                top=asked.top,
                **selection.filters(),
            )
            kept: list[BreakdownRow] = []
            if form == "csv":
                await write_csv(rows, sys.stdout)
            elif form == "json":
                await write_json(rows, sys.stdout)
            else:
                kept = [row async for row in rows]
            return kept, await verdict(store, selection)

    rows, checks = run_async(read())
    if form == "table":
        names = ", ".join([*asked.by, *([asked.bucket] if asked.bucket else [])])
        _stdout().print(render_table(rows, f"Breakdown by {names}: {selection.describe()}"))
    return checks


def _print_report(
    url: str | None, selection: report.Selection, as_json: bool, verdict: Verdicts
) -> report.Verdict | None:
    """The selection's totals and models (a table, or JSON whose `passed` is the checks' verdict)."""

    async def gather() -> tuple[Aggregate, report.Verdict | None, list[ModelPrice]]:
        async with AsyncMetricsStore(url) as store:
            aggregate = await selection.aggregate(store)
            checks = await verdict(store, selection)
            prices = [] if as_json else await store.model_prices()
            return aggregate, checks, prices

    with _stderr().status("Reading the metrics..."):
        aggregate, checks, prices = run_async(gather())
    if as_json:
        ran = None if checks is None else checks.checks
        click.echo(json.dumps(report.report_json(selection, aggregate, ran), indent=2))
        return checks
    console = _stdout()
    console.print(report.render_aggregate(aggregate, f"Actions: {selection.describe()}"))
    if (hints := report.price_hints(aggregate, prices)) is not None:
        console.print(hints)
    if checks is not None:
        console.print()
        console.print(report.render_checks(checks.checks))
    return checks


def _write_html(
    url: str | None,
    path: str,
    selection: report.Selection,
    tz: str | None,
    lod3_p95_budget_ms: float,
    verdict: Verdicts,
) -> report.Verdict | None:
    """Write the page of the selection's town and window; the checks over that window."""
    now = datetime.now(UTC)
    until = selection.until
    end = now if until is None else until
    since_hours = (
        (end - selection.since).total_seconds() / 3600
        if selection.since is not None
        else page.DEFAULT_FILE_HOURS
    )
    shown = replace(selection, since=end - timedelta(hours=since_hours))

    async def read() -> tuple[dict[str, Any], report.Verdict | None]:
        async with AsyncMetricsStore(url) as store:
            view = await page.read_view(
                store,
                town_id=selection.town_id,
                since_hours=since_hours,
                until=until,
                tz=reader_zone(tz).key,
                lod3_p95_budget_ms=lod3_p95_budget_ms,
                now=now,
            )
            return view, await verdict(store, shown)

    with _stderr().status("Reading the metrics..."):
        view, checks = run_async(read())
    try:
        with open(path, "w", encoding="utf-8") as file:
            file.write(page.report_html(view))
    except OSError as error:
        raise click.ClickException(f"cannot write {path}: {error.strerror or error}") from None
    ending = "" if until is None else f" until {until.isoformat()}"
    town = selection.town_id or "all towns"
    click.echo(f"wrote {path}: the dashboard of {town} over {since_hours:g} hours{ending}", err=True)
    return checks


@main.command(name="demo")
@url_option
@click.option("--seed", type=int, default=42, show_default=True, help="The same seed replays the same town.")
@click.option(
    "--size",
    type=click.IntRange(min=1),
    default=2_000,
    show_default=True,
    help="Number of actions to record.",
)
@click.option(
    "--days",
    type=click.FloatRange(min=0, max=366, min_open=True),
    default=3.0,
    show_default=True,
    help="Spread the actions over this many days up to now.",
)
@click.option("--town", "town_id", default=town.DEMO_TOWN, show_default=True, help="The town's id.")
@budget_option
@friendly_errors
def demo_command(
    url: str | None, seed: int, size: int, days: float, town_id: str, lod3_p95_budget_ms: float
) -> None:
    """Simulate a town's activity into the store, then print its dashboard and checks."""
    plan = town.TownPlan(seed=seed, size=size, days=days, town_id=town_id)
    metrics = town.simulate(plan)
    err = _stderr()

    async def simulate_and_read() -> tuple[report.Dashboard, tuple[report.CheckResult, ...]]:
        async with AsyncMetricsStore(url) as store:
            with _progress(err) as progress:
                task = progress.add_task(f"Recording {town_id}", total=len(metrics))
                await town.record(store, metrics, lambda done: progress.advance(task, done))
            with err.status("Reading the dashboard..."):
                dashboard = await report.build_dashboard(store, town_id=town_id)
                checks = await report.run_checks(
                    store, town_id=town_id, since=plan.start, lod3_p95_budget_ms=lod3_p95_budget_ms
                )
            return dashboard, checks

    dashboard, checks = run_async(simulate_and_read())
    console = _stdout()
    console.print(
        f"Recorded {len(metrics):,} actions of {town_id} over {days:g} days (seed {seed}) "
        f"into {display_url(resolve_url(url))}"
    )
    console.print()
    console.print(report.render_dashboard(dashboard))
    console.print()
    console.print(report.render_checks(checks))
    _exit_if_failed(checks)


# --- prices ---------------------------------------------------------------------------------


@main.group()
def prices() -> None:
    """Model prices: load the catalogue (offline, with its history), list them, set one by hand."""


@prices.command(name="sync")
@url_option
@friendly_errors
def sync_prices(url: str | None) -> None:
    """Load the catalogue's prices, with their history, of every model the store has seen.

    The catalogue is genai-prices, whose data ships inside the package: no network is needed. A
    price set by hand wins: a model's catalogue prices stop at its first manual one.
    """
    _require_store_file(url)

    async def run() -> PriceSync:
        async with AsyncMetricsStore(url) as store:
            return await store.sync_prices()

    with _stderr().status("Loading the catalogue..."):
        result = run_async(run())
    _stdout().print(report.render_sync(result))


@prices.command(name="list")
@url_option
@friendly_errors
def list_prices(url: str | None) -> None:
    """Every model price stored: from when, USD per 1M tokens, and who set it."""
    _require_store_file(url)

    async def run() -> list[ModelPrice]:
        async with AsyncMetricsStore(url) as store:
            return await store.model_prices()

    _stdout().print(report.render_prices(run_async(run())))


_PRICE_OPTIONS = {
    "input_per_1m": "--input",
    "output_per_1m": "--output",
    "cache_read_per_1m": "--cache-read",
    "cache_write_per_1m": "--cache-write",
    "effective_from": "--from",
}


@prices.command(name="set")
@click.argument("model", callback=_checked(check_model))
@click.option("--input", "input_per_1m", metavar="USD", required=True, help="USD per 1M input tokens.")
@click.option("--output", "output_per_1m", metavar="USD", required=True, help="USD per 1M output tokens.")
@click.option(
    "--cache-read", metavar="USD", help="USD per 1M input tokens read from the cache (default: --input)."
)
@click.option(
    "--cache-write", metavar="USD", help="USD per 1M input tokens written to the cache (default: --input)."
)
@click.option(
    "--from",
    "effective_from",
    metavar="WHEN",
    callback=_since,
    help="In force from then (an ISO date/time, or 30d back); default now.",
)
@url_option
@friendly_errors
def set_price(
    model: str,
    input_per_1m: str,
    output_per_1m: str,
    cache_read: str | None,
    cache_write: str | None,
    effective_from: datetime | None,
    url: str | None,
) -> None:
    """Price MODEL by hand from --from until its next price; it wins over the catalogue."""
    _require_store_file(url)

    async def run() -> None:
        async with AsyncMetricsStore(url) as store:
            await store.set_model_price(
                model,
                input_per_1m,
                output_per_1m,
                effective_from,
                cache_read_per_1m=cache_read,
                cache_write_per_1m=cache_write,
            )

    try:
        run_async(run())
    except InvalidPrice as error:
        raise click.BadParameter(
            error.problem, param_hint=_PRICE_OPTIONS.get(error.field, error.field)
        ) from None
    start = "now" if effective_from is None else effective_from.isoformat()
    click.echo(
        f"{model}: {input_per_1m} / {output_per_1m} USD per 1M input / output tokens from {start} (manual)"
    )


# --- serve ----------------------------------------------------------------------------------


def _check_workers(url: str | None) -> None:
    """Several processes need one database they all reach: not ClickHouse (chdb opens its directory
    in one process; credit claims are kept in memory there), not an in-memory SQLite database."""
    if clickhouse.is_clickhouse_url(url):
        raise click.BadParameter("a ClickHouse store is served by one process", param_hint="--workers")
    backend = backend_for(resolve_url(url))
    if isinstance(backend, SQLiteBackend) and backend.in_memory:
        raise click.BadParameter(
            "an in-memory SQLite database lives in one process: give a file (or PostgreSQL)",
            param_hint="--workers",
        )


async def _preflight(url: str | None) -> None:
    """Fail now, in one line, rather than inside uvicorn's startup: the schema must be at head."""
    async with AsyncMetricsStore(url):
        pass


@main.command()
@url_option
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default)."
)
@click.option("--port", type=click.IntRange(0, 65_535), default=8000, show_default=True)
@click.option(
    "--insecure",
    is_flag=True,
    help="Serve every town to anyone, without a bearer token (local development only).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Server processes sharing the port, each with its own connections and group commit "
    "(SQLite files and PostgreSQL; a ClickHouse store is served by one).",
)
@budget_option
@friendly_errors
def serve(
    url: str | None, host: str, port: int, insecure: bool, workers: int, lod3_p95_budget_ms: float
) -> None:
    """Serve the metrics endpoint and the dashboard page over HTTP (needs a bearer token).

    GET / (the dashboard page), GET /v1/towns, GET /v1/town/{town_id}/metrics?action_type=&since_hours=
    (or since=&until=, ISO 8601 with an offset), .../breakdown, .../checks, POST /v1/actions and
    POST /v1/traces (writers) and GET /healthz.
    Clients (and the page) send Authorization: Bearer <token>. $ACTION_METRICS_API_TOKEN reads every
    town; $ACTION_METRICS_API_TOKENS lists tokens limited to towns: 'TOKEN:TOWN,TOWN;TOKEN:*', and
    writers marked 'write:TOKEN:TOWNS' (or 'read,write:TOKEN:TOWNS').
    """
    try:
        import uvicorn

        from action_metrics import http
    except ImportError as error:
        raise click.ClickException(
            f"serve needs the server extra ({error.name} is missing): pip install 'action-metrics[server]'"
        ) from None
    app = http.create_app(url, insecure=insecure, lod3_p95_budget_ms=lod3_p95_budget_ms)
    if workers > 1:
        _check_workers(url)
    run_async(_preflight(url))
    if insecure:
        click.echo(f"warning: --insecure: anyone who can reach {host}:{port} reads every town", err=True)
    # What startup made (modules, the app) lives as long as the process: frozen out of the garbage
    # collector's reach, its collections no longer walk it on every request (~10% of a span's CPU).
    gc.freeze()
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level="info")
        return
    os.environ[http.SERVE_SETTINGS_VARIABLE] = http.serve_settings(
        url, insecure=insecure, lod3_p95_budget_ms=lod3_p95_budget_ms
    )
    factory = f"{http.__name__}:{http.app_from_environment.__name__}"
    uvicorn.run(factory, factory=True, workers=workers, host=host, port=port, log_level="info")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
