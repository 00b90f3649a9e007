"""The day being filled holds its closed hours (issue 9): the day rows of every model and of each
action type, and their latency histograms, are added to as each hour of the day closes, as a month's
rows hold its closed days (0018), instead of being summed when the day closes.

`aggregate()` over all time then reads raw rows of the open hour only: an action type's today's
raw rows (~9k of lod3 late in the day at 10M actions over 90 days) were most of its time, and
everything's today's hour histograms (~10k rows) of its.

The upgrade re-opens the open day's closed hours rather than summing them here (an action type's
day histogram needs its raw rows binned): their hour rows, histograms and sketches go,
`hours_closed_until` goes back to `days_closed_until`, and the breakdowns stored for local buckets
ending after it are forgotten (an action arriving for a re-opened hour is no longer late). The next
batch written, or the build `db upgrade` runs after migrating, closes those hours again and fills the
day rows as it goes (with `--sql` the build is optional: any writer's next batch does it, and `db
current` reports the re-opened hours as a build unfinished until then); until then readers take
those hours from raw rows, exactly. The downgrade deletes the open day's day rows, which 0018 sums
when the day closes. No closed day changes either way.

Revision ID: 0019
Revises: 0018
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HOUR_ROWS = ("action_metrics_rollup", "action_metrics_rollup_detail", "action_metrics_latency_histogram")
"""The tables holding rows of grain 'hour' at 0019."""
HOUR_SKETCHES = ("town/hour", "model/hour")
"""The sketch levels of grain 'hour' at 0019 (`latency_sketches.SketchLevel.name`)."""


def _open_day() -> str:
    """The open day's start: every bucket from it on is open or in it (no day closed yet: all)."""
    beginning = "''" if op.get_context().dialect.name == "sqlite" else "'-infinity'"
    return f"(SELECT coalesce(days_closed_until, {beginning}) FROM action_metrics_rollup_state)"


def _lock_the_state() -> None:
    """Writers lock the state row (`SELECT ... FOR UPDATE`): one under way commits its batch first,
    and the next waits for this migration (SQLite's writer holds the database's write lock already).
    EXCLUSIVE mode conflicts with their row locks and lets plain reads through; as a statement, not a
    SELECT, it prints no result set in the `--sql` script `psql` runs."""
    if op.get_context().dialect.name != "sqlite":
        op.execute("LOCK TABLE action_metrics_rollup_state IN EXCLUSIVE MODE")


def upgrade() -> None:
    _lock_the_state()
    day = _open_day()
    for table in HOUR_ROWS:
        op.execute(f"DELETE FROM {table} WHERE grain = 'hour' AND start >= {day}")
    levels = ", ".join(f"'{level}'" for level in HOUR_SKETCHES)
    op.execute(f"DELETE FROM action_metrics_latency_sketch WHERE level IN ({levels}) AND start >= {day}")
    op.execute(f"DELETE FROM action_metrics_closed_buckets WHERE bucket_end > {day}")
    op.execute(
        "UPDATE action_metrics_rollup_state SET hours_closed_until = days_closed_until, "
        "closed_buckets_generation = closed_buckets_generation + 1"
    )


def downgrade() -> None:
    _lock_the_state()
    day = _open_day()
    # The day rows from the open day on: every model's and each action type's (the towns' and the
    # details' are of closed days only; the users' open day is in a table of its own).
    for table in ("action_metrics_rollup", "action_metrics_latency_histogram"):
        op.execute(f"DELETE FROM {table} WHERE grain = 'day' AND start >= {day}")
