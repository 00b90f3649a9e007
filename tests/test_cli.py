"""The command line on both backends: in this process through Click's runner, and once per command
through its real entry points in a subprocess (`test_the_console_script_runs_the_same_commands`,
`test_serve_answers_over_http`). The schema commands' effects are tested in test_migrations.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import CLI_VARIABLES, assert_one_line_error, metric, run_cli
from sqlalchemy import make_url

from action_metrics import ActionType, MetricsStore, ModelName, SchemaUnknown
from action_metrics.demo import DEMO_TOWN, SYSTEM_USER, TownPlan, simulate

SRC = Path(__file__).resolve().parents[1] / "src"
CONSOLE_SCRIPT = Path(sys.executable).with_name("action-metrics")
TOKEN = "cli-test-token-0123456789"


def subprocess_environment(**extra: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key not in CLI_VARIABLES}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    environment.update(extra)
    return environment


def an_hour_ago(**earlier: float) -> datetime:
    return datetime.now(UTC) - timedelta(hours=1, **earlier)


@pytest.fixture
def store(database_url: str) -> Iterator[MetricsStore]:
    # durable: each emit is committed before the command under test reads the database.
    with MetricsStore(database_url, durable=True) as store:
        yield store


def url_of(store: MetricsStore) -> str:
    return store.url.render_as_string(hide_password=False)


# --- db -------------------------------------------------------------------------------------


def test_the_url_comes_from_the_environment(empty_database_url: str) -> None:
    assert run_cli("db", "upgrade", ACTION_METRICS_URL=empty_database_url).exit_code == 0
    current = run_cli("db", "current", ACTION_METRICS_URL=empty_database_url)
    assert current.stdout.strip().endswith("(head)")
    assert (
        json.loads(run_cli("report", "--json", ACTION_METRICS_URL=empty_database_url).stdout)["metrics"][
            "count"
        ]
        == 0
    )


def test_db_prune_counts_then_removes_old_raw_rows_and_the_report_still_answers(
    store: MetricsStore,
) -> None:
    url = url_of(store)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    old = [metric(timestamp=today - timedelta(days=days, hours=3), tokens_in=days) for days in (20, 15, 12)]
    recent = [metric(timestamp=today - timedelta(days=2, hours=5)), metric(timestamp=an_hour_ago())]
    store.emit_many([*old, *recent])
    before = json.loads(run_cli("report", "--url", url, "--json").stdout)["metrics"]

    dry = run_cli("db", "prune", "--url", url, "--older-than", "10d", "--dry-run")
    assert dry.exit_code == 0, dry.output
    cutoff = (datetime.now(UTC) - timedelta(days=10)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert f"would remove 3 raw rows from before {cutoff.isoformat()}" in dry.stdout
    assert len(store.query()) == 5

    done = run_cli("db", "prune", "--url", url, "--older-than", "10d")
    assert done.exit_code == 0, done.output
    assert f"removed 3 raw rows from before {cutoff.isoformat()}" in done.stdout
    assert f"metrics from before {cutoff.isoformat()} are refused from now on" in done.stdout
    assert "Removing raw rows" in done.stderr  # the bar, once the cut-off is accepted
    assert len(store.query(since=cutoff)) == 2
    after = json.loads(run_cli("report", "--url", url, "--json").stdout)["metrics"]
    assert {key: after[key] for key in ("count", "tokens_in", "total_cost_usd")} == {
        key: before[key] for key in ("count", "tokens_in", "total_cost_usd")
    }  # all time: the rollups keep the pruned days

    # What needs the pruned raw rows says so, in one line naming the cut-off.
    since = (cutoff - timedelta(days=3, minutes=17)).isoformat()
    assert_one_line_error(run_cli("report", "--url", url, "--since", since), 1, cutoff.isoformat())
    assert_one_line_error(run_cli("db", "prune", "--url", url), 2, "exactly one of --older-than and --before")


def test_db_prune_dry_run_refuses_what_the_prune_refuses(store: MetricsStore) -> None:
    """An open cut-off is refused in one line, before the prune's progress bar shows (at 0/? above
    the error, it looked like a prune that had started)."""
    store.emit(metric(timestamp=an_hour_ago(days=3)))
    url = url_of(store)
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    for dry_run in ([], ["--dry-run"]):
        result = run_cli("db", "prune", "--url", url, "--before", tomorrow, *dry_run)
        assert_one_line_error(
            result, 1, f"cannot prune up to {tomorrow}T00:00:00+00:00: the rollups are closed"
        )
        assert "Removing raw rows" not in result.stderr
    assert len(store.query()) == 1


def test_tables_written_to_a_pipe_are_not_cut_to_80_columns(store: MetricsStore) -> None:
    """Rich takes 80 columns without a terminal: `prices list | less` read `effecti…` and `beginni…`.
    A pipe or a file gets wide tables; `$COLUMNS` still rules when set."""
    store.emit(metric(user_id="a-user-whose-name-is-long-enough-to-need-its-column"))
    listed = run_cli("prices", "list", "--url", url_of(store), COLUMNS="")  # run_cli sets 120
    assert listed.exit_code == 0, listed.output
    assert "effective_from" in listed.output
    assert any(
        line.startswith("│ haiku ") and "│ beginning of time │" in line for line in listed.output.splitlines()
    )
    by_user = run_cli("report", "--url", url_of(store), "--by", "user", COLUMNS="")
    assert "a-user-whose-name-is-long-enough-to-need-its-column" in by_user.output
    narrow = run_cli("prices", "list", "--url", url_of(store), COLUMNS="60")
    assert max(len(line) for line in narrow.output.splitlines()) <= 60


def test_an_unsupported_url_is_refused_with_the_supported_ones() -> None:
    result = run_cli("db", "upgrade", "--url", "mysql://root@localhost/x")
    assert_one_line_error(result, 1, "sqlite:///")


def _execute(url: str, *statements: str) -> None:
    """Run `statements` on the database at `url` as a DBA would, in plain SQL."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        with sqlite3.connect(parsed.database or "") as connection:
            for statement in statements:
                connection.execute(statement)
        return

    async def run() -> None:
        connection = await asyncpg.connect(parsed.set(drivername="postgresql").render_as_string(False))
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


def _revision(url: str) -> str:
    return run_cli("db", "current", "--url", url).stdout.split()[0]


@pytest.mark.parametrize("start", ["0002", "0004"])
def test_an_upgrade_over_rows_that_break_a_rule_is_one_line(start: str, empty_database_url: str) -> None:
    """0005's refusal is one line and exit 1, not a traceback; the database stays at its revision.
    From before 0004, `error` is named after metadata.error, where that database keeps it, and the
    rules over the token kinds 0004 adds as 0 (which break only with their totals) are left out."""
    url = empty_database_url
    assert run_cli("db", "upgrade", start, "--url", url).exit_code == 0
    sqlite = make_url(url).get_backend_name() == "sqlite"
    row = {
        "id": f"'{uuid.uuid4().hex}'",
        "timestamp": "'2026-11-20 10:00:00.000000'" if sqlite else "'2026-11-20 10:00:00+00'",
        "action_type": "'lod3'",
        "user_id": "'u'",
        "town_id": "'t'",
        "model": "'haiku'",
        "tokens_in": "-5",
        "tokens_out": "0",
        "latency_ms": "1",
        "credits_charged": "0",
        "metadata": """'{"error": ""}'""",  # 0004 moves an empty error into `error`, which breaks it
        **({"error": "''"} if start == "0004" else {}),
    }
    _execute(url, f"INSERT INTO action_metrics ({', '.join(row)}) VALUES ({', '.join(row.values())})")

    result = run_cli("db", "upgrade", "--url", url)
    error = "from metadata.error: NULL or 1-256 characters" if start == "0002" else "NULL or 1-256 characters"
    assert_one_line_error(
        result, 1, f"action_metrics holds rows that its readers cannot read: 1 rows break error ({error})"
    )
    assert "1 rows break tokens_in (an integer >= 0)" in result.stderr
    assert ("tokens_in_parts" in result.stderr) == (start == "0004")
    assert _revision(url) == start


@pytest.mark.parametrize(
    "command",
    [
        ["db", "current"],
        ["db", "upgrade"],
        ["db", "prune", "--older-than", "5d"],
        ["report"],
        ["prices", "list"],
    ],
)
def test_a_sqlite_url_with_two_slashes_is_one_line_showing_the_form(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_cli(*command, "--url", "sqlite://relative.db")
    assert_one_line_error(result, 1, "sqlite:///relative.db (from the working directory) or sqlite:////")
    assert "'sqlite://relative.db'" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("revision", "whole_schema"), [("0099", True), ("9a1b2c3d", False)])
def test_a_database_at_an_unknown_revision_is_named_and_left_alone(
    backend: Any, revision: str, whole_schema: bool
) -> None:
    """A newer release's revision (the whole schema there), or another project's (only its
    alembic_version): `db current` says it is unknown, every migration refuses it in one line."""
    url = backend.migrated() if whole_schema else backend.empty()
    try:
        if whole_schema:
            _execute(url, f"UPDATE alembic_version SET version_num = '{revision}'")
        else:
            _execute(
                url,
                "CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)",
                f"INSERT INTO alembic_version VALUES ('{revision}')",
            )
        current = run_cli("db", "current", "--url", url)
        assert current.exit_code == 0, current.output
        assert current.stdout.startswith(
            f"{revision} (unknown to this action-metrics, whose revisions are 0001 to "
        )
        assert "behind" not in current.stdout
        for command in (
            ["upgrade"],
            ["upgrade", "--sql"],
            ["downgrade", "base"],
            ["downgrade", "--sql", "base"],
            ["downgrade", "--url", url, "--", "-1"],
            ["downgrade", "--sql", "--url", url, "--", "-1"],
        ):
            given = command if "--url" in command else [*command, "--url", url]
            result = run_cli("db", *given)
            assert_one_line_error(
                result, 1, f"is at schema revision {revision}, unknown to this action-metrics"
            )
            assert "nothing was changed" in result.stderr
        # A store refuses it too: as newer only where it is a revision number past head.
        report = run_cli("report", "--url", url)
        if whole_schema:
            assert_one_line_error(report, 1, f"at schema revision {revision}, newer than this action-metrics")
        else:
            assert_one_line_error(report, 1, f"at schema revision {revision}, unknown to this action-metrics")
            assert "newer" not in report.stderr
            store = MetricsStore(url)
            try:
                with pytest.raises(SchemaUnknown, match="names an action-metrics database"):
                    store.open()
            finally:
                store.close()
        assert _revision(url) == revision
    finally:
        backend.drop(url)


def test_db_downgrade_to_base_asks_first_naming_the_actions_it_drops(database_url: str) -> None:
    """No answer (a script without a terminal) and 'n' are no: nothing changes. 'y' or --yes drops
    the tables; --sql prints without asking."""
    with MetricsStore(database_url) as store:
        store.emit_many([metric(), metric(), metric()])
    for answer in (None, "n\n"):
        refused = run_cli("db", "downgrade", "base", "--url", database_url, stdin=answer)
        assert refused.exit_code == 1, refused.output
        assert (
            "drops every action-metrics table, with the 3 actions stored and the rollups. Go on?"
            in refused.stderr
        )
        assert "Aborted" in refused.stderr
        with MetricsStore(database_url) as store:
            assert len(store.query()) == 3
    assert run_cli("db", "downgrade", "base", "--sql", "--url", database_url).exit_code == 0
    # Not to base: no question.
    assert run_cli("db", "downgrade", "0019", "--url", database_url).exit_code == 0
    dropped = run_cli("db", "downgrade", "base", "--url", database_url, stdin="y\n")
    assert dropped.exit_code == 0, dropped.output
    assert "is at revision base" in dropped.stderr
    assert run_cli("db", "upgrade", "--url", database_url).exit_code == 0
    assert run_cli("db", "downgrade", "base", "--yes", "--url", database_url).exit_code == 0


@pytest.mark.parametrize(
    "command",
    [
        ["db", "prune", "--older-than", "5d"],
        ["db", "prune", "--older-than", "5d", "--dry-run"],
        ["db", "downgrade", "base"],
        ["db", "downgrade", "--sql", "base"],
        ["report"],
        ["report", "--json"],
        ["report", "--by", "town"],
        ["prices", "list"],
        ["prices", "sync"],
        ["prices", "set", "haiku", "--input", "1", "--output", "5"],
    ],
)
def test_a_command_on_a_sqlite_file_that_is_not_there_creates_nothing(
    command: list[str], tmp_path: Path
) -> None:
    """A mistyped path is an error naming the file, not a new empty store answering zeros."""
    missing = tmp_path / "missing.db"
    result = run_cli(*command, "--url", f"sqlite:///{missing}")
    assert_one_line_error(result, 1, f"there is no file {missing} (a mistyped path?)")
    assert "action-metrics db upgrade --url" in result.stderr
    assert not list(tmp_path.iterdir())


def test_demo_and_db_upgrade_still_create_a_sqlite_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They are how a store is made (`make demo`, the quick start); then the other commands read it."""
    monkeypatch.chdir(tmp_path)
    assert run_cli("demo", "--size", "5").exit_code == 0  # the default, sqlite:///action_metrics.db
    assert (tmp_path / "action_metrics.db").is_file()
    assert run_cli("report", "--json").exit_code == 0
    upgraded = run_cli("db", "upgrade", "--url", "sqlite:///new.db")
    assert upgraded.exit_code == 0, upgraded.output
    assert run_cli("prices", "list", "--url", "sqlite:///new.db").exit_code == 0


def test_db_prune_at_an_earlier_cutoff_says_the_later_one_stands(store: MetricsStore) -> None:
    url = url_of(store)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    store.emit_many([metric(timestamp=today - timedelta(days=days, hours=3)) for days in (30, 20, 3)])
    assert run_cli("db", "prune", "--url", url, "--older-than", "10d").exit_code == 0
    cutoff = (datetime.now(UTC) - timedelta(days=10)).replace(hour=0, minute=0, second=0, microsecond=0)
    earlier = (cutoff - timedelta(days=15)).date().isoformat()

    again = run_cli("db", "prune", "--url", url, "--before", earlier)
    assert again.exit_code == 0, again.output
    assert f"removed 0 raw rows from before {earlier}T00:00:00+00:00" in again.stdout
    assert f"pruned before {cutoff.isoformat()} already, a later cut-off, which stands" in again.stdout
    assert f"metrics from before {cutoff.isoformat()} are refused" in again.stdout
    assert "from now on" not in again.stdout
    dry = run_cli("db", "prune", "--url", url, "--before", earlier, "--dry-run")
    assert f"pruned before {cutoff.isoformat()} already, which stands" in dry.stdout
    # The cut-off in force is still the later one: what needs the raw rows before it is refused.
    assert_one_line_error(run_cli("report", "--url", url, "--since", "12d"), 1, cutoff.isoformat())


def test_db_copy_refuses_a_pruned_source_before_its_progress_bar(backend: Any, store: MetricsStore) -> None:
    store.emit(metric(timestamp=an_hour_ago(days=20)))
    url = url_of(store)
    assert run_cli("db", "prune", "--url", url, "--older-than", "10d").exit_code == 0
    destination = backend.migrated()
    try:
        result = run_cli("db", "copy", "--from", url, "--to", destination)
        assert_one_line_error(result, 1, "was pruned")
        assert "Copying actions" not in result.stderr
        copied = run_cli("db", "copy", "--from", url, "--to", destination, "--skip-pruned-period")
        assert copied.exit_code == 0, copied.output
        assert "Copying actions" in copied.stderr  # the bar, once the copy runs
    finally:
        backend.drop(destination)


# --- demo -----------------------------------------------------------------------------------


def test_demo_records_the_town_as_the_seed_integrations_did(store: MetricsStore) -> None:
    started = datetime.now(UTC)
    result = run_cli("demo", "--url", url_of(store), "--size", "400", "--days", "2")
    assert result.exit_code == 0, result.output
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
            assert (m.credits_charged, m.error) in ((50, None), (0, "ConsentRefused"))
        else:
            expected = {ActionType.BRANCH: 150, ActionType.INHABIT: 100}
            assert m.credits_charged == expected[ActionType(m.action_type)]


def test_demo_replays_the_same_town_from_the_same_seed(backend: Any, database_url: str) -> None:
    other_url = backend.migrated()
    try:
        for url in (database_url, other_url):
            result = run_cli("demo", "--url", url, "--size", "250", "--seed", "7", "--town", "replay")
            assert result.exit_code == 0, result.output
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
    assert [m.id for m in first] == sorted(m.id for m in first)  # time-ordered, like uuid7()
    assert all(end - timedelta(days=3) <= m.timestamp < end for m in first)


def test_the_demo_town_reaches_the_present() -> None:
    """Half a minute after midnight UTC, "today" already has LOD3 queries."""
    end = datetime(2026, 1, 16, 0, 0, 30, tzinfo=UTC)
    town = simulate(TownPlan(seed=5, size=200, days=3, end=end))
    assert len(town) == 200
    today = [m for m in town if m.action_type == ActionType.LOD3 and m.timestamp >= end.replace(second=0)]
    assert today
    assert all(m.timestamp < end for m in town)


def test_demo_into_a_database_behind_the_schema_is_one_line(empty_database_url: str) -> None:
    if make_url(empty_database_url).get_backend_name() == "sqlite":
        # Someone else's tables, no action-metrics schema: never migrated implicitly.
        with sqlite3.connect(make_url(empty_database_url).database or "") as connection:
            connection.execute("CREATE TABLE unrelated (x INTEGER)")
    result = run_cli("demo", "--url", empty_database_url, "--size", "10")
    assert_one_line_error(result, 1, "action-metrics db upgrade")


# --- report ---------------------------------------------------------------------------------


def test_report_json_is_the_aggregate_of_the_same_filters(store: MetricsStore) -> None:
    now = datetime.now(UTC)
    lod3 = {"model": ModelName.TEMPLATE, "tokens_in": 0, "tokens_out": 0}
    store.emit_many(
        [
            metric(**lod3, latency_ms=100.0, timestamp=an_hour_ago()),
            metric(**lod3, latency_ms=140.0, timestamp=an_hour_ago(days=2)),
            metric(**lod3, latency_ms=400.0, timestamp=an_hour_ago(days=9)),  # outside 7d
            metric(**lod3, action_type=ActionType.LOD4, credits_charged=100, timestamp=an_hour_ago()),
            metric(
                action_type=ActionType.DIALOGUE,
                model=ModelName.HAIKU,
                tokens_in=500,
                tokens_out=120,
                credits_charged=0,
                latency_ms=640.0,
                timestamp=an_hour_ago(),
            ),
            metric(**lod3, town_id="town-2", latency_ms=90.0, timestamp=an_hour_ago()),
        ]
    )
    url = url_of(store)
    result = run_cli(
        "report", "--url", url, "--town", "town-1", "--action", "lod3", "--since", "7d", "--json"
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    filters = document["filters"]
    assert filters["town_id"] == "town-1"
    assert filters["action_type"] == "lod3"
    assert filters["model"] is None
    since = datetime.fromisoformat(filters["since"])
    assert abs(since - (now - timedelta(days=7))) < timedelta(minutes=5)
    expected = store.aggregate(town_id="town-1", action_type="lod3", since=since)
    assert document["metrics"] == expected.to_dict()
    assert document["metrics"]["count"] == 2
    assert document["metrics"]["avg_latency_ms"] == pytest.approx(120.0)
    assert "checks" not in document

    # --until ends the window: from 7 days to 1 day ago holds only the LOD3 of 2 days ago.
    ended = run_cli(
        "report",
        "--url",
        url,
        "--town",
        "town-1",
        "--action",
        "lod3",
        "--since",
        "7d",
        "--until",
        "1d",
        "--json",
    )
    assert ended.exit_code == 0, ended.output
    window = json.loads(ended.stdout)
    until = datetime.fromisoformat(window["filters"]["until"])
    assert abs(until - (now - timedelta(days=1))) < timedelta(minutes=5)
    assert window["metrics"]["count"] == 1
    assert window["metrics"]["avg_latency_ms"] == pytest.approx(140.0)
    since = datetime.fromisoformat(window["filters"]["since"])
    assert (
        window["metrics"]
        == store.aggregate(town_id="town-1", action_type="lod3", since=since, until=until).to_dict()
    )
    per_town = run_cli("report", "--url", url, "--by", "town", "--until", "1d", "--json")
    assert per_town.exit_code == 0, per_town.output
    # Before 1 day ago: the LOD3s of 2 and 9 days ago, both town-1's.
    assert {row["town_id"]: row["count"] for row in json.loads(per_town.stdout)} == {"town-1": 2}
    backwards = run_cli("report", "--url", url, "--since", "1d", "--until", "7d")
    assert_one_line_error(backwards, 2, "Invalid value for '--until': must be after --since")

    everything = json.loads(run_cli("report", "--url", url, "--json").stdout)
    assert everything["metrics"] == store.aggregate().to_dict()
    assert everything["metrics"]["count"] == 6
    by_model = json.loads(run_cli("report", "--url", url, "--model", "haiku", "--json").stdout)
    assert by_model["metrics"]["count"] == 1
    assert by_model["metrics"]["total_tokens"] == 620


def test_report_table_shows_totals_and_models(store: MetricsStore) -> None:
    store.emit_many(
        [
            metric(model=ModelName.TEMPLATE),
            metric(tokens_in=300, tokens_out=90),
            metric(latency_ms=30_000.0, error="TimeoutError"),
        ]
    )
    result = run_cli("report", "--url", url_of(store))
    assert result.exit_code == 0, result.output
    assert re.search(r"actions\s*│\s*3\b", result.stdout)
    assert re.search(r"failed actions\s*│\s*1\b", result.stdout)
    assert "30,000" not in result.stdout.split("latency p50")[1].splitlines()[0]  # successes only
    assert "By model" in result.stdout
    assert "haiku" in result.stdout
    assert "template" in result.stdout


def test_report_check_fails_on_a_slow_lod3(store: MetricsStore) -> None:
    store.emit_many([metric(latency_ms=float(latency)) for latency in (120, 130, 150, 900, 950)])
    url = url_of(store)

    broken = run_cli("report", "--url", url, "--check")
    assert broken.exit_code == 3, broken.output
    assert "FAIL" in broken.stdout
    assert "checks failed: LOD3 p95 latency within 300 ms" in broken.stderr

    as_json = run_cli("report", "--url", url, "--check", "--json")
    assert as_json.exit_code == 3
    document = json.loads(as_json.stdout)
    assert document["passed"] is False
    assert [check["status"] for check in document["checks"]] == ["fail", "no data"]

    generous = run_cli("report", "--url", url, "--check", "--lod3-p95-budget-ms", "1000")
    assert generous.exit_code == 0, generous.output
    from_environment = run_cli("report", "--url", url, "--check", ACTION_METRICS_LOD3_P95_BUDGET_MS="1000")
    assert from_environment.exit_code == 0


def test_report_check_fails_on_an_undercharged_force(store: MetricsStore) -> None:
    force = {"action_type": ActionType.FORCE, "model": ModelName.SONNET, "tokens_in": 900, "tokens_out": 200}
    store.emit_many(
        [
            metric(**force, credits_charged=50),
            metric(**force, credits_charged=0, error="ConsentRefused"),  # failed: no charge
        ]
    )
    url = url_of(store)
    assert run_cli("report", "--url", url, "--check").exit_code == 0

    store.emit(metric(**force, credits_charged=10, town_id="town-2"))
    broken = run_cli("report", "--url", url, "--check", "--json")
    assert broken.exit_code == 3
    force_check = json.loads(broken.stdout)["checks"][1]
    assert force_check["status"] == "fail"
    assert "1 of 2 charged 50; 1 failed and charged nothing; 1 undercharged" in force_check["detail"]
    # The check follows --town: town-1 alone is still clean.
    assert run_cli("report", "--url", url, "--check", "--town", "town-1").exit_code == 0


def test_report_check_checks_whatever_is_printed(store: MetricsStore, tmp_path: Path) -> None:
    """A CI job gating on `report --check` gets exit 3 from a breakdown, CSV, JSON rows and the
    page alike, never a silent pass; stdout stays the rows when they are CSV or JSON."""
    store.emit_many([metric(latency_ms=float(latency)) for latency in (120, 130, 150, 900, 950)])
    url = url_of(store)
    assert run_cli("report", "--url", url, "--check").exit_code == 3
    for mode in (["--by", "town"], ["--bucket", "day"], ["--by", "town", "--json"], ["--csv"]):
        result = run_cli("report", "--url", url, "--check", *mode)
        assert result.exit_code == 3, (mode, result.output)
        assert "checks failed: LOD3 p95 latency within 300 ms" in result.stderr
    rows = run_cli("report", "--url", url, "--check", "--by", "town", "--json")
    assert [row["town_id"] for row in json.loads(rows.stdout)] == ["town-1"]
    page = tmp_path / "page.html"
    written = run_cli("report", "--url", url, "--check", "--html", str(page))
    assert written.exit_code == 3, written.output
    assert page.read_text(encoding="utf-8").startswith("<!")
    assert "FAIL" in written.stdout
    generous = ("--lod3-p95-budget-ms", "1000")
    for mode in (["--by", "town"], ["--csv"], ["--html", str(page)]):
        assert run_cli("report", "--url", url, "--check", *generous, *mode).exit_code == 0, mode


def test_report_check_json_says_what_the_exit_code_says(store: MetricsStore) -> None:
    """The limits are checks of the JSON like the others: `passed` is false exactly when the exit is 3."""
    store.emit_many([metric(), metric(action_type=ActionType.LOD4, credits_charged=100)])
    url = url_of(store)
    generous = ("--lod3-p95-budget-ms", "100000")
    failed = run_cli("report", "--url", url, "--check", "--json", "--min-gross-margin", "0.99999", *generous)
    assert failed.exit_code == 3, failed.output
    document = json.loads(failed.stdout)
    assert document["passed"] is False
    (limit,) = [check for check in document["checks"] if check["kind"] == "limit"]
    assert limit["name"] == "gross margin at least 0.99999 (the selection)"
    assert limit["status"] == "fail"
    assert "check failed: min gross margin (0.99999): all towns at" in failed.stderr

    ceiling = ("--max-cost-usd-per-day", "0.0000001")
    per_town = run_cli("report", "--url", url, "--check", "--json", "--by", "town", *ceiling, *generous)
    assert per_town.exit_code == 3, per_town.output
    passed = run_cli(
        "report",
        "--url",
        url,
        "--check",
        "--json",
        "--min-gross-margin",
        "-1",
        "--max-cost-usd-per-day",
        "1e9",
    )
    assert passed.exit_code == 0, passed.output
    document = json.loads(passed.stdout)
    assert document["passed"] is True
    assert [check["status"] for check in document["checks"] if check["kind"] == "limit"] == ["pass", "pass"]


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["--by", "town", "--tz", "Mars/Base", "--bucket", "day"], "Invalid value for '--tz'"),
        (["--tz", "Mars/Base"], "Invalid value for '--tz'"),
        (["--by", "town", "--sort", "nope"], "Invalid value for '--sort'"),
        (["--by", "town", "--csv", "--json"], "--json cannot be used with --csv"),
        (["--html", "/nonexistent/x.html"], "Invalid value for '--html'"),
        (["--html", "{tmp}/page.html", "--by", "town"], "--by cannot be used with --html"),
        (["--min-gross-margin", "0.3"], "--min-gross-margin given without --check"),
    ],
)
def test_a_bad_or_contradictory_report_option_is_a_one_line_error(
    arguments: list[str], fragment: str, tmp_path: Path
) -> None:
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    result = run_cli("report", "--url", f"sqlite:///{tmp_path / 'unused.db'}", *arguments)
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "unused.db").exists()  # refused before any database is opened
    assert not (tmp_path / "page.html").exists()


def test_a_bad_report_argument_found_by_the_store_names_its_option(store: MetricsStore) -> None:
    """What only the store can judge (a bucket count over its limit) is a bad option too: exit 2."""
    store.emit_many([metric(timestamp=datetime(2001, 1, 1, tzinfo=UTC)), metric()])
    result = run_cli("report", "--url", url_of(store), "--bucket", "hour")
    assert_one_line_error(result, 2, "Invalid value for '--bucket'")


def test_report_html_into_a_file_it_cannot_write_is_one_line(store: MetricsStore, tmp_path: Path) -> None:
    unwritable = tmp_path / f"{'x' * 300}.html"  # a name longer than a file system takes
    result = run_cli("report", "--url", url_of(store), "--html", str(unwritable))
    assert_one_line_error(result, 1, "cannot write")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--since", "24x"),
        ("--since", "0h"),
        ("--since", "yesterday"),
        ("--since", "-3d"),
        ("--since", "999999999w"),
        ("--until", "0h"),
        ("--until", "soon"),
        ("--action", "LOD3"),
        ("--action", ""),
        ("--model", ""),
        ("--town", ""),  # an unset shell variable: refused, not "0 actions"
    ],
)
def test_a_bad_filter_is_a_one_line_error(option: str, value: str, tmp_path: Path) -> None:
    result = run_cli("report", "--url", f"sqlite:///{tmp_path / 'unused.db'}", option, value)
    assert_one_line_error(result, 2, f"Invalid value for '{option}'")
    assert not (tmp_path / "unused.db").exists()


# A thread's traceback after the one-line error (aiosqlite's worker, see cli.run_async) fails it.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_unreachable_database_is_a_one_line_error(backend: Any, tmp_path: Path) -> None:
    url = {
        "sqlite": f"sqlite:///{tmp_path / 'missing-directory' / 'metrics.db'}",
        "postgresql": "postgresql://postgres@127.0.0.1:1/nowhere",
    }[backend.name]
    for command in (["report"], ["report", "--check"], ["demo", "--size", "5"], ["db", "current"]):
        assert_one_line_error(run_cli(*command, "--url", url), 1, "cannot use")


def test_report_on_a_database_without_the_schema_names_the_command(empty_database_url: str) -> None:
    if make_url(empty_database_url).get_backend_name() == "sqlite":
        with sqlite3.connect(make_url(empty_database_url).database or "") as connection:
            connection.execute("CREATE TABLE unrelated (x INTEGER)")
    result = run_cli("report", "--url", empty_database_url)
    assert_one_line_error(result, 1, f"action-metrics db upgrade --url '{empty_database_url}'")


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason=f"no console script at {CONSOLE_SCRIPT}")
def test_the_console_script_runs_the_same_commands(empty_database_url: str) -> None:
    def script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CONSOLE_SCRIPT), *args],
            capture_output=True,
            text=True,
            env=subprocess_environment(),
            timeout=300,
            check=False,
        )

    upgraded = script("db", "upgrade", "--url", empty_database_url)
    assert upgraded.returncode == 0, upgraded.stderr
    demo = script("demo", "--url", empty_database_url, "--size", "50")
    assert demo.returncode == 0, demo.stderr
    document = json.loads(script("report", "--url", empty_database_url, "--json").stdout)
    assert document["metrics"]["count"] == 50


# --- serve ----------------------------------------------------------------------------------


def test_serve_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'metrics.db'}"
    assert_one_line_error(run_cli("serve", "--url", url), 1, "ACTION_METRICS_API_TOKEN")
    assert_one_line_error(
        run_cli("serve", "--url", url, ACTION_METRICS_API_TOKEN="short"), 1, "at least 16 characters"
    )
    assert_one_line_error(run_cli("serve", "--url", url, ACTION_METRICS_API_TOKENS=TOKEN), 1, "TOKEN:TOWN")


def test_serve_refuses_workers_that_could_not_share_the_store(tmp_path: Path) -> None:
    """Several processes need one database: not an in-memory SQLite one, not a chdb directory."""
    for url, fragment in [
        ("sqlite://", "in-memory SQLite"),
        (f"chdb://{tmp_path / 'clickhouse'}", "ClickHouse store is served by one process"),
    ]:
        result = run_cli("serve", "--url", url, "--insecure", "--workers", "2")
        assert_one_line_error(result, 2, fragment)
        assert "--workers" in result.stderr


def test_serve_answers_over_http(store: MetricsStore) -> None:
    store.emit_many([metric(), metric(action_type=ActionType.LOD4, credits_charged=100)])
    server = subprocess.Popen(
        [sys.executable, "-m", "action_metrics", "serve", "--url", url_of(store), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_environment(ACTION_METRICS_API_TOKENS=f"{TOKEN}:town-1"),
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
        assert httpx.get(f"{address}/v1/town/town-1/metrics").status_code == 401
        authorized = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{address}/v1/town/town-2/metrics", headers=authorized).status_code == 403
        answer = httpx.get(f"{address}/v1/town/town-1/metrics?action_type=lod4", headers=authorized)
        assert answer.status_code == 200
        assert answer.json()["metrics"]["count"] == 1
        assert answer.json()["metrics"]["total_credits"] == 100
    finally:
        server.terminate()
        server.wait(timeout=60)
