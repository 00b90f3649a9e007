"""The database refuses rows that would break their readers, whoever writes them.

`ActionMetric` checks every metric the library writes; a DBA's INSERT, an ETL job or another service
writing SQL went around it (a row with id `x`, action type `Chat!`, -5 tokens and metadata `not
json` was stored, after which `query()` failed and `aggregate()` counted the -5). Each rule below is
the database's own form of one check of `ActionMetric`, named after its field:

- PostgreSQL: CHECK constraints `ck_action_metrics_<field>`, added in one ALTER TABLE (one scan of
  the rows already stored). Its types already hold the id (uuid), the timestamp (timestamptz) and the
  metadata (jsonb: valid JSON).
- SQLite: the same CHECK constraints, which SQLite adds only to a new table: the rows are copied
  into one that has them (alembic's batch mode; a few minutes for 10M rows, once). They also hold
  what SQLite's column types let through: text in an integer column, an id or a timestamp in another
  format (which would not match or would sort wrongly), text that is not JSON. Checks cost ~3 µs per
  row on SQLite; triggers, the other way to add rules without a copy, cost ~4.6 µs.

Rows already stored are checked first, in one scan: if any breaks a rule, the upgrade stops and says
which rule and how many rows, before changing anything.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import sqlalchemy as sa
from alembic import op
from sqlalchemy import text

from action_metrics.errors import UpgradeRefused
from action_metrics.migrate import UPGRADED_FROM
from action_metrics.views import create_views, drop_views

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


class Rule(NamedTuple):
    field: str
    rule: str  # what the error message says
    postgresql: str | None  # None: the column's type holds it already
    sqlite: str


def _count(column: str) -> tuple[str, str]:
    return f"{column} >= 0", f"typeof({column}) = 'integer' AND {column} >= 0"


def _text(column: str, longest: int, nullable: bool = False) -> tuple[str, str]:
    # PostgreSQL's varchar(n) holds the longest; SQLite's declared length holds nothing.
    postgresql = f"length({column}) >= 1"
    sqlite = f"typeof({column}) = 'text' AND length({column}) BETWEEN 1 AND {longest}"
    if nullable:
        postgresql = f"{column} IS NULL OR {postgresql}"
        sqlite = f"{column} IS NULL OR {sqlite}"
    return postgresql, sqlite


# PostgreSQL reports the first broken CHECK by name: a total's own rule (tokens_in) sorts before the
# rule over its parts (tokens_in_parts), so a negative total is named as such.
RULES = (
    Rule(
        "id",
        "32 lowercase hex digits (a UUID as SQLAlchemy stores it on SQLite)",
        None,
        "typeof(id) = 'text' AND length(id) = 32 AND id NOT GLOB '*[^0-9a-f]*'",
    ),
    Rule(
        "timestamp",
        "UTC as YYYY-MM-DD HH:MM:SS.ffffff",
        None,
        "typeof(timestamp) = 'text' AND timestamp GLOB '[0-9][0-9][0-9][0-9]-[01][0-9]-[0-3][0-9] "
        "[0-2][0-9]:[0-5][0-9]:[0-5][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]'",
    ),
    Rule(
        "action_type",
        "1-64 characters of a-z, 0-9, _, - and .",
        "action_type ~ '^[a-z0-9_.-]{1,64}$'",
        "typeof(action_type) = 'text' AND length(action_type) BETWEEN 1 AND 64 "
        "AND action_type NOT GLOB '*[^a-z0-9_.-]*'",
    ),
    Rule("user_id", "1-256 characters", *_text("user_id", 256)),
    Rule("town_id", "1-256 characters", *_text("town_id", 256)),
    Rule("citizen_id", "NULL or 1-256 characters", *_text("citizen_id", 256, nullable=True)),
    Rule("model", "1-128 characters", *_text("model", 128)),
    Rule("error", "NULL or 1-256 characters", *_text("error", 256, nullable=True)),
    Rule("tokens_in", "an integer >= 0", *_count("tokens_in")),
    Rule("tokens_out", "an integer >= 0", *_count("tokens_out")),
    Rule("credits_charged", "an integer >= 0", *_count("credits_charged")),
    Rule("cache_read_tokens", "an integer >= 0", *_count("cache_read_tokens")),
    Rule("cache_write_tokens", "an integer >= 0", *_count("cache_write_tokens")),
    Rule("reasoning_tokens", "an integer >= 0", *_count("reasoning_tokens")),
    Rule(
        "tokens_in_parts",
        "cache_read_tokens + cache_write_tokens <= tokens_in (inclusive totals)",
        "cache_read_tokens + cache_write_tokens <= tokens_in",
        "cache_read_tokens + cache_write_tokens <= tokens_in",
    ),
    Rule(
        "tokens_out_parts",
        "reasoning_tokens <= tokens_out (inclusive totals)",
        "reasoning_tokens <= tokens_out",
        "reasoning_tokens <= tokens_out",
    ),
    # NaN is larger than every number in PostgreSQL, so it fails the upper bound.
    Rule(
        "latency_ms",
        "a number from 0 to 1e15",
        "latency_ms >= 0 AND latency_ms <= 1e15",
        "typeof(latency_ms) IN ('real', 'integer') AND latency_ms BETWEEN 0 AND 1e15",
    ),
    Rule(
        "metadata",
        "a JSON object",
        "jsonb_typeof(metadata) = 'object'",
        # CASE: json_type() raises on text that is not JSON, and AND may evaluate it all the same.
        "CASE WHEN typeof(metadata) = 'text' AND json_valid(metadata) "
        "THEN json_type(metadata) = 'object' ELSE 0 END",
    ),
)
TABLE = "action_metrics"
# Every view that reads action_metrics: SQLite re-checks views when a table is renamed.
VIEWS = (
    ("action_metrics_priced", "0004"),
    ("action_metrics_daily", "0004"),
    ("action_metrics_hourly", "0004"),
    ("action_metrics_daily_by_model", "0004"),
    ("action_metrics_daily_by_town", "0004"),
)


def _condition(rule: Rule, dialect: str) -> str | None:
    return rule.postgresql if dialect == "postgresql" else rule.sqlite


# What 0004 added to every action: the token kinds as 0 (the rules over them and their totals then
# break only where tokens_in or tokens_out does), and `error` from the metadata's `error` key.
ADDED_BY_0004 = frozenset(
    {"cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "tokens_in_parts", "tokens_out_parts"}
)


def _upgraded_from_before_0004() -> bool:
    config = op.get_context().config
    if config is None or UPGRADED_FROM not in config.attributes:
        return False
    start = config.attributes[UPGRADED_FROM]
    return start in (None, "0001", "0002", "0003")


def _refuse_existing_rows_that_break_a_rule(dialect: str) -> None:
    rules = [(rule, _condition(rule, dialect)) for rule in RULES]
    counts = ", ".join(
        f"count(CASE WHEN ({condition}) = 0 THEN 1 END) AS {rule.field}"
        if dialect == "sqlite"
        else f"count(*) FILTER (WHERE NOT ({condition})) AS {rule.field}"
        for rule, condition in rules
        if condition
    )
    broken = op.get_bind().execute(text(f"SELECT {counts} FROM {TABLE}")).one()._mapping
    failed = [rule for rule, condition in rules if condition and broken[rule.field]]
    origin: dict[str, str] = {}
    if _upgraded_from_before_0004():
        # Columns this database did not have: name what they came from, or leave them to the totals.
        failed = [rule for rule in failed if rule.field not in ADDED_BY_0004] or failed
        origin["error"] = "from metadata.error: "
    problems = [
        f"{broken[rule.field]} rows break {rule.field} ({origin.get(rule.field, '')}{rule.rule})"
        for rule in failed
    ]
    if problems:
        raise UpgradeRefused(
            f"{TABLE} holds rows that its readers cannot read: {'; '.join(problems)}. "
            "Fix or delete them, then upgrade again."
        )


def upgrade() -> None:
    dialect = op.get_context().dialect.name
    if not op.get_context().as_sql:
        _refuse_existing_rows_that_break_a_rule(dialect)
    if dialect == "postgresql":
        # One ALTER TABLE: PostgreSQL checks every new constraint in one scan of the rows.
        checks = ",\n".join(
            f"    ADD CONSTRAINT ck_{TABLE}_{rule.field} CHECK ({rule.postgresql})"
            for rule in RULES
            if rule.postgresql
        )
        op.execute(f"ALTER TABLE {TABLE}\n{checks}")
        return
    # SQLite adds a CHECK only to a new table: alembic's batch mode copies the rows into one with
    # the checks, then renames it (a few minutes for 10M rows, once).
    with _views_dropped(), op.batch_alter_table(TABLE, copy_from=_table_at_0004()) as batch:
        for rule in RULES:
            batch.create_check_constraint(f"ck_{TABLE}_{rule.field}", text(rule.sqlite))


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        drops = ",\n".join(
            f"    DROP CONSTRAINT ck_{TABLE}_{rule.field}" for rule in RULES if rule.postgresql
        )
        op.execute(f"ALTER TABLE {TABLE}\n{drops}")
        return
    checked = _table_at_0004(
        sa.CheckConstraint(rule.sqlite, name=f"ck_{TABLE}_{rule.field}") for rule in RULES
    )
    with _views_dropped(), op.batch_alter_table(TABLE, copy_from=checked) as batch:
        for rule in RULES:
            batch.drop_constraint(f"ck_{TABLE}_{rule.field}", type_="check")


def _table_at_0004(checks: Iterable[sa.CheckConstraint] = ()) -> sa.Table:
    """action_metrics as 0004 left it, for batch mode to copy without reflecting (so that
    `db upgrade --sql` can print the copy too)."""
    count = {"nullable": False, "server_default": "0"}
    return sa.Table(
        TABLE,
        sa.MetaData(),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action_type", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("town_id", sa.String(256), nullable=False),
        sa.Column("citizen_id", sa.String(256), nullable=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("tokens_in", sa.BigInteger(), nullable=False),
        sa.Column("tokens_out", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("credits_charged", sa.BigInteger(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("cache_read_tokens", sa.BigInteger(), **count),
        sa.Column("cache_write_tokens", sa.BigInteger(), **count),
        sa.Column("reasoning_tokens", sa.BigInteger(), **count),
        sa.Column("error", sa.String(256), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_action_metrics"),
        *(
            sa.Index(f"ix_{TABLE}_{'_'.join(columns)}", *columns)
            for columns in (
                ["timestamp"],
                ["town_id", "timestamp"],
                ["user_id", "timestamp"],
                ["action_type", "timestamp"],
                ["model", "timestamp"],
                ["citizen_id", "timestamp"],
            )
        ),
        *checks,
    )


@contextmanager
def _views_dropped() -> Iterator[None]:
    drop_views(view for view, _ in reversed(VIEWS))
    yield
    create_views(VIEWS)
