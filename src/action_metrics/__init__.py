"""action-metrics: SQL-backed unit economics (cost, revenue, margin, latency) for LLM-powered products.

`import action_metrics` loads only the metric, its vocabulary and the exceptions. The names that need
SQLAlchemy and a driver (the stores, `Aggregate`, the decorator) or the OpenTelemetry SDK
(`setup_otel_tracing`, `ActionMetricsSpanProcessor`) are imported on first use (PEP 562), so a
program pays for what it uses; alembic loads only when a schema is checked or migrated.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any, Final

from action_metrics.errors import (
    ActionMetricsError,
    DatabaseError,
    DatabaseUnavailable,
    DataRejected,
    FlushTimeout,
    InvalidFilter,
    InvalidMetric,
    InvalidPrice,
    InvalidValue,
    MetricInPrunedPeriod,
    SchemaError,
    SchemaNotCreated,
    SchemaOutOfDate,
    SchemaTooNew,
    SchemaUnknown,
    StatementRefused,
    StoreClosed,
    TokenConfigError,
    UnsupportedDatabase,
)
from action_metrics.model import ActionMetric, uuid7
from action_metrics.pricing import (
    ACTION_CREDITS,
    MODEL_COSTS_PER_1M,
    REVENUE_PER_CREDIT_USD,
    ActionType,
    ModelName,
)

if TYPE_CHECKING:
    from action_metrics.aggregate import Aggregate, ModelAggregate
    from action_metrics.breakdown import BreakdownRow
    from action_metrics.charges import ChargeAudit
    from action_metrics.context import action_context
    from action_metrics.instrument import (
        configure,
        default_store,
        emit_action_metric,
        get_tracer,
        instrument_action,
    )
    from action_metrics.otel import ActionMetricsSpanProcessor, setup_otel_tracing
    from action_metrics.store import AsyncMetricsStore, MetricsStore

_IMPORTED_ON_FIRST_USE: Final = {
    "Aggregate": "action_metrics.aggregate",
    "ModelAggregate": "action_metrics.aggregate",
    "BreakdownRow": "action_metrics.breakdown",
    "ChargeAudit": "action_metrics.charges",
    "action_context": "action_metrics.context",
    "AsyncMetricsStore": "action_metrics.store",
    "MetricsStore": "action_metrics.store",
    "configure": "action_metrics.instrument",
    "default_store": "action_metrics.instrument",
    "emit_action_metric": "action_metrics.instrument",
    "get_tracer": "action_metrics.instrument",
    "instrument_action": "action_metrics.instrument",
    "ActionMetricsSpanProcessor": "action_metrics.otel",
    "setup_otel_tracing": "action_metrics.otel",
}


def __getattr__(name: str) -> Any:
    module = _IMPORTED_ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module 'action_metrics' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_IMPORTED_ON_FIRST_USE})


__all__ = [
    "ACTION_CREDITS",
    "MODEL_COSTS_PER_1M",
    "REVENUE_PER_CREDIT_USD",
    "ActionMetric",
    "ActionMetricsError",
    "ActionMetricsSpanProcessor",
    "ActionType",
    "Aggregate",
    "AsyncMetricsStore",
    "BreakdownRow",
    "ChargeAudit",
    "DataRejected",
    "DatabaseError",
    "DatabaseUnavailable",
    "FlushTimeout",
    "InvalidFilter",
    "InvalidMetric",
    "InvalidPrice",
    "InvalidValue",
    "MetricInPrunedPeriod",
    "MetricsStore",
    "ModelAggregate",
    "ModelName",
    "SchemaError",
    "SchemaNotCreated",
    "SchemaOutOfDate",
    "SchemaTooNew",
    "SchemaUnknown",
    "StatementRefused",
    "StoreClosed",
    "TokenConfigError",
    "UnsupportedDatabase",
    "action_context",
    "configure",
    "default_store",
    "emit_action_metric",
    "get_tracer",
    "instrument_action",
    "setup_otel_tracing",
    "uuid7",
]
