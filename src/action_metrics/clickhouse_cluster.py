"""`db upgrade --sql --cluster NAME`: the ClickHouse DDL for a cluster of several nodes, printed for
an operator (never run by the package: nothing here is tested against a real cluster).

The same versions as `sql/clickhouse/`, rewritten statement by statement:
- every CREATE and ALTER gains `ON CLUSTER NAME`;
- the actions live in `action_metrics_local`, a ReplicatedReplacingMergeTree per shard (ZooKeeper
  path `/clickhouse/tables/{shard}/{database}/action_metrics_local`, replica `{replica}`), and
  `action_metrics` becomes a Distributed table over it, sharded by `cityHash64(id)`, so every copy
  of a re-sent action lands on one shard, where FINAL collapses it; its skip indexes are the local
  table's only;
- the rollups are sharded the same way (`<rollup>_local` and a Distributed table over them, any
  shard will do: their rows are summed when read), each shard's materialized views reading its
  `action_metrics_local` into its `<rollup>_local`; the fill of an upgrade reads and writes the
  Distributed tables, so it runs once, from any node;
- the small tables (prices, schema versions, prune cut-offs, copy checkpoints) are replicated to
  every node (one ZooKeeper path for the whole cluster, replica `{shard}-{replica}`), so the ASOF
  JOINs of a read find the whole price history wherever they run; an INSERT into one reaches all;
- the ids table of version 5 is sharded by id as the actions are, fed per shard by its view.
- version 6's daily rollups and timeline are sharded as the rollups are (rand()), each shard's views
  feeding its `_local` tables (the timeline's projections are part of each shard's table), and
  version 7's monthly rollups and version 8's rollups per user the same way;
- version 9's deduplication window is set on the shards' tables, not the Distributed ones (a
  Replicated table keeps its insert tokens in Keeper whatever it says: replicated_deduplication_window).
A statement of a new version that this printer cannot place on a cluster raises, so the test of
the printed SQL fails rather than printing something half right.
"""

from __future__ import annotations

import re
from typing import Final

from action_metrics.clickhouse import (
    DAILY_ROLLUPS,
    MONTHLY_ROLLUPS,
    ROLLUPS,
    TIMELINE,
    USER_ROLLUPS,
    ClickHouseURL,
    upgrade_statements,
)
from action_metrics.errors import UnsupportedDatabase

SHARDED: Final = "action_metrics"
"""The actions' table, split across shards by id."""
LOCAL: Final = f"{SHARDED}_local"
SHARDING_KEY: Final = "cityHash64(id)"
IDS: Final = "action_metrics_ids"
"""The stored ids that first id wins looks up, sharded as the actions are: each shard's view feeds
its own, and a re-sent id is looked up where its first copy went."""
SHARDING_KEYS: Final = {
    SHARDED: SHARDING_KEY,
    IDS: SHARDING_KEY,
    **dict.fromkeys(
        [*ROLLUPS, *DAILY_ROLLUPS.values(), *MONTHLY_ROLLUPS.values(), *USER_ROLLUPS, TIMELINE], "rand()"
    ),
}
"""Every table split across shards, and how; the others are replicated whole to every node."""

_CLUSTER_NAME: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_CREATE_TABLE: Final = re.compile(r"^CREATE TABLE IF NOT EXISTS (\w+)\n")
_ALTER_TABLE: Final = re.compile(r"^ALTER TABLE (\w+) ")
_LOCAL_ONLY: Final = re.compile(r"^((ADD|DROP|MATERIALIZE) INDEX|(MODIFY|RESET) SETTING) ")
"""What an ALTER of a sharded table changes in the shards' MergeTree tables only: a skip index, a
MergeTree setting (version 9's deduplication window)."""
_TRUNCATE: Final = re.compile(r"^TRUNCATE TABLE IF EXISTS (\w+)$")
_VIEW: Final = re.compile(r"^CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+) TO (\w+) AS\n")
_ENGINE: Final = re.compile(
    r"^ENGINE = (ReplacingMergeTree|AggregatingMergeTree|MergeTree)(?:\((\w+)\))?$", re.M
)


def check_cluster_name(name: str) -> str:
    if not _CLUSTER_NAME.match(name):
        raise UnsupportedDatabase(
            f"a cluster name is letters, digits, '_', '.' and '-' (as in remote_servers), got {name!r}"
        )
    return name


def _replicated(statement: str, table: str) -> str:
    """The statement's MergeTree engine made its Replicated twin, with the ZooKeeper path and replica."""
    match = _ENGINE.search(statement)
    if match is None:
        raise UnsupportedDatabase(
            f"cannot place this statement on a cluster (no MergeTree engine): {statement}"
        )
    engine, version_column = match[1], match[2]
    if table.endswith("_local"):
        path, replica = f"/clickhouse/tables/{{shard}}/{{database}}/{table}", "{replica}"
    else:
        path, replica = f"/clickhouse/tables/all/{{database}}/{table}", "{shard}-{replica}"
    arguments = [f"'{path}'", f"'{replica}'", *([version_column] if version_column else [])]
    return (
        statement[: match.start()]
        + f"ENGINE = Replicated{engine}({', '.join(arguments)})"
        + statement[match.end() :]
    )


def cluster_statements(
    url: ClickHouseURL, cluster: str, target: int | None = None, after: int = 0
) -> list[str]:
    """`upgrade_statements` (from version `after` to `target`) for a cluster (see the module)."""
    on = f"ON CLUSTER `{check_cluster_name(cluster)}`"

    def distributed(table: str) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {table} {on} AS {table}_local\n"
            f"ENGINE = Distributed(`{cluster}`, `{url.database}`, {table}_local, {SHARDING_KEYS[table]})"
        )

    rewritten: list[str] = []
    for statement in upgrade_statements(url, target, after):
        if statement.startswith(("--", "USE ", "INSERT INTO ")):
            if statement.startswith(f"INSERT INTO {SHARDED} "):
                raise UnsupportedDatabase(f"cannot place this statement on a cluster: {statement}")
            rewritten.append(statement)
        elif statement.startswith("CREATE DATABASE IF NOT EXISTS "):
            rewritten.append(f"{statement} {on}")
        elif create := _CREATE_TABLE.match(statement):
            table = f"{create[1]}_local" if create[1] in SHARDING_KEYS else create[1]
            created = f"CREATE TABLE IF NOT EXISTS {table} {on}\n" + statement[create.end() :]
            rewritten.append(_replicated(created, table))
            if create[1] in SHARDING_KEYS:
                rewritten.append(distributed(create[1]))
        elif alter := _ALTER_TABLE.match(statement):
            rest = statement[alter.end() :]
            if alter[1] in SHARDING_KEYS:
                rewritten.append(f"ALTER TABLE {alter[1]}_local {on} {rest}")
                if not _LOCAL_ONLY.match(rest):  # the Distributed table mirrors the local one's columns
                    rewritten.append(f"ALTER TABLE {alter[1]} {on} {rest}")
            else:
                rewritten.append(f"ALTER TABLE {alter[1]} {on} {rest}")
        elif truncate := _TRUNCATE.match(statement):
            table = f"{truncate[1]}_local" if truncate[1] in SHARDING_KEYS else truncate[1]
            rewritten.append(f"TRUNCATE TABLE IF EXISTS {table} {on}")
        elif (view := _VIEW.match(statement)) and view[2] in SHARDING_KEYS:
            select = re.sub(rf"\bFROM {SHARDED}\b", f"FROM {LOCAL}", statement[view.end() :])
            rewritten.append(
                f"CREATE MATERIALIZED VIEW IF NOT EXISTS {view[1]} {on} TO {view[2]}_local AS\n{select}"
            )
        else:
            raise UnsupportedDatabase(f"cannot place this statement on a cluster: {statement}")
    return rewritten
