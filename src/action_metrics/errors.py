"""Every exception action-metrics raises on purpose; each message says what to do next.

They all derive from `ActionMetricsError`, so a caller (the command line, the endpoint) catches one
family. Database failures are translated into `DatabaseError`s once, where the repository uses a
connection; the driver's exception stays attached as `__cause__`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime


class ActionMetricsError(Exception):
    """Anything action-metrics refuses or cannot do; the message says what to do next."""


class InvalidValue(ActionMetricsError, ValueError):
    """A value given to action-metrics is unusable; `field` names the argument at fault."""

    def __init__(self, field_name: str, problem: str) -> None:
        self.field = field_name
        self.problem = problem
        super().__init__(f"{field_name}: {problem}")


class InvalidMetric(InvalidValue):
    """A field of an action metric holds a value the store cannot keep."""


class InvalidFilter(InvalidValue):
    """A filter given to `query()` or `aggregate()` has the wrong type or range."""


class InvalidPrice(InvalidValue):
    """A model or credit price is not a finite, non-negative amount, or starts where it cannot."""

    @classmethod
    def inside_pruned_day(cls, start: datetime, cutoff: datetime) -> InvalidPrice:
        """A new price from inside a UTC day whose raw rows `prune` removed: the rollups cannot be
        split there any more."""
        midnight = start.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return cls(
            "effective_from",
            f"{start.isoformat()} falls inside a UTC day whose raw rows were pruned (before "
            f"{cutoff.isoformat()}), so the day cannot be split there: start the price at that "
            f"day's UTC midnight, {midnight.isoformat()} (a time without a zone is local time), or "
            "at the cut-off",
        )


class UnsupportedDatabase(ActionMetricsError, ValueError):
    """The URL names a database action-metrics does not run on, or cannot be read."""


class TokenConfigError(ActionMetricsError, ValueError):
    """The endpoint's API tokens are missing or malformed; the message says how to set them."""


class DowngradeRefused(ActionMetricsError):
    """A downgrade would lose what the store cannot say it lost (a pruned period); the message names
    the option that allows it."""


class UpgradeRefused(ActionMetricsError, RuntimeError):
    """An upgrade stopped before changing anything: the database holds what the new revision refuses
    (rows breaking migration 0005's rules); the message says what to fix before upgrading again."""


class StoreClosed(ActionMetricsError, RuntimeError):
    """The store was closed: open a new one to use the database again."""


class FlushTimeout(ActionMetricsError, TimeoutError):
    """`flush(timeout=...)` ran out of time with metrics still waiting for the database.

    Nothing was discarded: they stay buffered and the writer keeps retrying; `flush()` again later.
    """


class DatabaseError(ActionMetricsError):
    """The database did not do what was asked; the subclass says whose fix it is.

    `reason` is the driver's error in one line (without SQLAlchemy's statement and parameters).
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = message if reason is None else reason


class DatabaseUnavailable(DatabaseError, ConnectionError):
    """The database could not be reached, or the connection failed: try again later."""


class StatementRefused(DatabaseError):
    """The database refused a statement whatever its data: a table missing or renamed, a privilege
    not granted. An operator fixes it (`action-metrics db upgrade`, a GRANT)."""


class DataRejected(DatabaseError):
    """The database refused the data of a statement: a constraint or trigger of its own, a value out
    of range (SQLSTATE classes 22 and 23). The same data fails again; other data may succeed."""


class MetricInPrunedPeriod(DataRejected):
    """A metric's `timestamp` is before the store's prune cut-off (`cutoff`): the raw rows there are
    gone, so a re-sent action could not be told from a new one and would count twice in the
    rollups. Refused, as Prometheus refuses out-of-bounds samples; the batch stores nothing.

    A `DataRejected`: the same metrics fail again, the others of the batch may succeed (the writer
    and the HTTP intake store them). `indexes`: every refused position in the batch, in order.
    """

    field = "timestamp"

    def __init__(self, cutoff: datetime, indexes: Sequence[int], oldest: datetime, start: int = 0) -> None:
        self.cutoff = cutoff
        self.indexes = tuple(indexes)
        self.oldest = oldest
        self.start = start
        self.problem = (
            f"before the prune cut-off {cutoff.isoformat()} (action-metrics db prune removed the raw "
            "actions before it, so a re-sent one would count twice)"
        )
        shown = ", ".join(str(index) for index in self.indexes[:5])
        more = f" and {len(self.indexes) - 5} more" if len(self.indexes) > 5 else ""
        which = f"metric {shown}" if len(self.indexes) == 1 else f"metrics {shown}{more}"
        stored = (
            "the batch stored nothing"
            if start == 0
            else f"their batch, from metric {start} on, stored nothing; the {start} before it are stored"
        )
        super().__init__(
            f"{self.field}: {self.problem}: {which} (the oldest at {oldest.isoformat()}); {stored}. "
            f"Send only metrics from {cutoff.isoformat()} on",
            f"{self.field}: {self.problem}",
        )

    def offset(self, start: int) -> MetricInPrunedPeriod:
        """The same refusal with its indexes counted from `start`, its batch's place in a longer run
        of which the metrics before `start` are stored."""
        indexes = [start + index for index in self.indexes]
        return MetricInPrunedPeriod(self.cutoff, indexes, self.oldest, start)


class SchemaError(DatabaseError, RuntimeError):
    """The database's schema is not the one this version of action-metrics was built for."""


class SchemaNotCreated(SchemaError):
    """The database has no action-metrics tables: run `action-metrics db upgrade`."""


class SchemaOutOfDate(SchemaError):
    """The database is at an older revision: run `action-metrics db upgrade`."""


class SchemaTooNew(SchemaError):
    """The database was migrated by a newer action-metrics: upgrade the package."""


class SchemaUnknown(SchemaError):
    """The database is at a revision that is not one of action-metrics' numbered ones (another
    project's alembic_version): check that the URL names an action-metrics database."""


class RawRowsPruned(ActionMetricsError, LookupError):
    """The question needs raw rows from before the cut-off of `action-metrics db prune`, which are gone.

    Only the rollups reach back there: aggregates without `exact=True`, without `user_id`,
    `citizen_id` or `limit`, over whole UTC days before the cut-off (whole UTC hours on ClickHouse,
    whose rollups are hourly: `whole`). `cutoff` is that instant.
    """

    def __init__(
        self, cutoff: datetime, question: str, *, rollups: bool = True, whole: str = "UTC days"
    ) -> None:
        self.cutoff = cutoff
        elsewhere = (
            f", or for whole {whole} without exact=True, user_id, citizen_id or limit"
            " (the rollups keep those)"
            if rollups
            else " (this database keeps no rollups of them)"
        )
        super().__init__(
            f"{question} needs raw rows from before {cutoff.isoformat()}, which `action-metrics db prune` "
            f"removed; ask from {cutoff.isoformat()} on{elsewhere}"
        )


class SourcePruned(ActionMetricsError):
    """`db copy` refuses a source whose raw rows before `cutoff` were pruned: only its rollups keep
    that period, and no rollup is copied. `copy_store(..., skip_pruned_period=True)` (the command's
    `--skip-pruned-period`) copies the rows kept and gives the period up."""

    def __init__(self, source: str, cutoff: datetime) -> None:
        self.cutoff = cutoff
        super().__init__(
            f"{source} was pruned: its actions before {cutoff.isoformat()} survive only as rollup totals, "
            "which db copy cannot bring. Pass --skip-pruned-period to copy the actions from "
            f"{cutoff.isoformat()} on and give up every figure before it (the copy records the cut-off: "
            "what needs those actions raises RawRowsPruned rather than answering zero)"
        )


class DestinationPruned(ActionMetricsError):
    """`db copy` refuses to bring actions from before the prune cut-off of the destination
    (`cutoff`), which refuses them (`MetricInPrunedPeriod`): its ids there were pruned, so a copied
    action could count twice. `copy_store(..., skip_pruned_period=True)` (`--skip-pruned-period`)
    copies the actions from the cut-off on and leaves the period before it to the destination's
    rollups."""

    def __init__(self, destination: str, cutoff: datetime, source: str, oldest: datetime) -> None:
        self.cutoff = cutoff
        super().__init__(
            f"{destination} was pruned: it refuses actions from before {cutoff.isoformat()} (its ids "
            f"there were pruned with its rows, so a copied one could count twice), and {source} holds "
            f"some from {oldest.isoformat()} on. Pass --skip-pruned-period to copy the actions from "
            f"{cutoff.isoformat()} on and leave the period before it to what {destination} holds"
        )


class PriceInPrunedDestination(ActionMetricsError):
    """`db copy` refuses a source's price that starts inside a UTC day whose raw rows the
    destination pruned (before its cut-off, not at a midnight, and new to it): the destination
    refuses to set it (`InvalidPrice.inside_pruned_day`), since its rollups cannot be split there.
    Refused before anything is written; `model` is None for a credit price."""

    def __init__(
        self, destination: str, cutoff: datetime, source: str, model: str | None, start: datetime
    ) -> None:
        self.cutoff = cutoff
        self.model = model
        self.effective_from = start
        price = "the credit price" if model is None else f"the price of {model}"
        super().__init__(
            f"{destination} was pruned before {cutoff.isoformat()}, and {source} holds {price} from "
            f"{start.isoformat()}, inside a UTC day whose raw rows {destination} pruned: its rollups "
            "cannot be split there, so it cannot take that price. Nothing was written; copy into a "
            "destination that was not pruned"
        )


class PriceConflict(ActionMetricsError):
    """`db copy` refuses to write a source's model price over a different one that the destination
    had set by hand for the same model from the same instant: which is right is the operator's call.
    Refused before anything is written; `model` and `effective_from` name the first such price,
    `kept` and `copied` are the destination's and the source's (USD per 1M tokens, as shown)."""

    def __init__(
        self,
        destination: str,
        source: str,
        model: str,
        effective_from: datetime,
        kept: str,
        copied: str,
        *,
        take_source: str,
        others: int,
    ) -> None:
        self.model = model
        self.effective_from = effective_from
        more = f" ({others} more of its hand-set prices differ likewise)" if others else ""
        super().__init__(
            f"{destination} has a price of {model} set by hand from {effective_from.isoformat()}, {kept}, "
            f"and {source} a different one from the same instant, {copied}: db copy would overwrite it, "
            f"so it copied nothing{more}. To take the source's, run: {take_source}; to keep the "
            "destination's, set it so on the source. Then run the copy again"
        )


@contextmanager
def translated(translate: Callable[[BaseException, str], DatabaseError | None], where: str) -> Iterator[None]:
    """Re-raise a failure inside the block as the `DatabaseError` that `translate` makes of it for the
    database at `where` (a failure it does not know goes on as it is)."""
    try:
        yield
    except Exception as error:
        made = translate(error, where)
        if made is None:
            raise
        raise made from error
