"""A process SIGKILLed while it ingests leaves whole batches only, and a re-run completes the input.

The ingesting process reports each committed batch through a pipe. It is killed either right after
some report, wherever it then is (`anywhere`), or, deterministically, inside a transaction that
has written a whole batch and is about to commit it (`before_commit`): the worst moment.
"""

from __future__ import annotations

import multiprocessing
import signal
import sqlite3
import traceback
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import count
from multiprocessing.connection import Connection
from typing import Any

import pytest
from sqlalchemy import Engine, event, make_url

from action_metrics import ActionMetric, MetricsStore

from reference import assert_same_figures

BATCHES = 20
BATCH_SIZE = 500
KILL_AFTER = 6  # batches reported committed before the kill
START = datetime(2026, 11, 25, tzinfo=UTC)
NAMESPACE = uuid.UUID("0c7f5b2a-9d41-4e3b-8a6c-51e2f0d9b3a4")
REPORT_TIMEOUT_S = 300  # only so that a hung process fails the test instead of hanging it


def batch_model(batch: int) -> str:
    return f"crash-batch-{batch:02d}"


def batches() -> list[list[ActionMetric]]:
    """The input: the same metrics with the same ids on every run."""
    return [
        [
            ActionMetric(
                action_type="lod4",
                user_id="crash-user",
                town_id="crash-town",
                citizen_id=None,
                tokens_in=batch * BATCH_SIZE + row,
                tokens_out=row,
                model=batch_model(batch),
                latency_ms=row / 7,
                credits_charged=100,
                timestamp=START + timedelta(seconds=(batch * BATCH_SIZE + row) * 20),  # 2 days
                metadata={"batch": batch, "row": row},
                id=uuid.uuid5(NAMESPACE, f"{batch}/{row}"),
            )
            for row in range(BATCH_SIZE)
        ]
        for batch in range(BATCHES)
    ]


def ingest(url: str, reports: Connection, hold_commit: int | None) -> None:
    """Emit every batch, reporting each commit; with `hold_commit`, stop forever just before it."""
    try:
        with MetricsStore(url) as store:
            store.open()  # its own schema-check transaction is not one of the counted commits
            if hold_commit is not None:
                commits = count()

                @event.listens_for(Engine, "commit")
                def hold(_: Any) -> None:
                    if next(commits) == hold_commit:
                        reports.send(("holding", hold_commit))
                        reports.recv()  # never answered: the process is killed here

            for batch, metrics in enumerate(batches()):
                store.emit_many(metrics)
                reports.send(("committed", batch))
    except BaseException:
        reports.send(("error", traceback.format_exc()))


def stored_batches(store: MetricsStore) -> tuple[Counter[str], int]:
    aggregate = store.aggregate()
    return Counter({model: stats.count for model, stats in aggregate.by_model.items()}), aggregate.count


def integrity(url: str) -> str:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return "ok"  # PostgreSQL's WAL replay is the server's business; the store opening is our check
    with sqlite3.connect(parsed.database or "") as connection:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])


@pytest.mark.parametrize("kill_point", ["anywhere", "before_commit"])
def test_a_killed_ingest_keeps_whole_batches_and_a_rerun_completes_it(
    database_url: str, kill_point: str
) -> None:
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    hold_commit = KILL_AFTER if kill_point == "before_commit" else None
    process = context.Process(target=ingest, args=(database_url, child_end, hold_commit))
    # Opened first: opening a SQLite store takes the write lock for a moment, which the held
    # transaction would keep from it; reading needs no lock.
    observer = MetricsStore(database_url).open()
    process.start()
    reported: list[int] = []
    try:
        while True:
            assert parent_end.poll(REPORT_TIMEOUT_S), "the ingesting process went silent"
            kind, detail = parent_end.recv()
            assert kind != "error", detail
            if kind == "holding":
                # A whole batch is written and not committed: nobody else may see any of it.
                assert stored_batches(observer)[1] == len(reported) * BATCH_SIZE
                break
            reported.append(detail)
            if kill_point == "anywhere" and len(reported) == KILL_AFTER:
                break
    finally:
        process.kill()
        process.join()
        observer.close()
    assert process.exitcode == -signal.SIGKILL
    assert reported == list(range(KILL_AFTER))

    # The database opens cleanly and holds whole batches, a prefix of the input.
    assert integrity(database_url) == "ok"
    with MetricsStore(database_url) as store:
        sizes, total = stored_batches(store)
    assert set(sizes.values()) <= {BATCH_SIZE}, f"a torn batch: {sizes}"
    survived = len(sizes)
    assert set(sizes) == {batch_model(batch) for batch in range(survived)}
    assert survived >= len(reported)  # everything reported committed is durable
    if kill_point == "before_commit":
        assert survived == len(reported)  # the held batch is rolled back, not half-kept
    assert total == survived * BATCH_SIZE

    # The same input again, from the start: the stored ids are skipped, the rest is added, once.
    expected = {metric.id: metric for batch in batches() for metric in batch}
    with MetricsStore(database_url) as store:
        for metrics in batches():
            store.emit_many(metrics)
        stored = store.query()
        sizes, total = stored_batches(store)
        rollups, exact = store.aggregate(), store.aggregate(exact=True)
    assert len(stored) == BATCHES * BATCH_SIZE
    assert {metric.id: metric for metric in stored} == expected
    assert sizes == Counter({batch_model(batch): BATCH_SIZE for batch in range(BATCHES)})
    assert total == BATCHES * BATCH_SIZE
    assert_same_figures(rollups, exact)  # the rollups committed with the rows, batch by batch
