"""Were actions charged what they cost? Counted in SQL, so an audit never reads the actions themselves.

An action that failed (its `error` is set) and was charged nothing is correct, not a breach; every
other action is charged exactly, under or over the credits expected.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, not_, select

from action_metrics.model import ActionMetric
from action_metrics.query import MetricFilter
from action_metrics.schema import action_metrics


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


@dataclass(frozen=True, slots=True)
class InheritedCredits:
    """Calls that may carry the credits of an ancestor span (an action's) rather than their own (an
    OTLP request's: `otlp.SpanBatch.credits`), by metric id: (the ancestor's trace and span id, its
    credits). The store settles them in the transaction that writes the calls: each ancestor is
    claimed for its first call among those written (`claims`); where the claim is made (no earlier
    one), that call is written with the credits, the others without (`settled`). Where it was made
    before, the call that holds it was stored with it, in its own transaction."""

    calls: Mapping[uuid.UUID, tuple[tuple[int, int], int]]

    def claims(self, metrics: Iterable[ActionMetric]) -> list[CreditClaim]:
        """A claim for the first call under each ancestor among `metrics`."""
        claims: dict[tuple[int, int], CreditClaim] = {}
        for metric in metrics:
            found = self.calls.get(metric.id)
            if found is not None and found[0] not in claims:
                claims[found[0]] = CreditClaim(*found[0], metric.id, metric.timestamp)
        return list(claims.values())

    def settled(
        self, metrics: Sequence[ActionMetric], holders: Mapping[tuple[int, int], uuid.UUID]
    ) -> list[ActionMetric]:
        """`metrics`, each call that holds its ancestor's claim (`holders`: ancestor to the metric id
        holding it) charged the ancestor's credits."""
        settled = []
        for metric in metrics:
            found = self.calls.get(metric.id)
            if found is not None and holders.get(found[0]) == metric.id:
                metric = metric.charged(found[1])
            settled.append(metric)
        return settled


class RememberedClaims:
    """Credit claims kept in one process's memory, the newest `limit` of them: for a store whose
    database enforces no unique key to decide the first claim (ClickHouse)."""

    def __init__(self, limit: int = 65_536) -> None:
        self.limit = limit
        self._holders: OrderedDict[tuple[int, int], uuid.UUID] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, claims: Sequence[CreditClaim]) -> dict[tuple[int, int], uuid.UUID]:
        """Each claimed ancestor with the metric id holding its claim, as the SQL stores keep them
        (`MetricsRepository`), within this process."""
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
