"""Writers that go around the library: the database refuses rows that would break their readers, and
reads whatever it accepts. Rows are written as a DBA would, with plain INSERTs through Python's
`sqlite3` and the `psql` command line, not through SQLAlchemy."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import metric
from sqlalchemy import make_url

from action_metrics import MetricsStore
from action_metrics.migrate import downgrade_to, run_migrations, upgrade_to

AT = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def _row(dialect: str, **changed: str) -> dict[str, str]:
    """A valid row as SQL literals, with `changed` columns."""
    row_id = uuid.uuid4()
    row = {
        "id": f"'{row_id.hex}'" if dialect == "sqlite" else f"'{row_id}'",
        "timestamp": "'2026-11-20 10:00:00.000000'" if dialect == "sqlite" else "'2026-11-20 10:00:00+00'",
        "action_type": "'lod4'",
        "user_id": "'user-dba'",
        "town_id": "'town-dba'",
        "citizen_id": "NULL",
        "model": "'sonnet'",
        "tokens_in": "1000",
        "tokens_out": "200",
        "latency_ms": "250.5",
        "credits_charged": "100",
        "metadata": "'{}'",
    }
    return row | changed


def _insert(url: str, row: dict[str, str]) -> str | None:
    """INSERT `row` as a DBA would; None if stored, else the database's message."""
    statement = f"INSERT INTO action_metrics ({', '.join(row)}) VALUES ({', '.join(row.values())})"
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        with sqlite3.connect(parsed.database or "") as connection:
            try:
                connection.execute(statement)
            except sqlite3.DatabaseError as refused:
                return str(refused)
        return None
    done = _psql(url, statement)
    return done.stderr if done.returncode else None


def _psql(url: str, statement: str) -> subprocess.CompletedProcess[str]:
    parsed = make_url(url)
    command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", parsed.host or "127.0.0.1"]
    command += [
        "-p",
        str(parsed.port or 5432),
        "-U",
        parsed.username or "postgres",
        "-d",
        parsed.database or "",
    ]
    return subprocess.run([*command, "-c", statement], capture_output=True, text=True, check=False)


def _dialect(url: str) -> str:
    return make_url(url).get_backend_name()


# (what is wrong, its columns as SQL on SQLite and PostgreSQL (None: the same), the field named).
# On PostgreSQL the column types refuse a malformed id, timestamp or JSON themselves; their message
# names the type and the value, not the column (TYPE_OF).
REFUSED: list[tuple[str, dict[str, str], dict[str, str] | None, str]] = [
    ("an id that is not a UUID", {"id": "'x'"}, None, "id"),
    ("an id with dashes on SQLite", {"id": f"'{uuid.uuid4()}'"}, {"id": "'x'"}, "id"),
    ("an upper-case id on SQLite", {"id": f"'{uuid.uuid4().hex.upper()}'"}, {"id": "'x'"}, "id"),
    (
        "a timestamp in another format",
        {"timestamp": "'2026-11-20T10:00:00Z'"},
        {"timestamp": "'soon'"},
        "timestamp",
    ),
    (
        "a timestamp without microseconds",
        {"timestamp": "'2026-11-20 10:00:00'"},
        {"timestamp": "'x'"},
        "timestamp",
    ),
    ("an action type out of its pattern", {"action_type": "'Chat!'"}, None, "action_type"),
    ("an empty action type", {"action_type": "''"}, None, "action_type"),
    ("an empty user id", {"user_id": "''"}, None, "user_id"),
    ("an empty town id", {"town_id": "''"}, None, "town_id"),
    ("an empty citizen id", {"citizen_id": "''"}, None, "citizen_id"),
    ("a user id that is a blob", {"user_id": "X'75'"}, {"user_id": "''"}, "user_id"),
    ("an empty model", {"model": "''"}, None, "model"),
    ("an empty error", {"error": "''"}, None, "error"),
    ("negative tokens", {"tokens_in": "-5"}, None, "tokens_in"),
    ("negative output tokens", {"tokens_out": "-1"}, None, "tokens_out"),
    ("tokens that are text", {"tokens_in": "'12abc'"}, {"tokens_in": "-1"}, "tokens_in"),
    ("fractional tokens", {"tokens_out": "2.5"}, {"tokens_out": "-2"}, "tokens_out"),
    ("negative credits", {"credits_charged": "-1"}, None, "credits_charged"),
    ("negative cache reads", {"cache_read_tokens": "-1"}, None, "cache_read_tokens"),
    (
        "cache tokens beyond the input",
        {"cache_read_tokens": "900", "cache_write_tokens": "200"},
        None,
        "tokens_in_parts",
    ),
    ("reasoning beyond the output", {"reasoning_tokens": "201"}, None, "tokens_out_parts"),
    ("negative latency", {"latency_ms": "-0.5"}, None, "latency_ms"),
    ("latency beyond 1e15 ms", {"latency_ms": "1e16"}, None, "latency_ms"),
    ("latency as text", {"latency_ms": "'slow'"}, {"latency_ms": "'NaN'"}, "latency_ms"),
    ("metadata that is not JSON", {"metadata": "'not json'"}, None, "metadata"),
    ("metadata that is a JSON array", {"metadata": "'[1, 2]'"}, None, "metadata"),
    ("metadata that is a JSON string", {"metadata": "'\"x\"'"}, None, "metadata"),
]


TYPE_OF = {"id": "type uuid", "timestamp": "type timestamp with time zone", "metadata": "type json"}


@pytest.mark.parametrize(
    ("sqlite_columns", "postgresql_columns", "named"),
    [pytest.param(s, p, named, id=what) for what, s, p, named in REFUSED],
)
def test_a_row_that_would_break_its_readers_is_refused_naming_its_field(
    database_url: str, sqlite_columns: dict[str, str], postgresql_columns: dict[str, str] | None, named: str
) -> None:
    dialect = _dialect(database_url)
    columns = sqlite_columns if dialect == "sqlite" or postgresql_columns is None else postgresql_columns
    refused = _insert(database_url, _row(dialect, **columns))
    assert refused is not None, f"stored: {columns}"
    if dialect == "sqlite":
        assert f"CHECK constraint failed: ck_action_metrics_{named}" in refused, refused
    else:  # a rule of ours, or the column's type
        assert f'"ck_action_metrics_{named}"' in refused or TYPE_OF[named] in refused, refused
    assert _insert(database_url, _row(dialect)) is None  # the same row, fixed, is stored


def test_every_row_the_database_accepts_is_read(database_url: str) -> None:
    """Rows a DBA wrote within the rules, including what the library itself would not write (a model
    name with a newline, metadata deeper than 32 levels, a JSON number beyond a float)."""
    dialect = _dialect(database_url)
    deep = "{" + '"a": {' * 40 + "}" * 40 + "}"
    newline = "char(10)" if dialect == "sqlite" else "chr(10)"
    rows = [
        _row(dialect, model=f"'gpt' || {newline} || '4'", metadata=f"'{deep}'", error="'Timeout'"),
        _row(dialect, metadata='\'{"x": 1e999, "y": [1, null, "é"]}\'', citizen_id="'c'"),
        _row(dialect, latency_ms="0", tokens_in="0", tokens_out="0", credits_charged="0"),
    ]
    if dialect == "sqlite":
        rows.append(_row(dialect, latency_ms="7", tokens_in="'12'"))  # SQLite converts both: allowed
    for row in rows:
        assert _insert(database_url, row) is None, row
    with MetricsStore(database_url) as store:
        read = store.query()
        assert len(read) == len(rows)
        assert {m.model for m in read} == {"sonnet", "gpt\n4"}
        assert sum(m.error is not None for m in read) == 1
        assert any(m.metadata.get("x") is not None for m in read)
        for exact in (False, True):
            everything = store.aggregate(exact=exact)
            assert everything.count == len(rows)
            assert everything.error_count == 1
            assert everything.tokens_in == sum(m.tokens_in for m in read)
        assert [m.to_dict()["id"] for m in read]  # every metric serialises


def test_an_upgrade_over_rows_that_break_a_rule_stops_and_says_which(empty_database_url: str) -> None:
    url = empty_database_url
    dialect = _dialect(url)
    run = _run_migrations(url)
    run(upgrade_to("0004"))
    assert _insert(url, _row(dialect, tokens_in="-5")) is None  # nothing refused it before 0005
    assert _insert(url, _row(dialect, action_type="'Chat!'")) is None
    assert _insert(url, _row(dialect)) is None
    with pytest.raises(RuntimeError, match=r"1 rows break action_type .*; 1 rows break tokens_in"):
        run(upgrade_to("0005"))
    _sql(url, "DELETE FROM action_metrics WHERE tokens_in < 0 OR action_type = 'Chat!'")
    run(upgrade_to("0005"))
    assert _insert(url, _row(dialect, tokens_in="-5")) is not None
    run(downgrade_to("0004"))  # and back: the rules go
    assert _insert(url, _row(dialect, tokens_in="-5")) is None


def test_the_library_writes_within_the_rules(database_url: str) -> None:
    """Everything ActionMetric accepts at its extremes the database accepts too."""
    extremes = [
        metric(latency_ms=0.0, tokens_in=0, tokens_out=0, credits_charged=0),
        metric(
            latency_ms=1e15,
            tokens_in=2**62,
            tokens_out=2**62,
            cache_read_tokens=2**61,
            reasoning_tokens=2**62,
        ),
        metric(
            action_type="a" * 64, user_id="u" * 256, town_id="t" * 256, citizen_id="c" * 256, model="m" * 128
        ),
        metric(action_type="a.b-c_9", error="e" * 256, metadata={"deep": {"er": [1.5, math.pi, None]}}),
    ]
    with MetricsStore(database_url) as store:
        store.emit_many(extremes)
        assert sorted(m.id for m in store.query()) == sorted(m.id for m in extremes)


def _run_migrations(url: str) -> Any:
    import asyncio

    from action_metrics.dialects import backend_for

    def run(action: Any) -> None:
        async def go() -> None:
            engine = backend_for(url).create_engine()
            try:
                await run_migrations(engine, action)
            finally:
                await engine.dispose()

        asyncio.run(go())

    return run


def _sql(url: str, statement: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        with sqlite3.connect(parsed.database or "") as connection:
            connection.execute(statement)
    else:
        assert _psql(url, statement).returncode == 0
