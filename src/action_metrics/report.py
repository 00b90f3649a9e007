"""What a person reads: a report of one selection, the seed's dashboard, and the SLO and ethics checks.

Everything here reads through the public store API (`aggregate()`, `audit_charges()`), so a report
shows exactly what a library user would compute, and renders it with Rich or as JSON.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from action_metrics.aggregate import Aggregate
from action_metrics.breakdown import TZ_VARIABLE, bucket_floor, reader_zone
from action_metrics.breakdown_report import Offender, limit_offenders
from action_metrics.errors import InvalidFilter
from action_metrics.pricing import ACTION_CREDITS, BEGINNING_OF_TIME, ActionType, ModelPrice
from action_metrics.store import AsyncMetricsStore
from action_metrics.validation import as_utc

if TYPE_CHECKING:
    from action_metrics.catalogue import PriceSync

DEFAULT_LOD3_P95_BUDGET_MS: Final = 300.0
"""LOD3 is a template manifest (no LLM call): its p95 must stay interactive."""

FORCE_PREMIUM_CREDITS: Final = ACTION_CREDITS[ActionType.FORCE]

CHECKS_FAILED_EXIT_CODE: Final = 3
"""Exit code of `report --check` and `demo` when an SLO or ethics check fails (1 is an error)."""

MAX_LOOKBACK: Final = timedelta(days=36_600)
_DURATION: Final = re.compile(r"([0-9]{1,9})([smhdw])")
_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


# --- which metrics ----------------------------------------------------------------------------


def parse_since(text: str, now: datetime | None = None, *, field: str = "since") -> datetime:
    """`30m`, `24h`, `7d`, `2w` (a duration back from now) or an ISO 8601 date or time (naive = local).

    Raises `InvalidFilter` naming `field` (`since`, or `until` for the end of a window), with a message
    meant for the person who typed it.
    """
    now = datetime.now(UTC) if now is None else now
    text = text.strip()
    duration = _DURATION.fullmatch(text)
    if duration:
        amount, unit = int(duration[1]), duration[2]
        if amount == 0:
            problem = "is an empty window" if field == "since" else "is now: leave it out to read up to now"
            raise InvalidFilter(field, f"{text!r} {problem}; use a positive duration such as 24h")
        try:
            window = timedelta(**{_UNITS[unit]: amount})
        except OverflowError:
            window = MAX_LOOKBACK + timedelta(days=1)
        if window > MAX_LOOKBACK:
            raise InvalidFilter(field, f"{text!r} reaches back more than {MAX_LOOKBACK.days} days")
        return now - window
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidFilter(
            field,
            f"expected a duration such as 30m, 24h, 7d or 2w, or an ISO date such as 2025-12-01, "
            f"got {text!r}",
        ) from None
    return as_utc(field, moment, InvalidFilter)


@dataclass(frozen=True, slots=True)
class Selection:
    """The filters of one report; None means no filter on that field.

    A few of `MetricFilter`'s fields, on purpose: the ones `report` offers and `--json` shows.
    """

    town_id: str | None = None
    action_type: str | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    async def aggregate(self, store: AsyncMetricsStore) -> Aggregate:
        return await store.aggregate(**self.filters())

    def filters(self) -> dict[str, Any]:
        """The filters as `aggregate()` and `breakdown()` take them."""
        return {
            "town_id": self.town_id,
            "action_type": self.action_type,
            "model": self.model,
            "since": self.since,
            "until": self.until,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "town_id": self.town_id,
            "action_type": self.action_type,
            "model": self.model,
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
        }

    def describe(self) -> str:
        parts = [
            f"town {self.town_id}" if self.town_id is not None else "all towns",
            f"action {self.action_type}" if self.action_type is not None else "all actions",
            f"model {self.model}" if self.model is not None else "all models",
            self._window(),
        ]
        return ", ".join(parts)

    def _window(self) -> str:
        if self.until is None:
            return f"since {_moment(self.since)}" if self.since is not None else "all time"
        start = f"from {_moment(self.since)} " if self.since is not None else ""
        return f"{start}until {_moment(self.until)}"


# --- checks -----------------------------------------------------------------------------------


class CheckStatus(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NO_DATA = "no data"
    """Nothing to check in the selection: reported, but not a failure."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One SLO or ethics check: what was checked, the verdict, and the figures behind it."""

    name: str
    kind: str
    status: CheckStatus
    detail: str

    @property
    def failed(self) -> bool:
        return self.status is CheckStatus.FAIL

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "status": str(self.status), "detail": self.detail}


async def check_lod3_latency(
    store: AsyncMetricsStore,
    *,
    town_id: str | None,
    since: datetime | None,
    budget_ms: float,
    until: datetime | None = None,
) -> CheckResult:
    """SLO: the p95 latency of LOD3 queries stays within `budget_ms`."""
    name = f"LOD3 p95 latency within {budget_ms:g} ms"
    lod3 = await store.aggregate(town_id=town_id, since=since, until=until, action_type=ActionType.LOD3)
    if lod3.p95_latency_ms is None:
        return CheckResult(name, "slo", CheckStatus.NO_DATA, "no LOD3 queries in the selection")
    verdict = CheckStatus.PASS if lod3.p95_latency_ms <= budget_ms else CheckStatus.FAIL
    relation = "<=" if verdict is CheckStatus.PASS else ">"
    detail = f"p95 {lod3.p95_latency_ms:.1f} ms {relation} {budget_ms:g} ms over {lod3.count:,} queries"
    return CheckResult(name, "slo", verdict, detail)


async def check_force_premium(
    store: AsyncMetricsStore, *, town_id: str | None, since: datetime | None, until: datetime | None = None
) -> CheckResult:
    """Ethics: every force action is charged its premium, no less and no more.

    A force action that failed (its `error` is set) and was charged nothing is correct, not a breach.
    """
    name = f"force actions charged the {FORCE_PREMIUM_CREDITS}-credit premium"
    audit = await store.audit_charges(
        FORCE_PREMIUM_CREDITS, town_id=town_id, since=since, until=until, action_type=ActionType.FORCE
    )
    if not audit.count:
        return CheckResult(name, "ethics", CheckStatus.NO_DATA, "no force actions in the selection")
    figures = f"{audit.exact:,} of {audit.charged:,} charged {FORCE_PREMIUM_CREDITS}"
    if audit.failed:
        figures += f"; {audit.failed:,} failed and charged nothing"
    if audit.under or audit.over:
        return CheckResult(
            name,
            "ethics",
            CheckStatus.FAIL,
            f"{figures}; {audit.under:,} undercharged, {audit.over:,} overcharged",
        )
    return CheckResult(name, "ethics", CheckStatus.PASS, figures)


async def run_checks(
    store: AsyncMetricsStore,
    *,
    town_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    lod3_p95_budget_ms: float = DEFAULT_LOD3_P95_BUDGET_MS,
) -> tuple[CheckResult, ...]:
    """The seed's SLO and ethics checks over one town (or all) from a moment (or ever) to another
    (or now)."""
    return (
        await check_lod3_latency(
            store, town_id=town_id, since=since, until=until, budget_ms=lod3_p95_budget_ms
        ),
        await check_force_premium(store, town_id=town_id, since=since, until=until),
    )


def any_failed(checks: Sequence[CheckResult]) -> bool:
    return any(check.failed for check in checks)


@dataclass(frozen=True, slots=True)
class LimitCheck:
    """One limit of `report --check` (a gross margin floor, a daily cost ceiling): its verdict, and
    each group over it."""

    result: CheckResult
    offenders: tuple[Offender, ...]


_SHOWN_OFFENDERS: Final = 5


async def check_limits(
    store: AsyncMetricsStore,
    selection: Selection,
    *,
    per_town: bool,
    tz: str | None,
    min_gross_margin: float | None,
    max_cost_usd_per_day: float | None,
) -> tuple[LimitCheck, ...]:
    """The limits given, over the selection (or each of its towns), each a check of its own."""
    groups = "every town" if per_town else "the selection"
    asked: list[tuple[str, float | None, float | None]] = []
    if min_gross_margin is not None:
        asked.append((f"gross margin at least {min_gross_margin:g}", min_gross_margin, None))
    if max_cost_usd_per_day is not None:
        asked.append((f"cost at most {max_cost_usd_per_day:g} USD a day", None, max_cost_usd_per_day))
    checks = []
    for name, floor, ceiling in asked:
        offenders = await limit_offenders(
            store,
            per_town=per_town,
            tz=tz,
            min_gross_margin=floor,
            max_cost_usd_per_day=ceiling,
            **selection.filters(),
        )
        if offenders:
            shown = [f"{o.group} at {'none' if o.value is None else f'{o.value:.4g}'}" for o in offenders]
            more = len(shown) - _SHOWN_OFFENDERS
            detail = "; ".join(shown[:_SHOWN_OFFENDERS]) + (f"; and {more} more" if more > 0 else "")
            verdict = CheckStatus.FAIL
        else:
            detail, verdict = "no group over the limit", CheckStatus.PASS
        checks.append(
            LimitCheck(CheckResult(f"{name} ({groups})", "limit", verdict, detail), tuple(offenders))
        )
    return tuple(checks)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Every check `report --check` ran, and the groups over a limit (named one per line)."""

    checks: tuple[CheckResult, ...]
    offenders: tuple[Offender, ...] = ()


async def run_report_checks(
    store: AsyncMetricsStore,
    selection: Selection,
    *,
    per_town: bool,
    tz: str | None,
    lod3_p95_budget_ms: float,
    min_gross_margin: float | None,
    max_cost_usd_per_day: float | None,
) -> Verdict:
    """`report --check` in every mode: the SLO and ethics checks over the selection's town and
    window, and the limits given over the selection (per town with `per_town`)."""
    seed_checks = await run_checks(
        store,
        town_id=selection.town_id,
        since=selection.since,
        until=selection.until,
        lod3_p95_budget_ms=lod3_p95_budget_ms,
    )
    limits = await check_limits(
        store,
        selection,
        per_town=per_town,
        tz=tz,
        min_gross_margin=min_gross_margin,
        max_cost_usd_per_day=max_cost_usd_per_day,
    )
    return Verdict(
        (*seed_checks, *(limit.result for limit in limits)),
        tuple(offender for limit in limits for offender in limit.offenders),
    )


# --- the seed's dashboard ---------------------------------------------------------------------


def start_of_today(now: datetime | None = None) -> datetime:
    """Local midnight: "today" as the person reading the dashboard means it (in `$ACTION_METRICS_TZ`
    when set, else the system's zone)."""
    now = now or datetime.now(UTC)
    if os.environ.get(TZ_VARIABLE):
        return bucket_floor(now, "day", reader_zone())
    return now.astimezone().replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass(frozen=True, slots=True)
class Dashboard:
    """The seed's three questions for one town, answered from the store."""

    town_id: str | None
    today: datetime
    week_ago: datetime
    lod3_today: Aggregate
    lod4_this_week: Aggregate
    overall: Aggregate

    @property
    def most_used_model(self) -> tuple[str, int] | None:
        if not self.overall.by_model:
            return None
        model, stats = max(self.overall.by_model.items(), key=lambda item: (item[1].count, item[0]))
        return model, stats.count


async def build_dashboard(
    store: AsyncMetricsStore, *, town_id: str | None, now: datetime | None = None
) -> Dashboard:
    now = datetime.now(UTC) if now is None else now
    today, week_ago = start_of_today(now), now - timedelta(days=7)
    return Dashboard(
        town_id=town_id,
        today=today,
        week_ago=week_ago,
        lod3_today=await store.aggregate(town_id=town_id, action_type=ActionType.LOD3, since=today),
        lod4_this_week=await store.aggregate(town_id=town_id, action_type=ActionType.LOD4, since=week_ago),
        overall=await store.aggregate(town_id=town_id),
    )


# --- JSON -------------------------------------------------------------------------------------


def report_json(
    selection: Selection, aggregate: Aggregate, checks: Sequence[CheckResult] | None = None
) -> dict[str, Any]:
    """`report --json`: the filters used and `Aggregate.to_dict()`, plus the checks when run."""
    document: dict[str, Any] = {"filters": selection.to_dict(), "metrics": aggregate.to_dict()}
    if checks is not None:
        document["checks"] = [check.to_dict() for check in checks]
        document["passed"] = not any_failed(checks)
    return document


# --- Rich rendering ---------------------------------------------------------------------------


def _moment(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def _usd(value: float) -> str:
    return f"${value:,.6f}" if abs(value) < 1 else f"${value:,.2f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def render_aggregate(aggregate: Aggregate, title: str) -> RenderableType:
    """Totals, then one row per model (most used first)."""
    totals = Table(title=title, show_header=False, title_justify="left", min_width=50)
    totals.add_column("figure", style="bold")
    totals.add_column("value", justify="right")
    rows = [
        ("actions", f"{aggregate.count:,}"),
        ("failed actions", f"{aggregate.error_count:,}"),
        ("tokens in / out", f"{aggregate.tokens_in:,} / {aggregate.tokens_out:,}"),
        ("credits charged", f"{aggregate.total_credits:,}"),
        ("latency avg", _ms(aggregate.avg_latency_ms)),
        (
            # Over successful actions; from the rollups' histograms within 1% of the exact ones.
            f"latency p50 / p95 / p99 (succeeded{'' if aggregate.percentiles_exact else ', within 1%'})",
            " / ".join(
                _ms(v) for v in (aggregate.p50_latency_ms, aggregate.p95_latency_ms, aggregate.p99_latency_ms)
            ),
        ),
        ("cost", _usd(aggregate.total_cost_usd)),
        ("revenue", _usd(aggregate.total_revenue_usd)),
        ("gross margin", _percent(aggregate.gross_margin)),
        ("average margin per paid action", _percent(aggregate.avg_margin)),
    ]
    if aggregate.unpriced_count:
        rows.append(("actions of unpriced models (no cost counted)", f"{aggregate.unpriced_count:,}"))
    for figure, value in rows:
        totals.add_row(figure, value)
    if not aggregate.by_model:
        return totals
    models = Table(title="By model", title_justify="left")
    for column in ("model", "actions", "tokens", "avg latency", "p95 latency", "cost"):
        models.add_column(column, justify="left" if column == "model" else "right")
    for model, stats in aggregate.by_model.items():
        cost = _usd(stats.total_cost_usd) + (
            f" ({stats.unpriced_count:,} unpriced)" if stats.unpriced_count else ""
        )
        models.add_row(
            model,
            f"{stats.count:,}",
            f"{stats.total_tokens:,}",
            _ms(stats.avg_latency_ms),
            _ms(stats.p95_latency_ms),
            cost,
        )
    return Group(totals, Text(""), models)


SYNC_COMMAND: Final = "action-metrics prices sync"


def price_hints(aggregate: Aggregate, prices: Sequence[ModelPrice]) -> RenderableType | None:
    """What to do about the selection's cost: unpriced models (the command that prices them) and
    models whose catalogue price rises with the request size (calls above it are understated)."""
    lines: list[str] = []
    unpriced = [model for model, stats in aggregate.by_model.items() if stats.unpriced_count]
    if aggregate.unpriced_count:
        lines.append(
            f"{aggregate.unpriced_count:,} actions of unpriced models ({', '.join(unpriced)}) count no cost: "
            f"run `{SYNC_COMMAND}` to load catalogue prices, or `action-metrics prices set MODEL "
            "--input X --output Y --from DATE` for a model the catalogue does not know."
        )
    tiers: dict[str, int] = {}
    for price in prices:
        if price.tiered_above_tokens is not None and price.model in aggregate.by_model:
            tiers[price.model] = min(
                tiers.get(price.model, price.tiered_above_tokens), price.tiered_above_tokens
            )
    for model, threshold in tiers.items():
        lines.append(
            f"{model}: its catalogue price rises above {threshold:,} input tokens per call; such calls "
            "are priced at the base tier here, so their cost is understated (`action-metrics prices list`)."
        )
    return Text("\n".join(lines), style="yellow") if lines else None


def _per_1m(value: Decimal | None) -> str:
    return "-" if value is None else f"{value.normalize():f}"


def render_prices(prices: Sequence[ModelPrice]) -> RenderableType:
    """`prices list`: every stored model price, each in force until the model's next."""
    table = Table(title="Model prices (USD per 1M tokens)", title_justify="left")
    for column in (
        "model",
        "effective_from",
        "input",
        "output",
        "cache read",
        "cache write",
        "source",
        "tiered above",
    ):
        table.add_column(
            column,
            justify="right" if column in ("input", "output", "cache read", "cache write") else "left",
            no_wrap=column == "model",  # a price list must show whole names
        )
    for price in prices:
        start = (
            "beginning of time"
            if price.effective_from == BEGINNING_OF_TIME
            else price.effective_from.isoformat()
        )
        tiered = "-" if price.tiered_above_tokens is None else f"{price.tiered_above_tokens:,}"
        table.add_row(
            price.model,
            start,
            _per_1m(price.input_per_1m),
            _per_1m(price.output_per_1m),
            _per_1m(price.cache_read_per_1m),
            _per_1m(price.cache_write_per_1m),
            price.source,
            tiered,
        )
    footnote = Text(
        "A missing cache price is the input price. Tiered above: the catalogue charges more per call"
        " above that many input tokens; the base tier is stored, so such calls are understated (flagged,"
        " not applied)."
    )
    return Group(table, footnote)


def render_sync(result: PriceSync) -> RenderableType:
    """`prices sync`: what each model seen got from the catalogue, and what it did not."""
    table = Table(title="Catalogue prices loaded (genai-prices)", title_justify="left")
    for column in ("model", "catalogue model", "prices", "notes"):
        table.add_column(column)
    for found in result.lookup.found:
        notes = list(found.notes)
        if found.model in result.held_back:
            held = result.held_back[found.model].isoformat()
            notes.insert(0, f"a manual price from {held} wins: catalogue prices from then on not loaded")
        table.add_row(found.model, found.catalogue_id, f"{len(found.prices)}", "\n".join(notes))
    lines = []
    for model, why in result.lookup.not_synced:
        lines.append(f"{model}: not loaded, {why}")
    if result.unpriced:
        lines.append(
            "not in the catalogue, so unpriced until set by hand (`action-metrics prices set`): "
            f"{', '.join(result.unpriced)}"
        )
    return Group(table, Text("\n".join(lines))) if lines else table


_VERDICT_STYLE: Final = {
    CheckStatus.PASS: ("PASS", "bold green"),
    CheckStatus.FAIL: ("FAIL", "bold red"),
    CheckStatus.NO_DATA: ("NO DATA", "yellow"),
}


def render_checks(checks: Sequence[CheckResult]) -> RenderableType:
    table = Table(title="SLO and ethics checks", title_justify="left")
    for column in ("verdict", "kind", "check", "figures"):
        table.add_column(column)
    for check in checks:
        label, style = _VERDICT_STYLE[check.status]
        table.add_row(Text(label, style=style), check.kind, check.name, check.detail)
    return table


def render_dashboard(dashboard: Dashboard) -> RenderableType:
    """The seed's three questions with their answers, then the town's totals by model."""
    lod3, lod4 = dashboard.lod3_today, dashboard.lod4_this_week
    if lod3.count:
        lod3_answer = (
            f"{_ms(lod3.avg_latency_ms)} (p50 {_ms(lod3.p50_latency_ms)}, p95 {_ms(lod3.p95_latency_ms)}) "
            f"over {lod3.count:,} queries since {_moment(dashboard.today)}"
        )
    else:
        lod3_answer = f"no LOD3 queries since {_moment(dashboard.today)}"
    if lod4.count:
        lod4_answer = (
            f"{_percent(lod4.gross_margin)}: revenue {_usd(lod4.total_revenue_usd)}, "
            f"cost {_usd(lod4.total_cost_usd)} over {lod4.count:,} queries "
            f"since {_moment(dashboard.week_ago)}"
        )
    else:
        lod4_answer = f"no LOD4 queries since {_moment(dashboard.week_ago)}"
    most_used = dashboard.most_used_model
    if most_used is None:
        model_answer = "no actions recorded"
    else:
        model, count = most_used
        model_answer = f"{model}: {count:,} of {dashboard.overall.count:,} actions"
    questions = Table(
        title=f"Dashboard: {dashboard.town_id or 'all towns'}", title_justify="left", show_lines=True
    )
    questions.add_column("question", style="bold")
    questions.add_column("answer")
    questions.add_row("What was the average LOD3 latency today?", lod3_answer)
    questions.add_row("What's the gross margin for LOD4 this week?", lod4_answer)
    questions.add_row("Which model is being used most?", model_answer)
    return Group(questions, Text(""), render_aggregate(dashboard.overall, "All actions"))
