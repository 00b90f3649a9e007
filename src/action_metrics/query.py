"""Which metrics a question is about: the filters of `query()` and `aggregate()`, checked at the call."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Final

from sqlalchemy import ColumnCollection, ColumnElement, Row, Select, and_, false, or_, select

from action_metrics.errors import InvalidFilter
from action_metrics.model import ActionMetric
from action_metrics.schema import action_metrics
from action_metrics.validation import MAX_INT64, as_integer, as_utc, shown, storable_text

EQUALITY_FILTERS: Final = ("user_id", "town_id", "citizen_id", "action_type", "model")


@dataclass(frozen=True, slots=True)
class MetricFilter:
    """Equality on ids, type and model; `since` inclusive, `until` exclusive; the newest `limit`."""

    user_id: str | None = None
    town_id: str | None = None
    citizen_id: str | None = None
    action_type: str | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        for name in EQUALITY_FILTERS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidFilter(name, f"expected a string, got {type(value).__name__}")
            if value is not None:
                object.__setattr__(self, name, str(value))
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_utc(name, value, InvalidFilter))
        if self.limit is not None:
            limit = as_integer(self.limit)
            if limit is None or not 0 <= limit <= MAX_INT64:
                got = shown(self.limit if limit is None else limit)
                raise InvalidFilter("limit", f"expected a whole number from 0 to 2**63 - 1, got {got}")
            object.__setattr__(self, "limit", limit)

    @property
    def storable(self) -> bool:
        """Whether every id, type and model filter could match a stored value."""
        values = (getattr(self, name) for name in EQUALITY_FILTERS)
        return all(storable_text(value) for value in values if value is not None)

    def conditions(
        self, columns: ColumnCollection[str, Any], *, times: bool = True
    ) -> list[ColumnElement[bool]]:
        """WHERE terms against a table or view that has the action_metrics columns (without `since`
        and `until` when not `times`)."""
        terms: list[ColumnElement[bool]] = []
        for name in EQUALITY_FILTERS:
            value = getattr(self, name)
            if value is None:
                continue
            if not storable_text(value):
                return [false()]  # no stored value can hold it: nothing matches
            terms.append(columns[name] == value)
        if times and self.since is not None:
            terms.append(columns["timestamp"] >= self.since)
        if times and self.until is not None:
            terms.append(columns["timestamp"] < self.until)
        return terms

    def newest_first(self, statement: Select[Any], columns: ColumnCollection[str, Any]) -> Select[Any]:
        statement = statement.where(*self.conditions(columns)).order_by(
            columns["timestamp"].desc(), columns["id"].desc()
        )
        return statement if self.limit is None else statement.limit(self.limit)


FILTER_NAMES: Final = tuple(field.name for field in fields(MetricFilter))


def metrics_statement(metric_filter: MetricFilter) -> Select[Any]:
    return metric_filter.newest_first(select(action_metrics), action_metrics.c)


def metric_from_row(row: Row[Any]) -> ActionMetric:
    return ActionMetric.stored(
        action_type=row.action_type,
        user_id=row.user_id,
        town_id=row.town_id,
        citizen_id=row.citizen_id,
        tokens_in=row.tokens_in,
        tokens_out=row.tokens_out,
        model=row.model,
        latency_ms=row.latency_ms,
        credits_charged=row.credits_charged,
        timestamp=row.timestamp,
        metadata=row._mapping["metadata"],
        id=row.id,
        cache_read_tokens=row.cache_read_tokens,
        cache_write_tokens=row.cache_write_tokens,
        reasoning_tokens=row.reasoning_tokens,
        error=row.error,
    )


def metric_rows(metrics: Sequence[ActionMetric]) -> list[dict[str, Any]]:
    """Bind parameters for inserting into action_metrics (keys are the table's column keys)."""
    return [
        {
            "id": metric.id,
            "timestamp": metric.timestamp,
            "action_type": metric.action_type,
            "user_id": metric.user_id,
            "town_id": metric.town_id,
            "citizen_id": metric.citizen_id,
            "model": metric.model,
            "tokens_in": metric.tokens_in,
            "tokens_out": metric.tokens_out,
            "latency_ms": metric.latency_ms,
            "credits_charged": metric.credits_charged,
            "metadata": metric.metadata,
            "cache_read_tokens": metric.cache_read_tokens,
            "cache_write_tokens": metric.cache_write_tokens,
            "reasoning_tokens": metric.reasoning_tokens,
            "error": metric.error,
        }
        for metric in metrics
    ]


@dataclass(frozen=True, slots=True)
class CopyPosition:
    """An action's place in the order `db copy` reads a store in: by timestamp, then id (each
    database orders ids its own way; a position is only compared by the database it came from)."""

    timestamp: datetime
    id: uuid.UUID

    @classmethod
    def of(cls, metric: ActionMetric) -> CopyPosition:
        return cls(metric.timestamp, metric.id)


@dataclass(frozen=True, slots=True)
class CopyCheckpoint:
    """How far `db copy` from `source` (its URL without the password) has got: the last action
    sent and how many were sent in all."""

    source: str
    position: CopyPosition
    copied: int


def after_statement(position: CopyPosition | None, limit: int) -> Select[Any]:
    """The first `limit` actions after `position` (from the first when None), in copy order."""
    columns = action_metrics.c
    statement = select(action_metrics).order_by(columns.timestamp, columns.id).limit(limit)
    return statement.where(*after_terms(position))


def after_terms(position: CopyPosition | None) -> list[ColumnElement[bool]]:
    if position is None:
        return []
    columns = action_metrics.c
    return [
        or_(
            columns.timestamp > position.timestamp,
            and_(columns.timestamp == position.timestamp, columns.id > position.id),
        )
    ]
