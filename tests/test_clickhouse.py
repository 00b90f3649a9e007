"""ClickHouse (preview), in process through chdb, what the three-way `backend` fixture does not
ask: the known-answer aggregates of test_aggregate.py with every batch sent twice; the versioned
schema and `db upgrade|current --sql` for it; what only ClickHouse refuses.

chdb runs one engine directory per process, so the session shares one directory (conftest's
`chdb_directory`, also the `backend` fixture's) and each test gets a database of its own in it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import metric, run_cli
from test_aggregate import (
    CREDITS_CHEAPER,
    MINI_PRICED,
    PAIRS,
    SINGLE,
    SONNET_CHEAPER,
    START,
    WIDER,
    _book,
    _metrics,
)

from action_metrics import ActionMetric, AsyncMetricsStore, MetricsStore
from action_metrics.breakdown import SORT_KEYS
from action_metrics.cli import run_async
from action_metrics.clickhouse import EARLIEST, USER_ROLLUPS, ClickHouseURL, head_version, schema_versions
from action_metrics.clickhouse_repository import ClickHouseRepository, Plan, _ranges_sql, corrected_plan, plan
from action_metrics.errors import (
    DataRejected,
    InvalidFilter,
    MetricInPrunedPeriod,
    RawRowsPruned,
    SchemaOutOfDate,
    SchemaTooNew,
)
from action_metrics.pricing import BEGINNING_OF_TIME, MODEL_COSTS_PER_1M
from action_metrics.rollup import bin_of, floor_to
from action_metrics.schema import action_metrics

from reference import PriceBook, assert_matches, expected_aggregate, select_like_the_store

pytest.importorskip("chdb", reason="the optional extra .[clickhouse] is not installed")


def _seed_book() -> PriceBook:
    """The prices a new database has: the seed's, from the beginning of time."""
    models = {
        model: [(BEGINNING_OF_TIME, Decimal(str(i)), Decimal(str(o)))]
        for model, (i, o) in MODEL_COSTS_PER_1M.items()
    }
    return PriceBook(models, [(BEGINNING_OF_TIME, Decimal("0.006"))])


@pytest.fixture(scope="session")
def engine_directory(chdb_directory: Path) -> Path:
    return chdb_directory


def _new_database_url(directory: Path) -> str:
    return f"chdb://{directory}?database=am_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def clickhouse_url(engine_directory: Path) -> str:
    """A database of its own, not yet created: the store creates and upgrades it on first use."""
    return _new_database_url(engine_directory)


@dataclass
class Dataset:
    store: MetricsStore
    metrics: list[ActionMetric]
    book: PriceBook

    def select(self, **filters: Any) -> list[ActionMetric]:
        return select_like_the_store(self.metrics, filters)


@pytest.fixture(scope="module")
def dataset(engine_directory: Path) -> Iterator[Dataset]:
    """test_aggregate.py's metrics and price book. Every batch is sent twice, and overlapping
    batches re-send half of two others: a retry must count once in every figure."""
    metrics = _metrics()
    with MetricsStore(_new_database_url(engine_directory)) as store:
        store.set_model_price(
            "sonnet", "2.5", "12.5", SONNET_CHEAPER, cache_read_per_1m="0.25", cache_write_per_1m="3.125"
        )
        store.set_model_price("openai/gpt-4o-mini", 0.15, 0.6, MINI_PRICED, cache_read_per_1m=0.075)
        store.set_credit_price(Decimal("0.0045"), effective_from=CREDITS_CHEAPER)
        for start in range(0, len(metrics), 500):
            store.emit_many(metrics[start : start + 500])
            store.emit_many(metrics[start : start + 500])
        for start in range(250, len(metrics), 1000):
            store.emit_many(metrics[start : start + 500])
        yield Dataset(store, metrics, _book())


@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
@pytest.mark.parametrize("filters", [{}, *SINGLE, *PAIRS, *WIDER], ids=lambda f: ",".join(f) or "everything")
def test_aggregate_matches_the_reference(dataset: Dataset, filters: dict[str, Any], exact: bool) -> None:
    expected = expected_aggregate(dataset.select(**filters), dataset.book)
    aggregate = dataset.store.aggregate(exact=exact, **filters).to_dict()
    # The rollups answer unless the question is exact or keeps what none does (a citizen, a limit, a
    # user with a town or an action type).
    users_beside = "user_id" in filters and any(name in filters for name in ("town_id", "action_type"))
    raw_only = exact or users_beside or any(name in filters for name in ("citizen_id", "limit"))
    assert aggregate["percentiles_exact"] is raw_only
    assert_matches(aggregate, expected)


@pytest.mark.parametrize("filters", [{}, *SINGLE, *WIDER], ids=lambda f: ",".join(f) or "everything")
def test_query_returns_exactly_the_selection_newest_first(dataset: Dataset, filters: dict[str, Any]) -> None:
    assert dataset.store.query(**filters) == dataset.select(**filters)


def test_re_sent_batches_are_stored_once_after_the_merges_too(clickhouse_url: str) -> None:
    """FINAL answers before the merges; after them the table itself holds one row per action, so
    the sorting key really is what makes two rows copies of one action."""
    metrics = [metric(timestamp=START + timedelta(minutes=i), latency_ms=float(i)) for i in range(200)]
    with MetricsStore(clickhouse_url) as store:
        for _ in range(3):
            store.emit_many(metrics)
        for one in metrics[:10]:
            store.emit(one)
        assert store.aggregate().count == 200
        client = ClickHouseURL.parse(clickhouse_url).connect()
        try:
            client.command("OPTIMIZE TABLE action_metrics FINAL")
            assert client.query("SELECT count() FROM action_metrics").result_rows[0][0] == 200
        finally:
            client.close()
        assert_matches(store.aggregate().to_dict(), expected_aggregate(metrics, _book()))
        assert store.query() == select_like_the_store(metrics, {})


def _insert_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the batches ClickHouse repositories insert from now on, in order."""
    from action_metrics import clickhouse_repository

    sizes: list[int] = []
    insert = clickhouse_repository.ClickHouseRepository.insert

    async def recorded(self: Any, metrics: Any) -> None:
        sizes.append(len(metrics))
        await insert(self, metrics)

    monkeypatch.setattr(clickhouse_repository.ClickHouseRepository, "insert", recorded)
    return sizes


def test_emit_many_streams_into_clickhouse_in_inserts_of_its_own_batch_size(
    clickhouse_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ClickHouse takes larger batches than the SQL backends (each insert's parts and views cost the
    same whatever its size); a generator is still drawn a batch at a time, sync and async alike."""
    from action_metrics import store as store_module

    monkeypatch.setattr(store_module, "CLICKHOUSE_INGEST_BATCH", 7)
    sizes = _insert_sizes(monkeypatch)
    metrics = [metric(timestamp=START + timedelta(minutes=i)) for i in range(30)]
    with MetricsStore(clickhouse_url) as store:
        assert store._store.ingest_batch == 7
        store.emit_many(iter(metrics[:16]))
        assert sizes == [7, 7, 2]
        run_async(_emit_async(clickhouse_url, metrics[16:]))
        assert sizes == [7, 7, 2, 7, 7]
        assert store.aggregate().count == 30
    assert AsyncMetricsStore("sqlite:///unused.db").ingest_batch == 20_000


def test_the_writer_inserts_into_clickhouse_in_batches_of_its_own_size(
    clickhouse_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The background writer's defaults follow emit_many's: ClickHouse's batches (and the buffer that
    holds the next one while one is in flight) are larger than the SQL backends'; sizes given win."""
    from action_metrics import store as store_module

    monkeypatch.setattr(store_module, "CLICKHOUSE_BATCH_SIZE", 7)
    monkeypatch.setattr(store_module, "CLICKHOUSE_BUFFER_SIZE", 14)
    sizes = _insert_sizes(monkeypatch)
    metrics = [metric(timestamp=START + timedelta(minutes=i)) for i in range(12)]
    with MetricsStore(clickhouse_url, flush_interval=3600) as store:
        assert (store.writer.settings.batch_size, store.writer.settings.buffer_size) == (7, 14)
        for one in metrics:
            store.emit(one)
        store.flush()
        assert sum(sizes) == 12, sizes
        assert max(sizes) == 7, sizes  # the first 7 go as soon as they wait
        assert store.dropped == 0
        assert store.aggregate().count == 12
    with MetricsStore(clickhouse_url, buffer_size=30, batch_size=20) as store:
        assert (store.writer.settings.batch_size, store.writer.settings.buffer_size) == (20, 30)
    sql = AsyncMetricsStore("sqlite:///unused.db").writer.settings
    assert (sql.batch_size, sql.buffer_size) == (20_000, 50_000)


async def _emit_async(url: str, metrics: list[ActionMetric]) -> None:
    async with AsyncMetricsStore(url) as store:
        await store.emit_many(iter(metrics))


@pytest.mark.parametrize("ids", ["uuid7", "uuid4"])
def test_a_re_sent_action_counts_once_raw_and_rolled_up_whatever_its_ids(
    clickhouse_url: str, ids: str
) -> None:
    """First id wins looks a batch of time-ordered ids up as one range, random ids one by one: either
    way an action re-sent (alone, in a bigger batch, with another timestamp in the same UTC hour)
    counts once in the raw rows and the rollups alike, and one sent again with another town, as the
    raw table's key tells two actions apart, counts as a second action in both."""
    make_id = uuid.uuid4 if ids == "uuid4" else None
    metrics = [
        metric(
            timestamp=START + timedelta(minutes=7 * i, seconds=i % 60),
            latency_ms=1.0 + i,
            tokens_in=i,
            **({"id": make_id()} if make_id else {}),
        )
        for i in range(300)
    ]
    same_hour = replace(metrics[5], timestamp=metrics[5].timestamp.replace(minute=59))
    other_town = replace(metrics[6], town_id="town-elsewhere")
    with MetricsStore(clickhouse_url) as store:
        store.emit_many(metrics[:200])
        store.emit_many(metrics)  # 200 re-sent among 100 new
        store.emit_many([same_hour, metrics[299]])
        store.emit(other_town)
        expected = [*metrics, other_town]
        assert_matches(store.aggregate().to_dict(), expected_aggregate(expected, _seed_book()))
        assert_matches(store.aggregate(exact=True).to_dict(), expected_aggregate(expected, _seed_book()))
        assert store.aggregate().count == store.aggregate(exact=True).count == 301


def test_a_price_set_again_at_the_same_start_replaces_it(clickhouse_url: str) -> None:
    at = START + timedelta(days=1)
    with MetricsStore(clickhouse_url) as store:
        store.emit(metric(model="new-model", tokens_in=1_000_000, tokens_out=0, timestamp=at))
        assert store.aggregate().unpriced_count == 1
        store.set_model_price("new-model", 2, 4, effective_from=at)
        store.set_model_price("new-model", 3, 4, effective_from=at)
        priced = store.aggregate()
    assert (priced.unpriced_count, priced.total_cost_usd) == (0, 3.0)


def test_a_price_change_applies_from_its_effective_time(dataset: Dataset) -> None:
    exact = dataset.store.aggregate(
        model="sonnet", since=SONNET_CHEAPER, until=SONNET_CHEAPER + timedelta(microseconds=1)
    )
    assert exact.count == 1
    assert exact.total_cost_usd == pytest.approx((1000 * 2.5 + 1000 * 12.5) / 1e6, abs=1e-12)
    at_change = dataset.store.aggregate(
        action_type="lod5", since=CREDITS_CHEAPER, until=CREDITS_CHEAPER + timedelta(microseconds=1)
    )
    assert at_change.total_revenue_usd == pytest.approx(400 * 0.0045, abs=1e-12)


def test_money_sums_stay_exact_when_one_huge_action_meets_many_tiny_ones(clickhouse_url: str) -> None:
    huge = ActionMetric("lod5", "whale", "town-a", None, 4_000_000_000_000, 0, "haiku", 1.0, 10**9, START)
    tiny = [
        ActionMetric(
            "lod3", "minnow", "town-a", None, 1, 0, "haiku", 1.0, 1, START + timedelta(seconds=i + 1)
        )
        for i in range(20_000)
    ]
    with MetricsStore(clickhouse_url) as store:
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


def test_the_seeded_prices_are_the_packages_defaults(clickhouse_url: str) -> None:
    moment = datetime(1900, 1, 1, tzinfo=UTC)
    metrics = [
        metric(model=model, tokens_in=1_000_000, tokens_out=2_000_000, timestamp=moment)
        for model in MODEL_COSTS_PER_1M
    ]
    with MetricsStore(clickhouse_url) as store:
        store.emit_many(metrics)
        by_model = store.aggregate().by_model
        revenue = store.aggregate().total_revenue_usd
    for model, (input_price, output_price) in MODEL_COSTS_PER_1M.items():
        assert by_model[model].total_cost_usd == pytest.approx(input_price + 2 * output_price, abs=1e-12)
        assert by_model[model].unpriced_count == 0
    assert revenue == pytest.approx(len(metrics) * 10 * 0.006, abs=1e-12)


def test_a_timestamp_clickhouse_cannot_store_is_refused_naming_the_field(clickhouse_url: str) -> None:
    too_early = metric(timestamp=datetime(1899, 12, 31, tzinfo=UTC))
    with MetricsStore(clickhouse_url) as store:
        with pytest.raises(DataRejected, match="timestamp"):
            store.emit_many([metric(), too_early])
        assert store.query() == []  # a batch is refused whole
        # Emitted through the writer: that metric is dropped and counted, its batch written.
        kept = [metric(), metric()]
        for one in (kept[0], too_early, kept[1]):
            store.emit(one)
        store.flush()
        assert (store.rejected, store.query()) == (1, select_like_the_store(kept, {}))


def test_db_upgrade_creates_the_schema_and_current_reports_it(clickhouse_url: str) -> None:
    assert run_cli("db", "current", "--url", clickhouse_url).stdout == "- (no schema)\n"
    upgraded = run_cli("db", "upgrade", "--url", clickhouse_url)
    assert upgraded.exit_code == 0, upgraded.output
    assert f"version {head_version()}" in upgraded.stderr
    assert run_cli("db", "current", "--url", clickhouse_url).stdout == f"{head_version()} (head)\n"
    again = run_cli("db", "upgrade", "--url", clickhouse_url)
    assert again.exit_code == 0, again.output
    with MetricsStore(clickhouse_url) as store:
        store.emit(metric())
        assert store.aggregate().count == 1


def test_db_upgrade_sql_prints_the_ddl_and_changes_nothing(clickhouse_url: str) -> None:
    printed = run_cli("db", "upgrade", "--sql", "--url", clickhouse_url)
    assert printed.exit_code == 0, printed.output
    sql = printed.stdout
    database = ClickHouseURL.parse(clickhouse_url).database
    assert f"CREATE DATABASE IF NOT EXISTS `{database}`;" in sql
    assert "ENGINE = ReplacingMergeTree\nPARTITION BY toYYYYMM(timestamp)" in sql
    assert "ORDER BY (town_id, action_type, toStartOfHour(timestamp), id);" in sql
    assert "input_per_1m Decimal(20, 9)" in sql
    assert f"INSERT INTO action_metrics_schema_version (version, name) VALUES ({head_version()}" in sql
    assert run_cli("db", "current", "--url", clickhouse_url).stdout == "- (no schema)\n"


def test_db_upgrade_sql_starts_from_the_version_the_database_is_at(clickhouse_url: str) -> None:
    """As on the SQL backends: `--sql` prints from the version the database is at (or the range
    FROM:TO given), never from base for a database that has one: its fills would run again, and on a
    pruned database the hourly rollup, emptied and filled from the raw rows left, would lose the
    period it keeps. What a DBA runs from the printed SQL brings a pruned database at version 5 to
    the head with every action still counted, as `db upgrade` does."""
    metrics = [metric(timestamp=START + timedelta(hours=5 * i), tokens_in=i) for i in range(60)]
    cutoff = START + timedelta(days=5)
    with MetricsStore(clickhouse_url) as store:
        store.emit_many(metrics)
        store.prune(cutoff)
        before = store.aggregate().to_dict()
    assert before["count"] == 60
    assert run_cli("db", "downgrade", "5", "--url", clickhouse_url).exit_code == 0

    printed = run_cli("db", "upgrade", "--sql", "--url", clickhouse_url)
    assert printed.exit_code == 0, printed.output
    assert printed.stdout.startswith(
        f"-- action-metrics db upgrade: the ClickHouse SQL from version 5 (where {clickhouse_url} is) "
        f"to {head_version()}\n"
    )
    assert "-- version 5:" not in printed.stdout
    assert "-- version 6:" in printed.stdout
    assert "TRUNCATE TABLE IF EXISTS action_metrics_rollup_hourly;" not in printed.stdout  # version 4's
    given = run_cli("db", "upgrade", "5:head", "--sql", "--url", clickhouse_url)
    assert given.stdout.split("\n", 1)[1] == printed.stdout.split("\n", 1)[1]
    cluster = run_cli("db", "upgrade", "8:9", "--sql", "--cluster", "prod", "--url", clickhouse_url)
    assert cluster.exit_code == 0, cluster.output
    assert "-- version 9:" in cluster.stdout
    assert "-- version 8:" not in cluster.stdout
    assert "ALTER TABLE action_metrics_local ON CLUSTER `prod` MODIFY SETTING" in cluster.stdout
    assert run_cli("db", "current", "--url", clickhouse_url).stdout == f"5 (behind head {head_version()})\n"

    client = ClickHouseURL.parse(clickhouse_url).connect(with_database=False)
    try:
        for statement in _statements(printed.stdout):
            client.command(statement)
    finally:
        client.close()
    assert run_cli("db", "current", "--url", clickhouse_url).stdout == f"{head_version()} (head)\n"
    with MetricsStore(clickhouse_url) as store:
        assert store.aggregate().to_dict() == before  # the pruned period is still counted
    at_head = run_cli("db", "upgrade", "--sql", "--url", clickhouse_url)
    assert at_head.stdout.endswith("already: no SQL to run\n")
    down = run_cli("db", "upgrade", "9:5", "--sql", "--url", clickhouse_url)
    assert down.exit_code != 0
    assert "db downgrade goes down" in down.output
    ranged = run_cli("db", "upgrade", "5:9", "--url", clickhouse_url)
    assert ranged.exit_code != 0
    assert "FROM:TO is for --sql" in ranged.output


def test_db_upgrade_sql_for_a_database_it_cannot_read_prints_from_base_and_says_so(tmp_path: Path) -> None:
    """A server out of reach: the SQL from base, its comment saying why and how to give a range. A
    chdb directory that is not there has no schema, and printing does not create it."""
    unreachable = run_cli("db", "upgrade", "--sql", "--url", "clickhouse://default@127.0.0.1:1/metrics")
    assert unreachable.exit_code == 0, unreachable.output
    first, second = unreachable.stdout.splitlines()[:2]
    assert first.startswith("-- action-metrics db upgrade: could not read the version of clickhouse://")
    assert second.startswith("-- so the ClickHouse SQL from base to version")
    assert "give the range FROM:TO" in second
    assert "CREATE DATABASE IF NOT EXISTS `metrics`;" in unreachable.stdout
    missing = tmp_path / "not-there"
    printed = run_cli("db", "upgrade", "--sql", "--url", f"chdb://{missing}?database=metrics")
    assert printed.stdout.startswith("-- action-metrics db upgrade: the ClickHouse SQL from version base (")
    assert not missing.exists()


def test_the_printed_sql_builds_the_same_schema_as_upgrade(engine_directory: Path) -> None:
    """What a DBA runs from `--sql` gives a database the store accepts, with the seeded prices."""
    url = _new_database_url(engine_directory)
    sql = run_cli("db", "upgrade", "--sql", "--url", url).stdout
    client = ClickHouseURL.parse(url).connect(with_database=False)
    try:
        for statement in sql.split(";\n"):
            lines = [line for line in statement.splitlines() if not line.startswith("--")]
            if "\n".join(lines).strip():
                client.command("\n".join(lines))
    finally:
        client.close()
    with MetricsStore(url) as store:
        store.emit(metric(tokens_in=1_000_000, tokens_out=0))
        assert store.aggregate().total_cost_usd == pytest.approx(0.25, abs=1e-12)


def test_a_database_upgraded_by_a_newer_package_is_refused(clickhouse_url: str) -> None:
    MetricsStore(clickhouse_url).open().close()  # creates the database
    client = ClickHouseURL.parse(clickhouse_url).connect()
    try:
        client.command("INSERT INTO action_metrics_schema_version (version, name) VALUES (999, 'future')")
    finally:
        client.close()
    store = MetricsStore(clickhouse_url)
    with pytest.raises(SchemaTooNew, match="upgrade action-metrics"):
        store.open()
    store.close()


def _months_back(count: int) -> list[datetime]:
    """The first instants of the `count` whole months before this one, oldest first."""
    first = floor_to(datetime.now(UTC), "day").replace(day=1)
    starts = [first]
    for _ in range(count):
        starts.insert(0, (starts[0] - timedelta(days=1)).replace(day=1))
    return starts[:count]


def test_prune_refuses_a_cut_off_after_today(clickhouse_url: str) -> None:
    """From the cut-off on every metric before it is refused: a cut-off in the future would refuse
    today's metrics, so it is refused itself (SQLite and PostgreSQL refuse one the rollups have not
    closed)."""
    tomorrow = floor_to(datetime.now(UTC), "day") + timedelta(days=1)
    with MetricsStore(clickhouse_url) as store:
        store.emit(metric())
        for dry_run in (True, False):  # a dry run says what the prune would: that it refuses
            with pytest.raises(InvalidFilter, match=r"^before: .*after today"):
                store.prune(tomorrow + timedelta(hours=1), dry_run=dry_run)
        assert store.prune(tomorrow - timedelta(days=1), dry_run=True).rows == 0
        store.emit_many([metric()])
        assert store.aggregate(exact=True).count == 2


def test_prune_drops_old_months_and_rows_and_the_rollups_still_answer_for_them(clickhouse_url: str) -> None:
    """Two whole months go as partitions, the days of the third before the cut-off by a DELETE; the
    rollups keep them: aggregates and breakdowns over whole hours still answer, and a read that
    needs the raw rows before the cut-off is refused naming it."""
    months = _months_back(3)  # the first days of the three months before this one
    metrics = [
        metric(timestamp=months[0] + timedelta(hours=7 * i), tokens_in=i) for i in range(300)
    ]  # ~87 days
    cutoff = months[2] + timedelta(days=8)  # in the past: prune refuses a cut-off after today
    older = [one for one in metrics if one.timestamp < cutoff]
    kept = [one for one in metrics if one.timestamp >= cutoff]
    assert {one.timestamp.month for one in older} == {month.month for month in months}
    assert kept
    with MetricsStore(clickhouse_url) as store:
        store.emit_many(metrics)
        before = [row.to_dict() for row in store.breakdown("town_id", bucket="day", sort="count")]
        dry = store.prune(cutoff + timedelta(hours=7), dry_run=True)  # rounded down to the UTC day
        assert (dry.cutoff, dry.rows, dry.dry_run) == (cutoff, len(older), True)
        assert len(store.query()) == len(metrics)
        seen: list[int] = []
        done = store.prune(cutoff + timedelta(hours=7), progress=seen.append)
        assert (done.cutoff, done.rows, seen) == (cutoff, len(older), [0, len(older)])
        assert store.query(since=cutoff) == select_like_the_store(kept, {})
        assert store.query(limit=5) == select_like_the_store(kept, {"limit": 5})  # the newest: all kept
        assert_matches(store.aggregate(since=cutoff).to_dict(), expected_aggregate(kept, _seed_book()))
        assert_matches(store.aggregate().to_dict(), expected_aggregate(metrics, _seed_book()))
        a_day_earlier = cutoff - timedelta(days=1)
        assert_matches(
            store.aggregate(since=a_day_earlier).to_dict(),
            expected_aggregate([one for one in metrics if one.timestamp >= a_day_earlier], _seed_book()),
        )
        assert [row.to_dict() for row in store.breakdown("town_id", bucket="day", sort="count")] == before
        # The user rollups keep the pruned period's whole UTC days and months.
        user = metrics[0].user_id
        of_user = [one for one in metrics if one.user_id == user]
        assert_matches(store.aggregate(user_id=user).to_dict(), expected_aggregate(of_user, _seed_book()))
        per_user = {row.keys["user_id"]: row.figures.count for row in store.breakdown("user_id")}
        assert per_user == Counter(one.user_id for one in metrics)
        with pytest.raises(RawRowsPruned, match="for whole UTC days without exact=True"):
            store.breakdown("user_id", since=cutoff - timedelta(minutes=90))  # a partial hour
        for call in (
            lambda: store.aggregate(exact=True),
            lambda: store.aggregate(since=cutoff - timedelta(minutes=90)),  # a partial hour
            lambda: store.aggregate(user_id=user, town_id=kept[0].town_id),
            lambda: store.aggregate(limit=len(kept) + 1),
            lambda: store.query(),
            lambda: store.breakdown("user_id", exact=True),
        ):
            with pytest.raises(RawRowsPruned, match=re.escape(f"before {cutoff.isoformat()}")) as raised:
                call()
            assert "for whole UTC hours without exact=True" in str(raised.value)
            assert "the rollups keep those" in str(raised.value)
        client = ClickHouseURL.parse(clickhouse_url).connect()
        try:
            stored = client.query("SELECT count() FROM action_metrics").result_rows[0][0]
        finally:
            client.close()
    assert stored == len(kept)


def _upgrade_cut_off(url: str, number: int, count: int) -> None:
    """An upgrade to version `number` cut off after its first `count` statements."""
    client = ClickHouseURL.parse(url).connect()
    try:
        version = next(v for v in schema_versions() if v.number == number)
        for statement in version.statements()[:count]:
            client.command(statement)
    finally:
        client.close()


def _rows(url: str, query: str) -> list[Any]:
    """The rows of `query` on the database at `url`, read outside any store."""
    client = ClickHouseURL.parse(url).connect()
    try:
        return list(client.query(query).result_rows)
    finally:
        client.close()


def _ids_by_day(url: str) -> dict[datetime, int]:
    rows = _rows(url, "SELECT toStartOfDay(hour), count() FROM action_metrics_ids GROUP BY 1")
    return {day.replace(tzinfo=UTC): count for day, count in rows}


def test_an_action_re_sent_or_late_for_a_pruned_period_is_refused_whoever_pruned(clickhouse_url: str) -> None:
    """Prune removes the ids before the cut-off with their rows (and only those), so an action from
    before it could not be told from one stored: it is refused, naming the cut-off. The cut-off is
    read with each insert's id lookup, so a store opened before another one pruned refuses it too;
    the writer stores the rest of its batch, and the rollups count what was accepted once."""
    first_day = floor_to(datetime.now(UTC) - timedelta(days=20), "day")
    metrics = [metric(timestamp=first_day + timedelta(hours=4 * i), tokens_in=i) for i in range(100)]
    cutoff = first_day + timedelta(days=8)
    fresh = [metric(timestamp=datetime.now(UTC) - timedelta(minutes=i), tokens_in=7 * i) for i in range(4)]
    late = metric(timestamp=cutoff - timedelta(microseconds=1))
    with MetricsStore(clickhouse_url) as writing, MetricsStore(clickhouse_url) as pruning:
        writing.emit_many(metrics)
        ids_before = _ids_by_day(clickhouse_url)
        assert sum(ids_before.values()) == len(metrics)
        pruning.prune(cutoff)
        assert _ids_by_day(clickhouse_url) == {day: n for day, n in ids_before.items() if day >= cutoff}

        with pytest.raises(MetricInPrunedPeriod, match=re.escape(cutoff.isoformat())) as raised:
            writing.emit_many([fresh[0], metrics[3], late])
        assert (raised.value.field, raised.value.indexes, raised.value.cutoff) == (
            "timestamp",
            (1, 2),
            cutoff,
        )
        assert writing.query(since=cutoff, limit=1000) == select_like_the_store(
            [one for one in metrics if one.timestamp >= cutoff], {}
        )  # the batch stored nothing

        for one in [fresh[1], metrics[0], fresh[2], late, metrics[5], fresh[3]]:
            writing.emit(one)
        writing.flush()
        assert writing.rejected == 3
        accepted = [*metrics, *fresh[1:]]
        assert_matches(writing.aggregate().to_dict(), expected_aggregate(accepted, _seed_book()))
        kept = [one for one in accepted if one.timestamp >= cutoff]
        assert_matches(
            writing.aggregate(since=cutoff, exact=True).to_dict(), expected_aggregate(kept, _seed_book())
        )


@pytest.mark.parametrize("descending", [True, False])
def test_a_breakdown_sorts_by_every_key_groups_without_a_value_last(
    clickhouse_url: str, descending: bool
) -> None:
    """Each sortable key's SQL orders the rows as the figures the rows carry (None last either way)."""
    at = START + timedelta(hours=3)
    metrics = [
        ActionMetric("lod3", "free", "t", None, 10, 10, "haiku", 5.0, 0, timestamp=at),
        ActionMetric("lod3", "paid", "t", None, 10, 10, "haiku", 7.0, 10, timestamp=at),
        ActionMetric("lod5", "dear", "t", None, 10_000_000, 10, "opus", 2.0, 1, timestamp=at),
        ActionMetric("lod4", "unpriced", "t", None, 500, 900, "mystery", 9.0, 400, timestamp=at),
        ActionMetric("lod4", "failing", "t", None, 50, 0, "sonnet", 1.0, 0, timestamp=at, error="Timeout"),
        metric(
            user_id="cached", cache_read_tokens=60, cache_write_tokens=20, reasoning_tokens=5, timestamp=at
        ),
    ]
    with MetricsStore(clickhouse_url) as store:
        store.emit_many(metrics)
        for key in SORT_KEYS:
            rows = [row.to_dict() for row in store.breakdown("user_id", sort=key, descending=descending)]
            values = [row[key] for row in rows]
            present = [value for value in values if value is not None]
            assert values == present + [None] * (len(values) - len(present)), key
            assert present == sorted(present, reverse=descending), key
            assert {row["user_id"] for row in rows} == {one.user_id for one in metrics}


def test_an_async_store_answers_concurrent_calls_while_its_writer_writes(clickhouse_url: str) -> None:
    """The worker threads: reads, a stream and buffered writes at once on one store, none lost."""
    metrics = [metric(timestamp=START + timedelta(minutes=i), user_id=f"user-{i % 7}") for i in range(400)]

    async def run() -> tuple[list[Any], int, list[dict[str, Any]], list[dict[str, Any]]]:
        async with AsyncMetricsStore(clickhouse_url) as store:
            await store.emit_many(metrics[:200])
            for one in metrics[200:]:
                await store.emit(one)
            answers = await asyncio.gather(
                *(store.aggregate(user_id=f"user-{i}") for i in range(7)),
                store.query(limit=3),
                store.breakdown("user_id", sort="count"),
            )
            streamed = [row.to_dict() async for row in store.stream_breakdown("user_id", sort="count")]
            await store.flush()
            return (
                answers,
                (await store.aggregate()).count,
                streamed,
                [row.to_dict() for row in await store.breakdown("user_id", sort="count")],
            )

    answers, count, streamed, listed = run_async(run())
    assert count == len(metrics)
    assert all(answer.count > 0 for answer in answers[:7])
    assert len(answers[7]) == 3
    assert streamed == listed
    assert sum(row["count"] for row in listed) == len(metrics)


def _statements(sql: str) -> list[str]:
    """The statements of `--sql`'s output, without its comment lines."""
    found = []
    for statement in sql.split(";\n"):
        text = "\n".join(line for line in statement.splitlines() if not line.startswith("--")).strip()
        if text:
            found.append(text)
    return found


def _tables(url: str) -> list[str]:
    client = ClickHouseURL.parse(url).connect()
    try:
        rows = client.query("SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name")
        return [name for (name,) in rows.result_rows]
    finally:
        client.close()


def test_db_downgrade_to_a_version_and_to_base_then_upgrade_again(clickhouse_url: str) -> None:
    assert run_cli("db", "upgrade", "--url", clickhouse_url).exit_code == 0
    with MetricsStore(clickhouse_url) as store:
        store.emit_many([metric(), metric()])
        store.set_model_price("haiku", 1, 2)
    assert "copy_checkpoints" in _tables(clickhouse_url)

    down = run_cli("db", "downgrade", "2", "--url", clickhouse_url)
    assert down.exit_code == 0, down.output
    assert run_cli("db", "current", "--url", clickhouse_url).stdout == f"2 (behind head {head_version()})\n"
    assert "copy_checkpoints" not in _tables(clickhouse_url)
    assert "raw_kept_from" in _tables(clickhouse_url)

    asked = run_cli("db", "downgrade", "base", "--url", clickhouse_url)  # no answer: no
    assert asked.exit_code == 1, asked.output
    assert f"Downgrading {ClickHouseURL.parse(clickhouse_url).shown()} to base drops every" in asked.stderr
    assert "Aborted" in asked.stderr
    assert "raw_kept_from" in _tables(clickhouse_url)
    base = run_cli("db", "downgrade", "base", "--url", clickhouse_url, stdin="y\n")
    assert base.exit_code == 0, base.output
    assert run_cli("db", "current", "--url", clickhouse_url).stdout == "- (no schema)\n"
    assert _tables(clickhouse_url) == []
    assert run_cli("db", "downgrade", "base", "--url", clickhouse_url).exit_code == 0  # nothing left to do

    assert run_cli("db", "upgrade", "--url", clickhouse_url).exit_code == 0
    written = metric(tokens_in=1_000_000, tokens_out=0)
    with MetricsStore(clickhouse_url) as store:
        store.emit_many([written])
        assert store.query() == [written]  # the actions from before the downgrade are gone
        assert store.aggregate().total_cost_usd == pytest.approx(0.25, abs=1e-12)  # the seed's price again


def test_db_downgrade_sql_prints_the_down_files_and_changes_nothing(engine_directory: Path) -> None:
    url = _new_database_url(engine_directory)
    assert run_cli("db", "upgrade", "--url", url).exit_code == 0
    printed = run_cli("db", "downgrade", "base", "--sql", "--url", url)
    assert printed.exit_code == 0, printed.output
    assert "-- down from version 1: initial\nDROP TABLE IF EXISTS credit_prices;" in printed.stdout
    assert "DROP TABLE IF EXISTS action_metrics_schema_version;" in printed.stdout
    assert run_cli("db", "current", "--url", url).stdout == f"{head_version()} (head)\n"
    to_one = run_cli("db", "downgrade", "1", "--sql", "--url", url).stdout
    assert "DELETE FROM action_metrics_schema_version WHERE version > 1;" in to_one
    assert "DROP TABLE IF EXISTS action_metrics;" not in to_one
    # What a DBA runs from it takes the database to version 1.
    client = ClickHouseURL.parse(url).connect(with_database=False)
    try:
        for statement in _statements(to_one):
            client.command(statement)
    finally:
        client.close()
    assert run_cli("db", "current", "--url", url).stdout == f"1 (behind head {head_version()})\n"
    assert sorted(_tables(url)) == [
        "action_metrics",
        "action_metrics_schema_version",
        "credit_prices",
        "model_prices",
    ]


def test_the_cluster_ddl_parses_and_its_local_tables_match_the_single_node_schema(
    engine_directory: Path,
) -> None:
    """No cluster and no ZooKeeper here: every printed statement must parse (EXPLAIN AST), and with
    ON CLUSTER and the replication arguments taken out, the local tables must build the same
    columns as a single node's `db upgrade`."""
    url = _new_database_url(engine_directory)
    printed = run_cli("db", "upgrade", "--sql", "--cluster", "prod", "--url", url)
    assert printed.exit_code == 0, printed.output
    sql = printed.stdout
    database = ClickHouseURL.parse(url).database
    assert (
        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/action_metrics_local', "
        "'{replica}')" in sql
    )
    assert (
        "CREATE TABLE IF NOT EXISTS action_metrics ON CLUSTER `prod` AS action_metrics_local\n"
        f"ENGINE = Distributed(`prod`, `{database}`, action_metrics_local, cityHash64(id));" in sql
    )
    assert (
        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/{database}/model_prices', "
        "'{shard}-{replica}', set_at)" in sql
    )
    assert "ALTER TABLE action_metrics_local ON CLUSTER `prod` ADD INDEX IF NOT EXISTS id_index" in sql
    assert "ALTER TABLE action_metrics ON CLUSTER `prod` ADD INDEX" not in sql  # not on a Distributed table
    assert (
        "CREATE MATERIALIZED VIEW IF NOT EXISTS action_metrics_rollup_hourly_view ON CLUSTER `prod` "
        "TO action_metrics_rollup_hourly_local AS" in sql
    )
    assert "FROM action_metrics_local\nGROUP BY start, model, credits;" in sql
    assert (
        "CREATE TABLE IF NOT EXISTS action_metrics_ids ON CLUSTER `prod` AS action_metrics_ids_local\n"
        f"ENGINE = Distributed(`prod`, `{database}`, action_metrics_ids_local, cityHash64(id));" in sql
    )
    assert (
        "CREATE MATERIALIZED VIEW IF NOT EXISTS action_metrics_ids_view ON CLUSTER `prod` "
        "TO action_metrics_ids_local AS" in sql
    )
    statements = _statements(sql)
    creates = [s for s in statements if s.startswith(("CREATE", "ALTER"))]
    assert creates
    assert all(" ON CLUSTER `prod`" in s for s in creates)
    client = ClickHouseURL.parse(url).connect(with_database=False)
    try:
        for statement in statements:
            if not statement.startswith("USE "):
                client.command(f"EXPLAIN AST {statement}")  # raises on a syntax error
        for statement in statements:
            if "ENGINE = Distributed" in statement or statement.startswith(
                (
                    "INSERT INTO action_metrics_rollup",
                    "INSERT INTO action_metrics_ids",
                    "INSERT INTO action_metrics_timeline",
                )
            ):
                continue  # needs the cluster in remote_servers (the fill reads the Distributed tables)
            local = statement.replace(" ON CLUSTER `prod`", "")
            local = re.sub(
                r"ENGINE = Replicated(\w*MergeTree)\('[^']*', '[^']*'(?:, )?", r"ENGINE = \1(", local
            )
            client.command(local.replace("MergeTree()", "MergeTree"))
        single = _new_database_url(engine_directory)
        run_cli("db", "upgrade", "--url", single)
        columns = (
            "SELECT table, name, type, default_expression FROM system.columns "
            "WHERE database = {database:String} ORDER BY table, position"
        )

        def described(database: str) -> list[tuple[Any, ...]]:
            rows = client.query(columns, parameters={"database": database}).result_rows
            named = [(table.removesuffix("_local"), *rest) for table, *rest in rows]
            return sorted(named, key=lambda row: row[0])  # stable: each table's columns stay in order

        assert described(database) == described(ClickHouseURL.parse(single).database)
    finally:
        client.close()
    assert run_cli("db", "upgrade", "--cluster", "prod", "--url", url).exit_code == 2  # --sql only
    bad = run_cli("db", "upgrade", "--sql", "--cluster", "prod; DROP", "--url", url)
    assert bad.exit_code == 1
    assert "cluster name" in bad.stderr


def test_upgrade_from_version_3_fills_the_rollups_from_the_raw_rows_once(clickhouse_url: str) -> None:
    """The raw rows of a version-3 database (re-sent copies not merged yet: FINAL's job) go into the
    rollups once, even when the upgrade is run again after being cut off before it recorded the
    version; after it, a re-sent batch is not counted again (first id wins)."""
    metrics = [
        metric(timestamp=START + timedelta(minutes=37 * i), latency_ms=0.5 + i % 50, tokens_in=i)
        for i in range(400)
    ]
    with MetricsStore(clickhouse_url) as store:
        store.emit_many(metrics)
    assert run_cli("db", "downgrade", "3", "--url", clickhouse_url).exit_code == 0
    client = ClickHouseURL.parse(clickhouse_url).connect()
    try:
        client.command("INSERT INTO action_metrics SELECT * FROM action_metrics")  # copies of every action
        assert client.query("SELECT count() FROM action_metrics").result_rows[0][0] == 800
        version = next(v for v in schema_versions() if v.number == 4)
        for statement in version.statements():  # an upgrade cut off before it recorded version 4
            client.command(statement)
        assert run_cli("db", "upgrade", "--url", clickhouse_url).exit_code == 0  # runs them all again
        filled = client.query("SELECT sum(count) FROM action_metrics_rollup_hourly_detail").result_rows[0][0]
        assert filled == len(metrics)
    finally:
        client.close()
    expected = expected_aggregate(metrics, _seed_book())
    with MetricsStore(clickhouse_url) as store:
        got = store.aggregate()
        assert not got.percentiles_exact  # the rollups answered
        assert_matches(got.to_dict(), expected)
        store.emit_many(metrics[:100])
        store.emit_many(metrics[50:150])
        assert_matches(store.aggregate().to_dict(), expected)
        assert_matches(store.aggregate(town_id=metrics[0].town_id).to_dict(), expected)


def test_upgrade_from_version_4_finds_the_ids_stored_before_it(clickhouse_url: str) -> None:
    """Version 5's ids table is filled from the raw rows of a version-4 database (also when the
    upgrade is run again after being cut off), so an action stored before the upgrade and re-sent
    after it is not counted again, in the raw rows or the rollups."""
    metrics = [
        metric(timestamp=START + timedelta(minutes=11 * i), latency_ms=1.5 + i % 40, tokens_in=i)
        for i in range(300)
    ]
    with MetricsStore(clickhouse_url) as store:
        store.emit_many(metrics[:100])
    assert run_cli("db", "downgrade", "4", "--url", clickhouse_url).exit_code == 0
    client = ClickHouseURL.parse(clickhouse_url).connect()
    try:
        assert "action_metrics_ids" not in _tables(clickhouse_url)
        columns = [column.name for column in action_metrics.columns]
        rows = [
            [getattr(m, "metadata_json" if c == "metadata" else c) for c in columns] for m in metrics[100:200]
        ]
        client.insert("action_metrics", rows, column_names=columns)  # a version-4 writer's rows
        version = next(v for v in schema_versions() if v.number == 5)
        for statement in version.statements()[:3]:  # an upgrade cut off after the view, before the fill
            client.command(statement)
        assert run_cli("db", "upgrade", "--url", clickhouse_url).exit_code == 0
        assert client.query("SELECT uniqExact(id) FROM action_metrics_ids").result_rows[0][0] == 200
    finally:
        client.close()
    with MetricsStore(clickhouse_url) as store:
        store.emit_many(metrics)
        expected = expected_aggregate(metrics, _seed_book())
        assert_matches(store.aggregate().to_dict(), expected)
        assert_matches(store.aggregate(exact=True).to_dict(), expected)


def test_the_rollups_bin_latencies_as_rollup_bin_of_does(clickhouse_url: str) -> None:
    """The SQL of sql/clickhouse/0004 puts each latency in `rollup.bin_of`'s bin (a failed action's
    latency counts for nothing: percentiles are over successes)."""
    latencies = [0.0, 0.0004, 0.3, 1.0, 1.5, 7.25, 99.9, 1234.5, 86_400_000.0]
    metrics = [metric(timestamp=START + timedelta(hours=i), latency_ms=x) for i, x in enumerate(latencies)]
    failed = metric(timestamp=START, latency_ms=5.0, error="Timeout", credits_charged=0)
    with MetricsStore(clickhouse_url) as store:
        store.emit_many([*metrics, failed])
    rows = _rows(
        clickhouse_url,
        "SELECT sumMap(latency_bins) FROM action_metrics_rollup_hourly GROUP BY start ORDER BY start",
    )
    binned = [dict(zip(bins, counts, strict=True)) for ((bins, counts),) in rows]
    assert [{b: c for b, c in one.items() if c} for one in binned] == [{bin_of(x): 1} for x in latencies]


def test_upgrade_from_version_5_builds_the_timeline_and_the_days_from_what_is_stored(
    clickhouse_url: str,
) -> None:
    """Version 6's daily rollups are filled from the hourly ones (which keep a pruned period), its
    timeline from the raw rows (FINAL), also when the upgrade is run again after being cut off; the
    figures read through them then agree with the reference, and `db downgrade 5` takes them away."""
    users = ["user-a", "user-b", "user-c"]
    metrics = [
        metric(
            timestamp=START + timedelta(minutes=23 * i),
            latency_ms=0.5 + i % 70,
            tokens_in=i,
            user_id=users[i % 3],
            citizen_id=None if i % 4 == 0 else f"citizen-{i % 5}",
            town_id=f"town-{i % 2}",
            error="Timeout" if i % 31 == 0 else None,
        )
        for i in range(600)  # over 9.5 days
    ]
    cutoff = START.replace(hour=0) + timedelta(days=2)
    with MetricsStore(clickhouse_url) as store:
        store.emit_many(metrics[:300])
        store.prune(cutoff)
    assert run_cli("db", "downgrade", "5", "--url", clickhouse_url).exit_code == 0
    assert not {"action_metrics_timeline", "action_metrics_rollup_daily"} & set(_tables(clickhouse_url))
    client = ClickHouseURL.parse(clickhouse_url).connect()
    try:
        assert "PROJECTION" not in client.command("SHOW CREATE TABLE action_metrics_rollup_hourly_detail")
        columns = [column.name for column in action_metrics.columns]
        rows = [
            [getattr(m, "metadata_json" if c == "metadata" else c) for c in columns] for m in metrics[300:400]
        ]
        client.insert("action_metrics", rows, column_names=columns)  # a version-5 writer's rows
        version = next(v for v in schema_versions() if v.number == 6)
        for statement in version.statements()[:4]:  # cut off after the timeline's fill
            client.command(statement)
        assert run_cli("db", "upgrade", "--url", clickhouse_url).exit_code == 0
        for hourly, daily in (("hourly", "daily"), ("hourly_detail", "daily_detail")):
            sums = "SELECT sum(count), sum(tokens_in), sum(succeeded), sumMap(latency_bins) FROM {}"
            hourly_sums = client.query(sums.format(f"action_metrics_rollup_{hourly}")).result_rows
            assert client.query(sums.format(f"action_metrics_rollup_{daily}")).result_rows == hourly_sums
            assert hourly_sums[0][0] == 400  # the pruned period's too
        kept = [m for m in metrics[:400] if m.timestamp >= cutoff]
        assert client.query("SELECT count() FROM action_metrics_timeline").result_rows[0][0] == len(kept)
        # A user's rows are read through the projection ordered by user.
        plan = client.command(
            "EXPLAIN projections = 1 "
            "SELECT sum(tokens_in) FROM action_metrics_timeline WHERE user_id = 'user-a'"
        )
        assert "by_user" in str(plan)
    finally:
        client.close()
    with MetricsStore(clickhouse_url) as store:
        store.emit_many([m for m in metrics if m.timestamp >= cutoff])  # those stored re-sent: once
        book = _seed_book()
        assert_matches(store.aggregate().to_dict(), expected_aggregate(metrics, book))
        since, until = cutoff + timedelta(hours=5, minutes=7), START + timedelta(days=8, minutes=3)
        window = [m for m in metrics if since <= m.timestamp < until]
        got = store.aggregate(since=since, until=until)
        assert not got.percentiles_exact  # days, hours and the partial hours at its edges
        assert_matches(got.to_dict(), expected_aggregate(window, book))
        for filters in ({"user_id": "user-b"}, {"citizen_id": "citizen-3"}, {"town_id": "town-1"}):
            chosen = [m for m in window if all(getattr(m, k) == v for k, v in filters.items())]
            got = store.aggregate(since=since, until=until, **filters)
            assert_matches(got.to_dict(), expected_aggregate(chosen, book), where=f"{filters}: ")
    assert run_cli("db", "downgrade", "5", "--url", clickhouse_url).exit_code == 0
    assert not {"action_metrics_timeline", "action_metrics_rollup_daily"} & set(_tables(clickhouse_url))
    assert run_cli("db", "upgrade", "--url", clickhouse_url).exit_code == 0
    with MetricsStore(clickhouse_url) as store:
        assert_matches(
            store.aggregate(since=since).to_dict(),
            expected_aggregate([m for m in metrics if m.timestamp >= since], _seed_book()),
        )


def test_writers_in_one_process_sending_the_same_new_ids_at_once_count_them_once(clickhouse_url: str) -> None:
    """Two stores and the writers of each on one database, every one sending the same new actions at
    the same moment: the lookup of stored ids and the insert are one step per database in a
    process, so the rollups (which see every insert) count each action once, as the raw rows do."""
    metrics = [metric(timestamp=START + timedelta(minutes=i), user_id=f"user-{i % 7}") for i in range(300)]

    async def run() -> tuple[list[int], int, int]:
        async with AsyncMetricsStore(clickhouse_url) as one, AsyncMetricsStore(clickhouse_url) as other:
            counts = await asyncio.gather(*(store.emit_batch(metrics) for store in [one, other] * 4))
            return counts, (await one.aggregate()).count, (await one.aggregate(exact=True)).count

    counts, from_rollups, exact = run_async(run())
    assert sorted(counts) == [0] * 7 + [len(metrics)]  # one writer stored them, the others found them
    assert (from_rollups, exact) == (len(metrics), len(metrics))


def test_writers_in_two_processes_sending_the_same_new_batch_at_once_count_it_once(
    clickhouse_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes cannot open one chdb directory, so their race is staged: every lookup of the
    stored ids answers as it would have before the other process's insert landed (nothing stored),
    and two stores insert the same new batch (the second in another order). The insert's
    deduplication token (schema version 9) drops the second insert in the raw table and in every
    table its views feed: each figure counts each action once, from the hours, days, months, the
    detail rollups and the user rollups alike. A price change inside the window has the corrections
    read the days and hours again, so those levels are read too. The same ids an hour later or in
    another town are second actions: the token names the whole key, so those inserts count."""
    metrics = [
        metric(
            timestamp=START + timedelta(minutes=37 * i),
            user_id=f"user-{i % 7}",
            town_id=f"town-{i % 3}",
            latency_ms=5.0 + i,
            tokens_in=10 + i,
        )
        for i in range(400)
    ]
    original = ClickHouseRepository._stored_ids

    def looked_up_before_the_other_insert(
        self: ClickHouseRepository, client: Any, columns: list[list[Any]], numbers: list[int]
    ) -> tuple[set[int], datetime | None, int | None]:
        _, cutoff, version = original(self, client, columns, numbers)
        return set(), cutoff, version

    monkeypatch.setattr(ClickHouseRepository, "_stored_ids", looked_up_before_the_other_insert)
    with MetricsStore(clickhouse_url) as one, MetricsStore(clickhouse_url) as other:
        one.set_model_price("haiku", 2, 10, START + timedelta(days=4, minutes=13))
        one.emit_many(metrics)
        other.emit_many(metrics[::-1])
        book = _seed_book()
        book.models["haiku"].append((START + timedelta(days=4, minutes=13), Decimal(2), Decimal(10)))
        assert_matches(one.aggregate().to_dict(), expected_aggregate(metrics, book))
        assert_matches(one.aggregate(exact=True).to_dict(), expected_aggregate(metrics, book))
        for filters in ({"town_id": "town-1"}, {"user_id": "user-3"}, {"since": START + timedelta(hours=5)}):
            expected = expected_aggregate(select_like_the_store(metrics, filters), book)
            assert_matches(other.aggregate(**filters).to_dict(), expected)
        for by in ("user_id", "town_id"):
            counts: Counter[str] = Counter()
            for row in one.breakdown(by, bucket="day"):
                counts[row.keys[by]] += row.figures.count
            assert counts == Counter(getattr(m, by) for m in metrics)
        # The same ids an hour later, or in another town: second actions (the raw table's key), whose
        # inserts the token must not take for the first one's.
        later = [replace(m, timestamp=m.timestamp + timedelta(hours=1)) for m in metrics]
        elsewhere = [replace(m, town_id="town-elsewhere") for m in metrics]
        one.emit_many(later)
        other.emit_many(elsewhere)
        every = [*metrics, *later, *elsewhere]
        assert_matches(one.aggregate().to_dict(), expected_aggregate(every, book))
        assert one.aggregate(exact=True).count == len(every)


def test_a_store_open_while_another_release_moves_the_schema_stops_writing(clickhouse_url: str) -> None:
    """Checked by every write, not only at open (as on SQLite and PostgreSQL): a process left running
    across another release's upgrade or downgrade is refused, naming the fix, and nothing of its
    batch or price is stored; at head again, it writes."""
    head = head_version()

    def command(statement: str) -> None:
        client = ClickHouseURL.parse(clickhouse_url).connect()
        try:
            client.command(statement)
        finally:
            client.close()

    with MetricsStore(clickhouse_url) as store:

        def credit_prices() -> list[Any]:
            async def read() -> list[Any]:
                return await (await store._store._open()).credit_prices()

            return store._call(read())

        store.emit_many([metric()])
        prices = credit_prices()
        for moved, refusal, says in [
            (
                f"INSERT INTO action_metrics_schema_version (version, name) VALUES ({head + 1}, 'future')",
                SchemaTooNew,
                "upgrade action-metrics",
            ),
            (
                f"DELETE FROM action_metrics_schema_version WHERE version >= {head}",
                SchemaOutOfDate,
                "action-metrics db upgrade --url",
            ),
        ]:
            command(moved)
            with pytest.raises(refusal, match=says):
                store.emit_many([metric(), metric()])
            with pytest.raises(refusal, match=says):
                store.set_credit_price("0.007", effective_from=datetime(2026, 1, 1, tzinfo=UTC))
            with pytest.raises(refusal, match=says):
                store.prune(datetime.now(UTC) - timedelta(days=10))
            assert store.aggregate(exact=True).count == 1  # nothing of the refused batch
            assert credit_prices() == prices
        command(f"INSERT INTO action_metrics_schema_version (version, name) VALUES ({head}, 'back')")
        store.emit_many([metric()])
        assert store.aggregate(exact=True).count == 2


def test_a_window_is_read_by_whole_months_then_days_then_hours_then_raw_rows() -> None:
    """`plan`: between two cuts (a price change here), the whole UTC months from the monthly rollups,
    the whole days around them from the daily ones, the whole hours around those, and the partial
    hours at the edges from raw rows; every instant of the window read once."""
    since, until = datetime(2026, 5, 20, 13, 37, 11, tzinfo=UTC), datetime(2026, 9, 10, 4, 12, 9, tzinfo=UTC)
    change = datetime(2026, 7, 14, 10, 30, tzinfo=UTC)

    def at(month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
        return datetime(2026, month, day, hour, minute, tzinfo=UTC)

    cut = plan(since, until, [change, at(1, 1), at(12, 1)])  # cuts outside the window change nothing
    assert cut.months == ((at(6, 1), at(7, 1)), (at(8, 1), at(9, 1)))
    assert cut.days == (
        (at(5, 21), at(6, 1)),
        (at(7, 1), at(7, 14)),
        (at(7, 15), at(8, 1)),
        (at(9, 1), at(9, 10)),
    )
    assert cut.hours == (
        (at(5, 20, 14), at(5, 21)),
        (at(7, 14), at(7, 14, 10)),
        (at(7, 14, 11), at(7, 15)),
        (at(9, 10), at(9, 10, 4)),
    )
    assert cut.raw == ((since, at(5, 20, 14)), (at(7, 14, 10), at(7, 14, 11)), (at(9, 10, 4), until))
    pieces = sorted((*cut.raw, *cut.hours, *cut.days, *cut.months), key=lambda r: r[0] or EARLIEST)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    assert (pieces[0][0], pieces[-1][1]) == (since, until)
    # Unbounded: everything before the cut's month is months; within a month only days.
    everything = plan(None, None, [change])
    assert everything.months == ((None, at(7, 1)), (at(8, 1), None))
    assert everything.days == ((at(7, 1), at(7, 14)), (at(7, 15), at(8, 1)))
    assert plan(at(7, 2, 5, 1), at(7, 3, 6), []) == Plan(
        raw=((at(7, 2, 5, 1), at(7, 2, 6)),),
        hours=((at(7, 2, 6), at(7, 3, 6)),),  # touching: one
    )


def test_a_corrected_plan_reads_whole_days_and_months_and_reprices_after_each_change() -> None:
    """`corrected_plan`: the window's whole months, days and hours whatever the prices did; an hour
    holding a change from raw rows; a day or month holding changes from its rollup, with one
    `Correction` from its first change to its end, cut at every change (each piece one period)."""
    since, until = datetime(2026, 5, 20, 13, 37, 11, tzinfo=UTC), datetime(2026, 9, 10, 4, 12, 9, tzinfo=UTC)

    def at(month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
        return datetime(2026, month, day, hour, minute, tzinfo=UTC)

    changes = [at(6, 10, 8, 20), at(6, 20, 17, 45), at(8, 1), at(9, 10, 1, 30), at(5, 20, 13, 50), at(1, 1)]
    cut, corrections = corrected_plan(since, until, changes)
    assert cut.months == ((at(6, 1), at(9, 1)),)  # August's first instant cuts nothing
    assert cut.days == ((at(5, 21), at(6, 1)), (at(9, 1), at(9, 10)))
    # The hour holding 01:30 on the last day is read raw, the rest of the edge hours from the rollup.
    assert cut.hours == ((at(5, 20, 14), at(5, 21)), (at(9, 10), at(9, 10, 1)), (at(9, 10, 2), at(9, 10, 4)))
    assert cut.raw == ((since, at(5, 20, 14)), (at(9, 10, 1), at(9, 10, 2)), (at(9, 10, 4), until))
    assert [c.base for c in corrections] == [at(6, 1)]  # June, once, from its first change
    (june,) = corrections
    assert june.plan == plan(at(6, 10, 8, 20), at(7, 1), changes)
    assert june.plan.raw[0] == (at(6, 10, 8, 20), at(6, 10, 9))
    assert (at(6, 20, 17), at(6, 20, 18)) in june.plan.raw  # the second change's hour: raw rows
    # With no change inside it, a window is planned as `plan` plans it.
    assert corrected_plan(at(7, 2, 5, 1), at(7, 30, 6), changes) == (
        plan(at(7, 2, 5, 1), at(7, 30, 6), []),
        (),
    )


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def test_many_ranges_select_exactly_the_instants_within_them(clickhouse_url: str) -> None:
    """`_ranges_sql` with more ranges than it chains (the short ones' whole hours one set, the rest
    chained; or, with only short whole hours between them, their hull less those hours) selects what
    Python selects: instants a microsecond either side of every edge and hour, before 1970 and after
    2106 (where the set's `toStartOfHour` would clamp), unbounded ends."""
    url = ClickHouseURL.parse(clickhouse_url)
    admin = url.connect(with_database=False)
    admin.command("CREATE DATABASE {d:Identifier}", parameters={"d": url.database})
    admin.close()
    client = url.connect()
    client.command("CREATE TABLE instants (t DateTime64(6, 'UTC')) ENGINE = MergeTree ORDER BY t")
    generator = random.Random(11)
    hour = timedelta(hours=1)
    base = datetime(2026, 3, 1, tzinfo=UTC)
    far = [datetime(1900, 1, 1, 0, 30, tzinfo=UTC), datetime(1969, 12, 31, 23, tzinfo=UTC),
           datetime(2106, 2, 6, 22, tzinfo=UTC), datetime(2299, 12, 31, 22, tzinfo=UTC)]  # fmt: skip
    cases: list[list[tuple[datetime | None, datetime | None]]] = []
    for size in (5, 6, 9, 30, 95):
        starts = sorted(generator.sample(range(0, 24 * 60, 10), size))  # hours after `base`, 10 apart
        ranges: list[tuple[datetime | None, datetime | None]] = []
        for start in starts:
            first = base + timedelta(hours=start, minutes=generator.choice([0, 0, 15, 59]))
            length = timedelta(hours=generator.randrange(9), minutes=generator.choice([0, 0, 30, 1]))
            ranges.append((first, first + (length or hour)))
        ranges[-1] = (ranges[-1][0], base + timedelta(days=70))  # and a long one: chained
        cases.append(ranges)
    cases.append(
        [
            (None, far[0] + hour),
            *((moment, moment + 3 * hour) for moment in far[1:]),
            (far[3] + 2 * hour, None),
        ]
    )
    cases.append([(base + hour * 3 * n, base + hour * (3 * n + 2)) for n in range(40)])  # whole hours only
    cases.append(generator.sample(cases[3], len(cases[3])))  # in no order, as a window's and its corrections'
    # A rollup's hours around a local day's edge hours (Kathmandu's), in no order: the hull less them.
    days = [(base + timedelta(hours=24 * n + 19), base + timedelta(hours=24 * n + 42)) for n in range(30)]
    cases.append(generator.sample(days, len(days)))
    # Unbounded, next to 1970 and 2106 (gaps there stay out of the set: toStartOfHour clamps), and
    # gaps of up to six hours and longer.
    early = datetime(1970, 1, 1, tzinfo=UTC)
    late = datetime(2106, 2, 6, 18, tzinfo=UTC)
    cases.append(
        [(None, early + hour), *((early + hour * (3 * n + 2), early + hour * (3 * n + 3)) for n in range(6))]
    )
    cases.append(
        [(None, early), *((early + hour * (2 * n + 1), early + hour * (2 * n + 2)) for n in range(5))]
    )
    cases.append(
        [*((late - hour * (2 * n + 1), late - hour * 2 * n) for n in range(5)), (late + 2 * hour, None)]
    )
    cases.append([(base + hour * 7 * n, base + hour * (7 * n + 1)) for n in range(6)])  # 6-hour gaps
    cases.append([(base + hour * 8 * n, base + hour * (8 * n + 1)) for n in range(6)])  # 7: chained
    # Which of these are their hull less the hours between them (the others are chained).
    complements = dict(
        zip(range(len(cases) - 6, len(cases)), (True, True, False, True, True, False), strict=True)
    )
    instants = {moment for moment in far}
    for ranges in cases:
        for start, end in ranges:
            for edge in (start, end):
                if edge is not None:
                    for moment in (edge, edge + hour / 2):
                        instants.update(moment + timedelta(microseconds=d) for d in (-1, 0, 1))
    instants |= {floor_to(moment, "hour") + delta for moment in list(instants) for delta in (-hour, hour)}
    column = [[moment] for moment in sorted(instants)]
    client.insert("instants", column, column_names=["t"])
    for ranges in cases:
        expected = [
            moment for moment in sorted(instants)
            if any((s is None or s <= moment) and (e is None or moment < e) for s, e in ranges)
        ]  # fmt: skip
        condition = _ranges_sql("t", ranges)
        number = cases.index(ranges)
        assert "toStartOfHour" in condition or number == len(cases) - 1
        assert ("NOT IN" in condition) is complements.get(number, "NOT IN" in condition), ranges
        query = f"SELECT toUnixTimestamp64Micro(t) FROM instants WHERE {condition} ORDER BY t"
        selected = [row[0] for row in client.query(query).result_rows]
        assert selected == [(moment - EPOCH) // timedelta(microseconds=1) for moment in expected], ranges
    assert "toStartOfHour" not in _ranges_sql("t", cases[0][:4])  # a few ranges stay chained
    client.close()


def test_months_answer_long_windows_as_the_raw_rows_do(clickhouse_url: str) -> None:
    """Actions over four months; a price change inside July, two inside June, one on August's first
    instant, a model priced only from mid-August (unpriced before): all time, an unaligned window
    across months and the filters each rollup keeps agree with the reference, read from whole months
    (those holding a change corrected after it), their days and hours and raw edges; the monthly
    rollups hold what the daily ones hold, summed per month."""
    first = datetime(2026, 5, 20, 7, 13, tzinfo=UTC)
    rng = random.Random(7)
    metrics = [
        metric(
            timestamp=first + timedelta(minutes=97 * i + rng.randint(0, 90)),
            latency_ms=rng.lognormvariate(5, 1),
            tokens_in=rng.randint(40, 5000),
            tokens_out=rng.randint(0, 900),
            cache_read_tokens=rng.choice([0, 40]),
            model=rng.choice(["haiku", "sonnet", "opus", "newcomer"]),
            town_id=f"town-{i % 3}",
            action_type=rng.choice(["lod3", "lod4", "greet"]),
            error="Timeout" if i % 29 == 0 else None,
        )
        for i in range(1700)  # to mid-September
    ]
    sonnet_change = datetime(2026, 7, 14, 10, 30, tzinfo=UTC)
    credit_change = datetime(2026, 8, 1, tzinfo=UTC)
    book = _seed_book()
    book.models["sonnet"].append((sonnet_change, Decimal("2.5"), Decimal("12.5"), Decimal("0.25"), None))
    book.credits.append((credit_change, Decimal("0.0045")))
    opus_changes = [datetime(2026, 6, 10, 8, 20, tzinfo=UTC), datetime(2026, 6, 20, 17, 45, 30, tzinfo=UTC)]
    newcomer_priced = datetime(2026, 8, 12, 3, 30, tzinfo=UTC)
    book.models["opus"] += [
        (opus_changes[0], Decimal(14), Decimal(70)),
        (opus_changes[1], Decimal(16), Decimal(80)),
    ]
    book.models["newcomer"] = [(newcomer_priced, Decimal("0.5"), Decimal(2))]
    with MetricsStore(clickhouse_url) as store:
        store.set_model_price("sonnet", "2.5", "12.5", sonnet_change, cache_read_per_1m="0.25")
        store.set_credit_price("0.0045", effective_from=credit_change)
        store.set_model_price("opus", 14, 70, opus_changes[0])
        store.set_model_price("opus", 16, 80, opus_changes[1])
        store.set_model_price("newcomer", "0.5", 2, newcomer_priced)
        store.emit_many(metrics)
        since, until = (
            datetime(2026, 5, 28, 13, 37, 11, tzinfo=UTC),
            datetime(2026, 9, 3, 4, 12, 9, tzinfo=UTC),
        )
        windows = ({}, {"since": since, "until": until}, {"since": datetime(2026, 6, 10, 8, 20, tzinfo=UTC)})
        for filters in ({}, {"town_id": "town-1"}, {"action_type": "lod4"}, {"model": "opus"}):
            for window in windows:
                got = store.aggregate(**filters, **window)
                assert not got.percentiles_exact
                chosen = select_like_the_store(metrics, {**filters, **window})
                assert_matches(got.to_dict(), expected_aggregate(chosen, book), where=f"{filters} {window}: ")
    for monthly, daily in (("monthly", "daily"), ("monthly_detail", "daily_detail")):
        sums = (
            "SELECT toYYYYMM(start) AS month, sum(count), sum(tokens_in), sum(succeeded), "
            "sumMap(latency_bins) FROM {} GROUP BY month ORDER BY month"
        )
        per_month = _rows(clickhouse_url, sums.format(f"action_metrics_rollup_{monthly}"))
        assert per_month == _rows(clickhouse_url, sums.format(f"action_metrics_rollup_{daily}"))
        assert [row[0] for row in per_month] == [202605, 202606, 202607, 202608, 202609]
    # Whole months are read from there: a row added to June's shows in every window holding June.
    client = ClickHouseURL.parse(clickhouse_url).connect()
    try:
        client.command(
            "INSERT INTO action_metrics_rollup_monthly (start, model, credits, count, succeeded, "
            "latency_bins) VALUES ('2026-06-01 00:00:00', 'haiku', 0, 1000, 0, ([], []))"
        )
    finally:
        client.close()
    in_window = len(select_like_the_store(metrics, {"since": since, "until": until}))
    with MetricsStore(clickhouse_url) as store:
        assert store.aggregate().count == len(metrics) + 1000
        assert store.aggregate(since=since, until=until).count == in_window + 1000
        assert store.aggregate(since=since, until=until, exact=True).count == in_window


def test_upgrade_from_version_6_fills_the_months_from_the_days(clickhouse_url: str) -> None:
    """Version 7's monthly rollups are filled from the daily ones (which keep a pruned period), also
    when the upgrade is run again; `db downgrade 6` takes them away and the answers stay."""
    metrics = [
        metric(timestamp=datetime(2026, 6, 25, tzinfo=UTC) + timedelta(hours=7 * i), latency_ms=1 + i % 50)
        for i in range(400)  # to the end of August
    ]
    with MetricsStore(clickhouse_url) as store:
        store.emit_many(metrics)
        store.prune(datetime(2026, 7, 10, tzinfo=UTC))
    assert run_cli("db", "downgrade", "6", "--url", clickhouse_url).exit_code == 0
    assert not {"action_metrics_rollup_monthly", "action_metrics_rollup_monthly_detail"} & set(
        _tables(clickhouse_url)
    )
    with pytest.raises(SchemaOutOfDate), MetricsStore(clickhouse_url) as store:
        store.aggregate()
    _upgrade_cut_off(clickhouse_url, 7, 3)  # after the first month's fill
    assert run_cli("db", "upgrade", "--url", clickhouse_url).exit_code == 0
    for monthly in ("monthly", "monthly_detail"):
        counted = _rows(clickhouse_url, f"SELECT sum(count) FROM action_metrics_rollup_{monthly}")
        assert counted == [(len(metrics),)]  # the pruned period's too, once
    with MetricsStore(clickhouse_url) as store:
        got = store.aggregate(since=datetime(2026, 7, 10, tzinfo=UTC))
        kept = [m for m in metrics if m.timestamp >= datetime(2026, 7, 10, tzinfo=UTC)]
        assert_matches(got.to_dict(), expected_aggregate(kept, _seed_book()))
        assert store.aggregate().count == len(metrics)  # whole months and days of the pruned period


def test_upgrade_from_version_7_fills_the_user_rollups_and_refuses_what_an_earlier_prune_took(
    clickhouse_url: str,
) -> None:
    """Version 8's rollups per user are filled from the timeline (also when the upgrade is run again
    after an interruption): what a prune removed before it is in none, so a question about users
    reaching before that cut-off is refused, and answered from it on; a later prune keeps them. A
    row added by hand to a month's user rollup shows in every question about users holding that
    month (the months are what is read); `db downgrade 7` takes them away and the answers stay."""
    first = datetime(2026, 6, 25, tzinfo=UTC)
    metrics = [
        metric(
            timestamp=first + timedelta(hours=7, minutes=13) * i,
            latency_ms=1 + i % 50,
            tokens_in=100 + i,
            user_id=f"user-{i % 3}",
            model=("sonnet", "haiku")[i % 2],
        )
        for i in range(400)  # to the end of August
    ]
    cutoff = datetime(2026, 7, 10, tzinfo=UTC)
    kept = [m for m in metrics if m.timestamp >= cutoff]
    with MetricsStore(clickhouse_url) as store:
        store.emit_many(metrics)
        store.prune(cutoff)
    assert run_cli("db", "downgrade", "7", "--url", clickhouse_url).exit_code == 0
    assert not {*USER_ROLLUPS, "user_rollups_from"} & set(_tables(clickhouse_url))
    _upgrade_cut_off(clickhouse_url, 8, 7)  # after the daily user rollup's fill
    assert run_cli("db", "upgrade", "--url", clickhouse_url).exit_code == 0
    for table in USER_ROLLUPS:
        assert _rows(clickhouse_url, f"SELECT sum(count) FROM {table}") == [(len(kept),)]  # once each
    book = _seed_book()
    with MetricsStore(clickhouse_url) as store:
        for question in (
            lambda: store.breakdown("user_id"),
            lambda: store.aggregate(user_id="user-1"),
            lambda: store.breakdown("user_id", since=cutoff - timedelta(days=1)),
        ):
            with pytest.raises(RawRowsPruned, match=re.escape(f"before {cutoff.isoformat()}")):
                question()
        since = datetime(2026, 7, 20, 13, 37, tzinfo=UTC)
        for window in (
            {"since": cutoff},
            {"since": since},
            {"since": since, "until": datetime(2026, 8, 9, tzinfo=UTC)},
        ):
            rows = store.breakdown("user_id", **window)
            assert len(rows) == 3
            for row in rows:
                chosen = select_like_the_store(kept, {**window, "user_id": row.keys["user_id"]})
                expected = expected_aggregate(chosen, book)
                del expected["by_model"]
                assert_matches(row.figures.to_dict(), expected, where=f"{window} {row.keys}: ")
            assert_matches(
                store.aggregate(user_id="user-2", **window).to_dict(),
                expected_aggregate(select_like_the_store(kept, {**window, "user_id": "user-2"}), book),
            )
        store.prune(datetime(2026, 8, 1, tzinfo=UTC))  # the user rollups keep what this one takes
        august = [m for m in kept if m.timestamp >= datetime(2026, 8, 1, tzinfo=UTC)]
        kept_per_user = {
            row.keys["user_id"]: row.figures.count for row in store.breakdown("user_id", since=cutoff)
        }
        assert kept_per_user == Counter(m.user_id for m in kept)
        assert store.aggregate(user_id="user-0", since=cutoff).count == sum(
            m.user_id == "user-0" for m in kept
        )
    # A row added by hand to August's user rollup: in every question about users holding August.
    client = ClickHouseURL.parse(clickhouse_url).connect()
    try:
        client.command(
            "INSERT INTO action_metrics_rollup_monthly_user (start, user_id, model, credits, count, "
            "succeeded, latency_bins) VALUES ('2026-08-01 00:00:00', 'user-0', 'haiku', 0, 1000, 0, ([], []))"
        )
    finally:
        client.close()
    with MetricsStore(clickhouse_url) as store:
        of_user_0 = sum(m.user_id == "user-0" for m in kept)
        assert store.aggregate(user_id="user-0", since=cutoff).count == of_user_0 + 1000
        counts = {row.keys["user_id"]: row.figures.count for row in store.breakdown("user_id", since=cutoff)}
        assert counts == {**Counter(m.user_id for m in kept), "user-0": of_user_0 + 1000}
        in_july = store.aggregate(user_id="user-0", since=cutoff, until=datetime(2026, 8, 1, tzinfo=UTC))
        assert in_july.count == of_user_0 - sum(m.user_id == "user-0" for m in august)
    # Down and up again: filled from the timeline, which keeps August on.
    assert run_cli("db", "downgrade", "7", "--url", clickhouse_url).exit_code == 0
    assert not {*USER_ROLLUPS, "user_rollups_from"} & set(_tables(clickhouse_url))
    assert run_cli("db", "upgrade", "--url", clickhouse_url).exit_code == 0
    with MetricsStore(clickhouse_url) as store:
        rows = store.breakdown("user_id", since=datetime(2026, 8, 1, tzinfo=UTC))
        assert {row.keys["user_id"]: row.figures.count for row in rows} == Counter(m.user_id for m in august)
        with pytest.raises(
            RawRowsPruned, match=re.escape(f"before {datetime(2026, 8, 1, tzinfo=UTC).isoformat()}")
        ):
            store.breakdown("user_id", since=cutoff)


def test_a_month_holding_a_price_change_is_corrected_from_the_hours_prune_split(clickhouse_url: str) -> None:
    """After a prune, the part of a month after a price change inside it is read again from the
    hourly rollup, whose rows prune split at the change (the raw rows are gone): all time and a window
    from inside the pruned month still agree with the reference, money included."""
    first = datetime(2026, 6, 1, 0, 5, tzinfo=UTC)
    metrics = [
        metric(
            timestamp=first + timedelta(minutes=53 * i),
            latency_ms=1 + i % 90,
            tokens_in=100 + i,
            tokens_out=i % 300,
            model=("sonnet", "opus", "haiku")[i % 3],
        )
        for i in range(2500)  # to mid-August
    ]
    change = datetime(2026, 7, 14, 10, 30, tzinfo=UTC)  # inside an hour, a day and a month
    # Sonnet on both sides of the change within its hour, which prune splits there.
    metrics += [
        metric(timestamp=change + timedelta(minutes=m), model="sonnet", tokens_in=90_000, tokens_out=7_000)
        for m in (-25, -10, 1, 12, 29)
    ]
    book = _seed_book()
    book.models["sonnet"].append((change, Decimal("2.5"), Decimal("12.5")))
    with MetricsStore(clickhouse_url) as store:
        store.set_model_price("sonnet", "2.5", "12.5", change)
        store.emit_many(metrics)
        store.prune(datetime(2026, 8, 5, tzinfo=UTC))
        assert_matches(store.aggregate().to_dict(), expected_aggregate(metrics, book))
        since = datetime(2026, 7, 2, 6, tzinfo=UTC)
        chosen = [m for m in metrics if m.timestamp >= since]
        assert_matches(store.aggregate(since=since).to_dict(), expected_aggregate(chosen, book))
        with pytest.raises(RawRowsPruned):
            store.aggregate(since=datetime(2026, 7, 2, 6, 17, tzinfo=UTC))  # a pruned partial hour
