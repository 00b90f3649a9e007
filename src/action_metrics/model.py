"""`ActionMetric`: one action a product took, validated when it is made so the store never sees bad data."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Final

from action_metrics.errors import InvalidMetric, MetricInPrunedPeriod
from action_metrics.pricing import MODEL_COSTS_PER_1M, REVENUE_PER_CREDIT_USD
from action_metrics.validation import (
    MAX_ID_LENGTH,
    MAX_INT64,
    MAX_LATENCY_MS,
    as_utc,
    check_action_type,
    check_count,
    check_error,
    check_id,
    check_latency,
    check_metadata,
    check_model,
    check_token_kinds,
    json_text,
    shown,
)

# --- time-ordered ids ------------------------------------------------------------------------

_RANDOM_POOL_BYTES: Final = 4096


class _Uuid7State:
    """The last stamp handed out, and a pool of CSPRNG words.

    Random bits come from `os.urandom` 4 KiB at a time (one system call per 512 ids); a forked child
    starts a fresh state, or parent and child would hand out the same bits.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_stamp = 0
        self.random_words: list[int] = []


_uuid7_state = _Uuid7State()


def _forget_inherited_state() -> None:
    global _uuid7_state
    _uuid7_state = _Uuid7State()


os.register_at_fork(after_in_child=_forget_inherited_state)

# uuid.UUID(int=...) re-checks a value that is valid by construction; set its two slots directly.
_new_uuid = object.__new__
_set_uuid_int = uuid.UUID.__dict__["int"].__set__
_set_uuid_safety = uuid.UUID.__dict__["is_safe"].__set__
_UNKNOWN_SAFETY: Final = uuid.SafeUUID.unknown
_RANDOM_62_BITS: Final = (1 << 62) - 1
_VERSION_AND_VARIANT: Final = 0x7 << 76 | 0b10 << 62


def uuid7() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, 12 bits of sub-millisecond time, 62 random bits.

    Ids made by one process are strictly increasing, so rows land in primary-key order.
    """
    milliseconds, nanos = divmod(time.time_ns(), 1_000_000)
    stamp = milliseconds << 12 | nanos * 4096 // 1_000_000
    state = _uuid7_state
    with state.lock:
        if stamp <= state.last_stamp:
            stamp = state.last_stamp + 1
        state.last_stamp = stamp
        words = state.random_words
        if not words:
            words.extend(memoryview(os.urandom(_RANDOM_POOL_BYTES)).cast("Q"))
        random_bits = words.pop() & _RANDOM_62_BITS
    return uuid_from_int(_uuid7_int(stamp, random_bits))


def uuid_from_int(value: int) -> uuid.UUID:
    """`uuid.UUID(int=value)` for a value made valid by construction (128 bits, its version and
    variant set), without checking it again."""
    made: uuid.UUID = _new_uuid(uuid.UUID)
    _set_uuid_int(made, value)
    _set_uuid_safety(made, _UNKNOWN_SAFETY)
    return made


def uuid7_at(moment: datetime, random_bits: int) -> uuid.UUID:
    """The UUIDv7 of `moment` made from 74 given random bits (12 of them where `uuid7()` puts the
    sub-millisecond time): repeatable ids, for a simulation that must store each metric once."""
    stamp = int(moment.timestamp() * 1000) << 12 | (random_bits >> 62) & 0xFFF
    return uuid.UUID(int=_uuid7_int(stamp, random_bits & _RANDOM_62_BITS))


def _uuid7_int(stamp: int, random_bits: int) -> int:
    """RFC 9562's layout of a 60-bit stamp (Unix milliseconds << 12 | 12 more bits) and 62 random bits."""
    return (stamp >> 12) << 80 | (stamp & 0xFFF) << 64 | _VERSION_AND_VARIANT | random_bits


# --- the metric ------------------------------------------------------------------------------

_REQUIRED_DICT_FIELDS: Final = (
    "id",
    "action_type",
    "user_id",
    "town_id",
    "tokens_in",
    "tokens_out",
    "model",
    "latency_ms",
    "credits_charged",
)
_DICT_FIELDS: Final = frozenset(
    (
        *_REQUIRED_DICT_FIELDS,
        "citizen_id",
        "timestamp",
        "metadata",
        "cache_read_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
        "error",
    )
)
_DERIVED_FIELDS: Final = frozenset(("total_tokens", "estimated_cost_usd", "revenue_usd", "gross_margin"))
_KNOWN_DICT_FIELDS: Final = _DICT_FIELDS | _DERIVED_FIELDS
_REQUIRED_SET: Final = frozenset(_REQUIRED_DICT_FIELDS)


def _parse_timestamp(value: object) -> datetime:
    """ISO 8601 with an offset: a wire has no local time to read a naive one in."""
    if not isinstance(value, str):
        raise InvalidMetric("timestamp", f"expected an ISO 8601 string, got {type(value).__name__}")
    try:  # RFC 3339 allows a lower-case z; fromisoformat does not
        moment = datetime.fromisoformat(value[:-1] + "Z" if value.endswith("z") else value)
    except ValueError:
        example = "2026-01-31T12:00:00Z"
        raise InvalidMetric("timestamp", f"expected ISO 8601 such as {example}, got {shown(value)}") from None
    if moment.utcoffset() is None:
        raise InvalidMetric("timestamp", f"needs a UTC offset or Z, got {shown(value)}")
    if moment.tzinfo is UTC:
        return moment
    return as_utc("timestamp", moment)


ANONYMOUS_USER: Final = "anonymous"
"""The `user_id` of a metric whose call or span names no user."""
UNKNOWN_TOWN: Final = "unknown"
"""The `town_id` of a metric whose call or span names no town."""
UNKNOWN_MODEL: Final = "unknown"
"""The model of a metric that names none: it is counted as unpriced, never as free."""

_MAX_REMEMBERED_NAMES: Final = 4096
_valid_action_types: set[str] = set()
_valid_models: set[str] = set()


def _plain(text: str) -> bool:
    """ASCII without NUL: storable as is, the common case for ids (full check: `check_id`)."""
    return text.isascii() and "\x00" not in text


_set_field = object.__setattr__


def _remember(valid: set[str], name: str) -> str:
    """Note a name that passed its full check; action types and models are few, so a set stays small."""
    if len(valid) < _MAX_REMEMBERED_NAMES:
        valid.add(name)
    return name


_DEFAULT: Final[Any] = object()
_FIRST_INSTANT: Final = datetime.min.replace(tzinfo=UTC)
_LAST_INSTANT: Final = datetime.max.replace(tzinfo=UTC)
_EDGE_INSTANT: Final = (
    "is the first or last instant a datetime can hold, which PostgreSQL's driver stores as -infinity "
    "or infinity: any moment between them is a metric's timestamp"
)
"""Marks an argument left out, so that an explicit None is still checked (and refused)."""


@dataclass(frozen=True, slots=True, eq=True, init=False)
class ActionMetric:
    """One recorded action. Field order follows the seed, so positional construction still works."""

    action_type: str
    user_id: str
    town_id: str
    citizen_id: str | None
    tokens_in: int
    tokens_out: int
    model: str
    latency_ms: float
    credits_charged: int
    timestamp: datetime  # the defaults of these three are given by __init__, below
    metadata: dict[str, Any]
    id: uuid.UUID
    cache_read_tokens: int
    """Input tokens read from the provider's prompt cache: part of `tokens_in` (inclusive totals)."""
    cache_write_tokens: int
    """Input tokens written to the prompt cache: also part of `tokens_in`."""
    reasoning_tokens: int
    """Output tokens spent reasoning: part of `tokens_out`."""
    error: str | None
    """None for a success, else what failed (the error's type name)."""
    metadata_json: str = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        action_type: str,
        user_id: str,
        town_id: str,
        citizen_id: str | None,
        tokens_in: int,
        tokens_out: int,
        model: str,
        latency_ms: float,
        credits_charged: int,
        timestamp: datetime = _DEFAULT,
        metadata: dict[str, Any] = _DEFAULT,
        id: uuid.UUID = _DEFAULT,
        *,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        error: str | None = None,
    ) -> None:
        # Written by hand because instrumented calls build one per call: each value is checked once
        # and stored once. A value of the exact expected type that is obviously valid (ids and names
        # from code, counts from an API response) takes a fast path; anything else goes through the
        # full check in `validation`, which stays the definition of valid.
        if type(action_type) is not str or action_type not in _valid_action_types:
            action_type = _remember(_valid_action_types, check_action_type(action_type))
        if type(user_id) is not str or not (0 < len(user_id) <= MAX_ID_LENGTH and _plain(user_id)):
            user_id = check_id("user_id", user_id)
        if type(town_id) is not str or not (0 < len(town_id) <= MAX_ID_LENGTH and _plain(town_id)):
            town_id = check_id("town_id", town_id)
        if citizen_id is not None and (
            type(citizen_id) is not str or not (0 < len(citizen_id) <= MAX_ID_LENGTH and _plain(citizen_id))
        ):
            citizen_id = check_id("citizen_id", citizen_id)
        if type(tokens_in) is not int or not 0 <= tokens_in <= MAX_INT64:
            tokens_in = check_count("tokens_in", tokens_in)
        if type(tokens_out) is not int or not 0 <= tokens_out <= MAX_INT64:
            tokens_out = check_count("tokens_out", tokens_out)
        if type(model) is not str or model not in _valid_models:
            model = _remember(_valid_models, check_model(model))
        if type(latency_ms) is not float or not 0.0 <= latency_ms <= MAX_LATENCY_MS:
            latency_ms = check_latency(latency_ms)
        if type(credits_charged) is not int or not 0 <= credits_charged <= MAX_INT64:
            credits_charged = check_count("credits_charged", credits_charged)
        kinds = (cache_read_tokens, cache_write_tokens, reasoning_tokens)
        if (
            kinds != (0, 0, 0)
            or not type(cache_read_tokens) is type(cache_write_tokens) is type(reasoning_tokens) is int
        ):
            cache_read_tokens, cache_write_tokens, reasoning_tokens = check_token_kinds(
                tokens_in, tokens_out, cache_read_tokens, cache_write_tokens, reasoning_tokens
            )
        if error is not None:
            error = check_error(error)
        if timestamp is _DEFAULT:
            timestamp = datetime.now(UTC)
        else:
            if type(timestamp) is not datetime or timestamp.tzinfo is not UTC:
                timestamp = as_utc("timestamp", timestamp)
            if not _FIRST_INSTANT < timestamp < _LAST_INSTANT:
                raise InvalidMetric("timestamp", _EDGE_INSTANT)
        if metadata is _DEFAULT or (type(metadata) is dict and not metadata):
            metadata, metadata_json = {}, "{}"  # a new dict: a caller's must not alias a frozen field
        else:
            metadata, metadata_json = check_metadata(metadata)
        if id is _DEFAULT:
            id = uuid7()
        elif type(id) is not uuid.UUID:
            try:
                id = uuid.UUID(str(id))
            except ValueError:
                raise InvalidMetric("id", f"expected a UUID, got {shown(id)}") from None
        set_ = _set_field
        set_(self, "action_type", action_type)
        set_(self, "user_id", user_id)
        set_(self, "town_id", town_id)
        set_(self, "citizen_id", citizen_id)
        set_(self, "tokens_in", tokens_in)
        set_(self, "tokens_out", tokens_out)
        set_(self, "model", model)
        set_(self, "latency_ms", latency_ms)
        set_(self, "credits_charged", credits_charged)
        set_(self, "timestamp", timestamp)
        set_(self, "metadata", metadata)
        set_(self, "id", id)
        set_(self, "cache_read_tokens", cache_read_tokens)
        set_(self, "cache_write_tokens", cache_write_tokens)
        set_(self, "reasoning_tokens", reasoning_tokens)
        set_(self, "error", error)
        set_(self, "metadata_json", metadata_json)

    def charged(self, credits: int) -> ActionMetric:
        """This metric with `credits` charged instead (checked as `credits_charged` is), every other
        field as it is, not checked or serialized again: an OTLP call given its action's credits."""
        if type(credits) is not int or not 0 <= credits <= MAX_INT64:
            credits = check_count("credits_charged", credits)
        metric = ActionMetric.__new__(ActionMetric)
        for name in _SLOTS:
            _set_field(metric, name, getattr(self, name))
        _set_field(metric, "credits_charged", credits)
        return metric

    @classmethod
    def stored(cls, **fields: Any) -> ActionMetric:
        """A metric as the database holds it, not checked again: its rules (migration 0005) already
        refused whatever a reader cannot read, whoever wrote the row. Content rules the database does
        not keep (a printable model name, the metadata's depth) were checked when this library wrote it;
        a row written around the library is read as it is rather than made to fail every `query()`."""
        metric = cls.__new__(cls)
        for name, value in fields.items():
            _set_field(metric, name, value)
        metadata = fields["metadata"]
        try:
            metadata_json = json_text(metadata)
        except ValueError:  # a number JSON allows and Python reads as infinity
            metadata_json = json.dumps(metadata, separators=(",", ":"))
        _set_field(metric, "metadata_json", metadata_json)
        return metric

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActionMetric:
        """The metric of a `to_dict()` (a writer in any language sends that form over the wire).

        Every field goes through the constructor's checks; `id` is required, so a writer that sends
        the same metric again (a retry after a timeout) stores it once. `timestamp` is ISO 8601 with
        a UTC offset (default now). The figures `to_dict()` derives (`total_tokens`, the cost,
        revenue and margin at the default prices) are accepted and ignored: the store prices each
        metric itself. Any other key is an `InvalidMetric` naming it, so a misspelt field is not lost.
        """
        if type(data) is not dict and not isinstance(data, Mapping):
            raise InvalidMetric("metric", f"expected a JSON object, got {type(data).__name__}")
        names = data.keys()
        if unknown := names - _KNOWN_DICT_FIELDS:
            known = ", ".join(sorted(_DICT_FIELDS))
            name = min(map(str, unknown))
            raise InvalidMetric(name[:64], f"unknown field; a metric has {known}")
        if missing := _REQUIRED_SET - names:
            raise InvalidMetric(min(missing), "missing")
        fields = {name: data[name] for name in names & _DICT_FIELDS}
        fields.setdefault("citizen_id", None)
        if "timestamp" in fields:
            fields["timestamp"] = _parse_timestamp(fields["timestamp"])
        return cls(**fields)

    @property
    def total_tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    @property
    def estimated_cost_usd(self) -> float | None:
        """Cost at the seed's default prices; None for a model without one (never a silent $0)."""
        prices = MODEL_COSTS_PER_1M.get(self.model)
        if prices is None:
            return None
        input_per_1m, output_per_1m = prices
        return (self.tokens_in * input_per_1m + self.tokens_out * output_per_1m) / 1_000_000

    @property
    def revenue_usd(self) -> float:
        """Revenue at the default credit price (the store applies the price in force instead)."""
        return self.credits_charged * REVENUE_PER_CREDIT_USD

    @property
    def gross_margin(self) -> float | None:
        """(revenue - cost) / revenue; None when there is no revenue or the cost is unknown."""
        revenue, cost = self.revenue_usd, self.estimated_cost_usd
        if revenue == 0 or cost is None:
            return None
        return (revenue - cost) / revenue

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: ids and timestamps as strings."""
        return {
            "id": str(self.id),
            "action_type": self.action_type,
            "user_id": self.user_id,
            "town_id": self.town_id,
            "citizen_id": self.citizen_id,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "total_tokens": self.total_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "error": self.error,
            "model": self.model,
            "latency_ms": self.latency_ms,
            "credits_charged": self.credits_charged,
            "timestamp": self.timestamp.isoformat(),
            "metadata": self.metadata,
            "estimated_cost_usd": self.estimated_cost_usd,
            "revenue_usd": self.revenue_usd,
            "gross_margin": self.gross_margin,
        }

    def to_otel_span(self) -> dict[str, str | int | float]:
        """Span attributes: the OpenTelemetry GenAI conventions plus our own `action.*` names."""
        attributes: dict[str, str | int | float] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": self.model,
            "gen_ai.usage.input_tokens": self.tokens_in,
            "gen_ai.usage.output_tokens": self.tokens_out,
            "action.id": str(self.id),
            "action.type": self.action_type,
            "action.user_id": self.user_id,
            "action.town_id": self.town_id,
            "action.latency_ms": self.latency_ms,
            "action.credits": self.credits_charged,
            "action.revenue_usd": self.revenue_usd,
        }
        # The GenAI conventions' token kinds, inclusive in the totals above, as ours are.
        for name, value in (
            ("gen_ai.usage.cache_read.input_tokens", self.cache_read_tokens),
            ("gen_ai.usage.cache_write.input_tokens", self.cache_write_tokens),
            ("gen_ai.usage.reasoning.output_tokens", self.reasoning_tokens),
        ):
            if value:
                attributes[name] = value
        if self.error is not None:
            attributes["error.type"] = self.error
        if self.citizen_id is not None:
            attributes["action.citizen_id"] = self.citizen_id
        cost = self.estimated_cost_usd
        if cost is not None:
            attributes["action.cost_usd"] = cost
        return attributes


def refuse_before(cutoff: datetime | None, metrics: Sequence[ActionMetric]) -> None:
    """Raise `MetricInPrunedPeriod` naming every metric of the batch from before `cutoff`, the
    store's prune cut-off (None: never pruned, nothing to check)."""
    if cutoff is None or not metrics:
        return
    oldest = min(metric.timestamp for metric in metrics)
    if oldest < cutoff:
        indexes = [index for index, metric in enumerate(metrics) if metric.timestamp < cutoff]
        raise MetricInPrunedPeriod(cutoff, indexes, oldest)


_SLOTS: Final = tuple(each.name for each in fields(ActionMetric))
"""Every field an `ActionMetric` holds, `metadata_json` included."""
