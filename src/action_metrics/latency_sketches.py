"""The sketch levels: which buckets keep a latency sketch (`sketch.Sketch`), and how a batch of
binned latencies is added to them in the write's own transaction, as the rollups are.

A closing bucket's sketches are new rows; a late metric's are read, added to and written back, one
read-modify-write per sketch per batch (the rows locked with FOR UPDATE on PostgreSQL; a SQLite writer
already holds the database's write lock). Prices do not touch them; a prune keeps them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, cast

from sqlalchemy import ColumnElement, insert, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from action_metrics.dialects import Backend
from action_metrics.schema import latency_sketch
from action_metrics.sketch import Sketch


@dataclass(frozen=True)
class SketchLevel:
    """A grain and the column of the actions a sketch is kept per."""

    name: str
    grain: Literal["hour", "day", "month"]
    key: str
    finer: SketchLevel | None = None
    """The level a closing bucket's sketches are merged from (None: the raw rows)."""
    then: str | None = None
    """A second column the sketches are kept per (the action type of a town's): the stored key is
    'town/action' (an action type has no '/'; a town may)."""
    built_from: str = "sketches_from"
    """The `RollupState` field saying from when its closed buckets' sketches exist."""

    def key_of(self, columns: Any) -> ColumnElement[str]:
        """The stored key of a row of `columns` (the raw table's, or the scratch table's)."""
        if self.then is None:
            return cast(ColumnElement[str], columns[self.key])
        return cast(ColumnElement[str], columns[self.key] + KEY_SEPARATOR + columns[self.then])

    def stored_key(self, first: str, then: str) -> str:
        """`key_of` in Python: the stored key of a town and an action type (`then` set)."""
        return first + KEY_SEPARATOR + then


KEY_SEPARATOR: Final = "/"


TOWN_HOURLY: Final = SketchLevel("town/hour", "hour", "town_id")
"""The edge hours of a town's local day (added to or subtracted from a UTC day's)."""
TOWN_DAILY: Final = SketchLevel("town/day", "day", "town_id", finer=TOWN_HOURLY)
MODEL_HOURLY: Final = SketchLevel("model/hour", "hour", "model")
USER_DAILY: Final = SketchLevel("user/day", "day", "user_id", built_from="users_from")
"""From the raw rows (no finer level keeps the user)."""
USER_MONTHLY: Final = SketchLevel("user/month", "month", "user_id", finer=USER_DAILY, built_from="users_from")
TOWN_ACTION_DAILY: Final = SketchLevel(
    "town-action/day", "day", "town_id", then="action_type", built_from="town_actions_from"
)
"""A town's action types per day (the page's latency chart), from the raw rows: an hourly level per
town and action would be nearly as many rows as the actions (50 towns x 11 actions)."""
SKETCH_LEVELS: Final = (TOWN_HOURLY, MODEL_HOURLY, TOWN_DAILY, USER_DAILY, USER_MONTHLY, TOWN_ACTION_DAILY)


SketchRow = Sequence[Any]
"""A level's key, a bucket start, its distinct bins and how many latencies fell in each (two lists
as `Backend.int_list` aggregates them), and the latencies' sum: one bucket's sketch."""


def bucket_sketches(rows: Iterable[SketchRow], backend: Backend) -> dict[tuple[datetime, str], Sketch]:
    """The sketch of each row, by (start, key)."""
    return {
        (start, key): Sketch.of_distinct_bins(backend.ints_of(bins), backend.ints_of(counts), latency_sum)
        for key, start, bins, counts, latency_sum in rows
    }


def _row(level: SketchLevel, start: datetime, key: str, sketch: Sketch) -> dict[str, Any]:
    return {
        "level": level.name,
        "start": start,
        "key": key,
        "n": sketch.n,
        "latency_sum": sketch.latency_sum,
        "zero_count": sketch.zero_count,
        "bins": sketch.blob,
    }


def stored_sketch(row: Any) -> Sketch:
    return Sketch(int(row.n), float(row.latency_sum), int(row.zero_count), bytes(row.bins))


async def add(
    connection: AsyncConnection,
    backend: Backend,
    level: SketchLevel,
    rows: Iterable[SketchRow],
    *,
    new: bool,
) -> None:
    """Add binned latencies to the level's sketches: as new rows when `new` (a closing bucket has
    none), else to the rows already there."""
    await _store(connection, backend, level, bucket_sketches(rows, backend), new=new)


async def _store(
    connection: AsyncConnection,
    backend: Backend,
    level: SketchLevel,
    sketches: dict[tuple[datetime, str], Sketch],
    *,
    new: bool,
) -> None:
    """Write sketches per (start, key): as new rows when `new`, else added to the rows there."""
    if not sketches:
        return
    s = latency_sketch
    if new:
        await connection.execute(
            insert(s), [_row(level, start, key, sketch) for (start, key), sketch in sketches.items()]
        )
        return
    wanted = list(sketches)
    for chunk in (wanted[i : i + 1_000] for i in range(0, len(wanted), 1_000)):
        existing = (
            select(s.c.start, s.c.key, s.c.n, s.c.latency_sum, s.c.zero_count, s.c.bins)
            .where(s.c.level == level.name, tuple_(s.c.start, s.c.key).in_(chunk))
            .with_for_update()
        )
        for row in await connection.execute(existing):
            bucket = (row.start, row.key)
            sketches[bucket] = stored_sketch(row).added(sketches[bucket])
    upsert = backend.insert(s)
    upsert = upsert.on_conflict_do_update(
        index_elements=[s.c.level, s.c.start, s.c.key],
        set_={name: upsert.excluded[name] for name in ("n", "latency_sum", "zero_count", "bins")},
    )
    await connection.execute(
        upsert, [_row(level, start, key, sketch) for (start, key), sketch in sketches.items()]
    )


async def add_from_finer(
    connection: AsyncConnection,
    backend: Backend,
    level: SketchLevel,
    since: datetime,
    until: datetime,
    *,
    new: bool = True,
) -> None:
    """Add the finer level's sketches in [since, until) to `level`'s buckets holding them (a day's
    town sketches from its 24 hours', closed before it and kept up to date alike; a month's user
    sketches from its days, as each closes): as new rows when `new`, else to the rows there."""
    assert level.finer is not None
    s = latency_sketch
    finer = select(s.c.start, s.c.key, s.c.n, s.c.latency_sum, s.c.zero_count, s.c.bins).where(
        s.c.level == level.finer.name, s.c.start >= since, s.c.start < until
    )
    grouped: dict[tuple[datetime, str], list[Sketch]] = {}
    for row in await connection.execute(finer):
        start = row.start.replace(hour=0, minute=0, second=0, microsecond=0)
        if level.grain == "month":
            start = start.replace(day=1)
        grouped.setdefault((start, row.key), []).append(stored_sketch(row))
    merged = {bucket: Sketch.merged(parts) for bucket, parts in grouped.items()}
    await _store(connection, backend, level, merged, new=new)


def levels_of(grains: Sequence[str]) -> tuple[SketchLevel, ...]:
    return tuple(level for level in SKETCH_LEVELS if level.grain in grains)
