"""OTLP/HTTP traces in: an `ExportTraceServiceRequest` body, protobuf or JSON, as plain spans, and
their GenAI spans as metrics by the span processor's own mapping.

The OpenTelemetry protocol's own message definitions (`opentelemetry-proto`) decode both encodings,
so a span from any SDK's exporter or a Collector's `otlphttp` exporter reads the same. Two readings
keep the per-span Python small: protobuf through a wire-compatible view of those messages whose
attributes arrive as bytes, and JSON in the form exporters write it read straight from orjson's
objects (any other form by protobuf's own JSON mapping). OTLP's JSON differs from protobuf's
standard JSON mapping in one place: trace and span ids are hex, not base64.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, NamedTuple

import orjson
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from action_metrics.context import NO_ATTRIBUTION, Attribution, parse_attribution
from action_metrics.errors import InvalidValue
from action_metrics.genai import (
    OWN_SPAN,
    CallDeduplicator,
    SpanData,
    SpanMapping,
    call_from_span_data,
    is_genai_span,
)
from action_metrics.model import ActionMetric

PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
MEDIA_TYPES: Final = (PROTOBUF, JSON)

STATUS_ERROR: Final = 2
"""`Status.STATUS_CODE_ERROR`: the span's operation failed."""

Scalar = str | bool | int | float
AttributeValue = Scalar | tuple[Scalar, ...]


class OtlpDecodeError(ValueError):
    """The body is not an ExportTraceServiceRequest in the encoding its Content-Type names."""


class OtlpSpan(NamedTuple):
    """One span as an exporter sent it: ids as integers (an empty id as 0; no parent as None), times
    in nanoseconds since the epoch. A named tuple: one is made per span received."""

    trace_id: int
    span_id: int
    parent_span_id: int | None
    name: str
    start_ns: int
    end_ns: int
    attributes: Mapping[str, AttributeValue]
    status_code: int
    status_message: str
    resource: Mapping[str, AttributeValue]
    scope: str
    event_attributes: tuple[Mapping[str, AttributeValue], ...] = ()

    @property
    def identity(self) -> tuple[int, int]:
        """What names this span in every retry of its batch."""
        return self.trace_id, self.span_id


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header, without its parameters; "" when absent."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_request(body: bytes, content_type: str | None) -> list[OtlpSpan]:
    """Every span of the request, in the order sent.

    Raises OtlpDecodeError for a body that does not decode, and ValueError for a Content-Type that
    is neither OTLP encoding.
    """
    kind = media_type(content_type)
    if kind == PROTOBUF:
        try:
            return list(_spans(_REQUEST_VIEW.FromString(body), {}))
        except (DecodeError, UnicodeDecodeError) as error:
            raise OtlpDecodeError(f"the body is not a protobuf ExportTraceServiceRequest: {error}") from None
    if kind == JSON:
        try:
            return _JsonReader().spans(orjson.loads(body))
        except (_NotPlain, orjson.JSONDecodeError, RecursionError):
            return decode_json_by_protobuf(body)
    raise ValueError(f"Content-Type {kind or '(none)'} is not one of {', '.join(MEDIA_TYPES)}")


def decode_json_by_protobuf(body: bytes) -> list[OtlpSpan]:
    """An OTLP JSON body read by protobuf's own JSON mapping (`json_format`), which takes every form
    the mapping allows (field names in snake_case, numbers as text or not, enums by name, nulls,
    unknown fields): the definition `_JsonReader` is tested against, and what reads a body it does
    not take. Raises OtlpDecodeError for a body that does not decode."""
    request = ExportTraceServiceRequest()
    try:
        document = json.loads(body)
        json_format.ParseDict(_ids_as_base64(document), request, ignore_unknown_fields=True)
        # the same spans as protobuf, read by the one reader below
        return list(_spans(_REQUEST_VIEW.FromString(request.SerializeToString()), {}))
    except (ValueError, TypeError, RecursionError, json_format.ParseError) as error:
        raise OtlpDecodeError(f"the body is not an OTLP JSON ExportTraceServiceRequest: {error}") from None


def encode_response(content_type: str | None, rejected: int = 0, message: str = "") -> bytes:
    """OTLP's answer in the request's encoding: a partial success when some spans were rejected."""
    response = ExportTraceServiceResponse()
    if rejected or message:
        response.partial_success.CopyFrom(
            ExportTracePartialSuccess(rejected_spans=rejected, error_message=message)
        )
    if media_type(content_type) == PROTOBUF:
        encoded: bytes = response.SerializeToString()
        return encoded
    return json.dumps(json_format.MessageToDict(response)).encode()


def ancestors(span: OtlpSpan, spans: Mapping[tuple[int, int], OtlpSpan]) -> Iterator[OtlpSpan]:
    """The span's parent, its parent's parent, ... as far as `spans` (a batch, by identity) holds them."""
    seen = {span.identity}
    while span.parent_span_id is not None and (parent := spans.get((span.trace_id, span.parent_span_id))):
        if parent.identity in seen:  # a cycle a broken exporter could send
            return
        seen.add(parent.identity)
        yield parent
        span = parent


# --- protobuf: a view of the OTLP messages whose attributes upb hands over as bytes ----------------


def _request_view() -> type[Message]:
    """`ExportTraceServiceRequest` with every span's, event's and resource's `attributes` read as
    `repeated bytes`: the same bytes on the wire (a message field is length-delimited, as bytes
    are), but upb hands each attribute over as its `KeyValue`'s encoded bytes, where reading
    `KeyValue` messages makes two Python objects per attribute. Equal attributes (a model, an
    action type, a town) have equal bytes, so each is decoded once per request. Everything else
    is OTLP's own descriptors, copied into a pool of their own."""
    pool = descriptor_pool.DescriptorPool()
    for module in (common_pb2, resource_pb2, trace_pb2, trace_service_pb2):
        file = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file)
        for message in file.message_type:
            for owner in (message, *message.nested_type):
                for field_ in owner.field:
                    if field_.name == "attributes":
                        field_.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                        field_.ClearField("type_name")
        pool.Add(file)
    name = trace_service_pb2.ExportTraceServiceRequest.DESCRIPTOR.full_name
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


_REQUEST_VIEW: Final = _request_view()

_Decoded = dict[bytes, tuple[str, "AttributeValue | None"]]
"""The attributes a request decoded so far: a `KeyValue`'s bytes -> its key and value."""


def _spans(request: Any, decoded: _Decoded) -> Iterator[OtlpSpan]:
    """The spans of a request view."""
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes, decoded)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for span in scope_spans.spans:
                status, events, parent = span.status, span.events, span.parent_span_id
                yield OtlpSpan(
                    int.from_bytes(span.trace_id),
                    int.from_bytes(span.span_id),
                    int.from_bytes(parent) if parent else None,
                    span.name,
                    span.start_time_unix_nano,
                    span.end_time_unix_nano,
                    _attributes(span.attributes, decoded),
                    status.code,
                    status.message,
                    resource,
                    scope,
                    tuple(_attributes(event.attributes, decoded) for event in events) if events else (),
                )


def _attributes(encoded: Sequence[bytes], decoded: _Decoded) -> dict[str, AttributeValue]:
    """Attributes as OpenTelemetry's SDK holds them: scalars and homogeneous arrays of scalars.

    Values the SDK's attributes cannot hold (maps, bytes, empty values) are left out, as the SDK
    leaves them out of a span.
    """
    attributes: dict[str, AttributeValue] = {}
    for pair in encoded:
        read = decoded.get(pair)
        if read is None:
            read = decoded[pair] = _key_value(pair)
        key, value = read
        if value is not None:
            attributes[key] = value
    return attributes


_KEY: Final = 0x0A
"""The first byte of a `KeyValue`'s key, and of an `AnyValue`'s `string_value` (field 1, length-delimited)."""
_VALUE: Final = 0x12
"""The first byte of a `KeyValue`'s value (field 2, length-delimited)."""
_SMALL_INT: Final = 0x18
"""The first byte of an `AnyValue`'s `int_value` (field 3, a varint)."""


def _key_value(encoded: bytes) -> tuple[str, AttributeValue | None]:
    # The commonest attributes are read without protobuf: a key and a value of under 128 bytes each,
    # in that order, and in the value a string of under 128 bytes or an int under 2**14. UTF-8 is
    # checked as upb checks it (a UnicodeDecodeError refuses the body, as a DecodeError does).
    # Anything else is read by protobuf's own KeyValue.
    size = len(encoded)
    if size >= 4 and encoded[0] == _KEY and (key_size := encoded[1]) < 0x80:
        value_at = key_size + 4
        if value_at <= size and encoded[value_at - 2] == _VALUE and encoded[value_at - 1] == size - value_at:
            key = encoded[2 : value_at - 2].decode()
            if value_at + 2 <= size:
                kind, second = encoded[value_at], encoded[value_at + 1]
                if kind == _KEY and second == size - value_at - 2:
                    return key, encoded[value_at + 2 :].decode()
                if kind == _SMALL_INT and second < 0x80 and size == value_at + 2:
                    return key, second
                if kind == _SMALL_INT and size == value_at + 3 and second >= 0x80 and encoded[-1] < 0x80:
                    return key, second & 0x7F | encoded[-1] << 7
    pair = KeyValue.FromString(encoded)
    return pair.key, _value(pair.value)


_SCALARS: Final = frozenset(("string_value", "bool_value", "int_value", "double_value"))


def _value(value: AnyValue) -> AttributeValue | None:
    kind = value.WhichOneof("value")
    if kind in _SCALARS:
        scalar: Scalar = getattr(value, kind)
        return scalar
    if kind == "array_value":
        return _array(value.array_value.values)
    return None


def _array(values: Sequence[AnyValue]) -> tuple[Scalar, ...] | None:
    return _scalars([_value(item) for item in values])


def _scalars(items: list[AttributeValue | None]) -> tuple[Scalar, ...] | None:
    """An array the SDK's attributes can hold: scalars only (a nested array or a map: none)."""
    scalars = tuple(item for item in items if item is not None and not isinstance(item, tuple))
    return scalars if len(scalars) == len(items) else None


_ID_FIELDS: Final = ("traceId", "spanId", "parentSpanId")


def _ids_as_base64(document: Any) -> Any:
    """OTLP JSON's hex ids turned into protobuf JSON's base64, in spans and their links."""
    if not isinstance(document, dict):
        raise OtlpDecodeError("the body is not a JSON object")
    for resource_spans in _items(document, "resourceSpans"):
        for scope_spans in _items(resource_spans, "scopeSpans"):
            for span in _items(scope_spans, "spans"):
                _rewrite_ids(span)
                for link in _items(span, "links"):
                    _rewrite_ids(link)
    return document


def _items(parent: Any, key: str) -> list[Any]:
    items = parent.get(key) if isinstance(parent, dict) else None
    return items if isinstance(items, list) else []


def _rewrite_ids(message: Any) -> None:
    if not isinstance(message, dict):
        return
    for name in _ID_FIELDS:
        value = message.get(name)
        if isinstance(value, str) and value:
            try:
                message[name] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise OtlpDecodeError(f"{name} {value[:40]!r} is not hex") from None


# --- JSON: the form exporters send, read directly --------------------------------------------------


class _NotPlain(Exception):
    """The document leaves the form `_JsonReader` reads: `decode_json_by_protobuf` reads it instead."""


_UINT32: Final = 2**32 - 1
_LAST_SPAN_KIND: Final = max(trace_pb2.Span.SpanKind.values())
_UINT64: Final = 2**64 - 1
_INT64: Final = 2**63


def _text(value: object) -> str:
    if type(value) is not str:
        raise _NotPlain
    return value


def _whole(value: object, low: int, high: int) -> int:
    """A 64-bit integer field as OTLP JSON sends it (decimal text, or a number), within its range."""
    if (
        type(value) is str
        and value.isascii()
        and (value.isdigit() or (value[:1] == "-" and value[1:].isdigit()))
    ):
        number = int(value)
    elif type(value) is int:
        number = value
    else:
        raise _NotPlain
    if not low <= number <= high:
        raise _NotPlain
    return number


def _small(value: object, high: int) -> int:
    """A 32-bit field or an enum, as a number from 0 to `high` (text, or an enum's name: read exactly)."""
    if type(value) is not int or not 0 <= value <= high:
        raise _NotPlain
    return value


def _count(value: object) -> int:
    return _small(value, _UINT32)


def _nanoseconds(value: object) -> int:
    return _whole(value, 0, _UINT64)


def _hex_id(value: object) -> int:
    if type(value) is not str or len(value) % 2 or not value.isascii():
        raise _NotPlain
    try:
        return int.from_bytes(bytes.fromhex(value))
    except ValueError:
        raise _NotPlain from None


def _fields(message: object, known: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON object whose every key is one of `known`'s (name -> check of a field not read here)."""
    if type(message) is not dict or not message.keys() <= known.keys():
        raise _NotPlain
    for name, value in message.items():
        check = known[name]
        if check is not None:
            check(value)
    return message


def _list(value: object) -> list[Any]:
    if type(value) is not list:
        raise _NotPlain
    return value


def _no_links(value: object) -> None:
    if value != []:
        raise _NotPlain  # links are read by the exact path (never by the mapping: only checked there)


_READ: Final = None
"""A field `_JsonReader` reads itself (and checks as it reads)."""
_SPAN_FIELDS: Final = {
    "traceId": _READ,
    "spanId": _READ,
    "parentSpanId": _READ,
    "traceState": _text,
    "flags": _count,
    "name": _READ,
    "kind": lambda value: _small(value, _LAST_SPAN_KIND),
    "startTimeUnixNano": _READ,
    "endTimeUnixNano": _READ,
    "attributes": _READ,
    "droppedAttributesCount": _count,
    "events": _READ,
    "droppedEventsCount": _count,
    "links": _no_links,
    "droppedLinksCount": _count,
    "status": _READ,
}
_EVENT_FIELDS: Final = {
    "timeUnixNano": _nanoseconds,
    "name": _text,
    "attributes": _READ,
    "droppedAttributesCount": _count,
}
_RESOURCE_FIELDS: Final = {"attributes": _READ, "droppedAttributesCount": _count}
_SCOPE_FIELDS: Final = {
    "name": _READ,
    "version": _text,
    "attributes": _READ,
    "droppedAttributesCount": _count,
}
_STATUS_FIELDS: Final = {"message": _text, "code": lambda value: _small(value, STATUS_ERROR)}
_SCOPE_SPANS_FIELDS: Final = {"scope": _READ, "spans": _READ, "schemaUrl": _text}
_RESOURCE_SPANS_FIELDS: Final = {"resource": _READ, "scopeSpans": _READ, "schemaUrl": _text}
_REQUEST_FIELDS: Final = {"resourceSpans": _READ}
_KEY_VALUE_FIELDS: Final = frozenset(("key", "value"))
_EMPTY: Final[dict[str, Any]] = {}


class _JsonReader:
    """OTLP JSON as the SDKs' exporters and the Collector write it (camelCase names, 64-bit numbers
    as text, hex ids, enums as numbers), read straight into spans: `json_format` takes ~100 µs a
    span. Anything else raises `_NotPlain` and the body is read by `decode_json_by_protobuf`, so
    both read every body alike (tests/test_otlp.py checks it)."""

    def spans(self, document: object) -> list[OtlpSpan]:
        spans: list[OtlpSpan] = []
        for resource_spans in _list(_fields(document, _REQUEST_FIELDS).get("resourceSpans", [])):
            resource_spans = _fields(resource_spans, _RESOURCE_SPANS_FIELDS)
            resource = _fields(resource_spans.get("resource", {}), _RESOURCE_FIELDS)
            resource_attributes = self._attributes(resource.get("attributes", []))
            for scope_spans in _list(resource_spans.get("scopeSpans", [])):
                scope_spans = _fields(scope_spans, _SCOPE_SPANS_FIELDS)
                scope = _fields(scope_spans.get("scope", {}), _SCOPE_FIELDS)
                self._attributes(scope.get("attributes", []))  # checked, as protobuf would
                scope_name = _text(scope.get("name", ""))
                for span in _list(scope_spans.get("spans", [])):
                    spans.append(self._span(_fields(span, _SPAN_FIELDS), resource_attributes, scope_name))
        return spans

    def _span(self, span: dict[str, Any], resource: dict[str, AttributeValue], scope: str) -> OtlpSpan:
        status = _fields(span.get("status", {}), _STATUS_FIELDS)
        parent = span.get("parentSpanId", "")
        events = _list(span.get("events", []))
        return OtlpSpan(
            _hex_id(span.get("traceId", "")),
            _hex_id(span.get("spanId", "")),
            _hex_id(parent) if parent else None,
            _text(span.get("name", "")),
            _nanoseconds(span.get("startTimeUnixNano", 0)),
            _nanoseconds(span.get("endTimeUnixNano", 0)),
            self._attributes(span.get("attributes", [])),
            status.get("code", 0),
            status.get("message", ""),
            resource,
            scope,
            tuple(self._attributes(_fields(event, _EVENT_FIELDS).get("attributes", [])) for event in events),
        )

    def _attributes(self, pairs: object) -> dict[str, AttributeValue]:
        attributes: dict[str, AttributeValue] = {}
        for pair in _list(pairs):  # the commonest object of all: its checks are written out
            if type(pair) is not dict or not pair.keys() <= _KEY_VALUE_FIELDS:
                raise _NotPlain
            key = pair.get("key", "")
            if type(key) is not str:
                raise _NotPlain
            value = pair.get("value", _EMPTY)
            if type(value) is dict and len(value) == 1 and type(text := value.get("stringValue")) is str:
                attributes[key] = text
            elif (read := self._value(value)) is not None:
                attributes[key] = read
        return attributes

    def _value(self, value: object) -> AttributeValue | None:
        if type(value) is not dict or len(value) > 1:
            raise _NotPlain
        if not value:
            return None  # an empty AnyValue
        ((kind, item),) = value.items()
        if kind == "stringValue":
            return _text(item)
        if kind == "intValue":
            return _whole(item, -_INT64, _INT64 - 1)
        if kind == "boolValue" and type(item) is bool:
            return item
        if kind == "doubleValue" and (type(item) is float or type(item) is int):
            return float(item)  # orjson reads no NaN or infinity: those come as text, read exactly
        if kind == "arrayValue":
            values = _list(_fields(item, _ARRAY_FIELDS).get("values", []))
            return _scalars([self._value(element) for element in values])
        raise _NotPlain  # bytes and key-value lists: never an SDK attribute, read exactly


_ARRAY_FIELDS: Final = {"values": _READ}


# --- spans to metrics ---------------------------------------------------------------------------


@dataclass(slots=True)
class SpanBatch:
    """What one request's spans come to: metrics to store (with each span's index in the request),
    spans rejected (index, why), and what was left out."""

    accepted: list[tuple[int, ActionMetric]] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    ignored: int = 0
    """Spans that report no LLM call (and those of `@instrument_action`, stored by the decorator)."""
    duplicates: int = 0
    """Spans of a call another span of this request reported."""
    usage_missing: int = 0
    problems: list[str] = field(default_factory=list)
    """Attribution values that could not be read (the call was kept without them)."""
    credits: dict[uuid.UUID, tuple[tuple[int, int], int]] = field(default_factory=dict)
    """The calls that may carry the credits of an ancestor (an action's), by metric id: (that
    ancestor's identity, its credits). `accepted` holds them without; the store charges the one
    holding the ancestor's claim (`charges.InheritedCredits`)."""


class SpanReceiver:
    """GenAI spans of OTLP requests as metrics, as `ActionMetricsSpanProcessor` makes them in process.

    The mapping is the same function (`genai.call_from_span_data`); what a span inherits (ids,
    action type) comes from its ancestors in the same request, nearest first, as the processor
    takes it from the parent span it knows. An ancestor's credits go to one call under it that has
    none of its own (never an ancestor made by `@instrument_action`, whose own metric carries
    them): each request claims them for its first such call in the transaction that writes its
    calls, and the first claim of an ancestor holds across requests and processes
    (`charges.InheritedCredits`). Several
    spans of one call in a request make one metric (`CallDeduplicator`); across requests the ids do
    it: a call's metric id comes from its provider response id, else from its span's identity, so
    a request sent again (a retry after a timeout) stores nothing twice.
    """

    def __init__(self, mapping: SpanMapping | None = None) -> None:
        self.mapping = SpanMapping() if mapping is None else mapping

    def read(self, spans: Sequence[OtlpSpan]) -> SpanBatch:
        """The metrics of a request's spans, without the credits they may inherit (see `SpanBatch`)."""
        batch = SpanBatch()
        by_identity = {(span.trace_id, span.span_id): span for span in spans}
        ancestry = _Ancestry(by_identity, self.mapping.names, batch.problems)
        deduplicator = CallDeduplicator()
        mapping = self.mapping
        for index, span in enumerate(spans):
            if not is_genai_span(span.attributes):
                batch.ignored += 1
                continue
            if span.parent_span_id is not None:
                inherited, credits = ancestry.inherited(span)
            else:
                inherited, credits = NO_ATTRIBUTION, None
            data = SpanData(
                span.name,
                span.attributes,
                span.start_ns,
                span.end_ns,
                span.status_code == STATUS_ERROR,
                span.status_message or None,
                span.trace_id,
                span.span_id,
                span.parent_span_id,
                span.resource,
                inherited,
            )
            try:
                call = call_from_span_data(data, mapping)
                if call is None:
                    batch.ignored += 1
                    continue
                if not deduplicator.first_report(data, call):
                    batch.duplicates += 1
                    continue
                if credits is not None and not data.failed and call.metric.credits_charged == 0:
                    batch.credits[call.metric.id] = credits
            except InvalidValue as error:
                batch.rejected.append((index, f"{error.field}: {error.problem}"))
                continue
            if call.problems:
                batch.problems.extend(f"span {span.name!r}: {problem}" for problem in call.problems)
            batch.usage_missing += call.usage_missing
            batch.accepted.append((index, call.metric))
        return batch


class _Ancestry:
    """What the spans of one request inherit from their ancestors in it; each ancestor's attributes
    are read once however many calls it has under it (its problems are reported per call)."""

    def __init__(
        self, by_identity: Mapping[tuple[int, int], OtlpSpan], names: Mapping[str, str], problems: list[str]
    ) -> None:
        self.by_identity = by_identity
        self.names = names
        self.problems = problems
        self._read: dict[tuple[int, int], tuple[Attribution, tuple[str, ...]]] = {}

    def inherited(self, span: OtlpSpan) -> tuple[Attribution, tuple[tuple[int, int], int] | None]:
        """The attribution `span` inherits (credits left out), and the credits of its nearest ancestor
        that names some and is not `@instrument_action`'s: (that ancestor's identity, credits)."""
        inherited: Attribution = NO_ATTRIBUTION
        credits: tuple[tuple[int, int], int] | None = None
        for ancestor in ancestors(span, self.by_identity):
            own, problems = self._attribution(ancestor)
            if problems:
                self.problems.extend(f"span {ancestor.name!r}: {problem}" for problem in problems)
            if own.empty:
                continue
            inherited = inherited.over(own)
            if credits is None and own.credits_charged is not None and OWN_SPAN not in ancestor.attributes:
                credits = ancestor.identity, own.credits_charged
        if inherited.credits_charged is not None:
            inherited = replace(inherited, credits_charged=None)
        return inherited, credits

    def _attribution(self, span: OtlpSpan) -> tuple[Attribution, tuple[str, ...]]:
        identity = span.trace_id, span.span_id
        read = self._read.get(identity)
        if read is None:
            read = self._read[identity] = parse_attribution(span.attributes, self.names)
        return read


__all__ = [
    "JSON",
    "MEDIA_TYPES",
    "PROTOBUF",
    "STATUS_ERROR",
    "OtlpDecodeError",
    "OtlpSpan",
    "SpanBatch",
    "SpanReceiver",
    "ancestors",
    "decode_json_by_protobuf",
    "decode_request",
    "encode_response",
    "media_type",
]
