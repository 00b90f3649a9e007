"""Were actions charged what they cost? Counted in SQL, so an audit never reads the actions themselves.

An action that failed (its `error` is set) and was charged nothing is correct, not a breach; every
other action is charged exactly, under or over the credits expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, not_, select

from action_metrics.query import MetricFilter
from action_metrics.schema import action_metrics


@dataclass(frozen=True, slots=True)
class ChargeAudit:
    """How the selected actions were charged against the credits expected of each."""

    count: int
    failed: int
    """Failed and charged nothing: correct."""
    under: int
    over: int

    @property
    def charged(self) -> int:
        """Actions that were due the expected credits (all but the failed ones)."""
        return self.count - self.failed

    @property
    def exact(self) -> int:
        return self.charged - self.under - self.over


def audit_statement(metric_filter: MetricFilter, credits: int) -> Select[Any]:
    """One row: `count`, `failed`, `under` and `over` among the metrics `metric_filter` selects."""
    table = action_metrics
    if metric_filter.limit is None:
        rows = select(table).where(*metric_filter.conditions(table.c)).subquery()
    else:  # the newest `limit` metrics
        rows = metric_filter.newest_first(select(table), table.c).subquery()
    charged = rows.c.credits_charged
    failed = and_(rows.c.error.is_not(None), charged == 0)
    counts: dict[str, ColumnElement[Any]] = {
        "count": func.count(),
        "failed": func.count().filter(failed),
        "under": func.count().filter(and_(not_(failed), charged < credits)),
        "over": func.count().filter(and_(not_(failed), charged > credits)),
    }
    return select(*(count.label(name) for name, count in counts.items())).select_from(rows)
