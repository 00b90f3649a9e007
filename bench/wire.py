"""Metrics per second through `POST /v1/actions` against `emit_many`, same metrics, same run.

    PYTHONPATH=src python bench/wire.py                        # 100k metrics, 3 runs per backend
    PYTHONPATH=src python bench/wire.py --metrics 20000 --runs 1 --backend sqlite

For each backend and run, two fresh migrated databases take the same metrics (bench/ingest.py's
`generate`): one through `AsyncMetricsStore.emit_many` in this process, given the `ActionMetric`s;
the other through a real `action-metrics serve` child process, from an httpx client on loopback
posting JSON arrays of `--batch` metrics (the bodies are serialised before the clock starts, as
they would be in the writer's own process; the server parses, validates, checks the token's towns,
counts duplicates and commits each request). The clock runs from the first request to the last
answer; every answer must say all its metrics were stored, and the database is counted afterwards.
The ratio is the wire's metrics/s over emit_many's; the aim is at least 0.5.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from ingest import Databases, generate, settle, stored_count

from action_metrics import ActionMetric, AsyncMetricsStore

TARGET_RATIO = 0.5
TOKEN = "bench-writer-token-0123456789abcdef"
SRC = Path(__file__).resolve().parent.parent / "src"


async def emit_many_path(url: str, metrics: Sequence[ActionMetric]) -> float:
    async with AsyncMetricsStore(url) as store:
        started = time.perf_counter()
        await store.emit_many(metrics)
        return time.perf_counter() - started


class Serve:
    """`action-metrics serve` over `url` in a child process, stopped on exit."""

    def __init__(self, url: str) -> None:
        environment = {
            name: value for name, value in os.environ.items() if not name.startswith("ACTION_METRICS")
        }
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
        environment["ACTION_METRICS_API_TOKENS"] = f"write:{TOKEN}:*"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "action_metrics", "serve", "--url", url, "--port", "0"],
            stdout=subprocess.DEVNULL,  # uvicorn's access log
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        assert self.process.stderr is not None
        self.address = ""
        for line in self.process.stderr:
            found = re.search(r"Uvicorn running on (http://\S+)", line)
            if found:
                self.address = found[1]
                break
        if not self.address:
            raise RuntimeError("action-metrics serve did not start")
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def wire_path(url: str, bodies: Sequence[tuple[int, bytes]], clients: int) -> float:
    server = Serve(url)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=server.address, headers=headers, timeout=300) as client:

            def send(body: tuple[int, bytes]) -> None:
                count, content = body
                answer = client.post("/v1/actions", content=content)
                answer.raise_for_status()
                result = answer.json()
                if result["stored"] != count:
                    raise RuntimeError(f"a request stored {result['stored']} of {count}: {result}")

            client.get("/healthz").raise_for_status()  # the connection is open before the clock starts
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(send, bodies))
            return time.perf_counter() - started
    finally:
        server.stop()


async def compare(backend: str, metrics: list[ActionMetric], arguments: argparse.Namespace) -> list[float]:
    bodies = [
        (len(chunk), json.dumps([metric.to_dict() for metric in chunk]).encode())
        for chunk in (
            metrics[start : start + arguments.batch] for start in range(0, len(metrics), arguments.batch)
        )
    ]
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="am-bench-wire-") as workdir:
        databases = Databases(backend, Path(workdir))
        try:
            for run in range(1, arguments.runs + 1):
                reference_url, wire_url = await databases.fresh(), await databases.fresh()
                await settle(backend)
                reference = await emit_many_path(reference_url, metrics)
                await settle(backend)
                wire = await asyncio.to_thread(wire_path, wire_url, bodies, arguments.clients)
                for url in (reference_url, wire_url):
                    if await stored_count(url) != len(metrics):
                        raise RuntimeError(f"{url} holds {await stored_count(url)} of {len(metrics)} metrics")
                reference_rate, wire_rate = len(metrics) / reference, len(metrics) / wire
                ratios.append(wire_rate / reference_rate)
                print(
                    f"{backend:10} run {run}: emit_many {reference_rate:9,.0f}/s   /v1/actions "
                    f"{wire_rate:9,.0f}/s   ratio {ratios[-1]:.2f}",
                    flush=True,
                )
                await databases.drop(reference_url)
                await databases.drop(wire_url)
        finally:
            await databases.drop_all()
    return ratios


async def main(arguments: argparse.Namespace) -> int:
    metrics = list(generate(arguments.metrics))
    print(
        f"{arguments.metrics:,} metrics, batches of {arguments.batch}, {arguments.clients} client(s), "
        f"{arguments.runs} run(s) per backend",
        flush=True,
    )
    failed = False
    for backend in arguments.backend:
        ratios = await compare(backend, metrics, arguments)
        median = statistics.median(ratios)
        verdict = "meets" if median >= TARGET_RATIO else "misses"
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"{backend:10} median ratio {median:.2f} ({spread}): {verdict} {TARGET_RATIO}")
        failed |= median < TARGET_RATIO
    return 1 if failed else 0


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--metrics", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1_000, help="metrics per request")
    parser.add_argument("--clients", type=int, default=1, help="concurrent requests")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--backend", action="append", choices=["sqlite", "postgresql"], help="default: both, in turn"
    )
    arguments = parser.parse_args(argv)
    arguments.backend = arguments.backend or ["sqlite", "postgresql"]
    return arguments


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
