"""OTLP bodies as the OpenTelemetry SDK's own exporters encode them read back as the spans they were."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.json.common.trace_encoder import encode_spans as encode_json
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as encode_protobuf
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ResourceMessage
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.proto.trace.v1.trace_pb2 import Status as StatusMessage
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from action_metrics import ActionMetric
from action_metrics.charges import CreditClaim, InheritedCredits, RememberedClaims
from action_metrics.otlp import (
    JSON,
    PROTOBUF,
    STATUS_ERROR,
    OtlpDecodeError,
    OtlpSpan,
    SpanReceiver,
    _JsonReader,
    ancestors,
    decode_json_by_protobuf,
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
        assert got.trace_id == sent.context.trace_id
        assert got.span_id == sent.context.span_id
        assert got.parent_span_id == (sent.parent.span_id if sent.parent else None)
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
    def span(span_id: int, parent: int) -> OtlpSpan:
        return OtlpSpan(7, span_id, parent, str(span_id), 0, 0, {}, 0, "", {}, "")

    first, second = span(1, 2), span(2, 1)
    batch = {first.identity: first, second.identity: second}
    assert [parent.span_id for parent in ancestors(first, batch)] == [2]


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


TRACE_IDS = st.sampled_from([0, 0xAB << 120]) | st.integers(min_value=0, max_value=2**128 - 1)
SPAN_IDS = st.sampled_from([0, 0x01 << 56, 0x02 << 56, 2**64 - 1])


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
    trace_ids: tuple[int, int],
    span_ids: tuple[int, int, int | None, int | None],
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
    """A broken exporter's spans with an empty trace id: the action's credits are claimed for its
    first call, and go to whichever call holds the claim, in this request or a later one."""
    action = OtlpSpan(0, 1, None, "lod4", 0, 9, {"action.credits": 10}, 0, "", {}, "")
    usage = {"gen_ai.request.model": "haiku", "gen_ai.usage.input_tokens": 5, "gen_ai.usage.output_tokens": 2}
    first = OtlpSpan(0, 2, 1, "chat", 1, 4, usage, 0, "", {}, "")
    second = OtlpSpan(0, 3, 1, "chat", 5, 8, usage, 0, "", {}, "")
    receiver = SpanReceiver()
    batch = receiver.read([action, first, second])
    assert [(index, metric.credits_charged) for index, metric in batch.accepted] == [(1, 0), (2, 0)]
    metrics = [metric for _, metric in batch.accepted]
    credits = InheritedCredits(batch.credits)
    [claim] = credits.claims(metrics)
    assert (claim.identity, claim.metric_id) == ((0, 1), metrics[0].id)
    holders = {claim.identity: claim.metric_id}
    assert [metric.credits_charged for metric in credits.settled(metrics, holders)] == [10, 0]
    later = receiver.read([action, second])  # the first call's claim is held: nothing for the second
    [(_, alone)] = later.accepted
    later_credits = InheritedCredits(later.credits)
    assert [claim.metric_id for claim in later_credits.claims([alone])] == [alone.id]
    assert [metric.credits_charged for metric in later_credits.settled([alone], holders)] == [0]


def test_claims_remembered_in_memory_are_first_come_and_the_newest_kept() -> None:
    """ClickHouse's claims (`RememberedClaims`): as the SQL stores', within one process, bounded."""
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    at = datetime(2026, 1, 1, tzinfo=UTC)
    claims = RememberedClaims(limit=2)
    both = [CreditClaim(1, 2, first, at), CreditClaim(1, 2, second, at)]
    assert claims.claim(both) == {(1, 2): first}
    assert claims.claim([CreditClaim(1, 2, second, at)]) == {(1, 2): first}
    assert claims.claim([CreditClaim(3, 4, third, at), CreditClaim(5, 6, third, at)]) == {
        (3, 4): third,
        (5, 6): third,
    }
    assert claims.claim([CreditClaim(1, 2, second, at)]) == {(1, 2): second}  # the oldest forgotten


# --- the decoders against protobuf's own reading of the same bodies --------------------------------


def _comparable(spans: list[OtlpSpan]) -> list[Any]:
    """Spans as plain values, NaN made equal to itself."""

    def plain(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return "NaN"
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, tuple | list):
            return [plain(item) for item in value]
        return value

    return [plain(tuple(span)) for span in spans]


def _reference_value(value: AnyValue) -> Any:
    """An AnyValue as the SDK's attributes hold it, read through protobuf's own message classes."""
    kind = value.WhichOneof("value")
    if kind in {"string_value", "bool_value", "int_value", "double_value"}:
        return getattr(value, kind)
    if kind == "array_value":
        items = [_reference_value(item) for item in value.array_value.values]
        scalars = tuple(item for item in items if item is not None and not isinstance(item, tuple))
        return scalars if len(scalars) == len(items) else None
    return None


def _reference_attributes(pairs: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    for pair in pairs:
        value = _reference_value(pair.value)
        if value is not None:
            attributes[pair.key] = value
    return attributes


def _reference_decode(body: bytes) -> list[OtlpSpan]:
    """What `decode_request` must read: the request parsed by `ExportTraceServiceRequest` itself."""
    request = ExportTraceServiceRequest.FromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = _reference_attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    OtlpSpan(
                        int.from_bytes(span.trace_id),
                        int.from_bytes(span.span_id),
                        int.from_bytes(span.parent_span_id) if span.parent_span_id else None,
                        span.name,
                        span.start_time_unix_nano,
                        span.end_time_unix_nano,
                        _reference_attributes(span.attributes),
                        span.status.code,
                        span.status.message,
                        resource,
                        scope_spans.scope.name,
                        tuple(_reference_attributes(event.attributes) for event in span.events),
                    )
                )
    return spans


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    length, header = len(payload), bytearray([number << 3 | 2])
    while length >= 0x80:
        header.append(length & 0x7F | 0x80)
        length >>= 7
    header.append(length)
    return bytes(header) + payload


SCALAR_VALUES = st.one_of(
    st.builds(AnyValue, string_value=st.text(max_size=140)),
    st.builds(AnyValue, bool_value=st.booleans()),
    st.builds(AnyValue, int_value=st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    st.builds(AnyValue, double_value=st.floats()),
    st.builds(AnyValue, bytes_value=st.binary(max_size=4)),
    st.just(AnyValue()),
)
ANY_VALUES = st.recursive(
    SCALAR_VALUES,
    lambda children: st.one_of(
        st.builds(
            lambda items: AnyValue(array_value=ArrayValue(values=items)), st.lists(children, max_size=3)
        ),
        st.builds(
            lambda items: AnyValue(kvlist_value=KeyValueList(values=items)),
            st.lists(st.builds(KeyValue, key=st.text(max_size=3), value=children), max_size=2),
        ),
    ),
    max_leaves=6,
)
KEYS = st.sampled_from(["gen_ai.request.model", "gen_ai.usage.input_tokens", "action.type", "k"]) | st.text(
    max_size=5
)
KEY_VALUES = st.lists(st.builds(KeyValue, key=KEYS, value=ANY_VALUES), max_size=6)
RAW_VALUES = (
    st.binary(max_size=12)  # anything: protobuf and the decoder refuse it alike or read it alike
    | st.binary(max_size=20).map(lambda text: bytes([0x0A, len(text)]) + text)  # a string, UTF-8 or not
    | st.binary(min_size=1, max_size=10).map(lambda varint: b"\x18" + varint)  # an int, well ended or not
)


@st.composite
def otlp_requests(draw: st.DrawFn) -> ExportTraceServiceRequest:
    ids = st.sampled_from([b"", bytes(8), b"\x01" * 8, b"\x02" * 16]) | st.binary(max_size=17)
    spans = [
        Span(
            trace_id=draw(ids),
            span_id=draw(ids),
            parent_span_id=draw(ids),
            name=draw(st.text(max_size=8)),
            kind=draw(st.integers(min_value=0, max_value=5)),
            start_time_unix_nano=draw(st.integers(min_value=0, max_value=2**64 - 1)),
            end_time_unix_nano=draw(st.integers(min_value=0, max_value=2**64 - 1)),
            attributes=draw(KEY_VALUES),
            events=[
                Span.Event(name="e", attributes=draw(KEY_VALUES)) for _ in range(draw(st.integers(0, 2)))
            ],
            status=StatusMessage(
                code=draw(st.integers(min_value=0, max_value=2)), message=draw(st.text(max_size=4))
            ),
        )
        for _ in range(draw(st.integers(min_value=0, max_value=3)))
    ]
    scope = InstrumentationScope(name=draw(st.text(max_size=5)))
    resource = ResourceMessage(attributes=draw(KEY_VALUES))
    return ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(scope=scope, spans=spans)])]
    )


@settings(max_examples=400, deadline=None)
@given(request=otlp_requests())
def test_protobuf_bodies_read_as_the_protocols_own_messages_read_them(
    request: ExportTraceServiceRequest,
) -> None:
    body = request.SerializeToString()
    assert _comparable(decode_request(body, PROTOBUF)) == _comparable(_reference_decode(body))


KEY_VALUE_BYTES = st.one_of(
    st.tuples(KEYS.map(str.encode) | st.binary(max_size=6), RAW_VALUES).map(
        lambda pair: _field(1, pair[0]) + _field(2, pair[1])  # a key (UTF-8 or not), a value of any bytes
    ),
    st.tuples(KEYS, RAW_VALUES).map(lambda pair: _field(2, pair[1]) + _field(1, pair[0].encode())),
    st.binary(max_size=16),  # anything at all
)


@settings(max_examples=600, deadline=None)
@given(pairs=st.lists(KEY_VALUE_BYTES, max_size=4), name=st.binary(max_size=6))
def test_attribute_bytes_of_any_kind_read_as_protobuf_reads_them(pairs: list[bytes], name: bytes) -> None:
    """Attributes as raw bytes (keys and strings that are not UTF-8, varints cut short, fields out
    of order, garbage), and a span name that may not be UTF-8 either: read alike, or refused alike."""
    span = _field(5, name) + b"".join(_field(9, pair) for pair in pairs)
    body = _field(1, _field(2, _field(2, span)))
    _assert_read_alike(body, PROTOBUF, _reference_decode, DecodeError)


def _assert_read_alike(
    body: bytes, encoding: str, reference: Callable[[bytes], Any], refused: type[Exception]
) -> None:
    """`decode_request` reads `body` as `reference` reads it, or refuses it where `reference` raises
    `refused`."""
    try:
        expected = _comparable(reference(body))
    except refused:
        with pytest.raises(OtlpDecodeError):
            decode_request(body, encoding)
        return
    assert _comparable(decode_request(body, encoding)) == expected


def _otlp_json(request: ExportTraceServiceRequest) -> bytes:
    """OTLP JSON as the exporters write it: protobuf's JSON mapping, enums as numbers, ids in hex."""
    document = json_format.MessageToDict(request, use_integers_for_enums=True)
    for resource_spans in document.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for name in ("traceId", "spanId", "parentSpanId"):
                    if name in span:
                        span[name] = base64.b64decode(span[name]).hex()
    return json.dumps(document).encode()


@settings(max_examples=400, deadline=None)
@given(request=otlp_requests())
def test_json_bodies_read_as_the_same_spans_in_protobuf(request: ExportTraceServiceRequest) -> None:
    """The same request in both encodings reads as the same spans; the direct JSON reading equals
    protobuf's own JSON mapping (`decode_json_by_protobuf`)."""
    body = _otlp_json(request)
    from_protobuf = _comparable(decode_request(request.SerializeToString(), PROTOBUF))
    assert _comparable(decode_request(body, JSON)) == from_protobuf
    assert _comparable(decode_json_by_protobuf(body)) == from_protobuf


def test_the_exporters_json_is_read_directly(finished_spans: list[ReadableSpan]) -> None:
    """The SDK's own JSON exporter's body is in the form read without `json_format`."""
    body = _json(finished_spans)
    assert _comparable(_JsonReader().spans(orjson.loads(body))) == _comparable(decode_json_by_protobuf(body))


JSON_FIELD_NAMES = st.sampled_from(
    [
        "resourceSpans", "scopeSpans", "spans", "resource", "scope", "attributes", "key", "value",
        "stringValue", "intValue", "boolValue", "doubleValue", "arrayValue", "kvlistValue", "values",
        "traceId", "spanId", "parentSpanId", "name", "startTimeUnixNano", "endTimeUnixNano", "status",
        "code", "message", "events", "kind", "flags", "links", "trace_id", "droppedAttributesCount",
    ]
)  # fmt: skip
NEAR_OTLP_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**65), max_value=2**65)
    | st.floats()
    | st.sampled_from(
        ["", "0", "-1", "2", "ab" * 8, "zz", "18446744073709551616", "STATUS_CODE_ERROR", "NaN"]
    ),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(JSON_FIELD_NAMES, children, max_size=4),
    max_leaves=25,
)


@settings(max_examples=1000, deadline=None)
@given(document=NEAR_OTLP_JSON)
def test_any_json_body_reads_as_protobufs_json_mapping_reads_it(document: Any) -> None:
    """Documents near OTLP's form, with values of every JSON type where each field is: the direct
    reading gives what `json_format` gives, or hands the body to it."""
    body = json.dumps(document).encode()
    _assert_read_alike(body, JSON, decode_json_by_protobuf, OtlpDecodeError)
