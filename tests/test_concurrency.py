"""Eight writer processes and a reader on one database: nothing lost, nothing twice, nothing torn.

Every batch gets a model name of its own, so a single `aggregate()` (one snapshot) shows the reader
how many rows of each batch it can see: always the whole batch, never part of it. The metrics span
hours in the past, so the writers close buckets and add late metrics to the rollups while the others
write: the rollups must agree with the raw rows throughout. Processes are synchronised with a barrier
and events, never with sleeps.
"""

from __future__ import annotations

import multiprocessing
import traceback
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier, Event
from typing import Any

from action_metrics import ActionMetric, MetricsStore

from reference import assert_same_figures

WRITERS = 8
BATCH_SIZES = [*range(1, 50), 25]  # 50 batches of distinct sizes but one, 1,250 metrics a writer
PER_WRITER = sum(BATCH_SIZES)
TOTAL = WRITERS * PER_WRITER
START = datetime(2026, 11, 25, tzinfo=UTC)
NAMESPACE = uuid.UUID("6a1f3c2e-0b7d-4c55-9e0a-2d6f8b1c4e70")
RESULT_TIMEOUT_S = 600  # only so that a hung process fails the test instead of hanging it


def batch_model(writer: int, batch: int) -> str:
    return f"writer-{writer}-batch-{batch:03d}"


EXPECTED_SIZES = {
    batch_model(writer, batch): size for writer in range(WRITERS) for batch, size in enumerate(BATCH_SIZES)
}


def batches(writer: int) -> list[list[ActionMetric]]:
    """The same metrics, with the same ids, every time they are asked for."""
    result, serial = [], 0
    for batch, size in enumerate(BATCH_SIZES):
        metrics = []
        for _ in range(size):
            metrics.append(
                ActionMetric(
                    action_type="lod3",
                    user_id=f"writer-{writer}",
                    town_id="town-concurrency",
                    citizen_id=None,
                    tokens_in=serial,
                    tokens_out=batch,
                    model=batch_model(writer, batch),
                    latency_ms=float(serial % 97),
                    credits_charged=10,
                    timestamp=START + timedelta(seconds=serial * 12),  # 4 hours a writer
                    id=uuid.uuid5(NAMESPACE, f"{writer}/{serial}"),
                )
            )
            serial += 1
        result.append(metrics)
    return result


def write(url: str, writer: int, start: Barrier, reader_saw_progress: Event, report: Connection) -> None:
    """Emit this writer's batches; hold the last one back until the reader has seen a partial state."""
    try:
        work = batches(writer)
        with MetricsStore(url) as store:
            store.open()
            start.wait()
            for metrics in work[:-1]:
                store.emit_many(metrics)
            reader_saw_progress.wait()
            store.emit_many(work[-1])
        report.send(("ok", writer))
    except BaseException:
        report.send(("error", traceback.format_exc()))


def torn_batches(by_model: dict[str, int]) -> list[str]:
    return [
        f"{model}: {count} of {EXPECTED_SIZES.get(model)}"
        for model, count in by_model.items()
        if count != EXPECTED_SIZES.get(model)
    ]


def read(
    url: str, start: Barrier, reader_saw_progress: Event, writers_done: Event, report: Connection
) -> None:
    """Aggregate in a loop until the writers are done; report every torn batch it ever saw."""
    try:
        observations, partial, torn = 0, 0, []
        with MetricsStore(url) as store:
            store.open()
            start.wait()
            while True:
                finished = writers_done.is_set()  # read before the snapshot: the last one is complete
                aggregate = store.aggregate()
                observations += 1
                by_model = {model: stats.count for model, stats in aggregate.by_model.items()}
                torn.extend(torn_batches(by_model))
                if aggregate.count != sum(by_model.values()):
                    torn.append(f"total {aggregate.count} != sum of batches {sum(by_model.values())}")
                if 0 < aggregate.count < TOTAL:
                    partial += 1
                    reader_saw_progress.set()
                if finished:
                    break
        report.send(("ok", observations, partial, aggregate.count, torn))
    except BaseException:
        reader_saw_progress.set()  # let the writers finish, so the failure is reported, not a hang
        report.send(("error", traceback.format_exc()))


def receive(connection: Connection, who: str) -> Any:
    assert connection.poll(RESULT_TIMEOUT_S), f"{who} reported nothing within {RESULT_TIMEOUT_S}s"
    message = connection.recv()
    assert message[0] == "ok", f"{who} failed:\n{message[1]}"
    return message


def test_eight_writers_and_a_reader_lose_nothing_count_nothing_twice_and_tear_nothing(
    database_url: str,
) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(WRITERS + 1)
    reader_saw_progress, writers_done = context.Event(), context.Event()
    writer_pipes = [context.Pipe(duplex=False) for _ in range(WRITERS)]
    reader_pipe = context.Pipe(duplex=False)
    writers = [
        context.Process(target=write, args=(database_url, n, start, reader_saw_progress, sender))
        for n, (_, sender) in enumerate(writer_pipes)
    ]
    reader = context.Process(
        target=read, args=(database_url, start, reader_saw_progress, writers_done, reader_pipe[1])
    )
    processes = [*writers, reader]
    for process in processes:
        process.start()
    succeeded = False
    try:
        for n, (receiver, _) in enumerate(writer_pipes):
            receive(receiver, f"writer {n}")
        writers_done.set()
        _, observations, partial, last_count, torn = receive(reader_pipe[0], "reader")
        succeeded = True
    finally:
        for process in processes:
            if not succeeded:  # the others may wait for the one that failed: stop them all
                process.kill()
            process.join()

    print(f"reader: {observations} snapshots, {partial} partial")
    assert torn == [], f"the reader saw half-written batches: {torn[:10]}"
    assert partial >= 1  # guaranteed by the writers waiting for it: the reader did see work in flight
    assert observations >= 2
    assert last_count == TOTAL  # its last snapshot, taken after every writer returned, saw them all

    expected = {m.id: m for writer in range(WRITERS) for batch in batches(writer) for m in batch}
    with MetricsStore(database_url) as store:
        stored = store.query()
        aggregate = store.aggregate()
        exact = store.aggregate(exact=True)
    assert len(stored) == TOTAL == len(expected)
    assert Counter(metric.id for metric in stored) == Counter(expected.keys())  # every id, once
    assert {metric.id: metric for metric in stored} == expected  # and verbatim
    assert aggregate.count == TOTAL
    assert torn_batches({model: stats.count for model, stats in aggregate.by_model.items()}) == []
    assert set(aggregate.by_model) == set(EXPECTED_SIZES)
    assert aggregate.tokens_in == sum(range(PER_WRITER)) * WRITERS
    assert not aggregate.percentiles_exact  # the rollups answered, and agree with the raw rows
    assert_same_figures(aggregate, exact)
