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
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Final

from opentelemetry import baggage, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import StatusCode

from action_metrics.context import (
    Attribution,
    CreditClaim,
    current_attribution,
    current_claim,
    parse_attribution,
)
from action_metrics.errors import FlushTimeout, InvalidValue, StoreClosed
from action_metrics.genai import CallDeduplicator, SpanData, SpanMapping, call_from_span_data
from action_metrics.model import ANONYMOUS_USER, UNKNOWN_TOWN, ActionMetric
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

_MAX_OPEN_SPANS: Final = 65_536


class _SpanCredits:
    """Credits a span's call may take once: an `action_context` block's, or those an ancestor span
    or the baggage names (claimed once per that span, or per trace for baggage)."""

    def __init__(self, claim: CreditClaim | None, key: tuple[int, int | str] | None, credits: int) -> None:
        self.claim, self.key, self.credits = claim, key, credits


class ActionMetricsSpanProcessor(SpanProcessor):
    """Turns every finished GenAI span into an `ActionMetric` in `store`: one per LLM call.

    Add it to the application's tracer provider (`provider.add_span_processor(...)`). The mapping is
    `genai.call_from_span_data` (model and token kinds from the `gen_ai.*` attributes, latency from
    the span's start and end); the ids, action type and credits come from the span's `action.*`
    attributes, else from the `action_context` in force when it started, else its parent span's
    `action.*` attributes, else the OpenTelemetry baggage of the same names (text such as `"10"` is
    read as 10; a value that cannot be read is counted in `bad_attribution` and logged, and the call
    still recorded). Inherited credits are charged once, to the first call that takes them.
    Several spans of one call (a client's own span and an instrumentation's) make one metric
    (`genai.CallDeduplicator`; counted in `duplicates`). A call that reported no usage is stored with
    `metadata["usage_missing"]`, counted in `usage_missing` and logged. Spans without GenAI
    attributes, and those of `@instrument_action`, are ignored; a span that makes no valid metric is
    counted in `rejected` and logged; nothing is ever raised into the application. Metrics are
    buffered (`emit_nowait`): ending a span never waits on the database.
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
        self.mapping = SpanMapping(
            names={
                "action_type": action_type_attribute,
                "user_id": user_id_attribute,
                "town_id": town_id_attribute,
                "citizen_id": citizen_id_attribute,
                "credits_charged": credits_attribute,
            },
            default_action_type=default_action_type,
            default_user_id=default_user_id,
            default_town_id=default_town_id,
        )
        self.recorded = 0
        """Calls turned into metrics."""
        self.rejected = 0
        """GenAI spans whose attributes made no valid metric."""
        self.duplicates = 0
        """GenAI spans that reported a call another span had reported: not stored again."""
        self.usage_missing = 0
        """Calls recorded without usage data (0 tokens, flagged in their metadata)."""
        self.bad_attribution = 0
        """Attribution values (from attributes or baggage) that could not be read; the call was kept."""
        self._count_lock = threading.Lock()
        self._deduplicator = CallDeduplicator()
        self._open: dict[int, tuple[Attribution, _SpanCredits | None]] = {}
        self._claimed: OrderedDict[tuple[int, int | str], None] = OrderedDict()

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        try:
            self._remember_inherited(span, parent_context)
        except Exception:  # an OpenTelemetry hook must never raise into the application
            logger.exception("action-metrics: reading the attribution of span %r failed", span.name)

    def _remember_inherited(self, span: Any, parent_context: Context | None) -> None:
        """What a GenAI span inherits, read when it starts (a stream may end in another context)."""
        attributes = span.attributes or {}
        if not any(key.startswith("gen_ai.") for key in attributes):
            return
        names = self.mapping.names
        context_entry = current_attribution()
        parent = trace.get_current_span(parent_context)
        parent_context_ids = parent.get_span_context()
        parent_attributes = getattr(parent, "attributes", None) or {}
        from_parent, parent_problems = parse_attribution(parent_attributes, names)
        inherited_by_parent, parent_credits = self._open.get(
            parent_context_ids.span_id, (Attribution(), None)
        )
        from_baggage, baggage_problems = parse_attribution(baggage.get_all(parent_context), names)
        self._report_problems(span.name, (*parent_problems, *baggage_problems))
        inherited = context_entry.over(from_parent).over(inherited_by_parent).over(from_baggage)
        trace_id = span.get_span_context().trace_id
        claim = current_claim()
        credits: _SpanCredits | None
        if claim is not None:
            credits = _SpanCredits(claim, None, 0)
        elif from_parent.credits_charged is not None:
            credits = _SpanCredits(None, (trace_id, parent_context_ids.span_id), from_parent.credits_charged)
        elif parent_credits is not None:
            credits = parent_credits  # a GenAI span inside another: the same call, the same credits
        elif from_baggage.credits_charged is not None:
            credits = _SpanCredits(None, (trace_id, "baggage"), from_baggage.credits_charged)
        else:
            credits = None
        if len(self._open) >= _MAX_OPEN_SPANS:  # spans that never ended: forget the oldest
            self._open.pop(next(iter(self._open)))
        self._open[span.get_span_context().span_id] = (replace(inherited, credits_charged=None), credits)

    def on_end(self, span: ReadableSpan) -> None:
        try:
            self._record(span)
        except InvalidValue as error:
            self._reject(span, error)
        except Exception:  # an OpenTelemetry hook must never raise into the application
            self._reject(span, None)

    def _record(self, span: ReadableSpan) -> None:
        span_id = span.context.span_id if span.context else 0
        inherited, credits = self._open.pop(span_id, (Attribution(), None))
        data = span_data(span, inherited)
        if data is None:
            return
        call = call_from_span_data(data, self.mapping)
        if call is None:
            return
        if not self._deduplicator.first_report(data, call):
            with self._count_lock:
                self.duplicates += 1
            return
        if credits is not None and not data.failed and call.metric.credits_charged == 0:
            taken = self._take(credits)
            if taken:
                call = call_from_span_data(
                    data._replace(inherited=replace(inherited, credits_charged=taken)), self.mapping
                )
                assert call is not None  # the same span, with credits
        self._report_problems(span.name, call.problems)
        if call.usage_missing:
            logger.warning(
                "action-metrics: the %s call of span %r reported no token usage; recorded with 0 tokens "
                "and metadata usage_missing (for an OpenAI stream, pass stream_options="
                '{"include_usage": True})',
                call.metric.model,
                span.name,
            )
        try:
            self.store.emit_nowait(call.metric)
        except StoreClosed:  # counted in the store's `dropped` and logged, never raised
            self.store.writer.drop_closed()
            return
        with self._count_lock:
            self.recorded += 1
            if call.usage_missing:
                self.usage_missing += 1

    def _take(self, credits: _SpanCredits) -> int | None:
        if credits.claim is not None:
            return credits.claim.take()
        with self._count_lock:
            if credits.key in self._claimed:
                return None
            self._claimed[credits.key] = None  # type: ignore[index]
            if len(self._claimed) > _MAX_OPEN_SPANS:
                self._claimed.popitem(last=False)
        return credits.credits

    def _report_problems(self, span_name: str, problems: tuple[str, ...]) -> None:
        if not problems:
            return
        with self._count_lock:
            self.bad_attribution += len(problems)
        for problem in problems:
            logger.warning(
                "action-metrics: span %r: unreadable attribution %s; call recorded without it",
                span_name,
                problem,
            )

    def metric_from_span(self, span: ReadableSpan) -> ActionMetric | None:
        """The metric a finished span stands for (no attribution inherited, no de-duplication); None
        for a span that is not a GenAI call."""
        data = span_data(span, Attribution())
        call = None if data is None else call_from_span_data(data, self.mapping)
        return None if call is None else call.metric

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


def span_data(span: ReadableSpan, inherited: Attribution) -> SpanData | None:
    """The plain data of a finished SDK span, for `genai.call_from_span_data`."""
    start, end = span.start_time, span.end_time
    if start is None or end is None:
        return None
    context = span.context
    return SpanData(
        name=span.name,
        attributes=span.attributes or {},
        start_ns=start,
        end_ns=end,
        failed=span.status.status_code is StatusCode.ERROR,
        status_description=span.status.description,
        trace_id=context.trace_id if context else 0,
        span_id=context.span_id if context else 0,
        parent_span_id=span.parent.span_id if span.parent else None,
        resource_attributes=span.resource.attributes if span.resource else {},
        inherited=inherited,
    )


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
