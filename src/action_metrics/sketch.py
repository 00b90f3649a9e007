"""Latency sketches: one bucket's log-bucket histogram (the rollups' DDSketch bins) as one value, and
the merge of many of them into percentiles, in NumPy.

A sketch is a count of latencies, their sum, how many were 0 (a latency whose bin is `ZERO_BIN`), and
a blob of (bin, count) pairs for the others, sorted by bin: a format byte, then little-endian pairs,
int16 bin + uint16 count where every pair fits, else int32 bin + int64 count (never wrapped).

The merge adds any number of sketches, each with a group and a sign (a local day is a UTC day's
sketch less the edge hours it has too much plus those it lacks), and raw rows' bins, in one
`bincount`; percentiles are interpolated between bin representatives as `aggregate.weighted_percentiles`
does in SQL (percentile_cont over the representatives), so both give the same figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

RELATIVE_ACCURACY: Final = 0.009
"""Every latency is within 0.9% of its bin's representative: 1% with room for rounding at bin edges."""
GAMMA: Final = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
LN_GAMMA: Final = math.log(GAMMA)
REPRESENTATIVE_FACTOR: Final = 2 / (GAMMA + 1)
"""Bin i holds (GAMMA**(i-1), GAMMA**i]; its representative 2 * GAMMA**i / (GAMMA + 1) is within
RELATIVE_ACCURACY of both ends."""
ZERO_BIN: Final = -(2**31)
"""The bin of a latency of 0 (whose logarithm is undefined); its representative is 0."""


def bin_of(latency_ms: float) -> int:
    """The bin of a latency (`rollup.latency_bin` in SQL)."""
    return ZERO_BIN if latency_ms <= 0 else math.ceil(math.log(latency_ms) / LN_GAMMA)


def bin_value_of(bin_number: int) -> float:
    """The latency a bin stands for (`rollup.bin_value` in SQL)."""
    return (
        0.0 if bin_number == ZERO_BIN else math.exp(bin_number * LN_GAMMA + math.log(REPRESENTATIVE_FACTOR))
    )


NARROW: Final = 1
WIDE: Final = 2
PAIRS: Final = {
    NARROW: np.dtype([("bin", "<i2"), ("count", "<u2")]),
    WIDE: np.dtype([("bin", "<i4"), ("count", "<i8")]),
}
"""The pair layout of each format byte."""

FRACTIONS: Final = {"p50_latency_ms": 0.50, "p95_latency_ms": 0.95, "p99_latency_ms": 0.99}
_LN_REPRESENTATIVE: Final = math.log(REPRESENTATIVE_FACTOR)
MAX_DENSE_CELLS: Final = 40_000_000
"""Bins further apart than this are numbered by a sort (np.unique) rather than a table of them."""


class SketchError(ValueError):
    """A blob that is not a sketch, or a merge whose signed counts went below zero (the subtracted
    sketches were not part of the ones they were subtracted from: rebuild the sketches)."""


@dataclass(frozen=True)
class Sketch:
    """One bucket's latencies: `bins`/`counts` hold the non-zero latencies, sorted by bin."""

    n: int
    latency_sum: float
    zero_count: int
    blob: bytes

    @classmethod
    def of_latencies(cls, latencies: npt.ArrayLike) -> Sketch:
        values = np.asarray(latencies, dtype=np.float64)
        positive = values[values > 0]
        bins, counts = np.unique(np.ceil(np.log(positive) / LN_GAMMA).astype(np.int64), return_counts=True)
        return cls(
            int(values.size), float(values.sum()), int(values.size - positive.size), encode(bins, counts)
        )

    @classmethod
    def of_bins(cls, bins: npt.ArrayLike, counts: npt.ArrayLike, latency_sum: float) -> Sketch:
        """From (bin, count) pairs, `ZERO_BIN` among them or not, a bin possibly more than once."""
        b = np.asarray(bins, dtype=np.int64)
        c = np.asarray(counts, dtype=np.int64)
        zero = b == ZERO_BIN
        unique, inverse = np.unique(b[~zero], return_inverse=True)
        summed = np.zeros(unique.size, dtype=np.int64)
        np.add.at(summed, inverse, c[~zero])
        return cls(int(c.sum()), float(latency_sum), int(c[zero].sum()), encode(unique, summed))

    @classmethod
    def of_distinct_bins(cls, bins: npt.ArrayLike, counts: npt.ArrayLike, latency_sum: float) -> Sketch:
        """`of_bins` where no bin is given twice (`ZERO_BIN` among them or not): one bucket's bins as a
        GROUP BY counts them, without the sort that adds up repeated bins."""
        b = np.asarray(bins, dtype=np.int64)
        c = np.asarray(counts, dtype=np.int64)
        zero = b == ZERO_BIN
        return cls(int(c.sum()), float(latency_sum), int(c[zero].sum()), encode(b[~zero], c[~zero]))

    @classmethod
    def merged(cls, sketches: Sequence[Sketch]) -> Sketch:
        """The sketch of the union of these sketches' latencies."""
        decoded = [sketch.bins() for sketch in sketches]
        zeros = sum(sketch.zero_count for sketch in sketches)
        return cls.of_bins(
            np.concatenate([bins for bins, _ in decoded] + [np.array([ZERO_BIN], np.int64)]),
            np.concatenate([counts for _, counts in decoded] + [np.array([zeros], np.int64)]),
            sum(sketch.latency_sum for sketch in sketches),
        )

    def bins(self) -> tuple[Ints, Ints]:
        return decode(self.blob)

    def added(self, other: Sketch) -> Sketch:
        """This sketch and `other` as one (a late metric added to a closed bucket's)."""
        bins, counts = self.bins()
        more_bins, more_counts = other.bins()
        return Sketch.of_bins(
            np.concatenate([bins, more_bins, [ZERO_BIN]]),
            np.concatenate([counts, more_counts, [self.zero_count + other.zero_count]]),
            self.latency_sum + other.latency_sum,
        )


def encode(bins: npt.ArrayLike, counts: npt.ArrayLike) -> bytes:
    """The blob of distinct non-zero-latency bins and their counts (zero counts are left out)."""
    b = np.asarray(bins, dtype=np.int64)
    c = np.asarray(counts, dtype=np.int64)
    kept = c != 0
    b, c = b[kept], c[kept]
    if b.size and (c.min() < 0 or (b == ZERO_BIN).any()):
        raise SketchError("a sketch holds positive counts of non-zero latencies' bins")
    order = np.argsort(b, kind="stable")
    b, c = b[order], c[order]
    if b.size > 1 and (np.diff(b) == 0).any():
        raise SketchError("a bin is given twice")
    narrow = not b.size or (b[0] >= -(2**15) and b[-1] < 2**15 and c.max() < 2**16)
    layout = NARROW if narrow else WIDE
    pairs = np.empty(b.size, dtype=PAIRS[layout])
    pairs["bin"], pairs["count"] = b, c
    return bytes([layout]) + pairs.tobytes()


def decode(blob: bytes) -> tuple[Ints, Ints]:
    layout = _layout(blob)
    pairs = np.frombuffer(blob, dtype=PAIRS[layout], offset=1)
    return pairs["bin"].astype(np.int64), pairs["count"].astype(np.int64)


def _layout(blob: bytes) -> int:
    if not blob or blob[0] not in PAIRS or (len(blob) - 1) % PAIRS[blob[0]].itemsize:
        raise SketchError(f"not a sketch: {bytes(blob[:8])!r}...")
    return blob[0]


def representative(bins: Ints) -> Floats:
    """`rollup.bin_value_of` of each bin."""
    values: Floats = np.exp(bins.astype(np.float64) * LN_GAMMA + _LN_REPRESENTATIVE)
    return np.where(bins == ZERO_BIN, 0.0, values)


@dataclass(frozen=True)
class Counted:
    """Counts per (group, bin) to merge: a sketch's pairs, or raw rows' bins."""

    groups: Ints
    bins: Ints
    counts: Ints


def sketch_counts(groups: Sequence[int], signs: Sequence[int], sketches: Sequence[Sketch]) -> Counted:
    """Every pair of every sketch, with its sketch's group and its count times the sketch's sign."""
    return blob_counts(groups, signs, [s.blob for s in sketches], [s.zero_count for s in sketches])


def blob_counts(
    groups: Sequence[int], signs: Sequence[int], blobs: Sequence[bytes], zero_counts: Sequence[int]
) -> Counted:
    """`sketch_counts` of stored sketches' blobs and zero counts, decoded together: one join of the
    blobs and one `np.delete` of their format bytes (a Python step per blob was most of a merge)."""
    count = len(blobs)
    group = np.asarray(groups, dtype=np.int64)
    sign = np.asarray(signs, dtype=np.int64)
    lengths = np.fromiter(map(len, blobs), np.int64, count)
    zeros = np.asarray(zero_counts, dtype=np.int64) * sign
    if not count:
        return Counted(group, np.zeros(0, np.int64), zeros)
    if lengths.min() < 1:
        raise SketchError("not a sketch: an empty blob")
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    offsets = np.cumsum(lengths) - lengths
    layouts = data[offsets]
    body = np.delete(data, offsets)
    body_lengths = lengths - 1
    parts_groups, parts_bins, parts_counts = [group], [np.full(count, ZERO_BIN, dtype=np.int64)], [zeros]
    byte_row = None if (layouts == NARROW).all() else np.repeat(np.arange(count), body_lengths)
    for layout, dtype in PAIRS.items():
        rows = np.flatnonzero(layouts == layout)
        if not rows.size:
            continue
        if (body_lengths[rows] % dtype.itemsize).any():
            raise SketchError("not a sketch: a blob's length does not fit its format")
        chosen = body if byte_row is None else body[layouts[byte_row] == layout]
        pairs = chosen.view(dtype)
        row_of = np.repeat(rows, body_lengths[rows] // dtype.itemsize)
        parts_groups.append(group[row_of])
        parts_bins.append(pairs["bin"].astype(np.int64))
        parts_counts.append(pairs["count"].astype(np.int64) * sign[row_of])
    unknown = ~np.isin(layouts, list(PAIRS))
    if unknown.any():
        raise SketchError(f"not a sketch: format byte {int(layouts[unknown][0])}")
    return Counted(np.concatenate(parts_groups), np.concatenate(parts_bins), np.concatenate(parts_counts))


@dataclass(frozen=True)
class Percentiles:
    """Per group: how many latencies, and each percentile (NaN for a group without any)."""

    count: Ints
    values: dict[str, Floats]

    def of(self, group: int) -> dict[str, float | None]:
        return {
            name: None if self.count[group] == 0 else float(values[group])
            for name, values in self.values.items()
        }


def merged_percentiles(group_count: int, parts: Sequence[Counted]) -> Percentiles:
    """The percentiles of each of `group_count` groups over the signed counts of `parts`.

    Lean on memory: the pairs are concatenated once and then worked on in place, and the histogram
    of every group is summed up in place. Thousands of groups of hundreds of bins make arrays of tens
    of MB, and a fresh page of memory costs more here than the arithmetic on it (at 10M actions a
    first merge spent 0.3 s of system time in page faults for 0.05 s of work)."""
    if not any(part.bins.size for part in parts):
        return Percentiles(
            np.zeros(group_count, np.int64), {name: np.full(group_count, np.nan) for name in FRACTIONS}
        )
    # A pair counting nothing (a sketch without zero latencies says so) adds nothing anywhere.
    groups = np.concatenate([part.groups for part in parts]).astype(np.int64, copy=False)
    bins = np.concatenate([part.bins for part in parts]).astype(np.int64, copy=False)
    counts = np.concatenate([part.counts for part in parts])
    # Zero latencies sort first: one place below the lowest bin.
    zero = bins == ZERO_BIN
    some = not bool(zero.all())
    high = int(bins.max()) if some else 0
    low = int(np.min(bins, where=~zero, initial=high)) - 1 if some else 0
    bins[zero] = low
    del zero
    # Only the bins present get a place (a latency far out would otherwise widen every group's row).
    if high - low + 1 <= MAX_DENSE_CELLS:
        bins -= low
        present = np.zeros(high - low + 1, dtype=bool)
        present[bins] = True
        place_of = np.cumsum(present) - 1
        place_bins = np.flatnonzero(present) + low
        place = np.take(place_of, bins, out=bins)
    else:
        place_bins, place = np.unique(bins, return_inverse=True)
    place_bins = np.where(place_bins == low, ZERO_BIN, place_bins)
    width = place_bins.size
    groups *= width
    groups += place
    # Sums of integers below 2**53: exact in float64.
    histogram = np.bincount(groups, weights=counts, minlength=group_count * width)
    del groups, bins, place, counts
    if histogram.min() < 0:
        raise SketchError("a merge went below zero: a subtracted sketch was not part of its whole")
    totals = histogram.reshape(group_count, width).sum(axis=1).astype(np.int64)
    running = np.cumsum(histogram, out=histogram)
    before = np.cumsum(totals) - totals
    values_of_places = representative(place_bins)
    values: dict[str, Floats] = {}
    last = np.maximum(totals - 1, 0)
    for name, fraction in FRACTIONS.items():
        position = last.astype(np.float64) * fraction
        rank = np.floor(position).astype(np.int64)
        following = np.minimum(rank + 1, last)
        at = np.searchsorted(running, np.stack([before + rank, before + following]), side="right")
        low_value, high_value = values_of_places[at % width]
        interpolated = low_value + (position - rank) * (high_value - low_value)
        values[name] = np.where(totals > 0, interpolated, np.nan)
    return Percentiles(totals, values)


def group_numbers(keys: Sequence[Any]) -> tuple[dict[Any, int], Ints]:
    """A number for each distinct key (in order of first appearance), and each key's."""
    numbers: dict[Any, int] = {}
    return numbers, np.fromiter((numbers.setdefault(k, len(numbers)) for k in keys), np.int64, len(keys))
