"""`ActionMetric`: one action a product took, validated when it is made so the store never sees bad data."""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from action_metrics.errors import InvalidMetric
from action_metrics.pricing import MODEL_COSTS_PER_1M, REVENUE_PER_CREDIT_USD
from action_metrics.validation import (
    as_utc,
    check_action_type,
    check_count,
    check_id,
    check_latency,
    check_metadata,
    check_model,
    shown,
)

# --- time-ordered ids ------------------------------------------------------------------------

_uuid7_lock = threading.Lock()
_uuid7_last_stamp = 0


def uuid7() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, 12 bits of sub-millisecond time, 62 random bits.

    Ids made by one process are strictly increasing, so rows land in primary-key order.
    """
    global _uuid7_last_stamp
    nanos = time.time_ns()
    stamp = (nanos // 1_000_000) << 12 | (nanos % 1_000_000) * 4096 // 1_000_000
    with _uuid7_lock:
        if stamp <= _uuid7_last_stamp:
            stamp = _uuid7_last_stamp + 1
        _uuid7_last_stamp = stamp
    random_bits = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (stamp >> 12) << 80 | 0x7 << 76 | (stamp & 0xFFF) << 64 | 0b10 << 62 | random_bits
    return uuid.UUID(int=value)


# --- the metric ------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, eq=True)
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
    timestamp: datetime = field(default_factory=_now)
    metadata: dict[str, Any] = field(default_factory=dict)
    id: uuid.UUID = field(default_factory=uuid7)
    metadata_json: str = field(default="{}", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "action_type", check_action_type(self.action_type))
        setattr_(self, "user_id", check_id("user_id", self.user_id))
        setattr_(self, "town_id", check_id("town_id", self.town_id))
        if self.citizen_id is not None:
            setattr_(self, "citizen_id", check_id("citizen_id", self.citizen_id))
        setattr_(self, "tokens_in", check_count("tokens_in", self.tokens_in))
        setattr_(self, "tokens_out", check_count("tokens_out", self.tokens_out))
        setattr_(self, "model", check_model(self.model))
        setattr_(self, "latency_ms", check_latency(self.latency_ms))
        setattr_(self, "credits_charged", check_count("credits_charged", self.credits_charged))
        setattr_(self, "timestamp", as_utc("timestamp", self.timestamp))
        metadata, text = check_metadata(self.metadata)
        setattr_(self, "metadata", metadata)
        setattr_(self, "metadata_json", text)
        if not isinstance(self.id, uuid.UUID):
            try:
                setattr_(self, "id", uuid.UUID(str(self.id)))
            except ValueError:
                raise InvalidMetric("id", f"expected a UUID, got {shown(self.id)}") from None

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
        if self.citizen_id is not None:
            attributes["action.citizen_id"] = self.citizen_id
        cost = self.estimated_cost_usd
        if cost is not None:
            attributes["action.cost_usd"] = cost
        return attributes
