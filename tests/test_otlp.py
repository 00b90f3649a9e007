"""OTLP bodies as the OpenTelemetry SDK's own exporters encode them read back as the spans they were."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.json.common.trace_encoder import encode_spans as encode_json
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as encode_protobuf
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from action_metrics import ActionMetric
from action_metrics.otlp import (
    JSON,
    PROTOBUF,
    STATUS_ERROR,
    OtlpDecodeError,
    OtlpSpan,
    SpanReceiver,
    ancestors,
    decode_request,
    encode_response,
)


def _protobuf(spans: list[ReadableSpan]) -> bytes:
    return encode_protobuf(spans).SerializeToString()


def _json(spans: list[ReadableSpan]) -> bytes:
    return encode_json(spans).to_json().encode()


ENCODINGS: dict[str, tuple[str, Callable[[list[ReadableSpan]], bytes]]] = {
    "protobuf": (PROTOBUF, _protobuf),
    "json": (JSON, _json),
}


@pytest.fixture
def finished_spans() -> Iterator[list[ReadableSpan]]:
    """A chat span with every kind of attribute inside an action span, one of them failed."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "town-api", "deployment": 3}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("town.llm")
    action = {"action.type": "lod4", "action.credits": 10}
    with (
        tracer.start_as_current_span("lod4", attributes=action),
        tracer.start_as_current_span("chat claude-sonnet-4-5") as chat,
    ):
        chat.set_attributes(
            {
                "gen_ai.request.model": "claude-sonnet-4-5",
                "gen_ai.usage.input_tokens": 1200,
                "gen_ai.usage.output_tokens": 80,
                "gen_ai.response.finish_reasons": ("stop",),
                "action.cached": True,
                "server.latency_s": 1.25,
            }
        )
        chat.add_event("exception", {"exception.type": "RateLimitError"})
        chat.set_status(Status(StatusCode.ERROR, "rate limited"))
    yield list(exporter.get_finished_spans())
    provider.shutdown()


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_request_reads_back_as_the_spans_sent(finished_spans: list[ReadableSpan], encoding: str) -> None:
    content_type, encode = ENCODINGS[encoding]
    decoded = decode_request(encode(finished_spans), f"{content_type}; charset=utf-8")

    assert len(decoded) == len(finished_spans)
    by_name = {span.name: span for span in decoded}
    for sent in finished_spans:
        got = by_name[sent.name]
        assert got.trace_id == f"{sent.context.trace_id:032x}"
        assert got.span_id == f"{sent.context.span_id:016x}"
        assert got.parent_span_id == (f"{sent.parent.span_id:016x}" if sent.parent else None)
        assert (got.start_ns, got.end_ns) == (sent.start_time, sent.end_time)
        assert dict(got.attributes) == dict(sent.attributes or {})
        assert got.resource["service.name"] == "town-api"
        assert got.resource["deployment"] == 3
        assert got.scope == "town.llm"
    chat = by_name["chat claude-sonnet-4-5"]
    assert (chat.status_code, chat.status_message) == (STATUS_ERROR, "rate limited")
    assert chat.event_attributes == ({"exception.type": "RateLimitError"},)
    assert [parent.name for parent in ancestors(chat, {span.identity: span for span in decoded})] == ["lod4"]


@pytest.mark.parametrize(
    ("body", "content_type", "fragment"),
    [
        (b"\xff\xff\xff", PROTOBUF, "not a protobuf"),
        (b"{not json", JSON, "not an OTLP JSON"),
        (b"[]", JSON, "not a JSON object"),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}', JSON, "traceId 'zz'"),
        (b'{"resourceSpans": "many"}', JSON, "not an OTLP JSON"),
    ],
)
def test_a_body_that_does_not_decode_says_why(body: bytes, content_type: str, fragment: str) -> None:
    with pytest.raises(OtlpDecodeError, match=fragment):
        decode_request(body, content_type)


def test_only_the_two_otlp_encodings_are_read() -> None:
    with pytest.raises(
        ValueError, match=r"text/plain is not one of application/x-protobuf, application/json"
    ):
        decode_request(b"", "text/plain")


def test_unknown_json_fields_are_ignored_as_the_specification_asks() -> None:
    body = {"resourceSpans": [{"future": 1, "scopeSpans": [{"spans": [{"name": "s", "newField": {}}]}]}]}
    (span,) = decode_request(json.dumps(body).encode(), JSON)
    assert span.name == "s"
    assert span.parent_span_id is None


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_the_answer_is_otlps_partial_success_in_the_requests_encoding(encoding: str) -> None:
    content_type, _ = ENCODINGS[encoding]
    response = ExportTraceServiceResponse()
    body = encode_response(content_type, rejected=2, message="spans[3]: tokens_in: must be >= 0")
    if content_type == PROTOBUF:
        response.ParseFromString(body)
    else:
        json_format.Parse(body, response)
    assert response.partial_success.rejected_spans == 2
    assert response.partial_success.error_message == "spans[3]: tokens_in: must be >= 0"
    assert not ExportTraceServiceResponse.FromString(encode_response(PROTOBUF)).HasField("partial_success")


def test_a_cycle_of_parents_ends_the_walk() -> None:
    def span(span_id: str, parent: str) -> OtlpSpan:
        return OtlpSpan("t", span_id, parent, span_id, 0, 0, {}, 0, "", {}, "")

    first, second = span("a", "b"), span("b", "a")
    batch = {first.identity: first, second.identity: second}
    assert [parent.span_id for parent in ancestors(first, batch)] == ["b"]


# --- fuzzing: whatever arrives, the decoder and the receiver answer or refuse, never crash -------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
ATTRIBUTE_VALUES = (
    st.text(max_size=12)
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.lists(st.integers(min_value=-5, max_value=5), max_size=3).map(tuple)
)
GENAI_KEYS = (
    "gen_ai.request.model",
    "gen_ai.response.model",
    "gen_ai.response.id",
    "gen_ai.system",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_write.input_tokens",
    "gen_ai.usage.reasoning.output_tokens",
    "error.type",
    "action.type",
    "action.user_id",
    "action.town_id",
    "action.citizen_id",
    "action.credits",
    "action.id",
)
NANOSECONDS = st.integers(min_value=0, max_value=2**64 - 1)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300))
def test_random_protobuf_bodies_decode_or_are_refused(body: bytes) -> None:
    with contextlib.suppress(OtlpDecodeError):
        SpanReceiver().read(decode_request(body, PROTOBUF))


@settings(max_examples=300, deadline=None)
@given(document=JSON_VALUES)
def test_random_json_bodies_decode_or_are_refused(document: Any) -> None:
    with contextlib.suppress(OtlpDecodeError):
        SpanReceiver().read(decode_request(json.dumps(document).encode(), JSON))


TRACE_IDS = st.sampled_from(["", "ab" * 16]) | st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
SPAN_IDS = st.sampled_from(["", "01" * 8, "02" * 8, "ff" * 8])


@settings(max_examples=500, deadline=None)
@given(
    attributes=st.dictionaries(st.sampled_from(GENAI_KEYS), ATTRIBUTE_VALUES, min_size=1),
    parent_attributes=st.dictionaries(st.sampled_from(GENAI_KEYS), ATTRIBUTE_VALUES),
    start=NANOSECONDS,
    end=NANOSECONDS,
    status=st.integers(min_value=0, max_value=2),
    trace_ids=st.tuples(TRACE_IDS, TRACE_IDS),
    span_ids=st.tuples(SPAN_IDS, SPAN_IDS, st.none() | SPAN_IDS, st.none() | SPAN_IDS),
)
def test_any_span_makes_a_metric_or_a_rejection_naming_the_field(
    attributes: dict[str, Any],
    parent_attributes: dict[str, Any],
    start: int,
    end: int,
    status: int,
    trace_ids: tuple[str, str],
    span_ids: tuple[str, str, str | None, str | None],
) -> None:
    """Any attributes, times and status, and any trace and span ids: empty, shared by both spans,
    a parent that is missing, the span's own id, or each other's (a cycle)."""
    parent_id, span_id, parents_parent, spans_parent = span_ids
    parent = OtlpSpan(
        trace_ids[0], parent_id, parents_parent, "action", start, end, parent_attributes, 0, "", {}, ""
    )
    span = OtlpSpan(trace_ids[1], span_id, spans_parent, "chat", start, end, attributes, status, "", {}, "")
    batch = SpanReceiver().read([span, parent])
    assert len(batch.accepted) + len(batch.rejected) + batch.ignored + batch.duplicates == 2
    for _, why in batch.rejected:
        assert why.split(":")[0] in {field.name for field in dataclasses.fields(ActionMetric)} | {"timestamp"}


def test_an_ancestor_without_a_trace_id_still_charges_its_credits_once() -> None:
    """A broken exporter's spans with an empty trace id: the action's credits go to its first call."""
    action = OtlpSpan("", "01" * 8, None, "lod4", 0, 9, {"action.credits": 10}, 0, "", {}, "")
    usage = {"gen_ai.request.model": "haiku", "gen_ai.usage.input_tokens": 5, "gen_ai.usage.output_tokens": 2}
    first = OtlpSpan("", "02" * 8, "01" * 8, "chat", 1, 4, usage, 0, "", {}, "")
    second = OtlpSpan("", "03" * 8, "01" * 8, "chat", 5, 8, usage, 0, "", {}, "")
    receiver = SpanReceiver()
    batch = receiver.read([action, first, second])
    assert [(index, metric.credits_charged) for index, metric in batch.accepted] == [(1, 10), (2, 0)]
    receiver.committed(batch)
    assert [metric.credits_charged for _, metric in receiver.read([action, second]).accepted] == [0]
