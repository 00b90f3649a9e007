"""The rollups stay equal to the raw rows through everything the raw table survives: late and
re-sent metrics, prices set afterwards inside closed buckets, an interrupted build, a prune, and
any window and filter (hypothesis). Checked against the independent reference in tests/reference.py
on both backends; percentiles merged from histograms to 1%, everything else exactly.
"""

from __future__ import annotations

import asyncio
import random
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_breakdown import _expected_with, _key

from action_metrics import (
    ActionMetric,
    AsyncMetricsStore,
    DataRejected,
    InvalidPrice,
    MetricInPrunedPeriod,
    MetricsStore,
    rollup,
)
from action_metrics.errors import RawRowsPruned
from action_metrics.pricing import BEGINNING_OF_TIME, MODEL_COSTS_PER_1M
from action_metrics.rollup import (
    CLOSE_DELAY,
    BuildProgress,
    Grain,
    RollupState,
    bin_of,
    bin_value_of,
    ceil_to,
    floor_to,
    open_user_day,
    read_state,
)
from action_metrics.sketch import Sketch

from reference import PriceBook, assert_matches, expected_aggregate, percentile, select_like_the_store

NOW = datetime.now(UTC).replace(microsecond=0)
START = (NOW - timedelta(days=6)).replace(hour=0, minute=0, second=0)
TOWNS = ["town-a", "town-b", "town-c"]
ACTIONS = ["lod3", "lod4", "dialogue"]
MODELS = ["haiku", "sonnet", "opus", "template", "mystery"]


def _book(
    extra_models: dict[str, list[tuple[Any, ...]]] | None = None,
    extra_credits: list[tuple[datetime, str]] | None = None,
) -> PriceBook:
    models = {
        model: [(BEGINNING_OF_TIME, Decimal(str(i)), Decimal(str(o)))]
        for model, (i, o) in MODEL_COSTS_PER_1M.items()
    }
    for model, prices in (extra_models or {}).items():
        models.setdefault(model, []).extend((at, *(Decimal(price) for price in rest)) for at, *rest in prices)
    credits = [(BEGINNING_OF_TIME, Decimal("0.006"))]
    credits += [(at, Decimal(usd)) for at, usd in extra_credits or []]
    return PriceBook(models, credits)


def _metric(rng: random.Random, at: datetime, **fields: Any) -> ActionMetric:
    values: dict[str, Any] = {
        "action_type": rng.choice(ACTIONS),
        "user_id": f"user-{rng.randrange(5)}",
        "town_id": rng.choice(TOWNS),
        "citizen_id": rng.choice([None, "citizen-1", "citizen-2"]),
        "tokens_in": rng.randrange(0, 40_000),
        "tokens_out": rng.randrange(0, 4_000),
        "model": rng.choice(MODELS),
        "latency_ms": rng.choice([0.0, 0.3, rng.lognormvariate(5, 1.5), rng.uniform(1, 5)]),
        "credits_charged": rng.choice([0, 10, 100, 400]),
        "timestamp": at,
    }
    values.update(fields)
    tokens_in, tokens_out = values["tokens_in"], values["tokens_out"]
    cache_read = rng.choice([0, rng.randint(0, tokens_in)])
    values.setdefault("cache_read_tokens", cache_read)
    values.setdefault("cache_write_tokens", rng.choice([0, tokens_in - cache_read]))
    values.setdefault("reasoning_tokens", rng.choice([0, rng.randint(0, tokens_out)]))
    values.setdefault("error", rng.choice([None] * 7 + ["TimeoutError"]))
    return ActionMetric(**values)


def _spread(rng: random.Random, count: int, since: datetime, until: datetime) -> list[ActionMetric]:
    seconds = (until - since).total_seconds()
    moments = sorted(since + timedelta(seconds=rng.uniform(0, seconds)) for _ in range(count))
    return [_metric(rng, at) for at in moments]


class Interrupted(Exception):
    """Stands for Ctrl-C in the middle of a build."""


def _assert_everything(
    store: MetricsStore, metrics: list[ActionMetric], book: PriceBook, **filters: Any
) -> None:
    """aggregate() from the rollups and exact=True from raw rows both match the reference."""
    expected = expected_aggregate(select_like_the_store(metrics, filters), book)
    for exact in (False, True):
        assert_matches(
            store.aggregate(exact=exact, **filters).to_dict(), expected, f"{filters} exact={exact}: "
        )


WINDOWS: list[dict[str, Any]] = [
    {},
    {"since": START + timedelta(days=2)},
    {
        "since": START + timedelta(days=1, hours=13, minutes=37, seconds=11),
        "until": START + timedelta(days=3, hours=4, minutes=12, seconds=9),
    },
    {"until": START + timedelta(days=4, hours=5)},
    {"since": NOW - timedelta(hours=24)},
    {"town_id": "town-b"},
    {"action_type": "lod4", "since": START + timedelta(days=1, minutes=30)},
    {"model": "sonnet", "until": START + timedelta(days=5, hours=1, seconds=1)},
    {"town_id": "town-a", "action_type": "lod3"},
    {"user_id": "user-2", "since": START + timedelta(days=1)},
]


def test_late_and_resent_metrics_are_counted_once_in_the_closed_buckets(database_url: str) -> None:
    rng = random.Random(1)
    on_time = _spread(rng, 1500, START, NOW - timedelta(minutes=20))
    with MetricsStore(database_url) as store:
        for start in range(0, len(on_time), 300):
            store.emit_many(on_time[start : start + 300])
        state = _state(store)
        assert state.days_closed_until is not None
        assert state.days_closed_until > START + timedelta(days=4)
        # Late: days and hours that are already closed, some twice in one batch; and metrics stored
        # before, sent again one by one and in a batch.
        late = _spread(rng, 400, START, NOW - timedelta(hours=3))
        store.emit_many([*late[:200], *late[:50], *on_time[:100]])
        for metric in [*late[200:260], *on_time[100:110]]:
            store.emit(metric)
        store.emit_many(late[200:])
        store.flush()
        everything = on_time + late
        assert store.aggregate().count == len(everything)
        for window in WINDOWS:
            _assert_everything(store, everything, _book(), **window)
        assert not store.aggregate().percentiles_exact  # the rollups answered
        _assert_sketches_match_the_raw_rows(store, everything)


def test_batches_closing_and_adding_to_other_buckets_reuse_the_statements_built_before(
    database_url: str,
) -> None:
    """The fill statements are built once per process, level and kind of scope, the scope's bounds
    and ids bound by name (`rollup._reused`): batches that close other hours and days, and late
    batches into other closed hours with other ids, build none of their own. A bound or an id
    written into a statement's key would have every batch build one and keep it for the life of the
    process. Fixed days, inside one month: a month's close builds statements of its own."""
    rng = random.Random(7)
    first = datetime(2026, 3, 9, tzinfo=UTC)

    def batch(day: int, hour: int, count: int = 6) -> list[ActionMetric]:
        at = first + timedelta(days=day, hours=hour)
        return [_metric(rng, at + timedelta(minutes=7 * index)) for index in range(count)]

    def hour_by_hour(since: int, until: int) -> list[list[ActionMetric]]:
        """On time: a batch in each hour from `since` to `until` (hours from the first day's start)."""
        return [batch(0, hour) for hour in range(since, until)]

    with MetricsStore(database_url) as store:
        # What batches of each kind build, if this process has not built it yet: hours and a day
        # closed on time, late batches into closed hours.
        for metrics in [*hour_by_hour(0, 30), batch(0, 3), batch(0, 20)]:
            store.emit_many(metrics)
        built = len(rollup._built)
        for metrics in [*hour_by_hour(30, 54), batch(0, 9), batch(1, 2), batch(1, 14), batch(0, 22)]:
            store.emit_many(metrics)
        assert len(rollup._built) == built
        closed = _state(store).days_closed_until
        assert closed == first + timedelta(days=2)  # two days closed, the second by the measured batches
        assert store.aggregate(exact=True).count == 6 * (54 + 6)


def test_a_price_set_afterwards_inside_closed_buckets_reprices_them(database_url: str) -> None:
    rng = random.Random(2)
    metrics = _spread(rng, 1500, START, NOW - timedelta(minutes=20))
    # One metric exactly at each new price's start: it is the new price's.
    sonnet_cheaper = START + timedelta(days=2, hours=10, minutes=17, seconds=23)
    credits_dearer = START + timedelta(days=3, hours=14)  # an hour's start inside a closed day
    mystery_priced = START + timedelta(days=4, hours=6, minutes=1)
    metrics += [
        _metric(rng, sonnet_cheaper, model="sonnet", credits_charged=100),
        _metric(rng, credits_dearer, credits_charged=400),
        _metric(rng, mystery_priced, model="mystery", credits_charged=10),
    ]
    with MetricsStore(database_url) as store:
        store.emit_many(metrics)
        store.set_model_price("sonnet", "2.5", "12.5", sonnet_cheaper, cache_read_per_1m="0.25")
        store.set_credit_price("0.0075", effective_from=credits_dearer)
        store.set_model_price("mystery", "1", "2", effective_from=mystery_priced)
        book = _book(
            {"sonnet": [(sonnet_cheaper, "2.5", "12.5", "0.25")], "mystery": [(mystery_priced, "1", "2")]},
            [(credits_dearer, "0.0075")],
        )
        for window in WINDOWS:
            _assert_everything(store, metrics, book, **window)
        # Replacing a price (same model, same instant) changes the money, not the rows.
        store.set_model_price("sonnet", "2", "10", effective_from=sonnet_cheaper)
        book = _book(
            {"sonnet": [(sonnet_cheaper, "2", "10")], "mystery": [(mystery_priced, "1", "2")]},
            [(credits_dearer, "0.0075")],
        )
        _assert_everything(store, metrics, book)
        _assert_everything(store, metrics, book, model="sonnet", since=START + timedelta(days=2))
        _assert_sketches_match_the_raw_rows(store, metrics)


def test_an_interrupted_build_resumes_and_every_answer_is_right_on_the_way(database_url: str) -> None:
    rng = random.Random(3)
    metrics = _spread(rng, 1200, START, NOW - timedelta(hours=1))
    with MetricsStore(database_url) as store:
        store.emit_many(metrics[:1])  # closes nothing: its batch is at the very start
    _reset_rollups(database_url)
    with MetricsStore(database_url) as store:
        store._call(_insert_without_rollups(store, metrics[1:]))
        _assert_everything(store, metrics, _book())  # nothing built: raw rows answer, exactly
        days_seen: list[BuildProgress] = []

        def stop_after_two_days(progress: BuildProgress) -> None:
            days_seen.append(progress)
            if len(days_seen) == 2:
                raise Interrupted

        repository = store._call(store._store._open())
        with pytest.raises(Interrupted):
            store._call(repository.build_rollups(stop_after_two_days))
        halfway = _state(store)
        assert halfway.days_closed_until == START + timedelta(days=2)
        for window in WINDOWS:  # half rollups, half raw rows
            _assert_everything(store, metrics, _book(), **window)
        store._call(repository.build_rollups())
        now = datetime.now(UTC) - CLOSE_DELAY
        assert _state(store).days_closed_until == floor_to(floor_to(now, "hour"), "day")
        for window in WINDOWS:
            _assert_everything(store, metrics, _book(), **window)
        _assert_sketches_match_the_raw_rows(store, metrics)


def test_prune_keeps_the_rollups_and_says_what_needs_the_pruned_rows(database_url: str) -> None:
    rng = random.Random(4)
    metrics = _spread(rng, 1500, START, NOW - timedelta(minutes=20))
    cutoff = START + timedelta(days=3)
    with MetricsStore(database_url) as store:
        store.emit_many(metrics)
        older = sum(1 for metric in metrics if metric.timestamp < cutoff)
        dry = store.prune(cutoff + timedelta(hours=7), dry_run=True)  # rounded down to the day
        assert (dry.cutoff, dry.rows, dry.dry_run) == (cutoff, older, True)
        assert len(store.query()) == len(metrics)
        done = store.prune(cutoff + timedelta(hours=7))
        assert (done.cutoff, done.rows) == (cutoff, older)
        _assert_sketches_match_the_raw_rows(store, metrics)  # the pruned days' too
        kept = [metric for metric in metrics if metric.timestamp >= cutoff]
        assert store.query(since=cutoff) == select_like_the_store(kept, {})
        assert store.query(limit=5) == select_like_the_store(kept, {"limit": 5})  # newest: all kept

        # Whole days, before and after the cut-off, still answer from the rollups.
        book = _book()
        for window in [
            {},
            {"since": START + timedelta(days=1)},
            {"town_id": "town-c"},
            {"action_type": "lod3", "until": START + timedelta(days=5)},
            {"model": "opus"},
        ]:
            expected = expected_aggregate(select_like_the_store(metrics, window), book)
            assert_matches(store.aggregate(**window).to_dict(), expected, f"{window}: ")
        _assert_everything(store, metrics, book, since=cutoff)

        # What needs the pruned raw rows says so, naming the cut-off.
        for call, question in [
            (lambda: store.aggregate(exact=True), "aggregate(exact=True)"),
            (lambda: store.aggregate(user_id="user-1"), "aggregate(user_id=...)"),
            (
                lambda: store.aggregate(since=START + timedelta(days=1, hours=5, minutes=17)),
                "aggregate(since=...)",
            ),
            (
                lambda: store.aggregate(town_id="town-a", action_type="lod3"),
                "aggregate(town_id=..., action_type=...)",
            ),
            (lambda: store.query(), "query()"),
            (lambda: store.query(until=cutoff, limit=3), "query()"),
        ]:
            with pytest.raises(RawRowsPruned, match=re.escape(cutoff.isoformat())) as raised:
                call()
            assert raised.value.cutoff == cutoff
            assert str(raised.value).startswith(f"{question} needs raw rows"), (question, str(raised.value))

        # A price can still start at a pruned day's midnight, not inside it.
        with pytest.raises(InvalidPrice, match="effective_from"):
            store.set_model_price("opus", "10", "50", effective_from=START + timedelta(days=1, hours=3))
        store.set_model_price("opus", "10", "50", effective_from=START + timedelta(days=1))
        book = _book({"opus": [(START + timedelta(days=1), "10", "50")]})
        expected = expected_aggregate(metrics, book)
        assert_matches(store.aggregate().to_dict(), expected)


def test_an_action_re_sent_or_late_for_a_pruned_period_is_refused_naming_the_cut_off(
    database_url: str,
) -> None:
    """Prune takes the ids with the rows: an action from before the cut-off could not be told from
    one stored before it, so it is refused, never counted twice nor dropped in silence. Its batch
    stores nothing; the writer stores the rest of its batch; the rollups stay the reference's."""
    rng = random.Random(6)
    metrics = _spread(rng, 400, START, NOW - timedelta(minutes=20))
    cutoff = START + timedelta(days=3)
    old = [metric for metric in metrics if metric.timestamp < cutoff][:3]
    late = [_metric(rng, cutoff - timedelta(microseconds=1)), _metric(rng, START + timedelta(hours=1))]
    fresh = [_metric(rng, NOW - timedelta(minutes=minutes)) for minutes in (3, 7, 11, 13, 17)]
    at_the_cut_off = _metric(rng, cutoff)
    with MetricsStore(database_url) as store:
        store.emit_many(metrics)
        store.prune(cutoff)

        with pytest.raises(MetricInPrunedPeriod, match=re.escape(cutoff.isoformat())) as raised:
            store.emit_many([fresh[0], old[0], late[0]])
        assert (raised.value.field, raised.value.indexes, raised.value.cutoff) == (
            "timestamp",
            (1, 2),
            cutoff,
        )
        assert isinstance(raised.value, DataRejected)
        assert "metrics 1, 2 (the oldest at" in str(raised.value)
        assert "the batch stored nothing" in str(raised.value)
        assert fresh[0].id not in {metric.id for metric in store.query(since=cutoff)}  # stored nothing

        async def stream() -> None:  # batches of two: the first two stay, the index counts from the start
            async with AsyncMetricsStore(database_url) as streaming:
                streaming.ingest_batch = 2
                await streaming.emit_many([fresh[0], fresh[1], fresh[2], late[1]])

        with pytest.raises(MetricInPrunedPeriod) as raised:
            asyncio.run(stream())
        assert raised.value.indexes == (3,)
        assert "their batch, from metric 2 on, stored nothing; the 2 before it are stored" in str(
            raised.value
        )

        # The background writer: the refused ones counted and logged, the rest of the batch stored.
        for metric in [fresh[2], *old, fresh[3], *late, at_the_cut_off, fresh[4]]:
            store.emit(metric)
        store.flush()
        assert (store.rejected, store.dropped) == (len(old) + len(late), len(old) + len(late))

        accepted = [*metrics, *fresh, at_the_cut_off]
        book = _book()
        for window in [{}, {"town_id": "town-b"}, {"model": "opus", "until": START + timedelta(days=2)}]:
            expected = expected_aggregate(select_like_the_store(accepted, window), book)
            assert_matches(store.aggregate(**window).to_dict(), expected, f"{window}: ")
        _assert_everything(store, accepted, book, since=cutoff)
        assert store.query(since=cutoff) == select_like_the_store(
            [metric for metric in accepted if metric.timestamp >= cutoff], {}
        )


def test_a_metric_is_in_the_next_aggregate_after_its_batch_commits(database_url: str) -> None:
    rng = random.Random(5)
    with MetricsStore(database_url) as store:
        store.emit_many(_spread(rng, 300, START, NOW - timedelta(hours=2)))
        before = store.aggregate()
        for at in (NOW - timedelta(seconds=1), START + timedelta(days=1, hours=2)):  # open and closed
            store.emit(_metric(rng, at, tokens_in=123_456))
            after = store.aggregate()
            assert after.count == before.count + 1
            assert after.tokens_in == before.tokens_in + 123_456
            before = after


# --- any window, any filter ------------------------------------------------------------------------

FILTERS = st.fixed_dictionaries(
    {},
    optional={
        "town_id": st.sampled_from(TOWNS),
        "action_type": st.sampled_from(ACTIONS),
        "model": st.sampled_from(MODELS),
        "user_id": st.sampled_from(["user-1", "user-4"]),
    },
)
MOMENTS = st.integers(min_value=-3_600, max_value=7 * 86_400 + 3_600).map(
    lambda seconds: START + timedelta(seconds=seconds)
)


@pytest.fixture(scope="module")
def population(backend: Any) -> Any:
    """Six days of metrics up to a few minutes ago: closed days, closed hours and an open hour."""
    url = backend.migrated()
    rng = random.Random(6)
    metrics = _spread(rng, 2500, START, NOW - timedelta(minutes=2))
    sonnet_cheaper = START + timedelta(days=1, hours=20, minutes=30)
    store = MetricsStore(url)
    store.set_model_price("sonnet", "2.5", "12.5", effective_from=sonnet_cheaper)
    for start in range(0, len(metrics), 250):
        store.emit_many(metrics[start : start + 250])
    yield store, metrics, _book({"sonnet": [(sonnet_cheaper, "2.5", "12.5")]})
    store.close()
    backend.drop(url)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(filters=FILTERS, since=st.none() | MOMENTS, until=st.none() | MOMENTS)
def test_any_window_and_filters_match_the_reference(
    population: Any, filters: dict[str, Any], since: datetime | None, until: datetime | None
) -> None:
    store, metrics, book = population
    window = {**filters, **({"since": since} if since else {}), **({"until": until} if until else {})}
    expected = expected_aggregate(select_like_the_store(metrics, window), book)
    assert_matches(store.aggregate(**window).to_dict(), expected, f"{window}: ")


# --- the histograms ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(latency=st.floats(min_value=0, max_value=1e15, allow_nan=False))
def test_every_latency_is_within_one_percent_of_its_bins_value(latency: float) -> None:
    value = bin_value_of(bin_of(latency))
    assert value == pytest.approx(latency, rel=0.01, abs=0)


def test_merged_percentiles_are_within_one_percent_over_decades_of_latency(database_url: str) -> None:
    rng = random.Random(8)
    latencies = [*(10 ** rng.uniform(-3, 6) for _ in range(3000)), *([0.0] * 40), *([250.0] * 200)]
    rng.shuffle(latencies)  # decades of latency, zeros and ties, spread over the days
    metrics = [
        _metric(rng, START + timedelta(seconds=index * 97), latency_ms=latency, model="haiku")
        for index, latency in enumerate(latencies)
    ]
    with MetricsStore(database_url) as store:
        for start in range(0, len(metrics), 300):  # in time order: each batch closes what it passed
            store.emit_many(metrics[start : start + 300])
        for days in (1, 2, 3):
            since = START + timedelta(days=days, hours=days)
            chosen = [m.latency_ms for m in metrics if m.timestamp >= since and m.error is None]
            got = store.aggregate(since=since)
            assert not got.percentiles_exact
            for fraction, value in [
                (0.5, got.p50_latency_ms),
                (0.95, got.p95_latency_ms),
                (0.99, got.p99_latency_ms),
            ]:
                want = percentile(chosen, fraction)
                assert want is not None
                assert value is not None
                assert value == pytest.approx(want, rel=0.01, abs=0), (days, fraction)
        exact = store.aggregate(exact=True)
        assert exact.percentiles_exact
        assert exact.p99_latency_ms == pytest.approx(
            float(np.percentile([m.latency_ms for m in metrics if m.error is None], 99))
        )


# --- helpers --------------------------------------------------------------------------------------


def _state(store: MetricsStore) -> RollupState:
    async def read() -> RollupState:
        repository = await store._store._open()
        async with repository.engine.connect() as connection:
            return await read_state(connection)

    return store._call(read())


def _sketches_from_raw(
    metrics: list[ActionMetric], state: RollupState
) -> dict[tuple[str, datetime, str], Any]:
    """Every sketch the closed buckets should hold, built here from the metrics themselves:
    (level, start, key) -> (n, zero count, {bin: count}, latency sum)."""
    expected: dict[tuple[str, datetime, str], Any] = {}

    def town_and_action(metric: ActionMetric) -> str:
        return f"{metric.town_id}/{metric.action_type}"

    for name, grain, key, built in (
        ("town/hour", "hour", "town_id", state.sketches_from),
        ("model/hour", "hour", "model", state.sketches_from),
        ("town/day", "day", "town_id", state.sketches_from),
        ("user/day", "day", "user_id", state.users_from),
        ("user/month", "month", "user_id", state.users_from),
        ("town-action/day", "day", town_and_action, state.town_actions_from),
    ):
        closed = _user_rows_until(state) if name == "user/day" else state.closed_until(grain)
        if grain == "month" and built is not None:
            built = ceil_to(built, "month")
        for metric in metrics:
            if metric.error is not None or closed is None or metric.timestamp >= closed:
                continue
            if built is not None and metric.timestamp < built:
                continue
            bucket = (
                name,
                floor_to(metric.timestamp, grain),
                key(metric) if callable(key) else getattr(metric, key),
            )
            n, zeros, bins, total = expected.get(bucket, (0, 0, {}, 0.0))
            latency = float(metric.latency_ms)
            if latency > 0:
                bins[bin_of(latency)] = bins.get(bin_of(latency), 0) + 1
            expected[bucket] = (n + 1, zeros + (latency == 0), bins, total + latency)
    return expected


def _assert_sketches_match_the_raw_rows(store: MetricsStore, metrics: list[ActionMetric]) -> None:
    """Every stored sketch equals the one built from the metrics, and every closed hour's sums per
    town and model (the level read with them) equal the metrics' sums."""
    from sqlalchemy import select

    from action_metrics.schema import latency_sketch, rollup, rollup_user

    async def read() -> tuple[list[Any], list[Any], list[Any]]:
        repository = await store._store._open()
        async with repository.engine.connect() as connection:
            sketches = (await connection.execute(select(latency_sketch))).all()
            r = rollup.c
            sums = (
                await connection.execute(
                    select(r.town_id, r.start, r.model, r["count"], r.tokens_in, r.credits_charged).where(
                        r.grain == "hour", r.town_id != "", r.action_type == ""
                    )
                )
            ).all()
            u = rollup_user.c
            users = (
                await connection.execute(
                    select(u.grain, u.user_id, u.start, u.model, u["count"], u.tokens_in, u.credits_charged)
                )
            ).all()
            return sketches, sums, users

    state = _state(store)
    stored, sums, users = store._call(read())
    expected = _sketches_from_raw(metrics, state)
    got = {}
    for row in stored:
        sketch = Sketch(row.n, row.latency_sum, row.zero_count, row.bins)
        bins, counts = sketch.bins()
        got[(row.level, row.start, row.key)] = (
            sketch.n,
            sketch.zero_count,
            dict(zip(bins.tolist(), counts.tolist(), strict=True)),
            sketch.latency_sum,
        )
    assert got.keys() == expected.keys()
    for bucket, (n, zeros, bins, total) in expected.items():
        assert got[bucket][:3] == (n, zeros, bins), bucket
        assert got[bucket][3] == pytest.approx(total, rel=1e-9), bucket
    per_hour: dict[tuple[str, datetime, str], list[int]] = {}
    for town, start, model, count, tokens_in, credits in sums:
        totals = per_hour.setdefault((town, floor_to(start, "hour"), model), [0, 0, 0])
        for index, value in enumerate((count, tokens_in, credits)):
            totals[index] += int(value)
    closed = state.hours_closed_until
    want: dict[tuple[str, datetime, str], list[int]] = {}
    for metric in metrics:
        if closed is not None and metric.timestamp < closed:
            totals = want.setdefault(
                (metric.town_id, floor_to(metric.timestamp, "hour"), metric.model), [0, 0, 0]
            )
            for index, value in enumerate((1, metric.tokens_in, metric.credits_charged)):
                totals[index] += value
    assert per_hour == want
    _assert_user_sums(users, metrics, state)


def _user_rows_until(state: RollupState) -> datetime | None:
    """How far the user levels' day rows and sketches hold the actions: the closed days, and the
    open day's closed hours as they close."""
    open_day = open_user_day(state)
    return state.days_closed_until if open_day is None else open_day[1]


def _assert_user_sums(users: list[Any], metrics: list[ActionMetric], state: RollupState) -> None:
    """The user levels' rows of every closed day and month, per user, model and bucket (their rows
    split at price changes added up), equal the metrics' sums, from where they were built on."""
    got: dict[tuple[str, str, datetime, str], list[int]] = {}
    for grain, user, start, model, count, tokens_in, credits in users:
        totals = got.setdefault((grain, user, floor_to(start, grain), model), [0, 0, 0])
        for index, value in enumerate((count, tokens_in, credits)):
            totals[index] += int(value)
    want: dict[tuple[str, str, datetime, str], list[int]] = {}
    for grain in ("day", "month"):
        closed = _user_rows_until(state) if grain == "day" else state.closed_until(grain)
        built = state.users_from
        if grain == "month" and built is not None:
            built = ceil_to(built, "month")
        for metric in metrics:
            if closed is None or metric.timestamp >= closed or (built and metric.timestamp < built):
                continue
            key = (grain, metric.user_id, floor_to(metric.timestamp, grain), metric.model)
            totals = want.setdefault(key, [0, 0, 0])
            for index, value in enumerate((1, metric.tokens_in, metric.credits_charged)):
                totals[index] += value
    assert got == want


def _reset_rollups(url: str) -> None:
    """Empty the rollups, as a database just migrated to 0003 with rows already stored has them."""
    with MetricsStore(url) as store:

        async def empty() -> None:
            repository = await store._store._open()
            async with repository.engine.begin() as connection:
                from sqlalchemy import delete, update

                from action_metrics.schema import (
                    latency_histogram,
                    latency_sketch,
                    rollup,
                    rollup_detail,
                    rollup_state,
                    rollup_user,
                )

                await connection.execute(delete(rollup))
                await connection.execute(delete(rollup_user))
                await connection.execute(delete(latency_sketch))
                await connection.execute(delete(rollup_detail))
                await connection.execute(delete(latency_histogram))
                await connection.execute(
                    update(rollup_state).values(
                        hours_closed_until=None,
                        days_closed_until=None,
                        users_from=None,
                        town_actions_from=None,
                        user_hours_until=None,
                    )
                )

        store._call(empty())


async def _insert_without_rollups(store: MetricsStore, metrics: list[ActionMetric]) -> None:
    """Rows written as a SQL client would, behind the rollups' back (as before migration 0003)."""
    from sqlalchemy import insert

    from action_metrics.query import metric_rows
    from action_metrics.schema import action_metrics

    repository = await store._store._open()
    async with repository.engine.begin() as connection:
        await connection.execute(insert(action_metrics), metric_rows(metrics))


def test_db_upgrade_writes_the_sketches_of_buckets_closed_before_them(database_url: str) -> None:
    """A database whose rollups were built before migration 0007 (late metrics and a price change
    among its rows): `db upgrade` sums the hours per town and writes every closed bucket's sketch."""
    from conftest import run_cli

    from action_metrics import migrate

    rng = random.Random(8)
    metrics = _spread(rng, 1200, START, NOW - timedelta(minutes=20))
    late = _spread(rng, 200, START, NOW - timedelta(hours=5))
    inside = START + timedelta(days=2, hours=3, minutes=7)
    with MetricsStore(database_url) as store:
        store.emit_many(metrics)
        store.emit_many([*late, *metrics[:30]])
        store.set_model_price("opus", "10", "50", effective_from=inside)
    before = migrate.head_revision()
    previous = "0006"
    assert run_cli("db", "downgrade", previous, "--url", database_url).exit_code == 0
    upgraded = run_cli("db", "upgrade", "--url", database_url)
    assert upgraded.exit_code == 0, upgraded.output
    with MetricsStore(database_url) as store:
        assert migrate.head_revision() == before
        state = _state(store)
        assert state.sketches_from is None  # written back to the first raw row
        _assert_sketches_match_the_raw_rows(store, metrics + late)
        book = _book({"opus": [(inside, "10", "50")]})
        for window in WINDOWS:
            _assert_everything(store, metrics + late, book, **window)


def test_a_late_metric_before_the_sketches_are_written_back_is_in_them_once(database_url: str) -> None:
    """Migrated to 0007 (alembic alone), a store takes a late metric for a closed day whose sketches
    are not written yet; `db upgrade`'s write-back then writes that day's sketches from the raw rows,
    the late metric among them, over the partial one the late path made (its plain INSERT met it)."""
    import asyncio

    from conftest import run_cli

    from action_metrics import migrate
    from action_metrics.dialects import backend_for

    rng = random.Random(13)
    metrics = _spread(rng, 600, START, NOW - timedelta(minutes=20))
    with MetricsStore(database_url) as store:
        store.emit_many(metrics)
    assert run_cli("db", "downgrade", "0006", "--url", database_url).exit_code == 0

    async def upgrade_schema_only() -> None:
        engine = backend_for(database_url).create_engine()
        try:
            await migrate.run_migrations(engine, migrate.upgrade_to("head"))
        finally:
            await engine.dispose()

    asyncio.run(upgrade_schema_only())
    late = [_metric(rng, START + timedelta(days=1, hours=5, minutes=minute), error=None) for minute in (1, 2)]
    with MetricsStore(database_url) as store:
        state = _state(store)
        assert state.sketches_from is not None
        assert late[0].timestamp < state.sketches_from
        store.emit_many(late)
    upgraded = run_cli("db", "upgrade", "--url", database_url)
    assert upgraded.exit_code == 0, upgraded.output
    with MetricsStore(database_url) as store:
        assert _state(store).sketches_from is None
        _assert_sketches_match_the_raw_rows(store, metrics + late)
        for window in WINDOWS:
            _assert_everything(store, metrics + late, _book({}), **window)


def test_a_late_metric_after_a_price_began_inside_its_closed_day_is_charged_that_price(
    database_url: str,
) -> None:
    """The day's rows are split where the price began; a late metric later that day goes into the
    split row, not the one from midnight (it did, and was charged the old price)."""
    rng = random.Random(9)
    day = START + timedelta(days=2)
    metrics = _spread(rng, 600, START, NOW - timedelta(minutes=20))
    dearer = day + timedelta(hours=7, minutes=13)
    late = _metric(rng, day + timedelta(hours=23, minutes=50), model="opus", error=None)
    with MetricsStore(database_url) as store:
        store.emit_many(metrics)
        store.set_model_price("opus", "20", "80", effective_from=dearer)
        store.emit(late)
        store.flush()
        book = _book({"opus": [(dearer, "20", "80")]})
        everything = [*metrics, late]
        for window in ({"since": day, "until": day + timedelta(days=1)}, {"model": "opus"}, {}):
            _assert_everything(store, everything, book, **window)
        _assert_sketches_match_the_raw_rows(store, everything)


def test_a_batch_spanning_a_history_not_yet_built_closes_a_bounded_part_of_it(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One old metric and one new one over rows not yet in the rollups (an upgrade interrupted or
    still building, a `--sql` migration) span the whole backlog: their batch closed all of it in one
    transaction, holding the write lock for tens of seconds at 300k actions. Now it closes buckets
    holding at most a budget of actions (here 200), and later batches catch up the rest, every answer
    exact on the way."""
    from action_metrics import rollup

    monkeypatch.setattr(rollup, "MIN_ACTIONS_CLOSED_PER_BATCH", 200)
    rng = random.Random(11)
    history = _spread(rng, 1_500, NOW - timedelta(days=60), NOW - timedelta(hours=2))
    with MetricsStore(database_url) as store:
        store.emit_many(history[:1])  # closes nothing: its batch is at the very start
    _reset_rollups(database_url)
    with MetricsStore(database_url) as store:
        store._call(_insert_without_rollups(store, history[1:]))
        mixed = [_metric(rng, NOW - timedelta(seconds=1)), _metric(rng, NOW - timedelta(days=80))]
        store.emit_many(mixed)
        sent = [*history, *mixed]
        first = _state(store).hours_closed_until
        assert first is not None
        # 200 actions of the history are ~8 days of it (more than MAX_HOURS_CLOSED_PER_BATCH's 48 h).
        assert first < NOW - timedelta(days=45), first
        _assert_everything(store, sent, _book())
        batches = 0
        while (reached := _state(store).hours_closed_until) < floor_to(NOW - CLOSE_DELAY, "hour"):
            new = _metric(rng, datetime.now(UTC) - timedelta(seconds=1))
            store.emit_many([new])  # newer than the backlog: closes 48 hours of it (the backlog rule)
            sent.append(new)
            batches += 1
            assert _state(store).hours_closed_until > reached  # every batch moves it on
            assert batches < 40
        assert batches >= 5  # the backlog took several bounded steps, not one
        for window in WINDOWS:
            _assert_everything(store, sent, _book(), **window)


# --- months ------------------------------------------------------------------------------------------


def _assert_levels_match_the_raw_rows(
    store: MetricsStore, metrics: list[ActionMetric], grain: Grain = "month"
) -> None:
    """The `grain` rows of every model and of each action type (sums split at prices added up) and
    their latency histograms equal the metrics' of what they hold, bucket by bucket: a month's its
    closed days, a day's its closed hours (the day being filled too)."""
    from sqlalchemy import select

    from action_metrics.schema import latency_histogram, rollup

    async def read() -> tuple[list[Any], list[Any]]:
        repository = await store._store._open()
        async with repository.engine.connect() as connection:
            r, h = rollup.c, latency_histogram.c
            sums = await connection.execute(
                select(r.action_type, r.start, r.model, r["count"], r.tokens_in, r.credits_charged).where(
                    r.grain == grain, r.town_id == ""
                )
            )
            bins = await connection.execute(
                select(h.action_type, h.start, h.model, h.bin, h["count"]).where(
                    h.grain == grain, h.town_id == ""
                )
            )
            return sums.all(), bins.all()

    state = _state(store)
    closed = state.days_closed_until if grain == "month" else state.hours_closed_until
    assert closed is not None
    sums, bins = store._call(read())
    got: dict[tuple[str, datetime, str], list[int]] = {}
    for action, start, model, count, tokens_in, credits in sums:
        assert start < closed
        totals = got.setdefault((action, floor_to(start, grain), model), [0, 0, 0])
        for index, value in enumerate((count, tokens_in, credits)):
            totals[index] += int(value)
    got_bins: dict[tuple[str, datetime, str], dict[int, int]] = {}
    for action, start, model, bin_, count in bins:
        assert start == floor_to(start, grain)
        got_bins.setdefault((action, start, model), {})[bin_] = int(count)
    want: dict[tuple[str, datetime, str], list[int]] = {}
    want_bins: dict[tuple[str, datetime, str], dict[int, int]] = {}
    for metric in metrics:
        if metric.timestamp >= closed:
            continue
        for action in ("", metric.action_type):
            key = (action, floor_to(metric.timestamp, grain), metric.model)
            totals = want.setdefault(key, [0, 0, 0])
            for index, value in enumerate((1, metric.tokens_in, metric.credits_charged)):
                totals[index] += value
            if metric.error is None:
                counted = want_bins.setdefault(key, {})
                counted[bin_of(metric.latency_ms)] = counted.get(bin_of(metric.latency_ms), 0) + 1
    assert got == want
    assert got_bins == want_bins


def test_months_hold_their_closed_days_through_late_metrics_prices_and_a_prune(database_url: str) -> None:
    """Over 70 days (two month boundaries or more), everything and an action type over all time or
    whole months read the month rows: they hold the closed days of their month, the month being filled
    too, through late and re-sent metrics, a price beginning inside a day and one set afterwards at a
    day's midnight inside a closed month, and a prune; every answer the reference's."""
    from action_metrics.rollup import MONTHLY, MONTHLY_BY_ACTION, plan_reads

    rng = random.Random(12)
    first = floor_to(NOW - timedelta(days=70), "day")
    metrics = _spread(rng, 1_800, first, NOW - timedelta(minutes=2))
    credits_dearer = first + timedelta(days=17, hours=7, minutes=13)  # inside a day
    sonnet_cheaper = floor_to(NOW - timedelta(days=40), "day")  # a midnight inside a closed month
    if sonnet_cheaper == floor_to(sonnet_cheaper, "month"):
        sonnet_cheaper += timedelta(days=1)
    late = [_metric(rng, first + timedelta(seconds=rng.uniform(0, 60 * 86_400))) for _ in range(60)]
    months = [floor_to(first, "month")]
    while months[-1] < NOW:
        months.append(ceil_to(months[-1] + timedelta(days=1), "month"))
    windows: list[dict[str, Any]] = [
        {},
        {"since": months[1]},
        {"until": months[2]},
        {"since": months[1], "until": months[2]},
        {
            "since": first + timedelta(days=3, hours=13, minutes=37, seconds=11),
            "until": months[2] + timedelta(hours=5),
        },
        {"action_type": "lod3"},
        {"action_type": "dialogue", "since": months[1] - timedelta(days=2)},
        {"model": "sonnet"},
        {"town_id": "town-a"},
    ]
    with MetricsStore(database_url) as store:
        store.set_credit_price("0.0075", effective_from=credits_dearer)
        for start in range(0, len(metrics), 300):
            store.emit_many(metrics[start : start + 300])
        store.emit_many([*late, *rng.sample(metrics, 20)])  # late ones and re-sent ones
        everything = [*metrics, *late]
        store.set_model_price("sonnet", "2.5", "12.5", effective_from=sonnet_cheaper)
        book = _book({"sonnet": [(sonnet_cheaper, "2.5", "12.5")]}, [(credits_dearer, "0.0075")])
        state = _state(store)
        assert plan_reads(state, (), None, None).rollup_ranges[0][0] == MONTHLY
        assert plan_reads(state, ("action_type",), None, None).rollup_ranges[0][0] == MONTHLY_BY_ACTION
        _assert_levels_match_the_raw_rows(store, everything)
        for window in windows:
            _assert_everything(store, everything, book, **window)
        # Breakdowns per month read the month rows of their whole months alike.
        for by, zone in [(("model",), "UTC"), (("model",), "Europe/Berlin"), (("action_type",), "UTC")]:
            rows = [row.to_dict() for row in store.breakdown(by, bucket="month", tz=zone)]
            expected = _expected_with(everything, by, "month", zone, book)
            assert sorted(repr(_key(row, by, "month")) for row in rows) == sorted(map(repr, expected))
            for row in rows:
                assert_matches(row, expected[_key(row, by, "month")], f"{by} {zone}: ")

        cutoff = floor_to(NOW - timedelta(days=30), "day")
        store.prune(cutoff)
        _assert_levels_match_the_raw_rows(store, everything)  # the pruned days' too
        # A price at a pruned day's midnight: the month is summed again from its days.
        opus_dearer = cutoff - timedelta(days=12)
        store.set_model_price("opus", "20", "80", effective_from=opus_dearer)
        book = _book(
            {"sonnet": [(sonnet_cheaper, "2.5", "12.5")], "opus": [(opus_dearer, "20", "80")]},
            [(credits_dearer, "0.0075")],
        )
        for window in [{}, {"since": months[1]}, {"action_type": "lod3"}, {"model": "opus"}]:
            expected = expected_aggregate(select_like_the_store(everything, window), book)
            assert_matches(store.aggregate(**window).to_dict(), expected, f"{window}: ")
        _assert_levels_match_the_raw_rows(store, everything)


# --- the day being filled -------------------------------------------------------------------------------


def test_the_open_day_holds_its_closed_hours_through_late_metrics_prices_and_its_close(
    database_url: str,
) -> None:
    """Everything and an action type over all time read the open day's rows of every model and of
    each action type, which hold its closed hours as each closes, and raw rows of the open hour only;
    late and re-sent metrics for those hours, a price set afterwards inside them, one beginning in the
    open hour, and the day's close keep the rows the metrics' own; every answer the reference's."""
    from action_metrics.rollup import DAILY, DAILY_BY_ACTION, plan_reads

    rng = random.Random(13)
    day = floor_to(NOW - timedelta(days=3), "day")  # the open day: in the past, whatever the clock says
    first, end = day - timedelta(days=2), day + timedelta(hours=15, minutes=20)
    metrics = _spread(rng, 1_500, first, end)
    late = [_metric(rng, day + timedelta(seconds=rng.uniform(0, 15 * 3_600))) for _ in range(25)]
    late += [_metric(rng, day - timedelta(seconds=rng.uniform(1, 86_400))) for _ in range(10)]
    sonnet_dearer = day + timedelta(hours=7, minutes=13)  # inside the open day's closed hours
    credits_dearer = day + timedelta(hours=15, minutes=10)  # inside its open hour
    windows: list[dict[str, Any]] = [
        {},
        {"action_type": "lod3"},
        {"since": day},
        {"action_type": "dialogue", "since": day - timedelta(days=1) + timedelta(hours=13, minutes=37)},
        {"since": day + timedelta(hours=2, minutes=30), "until": day + timedelta(hours=15, minutes=10)},
        {"until": day + timedelta(hours=9)},
        {"model": "sonnet"},
        {"town_id": "town-c"},
    ]
    with MetricsStore(database_url) as store:
        for start in range(0, len(metrics), 100):  # in time order: the open day's hours close one by one
            store.emit_many(metrics[start : start + 100])
        state = _state(store)
        assert (state.days_closed_until, state.hours_closed_until) == (day, day + timedelta(hours=15))
        for kept, level in (((), DAILY), (("action_type",), DAILY_BY_ACTION)):
            plan = plan_reads(state, kept, None, end)
            assert (level, day, day + timedelta(hours=15)) in plan.rollup_ranges
            assert plan.raw_ranges == ((day + timedelta(hours=15), end),)
        _assert_levels_match_the_raw_rows(store, metrics, "day")

        store.emit_many([*late, *rng.sample(metrics, 20)])  # late ones and re-sent ones
        store.set_model_price("sonnet", "4", "20", effective_from=sonnet_dearer)
        store.set_credit_price("0.0075", effective_from=credits_dearer)
        everything = [*metrics, *late]
        book = _book({"sonnet": [(sonnet_dearer, "4", "20")]}, [(credits_dearer, "0.0075")])
        _assert_levels_match_the_raw_rows(store, everything, "day")
        for window in windows:
            _assert_everything(store, everything, book, **window)
        rows = [row.to_dict() for row in store.breakdown(("action_type",), bucket="day")]
        expected = _expected_with(everything, ("action_type",), "day", "UTC", book)
        assert sorted(repr(_key(row, ("action_type",), "day")) for row in rows) == sorted(map(repr, expected))
        for row in rows:
            assert_matches(row, expected[_key(row, ("action_type",), "day")], "by action type and day: ")

        # The day closes: its rows, filled hour by hour, are the day's; the next day's are filled alike.
        following = _spread(rng, 400, end, day + timedelta(days=1, hours=2, minutes=30))
        for start in range(0, len(following), 100):
            store.emit_many(following[start : start + 100])
        everything += following
        state = _state(store)
        assert (state.days_closed_until, state.hours_closed_until) == (
            day + timedelta(days=1),
            day + timedelta(days=1, hours=2),
        )
        _assert_levels_match_the_raw_rows(store, everything, "day")
        _assert_levels_match_the_raw_rows(store, everything, "month")
        for window in windows:
            _assert_everything(store, everything, book, **window)
        _assert_sketches_match_the_raw_rows(store, everything)
