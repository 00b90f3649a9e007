"""The repository: owns the engine's connections and transactions, so callers never touch one.

Every write keeps the rollups equal to the raw rows in the same transaction (see `rollup`): a batch
of metrics adds its late metrics to the closed buckets and closes the buckets it moved past; a price
that begins inside a closed bucket rebuilds that bucket. Every read takes one snapshot, so the
rollup state it plans with and the rows it reads agree.

It is also the one place where the database's exceptions become action-metrics' own (`DatabaseError`s,
see `errors`): everything above it catches those alone.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import delete, func, select, tuple_, union
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from action_metrics import closed_buckets, migrate, rollup, sketch_reads, user_reads
from action_metrics.aggregate import (
    Aggregate,
    AggregateStatements,
    aggregate_from_rows,
    histograms_read,
    models_searched,
)
from action_metrics.breakdown import (
    BreakdownRequest,
    BreakdownRow,
    breakdown_statement,
    bucket_starts,
    combined_plan,
    group_key,
    percentiles_statement,
    ranks_by_sums,
    row_from,
)
from action_metrics.charges import ChargeAudit, CreditClaim, InheritedCredits, audit_statement
from action_metrics.dialects import LOCK_WAIT, WRITE, Backend, display_url
from action_metrics.errors import (
    ActionMetricsError,
    DatabaseError,
    DatabaseUnavailable,
    DataRejected,
    InvalidFilter,
    InvalidPrice,
    RawRowsPruned,
    StatementRefused,
    translated,
)
from action_metrics.model import ActionMetric, refuse_before
from action_metrics.pricing import CreditPrice, ModelPrice
from action_metrics.query import (
    FILTER_NAMES,
    CopyPosition,
    MetricFilter,
    after_statement,
    after_terms,
    metric_from_row,
    metric_rows,
    metrics_statement,
)
from action_metrics.rollup import BuildProgress, Grain, ReadPlan, RollupState
from action_metrics.schema import (
    action_metrics,
    credit_claims,
    credit_prices,
    latency_histogram,
    latency_sketch,
    model_prices,
    rollup_user,
)
from action_metrics.schema import rollup as rollup_table

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


PRUNE_BATCH = 50_000
"""Raw rows deleted per transaction by `prune`: short transactions, so writers are never held up long."""


_MODEL_PRICE_FIELDS = (
    "input_per_1m",
    "output_per_1m",
    "cache_read_per_1m",
    "cache_write_per_1m",
    "source",
    "tiered_above_tokens",
)


@dataclass(frozen=True)
class CatalogueWrite:
    """What `replace_catalogue_prices` stored: each model's catalogue prices now in force, and the
    models whose later catalogue prices a manual price held back (with that price's start)."""

    written: dict[str, tuple[ModelPrice, ...]]
    held_back: dict[str, datetime]


@dataclass(frozen=True)
class PruneResult:
    """What `prune` removed (or, on a dry run, would remove): raw rows from before `cutoff`."""

    cutoff: datetime
    rows: int
    dry_run: bool


def _one_line(error: BaseException) -> str:
    """The driver's error in one line, without SQLAlchemy's statement and parameters."""
    reason = getattr(error, "orig", None) or error
    first_line = next(iter(str(reason).strip().splitlines()), "")
    if not first_line and isinstance(reason, TimeoutError):  # asyncio's, of a connect_timeout: no text
        first_line = "no answer within the connection's time limit (connect_timeout)"
    return f"{type(reason).__name__}: {first_line}"


def _rejects_data(error: DBAPIError) -> bool:
    """SQLSTATE classes 22 and 23 (DataError, IntegrityError in DB-API terms; also when a driver's
    bulk path surfaced them as a plain DBAPIError)."""
    if isinstance(error, IntegrityError | DataError):
        return True
    sqlstate = getattr(error.orig, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in ("22", "23")


_NO_SUCH_DATABASE: Final = "3D000"
"""PostgreSQL's SQLSTATE invalid_catalog_name: the URL names a database the server does not have."""


def translate(error: BaseException, where: str) -> DatabaseError | None:
    """Our exception for a failure of the database at `where`; None for anything else (a bug)."""
    if isinstance(error, ActionMetricsError):
        return None  # already ours (a schema check, a closed store)
    reason = _one_line(error)
    if isinstance(error, DBAPIError):
        if not error.connection_invalidated and _rejects_data(error):
            return DataRejected(f"{where} rejected the data: {reason}", reason)
        if error.connection_invalidated or isinstance(error, OperationalError | InterfaceError):
            return DatabaseUnavailable(f"cannot use {where}: {reason}", reason)
        sqlstate = getattr(error.orig, "sqlstate", None)
        if sqlstate == _NO_SUCH_DATABASE:
            return StatementRefused(
                f"{where} refused the connection: {reason}; create the database (createdb), then its "
                "schema (action-metrics db upgrade)",
                reason,
            )
        if sqlstate == "2BP01":  # dependent_objects_still_exist: a migration's DROP under the user's objects
            # asyncpg's DETAIL (on SQLAlchemy's adapter, else the driver's exception under it) has a line
            # "view my_town_panel depends on view action_metrics_daily_by_town" per object in the way.
            driver_error = getattr(error.orig, "__cause__", None)
            detail = getattr(error.orig, "detail", None) or getattr(driver_error, "detail", None)
            lines = [line.strip() for line in str(detail or "").splitlines() if line.strip()]
            named = [line.split(" depends on ")[0] for line in lines if " depends on " in line]
            dependents = " and ".join(dict.fromkeys(named)) or "them"
            return StatementRefused(
                f"{where} refused the statement: {reason} ({'; '.join(lines) or 'see the server log'}); "
                "objects of yours depend on what the migration drops (it re-creates the views it "
                f"redefines): drop {dependents}, run the migration, then re-create "
                f"{'it' if len(set(named)) == 1 else 'them'}",
                reason,
            )
        return StatementRefused(
            f"{where} refused the statement: {reason}; is its schema at head (action-metrics db upgrade) "
            "and may this role use it?",
            reason,
        )
    if isinstance(error, OSError | PoolTimeout):  # refused, unresolvable, timed out, unopenable
        return DatabaseUnavailable(f"cannot use {where}: {reason}", reason)
    return None


@dataclass(frozen=True)
class _Sketched:
    """A breakdown read from the sketch levels: the rows computed, and the closed buckets' stored
    rows with the generation its snapshot saw (`closed_buckets`; `buckets` None: none are stored)."""

    rows: list[BreakdownRow]
    buckets: closed_buckets.Buckets | None
    stored: dict[int, list[BreakdownRow]]
    seen: int


def _refusing_cutoff(state: RollupState, split: Sequence[tuple[Grain, datetime]]) -> datetime | None:
    """The prune cut-off that refuses a new price splitting the buckets `split`, or None: a month is
    summed again from its days, which the rollups keep; an hour or a day needs its raw rows."""
    cutoff = state.raw_kept_from
    if cutoff is not None and any(bucket < cutoff for grain, bucket in split if grain != "month"):
        return cutoff
    return None


class MetricsRepository:
    """Reads and writes action metrics and prices on one database."""

    def __init__(self, engine: AsyncEngine, backend: Backend) -> None:
        self.engine = engine
        self.backend = backend
        self._insert_metrics = backend.insert(action_metrics).on_conflict_do_nothing(index_elements=["id"])
        self._where = display_url(backend.given_url)
        self._aggregate_statements = AggregateStatements(backend)

    def _database_errors(self) -> AbstractContextManager[None]:
        """Re-raise a database failure inside the block as the `DatabaseError` `translate` makes."""
        return translated(translate, self._where)

    @asynccontextmanager
    async def _write_transaction(self, lock_wait_ms: int | None = None) -> AsyncIterator[AsyncConnection]:
        """A write transaction; with `lock_wait_ms`, one that fails rather than wait longer for a lock."""
        with self._database_errors():
            async with self.engine.connect() as connection:
                options = {WRITE: True} if lock_wait_ms is None else {WRITE: True, LOCK_WAIT: lock_wait_ms}
                connection = await connection.execution_options(**options)
                async with connection.begin():
                    if lock_wait_ms is not None:
                        await self.backend.bound_lock_wait(connection, lock_wait_ms)
                    yield connection

    async def _locked_state(self, connection: AsyncConnection) -> RollupState:
        """In a write transaction: the rollup state, locked (writers take their turn on it), once the
        schema is known to be still at this package's head. A process already running when the
        schema is upgraded (or downgraded) would otherwise keep writing the rollups as its own
        release keeps them, which the new schema's readers do not expect: it refuses instead
        (`SchemaTooNew`, `SchemaOutOfDate`; its writer keeps the metrics and retries, as for an
        outage). Migrations that move rollup rows lock the state row first, so a write under way
        commits before they read, and the next one sees their revision."""
        state = await rollup.read_state(connection, for_update=True)
        await migrate.check_still_at_head(connection, self.backend)
        return state

    @asynccontextmanager
    async def _read_connection(self) -> AsyncIterator[AsyncConnection]:
        with self._database_errors():
            async with self.engine.connect() as connection:
                yield connection

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[AsyncConnection]:
        """A read transaction whose statements all see one snapshot."""
        with self._database_errors():
            async with self.engine.connect() as connection:
                connection = await connection.execution_options(**self.backend.snapshot_options)
                async with connection.begin():
                    yield connection

    async def ensure_schema(self) -> None:
        """Migrate a brand-new SQLite file; otherwise insist that the schema is at head (see `migrate`)."""
        with self._database_errors():
            await migrate.ensure_schema(self.engine, self.backend)

    async def run_migrations(self, action: Callable[[Config], None]) -> None:
        """An alembic command (`migrate.upgrade_to`, `migrate.downgrade_to`) on this database."""
        with self._database_errors():
            await migrate.run_migrations(self.engine, action)

    async def schema_revision(self) -> str | None:
        async with self._read_connection() as connection:
            return await migrate.revision_of(connection)

    async def insert(self, metrics: Sequence[ActionMetric]) -> None:
        """Store a batch atomically, with the rollups; ids already stored are skipped, so a re-sent
        batch is harmless. A batch holding a metric from before the prune cut-off stores nothing
        (`MetricInPrunedPeriod`).

        Batches big enough go through the driver's bulk path (COPY, executemany), which stores the
        same values as the plain INSERT at the driver's speed.
        """
        await self._insert([metrics], count_new=False)

    async def insert_counting(
        self, metrics: Sequence[ActionMetric], credits: InheritedCredits | None = None
    ) -> int:
        """`insert`, and how many of the batch's ids were new: a writer over the wire is told what
        was stored and what was a duplicate. The count is the insert's own (rows the database took,
        conflicts skipped), in the batch's transaction, so concurrent writers cannot blur it.
        `credits`: what the batch's calls may inherit (see `AsyncMetricsStore.emit_batch`)."""
        return (await self.insert_counting_groups([metrics], [credits]))[0]

    async def insert_counting_groups(
        self,
        groups: Sequence[Sequence[ActionMetric]],
        credits: Sequence[InheritedCredits | None] | None = None,
    ) -> list[int]:
        """Several batches in one transaction (one commit, one rollup upkeep), counted per batch as
        `insert_counting` counts one: an id in two batches is new, if at all, in the first."""
        return await self._insert(groups, count_new=True, credits=credits)

    async def _insert(
        self,
        groups: Sequence[Sequence[ActionMetric]],
        *,
        count_new: bool,
        credits: Sequence[InheritedCredits | None] | None = None,
    ) -> list[int]:
        """Refuses the whole call (`MetricInPrunedPeriod`, indexes counted through the groups as
        given) if a metric is from before the prune cut-off: its id was pruned with its row, so it
        cannot be told from a new action. The cut-off is read under the write lock, which `prune`
        takes to move it: no metric before it is stored after it is recorded. Credits the groups'
        calls may inherit are claimed and settled under that lock too, before anything is written."""
        given = groups
        groups = _without_earlier_ids(groups) if len(groups) > 1 else groups
        metrics = [metric for group in groups for metric in group]
        if not metrics:
            return [0] * len(groups)
        async with self._write_transaction() as connection:
            state = await self._locked_state(connection)
            if state.raw_kept_from is not None:
                refuse_before(state.raw_kept_from, [metric for group in given for metric in group])
            if credits is not None and any(credits):
                groups = await self._settled(connection, groups, credits)
                metrics = [metric for group in groups for metric in group]
            late = await self._new_late_metrics(connection, state, metrics)
            new = [0] * len(groups)
            if len(groups) > 1 or len(metrics) >= self.backend.bulk_insert_minimum:
                new = await self.backend.bulk_insert_groups(connection, groups)
            else:
                if count_new:  # an executemany's row count is not reliable on every driver
                    new = [len({metric.id for metric in metrics})]
                    new[0] -= len(await rollup.stored_ids(connection, [metric.id for metric in metrics]))
                await connection.execute(self._insert_metrics, metric_rows(metrics))
            if late:
                earliest = min(late.values())
                await rollup.add_late(connection, self.backend, state, list(late), earliest)
                await closed_buckets.forget(connection, ending_after=earliest)
            newest = min(max(metric.timestamp for metric in metrics), datetime.now(UTC))
            if newest - datetime.min.replace(tzinfo=UTC) > rollup.CLOSE_DELAY:
                oldest = min(metric.timestamp for metric in metrics)
                reach = newest - rollup.CLOSE_DELAY
                closed = await rollup.close(
                    connection, self.backend, state, reach, batch_since=oldest, batch_size=len(metrics)
                )
                await rollup.write_state(connection, state, closed)
        return new

    async def _settled(
        self,
        connection: AsyncConnection,
        groups: Sequence[Sequence[ActionMetric]],
        credits: Sequence[InheritedCredits | None],
    ) -> list[Sequence[ActionMetric]]:
        """`groups`, each call that holds its ancestor's claim charged the ancestor's credits: every
        group claims its ancestors for its first call under each (the earlier group first), and the
        first claim ever committed of an ancestor holds (`_claim`)."""
        claims = [
            claim for group, each in zip(groups, credits, strict=True) if each for claim in each.claims(group)
        ]
        holders = await self._claim(connection, claims)
        return [
            each.settled(group, holders) if each else group
            for group, each in zip(groups, credits, strict=True)
        ]

    async def _claim(
        self, connection: AsyncConnection, claims: Sequence[CreditClaim]
    ) -> dict[tuple[int, int], uuid.UUID]:
        """The ancestors (trace and span id) of `claims` claimed now, each with its claiming metric id;
        of two claims of one ancestor in `claims`, the first. An ancestor claimed before is left out:
        its claim was committed with the call holding it, so that call is stored already (any copy
        of it here is a duplicate) and no call here is charged. A concurrent writer's claim of the
        same ancestor waits for this transaction's end, then finds it."""
        if not claims:
            return {}
        by_ancestor = {claim.ancestor: claim for claim in reversed(claims)}  # the first of each
        c = credit_claims.c
        insert = (
            self.backend.insert(credit_claims)
            .on_conflict_do_nothing(index_elements=["trace_id", "span_id"])
            .returning(c.trace_id, c.span_id)
        )
        made = await connection.execute(insert, [claim.row() for claim in by_ancestor.values()])
        claimed = [by_ancestor[trace_id, span_id] for trace_id, span_id in made]
        return {claim.identity: claim.metric_id for claim in claimed}

    async def _new_late_metrics(
        self, connection: AsyncConnection, state: RollupState, metrics: Sequence[ActionMetric]
    ) -> dict[Any, datetime]:
        """The metrics of the batch for closed buckets that are not stored yet: id -> timestamp."""
        closed = state.hours_closed_until
        if closed is None:
            return {}
        late: dict[Any, datetime] = {}
        for metric in metrics:
            if metric.timestamp < closed:
                late.setdefault(metric.id, metric.timestamp)
        for stored in await rollup.stored_ids(connection, list(late)) if late else ():
            del late[stored]
        return late

    async def select(self, metric_filter: MetricFilter) -> list[ActionMetric]:
        async with self._snapshot() as connection:
            state = await rollup.read_state(connection)
            result = await connection.execute(metrics_statement(metric_filter))
            metrics = [metric_from_row(row) for row in result]
        cutoff = state.raw_kept_from
        if cutoff is not None and _reaches_before(metric_filter, cutoff):
            complete = metric_filter.limit is not None and len(metrics) == metric_filter.limit
            if not complete or metrics[-1].timestamp < cutoff:
                raise RawRowsPruned(cutoff, "query()")
        return metrics

    async def aggregate(self, metric_filter: MetricFilter, *, exact: bool = False) -> Aggregate:
        async with self._snapshot() as connection:
            state = await rollup.read_state(connection)
            plan = _plan(metric_filter, state, exact=exact)
            if rollup.reads_pruned_rows(plan, state):
                await self._check_newest_unpruned(connection, metric_filter, state, exact=exact)
            if plan.uses_rollups and await connection.scalar(histograms_read(metric_filter, plan)):
                plan = replace(plan, binned_raw=True)
            starts = await _price_starts(connection)
            models = await models_searched(connection, metric_filter, plan, self.backend)
            statement, parameters = self._aggregate_statements.statement(metric_filter, plan, starts, models)
            result = await connection.execute(statement, parameters)
            return aggregate_from_rows(result.mappings().all())

    async def breakdown(self, metric_filter: MetricFilter, request: BreakdownRequest) -> list[BreakdownRow]:
        return [row async for row in self.stream_breakdown(metric_filter, request)]

    async def stream_breakdown(
        self, metric_filter: MetricFilter, request: BreakdownRequest
    ) -> AsyncIterator[BreakdownRow]:
        """Users from their rollups (`user_reads`); a town's, every town's or a model's buckets from
        the sketch levels (`sketch_reads`), closed buckets stored once computed (`closed_buckets`);
        anything else planned as `aggregate()` plans a window (`_planned`)."""
        async with self._snapshot() as connection:
            state = await rollup.read_state(connection)
            if user_reads.answers(metric_filter, request):
                since, until = await _window(connection, metric_filter, state)
                if since >= until:
                    return
                if metric_filter.since is None:  # nothing is stored before: whole months from the first
                    since = rollup.floor_to(since, "month")
                pieces = user_reads.cover(since, until, state)
                if not sketch_reads.pruned_pieces(pieces, state, user_reads.SHAPE):  # else raised below
                    price_starts = await _price_starts(connection)
                    rows = await sketch_reads.breakdown_rows(
                        connection,
                        metric_filter,
                        request,
                        user_reads.SHAPE,
                        pieces,
                        state,
                        [since, until],
                        self.backend,
                        price_starts,
                    )
                    for row in rows:
                        yield row
                    return
            starts: list[datetime] | None = None
            windows: list[tuple[datetime, datetime]] | None = None
            sketched: _Sketched | None = None
            if request.bucket is not None:
                since, until = await _window(connection, metric_filter, state)
                if since >= until:
                    return
                if metric_filter.since is None or since > metric_filter.since:
                    # Nothing is stored before `since`: start at its UTC day (not before the filter's
                    # own since), so that the first bucket is read from whole rollup days as the
                    # others are, which is all a pruned period still has (it was read from the raw
                    # rows of its first action's partial day, and refused once they were pruned).
                    since = max(rollup.floor_to(since, "day"), metric_filter.since or _FIRST_MOMENT)
                local = bucket_starts(request.bucket, request.zone, since, until)
                starts = [start.astimezone(UTC) for start in local]
                windows = [(max(a, since), min(b, until)) for a, b in pairwise(starts)]
                shape = sketch_reads.shape_of(metric_filter, request, state)
                if shape is not None and sketch_reads.readable(shape, state, since, starts):
                    sketched = await self._sketched(
                        connection, metric_filter, request, state, shape, starts, windows
                    )
            if sketched is None:
                async for row in self._planned(connection, metric_filter, request, state, starts, windows):
                    yield row
                return
        if sketched.buckets is None:
            rows = sketched.rows
        else:
            rows = await self._with_closed_buckets(sketched, sketched.buckets, request)
        for row in rows:
            yield row

    async def _sketched(
        self,
        connection: AsyncConnection,
        metric_filter: MetricFilter,
        request: BreakdownRequest,
        state: RollupState,
        shape: sketch_reads.Shape,
        starts: list[datetime],
        windows: list[tuple[datetime, datetime]],
    ) -> _Sketched:
        """The buckets' rows from the sketch levels: those of closed buckets stored before, read back,
        and the others computed by their pieces."""
        pieces = sketch_reads.cover(shape, windows, state)
        if sketch_reads.pruned_pieces(pieces, state, shape):
            assert state.raw_kept_from is not None
            raise RawRowsPruned(state.raw_kept_from, "breakdown()")
        buckets = closed_buckets.Buckets.of(metric_filter, request, starts, windows, state)
        stored: dict[int, list[BreakdownRow]] = {}
        seen = 0
        if buckets is not None:
            seen = await closed_buckets.generation(connection)
            stored = await closed_buckets.read(connection, buckets, request)
            pieces = [piece for piece in pieces if piece.bucket not in stored]
        rows: list[BreakdownRow] = []
        if pieces:
            price_starts = await _price_starts(connection)
            # Every row of the buckets computed: a `top` is cut from all of them, stored ones too.
            whole = request if buckets is None else replace(request, top=None)
            rows = await sketch_reads.breakdown_rows(
                connection, metric_filter, whole, shape, pieces, state, starts, self.backend, price_starts
            )
        return _Sketched(rows, buckets, stored, seen)

    async def _with_closed_buckets(
        self, sketched: _Sketched, buckets: closed_buckets.Buckets, request: BreakdownRequest
    ) -> list[BreakdownRow]:
        """Every row, in the breakdown's order, after storing the closed buckets just computed."""
        computed = closed_buckets.by_bucket(sketched.rows, buckets)
        new = {index: rows for index, rows in computed.items() if index not in sketched.stored}
        if new:
            try:
                async with self._write_transaction(lock_wait_ms=closed_buckets.LOCK_WAIT_MS) as connection:
                    await closed_buckets.store(connection, self.backend, buckets, new, sketched.seen)
            except (StatementRefused, DatabaseUnavailable) as error:  # may only read, or a writer is busy
                closed_buckets.refused(error)
        every = [row for rows in sketched.stored.values() for row in rows] + sketched.rows
        return closed_buckets.ordered(every, request)

    async def _planned(
        self,
        connection: AsyncConnection,
        metric_filter: MetricFilter,
        request: BreakdownRequest,
        state: RollupState,
        starts: list[datetime] | None,
        windows: list[tuple[datetime, datetime]] | None,
    ) -> AsyncIterator[BreakdownRow]:
        """The rows as `aggregate()` plans a window, each bucket its own plan, all read as one
        statement whose rows come through a server-side cursor as they are read."""
        exact, grouped = request.exact, request.grouped
        plans: list[ReadPlan] | None = None
        if windows is None:
            plan = _plan(metric_filter, state, exact=exact, grouped=grouped)
        else:
            plans = [_plan(metric_filter, state, exact=exact, grouped=grouped, window=w) for w in windows]
            plan = combined_plan(plans)
        if rollup.reads_pruned_rows(plan, state):
            assert state.raw_kept_from is not None
            raise RawRowsPruned(state.raw_kept_from, "breakdown()")
        price_starts = await _price_starts(connection)
        if not ranks_by_sums(request):
            statement = breakdown_statement(metric_filter, request, plan, starts, self.backend, price_starts)
            result = await connection.stream(statement)
            async for mapping in result.mappings():
                yield row_from(mapping, request, starts)
            return
        # The top groups by a sum first, then the percentiles of those groups alone, reading
        # only their buckets' ranges.
        statement = breakdown_statement(
            metric_filter, request, plan, starts, self.backend, price_starts, percentiles=False
        )
        kept = (await connection.execute(statement)).mappings().all()
        if not kept:
            return
        only = {name: sorted({row[name] for row in kept}, key=str) for name in request.by}
        if plans is not None:
            plan = combined_plan([plans[index] for index in sorted({row["bucket"] for row in kept})])
        statement = percentiles_statement(metric_filter, request, plan, starts, self.backend, only)
        found = {group_key(row, request): row for row in (await connection.execute(statement)).mappings()}
        for row in kept:
            percentiles = found.get(group_key(row, request))
            yield row_from({**row, **(percentiles or {})}, request, starts)

    async def _check_newest_unpruned(
        self, connection: AsyncConnection, metric_filter: MetricFilter, state: RollupState, *, exact: bool
    ) -> None:
        """Raise unless the selection is the newest `limit` metrics and all of them are kept."""
        assert state.raw_kept_from is not None
        cutoff = state.raw_kept_from
        question = _pruned_question(metric_filter, exact=exact)
        if metric_filter.limit is None:
            raise RawRowsPruned(cutoff, question)
        newest = metrics_statement(metric_filter).with_only_columns(action_metrics.c.timestamp).subquery()
        count, oldest = (await connection.execute(select(func.count(), func.min(newest.c.timestamp)))).one()
        if count < metric_filter.limit or oldest < cutoff:
            raise RawRowsPruned(cutoff, question)

    async def audit_charges(self, metric_filter: MetricFilter, credits: int) -> ChargeAudit:
        async with self._read_connection() as connection:
            result = await connection.execute(audit_statement(metric_filter, credits))
            return ChargeAudit(**result.mappings().one())

    def _model_price_upsert(self, price: ModelPrice) -> Any:
        statement = self.backend.insert(model_prices).values(
            model=price.model,
            effective_from=price.effective_from,
            **{name: getattr(price, name) for name in _MODEL_PRICE_FIELDS},
        )
        return statement.on_conflict_do_update(
            index_elements=["model", "effective_from"],
            set_={name: statement.excluded[name] for name in _MODEL_PRICE_FIELDS},
        )

    async def set_model_price(self, price: ModelPrice) -> None:
        """Insert, or replace the price of the same model from the same instant. A new price that
        begins inside a closed bucket splits it: the bucket's rows are summed again from raw rows.
        A manual price also removes the catalogue's prices of the model from its start on: it wins."""
        existing = select(model_prices.c.id).where(
            model_prices.c.model == price.model, model_prices.c.effective_from == price.effective_from
        )
        async with self._write_transaction() as connection:
            state = await self._locked_state(connection)
            before = await closed_buckets.prices(connection)
            if price.source == "manual":
                # Removing a price start needs no rebuild: rollup rows are split at it, and each
                # part is priced by whatever price is in force at its start.
                await connection.execute(
                    delete(model_prices).where(
                        model_prices.c.model == price.model,
                        model_prices.c.source == "catalogue",
                        model_prices.c.effective_from >= price.effective_from,
                    )
                )
            await self._apply_price(
                connection,
                state,
                self._model_price_upsert(price),
                existing,
                price.effective_from,
                price.model,
            )
            await closed_buckets.forget_if_repriced(connection, before)
            await self.backend.refresh_statistics(connection, model_prices, credit_prices)

    async def set_credit_price(self, price: CreditPrice) -> None:
        statement = self.backend.insert(credit_prices).values(
            effective_from=price.effective_from, usd_per_credit=price.usd_per_credit
        )
        statement = statement.on_conflict_do_update(
            index_elements=["effective_from"],
            set_={"usd_per_credit": statement.excluded.usd_per_credit},
        )
        existing = select(credit_prices.c.id).where(credit_prices.c.effective_from == price.effective_from)
        async with self._write_transaction() as connection:
            state = await self._locked_state(connection)
            before = await closed_buckets.prices(connection)
            await self._apply_price(connection, state, statement, existing, price.effective_from, None)
            await closed_buckets.forget_if_repriced(connection, before)
            await self.backend.refresh_statistics(connection, model_prices, credit_prices)

    async def _apply_price(
        self,
        connection: AsyncConnection,
        state: RollupState,
        upsert: Any,
        existing: Any,
        start: datetime,
        model: str | None,
    ) -> None:
        is_new = (await connection.execute(existing)).first() is None
        split = rollup.closed_buckets_split_by(state, start) if is_new else []
        cutoff = _refusing_cutoff(state, split)
        if cutoff is not None:
            raise InvalidPrice.inside_pruned_day(start, cutoff)
        await connection.execute(upsert)
        if split:
            await rollup.rebuild(connection, self.backend, state, split, model)
        if is_new:
            await rollup.split_open_user_day(connection, self.backend, state, start, model)

    async def price_start_refused(self, start: datetime, model: str | None) -> datetime | None:
        """The prune cut-off for which `set_model_price` (`model`) or `set_credit_price` (None)
        would refuse a price from `start` now (`InvalidPrice.inside_pruned_day`), else None."""
        table = credit_prices if model is None else model_prices
        existing = select(table.c.id).where(table.c.effective_from == start)
        if model is not None:
            existing = existing.where(model_prices.c.model == model)
        async with self._snapshot() as connection:
            state = await rollup.read_state(connection)
            if state.raw_kept_from is None or (await connection.execute(existing)).first() is not None:
                return None
            return _refusing_cutoff(state, rollup.closed_buckets_split_by(state, start))

    async def seen_models(self) -> list[str]:
        """Every model an action was recorded for. Closed buckets' models are in the rollups (also
        once their raw rows are pruned), so only the raw rows of open hours are read: the cost does
        not grow with the actions stored."""
        async with self._snapshot() as connection:
            state = await rollup.read_state(connection)
            open_rows = select(action_metrics.c.model)
            if state.hours_closed_until is not None:
                open_rows = open_rows.where(action_metrics.c.timestamp >= state.hours_closed_until)
            seen = union(select(rollup_table.c.model), open_rows)
            return sorted((await connection.execute(seen)).scalars())

    async def model_prices(self) -> list[ModelPrice]:
        """Every model price stored, by model and start."""
        statement = select(model_prices).order_by(model_prices.c.model, model_prices.c.effective_from)
        async with self._read_connection() as connection:
            rows = (await connection.execute(statement)).mappings().all()
        return [
            ModelPrice(
                model=row["model"],
                effective_from=row["effective_from"],
                **{name: row[name] for name in _MODEL_PRICE_FIELDS},
            )
            for row in rows
        ]

    async def replace_catalogue_prices(self, histories: Mapping[str, Sequence[ModelPrice]]) -> CatalogueWrite:
        """Make each model's catalogue prices its `histories` entry, in one transaction, but never at
        or after the model's first manual price: those rows are held back (and removed if stored)."""
        models = sorted(histories)
        first_manual_price = (
            select(model_prices.c.model, func.min(model_prices.c.effective_from))
            .where(model_prices.c.model.in_(models), model_prices.c.source == "manual")
            .group_by(model_prices.c.model)
        )
        written: dict[str, tuple[ModelPrice, ...]] = {}
        held_back: dict[str, datetime] = {}
        async with self._write_transaction() as connection:
            state = await self._locked_state(connection)
            before = await closed_buckets.prices(connection)
            manual_from = {model: start for model, start in await connection.execute(first_manual_price)}
            for model in models:
                manual = manual_from.get(model)
                kept = tuple(p for p in histories[model] if manual is None or p.effective_from < manual)
                if manual is not None and len(kept) < len(histories[model]):
                    held_back[model] = manual
                await connection.execute(
                    delete(model_prices).where(
                        model_prices.c.model == model,
                        model_prices.c.source == "catalogue",
                        model_prices.c.effective_from.not_in([price.effective_from for price in kept]),
                    )
                )
                for price in kept:
                    existing = select(model_prices.c.id).where(
                        model_prices.c.model == model, model_prices.c.effective_from == price.effective_from
                    )
                    upsert = self._model_price_upsert(price)
                    await self._apply_price(connection, state, upsert, existing, price.effective_from, model)
                written[model] = kept
            await closed_buckets.forget_if_repriced(connection, before)
            await self.backend.refresh_statistics(connection, model_prices, credit_prices)
        return CatalogueWrite(written=written, held_back=held_back)

    async def build_rollups(self, progress: Callable[[BuildProgress], None] | None = None) -> RollupState:
        """Close every bucket that can be closed now, a day per transaction (resumable)."""
        state = await rollup.build(
            self._write_transaction, self.backend, progress=progress, lock=self._locked_state
        )
        async with self._write_transaction() as connection:  # the planner sees the new rollups at once
            await self.backend.refresh_statistics(
                connection, rollup_table, rollup_user, latency_histogram, latency_sketch, action_metrics
            )
        return state

    async def unfinished_build(self) -> list[str]:
        """What `build_rollups` has yet to write of the rows stored (`rollup.unfinished`): an
        interrupted `db upgrade` leaves the schema at head and this not empty."""
        async with self._snapshot() as connection:
            return await rollup.unfinished(connection)

    async def prune(
        self,
        before: datetime,
        *,
        dry_run: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> PruneResult:
        """Delete raw rows older than the UTC midnight at or before `before`, keeping the rollups.

        The buckets before the cut-off are closed first; the cut-off is recorded before any row
        goes, so a reader never mistakes a half-pruned period for a whole one. Rows go in batches of
        `PRUNE_BATCH`, each its own transaction; then the credit claims of calls before the cut-off.
        `progress` gets 0 once the cut-off is accepted, then the rows removed so far.
        """
        cutoff = rollup.floor_to(before, "day")
        # The days the rollups can close now: a dry run refuses what the prune would (it closes none).
        _refuse_an_open_cutoff(cutoff, rollup.floor_to(datetime.now(UTC) - rollup.CLOSE_DELAY, "day"))
        older = action_metrics.c.timestamp < cutoff
        if dry_run:
            async with self._snapshot() as connection:
                rows = (await connection.execute(select(func.count()).where(older))).scalar_one()
            return PruneResult(cutoff, rows, dry_run=True)
        if progress is not None:
            progress(0)
        state = await self.build_rollups()
        _refuse_an_open_cutoff(cutoff, state.days_closed_until)
        async with self._write_transaction() as connection:
            state = await self._locked_state(connection)
            if state.raw_kept_from is None or state.raw_kept_from < cutoff:
                await rollup.write_state(connection, state, replace(state, raw_kept_from=cutoff))
                await closed_buckets.forget(connection, starting_before=cutoff)
        batch = select(action_metrics.c.id).where(older).limit(PRUNE_BATCH).scalar_subquery()
        removed = 0
        while True:
            async with self._write_transaction() as connection:
                result = await connection.execute(
                    delete(action_metrics).where(action_metrics.c.id.in_(batch))
                )
                deleted = result.rowcount
            removed += deleted
            if progress is not None:
                progress(removed)
            if deleted < PRUNE_BATCH:
                break
        async with self._write_transaction() as connection:
            await connection.execute(delete(credit_claims).where(credit_claims.c.timestamp < cutoff))
        return PruneResult(cutoff, removed, dry_run=False)

    # -- what `db copy` reads and writes --

    async def read_after(self, position: CopyPosition | None, limit: int) -> list[ActionMetric]:
        """The next `limit` raw actions after `position`, by timestamp then id."""
        async with self._read_connection() as connection:
            return [
                metric_from_row(row) for row in await connection.execute(after_statement(position, limit))
            ]

    async def count_after(self, position: CopyPosition | None) -> int:
        statement = select(func.count()).select_from(action_metrics).where(*after_terms(position))
        async with self._read_connection() as connection:
            return int((await connection.execute(statement)).scalar_one())

    async def credit_claims_after(self, after: tuple[str, str] | None, limit: int) -> list[CreditClaim]:
        """The next `limit` credit claims after the ancestor `after` (trace and span id in hex), in
        that order: what `db copy` brings, so that a copy charges no action a second time."""
        c = credit_claims.c
        statement = select(c.trace_id, c.span_id, c.metric_id, c.timestamp).order_by(c.trace_id, c.span_id)
        if after is not None:
            statement = statement.where(tuple_(c.trace_id, c.span_id) > tuple_(*after))
        async with self._read_connection() as connection:
            rows = (await connection.execute(statement.limit(limit))).all()
        return [
            CreditClaim(int(trace, 16), int(span, 16), metric_id, at) for trace, span, metric_id, at in rows
        ]

    async def copy_credit_claims(self, claims: Sequence[CreditClaim]) -> int:
        """Store claims another store made (`db copy`), keeping any this one has of the same ancestor:
        how many were new."""
        if not claims:
            return 0
        insert = (
            self.backend.insert(credit_claims)
            .on_conflict_do_nothing(index_elements=["trace_id", "span_id"])
            .returning(credit_claims.c.trace_id)
        )
        async with self._write_transaction() as connection:
            return len((await connection.execute(insert, [claim.row() for claim in claims])).all())

    async def credit_prices(self) -> list[CreditPrice]:
        """Every credit price stored, oldest first."""
        statement = select(credit_prices.c.effective_from, credit_prices.c.usd_per_credit).order_by(
            credit_prices.c.effective_from
        )
        async with self._read_connection() as connection:
            rows = (await connection.execute(statement)).all()
        return [CreditPrice(usd_per_credit=price, effective_from=start) for start, price in rows]

    async def raw_kept_from(self) -> datetime | None:
        """The cut-off of the last `prune` (None: never pruned)."""
        async with self._snapshot() as connection:
            return (await rollup.read_state(connection)).raw_kept_from

    async def record_raw_kept_from(self, cutoff: datetime) -> None:
        """Mark the raw rows before `cutoff` as gone (a copy of a pruned store had none to bring):
        what needs them raises `RawRowsPruned`; the rollups answer for what they hold there."""
        async with self._write_transaction() as connection:
            state = await self._locked_state(connection)
            if state.raw_kept_from is None or state.raw_kept_from < cutoff:
                await rollup.write_state(connection, state, replace(state, raw_kept_from=cutoff))
                await closed_buckets.forget(connection, starting_before=cutoff)

    async def close(self) -> None:
        await self.engine.dispose()


def _without_earlier_ids(groups: Sequence[Sequence[ActionMetric]]) -> list[list[ActionMetric]]:
    """Each group without the ids an earlier group holds (an id stays in the first that has it)."""
    seen: set[Any] = set()
    kept: list[list[ActionMetric]] = []
    for group in groups:
        earlier = set(seen)
        kept.append([metric for metric in group if metric.id not in earlier])
        seen.update(metric.id for metric in group)
    return kept


async def _price_starts(connection: AsyncConnection) -> list[datetime]:
    """Every instant a model or credit price begins, in order."""
    starts = union(select(model_prices.c.effective_from), select(credit_prices.c.effective_from))
    return sorted((await connection.execute(starts)).scalars())


def _refuse_an_open_cutoff(cutoff: datetime, closed_until: datetime | None) -> None:
    """A prune may only remove what the rollups keep: days they closed (up to `closed_until`)."""
    if closed_until is None or closed_until < cutoff:
        reach = closed_until.isoformat() if closed_until else "nothing"
        raise InvalidFilter(
            "before",
            f"cannot prune up to {cutoff.isoformat()}: the rollups are closed up to {reach} only "
            f"(a day closes {rollup.CLOSE_DELAY} after it ends); choose an earlier cut-off",
        )


def _pruned_question(metric_filter: MetricFilter, *, exact: bool) -> str:
    """The `aggregate()` that needs the raw rows, named by what the caller gave it."""
    if exact:
        return "aggregate(exact=True)"
    given = [f"{name}=..." for name in FILTER_NAMES if getattr(metric_filter, name) is not None]
    return f"aggregate({', '.join(given)})"


def _reaches_before(metric_filter: MetricFilter, cutoff: datetime) -> bool:
    return metric_filter.since is None or metric_filter.since < cutoff


def _plan(
    metric_filter: MetricFilter,
    state: RollupState,
    *,
    exact: bool,
    grouped: Sequence[str] = (),
    window: rollup.Range | None = None,
) -> ReadPlan:
    """Rollups where they can answer; raw rows for `exact`, for users and citizens (no rollup keeps
    them), and for the newest `limit`. `grouped`: dimensions grouped by (which the rollups read must
    keep); `window`: the time range, if not the filter's."""
    since, until = (metric_filter.since, metric_filter.until) if window is None else window
    unkept = (metric_filter.limit, metric_filter.user_id, metric_filter.citizen_id)
    if (
        exact
        or any(value is not None for value in unkept)
        or not metric_filter.storable
        or not set(grouped) <= set(rollup.DIMENSIONS)
    ):
        return rollup.raw_only(since, until)
    kept = [name for name in rollup.DIMENSIONS if getattr(metric_filter, name) is not None or name in grouped]
    return rollup.plan_reads(state, kept, since, until)


async def _window(
    connection: AsyncConnection, metric_filter: MetricFilter, state: RollupState
) -> tuple[datetime, datetime]:
    """The filter's time range within the first and last action stored (raw or rolled up): a window
    reaching centuries out has only the buckets of what is stored. The bounds are those of the
    filter's town, user, citizen, action type and model, so that another town's metric stamped far
    in the future does not stretch this one's buckets; only once `prune` removed raw rows are the
    rollups' (of every town) taken too. Empty (since >= until) when nothing is stored in it."""
    m, r = action_metrics, rollup_table
    # Each bound its own subquery, so that each is one step down an index (a min and a max in one
    # SELECT made SQLite scan both tables: 0.7 s at 1M actions). The rollups are built from the raw
    # rows, which hold every action until a prune; every rolled-up action is in the per-model
    # hourly level, and every day row was built from its hours.
    selected = metric_filter.conditions(m.c, times=False)
    bounds = [
        select(func.min(m.c.timestamp)).where(*selected).scalar_subquery(),
        select(func.max(m.c.timestamp)).where(*selected).scalar_subquery(),
    ]
    if state.raw_kept_from is not None:
        hourly = rollup.HOURLY.rows(r)
        bounds.append(select(func.min(r.c.start)).where(*hourly).scalar_subquery())
        bounds.append(select(func.max(r.c.start)).where(*hourly).scalar_subquery())
    raw_first, raw_last, *rolled = (await connection.execute(select(*bounds))).one()
    rolled_first, rolled_last = rolled or (None, None)
    firsts = [moment for moment in (raw_first, rolled_first) if moment is not None]
    lasts = [_later(raw_last, timedelta(microseconds=1))] if raw_last is not None else []
    lasts += [_later(rolled_last, rollup.GRAIN_LENGTH["hour"])] if rolled_last is not None else []
    if not firsts:
        return _LAST_MOMENT, _FIRST_MOMENT
    since = min(firsts) if metric_filter.since is None else max(metric_filter.since, min(firsts))
    until = max(lasts) if metric_filter.until is None else min(metric_filter.until, max(lasts))
    return since, until


_FIRST_MOMENT: Final = datetime.min.replace(tzinfo=UTC)
_LAST_MOMENT: Final = datetime.max.replace(tzinfo=UTC)


def _later(moment: datetime, length: timedelta) -> datetime:
    """`moment + length`, or the last moment a datetime holds when that is past it (year 9999)."""
    return moment + length if moment <= _LAST_MOMENT - length else _LAST_MOMENT
