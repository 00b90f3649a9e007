"""Were actions charged what they cost? Counted in SQL, so an audit never reads the actions themselves.

An action that failed (its `error` is set) and was charged nothing is correct, not a breach; every
other action is charged exactly, under or over the credits expected.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, not_, select, tuple_

from action_metrics.query import MetricFilter
from action_metrics.schema import action_metrics, credit_claims


@dataclass(frozen=True, slots=True)
class CreditClaim:
    """A call charged the credits of an ancestor span (an action's): the ancestor's identity, the call's
    metric id and timestamp. The first claim of an ancestor wins; see `schema.CreditClaimRow`."""

    trace_id: int
    span_id: int
    metric_id: uuid.UUID
    timestamp: datetime

    @property
    def identity(self) -> tuple[int, int]:
        """The ancestor's trace and span id."""
        return self.trace_id, self.span_id

    @property
    def ancestor(self) -> tuple[str, str]:
        """The ancestor's identity as the table keys it: trace and span id in lowercase hex."""
        return f"{self.trace_id:032x}", f"{self.span_id:016x}"

    def row(self) -> dict[str, Any]:
        trace_id, span_id = self.ancestor
        return {
            "trace_id": trace_id,
            "span_id": span_id,
            "metric_id": self.metric_id,
            "timestamp": self.timestamp,
        }


def claims_held(ancestors: Iterable[tuple[str, str]]) -> Select[str, str, uuid.UUID]:
    """The claims of these ancestors (hex trace and span ids): ancestor and the metric id holding it."""
    key = tuple_(credit_claims.c.trace_id, credit_claims.c.span_id)
    return select(credit_claims.c.trace_id, credit_claims.c.span_id, credit_claims.c.metric_id).where(
        key.in_(list(ancestors))
    )


class RememberedClaims:
    """Credit claims kept in one process's memory, the newest `limit` of them: for a store whose
    database enforces no unique key to decide the first claim (ClickHouse)."""

    def __init__(self, limit: int = 65_536) -> None:
        self.limit = limit
        self._holders: OrderedDict[tuple[int, int], uuid.UUID] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, claims: Sequence[CreditClaim]) -> dict[tuple[int, int], uuid.UUID]:
        """As `MetricsRepository.claim_credits`, within this process."""
        with self._lock:
            holders = {
                claim.identity: self._holders.setdefault(claim.identity, claim.metric_id) for claim in claims
            }
            while len(self._holders) > self.limit:
                self._holders.popitem(last=False)
        return holders


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
