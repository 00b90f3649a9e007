"""The dashboard page: `GET /` on `serve`, and the same page as one file (`report --html`).

The page is static files shipped in the package (`static/`: HTML, CSS, our JS and uPlot 1.6.32, MIT,
vendored from the npm registry's `uplot` package). Served, it reads every figure from the JSON
endpoints with the token the reader typed in, kept in the tab's session storage and sent only in an
`Authorization` header. Written as a file, it carries the same endpoints' answers inline (`read_view`
builds them the way the endpoints do) and needs no network.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Final

from action_metrics.report import DEFAULT_LOD3_P95_BUDGET_MS, any_failed, run_checks
from action_metrics.store import AsyncMetricsStore

if TYPE_CHECKING:
    from fastapi import FastAPI

STATIC: Final = files("action_metrics") / "static"
ASSETS: Final = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}
"""The files `GET /static/{name}` serves: these and nothing else."""

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""Our own scripts, styles and endpoints only: no inline script or style, no other origin, no framing."""
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

FILE_CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
    "connect-src 'none'; form-action 'none'"
)
"""The written file's policy: everything is inline in it, and it may reach nothing."""

TOP_USERS: Final = 10
DEFAULT_FILE_HOURS: Final = 24 * 7
"""The window of `report --html` without `--since`: the page's default."""


def bucket_for(since_hours: float) -> str:
    """Hours up to a week, days beyond: the page's rule, so a file and the page draw the same buckets."""
    return "hour" if since_hours <= 24 * 7 else "day"


def asset(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


# --- serving ----------------------------------------------------------------------------------


def add_page(app: FastAPI) -> None:
    """`GET /` and `GET /static/{name}` on `app`, with the security headers; no token needed to load
    them (they hold no figures: the page asks for a token, then reads the endpoints)."""
    from fastapi import HTTPException, Response, status

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(asset("index.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such file")
        return Response(asset(name), media_type=media_type, headers=SECURITY_HEADERS)


# --- the page's data, read from the store --------------------------------------------------


async def read_view(
    store: AsyncMetricsStore,
    *,
    town_id: str | None,
    since_hours: float,
    tz: str,
    until: datetime | None = None,
    lod3_p95_budget_ms: float = DEFAULT_LOD3_P95_BUDGET_MS,
    now: datetime | None = None,
) -> dict[str, Any]:
    """What the page reads from the endpoints for one town (or all) and window (the `since_hours`
    before `until`, or before now), in their JSON shapes."""
    now = datetime.now(UTC) if now is None else now
    since = (now if until is None else until) - timedelta(hours=since_hours)
    bucket = bucket_for(since_hours)
    window: dict[str, Any] = {"town_id": town_id, "since": since, "until": until}
    aggregate = await store.aggregate(**window)
    buckets = await store.breakdown((), bucket=bucket, tz=tz, **window)
    latency = await store.breakdown(("action_type",), bucket=bucket, tz=tz, **window)
    users = ("user_id",)
    top_cost = await store.breakdown(users, sort="total_cost_usd", top=TOP_USERS, **window)
    top_loss = await store.breakdown(
        users, sort="total_profit_usd", descending=False, top=TOP_USERS, **window
    )
    checks = await run_checks(store, lod3_p95_budget_ms=lod3_p95_budget_ms, **window)
    hours: int | float = int(since_hours) if float(since_hours).is_integer() else since_hours
    return {
        "town_id": town_id,
        "since_hours": hours,
        "since": since.isoformat(),
        "until": None if until is None else until.isoformat(),
        "tz": tz,
        "bucket": bucket,
        "generated_at": now.isoformat(),
        "metrics": {
            "town_id": town_id,
            "action_type": None,
            "time_window_hours": hours,
            "metrics": aggregate.to_dict(),
        },
        "buckets": [row.to_dict() for row in buckets],
        "latency": [row.to_dict() for row in latency],
        "top_cost": [row.to_dict() for row in top_cost],
        "top_loss": [row.to_dict() for row in top_loss],
        "checks": {
            "town_id": town_id,
            "checks": [check.to_dict() for check in checks],
            "passed": not any_failed(checks),
        },
    }


# --- the page as one file -------------------------------------------------------------------

_STYLESHEET: Final = re.compile(r'<link rel="stylesheet" href="static/([\w.]+)">')
_SCRIPT: Final = re.compile(r'<script src="static/([\w.]+)"></script>')


def _inline(text: str, closing: str) -> str:
    # Nothing we inline may end its element early.
    if closing in text.lower():
        raise ValueError(f"an inlined asset contains {closing}")
    return text


def report_html(view: dict[str, Any]) -> str:
    """The page with its styles, scripts and `view` inlined: one file that opens offline."""
    page = asset("index.html")
    data = json.dumps(view, separators=(",", ":")).replace("<", "\\u003c")
    page = page.replace(
        '<meta name="referrer" content="no-referrer">',
        '<meta name="referrer" content="no-referrer">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{FILE_CONTENT_SECURITY_POLICY}">',
    )
    page = _STYLESHEET.sub(lambda found: f"<style>\n{_inline(asset(found[1]), '</style')}\n</style>", page)
    scripts = iter(_SCRIPT.finditer(page))
    first = next(scripts)
    embedded = f'<script type="application/json" id="am-data">{data}</script>\n'
    page = page[: first.start()] + embedded + page[first.start() :]
    return _SCRIPT.sub(lambda found: f"<script>\n{_inline(asset(found[1]), '</script')}\n</script>", page)
