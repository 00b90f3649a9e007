"""A town's action types per local hour in a zone whose hours are not UTC's (Kathmandu, +05:45)
over long windows: the breakdown that reads the most raw segments (each local hour takes a quarter
hour of raw rows from the UTC hour before it). Loads 2,400 actions, one every 7 hours, into an
empty database, then times the breakdown over 90, 365 and 800 days; seconds, the second call of
each (hour buckets are not stored, so each call computes its answer).

    PYTHONPATH=src python bench/hour_breakdowns.py                          # a temporary SQLite file
    PYTHONPATH=src python bench/hour_breakdowns.py --url postgresql://postgres@127.0.0.1/hours  # after
        action-metrics db upgrade --url ... on an empty database
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from action_metrics import ActionMetric, MetricsStore

START = datetime(2024, 1, 1, tzinfo=UTC)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="an empty database, migrated if PostgreSQL (default: a SQLite file)")
    url = parser.parse_args().url or f"sqlite:///{Path(tempfile.mkdtemp()) / 'hours.db'}"
    metrics = [
        ActionMetric(
            "lod3",
            "u",
            "town-b",
            "c",
            1,
            1,
            "haiku",
            float(n % 50 + 1),
            1,
            timestamp=START + n * timedelta(hours=7, seconds=8),
        )
        for n in range(2_400)
    ]
    with MetricsStore(url) as store:
        store.emit_many(metrics)
        store.flush()
        for days in (90, 365, 800):
            asked = {"bucket": "hour", "tz": "Asia/Kathmandu", "town_id": "town-b", "since": START}
            asked["until"] = START + timedelta(days=days)
            store.breakdown("action_type", **asked)
            started = time.perf_counter()
            rows = store.breakdown("action_type", **asked)
            print(f"{days:4d} days: {len(rows):5,} rows in {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
