"""Closed buckets kept: a breakdown's rows for each local day, week or month whose hours the rollups
have closed, stored by the first reader that computes them (`action_metrics_closed_buckets`).

A local day is not a UTC day, so the rollups answer "by town and Berlin day over 90 days" from some
85,000 rows summed per model and price period, every time. Its closed days do not change unless a
write changes them, so the first breakdown stores each closed bucket's rows and the next reads one
row per bucket, computing only the buckets still open or cut by the window.

How the stored rows stay equal to what the rollups would answer (the rule every write already keeps
for the rollups, under the same lock on the state row):

- A bucket is stored only when every hour of it is closed (its end is at or before
  `hours_closed_until`), so the only writes that can change it are those that change closed hours:
  an action arriving late, a price (money is priced at read), a prune. Each of those deletes the
  stored rows of every bucket ending after the earliest moment it touches (all of them, for a
  price), and adds one to `closed_buckets_generation`, in its own transaction.
- A reader computes a bucket in its snapshot and stores it afterwards, in a write transaction that
  first locks the state row and checks that the generation is still the one its snapshot saw: a
  write that committed after the snapshot and changed closed hours moved it, and nothing is stored.
  A write that committed before is in the snapshot.
- Stored rows are read in the same snapshot as everything else: a write that deleted them committed
  its own rows in the same transaction.

A role that may only read (or a standby) cannot store, and a reader does not wait more than
`LOCK_WAIT_MS` for a busy writer's lock: the breakdown is computed as before, nothing stored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Final

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from action_metrics.aggregate import Aggregate
from action_metrics.breakdown import BreakdownRequest, BreakdownRow
from action_metrics.dialects import Backend
from action_metrics.query import MetricFilter
from action_metrics.rollup import STATE_ID, RollupState
from action_metrics.schema import closed_buckets, credit_prices, model_prices, rollup_state

logger = logging.getLogger(__name__)

FORMAT: Final = 1
"""Part of every question: a change to what a stored row holds changes it, and old rows are not read."""

LOCK_WAIT_MS: Final = 200
"""How long a reader waits for the write lock (SQLite's) or the state row (PostgreSQL's) to store:
a writer holds them for its batch's transaction, and a dashboard should not wait for a busy ingest.
Not stored then; the next call tries again."""

STORED_BUCKETS: Final = frozenset({"day", "week", "month"})
"""Hours are not stored: a week of them is answered from the hourly rows within its target anyway,
and the newest closed hour would be stored only to be deleted by the next late action."""

_FIGURES: Final = tuple(field.name for field in fields(Aggregate))[:-1]
"""Every field but the last, `by_model` (empty in a breakdown's rows): stored in this order."""
assert fields(Aggregate)[-1].name == "by_model"


def question(metric_filter: MetricFilter, request: BreakdownRequest) -> str:
    """What identifies a breakdown's rows per bucket: its dimensions, bucket, zone and the filters
    it may take (the sketch levels read a town and a model filter; `sketch_reads.shape_of`). The
    window and the sort only choose and order buckets."""
    return json.dumps(
        [
            FORMAT,
            list(request.by),
            request.bucket,
            request.zone.key,
            metric_filter.town_id,
            metric_filter.model,
        ]
    )


@dataclass(frozen=True)
class Buckets:
    """The buckets of one breakdown that may be stored: index -> (start, end), UTC."""

    question: str
    closed: dict[int, tuple[datetime, datetime]]

    @classmethod
    def of(
        cls,
        metric_filter: MetricFilter,
        request: BreakdownRequest,
        starts: Sequence[datetime],
        windows: Sequence[tuple[datetime, datetime]],
        state: RollupState,
    ) -> Buckets | None:
        """The buckets the window holds whole and the rollups have closed; None when the breakdown's
        rows are not stored at all: hours, or a zone without a name."""
        closed_until = state.hours_closed_until
        if request.bucket not in STORED_BUCKETS or request.zone.key is None:
            return None
        closed = {
            index: (since, until)
            for index, (since, until) in enumerate(windows)
            if closed_until is not None
            and since == starts[index]
            and until == starts[index + 1]
            and until <= closed_until
        }
        return cls(question(metric_filter, request), closed)


_GENERATION: Final = select(rollup_state.c.closed_buckets_generation).where(rollup_state.c.id == STATE_ID)


async def generation(connection: AsyncConnection) -> int:
    """The state row's count of writes that changed closed buckets, as this snapshot sees it."""
    return int((await connection.execute(_GENERATION)).scalar_one())


async def read(
    connection: AsyncConnection, buckets: Buckets, request: BreakdownRequest
) -> dict[int, list[BreakdownRow]]:
    """The stored rows of `buckets.closed`, by bucket index (an empty list: a bucket with no rows).
    A stored bucket must end where this one does (a zone's rules may change with a tzdata update)."""
    if not buckets.closed:
        return {}
    index_of = {bounds: index for index, bounds in buckets.closed.items()}
    c = closed_buckets.c
    statement = select(c.bucket_start, c.bucket_end, c.rows).where(
        c.question == buckets.question,
        c.bucket_start >= min(since for since, _ in index_of),
        c.bucket_start <= max(since for since, _ in index_of),
    )
    found: dict[int, list[BreakdownRow]] = {}
    for start, end, text in await connection.execute(statement):
        index = index_of.get((start, end))
        if index is not None:
            found[index] = decode(text, request, start)
    return found


def encode(rows: Sequence[BreakdownRow]) -> str:
    """A bucket's rows: [[the dimensions' values], [the figures but `by_model`]] each."""
    return json.dumps(
        [[list(row.keys.values()), [getattr(row.figures, name) for name in _FIGURES]] for row in rows]
    )


def decode(text: str, request: BreakdownRequest, start: datetime) -> list[BreakdownRow]:
    local = start.astimezone(request.zone)
    by = request.by
    return [
        BreakdownRow(dict(zip(by, keys, strict=True)), local, Aggregate(*figures))
        for keys, figures in json.loads(text)
    ]


def ordered(rows: list[BreakdownRow], request: BreakdownRequest) -> list[BreakdownRow]:
    """`rows` in the order `breakdown`'s statements give, cut to `top`: by the sort key (no value
    last, either way), then by the dimensions but the model, the bucket and the model."""
    sort, grouped = request.sort, request.grouped
    sign = -1 if request.descending else 1
    model = ("model",) if "model" in request.by else ()

    def key(row: BreakdownRow) -> tuple[Any, ...]:
        figures, keys = row.figures, row.keys
        found = figures.tokens_in + figures.tokens_out if sort == "total_tokens" else getattr(figures, sort)
        ties = (*(keys[name] for name in grouped), row.bucket_start, *(keys[name] for name in model))
        return (1, 0, *ties) if found is None else (0, sign * found, *ties)

    rows.sort(key=key)
    return rows if request.top is None else rows[: request.top]


def by_bucket(rows: Sequence[BreakdownRow], buckets: Buckets) -> dict[int, list[BreakdownRow]]:
    """Computed rows of the closed buckets, by bucket index (every closed bucket, empty or not)."""
    index_of = {since: index for index, (since, _) in buckets.closed.items()}
    grouped: dict[int, list[BreakdownRow]] = {index: [] for index in buckets.closed}
    for row in rows:
        assert row.bucket_start is not None
        index = index_of.get(row.bucket_start)
        if index is not None:
            grouped[index].append(row)
    return grouped


async def store(
    connection: AsyncConnection,
    backend: Backend,
    buckets: Buckets,
    rows: Mapping[int, Sequence[BreakdownRow]],
    seen: int,
) -> bool:
    """Store the rows of closed buckets computed in a snapshot that saw generation `seen`, in a write
    transaction; nothing if a write changed closed buckets since. Whether they were stored."""
    if int((await connection.execute(_GENERATION.with_for_update())).scalar_one()) != seen:
        return False
    values = [
        {
            "question": buckets.question,
            "bucket_start": buckets.closed[index][0],
            "bucket_end": buckets.closed[index][1],
            "rows": encode(bucket_rows),
        }
        for index, bucket_rows in rows.items()
    ]
    # Another reader may have stored a bucket since: the same rows (or, after a tzdata update
    # moved a zone's midnight, a bucket ending elsewhere), replaced.
    insert = backend.insert(closed_buckets)
    insert = insert.on_conflict_do_update(
        index_elements=["question", "bucket_start"],
        set_={"bucket_end": insert.excluded.bucket_end, "rows": insert.excluded.rows},
    )
    await connection.execute(insert, values)
    return True


async def forget(
    connection: AsyncConnection,
    *,
    ending_after: datetime | None = None,
    starting_before: datetime | None = None,
) -> None:
    """A write in this transaction changes closed buckets: delete the stored rows of those ending
    after `ending_after` (an action arriving late) or starting before `starting_before` (a prune),
    or all of them (neither: a price), and count the change. The caller holds the state row's lock."""
    c = closed_buckets.c
    statement = delete(closed_buckets)
    if ending_after is not None:
        statement = statement.where(c.bucket_end > ending_after)
    if starting_before is not None:
        statement = statement.where(c.bucket_start < starting_before)
    await connection.execute(statement)
    await connection.execute(
        update(rollup_state)
        .where(rollup_state.c.id == STATE_ID)
        .values(closed_buckets_generation=rollup_state.c.closed_buckets_generation + 1)
    )


async def prices(connection: AsyncConnection) -> tuple[tuple[Any, ...], ...]:
    """Every model and credit price as stored (a few hundred rows), to tell whether a price write
    changed any: `prices sync` run by cron rewrites the same catalogue prices each time."""
    found: list[tuple[Any, ...]] = []
    for table, order in ((model_prices, ("model", "effective_from")), (credit_prices, ("effective_from",))):
        columns = [column for column in table.c if column.name != "id"]  # every price column, new ones too
        statement = select(*columns).order_by(*(table.c[name] for name in order))
        found += [(table.name,), *(tuple(row) for row in await connection.execute(statement))]
    return tuple(found)


async def forget_if_repriced(connection: AsyncConnection, before: tuple[tuple[Any, ...], ...]) -> None:
    """After a price write in this transaction: money is priced at read, so any closed bucket may
    have changed if any price did; forget them all then (see `forget`)."""
    if await prices(connection) != before:
        await forget(connection)


def refused(error: Exception) -> None:
    """A reader that may not write (a role without INSERT, a standby, a read-only file) or must not
    wait for the write lock computes, and stores nothing."""
    logger.info("closed buckets not stored: %s", error)


__all__ = [
    "FORMAT",
    "STORED_BUCKETS",
    "Buckets",
    "by_bucket",
    "decode",
    "encode",
    "forget",
    "generation",
    "ordered",
    "question",
    "read",
    "refused",
    "store",
]
