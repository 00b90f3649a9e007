"""Price changes on ClickHouse (in process, chdb): ten manual prices set one after another on a
fresh store that has seen ten catalogue models, then `sync_prices()` twice; seconds each, median of
`--runs` fresh databases. Run it from a checkout of each version to compare them:

    PYTHONPATH=src python bench/clickhouse_prices.py --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta

from action_metrics import ActionMetric, MetricsStore

MODELS = [
    "gpt-4o-mini-2024-07-18",
    "o3",
    "gpt-5.6-luna",
    "claude-sonnet-4-5-20250929",
    "claude-sonnet-4-6",
    "claude-3-5-haiku-20241022",
    "claude-opus-4-1-20250805",
    "gpt-4o",
    "gpt-4.1",
    "o4-mini",
]
SEEN = datetime(2025, 9, 1, tzinfo=UTC)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--path", default=None, help="the chdb directory (default: a new temporary one)")
    arguments = parser.parse_args()
    directory = arguments.path or tempfile.mkdtemp(prefix="am-ch-prices-")
    times: dict[str, list[float]] = {"ten manual prices": [], "sync": [], "sync again": []}
    for _ in range(arguments.runs):
        with MetricsStore(f"chdb://{directory}?database=prices_{uuid.uuid4().hex[:8]}") as store:
            store.emit_many(
                [ActionMetric("chat", "u", "t", None, 10, 10, m, 1.0, 0, timestamp=SEEN) for m in MODELS]
            )
            started = time.perf_counter()
            for day, model in enumerate(MODELS):
                store.set_model_price(model, "1", "4", SEEN - timedelta(days=31 - day))
            times["ten manual prices"].append(time.perf_counter() - started)
            for name in ("sync", "sync again"):
                started = time.perf_counter()
                store.sync_prices()
                times[name].append(time.perf_counter() - started)
    for name, seconds in times.items():
        print(
            f"{name:>18}: {statistics.median(seconds):.3f} s (min {min(seconds):.3f}, max {max(seconds):.3f})"
        )


if __name__ == "__main__":
    main()
