"""The seed's vocabulary of actions and models, and the prices seeded into a new database.

These constants are defaults: the database's effective-dated `model_prices` and `credit_prices`
tables are the source of truth once a store exists (`MetricsStore.set_model_price`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Final, Literal

from action_metrics.errors import InvalidPrice
from action_metrics.validation import as_integer, as_utc, check_model


class ActionType(StrEnum):
    """Actions the seed's Agent Town knows; any other lowercase slug is accepted as a plain string."""

    LOD3 = "lod3"
    LOD4 = "lod4"
    LOD5 = "lod5"
    BRANCH = "branch"
    INHABIT = "inhabit"
    FORCE = "force"
    DIALOGUE = "dialogue"
    GREET = "greet"
    GOSSIP = "gossip"
    TRADE = "trade"
    SOLO = "solo"


class ModelName(StrEnum):
    """Models the seed priced; real provider names (`claude-sonnet-4-5@20250929`) are plain strings."""

    HAIKU = "haiku"
    SONNET = "sonnet"
    OPUS = "opus"
    TEMPLATE = "template"
    CACHED = "cached"


MODEL_COSTS_PER_1M: Final[dict[str, tuple[float, float]]] = {
    ModelName.HAIKU: (0.25, 1.25),
    ModelName.SONNET: (3.00, 15.00),
    ModelName.OPUS: (15.00, 75.00),
    # Known to be free: priced at zero, so they never count as unpriced.
    ModelName.TEMPLATE: (0.0, 0.0),
    ModelName.CACHED: (0.0, 0.0),
}
"""USD per one million (input, output) tokens."""

ACTION_CREDITS: Final[dict[str, int]] = {
    ActionType.LOD3: 10,
    ActionType.LOD4: 100,
    ActionType.LOD5: 400,
    ActionType.BRANCH: 150,
    ActionType.INHABIT: 100,
    ActionType.FORCE: 50,
    # Dialogue is part of the INHABIT session's cost; flux runs as the system user: not billable.
    ActionType.DIALOGUE: 0,
    ActionType.GREET: 0,
    ActionType.GOSSIP: 0,
    ActionType.TRADE: 0,
    ActionType.SOLO: 0,
}
"""Credits charged per action by default."""

REVENUE_PER_CREDIT_USD: Final[float] = 0.006
"""Conservative revenue of one credit (the Adventurer tier)."""

BEGINNING_OF_TIME: Final[datetime] = datetime(1, 1, 1, tzinfo=UTC)
"""`effective_from` of the seeded prices: the earliest instant a metric can carry."""


PRICE_QUANTUM: Final = Decimal("0.000000001")
MAX_PRICE: Final = Decimal(10) ** 11
"""Prices are stored as NUMERIC(20, 9)."""


def exact(value: float | int | str | Decimal) -> Decimal:
    """A price as the exact decimal the user wrote (0.25, not 0.2500000000000000138...)."""
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _checked_price(field_name: str, value: float | int | str | Decimal) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, float | int | str | Decimal):
        integer = as_integer(value)  # NumPy's int64, say
        if integer is None:
            raise InvalidPrice(field_name, f"expected a number, got {type(value).__name__}")
        value = integer
    try:
        price = exact(value)
    except ArithmeticError:
        raise InvalidPrice(field_name, f"expected a number, got {value!r}") from None
    if not price.is_finite() or price < 0:
        raise InvalidPrice(field_name, f"expected a finite amount >= 0, got {value}")
    if price != price.quantize(PRICE_QUANTUM) or price >= MAX_PRICE:
        raise InvalidPrice(field_name, f"expected at most 9 decimals and < {MAX_PRICE}, got {value}")
    return price


def _effective_from(value: datetime | None) -> datetime:
    return datetime.now(UTC) if value is None else as_utc("effective_from", value, InvalidPrice)


PriceSource = Literal["manual", "catalogue"]
"""Who set a model price: by hand (`set_model_price`, `prices set`, the seed) or `prices sync`."""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per 1M input, output and cached input tokens of `model`, in force from `effective_from` on."""

    model: str
    input_per_1m: Decimal
    output_per_1m: Decimal
    effective_from: datetime
    cache_read_per_1m: Decimal | None = None
    """USD per 1M input tokens read from the prompt cache; None: the input price."""
    cache_write_per_1m: Decimal | None = None
    source: PriceSource = "manual"
    """A manual price wins over the catalogue's (`action-metrics prices sync` never overrides it)."""
    tiered_above_tokens: int | None = None
    """The catalogue charges more for calls above this many input tokens; these are its base prices."""

    @classmethod
    def of(
        cls,
        model: str,
        input_per_1m: float | int | str | Decimal,
        output_per_1m: float | int | str | Decimal,
        effective_from: datetime | None = None,
        *,
        cache_read_per_1m: float | int | str | Decimal | None = None,
        cache_write_per_1m: float | int | str | Decimal | None = None,
    ) -> ModelPrice:
        return cls(
            model=check_model(model, InvalidPrice),
            input_per_1m=_checked_price("input_per_1m", input_per_1m),
            output_per_1m=_checked_price("output_per_1m", output_per_1m),
            effective_from=_effective_from(effective_from),
            cache_read_per_1m=None
            if cache_read_per_1m is None
            else _checked_price("cache_read_per_1m", cache_read_per_1m),
            cache_write_per_1m=None
            if cache_write_per_1m is None
            else _checked_price("cache_write_per_1m", cache_write_per_1m),
        )


@dataclass(frozen=True, slots=True)
class CreditPrice:
    """USD earned per credit, in force from `effective_from` on."""

    usd_per_credit: Decimal
    effective_from: datetime

    @classmethod
    def of(
        cls, usd_per_credit: float | int | str | Decimal, effective_from: datetime | None = None
    ) -> CreditPrice:
        return cls(
            usd_per_credit=_checked_price("usd_per_credit", usd_per_credit),
            effective_from=_effective_from(effective_from),
        )
