"""OTLP/HTTP traces in: an `ExportTraceServiceRequest` body, protobuf or JSON, as plain spans, and
their GenAI spans as metrics by the span processor's own mapping.

The OpenTelemetry protocol's own messages (`opentelemetry-proto`) decode both encodings, so a span
from any SDK's exporter or a Collector's `otlphttp` exporter reads the same. OTLP's JSON differs
from protobuf's standard JSON mapping in one place: trace and span ids are hex, not base64.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

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


@dataclass(frozen=True, slots=True)
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
                status, events = span.status, span.events
                yield OtlpSpan(
                    span.trace_id.hex(),
                    span.span_id.hex(),
                    span.parent_span_id.hex() or None,
                    span.name,
                    span.start_time_unix_nano,
                    span.end_time_unix_nano,
                    _attributes(span.attributes),
                    status.code,
                    status.message,
                    resource,
                    scope,
                    tuple(_attributes(event.attributes) for event in events) if events else (),
                )


_SCALARS: Final = frozenset(("string_value", "bool_value", "int_value", "double_value"))


def _attributes(pairs: Sequence[KeyValue]) -> dict[str, AttributeValue]:
    """Attributes as OpenTelemetry's SDK holds them: scalars and homogeneous arrays of scalars.

    Values the SDK's attributes cannot hold (maps, bytes, empty values) are left out, as the SDK
    leaves them out of a span. Every span's attributes pass here: scalars are read inline.
    """
    attributes: dict[str, AttributeValue] = {}
    for pair in pairs:
        value = pair.value
        kind = value.WhichOneof("value")
        if kind in _SCALARS:
            attributes[pair.key] = getattr(value, kind)
        elif kind == "array_value" and (array := _array(value.array_value.values)) is not None:
            attributes[pair.key] = array
    return attributes


def _value(value: AnyValue) -> AttributeValue | None:
    kind = value.WhichOneof("value")
    if kind in _SCALARS:
        scalar: Scalar = getattr(value, kind)
        return scalar
    if kind == "array_value":
        return _array(value.array_value.values)
    return None


def _array(values: Sequence[AnyValue]) -> tuple[Scalar, ...] | None:
    items = [_value(item) for item in values]
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


# --- spans to metrics ---------------------------------------------------------------------------

_REMEMBERED_CLAIMS: Final = 65_536


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
    claims: set[tuple[int, int]] = field(default_factory=set)
    """The ancestor spans whose credits this batch charged: remembered once it is committed."""


class SpanReceiver:
    """GenAI spans of OTLP requests as metrics, as `ActionMetricsSpanProcessor` makes them in process.

    The mapping is the same function (`genai.call_from_span_data`); what a span inherits (ids,
    action type) comes from its ancestors in the same request, nearest first, as the processor
    takes it from the parent span it knows. An ancestor's credits are charged once, to the first
    call under it that has none of its own (never an ancestor made by `@instrument_action`, whose
    own metric carries them); across requests the receiver remembers which it charged. Several
    spans of one call in a request make one metric (`CallDeduplicator`); across requests the ids do
    it: a call's metric id comes from its provider response id, else from its span's identity, so
    a request sent again (a retry after a timeout) stores nothing twice.
    """

    def __init__(self, mapping: SpanMapping | None = None) -> None:
        self.mapping = SpanMapping() if mapping is None else mapping
        self._claimed: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, spans: Sequence[OtlpSpan]) -> SpanBatch:
        """The metrics of a request's spans; nothing is remembered until `committed()`."""
        batch = SpanBatch()
        by_identity = {(span.trace_id, span.span_id): span for span in spans}
        ancestry = _Ancestry(by_identity, self.mapping.names, batch.problems)
        deduplicator = CallDeduplicator()
        mapping = self.mapping
        for index, span in enumerate(spans):
            if not is_genai_span(span.attributes):
                batch.ignored += 1
                continue
            if span.parent_span_id:
                inherited, credits = ancestry.inherited(span)
            else:
                inherited, credits = NO_ATTRIBUTION, None
            data = _span_data(span, inherited)
            try:
                call = call_from_span_data(data, mapping)
                if call is None:
                    batch.ignored += 1
                    continue
                if not deduplicator.first_report(data, call):
                    batch.duplicates += 1
                    continue
                if credits is not None and not data.failed and call.metric.credits_charged == 0:
                    key, amount = credits
                    if key not in batch.claims and not self._charged(key):
                        batch.claims.add(key)
                        charged = replace(data, inherited=replace(inherited, credits_charged=amount))
                        call = call_from_span_data(charged, mapping) or call
            except InvalidValue as error:
                batch.rejected.append((index, f"{error.field}: {error.problem}"))
                continue
            if call.problems:
                batch.problems.extend(f"span {span.name!r}: {problem}" for problem in call.problems)
            batch.usage_missing += call.usage_missing
            batch.accepted.append((index, call.metric))
        return batch

    def committed(self, batch: SpanBatch) -> None:
        """The batch's metrics are stored: its ancestors' credits are charged from now on."""
        with self._lock:
            for key in batch.claims:
                self._claimed[key] = None
            while len(self._claimed) > _REMEMBERED_CLAIMS:
                self._claimed.popitem(last=False)

    def _charged(self, key: tuple[int, int]) -> bool:
        with self._lock:
            return key in self._claimed


class _Ancestry:
    """What the spans of one request inherit from their ancestors in it; each ancestor's attributes
    are read once however many calls it has under it (its problems are reported per call)."""

    def __init__(
        self, by_identity: Mapping[tuple[str, str], OtlpSpan], names: Mapping[str, str], problems: list[str]
    ) -> None:
        self.by_identity = by_identity
        self.names = names
        self.problems = problems
        self._read: dict[tuple[str, str], tuple[Attribution, tuple[str, ...]]] = {}

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
                credits = (_int_id(ancestor.trace_id), _int_id(ancestor.span_id)), own.credits_charged
        if inherited.credits_charged is not None:
            inherited = replace(inherited, credits_charged=None)
        return inherited, credits

    def _attribution(self, span: OtlpSpan) -> tuple[Attribution, tuple[str, ...]]:
        identity = span.trace_id, span.span_id
        read = self._read.get(identity)
        if read is None:
            read = self._read[identity] = parse_attribution(span.attributes, self.names)
        return read


def _int_id(hex_id: str) -> int:
    """A hex trace or span id as an int; an empty one (a broken exporter's) as 0."""
    return int(hex_id or "0", 16)


def _span_data(span: OtlpSpan, inherited: Attribution) -> SpanData:
    return SpanData(
        span.name,
        span.attributes,
        span.start_ns,
        span.end_ns,
        span.status_code == STATUS_ERROR,
        span.status_message or None,
        _int_id(span.trace_id),
        _int_id(span.span_id),
        _int_id(span.parent_span_id) if span.parent_span_id else None,
        span.resource,
        inherited,
    )


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
    "decode_request",
    "encode_response",
    "media_type",
]
