"""Writes over HTTP. `POST /v1/actions`: metrics in `to_dict()` form from writers in any language, as
a JSON array or NDJSON, gzip or not. `POST /v1/traces`: OTLP/HTTP, whose GenAI spans become metrics
as `ActionMetricsSpanProcessor` makes them in process (see `otlp`).

Each item is checked as `ActionMetric.from_dict` checks it and against the token's towns; a bad
item is rejected with its index (its position in the array; in NDJSON its line's number from 0,
blank lines counted) and field, the others are stored. The body as a whole is refused only when it
cannot be read: 400 (not JSON, broken gzip), 413 (too large, too many items), 415 (another media
type or encoding).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterable
from datetime import datetime
from enum import Enum
from typing import Any, Final

import orjson
from fastapi import APIRouter, HTTPException, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from action_metrics.access import TokenGrant, WriteGrant
from action_metrics.charges import InheritedCredits
from action_metrics.errors import InvalidMetric
from action_metrics.intake import IntakeAnswer, Rejected, intake_of, read_body, write
from action_metrics.model import ActionMetric
from action_metrics.otlp import (
    MEDIA_TYPES,
    PROTOBUF,
    OtlpDecodeError,
    SpanReceiver,
    decode_request,
    encode_response,
    media_type,
)
from action_metrics.store import AsyncMetricsStore
from action_metrics.validation import (
    ACTION_TYPE_PATTERN,
    MAX_ID_LENGTH,
    MAX_INT64,
    MAX_METADATA_DEPTH,
    MAX_MODEL_LENGTH,
)

logger = logging.getLogger(__name__)

JSON_ARRAY: Final = "application/json"
NDJSON: Final = "application/x-ndjson"


class SentMetric(BaseModel):
    """One metric as `ActionMetric.to_dict()` writes it (the figures it derives may be left out).

    Documentation only: items are checked by `ActionMetric.from_dict`, so one bad item is rejected
    alone instead of failing the request.
    """

    model_config = ConfigDict(extra="forbid")

    id: uuid.UUID = Field(description="The same id sent again is stored once.")
    action_type: str = Field(pattern=f"^{ACTION_TYPE_PATTERN}$")
    user_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    town_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    citizen_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH)
    tokens_in: int = Field(ge=0, le=MAX_INT64)
    tokens_out: int = Field(ge=0, le=MAX_INT64)
    cache_read_tokens: int = Field(default=0, ge=0, le=MAX_INT64)
    cache_write_tokens: int = Field(default=0, ge=0, le=MAX_INT64)
    reasoning_tokens: int = Field(default=0, ge=0, le=MAX_INT64)
    error: str | None = None
    model: str = Field(min_length=1, max_length=MAX_MODEL_LENGTH)
    latency_ms: float = Field(ge=0)
    credits_charged: int = Field(ge=0, le=MAX_INT64)
    timestamp: datetime | None = Field(default=None, description="ISO 8601 with an offset; default now.")
    metadata: dict[str, Any] = Field(default_factory=dict)
    total_tokens: int | None = None
    estimated_cost_usd: float | None = None
    revenue_usd: float | None = None
    gross_margin: float | None = None


def _request_body() -> dict[str, Any]:
    item = SentMetric.model_json_schema()
    return {
        "required": True,
        "content": {
            JSON_ARRAY: {"schema": {"type": "array", "items": item}},
            NDJSON: {"schema": {"type": "array", "items": item}},
        },
    }


class _BodyKind(Enum):
    ARRAY = JSON_ARRAY
    LINES = NDJSON


def _body_kind(content_type: str | None) -> _BodyKind:
    media_type = (content_type or "").partition(";")[0].strip().lower()
    for kind in _BodyKind:
        if media_type == kind.value:
            return kind
    raise HTTPException(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        f"Content-Type {media_type or 'missing'}: send {JSON_ARRAY} (an array) or {NDJSON} (one per line)",
    )


_ESCAPED_SURROGATE: Final = re.compile(rb"\\u[dD][89a-fA-F]")
_INFINITE_NUMBER: Final = "number is infinity"
"""How orjson's refusal of a number beyond a double's range (1.8e308, an integer too) begins."""
_WIDE_FLOAT: Final = 2.0**63
"""orjson reads a JSON integer below -2**63 or above 2**64 - 1 as a float: of at least this magnitude."""


def _json(text: bytes) -> Any:
    """Strict JSON (orjson: several times the standard library's speed): NaN, Infinity, invalid
    UTF-8 and nesting past 1024 levels are refused, never a crash. Where orjson would change or
    refuse what Python keeps, the text is read again by the standard library, so that the item is
    stored as `emit()` stores it or rejected alone, naming its field: an escaped lone surrogate
    (`"\\ud83d"`, JavaScript's cut emoji, valid JSON that orjson refuses), an integer beyond 64 bits
    in metadata (which orjson reads as a float, a provider's 20-digit request number changed), or a
    number beyond a double's range (which orjson refuses)."""
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        if _ESCAPED_SURROGATE.search(text) is None and not str(error).startswith(_INFINITE_NUMBER):
            raise _NotJson(str(error)) from None
        return _json_by_stdlib(text)
    for item in document if type(document) is list else (document,):
        metadata = item.get("metadata") if type(item) is dict else None
        if type(metadata) is dict and _holds_wide_float(metadata.values(), 1):
            return _json_by_stdlib(text)
    return document


def _holds_wide_float(values: Iterable[Any], depth: int) -> bool:
    """Whether metadata holds a float that may be orjson's reading of an integer beyond 64 bits.
    Only metadata keeps such a number: any other field refuses it (or ignores it) as an int or a
    float alike. The walk stops where `from_dict` refuses metadata as nested too deeply."""
    for value in values:
        kind = type(value)
        if kind is float:
            if not -_WIDE_FLOAT < value < _WIDE_FLOAT:
                return True
        elif kind is dict:
            if depth < MAX_METADATA_DEPTH and _holds_wide_float(value.values(), depth + 1):
                return True
        elif kind is list and depth < MAX_METADATA_DEPTH and _holds_wide_float(value, depth + 1):
            return True
    return False


def _json_by_stdlib(text: bytes) -> Any:
    """The standard library's JSON, NaN and Infinity refused as orjson refuses them (a number it
    reads as infinite, or an integer past 64 bits, is left to `from_dict` to reject or keep)."""
    try:
        return json.loads(text.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        raise _NotJson("nested too deeply") from None
    except ValueError as error:  # not JSON, not UTF-8, NaN or Infinity, an integer of 4,300 digits
        raise _NotJson(str(error)) from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class _NotJson(Exception):
    pass


def _items(kind: _BodyKind, body: bytes, max_items: int) -> list[tuple[int, Any]]:
    """The request's items with their indexes: decoded documents, or `_NotJson` for an NDJSON line
    that is not one. An NDJSON item's index is its line's (from 0, blank lines counted), so that a
    client finds the line it sent; blank lines are no items."""
    if kind is _BodyKind.LINES:
        lines = [(number, line) for number, line in enumerate(body.split(b"\n")) if line.strip()]
        _check_count(len(lines), max_items)
        documents: list[tuple[int, Any]] = []
        for number, line in lines:
            try:
                documents.append((number, _json(line)))
            except _NotJson as error:
                documents.append((number, error))
        return documents
    try:
        document = _json(body)
    except _NotJson as error:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"the body is not JSON: {error}") from None
    if not isinstance(document, list):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"the body is a JSON {type(document).__name__}: send an array of metrics (or NDJSON)",
        )
    _check_count(len(document), max_items)
    return list(enumerate(document))


def _check_count(count: int, max_items: int, what: str = "metrics") -> None:
    if count > max_items:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, f"{count} {what} in one request; send at most {max_items}"
        )


def _metrics(
    documents: list[tuple[int, Any]], grant: TokenGrant
) -> tuple[list[tuple[int, ActionMetric]], list[Rejected]]:
    accepted: list[tuple[int, ActionMetric]] = []
    rejected: list[Rejected] = []
    for index, document in documents:
        if isinstance(document, _NotJson):
            rejected.append(Rejected(index=index, field=None, error=f"not JSON: {document}"))
            continue
        try:
            metric = ActionMetric.from_dict(document)
        except InvalidMetric as error:
            rejected.append(
                Rejected(index=index, field=_encodable(error.field), error=_encodable(error.problem))
            )
            continue
        if not grant.allows(metric.town_id):
            rejected.append(
                Rejected(index=index, field="town_id", error="this token may not write this town")
            )
            continue
        accepted.append((index, metric))
    return accepted, rejected


def _encodable(text: str) -> str:
    """`text` with each lone surrogate (an unknown key may hold one) written as its JSON escape: the
    answer must be UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


router = APIRouter(tags=["ingest"])


@router.post(
    "/v1/actions",
    response_model=IntakeAnswer,
    openapi_extra={"requestBody": _request_body()},
    responses={
        400: {"description": "The body is not JSON, or not an array, or its gzip is broken"},
        401: {"description": "Missing or unknown bearer token"},
        403: {"description": "The token may not write"},
        413: {"description": "The body, inflated or not, or its number of metrics is over the limit"},
        415: {"description": "Neither application/json nor application/x-ndjson, or not gzip"},
        503: {"description": "The database cannot take writes now, or too many are in flight: retry"},
    },
)
async def post_actions(request: Request, grant: WriteGrant) -> IntakeAnswer:
    """Store metrics sent in `to_dict()` form. A 200 means the stored ones are committed; the same
    ids sent again (a retry) count as duplicates and change nothing. A rejected item's `index` is
    its position in the array, or in NDJSON its line's number from 0, blank lines counted."""
    intake = intake_of(request)
    kind = _body_kind(request.headers.get("content-type"))
    async with intake.slot():
        body = await read_body(request, intake.limits)
        documents = _items(kind, body, intake.limits.max_items)
        accepted, rejected = _metrics(documents, grant)
        store: AsyncMetricsStore = request.app.state.store
        return await write(intake, store, accepted, rejected)


_MESSAGES_IN_ANSWER: Final = 20
"""Rejected spans described in a partial-success answer's message (all are counted)."""


def _otlp_request_body() -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            PROTOBUF: {"schema": {"type": "string", "format": "binary"}},
            JSON_ARRAY: {"schema": {"type": "object", "description": "An OTLP ExportTraceServiceRequest"}},
        },
    }


def span_receiver(request: Request) -> SpanReceiver:
    """The app's one receiver (its mapping's caches live as long as the app)."""
    state = request.app.state
    receiver: SpanReceiver | None = getattr(state, "span_receiver", None)
    if receiver is None:
        receiver = state.span_receiver = SpanReceiver()
    return receiver


@router.post(
    "/v1/traces",
    response_class=Response,
    openapi_extra={"requestBody": _otlp_request_body()},
    responses={
        200: {
            "description": "OTLP's ExportTraceServiceResponse, in the request's encoding: "
            "`partialSuccess` counts and describes the spans rejected; the others are committed",
            "content": {PROTOBUF: {}, JSON_ARRAY: {}},
        },
        400: {"description": "The body is not an OTLP ExportTraceServiceRequest, or its gzip is broken"},
        401: {"description": "Missing or unknown bearer token"},
        403: {"description": "The token may not write"},
        413: {"description": "The body, inflated or not, or its number of spans is over the limit"},
        415: {"description": "Neither application/x-protobuf nor application/json, or not gzip"},
        503: {"description": "The database cannot take writes now, or too many are in flight: retry"},
    },
)
async def post_traces(request: Request, grant: WriteGrant) -> Response:
    """OTLP/HTTP traces (protobuf or JSON, gzip or not), as any OpenTelemetry SDK's exporter or a
    Collector's `otlphttp` exporter sends them. Each GenAI span becomes the metric of its LLM call;
    other spans are ignored. A 200 means the metrics are committed; a span that makes no valid
    metric, or is for a town the token may not write, is counted in the answer's partial success."""
    intake = intake_of(request)
    content_type = request.headers.get("content-type")
    kind = media_type(content_type)
    if kind not in MEDIA_TYPES:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {kind or 'missing'}: send {' or '.join(MEDIA_TYPES)} (OTLP/HTTP)",
        )
    async with intake.slot():
        body = await read_body(request, intake.limits)
        try:
            spans = decode_request(body, content_type)
        except OtlpDecodeError as error:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(error)) from None
        _check_count(len(spans), intake.limits.max_items, "spans")
        receiver = span_receiver(request)
        batch = receiver.read(spans)
        rejected = [Rejected(index=index, field=None, error=why) for index, why in batch.rejected]
        accepted: list[tuple[int, ActionMetric]] = []
        for index, metric in batch.accepted:
            if grant.allows(metric.town_id):
                accepted.append((index, metric))
            else:
                rejected.append(
                    Rejected(index=index, field="town_id", error="this token may not write this town")
                )
        store: AsyncMetricsStore = request.app.state.store
        credits = InheritedCredits(batch.credits) if batch.credits else None
        answer = await write(intake, store, accepted, rejected, credits)
    for problem in batch.problems:
        logger.warning("POST /v1/traces: unreadable attribution %s; call recorded without it", problem)
    if batch.usage_missing:
        logger.warning(
            "POST /v1/traces: %d calls reported no token usage (stored with 0 tokens)", batch.usage_missing
        )
    described = "; ".join(
        f"spans[{item.index}]: {item.field + ': ' if item.field else ''}{item.error}"
        for item in answer.rejected[:_MESSAGES_IN_ANSWER]
    )
    return Response(encode_response(content_type, len(answer.rejected), described), media_type=kind)
