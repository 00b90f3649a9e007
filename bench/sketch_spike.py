"""Spike: latency histograms stored as ONE row per (level, bucket start, key) holding the bin counts as a
blob, read through the raw drivers and merged in NumPy, against today's one-row-per-bin layout merged
in SQL. A measurement, not product code (docs/percentile-sketches.md has the figures).

    .venv/bin/python bench/sketch_spike.py                       # 10M-equivalent, SQLite + PostgreSQL
    .venv/bin/python bench/sketch_spike.py --actions 1000000 --runs 3 --no-postgres   # a quick look

What it does:
1. Synthesizes the dashboard bench's shape (bench/shape.py) directly as binned latencies: 50 towns,
   5 models (lognormal, sigma 0.6, the shape's medians), 1,000 users, spread evenly over 90 days from
   2026-01-01 UTC (Poisson counts per town and quarter hour); each latency binned exactly as
   `action_metrics.rollup.bin_of` bins it (checked on a sample).
2. Builds sketches per level: town/quarter, town/hour, town/day, model/hour, user/day, user/month,
   each encoded two ways: *dense* (first bin in a column + little-endian uint16 counts from the first
   to the last non-empty bin) and *sparse* (little-endian (int16 bin, uint16 count) pairs).
3. Loads them into a throwaway SQLite file and a throwaway PostgreSQL database (dropped at the end),
   plus today's one-row-per-bin layout for 5 of the 50 towns (case 4).
4. Times (median of --runs, warm cache) each question: fetch through sqlite3 / asyncpg, then one
   np.bincount over (group * nbins + bin) with signed weights (the subtraction trick), one cumsum and
   one searchsorted for the ranks of every group, interpolated as percentile_cont. Every answer is
   checked against the exact percentiles of the synthesized latencies (max relative error printed).
5. Times the write side: closing one hour (new hour sketches, read-modify-write of day sketches) and a
   late metric's read-modify-write of the 6 sketches it lands in.

PostgreSQL: $ACTION_METRICS_BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres)
must allow CREATE DATABASE; the spike creates am_sketch_spike_<pid> and drops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import numpy as np

from action_metrics.rollup import GAMMA, LN_GAMMA, REPRESENTATIVE_FACTOR, bin_of

TOWNS, MODELS, USERS, DAYS = 50, 5, 1_000, 90
MEDIANS_MS = (2.0, 5.0, 400.0, 1_500.0, 4_000.0)  # bench/shape.py's template, cached, haiku, sonnet, opus
SIGMA = 0.6
T0 = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
QUARTER, HOUR, DAY = 900, 3_600, 86_400
QUARTERS = DAYS * 96
MONTH_STARTS = [int(datetime(2026, m, 1, tzinfo=UTC).timestamp()) for m in (1, 2, 3)]
FRACTIONS = (0.5, 0.95, 0.99)
OLD_LAYOUT_TOWNS = 5
POSTGRES_URL = os.environ.get(
    "ACTION_METRICS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PAIR = np.dtype([("bin", "<i2"), ("count", "<u2")])


def log(*parts: Any) -> None:
    print(*parts, flush=True)


# --- synthesis -------------------------------------------------------------------------------------


@dataclass
class Actions:
    quarter: np.ndarray  # quarter-hour index since T0
    town: np.ndarray
    model: np.ndarray
    user: np.ndarray
    latency: np.ndarray
    bin: np.ndarray


def synthesize(total: int, seed: int) -> Actions:
    rng = np.random.default_rng(seed)
    per_cell = rng.poisson(total / (TOWNS * QUARTERS), TOWNS * QUARTERS)
    cell = np.repeat(np.arange(TOWNS * QUARTERS, dtype=np.int64), per_cell)
    n = cell.size
    model = rng.integers(0, MODELS, n, dtype=np.int8)
    mu = np.log(np.array(MEDIANS_MS))[model]
    latency = np.exp(mu + SIGMA * rng.standard_normal(n))
    bins = np.ceil(np.log(latency) / LN_GAMMA).astype(np.int16)
    sample = rng.integers(0, n, 20_000)
    assert all(bin_of(float(latency[i])) == int(bins[i]) for i in sample), "bins differ from bin_of"
    return Actions(
        quarter=(cell % QUARTERS).astype(np.int32),
        town=(cell // QUARTERS).astype(np.int16),
        model=model,
        user=rng.integers(0, USERS, n, dtype=np.int16),
        latency=latency,
        bin=bins,
    )


# --- sketches --------------------------------------------------------------------------------------


def encode_dense(bins: np.ndarray, counts: np.ndarray) -> tuple[int, bytes]:
    first = int(bins[0])
    dense = np.zeros(int(bins[-1]) - first + 1, dtype="<u2")
    dense[bins - first] = counts
    return first, dense.tobytes()


def encode_sparse(bins: np.ndarray, counts: np.ndarray) -> bytes:
    pairs = np.empty(bins.size, dtype=PAIR)
    pairs["bin"], pairs["count"] = bins, counts
    return pairs.tobytes()


def decode_sparse(blob: bytes) -> dict[int, int]:
    pairs = np.frombuffer(blob, dtype=PAIR)
    return dict(zip(pairs["bin"].tolist(), pairs["count"].tolist(), strict=True))


def encode_sparse_dict(counts: dict[int, int]) -> bytes:
    bins = np.array(sorted(counts), dtype=np.int16)
    return encode_sparse(bins, np.array([counts[b] for b in bins.tolist()], dtype=np.uint16))


@dataclass
class Level:
    name: str
    key_prefix: str
    keys: np.ndarray  # key index per action
    starts: np.ndarray  # bucket start (epoch seconds) per action


def levels_of(a: Actions) -> list[Level]:
    seconds = T0 + a.quarter.astype(np.int64) * QUARTER
    hour = seconds - seconds % HOUR
    day = seconds - seconds % DAY
    month = np.array(MONTH_STARTS)[np.searchsorted(MONTH_STARTS, seconds, side="right") - 1]
    return [
        Level("town/quarter", "town", a.town, seconds),
        Level("town/hour", "town", a.town, hour),
        Level("town/day", "town", a.town, day),
        Level("model/hour", "model", a.model, hour),
        Level("user/day", "user", a.user, day),
        Level("user/month", "user", a.user, month),
    ]


Row = tuple[str, int, str, int, float, int, bytes, bytes]
"""level, start, key, n, latency_sum, first_bin, dense counts, sparse pairs"""


def sketch_rows(level: Level, a: Actions, dense: bool) -> list[Row]:
    """One row per (start, key) of the level, in key order (start, key)."""
    starts = np.unique(level.starts)
    group = np.searchsorted(starts, level.starts) * 1_000 + level.keys.astype(np.int64)  # < 1,000 keys
    order = np.lexsort((a.bin, group))
    g, b, lat = group[order], a.bin[order], a.latency[order]
    cell, first_of_cell, cell_counts = np.unique(
        g.astype(np.int64) * 65_536 + (b.astype(np.int64) + 32_768), return_index=True, return_counts=True
    )
    cell_group, cell_bin = cell // 65_536, (cell % 65_536 - 32_768).astype(np.int16)
    assert cell_counts.max() < 65_536
    groups, group_first = np.unique(cell_group, return_index=True)
    _, action_first = np.unique(g, return_index=True)
    n_per = np.diff(np.append(action_first, g.size))
    sums = np.add.reduceat(lat, action_first)
    bounds = np.append(group_first, cell.size)
    rows: list[Row] = []
    for i, grp in enumerate(groups.tolist()):
        bins, counts = cell_bin[bounds[i] : bounds[i + 1]], cell_counts[bounds[i] : bounds[i + 1]]
        first, dense_blob = encode_dense(bins, counts) if dense else (int(bins[0]), b"")
        rows.append(
            (
                level.name,
                int(starts[grp // 1_000]),
                f"{level.key_prefix}-{grp % 1_000}",
                int(n_per[i]),
                float(sums[i]),
                first,
                dense_blob,
                encode_sparse(bins, counts),
            )
        )
    del first_of_cell
    return rows


def bin_rows(rows: Sequence[Row]) -> list[tuple[str, int, str, int, int]]:
    """Today's layout: one row per (level, start, key, bin)."""
    out = []
    for level, start, key, *_, sparse in rows:
        pairs = np.frombuffer(sparse, dtype=PAIR)
        out.extend(
            (level, start, key, b, c)
            for b, c in zip(pairs["bin"].tolist(), pairs["count"].tolist(), strict=True)
        )
    return out


# --- what a question reads: covers ----------------------------------------------------------------


def span(a: int, b: int, sign: int, quarters: bool) -> list[tuple[str, int, int]]:
    """[a, b) as quarter sketches up to the first whole hour, hours, then quarters to b."""
    out: list[tuple[str, int, int]] = []
    t = a
    while t < b and t % HOUR:
        assert quarters, "a partial hour needs quarter-hour sketches (or raw rows)"
        assert t % QUARTER == 0, "not on a quarter hour"
        out.append(("quarter", t, sign))
        t += QUARTER
    while t + HOUR <= b:
        out.append(("hour", t, sign))
        t += HOUR
    while t < b:
        assert quarters, "a partial hour needs quarter-hour sketches (or raw rows)"
        out.append(("quarter", t, sign))
        t += QUARTER
    return out


def local_days(zone: str) -> list[int]:
    """UTC bounds (epoch seconds) of the zone's local days 2026-01-01 .. 2026-03-31 (DAYS + 1 bounds)."""
    tz = ZoneInfo(zone)
    first = datetime(2026, 1, 1, tzinfo=tz)
    return [int((first + timedelta(days=d)).replace(tzinfo=tz).timestamp()) for d in range(DAYS + 1)]


def day_cover(bounds: Sequence[int], subtract: bool, quarters: bool) -> list[tuple[str, int, int, int]]:
    """(grain, start, time group, sign) covering each local day [bounds[i], bounds[i+1]).

    With `subtract`: the nearest UTC day D, plus or minus the edge hours (a local day = D - its edge
    hours + the previous day's, counts subtract exactly); without: every hour of the local day."""
    cover = []
    for i, (s, e) in enumerate(pairwise(bounds)):
        if not subtract:
            cover += [(grain, t, i, sign) for grain, t, sign in span(s, e, 1, quarters)]
            continue
        d = (s + DAY // 2) // DAY * DAY
        parts = [("day", d, 1)]
        parts += span(s, d, 1, quarters) if s < d else span(d, s, -1, quarters)
        parts += span(d + DAY, e, 1, quarters) if e > d + DAY else span(e, d + DAY, -1, quarters)
        cover += [(grain, t, i, sign) for grain, t, sign in parts]
    return cover


@dataclass
class Question:
    name: str
    prefix: str  # 'town', 'model', 'user'
    cover: list[tuple[str, int, int, int]]
    time_groups: int
    keys: list[str] | None  # None: every key of the level
    encoding: str = "sparse"

    def groups(self, n_keys: int) -> int:
        return n_keys * self.time_groups


def key_count(prefix: str) -> int:
    return {"town": TOWNS, "model": MODELS, "user": USERS}[prefix]


# --- merge in NumPy --------------------------------------------------------------------------------

Fetched = dict[str, list[Any]]
"""Per level name: rows (start, key, n, latency_sum, first_bin, blob)."""


def merge(question: Question, fetched: Fetched) -> dict[str, np.ndarray]:
    """Signed bincount of every fetched bin by (group, bin), then ranks by one searchsorted."""
    n_keys, tgs = key_count(question.prefix), question.time_groups
    key_index = {f"{question.prefix}-{i}": i for i in range(n_keys)}
    all_groups, all_bins, all_counts, sum_groups, sum_n, sum_lat = [], [], [], [], [], []
    for grain in {grain for grain, *_ in question.cover}:
        level = f"{question.prefix}/{grain}"
        rows = fetched.get(level, [])
        if not rows:
            continue
        entries = np.array([(t, tg, sign) for g, t, tg, sign in question.cover if g == grain], dtype=np.int64)
        entries = entries[np.argsort(entries[:, 0], kind="stable")]
        r_start = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        r_key = np.fromiter((key_index[r[1]] for r in rows), np.int64, len(rows))
        lo = np.searchsorted(entries[:, 0], r_start, "left")
        hi = np.searchsorted(entries[:, 0], r_start, "right")
        uses = hi - lo  # an edge hour serves two local days: once added, once subtracted
        use_row = np.repeat(np.arange(len(rows)), uses)
        use_entry = np.repeat(lo - np.cumsum(uses) + uses, uses) + np.arange(use_row.size)
        use_group = r_key[use_row] * tgs + entries[use_entry, 1]
        use_sign = entries[use_entry, 2]
        blobs = [r[5] for r in rows]
        lengths = np.fromiter((len(b) for b in blobs), np.int64, len(rows))
        data = b"".join(blobs)
        if question.encoding == "dense":
            counts = np.frombuffer(data, "<u2")
            lengths //= 2
            offsets = np.cumsum(lengths) - lengths
            first = np.fromiter((r[4] for r in rows), np.int64, len(rows))
            elem_row = np.repeat(np.arange(len(rows)), lengths)
            bins = first[elem_row] + np.arange(counts.size) - offsets[elem_row]
        else:
            pairs = np.frombuffer(data, PAIR)
            counts, bins = pairs["count"], pairs["bin"]
            lengths //= 4
            offsets = np.cumsum(lengths) - lengths
        # every use of a row takes all of its elements
        use_len = lengths[use_row]
        elem = np.repeat(offsets[use_row] - (np.cumsum(use_len) - use_len), use_len) + np.arange(
            use_len.sum()
        )
        all_groups.append(np.repeat(use_group, use_len))
        all_bins.append(bins[elem])
        all_counts.append(counts[elem].astype(np.int64) * np.repeat(use_sign, use_len))
        sum_groups.append(use_group)
        sum_n.append(np.fromiter((r[2] for r in rows), np.int64, len(rows))[use_row] * use_sign)
        sum_lat.append(np.fromiter((r[3] for r in rows), np.float64, len(rows))[use_row] * use_sign)
    groups = question.groups(n_keys)
    g, b, c = (
        np.concatenate(all_groups),
        np.concatenate(all_bins).astype(np.int64),
        np.concatenate(all_counts),
    )
    low_bin = int(b.min())
    width = int(b.max()) - low_bin + 1
    hist = np.bincount(g * width + (b - low_bin), weights=c, minlength=groups * width)
    assert hist.min() >= 0, "a subtraction went below zero"
    cum = np.cumsum(hist)  # one running count over every group's bins, in group order
    totals = hist.reshape(groups, width).sum(axis=1)
    before = np.cumsum(totals) - totals
    out: dict[str, np.ndarray] = {
        "count": np.bincount(np.concatenate(sum_groups), np.concatenate(sum_n), minlength=groups),
        "latency_sum": np.bincount(np.concatenate(sum_groups), np.concatenate(sum_lat), minlength=groups),
    }
    assert np.array_equal(out["count"], totals), "sums and sketches disagree"
    ln_repr = math.log(REPRESENTATIVE_FACTOR)
    for fraction in FRACTIONS:
        position = np.maximum(totals - 1, 0) * fraction
        rank = np.floor(position)
        nxt = np.minimum(rank + 1, np.maximum(totals - 1, 0))
        at = np.searchsorted(cum, np.stack([before + rank, before + nxt]), side="right")
        value = np.exp((at % width + low_bin) * LN_GAMMA + ln_repr)
        p = value[0] + (position - rank) * (value[1] - value[0])
        out[f"p{round(fraction * 100)}"] = np.where(totals > 0, p, np.nan)
    return out


def exact(question: Question, a: Actions, group: np.ndarray) -> dict[str, np.ndarray]:
    """percentile_cont of the synthesized latencies per group (-1: not in the question)."""
    keep = group >= 0
    g, lat = group[keep], a.latency[keep]
    order = np.lexsort((lat, g))
    g, lat = g[order], lat[order]
    groups = question.groups(key_count(question.prefix))
    totals = np.bincount(g, minlength=groups)
    before = np.cumsum(totals) - totals
    out = {}
    for fraction in FRACTIONS:
        position = np.maximum(totals - 1, 0) * fraction
        rank = np.floor(position).astype(np.int64)
        nxt = np.minimum(rank + 1, np.maximum(totals - 1, 0))
        lo, hi = lat[np.minimum(before + rank, lat.size - 1)], lat[np.minimum(before + nxt, lat.size - 1)]
        out[f"p{round(fraction * 100)}"] = np.where(totals > 0, lo + (position - rank) * (hi - lo), np.nan)
    out["count"] = totals
    return out


def max_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    assert np.array_equal(got["count"], want["count"]), "counts differ from the raw actions"
    worst = 0.0
    for name in ("p50", "p95", "p99"):
        ok = want["count"] > 0
        worst = max(worst, float(np.max(np.abs(got[name][ok] / want[name][ok] - 1))))
    return worst


# --- the stores ------------------------------------------------------------------------------------

SQLITE_SCHEMA = """
CREATE TABLE sketch_dense (level TEXT NOT NULL, start INTEGER NOT NULL, key TEXT NOT NULL,
    n INTEGER NOT NULL, latency_sum REAL NOT NULL, first_bin INTEGER NOT NULL, counts BLOB NOT NULL,
    PRIMARY KEY (level, start, key));
CREATE TABLE sketch_sparse (level TEXT NOT NULL, start INTEGER NOT NULL, key TEXT NOT NULL,
    n INTEGER NOT NULL, latency_sum REAL NOT NULL, first_bin INTEGER NOT NULL, counts BLOB NOT NULL,
    PRIMARY KEY (level, start, key));
CREATE TABLE bins (level TEXT NOT NULL, start INTEGER NOT NULL, key TEXT NOT NULL, bin INTEGER NOT NULL,
    count INTEGER NOT NULL, PRIMARY KEY (level, start, key, bin)) WITHOUT ROWID;
"""
POSTGRES_SCHEMA = """
CREATE TABLE sketch_dense (level TEXT NOT NULL, start BIGINT NOT NULL, key TEXT NOT NULL,
    n BIGINT NOT NULL, latency_sum DOUBLE PRECISION NOT NULL, first_bin INT NOT NULL, counts BYTEA NOT NULL,
    PRIMARY KEY (level, start, key));
CREATE TABLE sketch_sparse (LIKE sketch_dense INCLUDING ALL);
CREATE TABLE bins (level TEXT NOT NULL, start BIGINT NOT NULL, key TEXT NOT NULL, bin INT NOT NULL,
    count BIGINT NOT NULL, PRIMARY KEY (level, start, key, bin) INCLUDE (count));
"""


def table_rows(rows: Sequence[Row], encoding: str) -> list[tuple[Any, ...]]:
    if encoding == "dense":
        return [(lv, s, k, n, ls, fb, d) for lv, s, k, n, ls, fb, d, _ in rows if d]
    return [(lv, s, k, n, ls, fb, sp) for lv, s, k, n, ls, fb, _, sp in rows]


OLD_SQL = """
WITH merged AS (
    SELECT h.key, c.tg, h.bin, CAST(SUM(c.sign * h.count) AS BIGINT) AS n
    FROM {cover} c JOIN bins h ON h.level = c.level AND h.start = c.start
    GROUP BY h.key, c.tg, h.bin HAVING SUM(c.sign * h.count) > 0
), ranked AS (
    SELECT key, tg, bin, n,
        CAST(SUM(n) OVER (PARTITION BY key, tg ORDER BY bin ROWS UNBOUNDED PRECEDING) AS BIGINT) AS upto,
        CAST(SUM(n) OVER (PARTITION BY key, tg) AS BIGINT) AS total
    FROM merged
), picked AS (
    SELECT key, tg, MAX(total) AS total, {picks} FROM ranked GROUP BY key, tg
)
SELECT key, tg, total, {values} FROM picked
"""


def old_sql(cover: str) -> str:
    picks, values = [], []
    for fraction in FRACTIONS:
        name = f"p{round(fraction * 100)}"
        rank = f"FLOOR((total - 1) * {fraction})"
        picks.append(f"MAX(CASE WHEN upto - n <= {rank} AND {rank} < upto THEN bin END) AS {name}_lo")
        picks.append(f"MAX(CASE WHEN upto - n <= {rank} + 1 AND {rank} + 1 < upto THEN bin END) AS {name}_hi")
        picks.append(f"MAX((total - 1) * {fraction} - {rank}) AS {name}_w")

        def value(column: str) -> str:
            return f"EXP({column} * {LN_GAMMA!r} + {math.log(REPRESENTATIVE_FACTOR)!r})"

        values.append(
            f"{value(name + '_lo')} + {name}_w * ({value(f'COALESCE({name}_hi, {name}_lo)')} - "
            f"{value(name + '_lo')}) AS {name}"
        )
    return OLD_SQL.format(cover=cover, picks=", ".join(picks), values=", ".join(values))


class Store:
    name: str

    async def fetch(self, question: Question) -> Fetched:
        raise NotImplementedError

    async def old(self, question: Question) -> list[Any]:
        raise NotImplementedError


def fetch_plan(question: Question) -> dict[str, list[int]]:
    plan: dict[str, set[int]] = {}
    for grain, start, _, _ in question.cover:
        plan.setdefault(f"{question.prefix}/{grain}", set()).add(start)
    return {level: sorted(starts) for level, starts in plan.items()}


class SQLiteStore(Store):
    name = "SQLite"

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA cache_size=-262144")  # 256 MB: warm reads, as a serving process has

    async def load(self, rows: Sequence[Row], old: Sequence[tuple[Any, ...]]) -> None:
        self.db.executescript(SQLITE_SCHEMA)
        self.db.execute("BEGIN")
        for encoding in ("dense", "sparse"):
            self.db.executemany(
                f"INSERT INTO sketch_{encoding} VALUES (?,?,?,?,?,?,?)", table_rows(rows, encoding)
            )
        self.db.executemany("INSERT INTO bins VALUES (?,?,?,?,?)", old)
        self.db.execute("COMMIT")
        self.db.execute("ANALYZE")

    def sizes(self) -> dict[str, int]:
        found = self.db.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall()
        return {name: size for name, size in found}

    async def fetch(self, question: Question) -> Fetched:
        out: Fetched = {}
        keys = json.dumps(question.keys) if question.keys else None
        for level, starts in fetch_plan(question).items():
            sql = (
                f"SELECT start, key, n, latency_sum, first_bin, counts FROM sketch_{question.encoding} "
                "WHERE level = ? AND start IN (SELECT value FROM json_each(?))"
            )
            args: list[Any] = [level, json.dumps(starts)]
            if keys:
                sql += " AND key IN (SELECT value FROM json_each(?))"
                args.append(keys)
            out[level] = self.db.execute(sql, args).fetchall()
        return out

    async def old(self, question: Question) -> list[Any]:
        self.db.execute("BEGIN")
        self.db.execute(
            "CREATE TEMP TABLE IF NOT EXISTS cover (level TEXT, start INTEGER, tg INTEGER, sign INTEGER)"
        )
        self.db.execute("DELETE FROM cover")
        self.db.executemany(
            "INSERT INTO cover VALUES (?,?,?,?)",
            [(f"{question.prefix}/{grain}", t, tg, sign) for grain, t, tg, sign in question.cover],
        )
        found = self.db.execute(old_sql("cover")).fetchall()
        self.db.execute("COMMIT")
        return found

    async def close(self) -> None:
        self.db.close()


class PostgresStore(Store):
    name = "PostgreSQL"

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def load(self, rows: Sequence[Row], old: Sequence[tuple[Any, ...]]) -> None:
        await self.conn.execute(POSTGRES_SCHEMA)
        for encoding in ("dense", "sparse"):
            await self.conn.copy_records_to_table(f"sketch_{encoding}", records=table_rows(rows, encoding))
        await self.conn.copy_records_to_table("bins", records=old)
        await self.conn.execute("VACUUM ANALYZE")

    async def sizes(self) -> dict[str, int]:
        found = await self.conn.fetch(
            "SELECT relname, pg_total_relation_size(oid) FROM pg_class WHERE relname IN "
            "('sketch_dense', 'sketch_sparse', 'bins')"
        )
        return {r[0]: r[1] for r in found}

    async def fetch(self, question: Question) -> Fetched:
        out: Fetched = {}
        for level, starts in fetch_plan(question).items():
            sql = (
                f"SELECT start, key, n, latency_sum, first_bin, counts FROM sketch_{question.encoding} "
                "WHERE level = $1 AND start = ANY($2::bigint[])"
            )
            args: list[Any] = [level, starts]
            if question.keys:
                sql += " AND key = ANY($3::text[])"
                args.append(question.keys)
            out[level] = await self.conn.fetch(sql, *args)
        return out

    async def old(self, question: Question) -> list[Any]:
        cover = (
            "(SELECT * FROM unnest($1::text[], $2::bigint[], $3::int[], $4::int[])"
            " AS u(level, start, tg, sign))"
        )
        columns = list(zip(*question.cover, strict=True))
        return await self.conn.fetch(
            old_sql(cover),
            [f"{question.prefix}/{g}" for g in columns[0]],
            list(columns[1]),
            list(columns[2]),
            list(columns[3]),
        )

    async def close(self) -> None:
        await self.conn.close()


# --- timing ----------------------------------------------------------------------------------------


async def timed(runs: int, call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    await call()  # warm
    times, result = [], None
    for _ in range(runs):
        began = time.perf_counter()
        result = await call()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), result


def group_of(question: Question, a: Actions, bounds: Sequence[int] | None) -> np.ndarray:
    """The group of each synthesized action in the question (-1: outside it)."""
    seconds = T0 + a.quarter.astype(np.int64) * QUARTER
    if question.prefix == "town":
        assert bounds is not None
        tg = np.searchsorted(bounds, seconds, side="right") - 1
        inside = (tg >= 0) & (tg < question.time_groups)
        keys = a.town.astype(np.int64)
    elif question.prefix == "model":
        first_hour = min(t for _, t, _, _ in question.cover)
        tg = (seconds - first_hour) // HOUR
        inside = (tg >= 0) & (tg < question.time_groups)
        keys = a.model.astype(np.int64)
    else:
        tg = np.zeros_like(seconds)
        inside = np.ones(seconds.size, dtype=bool)
        keys = a.user.astype(np.int64)
    group = keys * question.time_groups + tg
    if question.keys:
        inside &= np.isin(keys, [int(k.split("-")[1]) for k in question.keys])
    return np.where(inside, group, -1)


@dataclass
class Case:
    question: Question
    bounds: Sequence[int] | None = None


def cases() -> list[Case]:
    berlin, kathmandu = local_days("Europe/Berlin"), local_days("Asia/Kathmandu")
    last_week = T0 + (DAYS - 7) * DAY
    week = [("hour", last_week + h * HOUR, h, 1) for h in range(168)]
    out = []
    for encoding in ("sparse", "dense"):  # dense only where it is not many times larger (see the sizes)
        out += [
            Case(
                Question(
                    f"1 town x Berlin day, subtraction ({encoding})",
                    "town",
                    day_cover(berlin, subtract=True, quarters=False),
                    DAYS,
                    None,
                    encoding,
                ),
                berlin,
            ),
            Case(
                Question(
                    f"1b town x Berlin day, 24 hour sketches ({encoding})",
                    "town",
                    day_cover(berlin, subtract=False, quarters=False),
                    DAYS,
                    None,
                    encoding,
                ),
                berlin,
            ),
            Case(Question(f"2 model x hour, 7 days ({encoding})", "model", week, 168, None, encoding)),
            Case(
                Question(
                    f"3 user, all time, per-month sketches ({encoding})",
                    "user",
                    [("month", m, 0, 1) for m in MONTH_STARTS],
                    1,
                    None,
                    encoding,
                )
            ),
            Case(
                Question(
                    f"3b user, all time, per-day sketches ({encoding})",
                    "user",
                    [("day", T0 + d * DAY, 0, 1) for d in range(DAYS)],
                    1,
                    None,
                    encoding,
                )
            ),
        ]
    # dense blobs of the hour and user/day levels are 20x the sparse ones: not worth reading
    out = [
        case
        for case in out
        if not (case.question.encoding == "dense" and case.question.name[:2] in ("1b", "3b"))
    ]
    out.append(
        Case(
            Question(
                "1c town x Kathmandu day, subtraction + quarter sketches (sparse)",
                "town",
                day_cover(kathmandu, subtract=True, quarters=True),
                DAYS,
                None,
            ),
            kathmandu,
        )
    )
    return out


async def run_store(store: Store, a: Actions, runs: int, results: dict[str, dict[str, Any]]) -> None:
    for case in cases():
        q = case.question
        want = exact(q, a, group_of(q, a, case.bounds))
        fetch_ms, fetched = await timed(runs, lambda q=q: store.fetch(q))
        total_ms, got = await timed(runs, lambda q=q: _fetch_merge(store, q))
        merge_ms = statistics.median(_merge_times(q, fetched, runs))
        error = max_error(got, want)
        rows = sum(len(r) for r in fetched.values())
        blob = sum(len(r[5]) for rs in fetched.values() for r in rs)
        results.setdefault(q.name, {})[store.name] = (total_ms, fetch_ms, merge_ms, rows, blob, error)
        log(
            f"  {store.name:10} {q.name:62} total {total_ms:8.1f} ms  fetch {fetch_ms:7.1f}  merge "
            f"{merge_ms:6.1f}  rows {rows:7,}  bytes {blob:11,}  groups {q.groups(key_count(q.prefix)):6,}"
            f"  max rel err {error:.4%}"
        )
    # case 4: today's one-row-per-bin layout, SQL merge, 5 of the 50 towns, against the sketches for them
    berlin = local_days("Europe/Berlin")
    keys = [f"town-{i}" for i in range(OLD_LAYOUT_TOWNS)]
    for subtract in (True, False):
        cover = day_cover(berlin, subtract=subtract, quarters=False)
        q = Question(f"4 bins layout, {OLD_LAYOUT_TOWNS} towns x Berlin day", "town", cover, DAYS, keys)
        want = exact(q, a, group_of(q, a, berlin))
        old_ms, found = await timed(runs, lambda q=q: store.old(q))
        p99 = np.full(q.groups(TOWNS), np.nan)
        for key, tg, _total, _p50, _p95, p in found:
            p99[int(key.split("-")[1]) * DAYS + tg] = p
        ok = want["count"] > 0
        old_error = float(np.max(np.abs(p99[ok] / want["p99"][ok] - 1)))
        new_ms, got = await timed(runs, lambda q=q: _fetch_merge(store, q))
        assert max_error(got, want) < 0.01
        label = "subtraction" if subtract else "24 hours"
        results.setdefault(f"4 {OLD_LAYOUT_TOWNS} towns, {label}", {})[store.name] = (
            old_ms,
            new_ms,
            old_error,
        )
        log(
            f"  {store.name:10} case 4 ({OLD_LAYOUT_TOWNS} towns x Berlin day, {label}): bins + SQL window "
            f"{old_ms:8.1f} ms (p99 err {old_error:.3%}), sketches + NumPy {new_ms:6.1f} ms, ratio "
            f"{old_ms / new_ms:5.1f}x; x{TOWNS // OLD_LAYOUT_TOWNS} for 50 towns: "
            f"~{old_ms * TOWNS / OLD_LAYOUT_TOWNS:,.0f} ms"
        )


async def _fetch_merge(store: Store, q: Question) -> dict[str, np.ndarray]:
    return merge(q, await store.fetch(q))


def _merge_times(q: Question, fetched: Fetched, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        merge(q, fetched)
        times.append((time.perf_counter() - began) * 1000)
    return times


# --- the write side --------------------------------------------------------------------------------


async def write_side(store: Store, a: Actions, runs: int) -> None:
    """Close one hour: insert its town/quarter, town/hour and model/hour sketches, read-modify-write its
    town/day, user/day and user/month sketches; then a late metric's read-modify-write of 6 sketches."""
    hour_start = T0 + 45 * DAY + 12 * HOUR
    seconds = T0 + a.quarter.astype(np.int64) * QUARTER
    inside = (seconds >= hour_start) & (seconds < hour_start + HOUR)
    towns, models, users = a.town[inside], a.model[inside], a.user[inside]
    bins, quarters = a.bin[inside], seconds[inside]
    day, month = hour_start - hour_start % DAY, MONTH_STARTS[1]

    def sketches(
        level: str, start_of: np.ndarray, keys: np.ndarray, prefix: str
    ) -> dict[tuple[Any, ...], bytes]:
        out = {}
        cell = np.unique(np.stack([start_of, keys.astype(np.int64)]), axis=1)
        for start, key in cell.T.tolist():
            mine = (start_of == start) & (keys == key)
            b, c = np.unique(bins[mine], return_counts=True)
            out[(level, start, f"{prefix}-{key}")] = encode_sparse(b, c)
        return out

    def build() -> tuple[dict[tuple[Any, ...], bytes], dict[tuple[Any, ...], dict[int, int]]]:
        new = sketches("town/quarter", quarters, towns, "town")
        new |= sketches("town/hour", np.full(towns.size, hour_start), towns, "town")
        new |= sketches("model/hour", np.full(towns.size, hour_start), models, "model")
        adds: dict[tuple[Any, ...], dict[int, int]] = {}
        for level, keys, prefix, start in (
            ("town/day", towns, "town", day),
            ("user/day", users, "user", day),
            ("user/month", users, "user", month),
        ):
            for key in np.unique(keys).tolist():
                b, c = np.unique(bins[keys == key], return_counts=True)
                adds[(level, start, f"{prefix}-{key}")] = dict(zip(b.tolist(), c.tolist(), strict=True))
        return new, adds

    began = time.perf_counter()
    new, adds = build()
    build_ms = (time.perf_counter() - began) * 1000
    log(
        f"  write side: one hour = {int(inside.sum()):,} actions -> {len(new):,} new sketch rows "
        f"(town/quarter, town/hour, model/hour) and {len(adds):,} read-modify-writes (town/day, user/day, "
        f"user/month); building them in NumPy: {build_ms:.0f} ms"
    )
    times, late = [], []
    for _ in range(runs):
        times.append(await store.close_hour(new, adds))  # type: ignore[attr-defined]
    for _ in range(max(runs, 20)):
        touched = [
            ("town/quarter", hour_start, "town-3"),
            ("town/hour", hour_start, "town-3"),
            ("town/day", day, "town-3"),
            ("model/hour", hour_start, "model-2"),
            ("user/day", day, "user-7"),
            ("user/month", month, "user-7"),
        ]
        late.append(await store.late_metric(touched, bin_of(812.0)))  # type: ignore[attr-defined]
    log(
        f"  {store.name:10} close one hour (one transaction): {statistics.median(times):7.1f} ms; a late "
        f"metric's read-modify-write of its 6 sketches (one transaction): {statistics.median(late):5.2f} ms"
    )


def _rmw(old: bytes | None, add: dict[int, int]) -> bytes:
    counts = decode_sparse(old) if old else {}
    for b, c in add.items():
        counts[b] = counts.get(b, 0) + c
    return encode_sparse_dict(counts)


async def _sqlite_close_hour(
    self: SQLiteStore, new: dict[Any, bytes], adds: dict[Any, dict[int, int]]
) -> float:
    began = time.perf_counter()
    self.db.execute("BEGIN IMMEDIATE")
    self.db.executemany(
        "INSERT OR REPLACE INTO sketch_w VALUES (?,?,?,0,0,0,?)", [(*k, v) for k, v in new.items()]
    )
    for key, add in adds.items():
        found = self.db.execute(
            "SELECT counts FROM sketch_w WHERE level=? AND start=? AND key=?", key
        ).fetchone()
        self.db.execute(
            "INSERT OR REPLACE INTO sketch_w VALUES (?,?,?,0,0,0,?)", (*key, _rmw(found and found[0], add))
        )
    self.db.execute("COMMIT")
    return (time.perf_counter() - began) * 1000


async def _sqlite_late(self: SQLiteStore, keys: list[tuple[Any, ...]], b: int) -> float:
    began = time.perf_counter()
    self.db.execute("BEGIN IMMEDIATE")
    for key in keys:
        found = self.db.execute(
            "SELECT counts FROM sketch_w WHERE level=? AND start=? AND key=?", key
        ).fetchone()
        self.db.execute(
            "INSERT OR REPLACE INTO sketch_w VALUES (?,?,?,0,0,0,?)", (*key, _rmw(found and found[0], {b: 1}))
        )
    self.db.execute("COMMIT")
    return (time.perf_counter() - began) * 1000


async def _pg_close_hour(
    self: PostgresStore, new: dict[Any, bytes], adds: dict[Any, dict[int, int]]
) -> float:
    began = time.perf_counter()
    async with self.conn.transaction():
        await self.conn.executemany(
            "INSERT INTO sketch_w VALUES ($1,$2,$3,0,0,0,$4) ON CONFLICT (level, start, key) DO UPDATE "
            "SET counts = EXCLUDED.counts",
            [(*k, v) for k, v in new.items()],
        )
        keys = list(adds)
        found = await self.conn.fetch(
            "SELECT level, start, key, counts FROM sketch_w WHERE (level, start, key) IN "
            "(SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])) FOR UPDATE",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
        )
        old = {(r[0], r[1], r[2]): r[3] for r in found}
        await self.conn.executemany(
            "INSERT INTO sketch_w VALUES ($1,$2,$3,0,0,0,$4) ON CONFLICT (level, start, key) DO UPDATE "
            "SET counts = EXCLUDED.counts",
            [(*k, _rmw(old.get(k), add)) for k, add in adds.items()],
        )
    return (time.perf_counter() - began) * 1000


async def _pg_late(self: PostgresStore, keys: list[tuple[Any, ...]], b: int) -> float:
    began = time.perf_counter()
    async with self.conn.transaction():
        found = await self.conn.fetch(
            "SELECT level, start, key, counts FROM sketch_w WHERE (level, start, key) IN "
            "(SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])) FOR UPDATE",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
        )
        old = {(r[0], r[1], r[2]): r[3] for r in found}
        await self.conn.executemany(
            "INSERT INTO sketch_w VALUES ($1,$2,$3,0,0,0,$4) ON CONFLICT (level, start, key) DO UPDATE "
            "SET counts = EXCLUDED.counts",
            [(*k, _rmw(old.get(k), {b: 1})) for k in keys],
        )
    return (time.perf_counter() - began) * 1000


SQLiteStore.close_hour = _sqlite_close_hour  # type: ignore[attr-defined]
SQLiteStore.late_metric = _sqlite_late  # type: ignore[attr-defined]
PostgresStore.close_hour = _pg_close_hour  # type: ignore[attr-defined]
PostgresStore.late_metric = _pg_late  # type: ignore[attr-defined]


async def prepare_write_table(store: Store) -> None:
    if isinstance(store, SQLiteStore):
        store.db.execute("CREATE TABLE sketch_w AS SELECT * FROM sketch_sparse WHERE 0")
        store.db.execute("CREATE UNIQUE INDEX sketch_w_key ON sketch_w (level, start, key)")
        store.db.execute(
            "INSERT INTO sketch_w SELECT * FROM sketch_sparse WHERE level IN ('town/day', 'user/day', "
            "'user/month')"
        )
    else:
        assert isinstance(store, PostgresStore)
        await store.conn.execute("CREATE TABLE sketch_w (LIKE sketch_sparse INCLUDING ALL)")
        await store.conn.execute(
            "INSERT INTO sketch_w SELECT * FROM sketch_sparse WHERE level IN ('town/day', "
            "'user/day', 'user/month')"
        )


# --- main ------------------------------------------------------------------------------------------


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--actions", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    args = parser.parse_args()
    log(f"gamma {GAMMA:.6f}; synthesizing {args.actions:,} actions over {DAYS} days ...")
    began = time.perf_counter()
    a = synthesize(args.actions, args.seed)
    rows: list[Row] = []
    for level in levels_of(a):
        level_rows = sketch_rows(level, a, dense=level.name != "town/quarter")
        rows += level_rows
        sparse = np.array([len(r[7]) for r in level_rows])
        dense = np.array([len(r[6]) for r in level_rows])
        n = np.array([r[3] for r in level_rows])
        log(
            f"  {level.name:13} {len(level_rows):8,} rows, {n.mean():8.1f} actions and "
            f"{sparse.mean() / 4:6.1f} non-empty bins a row (= rows of today's layout); "
            f"blob bytes a row: sparse {sparse.mean():7.0f}, "
            f"dense "
            + (
                f"{dense.mean():6.0f}, smaller of the two {np.minimum(sparse, dense).mean():6.0f}"
                if dense.any()
                else "(not built)"
            )
        )
    # how many bin rows today's layout (which always keeps the model) would hold for the town/day level
    town_day = (T0 + a.quarter.astype(np.int64) * QUARTER) // DAY * TOWNS + a.town
    with_model = np.unique((town_day * MODELS + a.model) * 2_000 + a.bin.astype(np.int64) + 1_000).size
    log(f"  today's layout keeps the model: town/day bin rows with the model {with_model:,}")
    old = bin_rows(
        [r for r in rows if r[0] in ("town/day", "town/hour") and int(r[2].split("-")[1]) < OLD_LAYOUT_TOWNS]
    )
    log(
        f"  built in {time.perf_counter() - began:.0f} s; today's layout for {OLD_LAYOUT_TOWNS} towns: "
        f"{len(old):,} bin rows"
    )
    results: dict[str, dict[str, Any]] = {}
    stores: list[Callable[[], Awaitable[Store]]] = []
    workdir = tempfile.mkdtemp(prefix="am-sketch-spike-")
    database = f"am_sketch_spike_{os.getpid()}"

    async def sqlite_store() -> Store:
        store = SQLiteStore(Path(workdir) / "spike.db")
        await store.load(rows, old)
        return store

    async def postgres_store() -> Store:
        admin = await asyncpg.connect(POSTGRES_URL)
        await admin.execute(f'CREATE DATABASE "{database}"')
        await admin.close()
        conn = await asyncpg.connect(POSTGRES_URL.rsplit("/", 1)[0] + "/" + database)
        store = PostgresStore(conn)
        await store.load(rows, old)
        return store

    if not args.no_sqlite:
        stores.append(sqlite_store)
    if not args.no_postgres:
        stores.append(postgres_store)
    try:
        for make in stores:
            began = time.perf_counter()
            store = await make()
            sizes = store.sizes()
            sizes = await sizes if asyncio.iscoroutine(sizes) else sizes
            log(
                f"{store.name}: loaded in {time.perf_counter() - began:.0f} s; table bytes: "
                + ", ".join(
                    f"{k} {v / 1e6:.1f} MB"
                    for k, v in sorted(sizes.items())
                    if k in ("sketch_dense", "sketch_sparse", "bins")
                )
            )
            try:
                await run_store(store, a, args.runs, results)
                await prepare_write_table(store)
                await write_side(store, a, args.runs)
            finally:
                await store.close()
        log("summary (median ms): case: " + ", ".join(f"{k}: {v}" for k, v in results.items()))
    finally:
        if not args.no_postgres:
            admin = await asyncpg.connect(POSTGRES_URL)
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
            await admin.close()
        shutil.rmtree(workdir)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
