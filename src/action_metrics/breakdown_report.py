"""What `action-metrics report --by ... --bucket ...` prints: a Rich table, JSON or CSV of a breakdown,
and the checks a cron job alerts on (a gross margin floor, a daily cost ceiling, per town if asked).
"""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from typing import IO, Any, Final

from rich.table import Table

from action_metrics.breakdown import BreakdownRow
from action_metrics.store import AsyncMetricsStore

DIMENSION_OPTIONS: Final = {
    "user": "user_id",
    "town": "town_id",
    "citizen": "citizen_id",
    "action": "action_type",
    "model": "model",
}
"""`--by` words and the dimensions they name."""

_SHOWN: Final = (
    "count",
    "total_tokens",
    "total_cost_usd",
    "total_revenue_usd",
    "total_profit_usd",
    "gross_margin",
    "error_count",
    "p95_latency_ms",
)
"""The table's figures (JSON and CSV hold every one)."""


def render_table(rows: Sequence[BreakdownRow], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    keys = list(rows[0].to_dict()) if rows else []
    labels = [key for key in keys if key not in rows[0].figures.to_dict()] if rows else []
    for label in [*labels, *_SHOWN]:
        table.add_column(label, justify="left" if label in labels else "right")
    for row in rows:
        values = row.to_dict()
        table.add_row(*(str(values[label]) for label in labels), *(_cell(key, values[key]) for key in _SHOWN))
    return table


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_usd"):
        return f"${value:,.4f}"
    if key == "gross_margin":
        return f"{value:.1%}"
    if key.endswith("_ms"):
        return f"{value:,.1f} ms"
    return f"{value:,}"


async def write_csv(rows: AsyncIterable[BreakdownRow], out: IO[str]) -> None:
    """One header row, then a row per group as it comes: numbers unformatted, times ISO 8601 with
    their offsets, so a spreadsheet opens it as is."""
    writer: Any = None
    async for row in rows:
        values = row.to_dict()
        if writer is None:
            writer = csv.DictWriter(out, fieldnames=list(values), lineterminator="\n")
            writer.writeheader()
        writer.writerow({key: "" if value is None else value for key, value in values.items()})


async def write_json(rows: AsyncIterable[BreakdownRow], out: IO[str]) -> None:
    """A JSON array written row by row."""
    out.write("[")
    first = True
    async for row in rows:
        out.write("\n  " if first else ",\n  ")
        out.write(json.dumps(row.to_dict()))
        first = False
    out.write("\n]\n")


@dataclass(frozen=True, slots=True)
class Offender:
    """A group that broke a limit: its label, the figure and the limit."""

    check: str
    group: str
    value: float | None
    limit: float

    def describe(self) -> str:
        shown = "none" if self.value is None else f"{self.value:.4g}"
        return f"{self.check} ({self.limit:g}): {self.group} at {shown}"


async def limit_offenders(
    store: AsyncMetricsStore,
    *,
    per_town: bool,
    tz: str | None,
    min_gross_margin: float | None,
    max_cost_usd_per_day: float | None,
    **filters: Any,
) -> list[Offender]:
    """The selection (or each town) whose gross margin is below the floor, and each day (in the
    reader's zone) whose cost is above the ceiling."""
    by = ("town_id",) if per_town else ()
    offenders: list[Offender] = []
    if min_gross_margin is not None:
        for row in await store.breakdown(by, tz=tz, **filters):
            margin = row.figures.gross_margin
            if margin is None or margin < min_gross_margin:
                group = row.keys.get("town_id", "all towns")
                offenders.append(Offender("min gross margin", group, margin, min_gross_margin))
    if max_cost_usd_per_day is not None:
        for row in await store.breakdown(by, bucket="day", tz=tz, **filters):
            if row.figures.total_cost_usd > max_cost_usd_per_day:
                assert row.bucket_start is not None
                day = row.bucket_start.date().isoformat()
                group = f"{row.keys['town_id']} on {day}" if per_town else day
                offenders.append(
                    Offender("max cost usd per day", group, row.figures.total_cost_usd, max_cost_usd_per_day)
                )
    return offenders
