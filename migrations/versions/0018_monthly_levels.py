"""Monthly levels of every model and of each action type (issue 9): rows of grain 'month' in
action_metrics_rollup and action_metrics_latency_histogram, summed from the day rows of the same
dimensions, as the user rollup's months are from its days.

`aggregate()` over all time, or any window holding whole months, reads a month's rows instead of its
days': the day histograms of everything at 10M actions over 90 days are ~105k rows (90 days x 5
models x their bins), ~70 ms of SQLite's ~130 ms for everything over all time; the months' are ~3.5k.
A month's rows hold its closed days (the month being filled grows as each day closes); its sums are
split where a model or credit price begins inside the month, as the day rows are, and priced when
read; histograms do not depend on prices.

The upgrade sums the day rows already there (pruned days' too: the rollups keep them), in one
statement per table; the downgrade deletes the month rows. No raw row is read either way.

Revision ID: 0018
Revises: 0017
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SUMS = (
    "count",
    "tokens_in",
    "tokens_out",
    "credits_charged",
    "latency_ms_sum",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "error_count",
    "credited_count",
    "tokens_in_per_credit",
    "tokens_out_per_credit",
    "cache_read_tokens_per_credit",
    "cache_write_tokens_per_credit",
)
"""The rollup's summed columns at 0018."""

# The day rows of every model (town and action '') and of each action type (town ''); the towns'
# day rows (town set) have no month level.
DAY_ROWS = "days.grain = 'day' AND days.town_id = ''"


def _month_of(start: str) -> str:
    """The start of the UTC month holding `start` (SQLite keeps UTC text 'YYYY-MM-DD HH:MM:SS.ffffff')."""
    if op.get_context().dialect.name == "sqlite":
        return f"substr({start}, 1, 8) || '01 00:00:00.000000'"
    return f"date_trunc('month', {start}, 'UTC')"


def _greatest(first: str, *others: str) -> str:
    """The largest, ignoring NULLs among `others` (SQLite's max() is NULL when any argument is)."""
    if op.get_context().dialect.name == "sqlite":
        return f"max({first}, {', '.join(f'coalesce({other}, {first})' for other in others)})"
    return f"greatest({first}, {', '.join(others)})"


def upgrade() -> None:
    sqlite = op.get_context().dialect.name == "sqlite"
    if not sqlite:
        # Writers lock the state row: one under way commits its days before these sums read them.
        op.execute("SELECT id FROM action_metrics_rollup_state FOR UPDATE")
    # SQLite's SUM fails past 2**63; TOTAL is a double, stored back as an INTEGER whenever it is one.
    total = "TOTAL" if sqlite else "SUM"
    columns = ", ".join(f'"{name}"' for name in SUMS)
    day_sums = ", ".join(f'days."{name}"' for name in SUMS)
    month_sums = ", ".join(f'{total}(months."{name}")' for name in SUMS)
    # A month's rows start where the prices in force at their days' starts began, if inside it.
    model_price_start = (
        "(SELECT max(p.effective_from) FROM model_prices p "
        "WHERE p.model = days.model AND p.effective_from <= days.start)"
    )
    credit_price_start = (
        "(SELECT max(c.effective_from) FROM credit_prices c WHERE c.effective_from <= days.start)"
    )
    start = _greatest(_month_of("days.start"), model_price_start, credit_price_start)
    op.execute(
        f"INSERT INTO action_metrics_rollup (grain, town_id, action_type, start, model, {columns}) "
        f"SELECT 'month', months.town_id, months.action_type, months.start, months.model, {month_sums} "
        f"FROM (SELECT days.town_id, days.action_type, {start} AS start, days.model, {day_sums} "
        f"FROM action_metrics_rollup days WHERE {DAY_ROWS}) months "
        "GROUP BY months.town_id, months.action_type, months.start, months.model"
    )
    month = _month_of("days.start")
    op.execute(
        "INSERT INTO action_metrics_latency_histogram "
        '(grain, town_id, action_type, start, model, bin, "count") '
        f"SELECT 'month', days.town_id, days.action_type, {month}, days.model, days.bin, "
        f'{total}(days."count") '
        f"FROM action_metrics_latency_histogram days WHERE {DAY_ROWS} "
        f"GROUP BY days.town_id, days.action_type, {month}, days.model, days.bin"
    )
    if not sqlite:
        # The planner's statistics on (grain, town, action) must know the new grain's rows.
        op.execute("ANALYZE action_metrics_rollup, action_metrics_latency_histogram")


def downgrade() -> None:
    op.execute("DELETE FROM action_metrics_rollup WHERE grain = 'month'")
    op.execute("DELETE FROM action_metrics_latency_histogram WHERE grain = 'month'")
