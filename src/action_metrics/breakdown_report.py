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


_UNPRICED_LEAVE_OUT: Final = frozenset({"total_cost_usd", "total_profit_usd", "gross_margin"})
"""The figures an unpriced action makes wrong: it counts no cost (never a silent $0)."""

UNPRICED_NOTE: Final = (
    "unpriced_count: actions of models with no price at their time, which count no cost; n/a: none "
    "of the group's actions is priced; *: the figure leaves the unpriced actions' cost out. Price them "
    "with `action-metrics prices sync`, or `action-metrics prices set` for a model the catalogue lacks."
)
"""The table's caption when a group holds unpriced actions."""


def render_table(rows: Sequence[BreakdownRow], title: str) -> Table:
    """The groups' figures; when any group holds actions of unpriced models, an `unpriced_count`
    column, and their cost, profit and margin shown n/a (none priced) or marked * (some), as the
    caption says: JSON and CSV carry `unpriced_count` as it is."""
    table = Table(title=title, title_justify="left")
    keys = list(rows[0].to_dict()) if rows else []
    labels = [key for key in keys if key not in rows[0].figures.to_dict()] if rows else []
    unpriced = any(row.figures.unpriced_count for row in rows)
    shown = [*_SHOWN[:1], "unpriced_count", *_SHOWN[1:]] if unpriced else list(_SHOWN)
    for label in [*labels, *shown]:
        table.add_column(label, justify="left" if label in labels else "right")
    for row in rows:
        values = row.to_dict()
        table.add_row(
            *(str(values[label]) for label in labels), *(_priced_cell(key, values[key], row) for key in shown)
        )
    if unpriced:
        table.caption = UNPRICED_NOTE
        table.caption_justify = "left"
    return table


def _priced_cell(key: str, value: Any, row: BreakdownRow) -> str:
    """`_cell`, but n/a for a figure that needs a cost where no action of the group is priced, and
    marked * where some are not."""
    figures = row.figures
    if key not in _UNPRICED_LEAVE_OUT or not figures.unpriced_count:
        return _cell(key, value)
    if figures.unpriced_count >= figures.count:
        return "n/a"
    return f"{_cell(key, value)}*"


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
