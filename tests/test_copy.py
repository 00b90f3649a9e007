"""`action-metrics db copy`: a store moved from SQLite or PostgreSQL (the `backend` fixture) into
ClickHouse (chdb, in process) answers as the source did, also when the copy was interrupted and run
again; and back from ClickHouse into SQLite or PostgreSQL.

The data is tests/test_aggregate.py's: 3,000 actions over ten days, sonnet cheaper (with cache
prices) from day 5, a model priced from day 3, the credit price dropping on day 7, a model never
priced. The money is checked against the independent reference (Python `decimal`) as well as
against the source.
"""

from __future__ import annotations

import re
import shlex
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import Databases, assert_one_line_error, metric, run_cli
from test_aggregate import CREDITS_CHEAPER, MINI_PRICED, SONNET_CHEAPER, START, _book, _metrics

from action_metrics import ActionMetric, AsyncMetricsStore, MetricsStore
from action_metrics.charges import InheritedCredits
from action_metrics.cli import run_async
from action_metrics.clickhouse import ClickHouseURL
from action_metrics.clickhouse_repository import ClickHouseRepository
from action_metrics.dialects import display_url, resolve_url
from action_metrics.errors import DestinationPruned, PriceInPrunedDestination, RawRowsPruned, SourcePruned
from action_metrics.query import CopyCheckpoint, CopyPosition
from action_metrics.store import repository_for
from action_metrics.transfer import CopyProgress, CopyResult, copy_store

from reference import assert_matches, expected_aggregate

pytest.importorskip("chdb", reason="the optional extra .[clickhouse] is not installed")

MONEY = ("total_cost_usd", "total_revenue_usd", "total_profit_usd")
COUNTS = ("count", "tokens_in", "tokens_out", "total_credits", "unpriced_count", "error_count")


@dataclass(frozen=True)
class Source:
    url: str
    metrics: list[ActionMetric]


def _fill(url: str, metrics: list[ActionMetric]) -> None:
    with MetricsStore(url) as store:
        store.set_model_price(
            "sonnet", "2.5", "12.5", SONNET_CHEAPER, cache_read_per_1m="0.25", cache_write_per_1m="3.125"
        )
        store.set_model_price("openai/gpt-4o-mini", 0.15, 0.6, MINI_PRICED, cache_read_per_1m=0.075)
        store.set_credit_price(Decimal("0.0045"), effective_from=CREDITS_CHEAPER)
        store.emit_many(metrics)


@pytest.fixture(scope="module")
def source(backend: Databases) -> Iterator[Source]:
    """A SQLite or PostgreSQL store holding test_aggregate's actions and prices (only read)."""
    url = backend.migrated()
    metrics = _metrics()
    _fill(url, metrics)
    yield Source(url, metrics)
    backend.drop(url)


@pytest.fixture
def destination(chdb_directory: Path) -> str:
    """A ClickHouse database of its own, created by the copy."""
    return f"chdb://{chdb_directory}?database=am_copy_{uuid.uuid4().hex[:12]}"


def _figures(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The `keys` of an aggregate as `assert_matches` expects them: money as Decimal."""
    return {key: Decimal(repr(row[key])) if key in MONEY else row[key] for key in keys}


def assert_same_answers(source_url: str, destination_url: str, metrics: list[ActionMetric]) -> None:
    """aggregate(exact=True), per model and in a window, and a breakdown by model and day: equal
    counts, money within 1e-9 USD; the whole against the reference as well."""
    with MetricsStore(source_url) as source, MetricsStore(destination_url) as copy:
        for filters in (
            {},
            {"since": START + timedelta(days=4, hours=3), "until": START + timedelta(days=8)},
        ):
            want = source.aggregate(exact=True, **filters).to_dict()
            got = copy.aggregate(exact=True, **filters).to_dict()
            assert_matches(got, _figures(want, (*COUNTS, *MONEY, "p95_latency_ms")))
        assert_matches(copy.aggregate().to_dict(), expected_aggregate(metrics, _book()))
        assert [
            (p.model, p.effective_from, p.input_per_1m, p.cache_read_per_1m, p.source)
            for p in copy.model_prices()
        ] == [
            (p.model, p.effective_from, p.input_per_1m, p.cache_read_per_1m, p.source)
            for p in source.model_prices()
        ]
        rows = {
            (row.keys["model"], row.bucket_start): row.to_dict()
            for row in source.breakdown(("model",), bucket="day", tz="Europe/Berlin")
        }
        copied = copy.breakdown(("model",), bucket="day", tz="Europe/Berlin")
        assert len(copied) == len(rows)
        for row in copied:
            want = rows[(row.keys["model"], row.bucket_start)]
            assert_matches(row.to_dict(), _figures(want, (*COUNTS, *MONEY)), where=f"{row.keys} ")


def test_a_store_copied_to_clickhouse_answers_as_the_source(source: Source, destination: str) -> None:
    seen: list[CopyProgress] = []
    result = run_async(copy_store(source.url, destination, batch_size=1000, progress=seen.append))
    assert (result.sent, result.copied, result.resumed_after) == (
        len(source.metrics),
        len(source.metrics),
        None,
    )
    count = len(source.metrics)  # 3,002: the generated 3,000 and two on the prices' boundaries
    assert [(p.sent, p.total) for p in seen] == [(sent, count) for sent in (0, 1000, 2000, 3000, count)]
    assert (result.model_prices, result.credit_prices, result.destination_only_prices) == (7, 2, ())
    assert_same_answers(source.url, destination, source.metrics)


class Crash(Exception):
    """Stands for the process dying after a batch."""


def _stop_after(batches: int) -> Any:
    def progress(done: CopyProgress) -> None:
        if done.batches == batches:
            raise Crash

    return progress


def test_an_interrupted_copy_resumes_after_its_checkpoint_and_counts_nothing_twice(
    source: Source, destination: str
) -> None:
    with pytest.raises(Crash):
        run_async(copy_store(source.url, destination, batch_size=500, progress=_stop_after(3)))
    with MetricsStore(destination) as copy:
        assert copy.aggregate().count == 1500
    # The checkpoints of batches 2 and 3 lost, as if the process had died after their inserts.
    source_name = display_url(resolve_url(source.url))
    first = run_async(_first(source.url, 500))
    run_async(_save(destination, CopyCheckpoint(source_name, CopyPosition.of(first[-1]), 500)))

    result: CopyResult = run_async(copy_store(source.url, destination, batch_size=500))
    assert result.resumed_after == CopyPosition.of(first[-1])
    # Batches 2 and 3 were sent again and written once: this run wrote the rest.
    assert (result.sent, result.copied) == (len(source.metrics) - 1500, len(source.metrics))
    assert_same_answers(source.url, destination, source.metrics)

    again = run_async(copy_store(source.url, destination, batch_size=500))  # finished: nothing new
    assert (again.sent, again.copied) == (0, len(source.metrics))


async def _first(url: str, count: int) -> list[ActionMetric]:
    repository = repository_for(resolve_url(url))()
    try:
        return await repository.read_after(None, count)
    finally:
        await repository.close()


async def _save(url: str, checkpoint: CopyCheckpoint) -> None:
    repository = ClickHouseRepository(ClickHouseURL.parse(url))
    await repository.ensure_schema()
    try:
        await repository.save_copy_checkpoint(checkpoint)
    finally:
        await repository.close()


def test_a_copy_back_from_clickhouse_interrupted_starts_over_and_counts_nothing_twice(
    backend: Databases, source: Source, destination: str
) -> None:
    """Into SQLite or PostgreSQL there is no checkpoint: run again, the copy starts from the first
    action and the ones already there are skipped by id, and counted as skipped, not copied."""
    run_async(copy_store(source.url, destination))
    back = backend.migrated()
    count = len(source.metrics)
    try:
        with pytest.raises(Crash):
            run_async(copy_store(destination, back, batch_size=400, progress=_stop_after(2)))
        result = run_async(copy_store(destination, back, batch_size=400))
        assert (result.sent, result.copied, result.resumed_after) == (count - 800, count, None)
        assert_same_answers(source.url, back, source.metrics)
        again = run_cli("db", "copy", "--from", destination, "--to", back, "--batch-size", "1000")
        assert again.exit_code == 0, again.output
        assert f"copied 0 actions ({count:,} in all)" in again.stderr
    finally:
        backend.drop(back)


def test_a_copy_between_sql_stores_run_again_says_it_copied_nothing(
    backend: Databases, source: Source
) -> None:
    """`db copy` into SQLite or PostgreSQL reports the actions it wrote: run again, it reads every
    action again and writes none, as a copy into ClickHouse run again does."""
    into = backend.migrated()
    count = len(source.metrics)
    try:
        first = run_cli("db", "copy", "--from", source.url, "--to", into, "--batch-size", "1000")
        assert first.exit_code == 0, first.output
        assert f"copied {count:,} actions ({count:,} in all)" in first.stderr
        again = run_cli("db", "copy", "--from", source.url, "--to", into, "--batch-size", "1000")
        assert again.exit_code == 0, again.output
        assert f"copied 0 actions ({count:,} in all)" in again.stderr
        assert "the totals agree" in again.stderr
    finally:
        backend.drop(into)


def test_a_price_the_destination_set_by_hand_is_not_overwritten_by_a_different_one(
    backend: Databases, source: Source
) -> None:
    """The destination priced sonnet by hand from the instant the source's cheaper sonnet starts, at
    another price: the copy names both and writes nothing. With the source's price set as the error
    says, the copy goes on: the same price passes (a copy run again writes its prices again)."""
    into = backend.migrated()
    try:
        with MetricsStore(into) as store:
            store.set_model_price("sonnet", "2", "10", SONNET_CHEAPER)
            held = store.model_prices()
        refused = run_cli("db", "copy", "--from", source.url, "--to", into)
        assert_one_line_error(
            refused,
            1,
            f"{display_url(resolve_url(into))} has a price of sonnet set by hand from "
            f"{SONNET_CHEAPER.isoformat()}, 2 / 10 USD per 1M input / output tokens, and "
            f"{display_url(resolve_url(source.url))} a different one from the same instant, 2.5 / 12.5 "
            "USD per 1M input / output tokens (cache read 0.25, cache write 3.125)",
        )
        with MetricsStore(into) as store:
            assert (store.model_prices(), store.aggregate().count) == (held, 0)

        take_source = re.search(r"run: action-metrics (.+?); to keep", refused.stderr)
        assert take_source is not None, refused.stderr
        assert run_cli(*shlex.split(take_source[1])).exit_code == 0
        copied = run_cli("db", "copy", "--from", source.url, "--to", into, "--batch-size", "1000")
        assert copied.exit_code == 0, copied.output
        assert f"copied {len(source.metrics):,} actions" in copied.stderr
        assert "the totals agree" in copied.stderr
    finally:
        backend.drop(into)


def test_a_pruned_source_is_refused_unless_its_pruned_period_is_given_up(
    backend: Databases, destination: str
) -> None:
    url = backend.migrated()
    metrics = _metrics()[:600]
    try:
        _fill(url, metrics)
        cutoff = START + timedelta(days=4)
        with MetricsStore(url) as store:
            store.prune(cutoff)
        refused = run_cli("db", "copy", "--from", url, "--to", destination)
        assert_one_line_error(refused, 1, "--skip-pruned-period")
        with pytest.raises(SourcePruned):
            run_async(copy_store(url, destination))

        copied = run_cli(
            "db", "copy", "--from", url, "--to", destination, "--skip-pruned-period", "--batch-size", "300"
        )
        assert copied.exit_code == 0, copied.output
        assert f"the totals of the copied period, from {cutoff.isoformat()} on, agree" in copied.stderr
        assert f"holds no actions from before {cutoff.isoformat()}" in copied.stderr
        kept = [metric for metric in metrics if metric.timestamp >= cutoff]
        with MetricsStore(destination) as copy:
            assert_matches(copy.aggregate(since=cutoff).to_dict(), expected_aggregate(kept, _book()))
            with pytest.raises(RawRowsPruned):  # the rollups answer; raw rows before the cut-off are gone
                copy.aggregate(exact=True)
    finally:
        backend.drop(url)


def test_a_refused_copy_leaves_no_new_destination_file_behind(backend: Databases, tmp_path: Path) -> None:
    """A copy refused before it writes (here: its source pruned) removes the SQLite file it created,
    with its journal, WAL and shared-memory files; a destination file that was there stays."""
    url = backend.migrated()
    try:
        with MetricsStore(url) as store:
            store.emit(metric(timestamp=START))
            store.prune(START + timedelta(days=1))
        new = tmp_path / "new.db"
        refused = run_cli("db", "copy", "--from", url, "--to", f"sqlite:///{new}")
        assert_one_line_error(refused, 1, "--skip-pruned-period")
        assert list(tmp_path.iterdir()) == []

        existing = tmp_path / "existing.db"
        with MetricsStore(f"sqlite:///{existing}"):
            pass
        refused = run_cli("db", "copy", "--from", url, "--to", f"sqlite:///{existing}")
        assert_one_line_error(refused, 1, "--skip-pruned-period")
        assert existing.is_file()
    finally:
        backend.drop(url)


def test_a_pruned_destination_is_refused_unless_the_period_it_refuses_is_given_up(
    source: Source, destination: str
) -> None:
    """A destination refuses actions from before its prune cut-off (their ids went with its rows), so
    the copy says so up front, naming the cut-off, rather than failing half-way; with the period
    given up it copies from the cut-off on, and the destination's rollups keep what it had before."""
    cutoff = START + timedelta(days=4)
    own = [metric(timestamp=START + timedelta(hours=2), tokens_in=777)]
    with MetricsStore(destination) as store:
        store.emit_many(own)
        store.prune(cutoff)
    refused = run_cli("db", "copy", "--from", source.url, "--to", destination)
    assert_one_line_error(refused, 1, f"refuses actions from before {cutoff.isoformat()}")
    assert "--skip-pruned-period" in refused.stderr
    with pytest.raises(DestinationPruned):
        run_async(copy_store(source.url, destination))

    copied = run_cli(
        "db", "copy", "--from", source.url, "--to", destination, "--skip-pruned-period", "--batch-size", "700"
    )
    assert copied.exit_code == 0, copied.output
    assert f"the totals of the copied period, from {cutoff.isoformat()} on, agree" in copied.stderr
    kept = [one for one in source.metrics if one.timestamp >= cutoff]
    assert f"copied {len(kept):,} actions" in copied.stderr
    with MetricsStore(destination) as copy:
        assert_matches(copy.aggregate(since=cutoff).to_dict(), expected_aggregate(kept, _book()))
        assert_matches(copy.aggregate().to_dict(), expected_aggregate([*own, *kept], _book()))


@pytest.mark.parametrize("into", ["sql", "clickhouse"])
def test_a_price_the_pruned_destination_cannot_take_is_refused_before_anything_is_written(
    backend: Databases, destination: str, into: str
) -> None:
    """A pruned destination refuses a new price from inside a UTC day it pruned (its rollups cannot be
    split there without the raw rows): the copy finds that out before it writes a price or an action,
    names the price, and the destination is left as it was. Into SQLite or PostgreSQL (the backend's
    own rule: the closed hours and days a price would split) and into ClickHouse."""
    source_url = backend.migrated()
    into_url = backend.migrated() if into == "sql" else destination
    cutoff = START + timedelta(days=4)
    inside = START + timedelta(days=2, hours=5, minutes=30)  # inside a day the destination pruned
    try:
        with MetricsStore(into_url) as store:
            store.emit_many([metric(timestamp=START + timedelta(days=2, hours=h)) for h in range(3)])
            store.emit_many([metric(timestamp=cutoff + timedelta(hours=h)) for h in range(2)])
            store.prune(cutoff)
            prices_before = store.model_prices()
            held_before = store.aggregate().to_dict()
        midnight = START + timedelta(days=2)
        after = cutoff + timedelta(minutes=5)
        starts = [(inside, "sonnet"), (inside, None), (midnight, "sonnet"), (after, "sonnet")]
        refusals = run_async(_refusals(into_url, starts))
        # Inside a pruned day, a model's or a credit's; not at its midnight, nor from the cut-off on.
        assert refusals == [cutoff, cutoff, None, None]
        with MetricsStore(source_url) as store:
            # One it could take (at a midnight), written before the one it cannot.
            store.set_model_price("openai/gpt-4o-mini", "0.15", "0.6", START)
            store.set_model_price("sonnet", "2.5", "12.5", inside)
            store.emit_many([metric(timestamp=cutoff + timedelta(hours=5 + h)) for h in range(3)])
        refused = run_cli("db", "copy", "--from", source_url, "--to", into_url, "--skip-pruned-period")
        assert_one_line_error(refused, 1, f"the price of sonnet from {inside.isoformat()}")
        assert "Nothing was written" in refused.stderr
        with pytest.raises(PriceInPrunedDestination) as raised:
            run_async(copy_store(source_url, into_url, skip_pruned_period=True))
        error = raised.value
        assert (error.model, error.effective_from, error.cutoff) == ("sonnet", inside, cutoff)
        with MetricsStore(into_url) as store:
            assert store.model_prices() == prices_before
            assert store.aggregate().to_dict() == held_before
    finally:
        backend.drop(source_url)
        if into == "sql":
            backend.drop(into_url)


async def _refusals(url: str, starts: list[tuple[datetime, str | None]]) -> list[datetime | None]:
    """`price_start_refused` of each (start, model) on the store at `url`."""
    repository = repository_for(resolve_url(url))()
    try:
        await repository.ensure_schema()
        return [await repository.price_start_refused(start, model) for start, model in starts]
    finally:
        await repository.close()


def test_credit_claims_come_along_so_a_copied_action_is_charged_once(
    database_url: str, tmp_path: Path, destination: str
) -> None:
    """Calls that carry their action's credits (`POST /v1/traces`): the source charged each action's
    first call; the copy keeps its claims, so the action's other calls arriving at the copy (a retry
    cut differently) are charged nothing. ClickHouse keeps claims in its server's memory: none go."""
    at = datetime.now(UTC) - timedelta(hours=1)
    calls = [metric(timestamp=at + timedelta(seconds=i), credits_charged=0) for i in range(4)]
    credits = InheritedCredits({call.id: ((7 + i // 2, 0xB), 25) for i, call in enumerate(calls)})

    async def write(url: str, chosen: list[ActionMetric]) -> dict[uuid.UUID, int]:
        async with AsyncMetricsStore(url) as store:
            assert await store.emit_batch(chosen, credits=credits) == len(chosen)
            return {stored.id: stored.credits_charged for stored in await store.query()}

    assert sorted(run_async(write(database_url, [calls[0], calls[2]])).values()) == [25, 25]
    copy = f"sqlite:///{tmp_path / 'copy.db'}"
    assert run_async(copy_store(database_url, copy, batch_size=1)).credit_claims == 2  # a claim a read
    assert run_async(copy_store(database_url, copy)).credit_claims == 0  # run again: none new
    charged = run_async(write(copy, [calls[1], calls[3]]))
    assert charged == {calls[0].id: 25, calls[1].id: 0, calls[2].id: 25, calls[3].id: 0}
    assert run_async(copy_store(database_url, destination)).credit_claims == 0
