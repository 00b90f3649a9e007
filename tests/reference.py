"""An independent reference for aggregates: Python `decimal` for money, NumPy for percentiles.

It shares nothing with the code under test but the ActionMetric values it is given.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import numpy as np
import pytest

from action_metrics import ActionMetric


@dataclass(frozen=True)
class PriceBook:
    """Effective-dated prices as the test set them: model -> [(from, input, output)], credits."""

    models: dict[str, list[tuple[Any, ...]]]
    """model -> [(from, input, output)] or [(from, input, output, cache_read, cache_write)]."""
    credits: list[tuple[datetime, Decimal]]

    def model_price(self, model: str, at: datetime) -> tuple[Decimal, Decimal, Decimal, Decimal] | None:
        """(input, output, cache read, cache write) in force at `at`; a missing cache price is the input's."""
        in_force = [p for p in self.models.get(model, []) if p[0] <= at]
        if not in_force:
            return None
        _, input_price, output_price, *cache = max(in_force, key=lambda p: p[0])
        cache_read, cache_write = (*cache, None, None)[:2]
        return (
            input_price,
            output_price,
            input_price if cache_read is None else cache_read,
            input_price if cache_write is None else cache_write,
        )

    def credit_price(self, at: datetime) -> Decimal:
        return max((p for p in self.credits if p[0] <= at), key=lambda p: p[0])[1]


def select_like_the_store(metrics: list[ActionMetric], filters: dict[str, Any]) -> list[ActionMetric]:
    """The metrics `query(**filters)` returns, newest first: equality filters, `since` inclusive,
    `until` exclusive, the newest `limit`."""
    chosen = [m for m in metrics if _matches(m, filters)]
    chosen.sort(key=lambda m: (m.timestamp, m.id), reverse=True)
    limit = filters.get("limit")
    return chosen if limit is None else chosen[:limit]


def _matches(metric: ActionMetric, filters: dict[str, Any]) -> bool:
    for name, value in filters.items():
        if name == "since" and metric.timestamp < value:
            return False
        if name == "until" and metric.timestamp >= value:
            return False
        if name not in ("since", "until", "limit") and getattr(metric, name) != value:
            return False
    return True


def cost(metric: ActionMetric, book: PriceBook) -> Decimal | None:
    price = book.model_price(metric.model, metric.timestamp)
    if price is None:
        return None
    input_price, output_price, cache_read_price, cache_write_price = price
    uncached = metric.tokens_in - metric.cache_read_tokens - metric.cache_write_tokens
    return (
        uncached * input_price
        + metric.cache_read_tokens * cache_read_price
        + metric.cache_write_tokens * cache_write_price
        + metric.tokens_out * output_price
    ) / Decimal(1_000_000)


def revenue(metric: ActionMetric, book: PriceBook) -> Decimal:
    return metric.credits_charged * book.credit_price(metric.timestamp)


def percentile(values: list[float], fraction: float) -> float | None:
    return float(np.percentile(values, fraction * 100, method="linear")) if values else None


def expected_aggregate(metrics: list[ActionMetric], book: PriceBook) -> dict[str, Any]:
    """The aggregate's figures; latency percentiles describe the successful actions only."""
    latencies = [m.latency_ms for m in metrics]
    succeeded = [m.latency_ms for m in metrics if m.error is None]
    costs = [cost(m, book) for m in metrics]
    revenues = [revenue(m, book) for m in metrics]
    total_cost = sum((c for c in costs if c is not None), Decimal(0))
    total_revenue = sum(revenues, Decimal(0))
    margins = [(r - c) / r for c, r in zip(costs, revenues, strict=True) if c is not None and r > 0]
    by_model: dict[str, dict[str, Any]] = {}
    for model in {m.model for m in metrics}:
        chosen = [(m, c) for m, c in zip(metrics, costs, strict=True) if m.model == model]
        model_latencies = [m.latency_ms for m, _ in chosen]
        by_model[model] = {
            "count": len(chosen),
            "total_tokens": sum(m.total_tokens for m, _ in chosen),
            "avg_latency_ms": statistics.fmean(model_latencies),
            "p95_latency_ms": percentile([m.latency_ms for m, _ in chosen if m.error is None], 0.95),
            "total_cost_usd": sum((c for _, c in chosen if c is not None), Decimal(0)),
            "unpriced_count": sum(1 for _, c in chosen if c is None),
        }
    return {
        "count": len(metrics),
        "tokens_in": sum(m.tokens_in for m in metrics),
        "tokens_out": sum(m.tokens_out for m in metrics),
        "total_tokens": sum(m.total_tokens for m in metrics),
        "total_credits": sum(m.credits_charged for m in metrics),
        "cache_read_tokens": sum(m.cache_read_tokens for m in metrics),
        "cache_write_tokens": sum(m.cache_write_tokens for m in metrics),
        "reasoning_tokens": sum(m.reasoning_tokens for m in metrics),
        "avg_latency_ms": statistics.fmean(latencies) if latencies else None,
        "p50_latency_ms": percentile(succeeded, 0.50),
        "p95_latency_ms": percentile(succeeded, 0.95),
        "p99_latency_ms": percentile(succeeded, 0.99),
        "total_cost_usd": total_cost,
        "total_revenue_usd": total_revenue,
        "total_profit_usd": total_revenue - total_cost,
        "avg_margin": sum(margins, Decimal(0)) / len(margins) if margins else None,
        "gross_margin": (total_revenue - total_cost) / total_revenue if total_revenue else None,
        "unpriced_count": sum(1 for c in costs if c is None),
        "error_count": sum(1 for m in metrics if m.error is not None),
        "by_model": by_model,
    }


MONEY_TOLERANCE = 1e-9
RELATIVE_TOLERANCE = 1e-9
HISTOGRAM_TOLERANCE = 0.01
"""Percentiles merged from the rollups' latency histograms are within 1% of the exact ones."""
PERCENTILE_KEYS = ("p50_latency_ms", "p95_latency_ms", "p99_latency_ms")


def assert_matches(
    actual: dict[str, Any], expected: dict[str, Any], where: str = "", *, exact: bool | None = None
) -> None:
    """Integers exactly; money to 1e-9 USD; averages and margins to 1e-9 relative; percentiles to
    1e-9 relative when the aggregate says they are exact, else to 1%."""
    if exact is None:
        exact = actual.get("percentiles_exact", True)
    for key, want in expected.items():
        got = actual[key]
        label = f"{where}{key}"
        if key == "by_model":
            assert set(got) == set(want), label
            for model, stats in want.items():
                assert_matches(got[model], stats, where=f"{label}[{model}].", exact=exact)
        elif key in PERCENTILE_KEYS and want is not None and not exact:
            assert got is not None, label
            assert got == pytest.approx(float(want), rel=HISTOGRAM_TOLERANCE), f"{label}: {got} vs {want}"
        elif want is None or isinstance(want, int):
            assert got == want, f"{label}: {got!r} != {want!r}"
        elif key.endswith("_usd"):
            assert got is not None, label
            assert abs(Decimal(repr(got)) - want) <= Decimal(MONEY_TOLERANCE), f"{label}: {got} vs {want}"
        else:
            assert got is not None, label
            assert float(got) == _approx(float(want)), f"{label}: {got} vs {want}"


def _approx(value: float) -> Any:
    return pytest.approx(value, rel=RELATIVE_TOLERANCE, abs=1e-12)


def assert_same_figures(rollups: Any, exact: Any) -> None:
    """Two aggregates of the same selection, from the rollups and from raw rows: every figure equal
    (floats to 1e-9 relative), percentiles to 1%."""
    expected = exact.to_dict()
    expected.pop("percentiles_exact")
    for stats in expected["by_model"].values():
        for key, value in stats.items():
            if isinstance(value, float):
                stats[key] = Decimal(repr(value)) if key.endswith("_usd") else value
    for key, value in list(expected.items()):
        if key.endswith("_usd") and isinstance(value, float):
            expected[key] = Decimal(repr(value))
    assert_matches(rollups.to_dict(), expected, exact=rollups.percentiles_exact)
