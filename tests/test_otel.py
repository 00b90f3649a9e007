"""OpenTelemetry out (setup_otel_tracing) and in (GenAI spans of any instrumentation become metrics)."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import logging
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from action_metrics import ACTION_CREDITS, ActionMetricsSpanProcessor, MetricsStore

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_python(*snippets: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter: the global tracer provider can be set only once per process."""
    script = "\n".join(textwrap.dedent(snippet) for snippet in snippets)
    return subprocess.run(
        [sys.executable, "-c", script],
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


DECORATED_CALL = """
    from action_metrics import MetricsStore, instrument_action
    store = MetricsStore("sqlite:///:memory:")

    @instrument_action("lod3", model="haiku", store=store)
    def lookup(user_id, town_id):
        return {"tokens_in": 120, "tokens_out": 30}

    lookup("user-1", "town-1")
"""


# --- out -------------------------------------------------------------------------------------


def test_setup_prints_spans_to_the_console_by_default() -> None:
    result = run_python(
        """
        from action_metrics import setup_otel_tracing
        setup_otel_tracing(service_name="town-api")
        """,
        DECORATED_CALL,
    )
    assert result.returncode == 0, result.stderr
    span = json.loads(result.stdout)
    assert span["name"] == "lod3"
    assert span["resource"]["attributes"]["service.name"] == "town-api"
    assert span["attributes"]["gen_ai.request.model"] == "haiku"
    assert span["attributes"]["gen_ai.usage.input_tokens"] == 120
    assert span["attributes"]["gen_ai.usage.output_tokens"] == 30
    assert span["attributes"]["action.credits"] == ACTION_CREDITS["lod3"]


def test_setup_exports_to_the_exporter_given_and_never_replaces_the_hosts_provider() -> None:
    result = run_python(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from action_metrics import setup_otel_tracing

        ours = InMemorySpanExporter()
        provider = setup_otel_tracing(ours)
        provider.force_flush()
        assert trace.get_tracer_provider() is provider

        second = InMemorySpanExporter()
        assert setup_otel_tracing(second) is provider   # already set: left alone
        """,
        DECORATED_CALL,
        """
provider.force_flush()
print(len(ours.get_finished_spans()), len(second.get_finished_spans()))
""",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "0"]
    assert "already set" in result.stderr


def test_a_host_provider_set_first_is_kept_and_receives_our_spans() -> None:
    result = run_python(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from action_metrics import setup_otel_tracing

        host = TracerProvider()
        hosts_exporter = InMemorySpanExporter()
        host.add_span_processor(SimpleSpanProcessor(hosts_exporter))
        trace.set_tracer_provider(host)
        assert setup_otel_tracing() is host
        """,
        DECORATED_CALL,
        """
[span] = hosts_exporter.get_finished_spans()
print(span.attributes["gen_ai.usage.input_tokens"])
""",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "120"
    assert result.stdout.count("{") == 0  # nothing went to a console exporter


class _Collector(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def otlp_collector() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    received: ClassVar[list[tuple[str, bytes]]] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", received
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_otlp_is_used_when_the_standard_environment_variables_name_a_collector(otlp_collector) -> None:
    endpoint, received = otlp_collector
    result = run_python(
        """
        from action_metrics import setup_otel_tracing
        provider = setup_otel_tracing()
        """,
        DECORATED_CALL,
        "provider.shutdown()",
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
    )
    assert result.returncode == 0, result.stderr
    assert [path for path, _ in received] == ["/v1/traces"]
    body = received[0][1]
    assert b"gen_ai.usage.input_tokens" in body
    assert b"action-metrics" in body  # the service name


# --- in --------------------------------------------------------------------------------------


@pytest.fixture
def store(database_url: str) -> Iterator[MetricsStore]:
    with MetricsStore(database_url) as store:
        yield store


@pytest.fixture
def app(store: MetricsStore) -> tuple[TracerProvider, ActionMetricsSpanProcessor, InMemorySpanExporter]:
    """An application's own tracer provider, instrumented with the GenAI conventions."""
    provider = TracerProvider()
    processor = ActionMetricsSpanProcessor(
        store, user_id_attribute="user.id", town_id_attribute="app.tenant", default_action_type="chat"
    )
    provider.add_span_processor(processor)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, processor, exporter


def test_a_genai_span_becomes_a_stored_metric(store: MetricsStore, app) -> None:
    provider, processor, exporter = app
    tracer = provider.get_tracer("openllmetry-like")
    with tracer.start_as_current_span("chat gpt-4o-mini") as span:
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "gpt-4o",
                "gen_ai.response.model": "openai/gpt-4o-mini",
                "gen_ai.usage.input_tokens": 812,
                "gen_ai.usage.output_tokens": 64,
                "user.id": "user-7",
                "app.tenant": "acme",
                "action.credits": 4,
            }
        )
    processor.force_flush()
    [metric] = store.query()
    [finished] = exporter.get_finished_spans()
    assert finished.start_time is not None
    assert finished.end_time is not None
    assert (metric.action_type, metric.user_id, metric.town_id) == ("chat", "user-7", "acme")
    assert (metric.model, metric.tokens_in, metric.tokens_out) == ("openai/gpt-4o-mini", 812, 64)
    assert metric.credits_charged == 4
    assert metric.latency_ms == (finished.end_time - finished.start_time) / 1e6
    assert metric.timestamp == datetime.fromtimestamp(finished.start_time / 1e9, UTC)
    assert metric.metadata["trace_id"] == f"{finished.context.trace_id:032x}"
    assert processor.recorded == 1


@pytest.mark.parametrize("cache_write_name", ["cache_write", "cache_creation"])
def test_a_genai_spans_token_kinds_are_stored(store: MetricsStore, app, cache_write_name: str) -> None:
    provider, processor, _ = app
    with provider.get_tracer("genai").start_as_current_span("chat claude") as span:
        span.set_attributes(
            {
                "gen_ai.request.model": "claude-sonnet-4-5",
                "gen_ai.usage.input_tokens": 2_000,  # inclusive, as the conventions define them
                "gen_ai.usage.output_tokens": 300,
                "gen_ai.usage.cache_read.input_tokens": 1_500,
                f"gen_ai.usage.{cache_write_name}.input_tokens": 400,
                "gen_ai.usage.reasoning.output_tokens": 120,
            }
        )
    processor.force_flush()
    [metric] = store.query()
    assert (metric.cache_read_tokens, metric.cache_write_tokens, metric.reasoning_tokens) == (1_500, 400, 120)
    assert (metric.tokens_in, metric.tokens_out) == (2_000, 300)


def test_spans_without_genai_attributes_are_ignored(store: MetricsStore, app) -> None:
    provider, processor, _ = app
    tracer = provider.get_tracer("web")
    with tracer.start_as_current_span("GET /town") as span:
        span.set_attribute("http.route", "/town")
    processor.force_flush()
    assert store.query() == []
    assert (processor.recorded, processor.rejected) == (0, 0)


def test_a_failed_genai_call_charges_nothing(store: MetricsStore, app) -> None:
    provider, processor, _ = app
    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("chat", record_exception=False, set_status_on_exception=False) as span:
        span.set_attributes(
            {"gen_ai.request.model": "haiku", "error.type": "RateLimitError", "action.credits": 9}
        )
        span.set_status(Status(StatusCode.ERROR, "429"))
    processor.force_flush()
    [metric] = store.query()
    assert (metric.credits_charged, metric.error, metric.metadata["error"]) == (
        0,
        "RateLimitError",
        "RateLimitError",
    )
    assert (metric.user_id, metric.town_id, metric.tokens_in) == ("anonymous", "unknown", 0)


def test_an_exception_in_a_genai_span_is_stored_by_its_type_name_never_its_message(
    store: MetricsStore, app
) -> None:
    """The SDK sets the status description to "<type>: <message>" for an exception raised in a span,
    and instrumentations often set no `error.type`: the message may hold what a customer typed."""
    provider, processor, _ = app
    tracer = provider.get_tracer("app")
    with contextlib.suppress(ValueError), tracer.start_as_current_span("chat") as span:
        span.set_attributes({"gen_ai.request.model": "haiku", "action.credits": 9})
        raise ValueError("customer email bob@example.com not found")
    processor.force_flush()
    [metric] = store.query()
    assert (metric.error, metric.metadata["error"], metric.credits_charged) == ("ValueError", "ValueError", 0)
    assert "bob@example.com" not in repr(metric.to_dict())


def test_a_span_that_makes_no_valid_metric_is_counted_never_raised(
    store: MetricsStore, app, caplog: pytest.LogCaptureFixture
) -> None:
    provider, processor, _ = app
    tracer = provider.get_tracer("app")
    with caplog.at_level(logging.WARNING, logger="action_metrics"):
        with tracer.start_as_current_span("chat") as span:
            span.set_attributes({"gen_ai.request.model": "haiku", "gen_ai.usage.input_tokens": -3})
        with tracer.start_as_current_span("chat") as span:
            span.set_attributes({"gen_ai.request.model": "haiku", "gen_ai.usage.input_tokens": 3})
    processor.force_flush()
    assert processor.rejected == 1
    assert "tokens_in" in caplog.text
    assert [m.tokens_in for m in store.query()] == [3]


def test_a_span_ending_after_the_store_closed_is_counted_never_raised(
    store: MetricsStore, app, caplog: pytest.LogCaptureFixture
) -> None:
    provider, processor, _ = app
    store.close()
    with (
        caplog.at_level(logging.WARNING, logger="action_metrics"),
        provider.get_tracer("genai").start_as_current_span("chat") as span,
    ):
        span.set_attributes({"gen_ai.request.model": "haiku", "gen_ai.usage.input_tokens": 3})
    assert store.dropped == 1
    assert (processor.recorded, processor.rejected) == (0, 0)
    assert "the writer is closed, dropping metrics" in caplog.text


def test_spans_of_our_own_decorator_are_not_stored_twice(store: MetricsStore, app) -> None:
    provider, processor, _ = app
    tracer = provider.get_tracer("action_metrics")
    from action_metrics import ActionMetric

    decorated = ActionMetric("lod3", "u", "t", None, 1, 2, "haiku", 1.0, 10)
    with tracer.start_as_current_span("lod3") as span:
        span.set_attributes(decorated.to_otel_span())
    processor.force_flush()
    assert store.query() == []


# --- the mapping, on plain span data (what an OTLP receiver has) -----------------------------


def test_the_mapping_reads_plain_span_data_and_names_a_call_by_its_response_id() -> None:
    from action_metrics.genai import CallDeduplicator, SpanData, call_from_span_data, metric_id_for_response

    attributes = {
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-haiku-4-5",
        "gen_ai.response.id": "msg_01",
        # Anthropic's exclusive input count, as an instrumentation may pass it on: 30 + 50 + 20 read in.
        "gen_ai.usage.input_tokens": 30,
        "gen_ai.usage.cache_read.input_tokens": 50,
        "gen_ai.usage.cache_creation.input_tokens": 20,
        "gen_ai.usage.output_tokens": 9,
        "action.credits": "7",
        "action.user_id": 42,
    }
    native = SpanData("anthropic.messages.create", attributes, 1_000_000, 3_000_000, failed=False, trace_id=1)
    openllmetry = SpanData("anthropic.chat", attributes, 500_000, 3_500_000, failed=False, trace_id=2)
    first, second = call_from_span_data(native), call_from_span_data(openllmetry)
    assert first is not None
    assert second is not None
    assert first.metric.id == second.metric.id == metric_id_for_response("msg_01")
    assert (first.metric.tokens_in, first.metric.cache_write_tokens, first.metric.latency_ms) == (
        100,
        20,
        2.0,
    )
    assert (first.metric.credits_charged, first.metric.user_id) == (7, "42")
    deduplicator = CallDeduplicator()
    assert deduplicator.first_report(native, first)
    assert not deduplicator.first_report(openllmetry, second)


def test_two_unnamed_root_spans_one_within_the_other_are_one_call_unless_made_for_two_users() -> None:
    """Spans without a response id (a failed call has none) of one model, one enclosing the other in
    time, are one call reported twice; not when they name different users, towns or citizens, as a
    Collector's request holding two services' concurrent calls does."""
    from action_metrics.genai import CallDeduplicator, SpanData, call_from_span_data

    def report(trace_id: int, start: int, end: int, **attribution: str) -> tuple[SpanData, Any]:
        attributes = {"gen_ai.request.model": "haiku", "gen_ai.usage.input_tokens": 1111}
        attributes.update({f"action.{name}": value for name, value in attribution.items()})
        data = SpanData("chat haiku", attributes, start, end, failed=True, trace_id=trace_id)
        call = call_from_span_data(data)
        assert call is not None
        return data, call

    for first, second, one_call in [
        ({"user_id": "carol"}, {"user_id": "carol"}, True),
        ({"user_id": "carol"}, {}, True),  # one instrumentation did not pass the user on
        ({"user_id": "carol"}, {"user_id": "dave"}, False),
        ({"user_id": "carol", "town_id": "a"}, {"user_id": "carol", "town_id": "b"}, False),
        ({"citizen_id": "x"}, {"citizen_id": "y"}, False),
    ]:
        deduplicator = CallDeduplicator()
        assert deduplicator.first_report(*report(1, 1_000, 9_000, **first))
        assert deduplicator.first_report(*report(2, 2_000, 8_000, **second)) is not one_call, (first, second)


def test_a_bad_attribution_value_is_reported_by_name_and_the_call_kept() -> None:
    from action_metrics.genai import SpanData, call_from_span_data

    attributes = {"gen_ai.request.model": "haiku", "action.credits": "ten"}
    call = call_from_span_data(SpanData("chat", attributes, 0, 1_000, failed=False))
    assert call is not None
    assert call.metric.credits_charged == 0
    assert call.usage_missing
    assert call.metric.metadata["usage_missing"] is True
    assert len(call.problems) == 1
    assert call.problems[0].startswith("action.credits")


RESPONSE_NAMESPACE = uuid.UUID("6f1c1a52-3d0e-5b8f-9a51-2f0b7c1e4d93")
"""Pinned: a metric id stored by an earlier version must be the id a retry of its call gets now."""


@settings(max_examples=300, deadline=None)
@given(
    response_id=st.text(max_size=80),
    trace_id=st.integers(0, 2**128 - 1),
    span_id=st.integers(0, 2**64 - 1),
)
def test_a_calls_metric_id_is_the_uuid5_of_its_response_or_its_span(
    response_id: str, trace_id: int, span_id: int
) -> None:
    from action_metrics.genai import metric_id_for_response, metric_id_for_span

    by_response = uuid.uuid5(RESPONSE_NAMESPACE, response_id)
    assert metric_id_for_response(response_id) == by_response
    assert str(metric_id_for_response(response_id)) == str(by_response)
    assert metric_id_for_response(response_id).version == 5
    by_span = uuid.uuid5(RESPONSE_NAMESPACE, f"span:{trace_id:032x}{span_id:016x}")
    assert metric_id_for_span(trace_id, span_id) == by_span


def test_inheriting_fills_each_field_left_unsaid_and_keeps_each_said() -> None:
    from action_metrics.context import Attribution

    names = [field.name for field in dataclasses.fields(Attribution)]
    full = Attribution(**{name: 1 if name == "credits_charged" else f"outer-{name}" for name in names})
    for name in names:
        own = Attribution(**{name: 2 if name == "credits_charged" else f"own-{name}"})
        merged = own.over(full)
        assert not own.empty
        assert getattr(merged, name) == getattr(own, name)
        assert all(getattr(merged, other) == getattr(full, other) for other in names if other != name)
        assert own.over(Attribution()) == own
        assert Attribution().over(own) == own
    assert Attribution().empty
