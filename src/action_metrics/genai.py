"""GenAI spans to metrics: one mapping over plain span data, for the span processor and any OTLP receiver.

`call_from_span_data(SpanData)` reads the OpenTelemetry GenAI attributes of one finished span (any
instrumentation's: the official ones, OpenLLMetry, the clients' own spans) and makes the metric of
the LLM call it reports. `CallDeduplicator` tells the first report of a call from the others, because
one call is often reported by several spans:

- A span with a provider response id (`gen_ai.response.id`: `chatcmpl-...`, `msg_...`) gets a metric id
  derived from it (`metric_id_for_response`), so every report of that call, in any process, has the
  same id and the store keeps one. A span without one gets an id derived from its own identity
  (`metric_id_for_span`): the same span sent twice is still one metric.
- Spans without one (a failed call has none) are the same call when one encloses the other in time,
  for the same request model, and they are siblings or parent and child in one trace, or both roots
  (two instrumentations that each start a trace), and they do not name two different users, towns
  or citizens: the first to finish is kept. Two such calls made concurrently for the same user and
  town, one enclosed by the other, would be counted once: the price of never counting twice.
"""

from __future__ import annotations

import hashlib
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from opentelemetry.util.types import AttributeValue

from action_metrics.context import ATTRIBUTE_NAMES, NO_ATTRIBUTION, Attribution, parse_attribution
from action_metrics.model import (
    ANONYMOUS_USER,
    UNKNOWN_MODEL,
    UNKNOWN_TOWN,
    ActionMetric,
    uuid7,
    uuid_from_int,
)
from action_metrics.pricing import ACTION_CREDITS

INPUT_TOKENS: Final = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
OUTPUT_TOKENS: Final = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
MODELS: Final = ("gen_ai.response.model", "gen_ai.request.model")
CACHE_READ_TOKENS: Final = ("gen_ai.usage.cache_read.input_tokens",)
CACHE_WRITE_TOKENS: Final = (
    "gen_ai.usage.cache_write.input_tokens",
    "gen_ai.usage.cache_creation.input_tokens",
)
REASONING_TOKENS: Final = ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens")
"""The GenAI conventions' token kinds, parts of the input and output totals (also the older
`cache_creation` and OpenLLMetry's `reasoning_tokens` names)."""
GEN_AI_KEYS: Final = frozenset((*INPUT_TOKENS, *OUTPUT_TOKENS, *MODELS))
RESPONSE_ID: Final = "gen_ai.response.id"
OWN_SPAN: Final = "action.id"
"""Set on the spans `@instrument_action` makes: the decorator has stored those metrics already."""
_PROVIDERS: Final = ("gen_ai.provider.name", "gen_ai.system")
_METADATA_KEYS: Final = ("gen_ai.operation.name", *_PROVIDERS, RESPONSE_ID)
_RESPONSE_NAMESPACE: Final = uuid.UUID("6f1c1a52-3d0e-5b8f-9a51-2f0b7c1e4d93")
_CLASS_REPR: Final = re.compile(r"<class '(?:[\w.]*\.)?(\w+)'>")
_LEADING_NAME: Final = re.compile(r"(?:<class '(?:[\w.]*\.)?)?([\w.]+)'?>?(?::.*)?", re.DOTALL)
"""A status description that starts with a (dotted) name or a code, alone or before ": ": the error's type."""


class SpanData(NamedTuple):
    """What the mapping reads of a finished span: the same from an SDK span or an OTLP message.

    A named tuple, not a frozen dataclass: one is made for every span received, and a frozen
    dataclass's `__init__` (a `object.__setattr__` per field) costs four times as much.
    """

    name: str
    attributes: Mapping[str, AttributeValue]
    start_ns: int
    end_ns: int
    failed: bool
    """Its status code is ERROR."""
    status_description: str | None = None
    trace_id: int = 0
    span_id: int = 0
    parent_span_id: int | None = None
    resource_attributes: Mapping[str, AttributeValue] = MappingProxyType({})
    inherited: Attribution = NO_ATTRIBUTION
    """What the span inherits where its own `action.*` attributes are silent: from `action_context`,
    baggage or an ancestor span, resolved by the caller (the credits already claimed once)."""


@dataclass(frozen=True, slots=True)
class SpanMapping:
    """Which attributes give the ids, credits and action type, and what stands in when none does."""

    names: Mapping[str, str] = field(default_factory=lambda: dict(ATTRIBUTE_NAMES))
    default_action_type: str = "llm"
    default_user_id: str = ANONYMOUS_USER
    default_town_id: str = UNKNOWN_TOWN


class GenAICall(NamedTuple):
    """The metric of one span's LLM call, and what the caller should count or log about it."""

    metric: ActionMetric
    usage_missing: bool
    """Neither input nor output tokens were reported (say an OpenAI stream without `include_usage`):
    stored with 0 tokens and `metadata["usage_missing"] = True`, never as a silent zero."""
    problems: tuple[str, ...]
    """Attribution values that could not be read (each naming its attribute); the call is kept."""
    request_model: str


def is_genai_span(attributes: Mapping[str, AttributeValue]) -> bool:
    """A span that reports an LLM call (and not one `@instrument_action` made)."""
    return OWN_SPAN not in attributes and not GEN_AI_KEYS.isdisjoint(attributes)


def metric_id_for_response(response_id: str) -> uuid.UUID:
    """The metric id of the call a provider answered with `response_id`: the same in every process."""
    return _uuid5(response_id)


def metric_id_for_span(trace_id: int, span_id: int) -> uuid.UUID:
    """The metric id of a call whose span names no response (a failed call): the span's identity,
    so a batch of spans sent again (an OTLP exporter's retry) stores nothing twice."""
    return _uuid5(f"span:{trace_id:032x}{span_id:016x}")


_NAMESPACE_BYTES: Final = _RESPONSE_NAMESPACE.bytes
_UUID5_KEPT: Final = ~(0xC000 << 48 | 0xF000 << 64) & (1 << 128) - 1
_UUID5_SET: Final = 0x8000 << 48 | 5 << 76


def _uuid5(name: str) -> uuid.UUID:
    """`uuid.uuid5(_RESPONSE_NAMESPACE, name)`, made as `uuid.UUID(bytes=..., version=5)` makes it
    but without checking again what is valid by construction: one per span received."""
    digest = hashlib.sha1(_NAMESPACE_BYTES + name.encode("utf-8")).digest()
    return uuid_from_int(int.from_bytes(digest[:16]) & _UUID5_KEPT | _UUID5_SET)


_DEFAULT_MAPPING: Final = SpanMapping()


def call_from_span_data(data: SpanData, mapping: SpanMapping = _DEFAULT_MAPPING) -> GenAICall | None:
    """The call a finished span reports; None for a span that reports none.

    Raises `InvalidValue` (naming the field) when the span's usage makes no valid metric.
    """
    attributes = data.attributes
    if OWN_SPAN in attributes or GEN_AI_KEYS.isdisjoint(attributes):
        return None
    get = attributes.get  # every span received comes here, and reads some twenty keys
    own, problems = parse_attribution(attributes, mapping.names)
    inherited = data.inherited
    attribution = own.over(inherited)
    action_type = attribution.action_type or mapping.default_action_type
    failed = data.failed
    if failed:
        credits = 0
    elif own.credits_charged is not None:
        credits = own.credits_charged
    elif inherited.credits_charged is not None:
        credits = inherited.credits_charged
    elif own.action_type is not None:  # the span itself says which action it is: that action's price
        credits = ACTION_CREDITS.get(own.action_type, 0)
    else:
        credits = 0  # an inherited action is charged by whoever owns it, never once per call
    metadata: dict[str, Any] = {
        "trace_id": f"{data.trace_id:032x}",
        "span_id": f"{data.span_id:016x}",
        "span_name": data.name,
    }
    for key in _METADATA_KEYS:
        value = get(key)
        if value and isinstance(value, str):
            metadata[key] = value
    if attribution.action_id is not None:
        metadata["action_id"] = attribution.action_id
    error = None
    if failed:
        error = _error_name(get("error.type"), data.status_description)
        metadata["error"] = error
    tokens_in = _first(get, INPUT_TOKENS, None)
    tokens_out = _first(get, OUTPUT_TOKENS, None)
    usage_missing = tokens_in is None and tokens_out is None and not failed
    if usage_missing:
        metadata["usage_missing"] = True
    tokens_in, tokens_out = tokens_in or 0, tokens_out or 0
    cache_read = _first(get, CACHE_READ_TOKENS, 0)
    cache_write = _first(get, CACHE_WRITE_TOKENS, 0)
    if (
        (cache_read or cache_write)
        and _is_count(tokens_in, cache_read, cache_write)
        and cache_read + cache_write > tokens_in
        and _is_anthropic(attributes)
    ):
        # Anthropic's own input_tokens leave the cached ones out; an instrumentation passing that
        # count on cannot report fewer input tokens than it read and wrote to the cache.
        tokens_in += cache_read + cache_write
    response_id = get(RESPONSE_ID)
    if response_id and isinstance(response_id, str):
        metric_id = metric_id_for_response(response_id)
    elif data.trace_id:
        metric_id = metric_id_for_span(data.trace_id, data.span_id)
    else:
        metric_id = uuid7()
    model = _first(get, MODELS, UNKNOWN_MODEL)
    metric = ActionMetric(
        action_type,
        attribution.user_id or mapping.default_user_id,
        attribution.town_id or mapping.default_town_id,
        attribution.citizen_id,
        tokens_in,
        tokens_out,
        model,
        (data.end_ns - data.start_ns) / 1e6,
        credits,
        datetime.fromtimestamp(data.start_ns / 1e9, UTC),
        metadata,
        metric_id,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=_first(get, REASONING_TOKENS, 0),
        error=error,
    )
    request_model = get("gen_ai.request.model")
    return GenAICall(
        metric,
        usage_missing,
        problems,
        request_model if isinstance(request_model, str) else metric.model,
    )


def _first(get: Callable[[str], Any], keys: tuple[str, ...], default: Any) -> Any:
    for key in keys:
        value = get(key)
        if value is not None:
            return value
    return default


def _is_anthropic(attributes: Mapping[str, AttributeValue]) -> bool:
    return any(attributes.get(key) == "anthropic" for key in _PROVIDERS)


def _is_count(*values: object) -> bool:
    return all(isinstance(value, int) and not isinstance(value, bool) for value in values)


def _error_name(error_type: AttributeValue | None, description: str | None) -> str:
    """The error's type name; "<class 'openai.InternalServerError'>" (as some report it) read as its name.

    Without `error.type`, the name leading the status description ("TimeoutError: <message>", as the
    SDK writes it for an exception raised in a span), never the message, which may hold anything a
    customer typed; a description that starts with no name is "error"."""
    if isinstance(error_type, str) and error_type:
        match = _CLASS_REPR.fullmatch(error_type)
        return (match.group(1) if match else error_type)[:256]
    named = _LEADING_NAME.fullmatch(description or "")
    return named.group(1)[:256] if named else "error"


# --- one call, one metric --------------------------------------------------------------------

_REMEMBERED: Final = 16_384
_UNNAMED: Final = frozenset({ANONYMOUS_USER, UNKNOWN_TOWN, None})
"""What a report that names no user, town or citizen has instead: the same call as any named one."""
_PER_TRACE_AND_MODEL: Final = 64


class _Reported(NamedTuple):
    trace_id: int
    start_ns: int
    end_ns: int
    span_id: int
    parent_span_id: int | None
    has_response_id: bool
    who: tuple[str, str, str | None]
    """The call's user, town and citizen (the anonymous user, the unknown town, None when not named)."""


@dataclass(slots=True)
class _ModelReports:
    """The calls of one request model recently recorded, most recent last."""

    reports: list[_Reported] = field(default_factory=list)
    unnamed: int = 0
    """How many of them name no response: the only ones a call that names one is compared with."""


class CallDeduplicator:
    """Remembers the calls recently recorded, so that a second span of the same call is not.

    Memory is bounded (the last 16k calls); across processes, the response-derived metric id makes
    the store's idempotent insert do the same.
    """

    def __init__(self) -> None:
        self._ids: OrderedDict[int, None] = OrderedDict()
        """Metric ids (as ints: a UUID's hash is Python code) of the calls that named their response."""
        self._spans: OrderedDict[str, _ModelReports] = OrderedDict()
        self._lock = threading.Lock()

    def first_report(self, data: SpanData, call: GenAICall) -> bool:
        """True for the first span of a call (remembered from now on), False for a repeat."""
        has_response_id = isinstance(data.attributes.get(RESPONSE_ID), str)
        metric = call.metric
        this = _Reported(
            data.trace_id,
            data.start_ns,
            data.end_ns,
            data.span_id,
            data.parent_span_id,
            has_response_id,
            (metric.user_id, metric.town_id, metric.citizen_id),
        )
        key, metric_id = call.request_model, call.metric.id.int
        with self._lock:
            if has_response_id and metric_id in self._ids:
                return False
            remembered = self._spans.get(key)
            if remembered is None:
                remembered = self._spans[key] = _ModelReports()
            else:
                self._spans.move_to_end(key)
            # Two spans that both name their response are the same call only by id (checked above).
            if not has_response_id:
                if any(_same_call(this, other) for other in remembered.reports):
                    return False
            elif remembered.unnamed and any(
                _same_call(this, other) for other in remembered.reports if not other.has_response_id
            ):
                return False
            if has_response_id:
                self._ids[metric_id] = None
                if len(self._ids) > _REMEMBERED:
                    self._ids.popitem(last=False)
            else:
                remembered.unnamed += 1
            remembered.reports.append(this)
            if len(remembered.reports) > _PER_TRACE_AND_MODEL:
                remembered.unnamed -= not remembered.reports.pop(0).has_response_id
            if len(self._spans) > _REMEMBERED:
                self._spans.popitem(last=False)
        return True


def _same_call(this: _Reported, other: _Reported) -> bool:
    if this.has_response_id and other.has_response_id:
        return False  # both named their response, and differently (same ids were caught before)
    if any(
        mine != theirs and mine not in _UNNAMED and theirs not in _UNNAMED
        for mine, theirs in zip(this.who, other.who, strict=True)
    ):
        return False  # made for two users, towns or citizens: two calls, whatever their times
    if this.parent_span_id is None and other.parent_span_id is None:
        related = True  # two root spans: each instrumentation started its own trace
    else:
        related = this.trace_id == other.trace_id and (
            this.parent_span_id == other.parent_span_id
            or this.parent_span_id == other.span_id
            or other.parent_span_id == this.span_id
        )
    encloses = (this.start_ns <= other.start_ns and other.end_ns <= this.end_ns) or (
        other.start_ns <= this.start_ns and this.end_ns <= other.end_ns
    )
    return related and encloses
