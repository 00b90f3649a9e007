"""action-metrics: SQL-backed unit economics (cost, revenue, margin, latency) for LLM-powered products."""

from action_metrics.aggregate import Aggregate, ModelAggregate
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
    SchemaError,
    SchemaNotCreated,
    SchemaOutOfDate,
    SchemaTooNew,
    StatementRefused,
    StoreClosed,
    TokenConfigError,
    UnsupportedDatabase,
)
from action_metrics.instrument import (
    configure,
    default_store,
    emit_action_metric,
    get_tracer,
    instrument_action,
)
from action_metrics.model import ActionMetric, uuid7
from action_metrics.otel import ActionMetricsSpanProcessor, setup_otel_tracing
from action_metrics.pricing import (
    ACTION_CREDITS,
    MODEL_COSTS_PER_1M,
    REVENUE_PER_CREDIT_USD,
    ActionType,
    ModelName,
)
from action_metrics.store import AsyncMetricsStore, MetricsStore

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
    "DataRejected",
    "DatabaseError",
    "DatabaseUnavailable",
    "FlushTimeout",
    "InvalidFilter",
    "InvalidMetric",
    "InvalidPrice",
    "InvalidValue",
    "MetricsStore",
    "ModelAggregate",
    "ModelName",
    "SchemaError",
    "SchemaNotCreated",
    "SchemaOutOfDate",
    "SchemaTooNew",
    "StatementRefused",
    "StoreClosed",
    "TokenConfigError",
    "UnsupportedDatabase",
    "configure",
    "default_store",
    "emit_action_metric",
    "get_tracer",
    "instrument_action",
    "setup_otel_tracing",
    "uuid7",
]
