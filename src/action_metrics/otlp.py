"""OTLP/HTTP traces in: an `ExportTraceServiceRequest` body, protobuf or JSON, as plain spans.

The OpenTelemetry protocol's own messages (`opentelemetry-proto`) decode both encodings, so a span
from any SDK's exporter or a Collector's `otlphttp` exporter reads the same. OTLP's JSON differs
from protobuf's standard JSON mapping in one place: trace and span ids are hex, not base64.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
MEDIA_TYPES: Final = (PROTOBUF, JSON)

STATUS_ERROR: Final = 2
"""`Status.STATUS_CODE_ERROR`: the span's operation failed."""

Scalar = str | bool | int | float
AttributeValue = Scalar | tuple[Scalar, ...]


class OtlpDecodeError(ValueError):
    """The body is not an ExportTraceServiceRequest in the encoding its Content-Type names."""


@dataclass(frozen=True)
class OtlpSpan:
    """One span as an exporter sent it: ids in hex, times in nanoseconds since the epoch."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
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
    def identity(self) -> tuple[str, str]:
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
    request = ExportTraceServiceRequest()
    if kind == PROTOBUF:
        try:
            request.ParseFromString(body)
        except DecodeError as error:
            raise OtlpDecodeError(f"the body is not a protobuf ExportTraceServiceRequest: {error}") from None
    elif kind == JSON:
        try:
            document = json.loads(body)
            json_format.ParseDict(_ids_as_base64(document), request, ignore_unknown_fields=True)
        except (ValueError, TypeError, RecursionError, json_format.ParseError) as error:
            raise OtlpDecodeError(
                f"the body is not an OTLP JSON ExportTraceServiceRequest: {error}"
            ) from None
    else:
        raise ValueError(f"Content-Type {kind or '(none)'} is not one of {', '.join(MEDIA_TYPES)}")
    return list(_spans(request))


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


def ancestors(span: OtlpSpan, spans: Mapping[tuple[str, str], OtlpSpan]) -> Iterator[OtlpSpan]:
    """The span's parent, its parent's parent, ... as far as `spans` (a batch, by identity) holds them."""
    seen = {span.identity}
    while span.parent_span_id and (parent := spans.get((span.trace_id, span.parent_span_id))):
        if parent.identity in seen:  # a cycle a broken exporter could send
            return
        seen.add(parent.identity)
        yield parent
        span = parent


def _spans(request: ExportTraceServiceRequest) -> Iterator[OtlpSpan]:
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for span in scope_spans.spans:
                yield OtlpSpan(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex() or None,
                    name=span.name,
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                    attributes=_attributes(span.attributes),
                    status_code=span.status.code,
                    status_message=span.status.message,
                    resource=resource,
                    scope=scope,
                    event_attributes=tuple(_attributes(event.attributes) for event in span.events),
                )


def _attributes(pairs: Sequence[KeyValue]) -> dict[str, AttributeValue]:
    """Attributes as OpenTelemetry's SDK holds them: scalars and homogeneous arrays of scalars.

    Values the SDK's attributes cannot hold (maps, bytes, empty values) are left out, as the SDK
    leaves them out of a span.
    """
    attributes: dict[str, AttributeValue] = {}
    for pair in pairs:
        value = _value(pair.value)
        if value is not None:
            attributes[pair.key] = value
    return attributes


def _value(value: AnyValue) -> AttributeValue | None:
    match value.WhichOneof("value"):
        case "string_value":
            return value.string_value
        case "bool_value":
            return value.bool_value
        case "int_value":
            return value.int_value
        case "double_value":
            return value.double_value
        case "array_value":
            items = [_value(item) for item in value.array_value.values]
            scalars = tuple(item for item in items if item is not None and not isinstance(item, tuple))
            return scalars if len(scalars) == len(items) else None
        case _:
            return None


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
    for field in _ID_FIELDS:
        value = message.get(field)
        if isinstance(value, str) and value:
            try:
                message[field] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise OtlpDecodeError(f"{field} {value[:40]!r} is not hex") from None


__all__ = [
    "JSON",
    "MEDIA_TYPES",
    "PROTOBUF",
    "STATUS_ERROR",
    "OtlpDecodeError",
    "OtlpSpan",
    "ancestors",
    "decode_request",
    "encode_response",
    "media_type",
]
