"""The price catalogue: `prices sync` prices real model names as genai-prices' own calculator does,
with its history; a price set by hand wins; what it cannot price is named, never a silent $0."""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from conftest import Databases, metric, run_cli
from genai_prices import Usage, calc_price

from action_metrics import ActionMetric, InvalidPrice, MetricsStore
from action_metrics.errors import RawRowsPruned
from action_metrics.pricing import BEGINNING_OF_TIME, MODEL_COSTS_PER_1M
from action_metrics.rollup import floor_to

from reference import PriceBook, assert_matches, expected_aggregate, select_like_the_store

pytestmark = pytest.mark.clickhouse  # SQLite, PostgreSQL and ClickHouse

TOLERANCE = Decimal("1e-9")

# Real names as providers and instrumentations spell them: dated, undated, `@`-dated, prefixed.
# o3 (2025-06-10), claude-sonnet-4-6 (2026-03-13) and gpt-5.6-luna (2026-07-30) change price in
# the catalogue within the calls' time span.
MODELS = (
    "gpt-4o-mini-2024-07-18",
    "openai/gpt-4o-mini",
    "o3",
    "o3-2025-04-16",
    "gpt-5.6-luna",
    "claude-sonnet-4-5-20250929",
    "anthropic/claude-sonnet-4.5",
    "claude-sonnet-4-5@20250929",
    "claude-sonnet-4-6",
    "claude-3-5-haiku-20241022",
    "claude-opus-4-1-20250805",
)
FIRST_CALL = datetime(2025, 1, 1, tzinfo=UTC)
LAST_CALL = datetime(2026, 11, 1, tzinfo=UTC)


def _catalogue_cost(call: ActionMetric) -> Decimal:
    """What genai-prices' calculator charges for the call at its timestamp. Its usage counts are
    inclusive, as ours: input tokens include cache reads and writes, output tokens reasoning."""
    usage = Usage(
        input_tokens=call.tokens_in,
        cache_read_tokens=call.cache_read_tokens,
        cache_write_tokens=call.cache_write_tokens,
        output_tokens=call.tokens_out,
        output_reasoning_tokens=call.reasoning_tokens,
    )
    provider, slash, name = call.model.partition("/")
    if slash:  # a provider prefix: the calculator takes it as the provider
        return calc_price(
            usage, name, provider_id=provider, genai_request_timestamp=call.timestamp
        ).total_price
    return calc_price(usage, call.model, genai_request_timestamp=call.timestamp).total_price


def _calls(count: int, seed: int = 11) -> list[ActionMetric]:
    """Calls of every model across the catalogue's price changes, with cache reads and writes and
    reasoning, each under 200,000 input tokens (above it tiered prices rise: see the tier test)."""
    rng = random.Random(seed)
    span = (LAST_CALL - FIRST_CALL).total_seconds()
    calls = []
    for number in range(count):
        tokens_in = rng.randint(1, 190_000)
        cache_read = rng.choice([0, rng.randint(0, tokens_in)])
        cache_write = rng.choice([0, rng.randint(0, tokens_in - cache_read)])
        tokens_out = rng.randint(0, 20_000)
        calls.append(
            metric(
                action_type="chat",
                model=MODELS[number % len(MODELS)],
                tokens_in=tokens_in,
                cache_read_tokens=cache_read,
                cache_write_tokens=cache_write,
                tokens_out=tokens_out,
                reasoning_tokens=rng.randint(0, tokens_out),
                timestamp=FIRST_CALL + timedelta(seconds=rng.uniform(0, span)),
            )
        )
    return calls


def _assert_close(ours: float, expected: Decimal, where: str) -> None:
    assert abs(Decimal(repr(ours)) - expected) <= TOLERANCE, f"{where}: {ours} != {expected}"


def test_synced_prices_cost_what_the_catalogues_calculator_charges(
    database_url: str, backend: Databases
) -> None:
    calls = _calls(3_000)
    expected: dict[str, Decimal] = defaultdict(Decimal)
    for call in calls:
        expected[call.model] += _catalogue_cost(call)
    with MetricsStore(database_url) as store:
        store.emit_many(calls)
        assert store.aggregate().unpriced_count == len(calls)  # nothing priced before a sync

        synced = store.sync_prices()

        assert {found.model for found in synced.lookup.found} == set(MODELS)
        histories = {found.model: found.prices for found in synced.lookup.found}
        assert [price.effective_from for price in histories["o3"]] == [
            BEGINNING_OF_TIME,
            datetime(2025, 6, 10, tzinfo=UTC),
        ]
        for exact in (True, False):
            totals = store.aggregate(exact=exact)
            assert totals.unpriced_count == 0
            _assert_close(totals.total_cost_usd, sum(expected.values(), Decimal(0)), f"exact={exact}")
            for model in MODELS:
                _assert_close(
                    totals.by_model[model].total_cost_usd, expected[model], f"{model} exact={exact}"
                )
        assert store.aggregate().percentiles_exact is not backend.has_rollups  # the rollups answered too


def test_a_call_above_a_tier_is_understated_and_the_report_names_its_model(database_url: str) -> None:
    big = metric(
        model="claude-sonnet-4-5-20250929", tokens_in=250_000, tokens_out=1_000, timestamp=FIRST_CALL
    )
    with MetricsStore(database_url) as store:
        store.emit_many([big])
        found = store.sync_prices().lookup.found
        assert [model.tiered_above_tokens for model in found] == [200_000]
        ours = Decimal(repr(store.aggregate(exact=True).total_cost_usd))
    base = (Decimal(250_000) * 3 + Decimal(1_000) * 15) / 1_000_000  # the base tier, as stored
    assert abs(ours - base) <= TOLERANCE
    assert _catalogue_cost(big) > ours  # the catalogue's tier: flagged, not applied

    listed = run_cli("prices", "list", "--url", database_url)
    row = next(line for line in listed.stdout.splitlines() if "claude-sonnet-4-5-20250929" in line)
    assert [cell.strip() for cell in row.split("│")[7:9]] == ["catalogue", "200,000"]
    assert "(flagged, not applied)" in listed.stdout
    text = run_cli("report", "--url", database_url).stdout
    assert "claude-sonnet-4-5-20250929: its catalogue price rises above 200,000 input tokens" in text


def test_a_price_set_by_hand_wins_over_the_catalogue(database_url: str) -> None:
    july, september = datetime(2025, 7, 15, tzinfo=UTC), datetime(2025, 9, 15, tzinfo=UTC)
    calls = [
        metric(model="o3", tokens_in=1_000_000, tokens_out=0, timestamp=when) for when in (july, september)
    ]
    with MetricsStore(database_url) as store:
        store.emit_many(calls)
        store.set_model_price("o3", "1", "4", datetime(2025, 8, 1, tzinfo=UTC))
        synced = store.sync_prices()
        assert synced.held_back == {}  # the catalogue's prices of o3 all start before the manual one
        assert store.aggregate(exact=True).total_cost_usd == pytest.approx(2 + 1)  # catalogue, then manual

        # Set earlier than a catalogue price: that price stops applying at once, and a sync keeps it out.
        store.set_model_price("o3", "0.5", "2", datetime(2025, 3, 1, tzinfo=UTC))
        assert store.aggregate(exact=True).total_cost_usd == pytest.approx(0.5 + 1)
        assert store.sync_prices().held_back == {"o3": datetime(2025, 3, 1, tzinfo=UTC)}
        assert store.aggregate(exact=True).total_cost_usd == pytest.approx(0.5 + 1)
        assert store.aggregate().total_cost_usd == pytest.approx(0.5 + 1)
        prices = [
            (p.effective_from, p.input_per_1m, p.source) for p in store.model_prices() if p.model == "o3"
        ]

        # Priced by hand for all time: the catalogue adds nothing.
        store.emit_many([metric(model="gpt-4o", tokens_in=1_000_000, tokens_out=0, timestamp=july)])
        store.set_model_price("gpt-4o", "7", "7", BEGINNING_OF_TIME)
        assert store.sync_prices().held_back["gpt-4o"] == BEGINNING_OF_TIME
        assert [p.source for p in store.model_prices() if p.model == "gpt-4o"] == ["manual"]
        assert store.aggregate(model="gpt-4o").total_cost_usd == pytest.approx(7)
    assert prices == [
        (BEGINNING_OF_TIME, Decimal(10), "catalogue"),
        (datetime(2025, 3, 1, tzinfo=UTC), Decimal("0.5"), "manual"),
        (datetime(2025, 8, 1, tzinfo=UTC), Decimal(1), "manual"),
    ]


def test_a_price_the_catalogue_no_longer_lists_goes_with_the_next_sync(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalogue is the truth for its own prices: a price change it drops (a correction) is
    removed from every model of the sync at once, the other models' prices and manual ones kept."""
    from dataclasses import replace

    from action_metrics import catalogue

    september = datetime(2025, 9, 15, tzinfo=UTC)
    with MetricsStore(database_url) as store:
        store.emit_many(
            [
                metric(model=model, tokens_in=1_000_000, tokens_out=0, timestamp=september)
                for model in ("o3", "claude-sonnet-4-6", "gpt-4o-mini-2024-07-18")
            ]
        )
        store.set_model_price("gpt-4o-mini-2024-07-18", "9", "9", datetime(2025, 10, 1, tzinfo=UTC))
        first = store.sync_prices()
        o3 = next(found for found in first.lookup.found if found.model == "o3")
        assert len(o3.prices) == 2  # 10 USD per 1M input until 2025-06-10, 2 since
        assert store.aggregate(model="o3", exact=True).total_cost_usd == pytest.approx(2)

        looked_up = catalogue.look_up

        def without_o3s_cut(models: Any) -> catalogue.Lookup:
            lookup = looked_up(models)
            found = [replace(f, prices=f.prices[:1]) if f.model == "o3" else f for f in lookup.found]
            return replace(lookup, found=tuple(found))

        monkeypatch.setattr(catalogue, "look_up", without_o3s_cut)
        store.sync_prices()
        assert [(p.effective_from, p.input_per_1m) for p in store.model_prices() if p.model == "o3"] == [
            (BEGINNING_OF_TIME, Decimal(10))
        ]
        for exact in (True, False):
            assert store.aggregate(model="o3", exact=exact).total_cost_usd == pytest.approx(10)
        assert [
            (p.effective_from, p.input_per_1m, p.source)
            for p in store.model_prices()
            if p.model == "gpt-4o-mini-2024-07-18"
        ][-1] == (datetime(2025, 10, 1, tzinfo=UTC), Decimal(9), "manual")
        assert len([p for p in store.model_prices() if p.model == "claude-sonnet-4-6"]) == len(
            next(f for f in first.lookup.found if f.model == "claude-sonnet-4-6").prices
        )


def test_the_prices_commands(database_url: str) -> None:
    with MetricsStore(database_url) as store:
        store.emit_many([metric(model="gpt-4o-mini-2024-07-18", timestamp=FIRST_CALL)])

    synced = run_cli("prices", "sync", "--url", database_url)
    assert synced.exit_code == 0, synced.output
    assert "openai/gpt-4o-mini" in synced.stdout
    manual = run_cli(
        "prices", "set", "my-fine-tune", "--input", "2", "--output", "8", "--cache-read", "0.5",
        "--from", "2025-01-01", "--url", database_url,
    )  # fmt: skip
    assert manual.exit_code == 0, manual.output
    listed = run_cli("prices", "list", "--url", database_url)
    assert listed.exit_code == 0, listed.output
    rows = {line.split("│")[1].strip(): line for line in listed.stdout.splitlines() if line.count("│") > 2}
    assert [cell.strip() for cell in rows["gpt-4o-mini-2024-07-18"].split("│")[2:9]] == [
        "beginning of time", "0.15", "0.6", "0.075", "-", "catalogue", "-",
    ]  # fmt: skip
    assert [cell.strip() for cell in rows["my-fine-tune"].split("│")[3:8]] == ["2", "8", "0.5", "-", "manual"]

    bad = run_cli("prices", "set", "gpt-4o", "--input", "-1", "--output", "8", "--url", database_url)
    assert bad.exit_code == 2
    assert "--input" in bad.stderr
    assert "expected a finite amount >= 0" in bad.stderr
    assert run_cli("prices", "set", "gpt-4o", "--input", "1", "--url", database_url).exit_code == 2


def test_an_unknown_model_stays_unpriced_and_the_report_names_the_command(database_url: str) -> None:
    with MetricsStore(database_url) as store:
        store.emit_many([metric(model="our-own-model"), metric(model="gpt-4o-mini")])
        store.emit_many([metric(model="haiku")])  # the seed's name: not in the catalogue, priced by hand
    synced = run_cli("prices", "sync", "--url", database_url)
    assert "unpriced until set by hand (`action-metrics prices set`): our-own-model\n" in synced.stdout

    text = run_cli("report", "--url", database_url)
    assert "1 actions of unpriced models (our-own-model)" in text.stdout
    assert "action-metrics prices sync" in text.stdout
    as_json = json.loads(run_cli("report", "--json", "--url", database_url).stdout)
    assert as_json["metrics"]["unpriced_count"] == 1
    assert set(as_json) == {"filters", "metrics"}  # the hint is for people; JSON keeps its keys

    with MetricsStore(database_url) as store:  # a model seen after the sync: unpriced until the next
        store.emit_many([metric(model="claude-3-5-haiku-20241022")])
    assert "(claude-3-5-haiku-20241022, our-own-model)" in run_cli("report", "--url", database_url).stdout
    run_cli("prices", "sync", "--url", database_url)
    assert "(our-own-model)" in run_cli("report", "--url", database_url).stdout


def test_models_known_only_from_the_rollups_are_synced(database_url: str) -> None:
    old = metric(model="o3", tokens_in=1_000_000, tokens_out=0, timestamp=datetime(2025, 7, 1, tzinfo=UTC))
    with MetricsStore(database_url) as store:
        store.emit_many([old, metric(model="haiku")])  # the recent one closes old's buckets
        assert store.prune(datetime(2025, 8, 1, tzinfo=UTC)).rows == 1
        assert [found.model for found in store.sync_prices().lookup.found] == ["o3"]
        assert store.aggregate(model="o3").total_cost_usd == pytest.approx(2)  # 2 USD per 1M since June


def test_a_time_of_day_price_is_not_synced_and_says_why(database_url: str) -> None:
    with MetricsStore(database_url) as store:
        store.emit_many([metric(model="deepseek-chat")])
        synced = store.sync_prices()
        assert store.aggregate().unpriced_count == 1
    assert [model for model, _ in synced.lookup.not_synced] == ["deepseek-chat"]
    assert "time of day" in synced.lookup.not_synced[0][1]


def test_a_bad_model_name_is_refused_naming_the_argument(database_url: str) -> None:
    result = run_cli("prices", "set", "x" * 129, "--input", "1", "--output", "1", "--url", database_url)
    assert result.exit_code == 2
    assert "MODEL" in result.stderr


def _seed_book(
    models: dict[str, list[tuple[datetime, str, str]]], credits: list[tuple[datetime, str]]
) -> PriceBook:
    """The seed's prices from the beginning of time, then `models` and `credits` as the test set them."""
    book = {
        model: [(BEGINNING_OF_TIME, Decimal(str(i)), Decimal(str(o)))]
        for model, (i, o) in MODEL_COSTS_PER_1M.items()
    }
    for model, prices in models.items():
        book[model] = [*book.get(model, []), *((at, Decimal(i), Decimal(o)) for at, i, o in prices)]
    seed_credits = [(BEGINNING_OF_TIME, Decimal("0.006")), *((at, Decimal(usd)) for at, usd in credits)]
    return PriceBook(book, seed_credits)


def _every_twenty_minutes(first_day: datetime, days: int) -> list[ActionMetric]:
    """Three calls an hour (at :05, :25 and :45), haiku and opus in turn, in two towns: each model
    on both sides of the half hour in every other hour."""
    return [
        metric(
            model=("haiku", "opus")[number % 2],
            town_id=("town-a", "town-b")[number // 5 % 2],
            tokens_in=1_000 + 37 * number,
            tokens_out=100 + 11 * number,
            credits_charged=(0, 10, 25)[number % 3],
            latency_ms=50.0 + number % 17,
            timestamp=first_day + timedelta(minutes=5 + 20 * number),
        )
        for number in range(days * 72)
    ]


def test_prices_changed_mid_hour_in_a_pruned_period_still_price_their_calls_from_that_moment(
    database_url: str,
) -> None:
    """`set_model_price` starts a price now, so mid-hour: once the period is pruned, the all-time
    questions are still answered from the rollups, each call priced by the prices in force at its
    moment, as the Decimal reference prices them (ClickHouse raised RawRowsPruned)."""
    first_day = floor_to(datetime.now(UTC) - timedelta(days=12), "day")
    calls = [*_every_twenty_minutes(first_day, 4), metric(timestamp=datetime.now(UTC) - timedelta(hours=1))]
    opus_from = first_day + timedelta(days=1, hours=5, minutes=30)  # between opus at :05 and :45
    credits_from = first_day + timedelta(days=2, hours=14, minutes=50, seconds=7)
    cutoff = first_day + timedelta(days=3)
    with MetricsStore(database_url) as store:
        store.emit_many(calls)  # the last one closes the buckets before the cut-off
        store.set_model_price("opus", "10", "50", effective_from=opus_from)
        store.set_credit_price("0.0045", effective_from=credits_from)
        before = store.aggregate().to_dict()
        assert store.prune(cutoff).rows == 4 * 72 - 72

        book = _seed_book({"opus": [(opus_from, "10", "50")]}, [(credits_from, "0.0045")])
        for window in [
            {},
            {"model": "haiku"},
            {"model": "opus"},
            {"town_id": "town-b"},
            {"until": cutoff},
            {"since": first_day + timedelta(days=1), "until": first_day + timedelta(days=2, hours=15)},
        ]:
            expected = expected_aggregate(select_like_the_store(calls, window), book)
            assert_matches(store.aggregate(**window).to_dict(), expected, f"{window}: ")
        assert store.aggregate().to_dict() == before
        for row in store.breakdown("model", bucket="day", tz="UTC"):
            assert row.bucket_start is not None
            day = [c for c in calls if floor_to(c.timestamp, "day") == row.bucket_start]
            expected = expected_aggregate(select_like_the_store(day, dict(row.keys)), book)
            del expected["by_model"]
            assert_matches(row.to_dict(), expected, f"{row.keys} {row.bucket_start}: ")
        assert run_cli("report", "--url", database_url).exit_code == 0
        with pytest.raises(RawRowsPruned):  # from 05:20: part of a pruned hour, not cut by a price
            store.aggregate(since=opus_from - timedelta(minutes=10))

        # The price from the same moment can still be replaced: the rollups are split there already.
        store.set_model_price("opus", "12", "60", effective_from=opus_from)
        book = _seed_book({"opus": [(opus_from, "12", "60")]}, [(credits_from, "0.0045")])
        assert_matches(store.aggregate().to_dict(), expected_aggregate(calls, book))


def test_a_price_inside_a_pruned_day_is_refused_naming_the_field_and_starts_at_its_midnight(
    database_url: str,
) -> None:
    """A pruned day's rollups cannot be split at a new price start (its raw rows are gone): a price
    from inside it is refused, saying to start it at the day's midnight, which is then priced."""
    first_day = floor_to(datetime.now(UTC) - timedelta(days=12), "day")
    calls = [*_every_twenty_minutes(first_day, 3), metric(timestamp=datetime.now(UTC) - timedelta(hours=1))]
    pruned_day = first_day + timedelta(days=1)
    cutoff = first_day + timedelta(days=2)
    with MetricsStore(database_url) as store:
        store.emit_many(calls)
        store.prune(cutoff)
        inside = pruned_day + timedelta(hours=3, minutes=17)
        refusal = (
            rf"^effective_from: {re.escape(inside.isoformat())} falls inside a UTC day whose raw rows were "
            rf"pruned \(before {re.escape(cutoff.isoformat())}\).*start the price at that day's UTC "
            rf"midnight, {re.escape(pruned_day.isoformat())} "
        )
        with pytest.raises(InvalidPrice, match=refusal) as refused:
            store.set_model_price("opus", "10", "50", effective_from=inside)
        assert refused.value.field == "effective_from"
        with pytest.raises(InvalidPrice, match=refusal):
            store.set_credit_price("0.0045", effective_from=inside)
        assert inside not in {price.effective_from for price in store.model_prices()}

        store.set_model_price("opus", "10", "50", effective_from=pruned_day)
        store.set_credit_price("0.0045", effective_from=pruned_day)
        book = _seed_book({"opus": [(pruned_day, "10", "50")]}, [(pruned_day, "0.0045")])
        assert_matches(store.aggregate().to_dict(), expected_aggregate(calls, book))
