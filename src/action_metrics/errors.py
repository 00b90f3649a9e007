"""Every exception action-metrics raises on purpose; each message says what to do next."""

from __future__ import annotations


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


class FlushTimeout(TimeoutError):
    """`flush(timeout=...)` ran out of time with metrics still waiting for the database.

    Nothing was discarded: they stay buffered and the writer keeps retrying; `flush()` again later.
    """
