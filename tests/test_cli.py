"""The command line through its real entry point, in a subprocess, on both backends."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import make_url

from action_metrics import ActionMetric, ActionType, MetricsStore, ModelName
from action_metrics.demo import DEMO_TOWN, SYSTEM_USER, TownPlan, simulate

SRC = Path(__file__).resolve().parents[1] / "src"
CONSOLE_SCRIPT = Path(sys.executable).with_name("action-metrics")
ENVIRONMENT_KEYS = ("ACTION_METRICS_URL", "ACTION_METRICS_API_TOKEN", "ACTION_METRICS_API_TOKENS")
TOKEN = "cli-test-token-0123456789"


def cli_environment(**extra: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key not in ENVIRONMENT_KEYS}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    environment["COLUMNS"] = "120"
    environment.update(extra)
    return environment


def run(*args: str, **extra_environment: str) -> subprocess.CompletedProcess[str]:
    """`python -m action_metrics ARGS` with this checkout's package first on the path."""
    return subprocess.run(
        [sys.executable, "-m", "action_metrics", *args],
        capture_output=True,
        text=True,
        env=cli_environment(**extra_environment),
        timeout=300,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], exit_code: int, fragment: str) -> None:
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0]


def metric(**fields: object) -> ActionMetric:
    values: dict[str, object] = {
        "action_type": ActionType.LOD3,
        "user_id": "user-1",
        "town_id": "town-a",
        "citizen_id": "alice",
        "tokens_in": 0,
        "tokens_out": 0,
        "model": ModelName.TEMPLATE,
        "latency_ms": 100.0,
        "credits_charged": 10,
        "timestamp": datetime.now(UTC) - timedelta(hours=1),
    }
    values.update(fields)
    return ActionMetric(**values)  # type: ignore[arg-type]


@pytest.fixture
def store(database_url: str) -> Iterator[MetricsStore]:
    # durable: each emit is committed before the command under test reads the database.
    with MetricsStore(database_url, durable=True) as store:
        yield store


# --- db -------------------------------------------------------------------------------------


def test_db_upgrade_creates_the_schema_at_head(empty_database_url: str) -> None:
    upgraded = run("db", "upgrade", "--url", empty_database_url)
    assert upgraded.returncode == 0, upgraded.stderr
    current = run("db", "current", "--url", empty_database_url)
    assert current.returncode == 0, current.stderr
    assert current.stdout.strip().endswith("(head)")


def test_the_url_comes_from_the_environment(empty_database_url: str) -> None:
    assert run("db", "upgrade", ACTION_METRICS_URL=empty_database_url).returncode == 0
    assert run("db", "current", ACTION_METRICS_URL=empty_database_url).stdout.strip().endswith("(head)")


# --- demo -----------------------------------------------------------------------------------


def test_demo_records_the_town_as_the_seed_integrations_did(store: MetricsStore) -> None:
    started = datetime.now(UTC)
    result = run("demo", "--url", str(store.url.render_as_string(False)), "--size", "400", "--days", "2")
    assert result.returncode == 0, result.stderr
    for question in (
        "What was the average LOD3 latency today?",
        "What's the gross margin for LOD4 this week?",
        "Which model is being used most?",
    ):
        assert question in result.stdout
    assert "PASS" in result.stdout
    assert "FAIL" not in result.stdout

    recorded = store.query(town_id=DEMO_TOWN)
    assert len(recorded) == 400
    kinds = Counter(m.action_type for m in recorded)
    assert {ActionType.LOD3, ActionType.DIALOGUE, ActionType.GREET, ActionType.GOSSIP} <= set(kinds)
    for m in recorded:
        assert started - timedelta(days=2, minutes=1) <= m.timestamp <= datetime.now(UTC)
        if m.action_type in (ActionType.LOD3, ActionType.LOD4, ActionType.LOD5):
            lod = int(m.action_type[-1])
            assert m.model == ModelName.TEMPLATE
            assert m.credits_charged == {3: 10, 4: 100, 5: 400}[lod]
            assert m.metadata == {"lod": lod}
        elif m.action_type == ActionType.DIALOGUE:
            assert m.credits_charged == 0
            assert m.model in (ModelName.HAIKU, ModelName.SONNET, ModelName.TEMPLATE)
            assert (m.total_tokens > 0) == (m.model != ModelName.TEMPLATE)
            assert {"speaker", "listener", "operation"} <= set(m.metadata)
        elif m.action_type in (ActionType.GREET, ActionType.GOSSIP, ActionType.TRADE, ActionType.SOLO):
            assert m.user_id == SYSTEM_USER
            assert m.credits_charged == 0
            assert m.metadata["phase"] in ("night", "morning", "afternoon", "evening")
            assert m.citizen_id in m.metadata["participants"]
        elif m.action_type == ActionType.FORCE:
            assert m.credits_charged == 50 or ("error" in m.metadata and m.credits_charged == 0)
        else:
            expected = {ActionType.BRANCH: 150, ActionType.INHABIT: 100}
            assert m.credits_charged == expected[ActionType(m.action_type)]


def test_demo_replays_the_same_town_from_the_same_seed(backend: Any, database_url: str) -> None:
    other_url = backend.migrated()
    try:
        for url in (database_url, other_url):
            result = run("demo", "--url", url, "--size", "250", "--seed", "7", "--town", "replay")
            assert result.returncode == 0, result.stderr
        with MetricsStore(database_url) as first, MetricsStore(other_url) as second:
            one, two = first.query(town_id="replay"), second.query(town_id="replay")
            assert len(one) == 250
            # Timestamps follow the clock; everything else is the seed's.
            assert [(m.action_type, m.model, m.tokens_in, m.latency_ms, m.metadata) for m in one] == [
                (m.action_type, m.model, m.tokens_in, m.latency_ms, m.metadata) for m in two
            ]
    finally:
        backend.drop(other_url)


def test_simulation_is_a_function_of_its_plan() -> None:
    end = datetime(2026, 1, 15, 12, tzinfo=UTC)
    first = simulate(TownPlan(seed=3, size=300, days=3, end=end))
    assert first == simulate(TownPlan(seed=3, size=300, days=3, end=end))
    assert first != simulate(TownPlan(seed=4, size=300, days=3, end=end))
    assert len({m.id for m in first}) == 300
    assert all(m.id.version == 7 for m in first)
    assert all(end - timedelta(days=3) <= m.timestamp < end for m in first)


def test_demo_into_a_database_behind_the_schema_is_one_line(empty_database_url: str) -> None:
    if make_url(empty_database_url).get_backend_name() == "sqlite":
        # Someone else's tables, no action-metrics schema: never migrated implicitly.
        with sqlite3.connect(make_url(empty_database_url).database or "") as connection:
            connection.execute("CREATE TABLE unrelated (x INTEGER)")
    result = run("demo", "--url", empty_database_url, "--size", "10")
    assert_one_line_error(result, 1, "action-metrics db upgrade")


# --- report ---------------------------------------------------------------------------------


def test_report_json_is_the_aggregate_of_the_same_filters(store: MetricsStore) -> None:
    now = datetime.now(UTC)
    store.emit_many(
        [
            metric(latency_ms=100.0),
            metric(latency_ms=140.0, timestamp=now - timedelta(days=2)),
            metric(latency_ms=400.0, timestamp=now - timedelta(days=9)),  # outside 7d
            metric(action_type=ActionType.LOD4, credits_charged=100, latency_ms=300.0),
            metric(
                action_type=ActionType.DIALOGUE,
                model=ModelName.HAIKU,
                tokens_in=500,
                tokens_out=120,
                credits_charged=0,
                latency_ms=640.0,
            ),
            metric(town_id="town-b", latency_ms=90.0),
        ]
    )
    url = store.url.render_as_string(False)
    result = run("report", "--url", url, "--town", "town-a", "--action", "lod3", "--since", "7d", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    filters = document["filters"]
    assert filters["town_id"] == "town-a"
    assert filters["action_type"] == "lod3"
    assert filters["model"] is None
    since = datetime.fromisoformat(filters["since"])
    assert abs(since - (now - timedelta(days=7))) < timedelta(minutes=5)
    expected = store.aggregate(town_id="town-a", action_type="lod3", since=since)
    assert document["metrics"] == expected.to_dict()
    assert document["metrics"]["count"] == 2
    assert document["metrics"]["avg_latency_ms"] == pytest.approx(120.0)
    assert "checks" not in document

    everything = json.loads(run("report", "--url", url, "--json").stdout)
    assert everything["metrics"] == store.aggregate().to_dict()
    assert everything["metrics"]["count"] == 6
    by_model = json.loads(run("report", "--url", url, "--model", "haiku", "--json").stdout)
    assert by_model["metrics"]["count"] == 1
    assert by_model["metrics"]["total_tokens"] == 620


def test_report_table_shows_totals_and_models(store: MetricsStore) -> None:
    store.emit_many([metric(), metric(model=ModelName.HAIKU, tokens_in=300, tokens_out=90)])
    result = run("report", "--url", store.url.render_as_string(False))
    assert result.returncode == 0, result.stderr
    assert re.search(r"actions\s*│\s*2\b", result.stdout)
    assert "By model" in result.stdout
    assert "haiku" in result.stdout
    assert "template" in result.stdout


def test_report_check_fails_on_a_slow_lod3(store: MetricsStore) -> None:
    store.emit_many([metric(latency_ms=float(latency)) for latency in (120, 130, 150, 900, 950)])
    url = store.url.render_as_string(False)

    broken = run("report", "--url", url, "--check")
    assert broken.returncode == 3, broken.stderr
    assert "FAIL" in broken.stdout
    assert "checks failed: LOD3 p95 latency within 300 ms" in broken.stderr

    as_json = run("report", "--url", url, "--check", "--json")
    assert as_json.returncode == 3
    document = json.loads(as_json.stdout)
    assert document["passed"] is False
    assert [check["status"] for check in document["checks"]] == ["fail", "no data"]

    generous = run("report", "--url", url, "--check", "--lod3-p95-budget-ms", "1000")
    assert generous.returncode == 0, generous.stderr
    assert run("report", "--url", url, "--check", ACTION_METRICS_LOD3_P95_BUDGET_MS="1000").returncode == 0


def test_report_check_fails_on_an_undercharged_force(store: MetricsStore) -> None:
    force = {"action_type": ActionType.FORCE, "model": ModelName.SONNET, "tokens_in": 900, "tokens_out": 200}
    store.emit_many(
        [
            metric(**force, credits_charged=50),
            metric(**force, credits_charged=0, metadata={"error": "ConsentRefused"}),  # failed: no charge
        ]
    )
    url = store.url.render_as_string(False)
    assert run("report", "--url", url, "--check").returncode == 0

    store.emit(metric(**force, credits_charged=10, town_id="town-b"))
    broken = run("report", "--url", url, "--check", "--json")
    assert broken.returncode == 3
    force_check = json.loads(broken.stdout)["checks"][1]
    assert force_check["status"] == "fail"
    assert "1 of 2 charged 50; 1 failed and charged nothing; 1 undercharged" in force_check["detail"]
    # The check follows --town: town-a alone is still clean.
    assert run("report", "--url", url, "--check", "--town", "town-a").returncode == 0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--since", "24x"),
        ("--since", "0h"),
        ("--since", "yesterday"),
        ("--since", "-3d"),
        ("--since", "999999999w"),
        ("--action", "LOD3"),
        ("--action", ""),
    ],
)
def test_a_bad_filter_is_a_one_line_error(option: str, value: str, tmp_path: Path) -> None:
    result = run("report", "--url", f"sqlite:///{tmp_path / 'unused.db'}", option, value)
    assert_one_line_error(result, 2, f"Invalid value for '{option}'")
    assert not (tmp_path / "unused.db").exists()


def test_an_unreachable_database_is_a_one_line_error(backend: Any, tmp_path: Path) -> None:
    url = {
        "sqlite": f"sqlite:///{tmp_path / 'missing-directory' / 'metrics.db'}",
        "postgresql": "postgresql://postgres@127.0.0.1:1/nowhere",
    }[backend.name]
    for command in (["report"], ["report", "--check"], ["demo", "--size", "5"]):
        result = run(*command, "--url", url)
        assert_one_line_error(result, 1, "cannot use")


def test_report_on_a_database_without_the_schema_names_the_command(empty_database_url: str) -> None:
    if make_url(empty_database_url).get_backend_name() == "sqlite":
        with sqlite3.connect(make_url(empty_database_url).database or "") as connection:
            connection.execute("CREATE TABLE unrelated (x INTEGER)")
    result = run("report", "--url", empty_database_url)
    assert_one_line_error(result, 1, f"action-metrics db upgrade --url '{empty_database_url}'")


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason=f"no console script at {CONSOLE_SCRIPT}")
def test_the_console_script_runs_the_same_commands(empty_database_url: str) -> None:
    def script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CONSOLE_SCRIPT), *args],
            capture_output=True,
            text=True,
            env=cli_environment(),
            timeout=300,
            check=False,
        )

    assert script("db", "upgrade", "--url", empty_database_url).returncode == 0
    assert script("demo", "--url", empty_database_url, "--size", "50").returncode == 0
    document = json.loads(script("report", "--url", empty_database_url, "--json").stdout)
    assert document["metrics"]["count"] == 50


# --- serve ----------------------------------------------------------------------------------


def test_serve_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'metrics.db'}"
    assert_one_line_error(run("serve", "--url", url), 1, "ACTION_METRICS_API_TOKEN")
    assert_one_line_error(
        run("serve", "--url", url, ACTION_METRICS_API_TOKEN="short"), 1, "at least 16 characters"
    )
    assert_one_line_error(run("serve", "--url", url, ACTION_METRICS_API_TOKENS=f"{TOKEN}"), 1, "TOKEN:TOWN")


def test_serve_answers_over_http(store: MetricsStore) -> None:
    store.emit_many([metric(), metric(action_type=ActionType.LOD4, credits_charged=100)])
    url = store.url.render_as_string(False)
    server = subprocess.Popen(
        [sys.executable, "-m", "action_metrics", "serve", "--url", url, "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=cli_environment(ACTION_METRICS_API_TOKENS=f"{TOKEN}:town-a"),
    )
    try:
        assert server.stderr is not None
        address = None
        for line in server.stderr:  # uvicorn names its port once it listens (or the process ends)
            found = re.search(r"Uvicorn running on (http://\S+)", line)
            if found:
                address = found[1]
                break
        assert address, "the server did not start"
        assert address.startswith("http://127.0.0.1:")
        assert httpx.get(f"{address}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{address}/v1/town/town-a/metrics").status_code == 401
        authorized = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{address}/v1/town/town-b/metrics", headers=authorized).status_code == 403
        answer = httpx.get(f"{address}/v1/town/town-a/metrics?action_type=lod4", headers=authorized)
        assert answer.status_code == 200
        assert answer.json()["metrics"]["count"] == 1
        assert answer.json()["metrics"]["total_credits"] == 100
    finally:
        server.terminate()
        server.wait(timeout=60)
