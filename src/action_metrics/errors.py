"""Every exception action-metrics raises on purpose; each message says what to do next."""

from __future__ import annotations

from datetime import datetime


class InvalidValue(ValueError):
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
    """A model or credit price is not a finite, non-negative amount."""


class DatabaseUnavailable(ConnectionError):
    """The database could not be reached."""


class SchemaError(RuntimeError):
    """The database's schema is not the one this version of action-metrics was built for."""


class SchemaNotCreated(SchemaError):
    """The database has no action-metrics tables: run `action-metrics db upgrade`."""


class SchemaOutOfDate(SchemaError):
    """The database is at an older revision: run `action-metrics db upgrade`."""


class SchemaTooNew(SchemaError):
    """The database was migrated by a newer action-metrics: upgrade the package."""


class RawRowsPruned(LookupError):
    """The question needs raw rows from before the cut-off of `action-metrics db prune`, which are gone.

    Only the rollups reach back there: aggregates without `exact=True`, without `user_id`,
    `citizen_id` or `limit`, over whole UTC days before the cut-off. `cutoff` is that instant.
    """

    def __init__(self, cutoff: datetime, question: str) -> None:
        self.cutoff = cutoff
        super().__init__(
            f"{question} needs raw rows from before {cutoff.isoformat()}, which `action-metrics db prune` "
            f"removed; ask from {cutoff.isoformat()} on, or for whole UTC days without exact=True, "
            "user_id, citizen_id or limit (the rollups keep those)"
        )


class FlushTimeout(TimeoutError):
    """`flush(timeout=...)` ran out of time with metrics still waiting for the database.

    Nothing was discarded: they stay buffered and the writer keeps retrying; `flush()` again later.
    """
