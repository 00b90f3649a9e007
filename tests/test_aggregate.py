"""Known-answer aggregates: a few thousand generated metrics, every filter and combinations of them,
checked against the independent reference in tests/reference.py on both backends.

The price book changes mid-range: sonnet gets cheaper on day 5, a new model is priced from day 3
(unpriced before), the credit price drops on day 7, and one model is never priced.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from action_metrics import ACTION_CREDITS, ActionMetric, ActionType, MetricsStore
from action_metrics import aggregate as aggregate_module
from action_metrics.dialects import backend_for
from action_metrics.pricing import BEGINNING_OF_TIME, MODEL_COSTS_PER_1M
from action_metrics.query import MetricFilter
from action_metrics.rollup import raw_only

from reference import PriceBook, assert_matches, expected_aggregate, select_like_the_store

pytestmark = pytest.mark.clickhouse  # SQLite, PostgreSQL and ClickHouse

START = datetime(2026, 11, 1, tzinfo=UTC)
DAYS = 10
SONNET_CHEAPER = START + timedelta(days=5)
MINI_PRICED = START + timedelta(days=3)
CREDITS_CHEAPER = START + timedelta(days=7)
TOWNS = ["town-a", "town-b", "town-'quoted'"]
USERS = ["alice", "bob", "system", "100%_user", "back\\slash"]
MODELS = ["haiku", "sonnet", "opus", "template", "cached", "openai/gpt-4o-mini", "mystery-model"]
COUNT = 3000


def _book() -> PriceBook:
    models = {
        model: [(BEGINNING_OF_TIME, Decimal(str(i)), Decimal(str(o)))]
        for model, (i, o) in MODEL_COSTS_PER_1M.items()
    }
    # The cheaper sonnet prices its prompt cache (reads at a tenth, writes at 1.25x the input price);
    # gpt-4o-mini prices cache reads only (writes at the input price).
    models["sonnet"].append(
        (SONNET_CHEAPER, Decimal("2.5"), Decimal("12.5"), Decimal("0.25"), Decimal("3.125"))
    )
    models["openai/gpt-4o-mini"] = [(MINI_PRICED, Decimal("0.15"), Decimal("0.6"), Decimal("0.075"), None)]
    credits = [(BEGINNING_OF_TIME, Decimal("0.006")), (CREDITS_CHEAPER, Decimal("0.0045"))]
    return PriceBook(models, credits)


def _metrics() -> list[ActionMetric]:
    rng = random.Random(20261125)
    action_types = [*ActionType, "custom.op-1"]
    metrics = []
    for _ in range(COUNT):
        action_type = rng.choice(action_types)
        tokens_in = rng.choice([0, rng.randint(1, 5000), rng.randint(10_000, 2_000_000)])
        tokens_out = rng.randint(0, 4000)
        cache_read = rng.choice([0, rng.randint(0, tokens_in)])  # prompt caching on some calls
        metrics.append(
            ActionMetric(
                action_type=action_type,
                user_id=rng.choice(USERS),
                town_id=rng.choice(TOWNS),
                citizen_id=rng.choice([None, *(f"citizen-{i}" for i in range(8))]),
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                cache_read_tokens=cache_read,
                cache_write_tokens=rng.choice([0, 0, tokens_in - cache_read]),
                reasoning_tokens=rng.choice([0, rng.randint(0, tokens_out)]),
                error=rng.choice([None] * 9 + ["TimeoutError"]),  # 1 in 10 failed
                model=rng.choice(MODELS),
                # Ties, sub-millisecond template calls and a long tail.
                latency_ms=rng.choice([0.25, 1, 120, rng.uniform(0, 5), rng.lognormvariate(5, 1)]),
                credits_charged=ACTION_CREDITS.get(action_type, rng.choice([0, 7, 1000])),
                timestamp=START + timedelta(seconds=rng.uniform(0, DAYS * 86400)),
            )
        )
    # Exactly on the boundaries: the new price is in force from its effective_from on.
    for model, at in [("sonnet", SONNET_CHEAPER), ("openai/gpt-4o-mini", MINI_PRICED)]:
        metrics.append(ActionMetric("lod4", "alice", "town-a", None, 1000, 1000, model, 5.0, 100, at))
    metrics.append(ActionMetric("lod5", "bob", "town-b", None, 10, 10, "opus", 9.0, 400, CREDITS_CHEAPER))
    return metrics


@dataclass
class Dataset:
    store: MetricsStore
    metrics: list[ActionMetric]
    book: PriceBook

    def select(self, **filters: Any) -> list[ActionMetric]:
        return select_like_the_store(self.metrics, filters)


@pytest.fixture(scope="module")
def dataset(backend) -> Iterator[Dataset]:
    url = backend.migrated()
    metrics = _metrics()
    with MetricsStore(url) as store:
        store.set_model_price(
            "sonnet", "2.5", "12.5", SONNET_CHEAPER, cache_read_per_1m="0.25", cache_write_per_1m="3.125"
        )
        store.set_model_price("openai/gpt-4o-mini", 0.15, 0.6, MINI_PRICED, cache_read_per_1m=0.075)
        store.set_credit_price(Decimal("0.0045"), effective_from=CREDITS_CHEAPER)
        for start in range(0, len(metrics), 500):
            store.emit_many(metrics[start : start + 500])
        yield Dataset(store, metrics, _book())
    backend.drop(url)


FILTER_VALUES: dict[str, Any] = {
    "user_id": "100%_user",
    "town_id": "town-'quoted'",
    "citizen_id": "citizen-3",
    "action_type": "lod4",
    "model": "sonnet",
    "since": START + timedelta(days=4, hours=3),
    "until": START + timedelta(days=8),
    "limit": 700,
}
SINGLE = [{name: value} for name, value in FILTER_VALUES.items()]
PAIRS = [dict(pair) for pair in itertools.combinations(FILTER_VALUES.items(), 2)]
WIDER = [
    {"town_id": "town-a", "action_type": "lod3", "since": START + timedelta(days=1)},
    {"model": "openai/gpt-4o-mini", "since": START + timedelta(days=2), "until": START + timedelta(days=6)},
    {"user_id": "system", "town_id": "town-b", "model": "template", "limit": 25},
    {"action_type": "custom.op-1", "until": START + timedelta(days=9)},
    {"model": "mystery-model", "town_id": "town-a"},
    {"since": START + timedelta(days=30)},  # empty
    {"user_id": "nobody"},  # empty
    FILTER_VALUES,
]


@pytest.mark.parametrize("exact", [False, True], ids=["rollups", "exact"])
@pytest.mark.parametrize("filters", [{}, *SINGLE, *PAIRS, *WIDER], ids=lambda f: ",".join(f) or "everything")
def test_aggregate_matches_the_reference(dataset: Dataset, filters: dict[str, Any], exact: bool) -> None:
    expected = expected_aggregate(dataset.select(**filters), dataset.book)
    aggregate = dataset.store.aggregate(exact=exact, **filters).to_dict()
    if exact:
        assert aggregate["percentiles_exact"]
    assert_matches(aggregate, expected)


@pytest.mark.parametrize("apart", [0, 1, 16], ids=["one-search", "too-many-periods", "periods-apart"])
def test_raw_rows_are_priced_alike_per_period_apart_or_by_one_search(
    dataset: Dataset, apart: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raw rows are summed per price period, by one GROUP BY per period when few periods are met, or
    by one GROUP BY over a search for each row's period: the same figures either way."""
    monkeypatch.setattr(aggregate_module, "MAX_PRICE_PERIODS_APART", apart)
    for filters in ({}, {"model": "sonnet"}, {"since": START + timedelta(days=4, hours=3)}, FILTER_VALUES):
        expected = expected_aggregate(dataset.select(**filters), dataset.book)
        assert_matches(dataset.store.aggregate(exact=True, **filters).to_dict(), expected, f"{filters}: ")
        rows = dataset.store.breakdown(
            "user_id", exact=True, **{k: v for k, v in filters.items() if k != "limit"}
        )
        assert sum(row.figures.count for row in rows) == len(
            dataset.select(**{k: v for k, v in filters.items() if k != "limit"})
        )


@pytest.mark.parametrize(
    ("ranked", "searches"),
    [(0, 64), (8, 64), (8, 1)],
    ids=["two-sorts", "one-sort", "one-sort-sums-grouped"],
)
def test_exact_percentiles_per_model_are_ranked_alike_by_one_sort_or_two(
    dataset: Dataset, ranked: int, searches: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where each row's rank within its model comes from a running count per model in the one sort by
    latency (up to `ranked` models stored; SQLite) or from a second sort per model, and the sums from
    a search per model and price period (up to `searches` of them) or from a GROUP BY, every model's
    percentiles and the figures are the reference's; with a model filter, its own."""
    monkeypatch.setattr(aggregate_module, "MAX_MODELS_RANKED_IN_ONE_SORT", ranked)
    monkeypatch.setattr(aggregate_module, "MAX_MODEL_SEARCHES", searches)
    assert len(MODELS) <= 8
    for filters in ({}, {"since": START + timedelta(days=4, hours=3)}, {"model": "sonnet"}):
        expected = expected_aggregate(dataset.select(**filters), dataset.book)
        assert_matches(dataset.store.aggregate(exact=True, **filters).to_dict(), expected, f"{filters}: ")


@pytest.mark.parametrize("filters", [{}, *SINGLE, *WIDER], ids=lambda f: ",".join(f) or "everything")
def test_query_returns_exactly_the_selection_newest_first(dataset: Dataset, filters: dict[str, Any]) -> None:
    assert dataset.store.query(**filters) == dataset.select(**filters)


SAME_SHAPE = [
    {
        "town_id": town,
        "since": START + timedelta(days=day, hours=hour, seconds=17),
        "until": START + timedelta(days=day + 3, minutes=5),
    }
    for town, day, hour in [("town-a", 1, 3), ("town-b", 4, 5), ("town-'quoted'", 6, 23), ("town-a", 0, 0)]
]


@pytest.mark.parametrize("exact", [False, True], ids=["rollups", "exact"])
def test_the_same_question_about_other_values_answers_for_its_own(dataset: Dataset, exact: bool) -> None:
    """Asked again for another town and window, aggregate() reuses the statement built for the first
    (the values are bound at execution) and answers for the new values, on either side of a price
    change."""
    for filters in SAME_SHAPE:
        expected = expected_aggregate(dataset.select(**filters), dataset.book)
        assert_matches(dataset.store.aggregate(exact=exact, **filters).to_dict(), expected, f"{filters}: ")


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "postgresql://postgres@127.0.0.1/unused"])
def test_a_statement_is_built_once_per_shape(url: str) -> None:
    """Filters that differ only in their values (instants in the same order) share one statement;
    instants in another order, or another filter, make another. (Nothing is executed.)"""
    statements = aggregate_module.AggregateStatements(backend_for(url))
    starts = [BEGINNING_OF_TIME, SONNET_CHEAPER]

    def built(**filters: Any) -> tuple[Any, dict[str, Any]]:
        metric_filter = MetricFilter(**filters)
        plan = raw_only(metric_filter.since, metric_filter.until)
        return statements.statement(metric_filter, plan, starts)

    first, first_values = built(town_id="town-a", since=START, until=START + timedelta(days=1))
    again, again_values = built(
        town_id="town-b", since=START + timedelta(days=1), until=START + timedelta(days=2)
    )
    assert again is first
    assert first_values != again_values
    assert "town-b" in again_values.values()
    assert START + timedelta(days=2) in again_values.values()
    across_the_change, _ = built(town_id="town-a", since=START, until=SONNET_CHEAPER + timedelta(days=1))
    assert across_the_change is not first
    assert built(model="sonnet", since=START, until=START + timedelta(days=1))[0] is not first


def test_an_empty_selection_has_zero_sums_and_no_averages(dataset: Dataset) -> None:
    empty = dataset.store.aggregate(town_id="nowhere").to_dict()
    assert {k: empty[k] for k in ("count", "total_tokens", "total_cost_usd", "unpriced_count")} == {
        "count": 0,
        "total_tokens": 0,
        "total_cost_usd": 0,
        "unpriced_count": 0,
    }
    for key in ("avg_latency_ms", "p50_latency_ms", "p95_latency_ms", "p99_latency_ms"):
        assert empty[key] is None
    assert empty["avg_margin"] is None
    assert empty["gross_margin"] is None
    assert empty["by_model"] == {}


def test_an_unpriced_model_is_counted_never_a_silent_zero(dataset: Dataset) -> None:
    mystery = dataset.store.aggregate(model="mystery-model")
    assert mystery.count > 0
    assert mystery.unpriced_count == mystery.count
    assert mystery.by_model["mystery-model"].unpriced_count == mystery.count
    assert mystery.avg_margin is None


def test_a_model_priced_mid_range_is_unpriced_before_and_priced_from_then_on(dataset: Dataset) -> None:
    before = dataset.store.aggregate(model="openai/gpt-4o-mini", until=MINI_PRICED)
    after = dataset.store.aggregate(model="openai/gpt-4o-mini", since=MINI_PRICED)
    assert before.unpriced_count == before.count > 0
    assert after.unpriced_count == 0
    assert after.total_cost_usd > 0


def test_a_price_change_applies_from_its_effective_time(dataset: Dataset) -> None:
    boundary = dataset.store.aggregate(model="sonnet", since=SONNET_CHEAPER, limit=None)
    expected = expected_aggregate(dataset.select(model="sonnet", since=SONNET_CHEAPER), dataset.book)
    assert_matches(boundary.to_dict(), expected)
    # The metric stamped exactly at the change: 1000 in + 1000 out at the new sonnet price.
    exact = dataset.store.aggregate(
        model="sonnet", since=SONNET_CHEAPER, until=SONNET_CHEAPER + timedelta(microseconds=1)
    )
    assert exact.count == 1
    assert exact.total_cost_usd == pytest.approx((1000 * 2.5 + 1000 * 12.5) / 1e6, abs=1e-12)


def test_a_credit_price_change_applies_from_its_effective_time(dataset: Dataset) -> None:
    at_change = dataset.store.aggregate(
        action_type="lod5", since=CREDITS_CHEAPER, until=CREDITS_CHEAPER + timedelta(microseconds=1)
    )
    assert at_change.total_revenue_usd == pytest.approx(400 * 0.0045, abs=1e-12)


def test_money_sums_stay_exact_when_one_huge_action_meets_many_tiny_ones(database_url: str) -> None:
    # Summed row by row in doubles, each tiny cost (2.5e-7 USD) would be rounded to the spacing of
    # doubles near 1e6 (1.2e-10) and 20,000 of them would drift ~1e-6 from the exact total.
    huge = ActionMetric("lod5", "whale", "town-a", None, 4_000_000_000_000, 0, "haiku", 1.0, 10**9, START)
    tiny = [
        ActionMetric(
            "lod3", "minnow", "town-a", None, 1, 0, "haiku", 1.0, 1, START + timedelta(seconds=i + 1)
        )
        for i in range(20_000)
    ]
    with MetricsStore(database_url) as store:
        store.set_credit_price("0.000000007", effective_from=START + timedelta(seconds=10_000))
        store.emit_many([huge, *tiny])
        aggregate = store.aggregate()
    book = PriceBook(
        {"haiku": [(BEGINNING_OF_TIME, Decimal("0.25"), Decimal("1.25"))]},
        [(BEGINNING_OF_TIME, Decimal("0.006")), (START + timedelta(seconds=10_000), Decimal("0.000000007"))],
    )
    expected = expected_aggregate([huge, *tiny], book)
    assert expected["total_cost_usd"] == Decimal("1000000.005")
    assert_matches(aggregate.to_dict(), expected)


def test_counts_whose_sum_passes_64_bits_are_summed_never_an_error(database_url: str) -> None:
    """Each count fits 64 bits, their sum need not: one client's absurd values must not turn every
    later question into an error (SQLite's SUM raises "integer overflow" past 2**63; PostgreSQL cast a
    revenue past 1e11 USD to a price's NUMERIC(20, 9) to divide by it). PostgreSQL and ClickHouse
    sum exactly; SQLite in doubles, exact below 2**53."""
    big = 2**63 - 1
    metrics = [
        ActionMetric("lod5", "whale", "town-a", None, big, big, "haiku", 1.0, big, START),
        ActionMetric(
            "lod5", "whale", "town-a", None, big, 5, "haiku", 2.0, 2 * 10**13, START + timedelta(minutes=1)
        ),
        ActionMetric("lod1", "minnow", "town-a", None, 7, 0, "haiku", 3.0, 1, START + timedelta(hours=3)),
    ]
    exact = not database_url.startswith("sqlite")
    with MetricsStore(database_url) as store:
        store.emit_many(metrics)
        answers = [
            store.aggregate(),
            store.aggregate(town_id="town-a"),
            store.aggregate(exact=True),
            store.aggregate(user_id="whale"),
        ]
        rows = store.breakdown("action_type", bucket="day")
        towns = store.breakdown("town_id")
    for figures in [*answers, *(row.figures for row in rows), *(row.figures for row in towns)]:
        chosen = {3: metrics, 2: metrics[:2], 1: metrics[2:]}[figures.count]  # all, the whale's, lod1's
        book = PriceBook(
            {"haiku": [(BEGINNING_OF_TIME, *(Decimal(str(price)) for price in MODEL_COSTS_PER_1M["haiku"]))]},
            [(BEGINNING_OF_TIME, Decimal("0.006"))],
        )
        expected = expected_aggregate(chosen, book)
        for name in ("tokens_in", "tokens_out", "total_credits"):
            want = int(expected[name])
            assert getattr(figures, name) == (want if exact else pytest.approx(want, rel=1e-15))
        assert figures.total_revenue_usd == pytest.approx(float(expected["total_revenue_usd"]), rel=1e-12)
        assert figures.total_cost_usd == pytest.approx(float(expected["total_cost_usd"]), rel=1e-12)
