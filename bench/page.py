"""How long the dashboard page's data takes: the six requests `GET /` makes for one view, at once.

    PYTHONPATH=src python bench/page.py --url postgresql://root@127.0.0.1:5432/am_bench_bd_1m
    PYTHONPATH=src python bench/page.py --url sqlite:////tmp/am-bd-1m.db --hours 168

Starts `action-metrics serve --insecure` over an existing store (say one bench/dashboard.py built),
then asks what static/dashboard.js asks for a town, window and zone (metrics, the bucketed breakdown,
the one by action type, top users by cost and by loss, the checks), concurrently as the page does,
and prints each request's time and the whole view's (the page waits for the slowest), median of
`--repeat`.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parent.parent / "src"


def requests_of_a_view(town: str, hours: int, tz: str) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    base, since = f"/v1/town/{town}/", ("since_hours", str(hours))
    bucket = "hour" if hours <= 168 else "day"
    return {
        "metrics": (base + "metrics", [since]),
        "per bucket": (base + "breakdown", [("bucket", bucket), ("tz", tz), since]),
        "per action x bucket": (
            base + "breakdown",
            [("by", "action_type"), ("bucket", bucket), ("tz", tz), since],
        ),
        "top users by cost": (base + "breakdown", [("by", "user_id"), ("top", "10"), since]),
        "top users by loss": (
            base + "breakdown",
            [("by", "user_id"), ("sort", "total_profit_usd"), ("order", "asc"), ("top", "10"), since],
        ),
        "checks": (base + "checks", [since]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--town", default="town-7")
    parser.add_argument("--hours", type=int, default=90 * 24)
    parser.add_argument("--tz", default="Europe/Berlin")
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()
    environment = {name: value for name, value in os.environ.items() if not name.startswith("ACTION_METRICS")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "action_metrics",
            "serve",
            "--insecure",
            "--url",
            arguments.url,
            "--port",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    assert server.stderr is not None
    address = ""
    for line in server.stderr:
        if found := re.search(r"Uvicorn running on (http://\S+)", line):
            address = found[1]
            break
    threading.Thread(target=server.stderr.read, daemon=True).start()
    try:
        view = requests_of_a_view(arguments.town, arguments.hours, arguments.tz)
        timings: dict[str, list[float]] = {name: [] for name in [*view, "whole view"]}
        with httpx.Client(base_url=address, timeout=600) as client, ThreadPoolExecutor(len(view)) as pool:

            def timed(item: tuple[str, tuple[str, list[tuple[str, str]]]]) -> tuple[str, float]:
                name, (path, params) = item
                started = time.perf_counter()
                client.get(path, params=params).raise_for_status()
                return name, time.perf_counter() - started

            for _ in range(arguments.repeat):
                started = time.perf_counter()
                for name, seconds in pool.map(timed, view.items()):
                    timings[name].append(seconds)
                timings["whole view"].append(time.perf_counter() - started)
        window = f"last {arguments.hours} h, {arguments.tz}, median of {arguments.repeat}"
        print(f"{arguments.url}: {arguments.town}, {window}")
        for name, seconds in timings.items():
            print(f"  {name:22} {1000 * statistics.median(seconds):9,.0f} ms")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
