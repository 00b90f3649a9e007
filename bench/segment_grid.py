"""Why raw segments are read by the nested CASEs below `sketch_reads.GRID_FROM_SEGMENTS` and by slot
from it on: the dashboard's local-day breakdowns over 90 days in Kathmandu (~180 segments) timed
both ways on a store `bench/dashboard.py` loaded, alternating, each call the first after the stored
closed buckets are emptied (so it computes every bucket). Milliseconds, median of `--repeat`.

    PYTHONPATH=src python bench/segment_grid.py --url sqlite:////tmp/am-10m.db
    PYTHONPATH=src python bench/segment_grid.py --url postgresql://postgres@127.0.0.1/am_bench_10m
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select

from action_metrics import AsyncMetricsStore, sketch_reads
from action_metrics.dialects import backend_for
from action_metrics.schema import action_metrics, closed_buckets

QUESTIONS: dict[str, dict[str, Any]] = {
    "per Kathmandu day, 90d": {"bucket": "day", "tz": "Asia/Kathmandu"},
    "by town x Kathmandu day, 90d": {"by": ("town_id",), "bucket": "day", "tz": "Asia/Kathmandu"},
}


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="a database bench/dashboard.py loaded")
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()
    engine = backend_for(arguments.url).create_engine()
    async with engine.begin() as connection:
        newest = (await connection.execute(select(func.max(action_metrics.c.timestamp)))).scalar_one()
    since = newest - timedelta(days=90)
    ways = {"nested CASEs": sys.maxsize, "by slot": 0}
    times: dict[tuple[str, str], list[float]] = {}
    segments: list[int] = []
    found = sketch_reads._segments

    def counted(pieces: Any) -> Any:
        result = found(pieces)
        segments.append(len(result))
        return result

    sketch_reads._segments = counted  # type: ignore[assignment]
    async with AsyncMetricsStore(arguments.url) as store:
        for _ in range(arguments.repeat):
            for way, threshold in ways.items():
                sketch_reads.GRID_FROM_SEGMENTS = threshold  # type: ignore[misc]
                for name, asked in QUESTIONS.items():
                    async with engine.begin() as connection:
                        await connection.execute(delete(closed_buckets))
                    started = time.perf_counter()
                    await store.breakdown(since=since, **asked)
                    times.setdefault((name, way), []).append((time.perf_counter() - started) * 1000)
    await engine.dispose()
    print(f"segments read per call: {min(segments)}-{max(segments)}")
    for (name, way), ms in times.items():
        print(f"{name:>30} {way:>13}: {statistics.median(ms):8.0f} ms (min {min(ms):.0f}, max {max(ms):.0f})")


if __name__ == "__main__":
    asyncio.run(main())
