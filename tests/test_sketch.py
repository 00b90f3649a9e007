"""Latency sketches: the blob keeps every count (wide ones too), and the merge of signed sketches gives
what NumPy's exact percentiles give to 1%, and what the SQL merge of the same bins
(`aggregate.weighted_percentiles`) gives, on both backends.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, literal, select

from action_metrics.aggregate import weighted_percentiles
from action_metrics.dialects import backend_for
from action_metrics.rollup import ZERO_BIN, bin_of, bin_value, bin_value_of
from action_metrics.sketch import (
    NARROW,
    WIDE,
    Counted,
    Sketch,
    SketchError,
    decode,
    encode,
    merged_percentiles,
    sketch_counts,
)

FRACTIONS = {"p50_latency_ms": 0.50, "p95_latency_ms": 0.95, "p99_latency_ms": 0.99}


def test_a_sketch_keeps_its_bins_and_counts_exactly() -> None:
    rng = np.random.default_rng(1)
    latencies = np.concatenate([rng.lognormal(3, 1.5, 5_000), [0.0, 0.0, 1e-3, 4e6]])
    sketch = Sketch.of_latencies(latencies)
    bins, counts = sketch.bins()
    expected: dict[int, int] = {}
    for latency in latencies.tolist():
        if latency > 0:
            expected[bin_of(latency)] = expected.get(bin_of(latency), 0) + 1
    assert dict(zip(bins.tolist(), counts.tolist(), strict=True)) == expected
    assert (sketch.n, sketch.zero_count) == (latencies.size, 2)
    assert sketch.latency_sum == pytest.approx(float(latencies.sum()))
    assert sketch.blob[0] == NARROW


def test_a_sketch_of_distinct_bins_is_the_sketch_of_those_bins() -> None:
    """A bucket's bins as a GROUP BY counts them (each once, in any order, the zero latencies' bin
    among them) make the sketch `of_bins` makes of them; a bin given twice is refused."""
    bins, counts = [9, ZERO_BIN, -3, 400, 7], [2, 5, 1, 70_000, 3]
    distinct = Sketch.of_distinct_bins(bins, counts, 12.5)
    assert distinct == Sketch.of_bins(bins, counts, 12.5)
    assert (distinct.n, distinct.zero_count) == (sum(counts), 5)
    assert Sketch.of_distinct_bins([ZERO_BIN], [4], 0.0) == Sketch(4, 0.0, 4, encode([], []))
    with pytest.raises(SketchError, match="twice"):
        Sketch.of_distinct_bins([3, 3], [1, 1], 0.0)


def test_counts_and_bins_that_do_not_fit_16_bits_take_the_wide_format() -> None:
    for bins, counts in (([5, 7], [65_535, 65_536]), ([-40_000, 3], [1, 2]), ([3, 2**15], [1, 1])):
        blob = encode(bins, counts)
        assert blob[0] == (
            WIDE if max(counts) >= 2**16 or min(bins) < -(2**15) or max(bins) >= 2**15 else NARROW
        )
        got_bins, got_counts = decode(blob)
        assert got_bins.tolist() == sorted(bins)
        assert got_counts.tolist() == [c for _, c in sorted(zip(bins, counts, strict=True))]
    assert encode([1], [65_535])[0] == NARROW


def test_a_blob_that_is_not_a_sketch_is_refused() -> None:
    for blob in (b"", b"\x07\x00\x00\x00\x00", b"\x01\x00\x00\x00"):
        with pytest.raises(SketchError):
            decode(blob)
    with pytest.raises(SketchError):
        encode([ZERO_BIN], [1])
    with pytest.raises(SketchError):
        encode([3], [-1])


def _exact(values: np.ndarray) -> dict[str, float]:
    return {
        name: float(np.percentile(values, fraction * 100, method="linear"))
        for name, fraction in FRACTIONS.items()
    }


def test_merged_sketches_are_within_one_percent_of_the_exact_percentiles() -> None:
    """Groups made of many sketches, some added and then subtracted again (a local day's edge
    hours), one group of a single zero latency, one group with nothing."""
    rng = np.random.default_rng(7)
    groups = [rng.lognormal(mu, 1.0, size) for mu, size in ((1, 3_000), (6, 500), (3, 40_000), (0, 1))]
    groups[3] = np.array([0.0])
    groups.append(np.zeros(0))
    group_of, signs, sketches = [], [], []
    for number, latencies in enumerate(groups):
        for piece in np.array_split(latencies, 7):
            group_of.append(number)
            signs.append(1)
            sketches.append(Sketch.of_latencies(piece))
        extra = Sketch.of_latencies(rng.lognormal(2, 2, 300))
        group_of += [number, number]
        signs += [1, -1]
        sketches += [extra, extra]
    merged = merged_percentiles(len(groups), [sketch_counts(group_of, signs, sketches)])
    for number, latencies in enumerate(groups):
        assert merged.count[number] == latencies.size
        got = merged.of(number)
        if not latencies.size:
            assert got == dict.fromkeys(FRACTIONS)
            continue
        for name, value in _exact(latencies).items():
            assert got[name] == pytest.approx(value, rel=0.01, abs=0.0), (number, name)


def test_a_subtraction_of_what_was_never_added_is_an_error() -> None:
    sketch = Sketch.of_latencies([5.0, 6.0])
    with pytest.raises(SketchError):
        merged_percentiles(1, [sketch_counts([0], [-1], [sketch])])


def test_raw_bins_and_wide_counts_merge_with_sketches() -> None:
    wide = Sketch.of_bins([100, 200], [70_000, 1], 0.0)
    raw = Counted(np.array([0, 0, 0]), np.array([ZERO_BIN, 150, 100]), np.array([3, 2, 5]))
    merged = merged_percentiles(1, [sketch_counts([0], [1], [wide]), raw])
    assert merged.count.tolist() == [70_011]
    assert merged.of(0)["p50_latency_ms"] == pytest.approx(bin_value_of(100))


async def _sql_percentiles(url: str, rows: list[tuple[str, int, int]]) -> dict[str, dict[str, Any]]:
    """`weighted_percentiles` over (group, bin, count) rows stored in a table of the database, each
    bin's value computed in SQL (`bin_value`) as the breakdown statement does."""
    table = Table(
        "sketch_test_bins",
        MetaData(),
        Column("grp", String(16)),
        Column("bin", Integer),
        Column("n", Integer),
    )
    engine = backend_for(url).create_engine()
    try:
        async with engine.begin() as connection:
            await connection.run_sync(table.create)
            await connection.execute(insert(table), [{"grp": g, "bin": b, "n": n} for g, b, n in rows])
            latencies = select(
                table.c.grp,
                bin_value(table.c.bin).label("value"),
                table.c.n,
                literal(1, Integer).label("approximate"),
            ).subquery("latencies")
            statement = select(weighted_percentiles(latencies, ["grp"]))
            return {row["grp"]: dict(row) for row in (await connection.execute(statement)).mappings()}
    finally:
        await engine.dispose()


def test_the_merge_equals_the_sql_merge_of_the_same_bins(database_url: str) -> None:
    rng = np.random.default_rng(3)
    groups = {
        "mixed": np.concatenate([rng.lognormal(1, 2, 4_000), np.zeros(40)]),
        "one": np.array([12.5]),
        "two": np.array([0.0, 3.0]),
        "zeros": np.zeros(5),
        "narrow": rng.uniform(10, 10.5, 999),
    }
    rows: list[tuple[str, int, int]] = []
    sketches = []
    for name, latencies in groups.items():
        sketch = Sketch.of_latencies(latencies)
        sketches.append(sketch)
        bins, counts = sketch.bins()
        rows += [(name, b, c) for b, c in zip(bins.tolist(), counts.tolist(), strict=True)]
        if sketch.zero_count:
            rows.append((name, ZERO_BIN, sketch.zero_count))
    # A wide count, merged from a sketch and subtracted back out by another.
    big = Sketch.of_bins([300], [100_000], 0.0)
    merged = merged_percentiles(
        len(groups),
        [sketch_counts([*range(len(groups)), 0, 0], [1] * len(groups) + [1, -1], [*sketches, big, big])],
    )
    sql = asyncio.run(_sql_percentiles(database_url, rows))
    for number, name in enumerate(groups):
        got = merged.of(number)
        for percentile in FRACTIONS:
            assert got[percentile] == pytest.approx(sql[name][percentile], rel=1e-12, abs=1e-12), (
                name,
                percentile,
            )


def test_the_merge_leaves_its_parts_as_they_were_and_ignores_pairs_counting_nothing() -> None:
    rng = np.random.default_rng(11)
    latencies = [rng.lognormal(2, 1, 500) for _ in range(3)]
    sketches = [Sketch.of_latencies(values) for values in latencies]
    parts = [sketch_counts([0, 1, 1], [1, 1, 1], sketches)]
    copies = [Counted(part.groups.copy(), part.bins.copy(), part.counts.copy()) for part in parts]
    # A pair counting nothing, in a bin far below every other: it must neither move a percentile
    # nor make a group without latencies look as if it had some.
    nothing = Counted(np.array([2], np.int64), np.array([-20_000], np.int64), np.array([0], np.int64))
    merged = merged_percentiles(3, [*parts, nothing])
    alone = merged_percentiles(3, parts)
    for part, copy in zip(parts, copies, strict=True):
        assert np.array_equal(part.groups, copy.groups)
        assert np.array_equal(part.bins, copy.bins)
        assert np.array_equal(part.counts, copy.counts)
    for group in range(3):
        assert merged.of(group) == alone.of(group)
    assert merged.of(2) == dict.fromkeys(FRACTIONS)
    both = np.concatenate(latencies[1:])
    for name, fraction in FRACTIONS.items():
        assert merged.of(1)[name] == pytest.approx(np.quantile(both, fraction), rel=0.01)
