"""Streaming ingest: metrics drawn from any iterable in bounded batches, each stored atomically."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Final

from action_metrics.model import ActionMetric

INGEST_BATCH: Final = 20_000
"""Metrics per transaction when `emit_many` streams: bounds memory (a 10M generator runs in well
under 300 MB) and how long a batch holds SQLite's write lock, yet amortises each commit."""
CLICKHOUSE_INGEST_BATCH: Final = 100_000
"""Metrics per insert when `emit_many` streams into ClickHouse: each insert writes a part into the
raw table and, through the materialized views, into the rollups and the ids table, a fixed cost
ClickHouse's documentation says to amortise over large inserts (ten thousands to a hundred
thousand rows or more)."""


def metric_batches(metrics: Iterable[ActionMetric], size: int = INGEST_BATCH) -> Iterator[list[ActionMetric]]:
    """Consecutive lists of at most `size` metrics, each checked before it is yielded.

    Raises TypeError naming the position, counted from the start of `metrics`, of anything that
    is not an ActionMetric; the batches yielded before it are not taken back.
    """
    iterator = iter(metrics)
    start = 0
    while batch := list(islice(iterator, size)):
        for offset, metric in enumerate(batch):
            if not isinstance(metric, ActionMetric):
                kind = type(metric).__name__
                raise TypeError(f"metrics[{start + offset}]: expected an ActionMetric, got {kind}")
        yield batch
        start += len(batch)
