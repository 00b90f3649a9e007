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
import pytest
from conftest import metric
from sqlalchemy import make_url

from action_metrics import ActionMetric, MetricsStore
from action_metrics.clickhouse import SCHEMES as CLICKHOUSE_SCHEMES
from action_metrics.clickhouse import ClickHouseURL
from action_metrics.pricing import BEGINNING_OF_TIME, MODEL_COSTS_PER_1M

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


@pytest.mark.parametrize(
    ("view", "bucket", "key", "dimensions"),
    [
        ("action_metrics_daily", "day", _day, ("town_id", "action_type", "model")),
        ("action_metrics_hourly", "hour", _hour, ("town_id", "action_type", "model")),
        ("action_metrics_daily_by_town", "day", _day, ("town_id", "model")),
        ("action_metrics_daily_by_model", "day", _day, ("model",)),
    ],
)
def test_bucketed_views_match_the_reference_per_bucket_and_group(
    town, view: str, bucket: str, key: Any, dimensions: tuple[str, ...]
) -> None:
    url, _, metrics, now = town
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
        for column, fraction in (("p50_latency_ms", 0.5), ("p95_latency_ms", 0.95)):
            want = percentile(succeeded, fraction)  # of the successful actions; none: NULL
            assert row[column] == (None if want is None else pytest.approx(want, rel=1e-12))


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
            ]
            store.emit_many(sent)
            (row,) = plain_sql(database_url, example("average_lod3_latency_today", backend.name))
            api = store.aggregate(action_type="lod3", since=midnight)
            if datetime.now(UTC).date() == now.date():
                break
    today = [m.latency_ms for m in sent if m.action_type == "lod3" and m.timestamp >= midnight]
    assert row["count"] == api.count == len(today) >= 3
    assert row["avg_latency_ms"] == pytest.approx(api.avg_latency_ms, rel=1e-12)
    assert api.avg_latency_ms == pytest.approx(statistics.fmean(today), rel=1e-12)


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
