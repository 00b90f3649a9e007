"""OpenTelemetry both ways: our spans out to any exporter, and other tools' GenAI spans in as metrics.

Out: `setup_otel_tracing()` installs a tracer provider unless the host application already has one
(then ours is never installed over it); `@instrument_action` records its spans with `get_tracer()`
(in `instrument`, which needs only the OpenTelemetry API: this module loads the SDK).

In: `ActionMetricsSpanProcessor` is added to an application's own tracer provider; every finished
span that carries the GenAI semantic-convention attributes (from OpenLLMetry, OpenLIT or the
official instrumentations) becomes an `ActionMetric` in the store, priced like any other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from datetime import UTC, datetime
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import StatusCode
from opentelemetry.util.types import AttributeValue

from action_metrics.errors import FlushTimeout, InvalidValue
from action_metrics.model import ANONYMOUS_USER, UNKNOWN_MODEL, UNKNOWN_TOWN, ActionMetric
from action_metrics.pricing import ACTION_CREDITS
from action_metrics.store import AsyncMetricsStore, MetricsStore

logger: Final = logging.getLogger(__name__)

_OTLP_PROTOCOLS: Final = {
    "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
}


# --- out -------------------------------------------------------------------------------------


def setup_otel_tracing(
    exporter: SpanExporter | None = None, service_name: str = "action-metrics"
) -> trace.TracerProvider:
    """Send spans to `exporter`, or to what the OpenTelemetry environment variables name, else the console.

    Without an exporter: `OTEL_TRACES_EXPORTER` (`otlp`, `console` or `none`) decides; unset, OTLP
    is used when an `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` is set (needs `action-metrics[otlp]`),
    the console otherwise. A tracer provider the host application already set is left exactly as
    it is (our spans go to it); the provider in effect is returned.
    """
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        if exporter is not None:
            logger.warning(
                "a tracer provider is already set (%s): action-metrics leaves it alone, so %r is "
                "not installed; add it to that provider, e.g. provider.add_span_processor("
                "BatchSpanProcessor(exporter))",
                type(current).__name__,
                exporter,
            )
        return current
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    chosen = exporter if exporter is not None else _exporter_from_environment()
    if chosen is not None:
        # The console is for watching spans while developing: print each at once.
        processor_type = (
            SimpleSpanProcessor if isinstance(chosen, ConsoleSpanExporter) else BatchSpanProcessor
        )
        provider.add_span_processor(processor_type(chosen))
    trace.set_tracer_provider(provider)  # refuses (and logs) if another thread set one meanwhile
    return trace.get_tracer_provider()


def _exporter_from_environment() -> SpanExporter | None:
    choice = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not choice:
        endpoint_set = any(
            os.environ.get(name)
            for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
        )
        choice = "otlp" if endpoint_set else "console"
    if choice == "none":
        return None
    if choice == "console":
        return ConsoleSpanExporter()
    if choice != "otlp":
        logger.warning("OTEL_TRACES_EXPORTER=%r is not one of otlp, console, none: using the console", choice)
        return ConsoleSpanExporter()
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    module_name = _OTLP_PROTOCOLS.get(protocol)
    if module_name is None:
        logger.warning("OTLP protocol %r is not supported (grpc, http/protobuf): using the console", protocol)
        return ConsoleSpanExporter()
    try:
        module = __import__(module_name, fromlist=["OTLPSpanExporter"])
    except ImportError:
        logger.warning(
            "OTLP export is configured but its exporter is not installed: "
            "pip install 'action-metrics[otlp]'; using the console meanwhile"
        )
        return ConsoleSpanExporter()
    otlp_exporter: SpanExporter = module.OTLPSpanExporter()  # endpoint, headers... from the environment
    return otlp_exporter


# --- in --------------------------------------------------------------------------------------

_INPUT_TOKENS: Final = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
_OUTPUT_TOKENS: Final = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
_MODELS: Final = ("gen_ai.response.model", "gen_ai.request.model")
_CACHE_READ_TOKENS: Final = ("gen_ai.usage.cache_read.input_tokens",)
_CACHE_WRITE_TOKENS: Final = (
    "gen_ai.usage.cache_write.input_tokens",
    "gen_ai.usage.cache_creation.input_tokens",
)
_REASONING_TOKENS: Final = ("gen_ai.usage.reasoning.output_tokens",)
"""The GenAI conventions' token kinds, parts of the input and output totals (the older
`cache_creation` name too). Instrumentations that report a provider's exclusive counts instead
(Anthropic's input_tokens leave the cached ones out) are not reconciled here yet."""
_GEN_AI_KEYS: Final = frozenset((*_INPUT_TOKENS, *_OUTPUT_TOKENS, *_MODELS))
_OWN_SPAN: Final = "action.id"
"""Set on the spans `@instrument_action` makes: the decorator has stored those metrics already."""


class ActionMetricsSpanProcessor(SpanProcessor):
    """Turns every finished GenAI span into an `ActionMetric` in `store`.

    Add it to the application's tracer provider (`provider.add_span_processor(...)`). Model and
    tokens come from the `gen_ai.*` attributes (the response model first; the older
    `prompt_tokens`/`completion_tokens` names are read too), latency from the span's start and end,
    the timestamp from its start; ids, credits and the action type from the attributes named here.
    Spans without GenAI attributes, and the spans of `@instrument_action`, are ignored. A span whose
    attributes make no valid metric is counted in `rejected` and logged; nothing is ever raised into
    the application. Metrics are buffered (`emit_nowait`): ending a span never waits on the database.
    """

    def __init__(
        self,
        store: MetricsStore | AsyncMetricsStore,
        *,
        user_id_attribute: str = "action.user_id",
        town_id_attribute: str = "action.town_id",
        citizen_id_attribute: str = "action.citizen_id",
        credits_attribute: str = "action.credits",
        action_type_attribute: str = "action.type",
        default_action_type: str = "llm",
        default_user_id: str = ANONYMOUS_USER,
        default_town_id: str = UNKNOWN_TOWN,
    ) -> None:
        self.store = store
        self.user_id_attribute = user_id_attribute
        self.town_id_attribute = town_id_attribute
        self.citizen_id_attribute = citizen_id_attribute
        self.credits_attribute = credits_attribute
        self.action_type_attribute = action_type_attribute
        self.default_action_type = default_action_type
        self.default_user_id = default_user_id
        self.default_town_id = default_town_id
        self.recorded = 0
        """Spans turned into metrics."""
        self.rejected = 0
        """GenAI spans whose attributes made no valid metric."""
        self._count_lock = threading.Lock()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        try:
            metric = self.metric_from_span(span)
            if metric is not None:
                self.store.emit_nowait(metric)
                with self._count_lock:
                    self.recorded += 1
        except InvalidValue as error:
            self._reject(span, error)
        except Exception:  # an OpenTelemetry hook must never raise into the application
            self._reject(span, None)

    def metric_from_span(self, span: ReadableSpan) -> ActionMetric | None:
        """The metric a finished span stands for; None for a span that is not a GenAI call."""
        attributes = span.attributes or {}
        if _OWN_SPAN in attributes or _GEN_AI_KEYS.isdisjoint(attributes):
            return None
        start, end = span.start_time, span.end_time
        if start is None or end is None:
            return None
        action_type = _text(attributes.get(self.action_type_attribute)) or self.default_action_type
        failed = span.status.status_code is StatusCode.ERROR
        credits = 0 if failed else attributes.get(self.credits_attribute, ACTION_CREDITS.get(action_type, 0))
        metadata: dict[str, Any] = {"trace_id": f"{span.context.trace_id:032x}"} if span.context else {}
        if span.context:
            metadata["span_id"] = f"{span.context.span_id:016x}"
        metadata["span_name"] = span.name
        for key in ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.system"):
            value = _text(attributes.get(key))
            if value:
                metadata[key] = value
        error = None
        if failed:
            error = (_text(attributes.get("error.type")) or span.status.description or "error")[:256]
            metadata["error"] = error
        return ActionMetric(
            action_type=action_type,
            user_id=_text(attributes.get(self.user_id_attribute)) or self.default_user_id,
            town_id=_text(attributes.get(self.town_id_attribute)) or self.default_town_id,
            citizen_id=_text(attributes.get(self.citizen_id_attribute)),
            tokens_in=_first(attributes, _INPUT_TOKENS, 0),
            tokens_out=_first(attributes, _OUTPUT_TOKENS, 0),
            cache_read_tokens=_first(attributes, _CACHE_READ_TOKENS, 0),
            cache_write_tokens=_first(attributes, _CACHE_WRITE_TOKENS, 0),
            reasoning_tokens=_first(attributes, _REASONING_TOKENS, 0),
            error=error,
            model=_first(attributes, _MODELS, UNKNOWN_MODEL),
            latency_ms=(end - start) / 1e6,
            credits_charged=credits,  # type: ignore[arg-type] # checked by ActionMetric
            timestamp=datetime.fromtimestamp(start / 1e9, UTC),
            metadata=metadata,
        )

    def _reject(self, span: ReadableSpan, error: InvalidValue | None) -> None:
        with self._count_lock:
            self.rejected += 1
        if error is not None:
            logger.warning(
                "action-metrics: GenAI span %r makes no valid metric (%s); skipped", span.name, error
            )
        else:
            logger.exception("action-metrics: could not record GenAI span %r; skipped", span.name)

    def shutdown(self) -> None:
        """Write what this processor handed to the store; the store itself stays open (it is yours)."""
        self.force_flush()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        timeout = timeout_millis / 1000
        try:
            if isinstance(self.store, MetricsStore):
                self.store.flush(timeout)
                return True
            return _flush_async_store(self.store, timeout)
        except FlushTimeout:
            return False
        except Exception:  # an OpenTelemetry hook must never raise into the application
            logger.exception("action-metrics: flushing %r failed", self.store)
            return False


def _flush_async_store(store: AsyncMetricsStore, timeout: float) -> bool:
    """Flush an async store from a blocking hook, when that can be done without deadlocking."""
    loop = store.writer.loop
    if loop is None or not loop.is_running():
        return not store.writer.pending
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        return not store.writer.pending  # cannot block the loop that has to do the writing
    asyncio.run_coroutine_threadsafe(store.flush(timeout), loop).result()
    return True


def _text(value: AttributeValue | None) -> Any:
    """A string attribute as is, an integer one (a numeric id) as text; anything else unchanged, so
    that the metric's own checks reject it with the field's name."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _first(attributes: Any, keys: tuple[str, ...], default: Any) -> Any:
    for key in keys:
        value = attributes.get(key)
        if value is not None:
            return value
    return default
