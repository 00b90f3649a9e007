"""The dashboard page in a real browser: `action-metrics serve` as a subprocess on both backends, the
system's Chromium driven by Playwright, the figures on the page compared with the endpoints' JSON.

Without a browser the browser tests are skipped with the reason, unless ACTION_METRICS_REQUIRE_BROWSER=1
(as in CI) makes that a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit
from zoneinfo import ZoneInfo

import httpx
import pytest
from conftest import CLI_VARIABLES, metric, run_cli

from action_metrics import ActionType, MetricsStore, ModelName

REQUIRE_BROWSER = os.environ.get("ACTION_METRICS_REQUIRE_BROWSER") == "1"
BROWSERS = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
SRC = Path(__file__).resolve().parents[1] / "src"

TOKEN = "page-reader-token-0123456789abcdef"
OTHER_TOKEN = "other-town-token-0123456789abcdef"
TOKENS = f"{TOKEN}:town-1,town-3;{OTHER_TOKEN}:town-2"
UNPRICED_MODEL = "mystery-model-1"
DEADLINE_MS = 30_000


def hours_ago(hours: float) -> datetime:
    return datetime.now(UTC) - timedelta(hours=hours)


# --- the town ---------------------------------------------------------------------------------


@pytest.fixture
def town(database_url: str) -> str:
    """Two days of town-1, all well inside the page's default window of 7 days, and a town-2 the
    page's token may not read."""
    metrics = [
        *(
            metric(timestamp=hours_ago(2 + 3 * n), latency_ms=80.0 + 10 * n, user_id=f"user-{n % 4}")
            for n in range(16)
        ),
        metric(
            action_type=ActionType.LOD4,
            credits_charged=100,
            model=ModelName.SONNET,
            tokens_in=2_000,
            tokens_out=400,
            latency_ms=900.0,
            timestamp=hours_ago(5),
            user_id="user-1",
        ),
        # Dialogue of the system user: costs money, earns nothing (the top of "by loss").
        *(
            metric(
                action_type=ActionType.DIALOGUE,
                credits_charged=0,
                model=ModelName.OPUS,
                tokens_in=3_000,
                tokens_out=800,
                latency_ms=2_400.0,
                timestamp=hours_ago(7 + n),
                user_id="system",
            )
            for n in range(3)
        ),
        # A model nobody priced, and a force refused: what the page must not let anyone miss.
        metric(model=UNPRICED_MODEL, timestamp=hours_ago(9), user_id="user-2"),
        metric(model=UNPRICED_MODEL, timestamp=hours_ago(33), user_id="user-3"),
        metric(
            action_type=ActionType.FORCE,
            credits_charged=0,
            error="ConsentRefused",
            timestamp=hours_ago(11),
            user_id="user-3",
        ),
        metric(action_type=ActionType.FORCE, credits_charged=50, timestamp=hours_ago(12), user_id="user-0"),
        metric(town_id="town-2", timestamp=hours_ago(3), user_id="stranger"),
    ]
    with MetricsStore(database_url, durable=True) as store:
        store.emit_many(metrics)
    return database_url


# --- the server -------------------------------------------------------------------------------


@dataclass
class Server:
    """A running `action-metrics serve`, its address, and everything it logged."""

    process: subprocess.Popen[str]
    address: str
    log: list[str] = field(default_factory=list)

    def get(self, path: str, token: str | None = TOKEN, **params: Any) -> Any:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        answer = httpx.get(f"{self.address}{path}", params=params, headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()


def _drain(stream: Any, into: list[str]) -> None:
    for line in stream:
        into.append(line)


def _environment(**extra: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key not in CLI_VARIABLES}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    environment.update(extra)
    return environment


@pytest.fixture
def serve(town: str) -> Iterator[Any]:
    """Starts `action-metrics serve` over the town (extra arguments and environment as given)."""
    servers: list[Server] = []

    def start(*arguments: str, **environment: str) -> Server:
        process = subprocess.Popen(
            [sys.executable, "-m", "action_metrics", "serve", "--url", town, "--port", "0", *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_environment(**environment),
        )
        assert process.stderr is not None
        assert process.stdout is not None
        log: list[str] = []
        address = None
        for line in process.stderr:  # uvicorn names its port once it listens (or the process ends)
            log.append(line)
            found = re.search(r"Uvicorn running on (http://\S+)", line)
            if found:
                address = found[1]
                break
        assert address, "".join(log)
        server = Server(process, address, log)
        for stream in (process.stderr, process.stdout):
            threading.Thread(target=_drain, args=(stream, log), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.process.terminate()
        server.process.wait(timeout=60)


# --- the browser ------------------------------------------------------------------------------


def _browser_path() -> str | None:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture
def chromium() -> Any:
    """Starts headless Chromium from the system's packages, driven by Playwright (no browser download).

    A context manager for the test body: Playwright's sync API runs an event loop in this thread while
    it lives, so it must stop before the database fixtures (which run their own) tear down.
    """
    path = _browser_path()
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the playwright package is not installed (pip install -e '.[dev]')"
    if reason is None and path is None:
        reason = f"no Chromium found (looked for {', '.join(BROWSERS)}); apt-get install chromium"
    if reason is not None:
        if REQUIRE_BROWSER:
            pytest.fail(f"{reason} (ACTION_METRICS_REQUIRE_BROWSER=1)")
        pytest.skip(reason)

    @contextmanager
    def launch() -> Iterator[Any]:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
            try:
                yield browser
            finally:
                browser.close()

    return launch


@dataclass
class Visit:
    """A browser page and what it asked for and said."""

    page: Any
    requests: list[Any] = field(default_factory=list)
    console: list[str] = field(default_factory=list)


def visit(browser: Any, **options: Any) -> Visit:
    """A new page at 1280x800 whose reader lives in Berlin."""
    context = browser.new_context(
        viewport={"width": 1280, "height": 800}, timezone_id="Europe/Berlin", **options
    )
    page = context.new_page()
    page.set_default_timeout(DEADLINE_MS)
    seen = Visit(page)
    page.on("request", lambda request: seen.requests.append(request))
    page.on("console", lambda message: seen.console.append(message.text))
    page.on("pageerror", lambda error: seen.console.append(f"page error: {error}"))
    return seen


def sign_in(visit: Visit, address: str, token: str) -> None:
    visit.page.goto(f"{address}/")
    visit.page.fill("#token", token)
    visit.page.click("#sign-in-form button")


def wait_ready(visit: Visit) -> None:
    visit.page.wait_for_selector("body[data-state=ready]")


def shown(visit: Visit, selector: str) -> tuple[str, str]:
    element = visit.page.locator(selector)
    return element.inner_text(), element.get_attribute("data-value") or ""


def amount(text: str) -> float:
    """`$1,234.56`, `-$0.001234`, `99.5%` or `1,234` as a number."""
    return float(re.sub(r"[$,%\s]", "", text))


# --- the page ---------------------------------------------------------------------------------


def test_the_page_shows_the_apis_numbers_for_the_tokens_towns(
    serve: Any, chromium: Any, backend: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = serve(ACTION_METRICS_API_TOKENS=TOKENS)
    with chromium() as browser:
        the_page_shows_the_apis_numbers(server, visit(browser), backend.name, tmp_path_factory)


def the_page_shows_the_apis_numbers(
    server: Server, visit: Visit, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sign_in(visit, server.address, TOKEN)
    wait_ready(visit)
    page = visit.page

    # The town selector lists what the token may read, nothing else.
    towns = server.get("/v1/towns")["towns"]
    assert towns == ["town-1", "town-3"]
    assert page.eval_on_selector_all("#town option", "options => options.map(o => o.value)") == towns
    assert page.input_value("#town") == "town-1"
    # The reader's zone, from the browser.
    assert page.input_value("#tz") == "Europe/Berlin"

    # The default window is 7 days, in hourly buckets in the reader's zone.
    week = {"since_hours": 168}
    metrics = server.get("/v1/town/town-1/metrics", **week)["metrics"]
    assert metrics["count"] == 24
    assert metrics["unpriced_count"] == 2
    assert metrics["error_count"] == 1
    for selector, key, digits in [
        ("#kpi-count", "count", 0),
        ("#kpi-cost", "total_cost_usd", 6 if metrics["total_cost_usd"] < 1 else 2),
        ("#kpi-revenue", "total_revenue_usd", 2),
        ("#kpi-profit", "total_profit_usd", 2),
        ("#kpi-unpriced", "unpriced_count", 0),
        ("#kpi-errors", "error_count", 0),
    ]:
        text, value = shown(visit, selector)
        assert float(value) == metrics[key], selector
        assert amount(text) == pytest.approx(metrics[key], abs=0.5 * 10**-digits), selector
    text, value = shown(visit, "#kpi-margin")
    assert float(value) == metrics["gross_margin"]
    assert amount(text) == pytest.approx(100 * metrics["gross_margin"], abs=0.05)
    # Unpriced actions and failures are flagged, with the command that fixes prices.
    assert page.locator("#unpriced-alert").is_visible()
    assert "action-metrics prices sync" in page.inner_text("#unpriced-alert")
    assert page.get_attribute("#kpi-unpriced-tile", "class") == "kpi watch alarm"
    assert page.get_attribute("#kpi-errors-tile", "class") == "kpi watch alarm"

    # The charts drew one point per bucket the breakdown answered.
    buckets = server.get("/v1/town/town-1/breakdown", bucket="hour", tz="Europe/Berlin", **week)["rows"]
    assert len(buckets) >= 16  # hours 2 to 47 ago, some sharing an hour
    for chart in ("#chart-money", "#chart-margin", "#chart-latency"):
        assert page.get_attribute(chart, "data-points") == str(len(buckets)), chart
        assert page.locator(f"{chart} canvas").count() == 1, chart
        assert page.eval_on_selector(f"{chart} canvas", "c => c.width * c.height") > 0
    # Latency per action type: LOD4 has one bucket.
    page.select_option("#latency-action", "lod4")
    assert page.get_attribute("#chart-latency", "data-points") == "1"

    # The checks' verdicts are the endpoint's.
    checks = server.get("/v1/town/town-1/checks", **week)["checks"]
    assert [c["status"] for c in checks] == ["pass", "pass"]
    assert page.eval_on_selector_all("#checks tr", "rows => rows.map(r => r.dataset.status)") == [
        c["status"] for c in checks
    ]
    assert page.inner_text("#checks").count("PASS") == 2

    # Top users by cost, and by loss (only those losing money), in the endpoint's order.
    by_cost = server.get("/v1/town/town-1/breakdown", by="user_id", sort="total_cost_usd", top=10, **week)
    users = "rows => rows.map(r => r.dataset.user)"
    assert page.eval_on_selector_all("#top-cost tr", users) == [row["user_id"] for row in by_cost["rows"]]
    by_loss = server.get(
        "/v1/town/town-1/breakdown", by="user_id", sort="total_profit_usd", order="asc", top=10, **week
    )
    losing = [row["user_id"] for row in by_loss["rows"] if row["total_profit_usd"] < 0]
    assert losing == ["system"]
    assert page.eval_on_selector_all("#top-loss tr", users) == losing
    # Models, with the unpriced one marked.
    assert set(page.eval_on_selector_all("#models tr", "rows => rows.map(r => r.dataset.model)")) == set(
        metrics["by_model"]
    )
    page.screenshot(path=str(tmp_path_factory.mktemp("page") / f"dashboard-{backend}.png"))

    # A 24-hour window: fewer actions, the same endpoint answer.
    page.select_option("#range", "24")
    wait_ready(visit)
    day = server.get("/v1/town/town-1/metrics", since_hours=24)["metrics"]
    assert float(shown(visit, "#kpi-count")[1]) == day["count"] == 15
    assert float(shown(visit, "#kpi-cost")[1]) == day["total_cost_usd"]
    assert float(shown(visit, "#kpi-unpriced")[1]) == day["unpriced_count"] == 1

    the_custom_range_shows_the_apis_numbers(server, visit)

    # The token is in no URL, not in the page, not in the server's log; it did travel as a header.
    api = [request for request in visit.requests if "/v1/" in request.url]
    assert api
    assert all(TOKEN not in request.url for request in visit.requests)
    assert all(request.headers.get("authorization") == f"Bearer {TOKEN}" for request in api[1:])
    assert TOKEN not in page.content()
    assert TOKEN not in "".join(server.log)
    # Nothing the CSP refused, no script error.
    assert not [line for line in visit.console if "Content Security Policy" in line or "page error" in line]


def the_custom_range_shows_the_apis_numbers(server: Server, visit: Visit) -> None:
    """From 30 to 6 hours ago, typed as wall-clock times in New York while the browser lives in Berlin:
    the page reads them in the zone it shows, and its figures are the endpoints' for that window."""
    page = visit.page
    page.fill("#tz", "America/New_York")
    page.dispatch_event("#tz", "change")
    wait_ready(visit)
    page.select_option("#range", "custom")
    wait_ready(visit)
    assert page.locator("#custom-since").is_visible()
    assert page.input_value("#custom-since")
    assert page.input_value("#custom-until")

    new_york = ZoneInfo("America/New_York")
    since, until = (
        hours_ago(hours).astimezone(new_york).replace(second=0, microsecond=0) for hours in (30, 6)
    )
    page.fill("#custom-since", since.strftime("%Y-%m-%dT%H:%M"))
    page.fill("#custom-until", until.strftime("%Y-%m-%dT%H:%M"))
    wait_ready(visit)

    # The page asked for that window, as UTC moments.
    asked = parse_qs(urlsplit([r.url for r in visit.requests if "/metrics?" in r.url][-1]).query)
    assert datetime.fromisoformat(asked["since"][0]) == since
    assert datetime.fromisoformat(asked["until"][0]) == until
    assert "since_hours" not in asked
    window = {"since": since.isoformat(), "until": until.isoformat()}
    metrics = server.get("/v1/town/town-1/metrics", **window)["metrics"]
    # Independently: LOD3 at 8, 11, ... 29 hours ago, dialogue at 7-9, unpriced at 9, force at 11 and 12.
    assert metrics["count"] == 14
    for selector, key in [
        ("#kpi-count", "count"),
        ("#kpi-cost", "total_cost_usd"),
        ("#kpi-revenue", "total_revenue_usd"),
        ("#kpi-profit", "total_profit_usd"),
        ("#kpi-margin", "gross_margin"),
        ("#kpi-p95", "p95_latency_ms"),
        ("#kpi-unpriced", "unpriced_count"),
        ("#kpi-errors", "error_count"),
    ]:
        assert float(shown(visit, selector)[1]) == metrics[key], selector
    hours = "/v1/town/town-1/breakdown"
    buckets = server.get(hours, bucket="hour", tz="America/New_York", **window)["rows"]
    assert page.get_attribute("#chart-money", "data-points") == str(len(buckets))
    by_cost = server.get(hours, by="user_id", sort="total_cost_usd", top=10, **window)["rows"]
    users = "rows => rows.map(r => r.dataset.user)"
    assert page.eval_on_selector_all("#top-cost tr", users) == [row["user_id"] for row in by_cost]
    checks = server.get("/v1/town/town-1/checks", **window)["checks"]
    assert page.eval_on_selector_all("#checks tr", "rows => rows.map(r => r.dataset.status)") == [
        c["status"] for c in checks
    ]
    # The subtitle names the window in the zone it was typed in.
    subtitle = page.inner_text("#subtitle")
    assert f"{since.strftime('%H:%M')} to " in subtitle
    assert "America/New_York" in subtitle

    # The view is in the page's address (the token is not): a reload shows the same window.
    shown_in_address = parse_qs(urlsplit(page.url).query)
    assert shown_in_address["range"] == ["custom"]
    assert shown_in_address["tz"] == ["America/New_York"]
    assert shown_in_address["town"] == ["town-1"]
    assert datetime.fromisoformat(shown_in_address["since"][0]) == since
    assert TOKEN not in page.url
    page.reload()
    wait_ready(visit)
    assert page.input_value("#range") == "custom"
    assert page.locator("#custom-since").is_visible()
    assert page.input_value("#custom-since") == since.strftime("%Y-%m-%dT%H:%M")
    assert page.input_value("#custom-until") == until.strftime("%Y-%m-%dT%H:%M")
    assert page.input_value("#tz") == "America/New_York"
    assert float(shown(visit, "#kpi-count")[1]) == metrics["count"]
    asked = parse_qs(urlsplit([r.url for r in visit.requests if "/metrics?" in r.url][-1]).query)
    assert datetime.fromisoformat(asked["until"][0]) == until

    # An end before the start is refused on the page, before any request.
    page.fill("#custom-until", (since - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M"))
    page.wait_for_selector("body[data-state=error]")
    assert "must end after it starts" in page.inner_text("#error")


def test_the_page_and_its_files_carry_the_security_headers(serve: Any) -> None:
    server = serve(ACTION_METRICS_API_TOKENS=TOKENS)
    for path in ("/", "/static/dashboard.js", "/static/uPlot.iife.min.js", "/static/dashboard.css"):
        answer = httpx.get(f"{server.address}{path}")
        assert answer.status_code == 200, path
        policy = answer.headers["content-security-policy"]
        assert "default-src 'none'" in policy
        assert "script-src 'self'" in policy
        assert "unsafe-inline" not in policy
        assert "frame-ancestors 'none'" in policy
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["x-frame-options"] == "DENY"
    page = httpx.get(f"{server.address}/").text
    assert "<script>" not in page
    assert "style=" not in page
    assert httpx.get(f"{server.address}/static/../http.py").status_code == 404
    assert httpx.get(f"{server.address}/static/index.py").status_code == 404


def test_the_towns_endpoint_lists_a_tokens_towns_only(serve: Any) -> None:
    server = serve(ACTION_METRICS_API_TOKENS=f"{TOKENS};every-town-token-0123456789:*")
    assert server.get("/v1/towns", token=OTHER_TOKEN) == {"towns": ["town-2"]}
    assert server.get("/v1/towns", token="every-town-token-0123456789") == {"towns": ["town-1", "town-2"]}
    assert httpx.get(f"{server.address}/v1/towns").status_code == 401
    assert (
        httpx.get(
            f"{server.address}/v1/town/town-2/checks", headers={"Authorization": f"Bearer {TOKEN}"}
        ).status_code
        == 403
    )


def test_a_wrong_token_asks_again_and_insecure_needs_none(serve: Any, chromium: Any) -> None:
    server = serve(ACTION_METRICS_API_TOKENS=TOKENS)
    open_server = serve("--insecure")
    with chromium() as browser:
        a_wrong_token_asks_again_and_insecure_needs_none(server, open_server, visit(browser))


def a_wrong_token_asks_again_and_insecure_needs_none(
    server: Server, open_server: Server, visit: Visit
) -> None:
    sign_in(visit, server.address, "not-the-token-0123456789abcdef")
    visit.page.wait_for_selector("#sign-in-error:not([hidden])")
    assert "refused" in visit.page.inner_text("#sign-in-error")
    assert visit.page.locator("#dashboard").is_hidden()

    visit.page.goto(f"{open_server.address}/")
    wait_ready(visit)
    assert visit.page.eval_on_selector_all("#town option", "o => o.map(x => x.value)") == ["town-1", "town-2"]
    assert visit.page.locator("#sign-in").is_hidden()


# --- the page as a file ----------------------------------------------------------------------


def embedded_view(html: str) -> Any:
    found = re.search(r'<script type="application/json" id="am-data">(.*?)</script>', html)
    assert found is not None
    return json.loads(found[1])


def test_report_html_is_one_file_with_the_same_numbers(town: str, chromium: Any, tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    result = run_cli(
        "report", "--url", town, "--town", "town-1", "--since", "7d", "--tz", "UTC", "--html", str(path)
    )
    assert result.exit_code == 0, result.output
    html = path.read_text(encoding="utf-8")
    assert 'src="' not in html
    assert 'href="static' not in html
    data = embedded_view(html)
    with MetricsStore(town) as store:
        expected = store.aggregate(town_id="town-1", since=hours_ago(168)).to_dict()
    assert data["metrics"]["metrics"]["count"] == expected["count"] == 24
    assert data["metrics"]["metrics"]["total_cost_usd"] == pytest.approx(expected["total_cost_usd"], abs=1e-9)

    # --until ends the file's window: from 30 to 6 hours ago, drawn as that range.
    ended = tmp_path / "ended.html"
    result = run_cli(
        "report",
        "--url",
        town,
        "--town",
        "town-1",
        "--since",
        "30h",
        "--until",
        "6h",
        "--html",
        str(ended),
    )
    assert result.exit_code == 0, result.output
    ended_data = embedded_view(ended.read_text(encoding="utf-8"))
    since, until = datetime.fromisoformat(ended_data["since"]), datetime.fromisoformat(ended_data["until"])
    assert abs(until - hours_ago(6)) < timedelta(minutes=5)
    assert abs(until - since - timedelta(hours=24)) < timedelta(seconds=1)
    # Independently: LOD3 at 8, 11, ... 29 hours ago, dialogue at 7-9, unpriced at 9, force at 11 and 12.
    assert ended_data["metrics"]["metrics"]["count"] == 14
    with MetricsStore(town) as store:
        assert (
            ended_data["metrics"]["metrics"]
            == store.aggregate(town_id="town-1", since=since, until=until).to_dict()
        )

    with chromium() as browser:
        seen = visit(browser, offline=True)
        page = seen.page
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-state=ready]")
        assert page.get_attribute("#kpi-count", "data-value") == "24"
        assert (
            float(page.get_attribute("#kpi-cost", "data-value") or "nan")
            == data["metrics"]["metrics"]["total_cost_usd"]
        )
        assert page.get_attribute("#chart-money", "data-points") == str(len(data["buckets"]))
        assert page.locator("#chart-money canvas").count() == 1
        page.screenshot(path=str(tmp_path / "report.png"))
        assert not [line for line in seen.console if "page error" in line]

        page.goto(ended.as_uri())
        page.wait_for_selector("body[data-state=ready]")
        assert page.get_attribute("#kpi-count", "data-value") == "14"
        assert " to " in page.inner_text("#subtitle")


# --- town ids that need percent-encoding ---------------------------------------------------------

ODD_TOWN = "north/ward 50% ?#é🏠"
ODD_TOKEN = "odd-town-token-0123456789abcdef"


def test_a_town_id_that_needs_percent_encoding_is_read_by_the_page(
    serve: Any, chromium: Any, town: str, tmp_path: Path
) -> None:
    """A town whose id holds `/`, a space, `%`, `?`, `#` and non-ASCII characters, beside a town named
    after its first segment: the page encodes the id, the server routes it, and the figures are its own."""
    with MetricsStore(town, durable=True) as store:
        store.emit_many(
            [
                *(metric(town_id=ODD_TOWN, timestamp=hours_ago(1 + n), user_id=f"odd-{n}") for n in range(3)),
                *(
                    metric(town_id="north", timestamp=hours_ago(1 + n), user_id="northerner")
                    for n in range(5)
                ),
            ]
        )
    server = serve(ACTION_METRICS_API_TOKENS=f"{TOKENS};{ODD_TOKEN}:{ODD_TOWN},town-1")
    with chromium() as browser:
        seen = visit(browser)
        page = seen.page
        sign_in(seen, server.address, ODD_TOKEN)
        wait_ready(seen)
        assert server.get("/v1/towns", token=ODD_TOKEN)["towns"] == [ODD_TOWN, "town-1"]
        assert page.eval_on_selector_all("#town option", "o => o.map(x => x.value)") == [ODD_TOWN, "town-1"]
        assert page.input_value("#town") == ODD_TOWN

        path = f"/v1/town/{quote(ODD_TOWN, safe='')}"
        metrics = server.get(f"{path}/metrics", token=ODD_TOKEN, since_hours=168)
        assert metrics["town_id"] == ODD_TOWN
        assert metrics["metrics"]["count"] == 3
        assert float(shown(seen, "#kpi-count")[1]) == 3
        assert float(shown(seen, "#kpi-cost")[1]) == metrics["metrics"]["total_cost_usd"]
        by_cost = server.get(f"{path}/breakdown", token=ODD_TOKEN, by="user_id", top=10, since_hours=168)
        users = "rows => rows.map(r => r.dataset.user)"
        assert page.eval_on_selector_all("#top-cost tr", users) == [row["user_id"] for row in by_cost["rows"]]
        assert ODD_TOWN in page.inner_text("#subtitle")
        assert page.locator("#error").is_hidden()
        asked = [urlsplit(r.url).path for r in seen.requests if "/v1/town/" in r.url]
        assert asked
        assert all(p.startswith(f"{path}/") for p in asked)
        page.screenshot(path=str(tmp_path / "odd-town.png"))

        page.select_option("#town", "town-1")
        wait_ready(seen)
        assert float(shown(seen, "#kpi-count")[1]) == 24
        assert not [line for line in seen.console if "page error" in line]


def test_towns_named_dot_and_dot_dot_are_read_by_the_page(serve: Any, chromium: Any, town: str) -> None:
    """No URL path holds the ids `.` and `..` (browsers resolve them, even as %2E): the page sends
    them as `?town_id=`, and shows each town's own figures."""
    counts = {".": 2, "..": 3}
    with MetricsStore(town, durable=True) as store:
        store.emit_many(
            [
                metric(town_id=town_id, timestamp=hours_ago(1 + n), user_id=f"dot-{n}")
                for town_id, count in counts.items()
                for n in range(count)
            ]
        )
    server = serve(ACTION_METRICS_API_TOKENS=f"{TOKENS};{ODD_TOKEN}:.,..")
    with chromium() as browser:
        seen = visit(browser)
        page = seen.page
        sign_in(seen, server.address, ODD_TOKEN)
        wait_ready(seen)
        assert page.eval_on_selector_all("#town option", "o => o.map(x => x.value)") == [".", ".."]
        for town_id, count in counts.items():
            page.select_option("#town", town_id)
            page.wait_for_selector(f"#kpi-count[data-value='{count}']")
            metrics = server.get("/v1/town/metrics", token=ODD_TOKEN, town_id=town_id, since_hours=24)
            assert metrics["metrics"]["count"] == count
            assert float(shown(seen, "#kpi-cost")[1]) == metrics["metrics"]["total_cost_usd"]
            assert page.locator("#error").is_hidden()
        assert not [line for line in seen.console if "page error" in line]
