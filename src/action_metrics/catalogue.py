"""The model price catalogue: pydantic's genai-prices, whose data ships inside the package (offline).

`look_up` turns the model names our data holds into effective-dated `ModelPrice`s with the
catalogue's history: every price a model had, from the UTC midnight its catalogue start date names
(the first one from the beginning of time), as genai-prices' own calculator picks a price by a
call's timestamp. genai-prices resolves the name as providers and instrumentations spell it
(`claude-sonnet-4-5-20250929`, `claude-sonnet-4-5@20250929`, `gpt-4o-mini-2024-07-18`); a provider
prefix (`anthropic/claude-sonnet-4.5`) that it does not match is read as the provider.

We price a call per token with a flat price in SQL, so what genai-prices prices otherwise is stored
as its nearest flat form and said, never silently wrong:
- a price that rises above a request size (Anthropic's and OpenAI's 200k-input-token tiers) is
  stored at its base tier with `tiered_above_tokens` set: calls above it are understated;
- a price that depends on the time of day (DeepSeek's off-peak) is not synced: the model stays
  unpriced until a price is set by hand;
- prices of what a metric does not record (1-hour cache writes, per-request fees, a separate
  reasoning price, audio or image tokens, searches) are named in the model's notes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Final

from genai_prices import data_snapshot, types

from action_metrics.errors import InvalidPrice
from action_metrics.pricing import BEGINNING_OF_TIME, ModelPrice

_FLAT_PRICES: Final = {
    "input_per_1m": "input_mtok",
    "output_per_1m": "output_mtok",
    "cache_read_per_1m": "cache_read_mtok",
    "cache_write_per_1m": "cache_write_mtok",
}
"""Our price of each token kind, and genai-prices' key for it (USD per 1M tokens both)."""

_NOT_RECORDED: Final = {
    "cache_write_1h_mtok": "1-hour cache writes (priced here as 5-minute writes)",
    "output_reasoning_mtok": "a separate reasoning-token price (priced here as output)",
    "requests_kcount": "a per-request fee (not counted)",
    "web_searches_kcount": "web searches (not recorded)",
    "storage_searches_kcount": "file searches (not recorded)",
}
"""What a catalogue price covers that a metric cannot tell apart; other keys are named as they are."""


@dataclass(frozen=True, slots=True)
class CatalogueModel:
    """One model of our data as the catalogue prices it."""

    model: str
    """The name as our data spells it: the prices are stored under it."""
    catalogue_id: str
    """`provider/model` in genai-prices."""
    prices: tuple[ModelPrice, ...]
    """Its price history, oldest first, each in force until the next."""
    notes: tuple[str, ...]
    """What the stored flat prices leave out (see the module's docstring)."""

    @property
    def tiered_above_tokens(self) -> int | None:
        """The lowest request size above which a price of its history rises, if any."""
        tiers = [price.tiered_above_tokens for price in self.prices if price.tiered_above_tokens is not None]
        return min(tiers, default=None)


@dataclass(frozen=True, slots=True)
class Lookup:
    """The catalogue's answer for a set of model names."""

    found: tuple[CatalogueModel, ...]
    unknown: tuple[str, ...]
    """Names the catalogue does not know: unpriced until `action-metrics prices set`."""
    not_synced: tuple[tuple[str, str], ...]
    """(name, why) for names it knows but whose price we cannot store as a flat price."""


@dataclass(frozen=True, slots=True)
class PriceSync:
    """What `prices sync` did: the catalogue's answer, and the models whose catalogue prices stop at
    their first manual price (its start), which wins."""

    lookup: Lookup
    held_back: dict[str, datetime]
    priced_by_hand: frozenset[str]
    """Models seen that have a manual price (the seed's among them)."""

    @property
    def unpriced(self) -> tuple[str, ...]:
        """Models seen that neither the catalogue nor a manual price prices."""
        return tuple(model for model in self.lookup.unknown if model not in self.priced_by_hand)


class _NotSyncable(Exception):
    """The catalogue prices this model in a way a flat per-token price cannot hold. Never leaves
    this module: `look_up` reports it in `Lookup.not_synced`."""


def look_up(models: Iterable[str]) -> Lookup:
    """The catalogue's prices, with their history, of each of `models` it knows."""
    found: list[CatalogueModel] = []
    unknown: list[str] = []
    not_synced: list[tuple[str, str]] = []
    for model in sorted(set(models)):
        resolved = _resolve(model)
        if resolved is None:
            unknown.append(model)
            continue
        provider, info = resolved
        try:
            found.append(_history(model, provider, info))
        except _NotSyncable as error:
            not_synced.append((model, str(error)))
    return Lookup(found=tuple(found), unknown=tuple(unknown), not_synced=tuple(not_synced))


def _resolve(model: str) -> tuple[types.Provider, types.ModelInfo] | None:
    snapshot = data_snapshot.get_snapshot()
    try:
        return snapshot.find_provider_model(model, None, None, None)
    except LookupError:
        pass
    provider, slash, name = model.partition("/")
    if not slash or not name:
        return None
    try:
        return snapshot.find_provider_model(name, None, provider, None)
    except LookupError:
        return None


def _history(model: str, provider: types.Provider, info: types.ModelInfo) -> CatalogueModel:
    conditional = [] if isinstance(info.prices, types.ModelPrice) else info.prices
    starts = {BEGINNING_OF_TIME}
    for conditional_price in conditional:
        constraint = conditional_price.constraint
        if isinstance(constraint, types.TimeOfDateConstraint):
            raise _NotSyncable(
                "its price depends on the time of day; set one with `action-metrics prices set`"
            )
        if isinstance(constraint, types.StartDateConstraint):
            starts.add(datetime.combine(constraint.start_date, time(0), UTC))
    history: list[ModelPrice] = []
    notes: set[str] = set()
    for start in sorted(starts):
        catalogue_price = info.get_prices(start)  # the library's own choice at that instant
        price = _flat(model, catalogue_price, start)
        notes.update(_notes(catalogue_price))
        if not history or _changed(history[-1], price):
            history.append(price)
    tiered = min((p.tiered_above_tokens for p in history if p.tiered_above_tokens is not None), default=None)
    if tiered is not None:
        notes.add(f"prices rise above {tiered:,} input tokens per call: calls above are understated")
    return CatalogueModel(
        model=model,
        catalogue_id=f"{provider.id}/{info.id}",
        prices=tuple(history),
        notes=tuple(sorted(notes)),
    )


def _flat(model: str, catalogue_price: types.ModelPrice, start: datetime) -> ModelPrice:
    """The base tier of each token price, and the lowest request size at which a tier begins."""
    amounts: dict[str, Decimal | None] = {}
    thresholds: list[int] = []
    for ours, key in _FLAT_PRICES.items():
        value = getattr(catalogue_price, key)
        if isinstance(value, types.TieredPrices):
            thresholds.extend(tier.start for tier in value.tiers)
            value = value.base
        amounts[ours] = value
    input_price, output_price = amounts["input_per_1m"], amounts["output_per_1m"]
    if input_price is None or output_price is None:
        raise _NotSyncable("it is not priced per input and output token")
    try:
        price = ModelPrice.of(
            model,
            input_price,
            output_price,
            start,
            cache_read_per_1m=amounts["cache_read_per_1m"],
            cache_write_per_1m=amounts["cache_write_per_1m"],
        )
    except InvalidPrice as error:
        raise _NotSyncable(f"its catalogue price does not fit a stored price: {error}") from None
    return replace(price, source="catalogue", tiered_above_tokens=min(thresholds, default=None))


def _notes(catalogue_price: types.ModelPrice) -> set[str]:
    notes = set()
    for key, value in vars(catalogue_price).items():
        if value is None or key.startswith("_") or key in _FLAT_PRICES.values():
            continue
        notes.add(f"also prices {_NOT_RECORDED.get(key, key.removesuffix('_mtok').replace('_', ' '))}")
    return notes


def _changed(before: ModelPrice, after: ModelPrice) -> bool:
    fields = (*_FLAT_PRICES, "tiered_above_tokens")
    return any(getattr(before, name) != getattr(after, name) for name in fields)
