"""The SQL surface, read the way a dashboard reads it: the plain `sqlite3` module and a plain asyncpg
connection, with nothing of action-metrics loaded into the connection.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import statistics
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import numpy
import pytest
from conftest import metric
from sqlalchemy import make_url

from action_metrics import ActionMetric, MetricsStore
from action_metrics.clickhouse import SCHEMES as CLICKHOUSE_SCHEMES
from action_metrics.clickhouse import ClickHouseURL
from action_metrics.pricing import BEGINNING_OF_TIME, MODEL_COSTS_PER_1M
from action_metrics.sketch import ZERO_BIN, bin_of, bin_value_of

from reference import PriceBook, cost, percentile, revenue

EXAMPLES = Path(__file__).resolve().parent.parent / "sql" / "examples"


def plain_sql(url: str, sql: str) -> list[dict[str, Any]]:
    """Run SQL through the bare driver, as psql, the sqlite3 shell or Grafana would."""
    parsed = make_url(url)
    if parsed.get_backend_name() in CLICKHOUSE_SCHEMES:
        client = ClickHouseURL.parse(url).connect()
        try:
            result = client.query(sql)
            return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]
        finally:
            client.close()
    if parsed.get_backend_name() == "sqlite":
        connection = sqlite3.connect(parsed.database or "")
        connection.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in connection.execute(sql)]
        finally:
            connection.close()

    async def fetch() -> list[dict[str, Any]]:
        connection = await asyncpg.connect(url)
        try:
            return [dict(row) for row in await connection.fetch(sql)]
        finally:
            await connection.close()

    return asyncio.run(fetch())


def example(name: str, dialect: str) -> str:
    dialect = "clickhouse" if dialect in CLICKHOUSE_SCHEMES else dialect
    specific = EXAMPLES / f"{name}.{dialect}.sql"
    return (specific if specific.exists() else EXAMPLES / f"{name}.sql").read_text()


def _sonnet_cheaper(now: datetime) -> datetime:
    """A price change inside a closed hour of a closed day: the views' rows are split there."""
    return (now - timedelta(days=3)).replace(minute=17, second=5, microsecond=0)


def _book(now: datetime) -> PriceBook:
    models = {
        m: [(BEGINNING_OF_TIME, Decimal(str(i)), Decimal(str(o)))] for m, (i, o) in MODEL_COSTS_PER_1M.items()
    }
    models["sonnet"].append((_sonnet_cheaper(now), Decimal("2.5"), Decimal("12.5"), Decimal("0.25"), None))
    return PriceBook(models, [(BEGINNING_OF_TIME, Decimal("0.006"))])


def _metrics(now: datetime) -> list[ActionMetric]:
    rng = random.Random(7)
    metrics = []
    for i in range(400):
        # The last day, earlier this week, and weeks ago; never near the edge of a week.
        when = rng.choice(
            [
                now - timedelta(hours=rng.uniform(0.1, 23)),
                now - timedelta(days=rng.uniform(1.5, 6)),
                now - timedelta(days=rng.uniform(9, 30)),
            ]
        )
        metrics.append(
            ActionMetric(
                action_type=rng.choice(["lod3", "lod4", "lod5", "dialogue"]),
                user_id=f"user-{i % 7}",
                town_id=rng.choice(["town-a", "town-b"]),
                citizen_id=None,
                tokens_in=(tokens_in := rng.randint(0, 3000)),
                tokens_out=(tokens_out := rng.randint(0, 1500)),
                cache_read_tokens=(cache_read := rng.choice([0, rng.randint(0, tokens_in)])),
                cache_write_tokens=rng.choice([0, tokens_in - cache_read]),
                reasoning_tokens=rng.choice([0, rng.randint(0, tokens_out)]),
                error=rng.choice([None, None, None, "RateLimitError"]),
                model=rng.choice(["haiku", "sonnet", "opus", "template", "unpriced-x"]),
                latency_ms=rng.choice([0.5, 100.0, rng.uniform(1, 900)]),
                credits_charged=rng.choice([0, 10, 100, 400]),
                timestamp=when,
            )
        )
    return metrics


@pytest.fixture(scope="module")
def town(backend) -> Iterator[tuple[str, MetricsStore, list[ActionMetric], datetime]]:
    url = backend.migrated()
    now = datetime.now(UTC)
    metrics = _metrics(now)
    with MetricsStore(url) as store:
        store.set_model_price("sonnet", "2.5", "12.5", _sonnet_cheaper(now), cache_read_per_1m="0.25")
        store.emit_many(metrics)
        yield url, store, metrics, now
    backend.drop(url)


def test_priced_view_prices_every_action_as_the_reference_does(town) -> None:
    url, _, metrics, now = town
    rows = {
        str(row["id"]).replace("-", ""): row for row in plain_sql(url, "SELECT * FROM action_metrics_priced")
    }
    assert len(rows) == len(metrics)
    book = _book(now)
    for action in metrics:
        row = rows[action.id.hex]
        want_cost, want_revenue = cost(action, book), revenue(action, book)
        assert bool(row["priced"]) is (want_cost is not None)
        if want_cost is None:
            assert row["cost_usd"] is None
            assert row["margin"] is None
        else:
            assert abs(Decimal(str(row["cost_usd"])) - want_cost) < Decimal("1e-12")
        assert abs(Decimal(str(row["revenue_usd"])) - want_revenue) < Decimal("1e-12")
        if want_cost is not None and want_revenue > 0:
            assert float(row["margin"]) == pytest.approx(float((want_revenue - want_cost) / want_revenue))
        assert row["tokens_in"] == action.tokens_in
        assert row["user_id"] == action.user_id


def _day(moment: datetime) -> str:
    return moment.date().isoformat()


def _hour(moment: datetime) -> str:
    return moment.replace(minute=0, second=0, microsecond=0).strftime("%Y-%m-%d %H")


BUCKETED_VIEWS = pytest.mark.parametrize(
    ("view", "bucket", "key", "dimensions"),
    [
        ("action_metrics_daily", "day", _day, ("town_id", "action_type", "model")),
        ("action_metrics_hourly", "hour", _hour, ("town_id", "action_type", "model")),
        ("action_metrics_daily_by_town", "day", _day, ("town_id", "model")),
        ("action_metrics_daily_by_model", "day", _day, ("model",)),
    ],
)
HISTOGRAM_PERCENTILES = {
    "action_metrics_daily_by_town": ("town_id", "model"),
    "action_metrics_daily_by_model": ("model",),
}
"""The views whose p50/p95 come from the rollups' histograms (since 0020; their open day's raw rows
for the per-town view): within 1% of the exact value, and as `aggregate()` gives for the same day and
group; the other views' are exact over raw rows."""


def _day_filters(view: str, row: dict[str, Any]) -> dict[str, Any]:
    """`aggregate()`'s filters for a row of a per-day view: its UTC day and its group."""
    start = _utc(row["day"])
    return {"since": start, "until": start + timedelta(days=1)} | {
        name: row[name] for name in HISTOGRAM_PERCENTILES[view]
    }


BUCKETED_VIEW_NAMES = (
    "action_metrics_daily",
    "action_metrics_hourly",
    "action_metrics_daily_by_town",
    "action_metrics_daily_by_model",
)


@BUCKETED_VIEWS
def test_bucketed_views_match_the_reference_per_bucket_and_group(
    town, view: str, bucket: str, key: Any, dimensions: tuple[str, ...]
) -> None:
    url, store, metrics, now = town
    book = _book(now)
    groups: dict[tuple[str, ...], list[ActionMetric]] = defaultdict(list)
    for m in metrics:
        groups[(key(m.timestamp), *(getattr(m, name) for name in dimensions))].append(m)
    rows = plain_sql(url, f"SELECT * FROM {view}")
    assert len(rows) == len(groups)
    for row in rows:
        start = row[bucket]
        moment = start if isinstance(start, datetime) else datetime.fromisoformat(str(start))
        chosen = groups[(key(moment.replace(tzinfo=UTC)), *(row[name] for name in dimensions))]
        latencies = [m.latency_ms for m in chosen]
        succeeded = [m.latency_ms for m in chosen if m.error is None]
        costs = [cost(m, book) for m in chosen]
        assert row["count"] == len(chosen)
        assert row["error_count"] == len(chosen) - len(succeeded)
        assert row["tokens_in"] == sum(m.tokens_in for m in chosen)
        assert row["tokens_out"] == sum(m.tokens_out for m in chosen)
        assert row["credits_charged"] == sum(m.credits_charged for m in chosen)
        for kind in ("cache_read_tokens", "cache_write_tokens", "reasoning_tokens"):
            assert row[kind] == sum(getattr(m, kind) for m in chosen)
        assert row["unpriced_count"] == sum(c is None for c in costs)
        assert abs(Decimal(str(row["cost_usd"])) - sum((c for c in costs if c), Decimal(0))) < Decimal("1e-9")
        assert abs(Decimal(str(row["revenue_usd"])) - sum(revenue(m, book) for m in chosen)) < Decimal("1e-9")
        assert row["avg_latency_ms"] == pytest.approx(statistics.fmean(latencies), rel=1e-12)
        tolerance = 0.01 if view in HISTOGRAM_PERCENTILES else 1e-12
        for column, fraction in (("p50_latency_ms", 0.5), ("p95_latency_ms", 0.95)):
            want = percentile(succeeded, fraction)  # of the successful actions; none: NULL
            assert row[column] == (None if want is None else pytest.approx(want, rel=tolerance))
        if view in HISTOGRAM_PERCENTILES and _utc(row["day"]) + timedelta(days=1) <= now - timedelta(hours=1):
            api = store.aggregate(**_day_filters(view, row))  # a closed day: the same histogram
            assert api.count == row["count"]
            for column in ("p50_latency_ms", "p95_latency_ms"):
                want = None if not succeeded else pytest.approx(getattr(api, column), rel=1e-9)
                assert row[column] == want, (view, column)


def test_the_latency_bins_table_holds_every_bin_a_latency_can_fall_in_at_its_representative(town) -> None:
    """SQLite's views read a bin's latency from it: the library's `bin_value_of`, for every bin from
    the smallest positive double's to the largest latency the row checks allow (1e15 ms)."""
    url, _, _, _ = town
    rows = {
        row["bin"]: row["value_ms"]
        for row in plain_sql(url, "SELECT bin, value_ms FROM action_metrics_latency_bins")
    }
    assert rows.pop(ZERO_BIN) == 0.0
    assert sorted(rows) == list(range(bin_of(5e-324), bin_of(1e15) + 1))
    for number, value in rows.items():
        want = bin_value_of(number)
        assert abs(value - want) <= max(1e-13 * want, 5e-324), (number, value, want)


def test_the_per_model_and_per_town_views_keep_their_percentiles_through_a_prune(database_url: str) -> None:
    """Their percentiles come from the histograms, which a prune keeps; the wider views' sort raw
    rows, so a pruned day's are NULL there (the README says so)."""
    now = datetime.now(UTC)
    metrics = _metrics(now)
    with MetricsStore(database_url) as store:
        store.emit_many(metrics)
        before = {view: plain_sql(database_url, f"SELECT * FROM {view}") for view in HISTOGRAM_PERCENTILES}
        cutoff = store.prune(now - timedelta(days=7)).cutoff
    assert any(m.timestamp < cutoff for m in metrics)
    for view, dimensions in HISTOGRAM_PERCENTILES.items():
        after = plain_sql(database_url, f"SELECT * FROM {view}")

        def past_days(rows: list[dict[str, Any]]) -> list[str]:
            """The days closed before the prune: the prune closes the hours up to now first, which
            may change the open day's row (its closed hours' latencies now come from histograms)."""
            closed = now - timedelta(hours=2)
            return sorted(repr(row) for row in rows if _utc(row["day"]) + timedelta(days=1) <= closed)

        assert past_days(after) == past_days(before[view]), view
        pruned = [row for row in after if _utc(row["day"]) < cutoff]
        assert pruned, view
        for row in pruned:
            succeeded = [
                m.latency_ms
                for m in metrics
                if m.error is None
                and _day(m.timestamp) == _utc(row["day"]).date().isoformat()
                and all(getattr(m, name) == row[name] for name in dimensions)
            ]
            for column, fraction in (("p50_latency_ms", 0.5), ("p95_latency_ms", 0.95)):
                want = percentile(succeeded, fraction)
                assert row[column] == (None if want is None else pytest.approx(want, rel=0.01)), (view, row)
    wider = plain_sql(database_url, "SELECT day, p50_latency_ms, p95_latency_ms FROM action_metrics_daily")
    assert all(row["p50_latency_ms"] is None for row in wider if _utc(row["day"]) < cutoff)


def test_the_per_model_and_per_town_views_merge_today_s_closed_hours_with_the_open_hour(
    database_url: str,
) -> None:
    """Today's row of each: the closed hours' histograms (per model; per town, its raw rows) and the
    open hour's raw latencies, most of the day's here, so that leaving either out moves p50 and p95."""
    now = datetime.now(UTC)
    hour = now.replace(minute=0, second=0, microsecond=0)
    earlier = [hour - timedelta(minutes=50 + k) for k in range(6)] if hour.hour else []  # a closed hour
    in_the_open_hour = [hour + (now - hour) * k / 21 for k in range(21)]
    sent = [
        metric(model="opus", town_id="town-q", latency_ms=latency, timestamp=when)
        for latency, when in zip(
            [*(30.0 + 7 * k for k in range(len(earlier))), *(1000.0 + 41 * k for k in range(21))],
            [*earlier, *in_the_open_hour],
            strict=True,
        )
    ]
    with MetricsStore(database_url) as store:
        store.emit_many(sent)
    want = {name: percentile([m.latency_ms for m in sent], q) for name, q in (("p50", 0.5), ("p95", 0.95))}
    for view in HISTOGRAM_PERCENTILES:
        (row,) = plain_sql(database_url, f"SELECT * FROM {view} WHERE model = 'opus'")
        assert row["count"] == len(sent)
        assert row["p50_latency_ms"] == pytest.approx(want["p50"], rel=0.01), view
        assert row["p95_latency_ms"] == pytest.approx(want["p95"], rel=0.01), view


COUNTED_SUMS = (
    "tokens_in",
    "tokens_out",
    "credits_charged",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
"""The views' sums of what each action may carry up to 2**63 - 1."""


@BUCKETED_VIEWS
def test_bucketed_views_read_sums_that_fit_as_integers(
    town, view: str, bucket: str, key: Any, dimensions: Any
) -> None:
    """A dashboard shows a count of 5, not 5.0, and money as a number with decimals, 0.0 where
    nothing is priced: closed days and hours and the open hour alike (on PostgreSQL tokens and
    credits are NUMERIC sums, whole numbers at any size)."""
    url, _, _, _ = town
    rows = plain_sql(url, f"SELECT * FROM {view}")
    assert rows
    for row in rows:
        for name in ("count", "error_count", "unpriced_count"):
            assert type(row[name]) is int, (view, name, row[name])
        for name in COUNTED_SUMS:
            value = row[name]
            if isinstance(value, Decimal):
                assert url.startswith("postgresql"), (view, name, value)
                assert value == value.to_integral_value(), (view, name, value)
            else:
                assert type(value) is int, (view, name, value)
        for name in ("cost_usd", "revenue_usd"):  # money: never an INTEGER 0 where nothing is priced
            assert type(row[name]) is (Decimal if url.startswith("postgresql") else float), (view, name, row)
    assert any(row["unpriced_count"] == row["count"] and row["cost_usd"] == 0 for row in rows)


WHALES_OPEN_DAY = datetime(2025, 3, 10, tzinfo=UTC)
"""The open day of the whales' store: its newest action is at 07:40, which closes the hours before 07:00."""
WHALES_SPLIT = WHALES_OPEN_DAY - timedelta(days=1) + timedelta(hours=9, minutes=17, seconds=5)
"""A credit price change inside a closed hour of a closed day: the rollup rows are split there, so that
hour's and that day's groups each sum two rollup rows."""
WHALES_BOOK = PriceBook(
    {m: [(BEGINNING_OF_TIME, Decimal(str(i)), Decimal(str(o)))] for m, (i, o) in MODEL_COSTS_PER_1M.items()},
    # Whole dollars: SQLite stores such a price as an INTEGER, so a whale's credits x $1 is an INTEGER
    # too, which SUM would add up past 2**63 (x $2 is past it already: SQLite makes that a REAL).
    [
        (BEGINNING_OF_TIME, Decimal("0.006")),
        (WHALES_OPEN_DAY - timedelta(days=10), Decimal(2)),
        (WHALES_SPLIT, Decimal(1)),
    ],
)


def _whales_and_minnows() -> list[ActionMetric]:
    """Two whales in each group of each path of the views: a closed day and a closed hour (rollup rows
    split by `WHALES_SPLIT`), closed hours of the open day (hourly rows), the open hour (raw rows).
    Every count of a whale is 2**62 or more, but for the cache tokens, which share tokens_in:
    sonnet's whales read theirs from the cache, opus's write theirs. Minnows are ordinary actions."""
    day = WHALES_OPEN_DAY
    whens = [
        WHALES_SPLIT - timedelta(minutes=7),
        WHALES_SPLIT + timedelta(minutes=8),
        day + timedelta(hours=3, minutes=10),
        day + timedelta(hours=5, minutes=10),
        day + timedelta(hours=7, minutes=10),
        day + timedelta(hours=7, minutes=20),
    ]
    whales = [
        ActionMetric(
            action_type="lod5",
            user_id="whale",
            town_id="town-whale",
            citizen_id=None,
            tokens_in=2**62 + 1_000_003 * k,
            tokens_out=2**62 + 7 * k,
            cache_read_tokens=2**62 + k if model == "sonnet" else k,
            cache_write_tokens=k if model == "sonnet" else 2**62 + k,
            reasoning_tokens=2**62 + 3 * k,
            credits_charged=2**62 + 11 * k,
            model=model,
            latency_ms=100.0 + k,
            timestamp=when,
        )
        for k, (model, when) in enumerate(
            ((model, when) for model in ("sonnet", "opus") for when in whens), 1
        )
    ]
    minnow_whens = [
        WHALES_SPLIT - timedelta(minutes=5),
        WHALES_SPLIT + timedelta(minutes=10),
        day + timedelta(hours=3, minutes=15),
        day + timedelta(hours=7, minutes=15),
        day + timedelta(hours=7, minutes=40),  # the newest
    ]
    minnows = [
        metric(
            town_id="town-minnow", tokens_in=100 + k, cache_read_tokens=k, reasoning_tokens=k, timestamp=when
        )
        for k, when in enumerate(minnow_whens)
    ]
    return [*whales, *minnows]


@pytest.fixture(scope="module")
def whales(backend) -> Iterator[tuple[str, list[ActionMetric]]]:
    url = backend.migrated()
    metrics = _whales_and_minnows()
    with MetricsStore(url) as store:
        for moment, usd in WHALES_BOOK.credits[1:]:
            store.set_credit_price(str(usd), moment)
        store.emit_many(metrics)
    yield url, metrics
    backend.drop(url)


def _utc(moment: Any) -> datetime:
    """A timestamp or date as SQLite (text) or asyncpg gives it, as an aware UTC datetime."""
    parsed = moment if isinstance(moment, datetime) else datetime.fromisoformat(str(moment))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


@BUCKETED_VIEWS
def test_bucketed_views_sum_counts_past_64_bits_never_an_error(
    whales, backend, view: str, bucket: str, key: Any, dimensions: Any
) -> None:
    """Each count fits 64 bits, their sum need not: two such actions in a group must not fail every
    query over the view (SQLite's SUM raised "integer overflow" past 2**63, PostgreSQL's CAST to bigint
    "out of range"). SQLite sums them in a double: an integer below 9.2e18 (exact below 2**53), a
    float past it; PostgreSQL exactly, in NUMERIC."""
    url, metrics = whales
    (state,) = plain_sql(url, "SELECT hours_closed_until, days_closed_until FROM action_metrics_rollup_state")
    assert _utc(state["hours_closed_until"]) == WHALES_OPEN_DAY + timedelta(hours=7)
    assert _utc(state["days_closed_until"]) == WHALES_OPEN_DAY
    groups: dict[tuple[str, ...], list[ActionMetric]] = defaultdict(list)
    for m in metrics:
        groups[(key(m.timestamp), *(getattr(m, name) for name in dimensions))].append(m)
    rows = plain_sql(url, f"SELECT * FROM {view}")
    assert len(rows) == len(groups)
    exact = backend.name != "sqlite"
    past_64_bits: set[str] = set()
    for row in rows:
        chosen = groups[(key(_utc(row[bucket])), *(row[name] for name in dimensions))]
        assert row["count"] == len(chosen)
        assert type(row["count"]) is int
        for name in COUNTED_SUMS:
            want, got = sum(getattr(m, name) for m in chosen), row[name]
            if want > 2**63 - 1:
                past_64_bits.add(name)
            if exact or want < 2**53:
                assert got == want, (row, name)
            else:
                assert got == pytest.approx(want, rel=1e-15), (row, name)
            if exact:  # PostgreSQL: a NUMERIC sum, a whole number at any size
                assert isinstance(got, Decimal), (row, name)
                assert got == got.to_integral_value(), (row, name)
            elif want < 2**53:  # an ordinary sum reads as an integer, as before
                assert type(got) is int, (row, name)
            else:
                assert type(got) is (int if want < 9.2e18 else float), (row, name)
        costs = [cost(m, WHALES_BOOK) for m in chosen]
        assert row["unpriced_count"] == sum(c is None for c in costs) == 0
        want_cost = float(sum(c for c in costs if c is not None))
        assert float(row["cost_usd"]) == pytest.approx(want_cost, rel=1e-12), row
        want_revenue = float(sum(revenue(m, WHALES_BOOK) for m in chosen))
        assert float(row["revenue_usd"]) == pytest.approx(want_revenue, rel=1e-12), row
    assert past_64_bits == set(COUNTED_SUMS)


MICROSECOND = timedelta(microseconds=1)


def test_the_open_hour_s_money_is_exact_with_one_huge_action_among_many_tiny_ones(
    backend, database_url: str
) -> None:
    """The open hour's raw rows are priced on their sums per group and price period, as rollup rows
    are: priced row by row, 20,000 rounded doubles added to 15 million USD drifted by ~7e-6 USD."""
    now = datetime.now(UTC) - timedelta(seconds=1)
    book = _book(now)  # opus at its catalogue price throughout
    # The huge one first in time, so that a row-by-row sum adds each tiny cost to 15 million.
    sent = [metric(model="opus", tokens_in=10**12, tokens_out=0, timestamp=now - 30_000 * MICROSECOND)]
    sent += [
        metric(model="opus", tokens_in=1, tokens_out=1, credits_charged=1, timestamp=now - i * MICROSECOND)
        for i in range(20_000)
    ]
    with MetricsStore(database_url) as store:
        store.emit_many(sent)
    (state,) = plain_sql(database_url, "SELECT hours_closed_until FROM action_metrics_rollup_state")
    if state["hours_closed_until"] is not None:
        assert _utc(state["hours_closed_until"]) <= min(m.timestamp for m in sent)  # all in raw rows
    want_cost = sum(c for m in sent if (c := cost(m, book)) is not None)
    want_revenue = sum(revenue(m, book) for m in sent)
    for view in BUCKETED_VIEW_NAMES:
        (row,) = plain_sql(database_url, f"SELECT count, cost_usd, revenue_usd FROM {view}")
        assert abs(Decimal(str(row["cost_usd"])) - want_cost) <= Decimal("1e-9"), (view, row, want_cost)
        assert abs(Decimal(str(row["revenue_usd"])) - want_revenue) <= Decimal("1e-9"), (view, row)
        assert row["count"] == len(sent)


def test_average_lod3_latency_today(backend, database_url: str) -> None:
    # "Today" is the database's current UTC day. Today's queries are placed between midnight and
    # now, whatever the time; should midnight pass before the answers are in, ask about the new day.
    sent: list[ActionMetric] = []
    with MetricsStore(database_url) as store:
        while True:
            now = datetime.now(UTC)
            midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
            so_far = now - midnight
            sent += [
                metric(latency_ms=90.0, timestamp=midnight + so_far / 4),
                metric(latency_ms=140.5, timestamp=midnight + so_far / 2),
                metric(latency_ms=400.0, timestamp=midnight + so_far * 3 / 4),
                metric(latency_ms=999.0, timestamp=midnight - timedelta(hours=2)),  # yesterday
                metric(latency_ms=5.0, timestamp=midnight + so_far / 2, action_type="lod4"),
                # A timeout: in the count and average, not in the percentiles a user waits for.
                metric(latency_ms=30_000.0, timestamp=midnight + so_far / 3, error="TimeoutError"),
            ]
            store.emit_many(sent)
            (row,) = plain_sql(database_url, example("average_lod3_latency_today", backend.name))
            api = store.aggregate(action_type="lod3", since=midnight, exact=True)
            if datetime.now(UTC).date() == now.date():
                break
    today = [m for m in sent if m.action_type == "lod3" and m.timestamp >= midnight]
    assert row["count"] == api.count == len(today) >= 4
    assert row["avg_latency_ms"] == pytest.approx(api.avg_latency_ms, rel=1e-12)
    assert api.avg_latency_ms == pytest.approx(statistics.fmean(m.latency_ms for m in today), rel=1e-12)
    if backend.name == "postgresql":  # SQLite's example has no percentiles (no percentile_cont)
        succeeded = [m.latency_ms for m in today if m.error is None]
        for name, q in (("p50_latency_ms", 50), ("p95_latency_ms", 95)):
            want = float(numpy.percentile(succeeded, q))  # NumPy's 'linear', as percentile_cont
            assert row[name] == pytest.approx(want, rel=1e-12)
            assert getattr(api, name) == pytest.approx(want, rel=1e-12)


def test_gross_margin_for_lod4_this_week(town, backend) -> None:
    url, store, metrics, now = town
    (row,) = plain_sql(url, example("gross_margin_lod4_this_week", backend.name))
    api = store.aggregate(action_type="lod4", since=now - timedelta(days=7))
    week = [m for m in metrics if m.action_type == "lod4" and m.timestamp >= now - timedelta(days=7)]
    assert row["count"] == api.count == len(week) > 0
    assert row["unpriced_count"] == api.unpriced_count
    assert float(row["revenue_usd"]) == pytest.approx(api.total_revenue_usd, abs=1e-9)
    assert float(row["gross_margin"]) == pytest.approx(api.gross_margin, rel=1e-9)
    book = _book(now)
    total_revenue = sum(revenue(m, book) for m in week)
    total_cost = sum((c for m in week if (c := cost(m, book)) is not None), Decimal(0))
    assert api.gross_margin == pytest.approx(float((total_revenue - total_cost) / total_revenue), rel=1e-9)


def test_which_model_is_used_most(town, backend) -> None:
    url, store, metrics, _ = town
    rows = plain_sql(url, example("model_usage", backend.name))
    by_model = store.aggregate().by_model
    assert [row["model"] for row in rows] == list(by_model)  # both most-used first
    counts = {m: sum(1 for x in metrics if x.model == m) for m in {x.model for x in metrics}}
    assert {row["model"]: row["count"] for row in rows} == counts
    assert counts[rows[0]["model"]] == max(counts.values())
