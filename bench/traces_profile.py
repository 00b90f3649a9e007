"""Where a span's server time goes on `POST /v1/traces`, in process, without HTTP: decode, map, write.

    PYTHONPATH=src python bench/traces_profile.py --backend sqlite
    PYTHONPATH=src python bench/traces_profile.py --backend postgresql --spans 20000 --batch 1000
    PYTHONPATH=src python bench/traces_profile.py --backend sqlite --encoding json

The same OTLP protobuf bodies `bench/wire.py --path traces` sends (or the same requests as OTLP
JSON, with `--encoding json`) are decoded (`decode_request`),
mapped (`SpanReceiver.read`) and written (`intake.write`, one transaction per body, as the endpoint
does) into a fresh migrated database; CPU time of this process per span for each stage (the write's
includes the driver's thread), and the statements each request runs (counted and timed with
SQLAlchemy's cursor events: the wall time between before- and after-execute, by statement kind).
`--cprofile N` prints the N heaviest functions of the write stage.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ingest import Databases, generate, settle
from sqlalchemy import event
from wire import otlp_body, otlp_json_body

from action_metrics import AsyncMetricsStore
from action_metrics.charges import InheritedCredits
from action_metrics.intake import Intake, write
from action_metrics.otlp import JSON, PROTOBUF, SpanReceiver, decode_request

REID = bool(os.environ.get("REID"))


class StatementLog:
    """Statements run on an engine, by their first words: count and wall seconds."""

    def __init__(self) -> None:
        self.count: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self._started: list[float] = []

    def attach(self, sync_engine: Any) -> None:
        event.listen(sync_engine, "before_cursor_execute", self._before)
        event.listen(sync_engine, "after_cursor_execute", self._after)

    def _before(self, *_: Any) -> None:
        self._started.append(time.perf_counter())

    def _after(self, _connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
        kind = " ".join(statement.split()[:3])[:60]
        self.count[kind] += 1
        self.seconds[kind] += time.perf_counter() - self._started.pop()


async def profile(backend: str, arguments: argparse.Namespace) -> None:
    metrics = list(generate(arguments.spans))
    chunks = [metrics[start : start + arguments.batch] for start in range(0, len(metrics), arguments.batch)]
    if arguments.encoding == "json":
        bodies, content_type = [otlp_json_body(chunk) for chunk in chunks], JSON
    else:
        bodies, content_type = [otlp_body(chunk, arguments.calls_per_action) for chunk in chunks], PROTOBUF
    gc.freeze()  # as `serve` does after startup: the bench's own objects are not the server's garbage
    with tempfile.TemporaryDirectory(prefix=f"{arguments.prefix.replace('_', '-')}-traces-") as workdir:
        databases = Databases(backend, Path(workdir), arguments.prefix)
        try:
            url = await databases.fresh()
            await settle(backend)
            async with AsyncMetricsStore(url) as store:
                await store.open()
                log = StatementLog()
                log.attach((await store._open()).engine.sync_engine)
                receiver = SpanReceiver()
                intake = Intake()
                decode = mapping = writing = 0.0
                wall_write = 0.0
                profiler = cProfile.Profile() if arguments.cprofile else None
                for body in bodies:
                    cpu = time.process_time()
                    spans = decode_request(body, content_type)
                    decode += time.process_time() - cpu
                    cpu = time.process_time()
                    batch = receiver.read(spans)
                    mapping += time.process_time() - cpu
                    cpu, wall = time.process_time(), time.perf_counter()
                    if profiler is not None:
                        profiler.enable()
                    credits = InheritedCredits(batch.credits) if batch.credits else None
                    answer = await write(intake, store, batch.accepted, [], credits)
                    if profiler is not None:
                        profiler.disable()
                    writing += time.process_time() - cpu
                    wall_write += time.perf_counter() - wall
                    if answer.stored != len(batch.accepted):
                        raise RuntimeError(f"stored {answer.stored} of {len(batch.accepted)}")
            count = len(metrics)
            print(
                f"{backend}: {count:,} spans in {arguments.encoding} requests of {arguments.batch}: "
                f"CPU per span decode {decode / count * 1e6:.1f} us, map {mapping / count * 1e6:.1f} us, "
                f"write {writing / count * 1e6:.1f} us (wall {wall_write / count * 1e6:.1f} us)"
            )
            requests = len(bodies)
            for kind in sorted(log.count, key=lambda k: -log.seconds[k]):
                print(
                    f"  {log.count[kind] / requests:6.1f} per request  "
                    f"{log.seconds[kind] / count * 1e6:7.2f} us per span  {kind}"
                )
            if profiler is not None:
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(arguments.cprofile)
        finally:
            await databases.drop_all()


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spans", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1_000, help="spans per request")
    parser.add_argument("--encoding", choices=["protobuf", "json"], default="protobuf")
    parser.add_argument(
        "--calls-per-action", type=int, default=0, help="protobuf: the calls under action spans (see wire.py)"
    )
    parser.add_argument("--cprofile", type=int, default=0, help="print this many functions of the write")
    parser.add_argument(
        "--prefix",
        default="am_bench",
        help="of the PostgreSQL databases (and /tmp directories) made: one of your own when others bench too",
    )
    parser.add_argument(
        "--backend", action="append", choices=["sqlite", "postgresql"], help="default: both, in turn"
    )
    arguments = parser.parse_args(argv)
    arguments.backend = arguments.backend or ["sqlite", "postgresql"]
    return arguments


async def main(arguments: argparse.Namespace) -> None:
    for backend in arguments.backend:
        await profile(backend, arguments)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
