"""Metrics per second through `POST /v1/actions` and `POST /v1/traces` against `emit_many`, same
metrics, same run.

    PYTHONPATH=src python bench/wire.py                        # 100k metrics, 3 runs per backend
    PYTHONPATH=src python bench/wire.py --metrics 20000 --runs 1 --backend sqlite
    PYTHONPATH=src python bench/wire.py --path traces          # OTLP/HTTP protobuf, a GenAI span each

For each backend and run, two fresh migrated databases take the same metrics (bench/ingest.py's
`generate`): one through `AsyncMetricsStore.emit_many` in this process, given the `ActionMetric`s;
the other through a real `action-metrics serve` child process, from an httpx client on loopback
posting JSON arrays of `--batch` metrics (the bodies are serialised before the clock starts, as
they would be in the writer's own process; the server parses, validates, checks the token's towns,
counts duplicates and commits each request). The clock runs from the first request to the last
answer; every answer must say all its metrics were stored, and the database is counted afterwards.
The ratio is the wire's metrics/s over emit_many's; the aim is at least 0.5. On a loaded machine
that wall-clock ratio mostly measures the scheduler (client and server wait on each other), so each
run also prints CPU time per metric: emit_many's (this process, its driver thread included) and the
server's (the child, read from /proc: Linux only), and their ratio. With `--path traces`
each metric travels as the GenAI span an instrumentation would send (model, token counts, response
id, `action.*` ids and credits), `--batch` spans per OTLP protobuf request. `--workers N` runs the
server as `serve --workers N` (its CPU then summed over its processes); give at least as many
`--clients`, since a client's keep-alive connection stays with one process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
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
from google.protobuf import json_format
from ingest import Databases, generate, settle, stored_count
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from action_metrics import ActionMetric, AsyncMetricsStore

TARGET_RATIO = 0.5
TOKEN = "bench-writer-token-0123456789abcdef"
SRC = Path(__file__).resolve().parent.parent / "src"


async def emit_many_path(url: str, metrics: Sequence[ActionMetric]) -> tuple[float, float]:
    """Seconds, wall clock and CPU (this process's, all threads), to emit `metrics`."""
    async with AsyncMetricsStore(url) as store:
        started, cpu_started = time.perf_counter(), time.process_time()
        await store.emit_many(metrics)
        return time.perf_counter() - started, time.process_time() - cpu_started


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) a process and its children (`serve --workers`) have used so far,
    from /proc (Linux); NaN where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return math.nan
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(int(child)) for child in children)


class Serve:
    """`action-metrics serve` over `url` in a child process, stopped on exit."""

    def __init__(self, url: str, workers: int = 1) -> None:
        environment = {
            name: value for name, value in os.environ.items() if not name.startswith("ACTION_METRICS")
        }
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
        environment["ACTION_METRICS_API_TOKENS"] = f"write:{TOKEN}:*"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "action_metrics",
                "serve",
                "--url",
                url,
                "--port",
                "0",
                "--workers",
                f"{workers}",
            ],
            stdout=subprocess.DEVNULL,  # uvicorn's access log
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        assert self.process.stderr is not None
        self.address, started = "", 0
        for line in self.process.stderr:  # the address, then each worker's startup
            found = re.search(r"Uvicorn running on (http://\S+)", line)
            if found:
                self.address = found[1]
            started += "Application startup complete" in line
            if self.address and started == workers:
                break
        if not self.address or started < workers:
            raise RuntimeError("action-metrics serve did not start")
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def _attribute(key: str, value: str | int) -> KeyValue:
    any_value = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value)
    return KeyValue(key=key, value=any_value)


def genai_span(metric: ActionMetric) -> Span:
    """The span an instrumentation sends for this metric's call, with the action's ids on it."""
    start = int(metric.timestamp.timestamp() * 1e6) * 1_000
    attributes: dict[str, str | int] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": metric.model,
        "gen_ai.response.id": f"resp-{metric.id.hex}",
        "gen_ai.usage.input_tokens": metric.tokens_in,
        "gen_ai.usage.output_tokens": metric.tokens_out,
        "action.type": metric.action_type,
        "action.user_id": metric.user_id,
        "action.town_id": metric.town_id,
        "action.credits": metric.credits_charged,
    }
    if metric.citizen_id is not None:
        attributes["action.citizen_id"] = metric.citizen_id
    return Span(
        trace_id=metric.id.bytes,
        span_id=metric.id.bytes[8:],
        name=f"chat {metric.model}",
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=start,
        end_time_unix_nano=start + int(metric.latency_ms * 1e6),
        attributes=[_attribute(key, value) for key, value in attributes.items()],
    )


ACTION_ATTRIBUTES = ("action.type", "action.user_id", "action.town_id", "action.credits", "action.citizen_id")


def action_spans(metrics: Sequence[ActionMetric], calls_per_action: int) -> list[Span]:
    """The spans a traced service sends when its actions make `calls_per_action` LLM calls each: an
    action span naming the ids and credits, its calls under it without them (the server claims
    each action's credits for one call)."""
    spans = []
    for start in range(0, len(metrics), calls_per_action):
        calls = [genai_span(metric) for metric in metrics[start : start + calls_per_action]]
        first = calls[0]
        action = Span(
            trace_id=first.trace_id,
            span_id=bytes(reversed(first.span_id)),
            name="action",
            start_time_unix_nano=first.start_time_unix_nano,
            end_time_unix_nano=calls[-1].end_time_unix_nano,
            attributes=[kv for kv in first.attributes if kv.key in ACTION_ATTRIBUTES],
        )
        for call in calls:
            call.trace_id, call.parent_span_id = action.trace_id, action.span_id
            kept = [kv for kv in call.attributes if kv.key not in ACTION_ATTRIBUTES]
            del call.attributes[:]
            call.attributes.extend(kept)
        spans += [*calls, action]
    return spans


def otlp_body(metrics: Sequence[ActionMetric], calls_per_action: int = 0) -> bytes:
    """`metrics` as GenAI spans with their action's attributes on them, or (`calls_per_action`) under
    action spans that carry them."""
    spans = action_spans(metrics, calls_per_action) if calls_per_action else [genai_span(m) for m in metrics]
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])])
    return request.SerializeToString()


def otlp_json_body(metrics: Sequence[ActionMetric]) -> bytes:
    """The same request as OTLP JSON, as the exporters write it: enums as numbers, ids in hex."""
    request = ExportTraceServiceRequest.FromString(otlp_body(metrics))
    document = json_format.MessageToDict(request, use_integers_for_enums=True)
    for resource_spans in document["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for name in ("traceId", "spanId"):
                    span[name] = base64.b64decode(span[name]).hex()
    return json.dumps(document).encode()


def _stored_actions(answer: httpx.Response, count: int) -> None:
    result = answer.json()
    if result["stored"] != count:
        raise RuntimeError(f"a request stored {result['stored']} of {count}: {result}")


def _stored_spans(answer: httpx.Response, count: int) -> None:
    result = ExportTraceServiceResponse.FromString(answer.content)
    if result.partial_success.rejected_spans:
        raise RuntimeError(f"a request had spans rejected: {result.partial_success}")


PATHS = {
    "actions": ("/v1/actions", "application/json", _stored_actions),
    "traces": ("/v1/traces", "application/x-protobuf", _stored_spans),
}


def wire_path(
    url: str, bodies: Sequence[tuple[int, bytes]], clients: int, path: str = "actions", workers: int = 1
) -> tuple[float, float]:
    """Seconds, wall clock and the server's CPU, to post `bodies`."""
    route, content_type, check = PATHS[path]
    server = Serve(url, workers)
    try:
        headers = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=server.address, headers=headers, timeout=300) as client:

            def send(body: tuple[int, bytes]) -> None:
                count, content = body
                answer = client.post(route, content=content)
                answer.raise_for_status()
                check(answer, count)

            client.get("/healthz").raise_for_status()  # the connection is open before the clock starts
            started, cpu_started = time.perf_counter(), cpu_seconds(server.process.pid)
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(send, bodies))
            return time.perf_counter() - started, cpu_seconds(server.process.pid) - cpu_started
    finally:
        server.stop()


async def compare(backend: str, metrics: list[ActionMetric], arguments: argparse.Namespace) -> list[float]:
    chunks = [metrics[start : start + arguments.batch] for start in range(0, len(metrics), arguments.batch)]
    if arguments.path == "traces":
        bodies = [(len(chunk), otlp_body(chunk, arguments.calls_per_action)) for chunk in chunks]
    else:
        bodies = [
            (len(chunk), json.dumps([metric.to_dict() for metric in chunk]).encode()) for chunk in chunks
        ]
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix=f"{arguments.prefix.replace('_', '-')}-wire-") as workdir:
        databases = Databases(backend, Path(workdir), arguments.prefix)
        try:
            for run in range(1, arguments.runs + 1):
                reference_url, wire_url = await databases.fresh(), await databases.fresh()
                await settle(backend)
                reference, reference_cpu = await emit_many_path(reference_url, metrics)
                await settle(backend)
                wire, wire_cpu = await asyncio.to_thread(
                    wire_path, wire_url, bodies, arguments.clients, arguments.path, arguments.workers
                )
                for url in (reference_url, wire_url):
                    if await stored_count(url) != len(metrics):
                        raise RuntimeError(f"{url} holds {await stored_count(url)} of {len(metrics)} metrics")
                reference_rate, wire_rate = len(metrics) / reference, len(metrics) / wire
                ratios.append(wire_rate / reference_rate)
                print(
                    f"{backend:10} run {run}: emit_many {reference_rate:9,.0f}/s   /v1/{arguments.path} "
                    f"{wire_rate:9,.0f}/s   ratio {ratios[-1]:.2f}   CPU per metric: emit_many "
                    f"{reference_cpu / len(metrics) * 1e6:.1f} us, "
                    f"server {wire_cpu / len(metrics) * 1e6:.1f} us, ratio {reference_cpu / wire_cpu:.2f}",
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
        f"{arguments.metrics:,} metrics to /v1/{arguments.path}, batches of {arguments.batch}, "
        f"{arguments.clients} client(s), {arguments.workers} server process(es), "
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
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes (`serve --workers`): give as many clients"
    )
    parser.add_argument("--path", choices=sorted(PATHS), default="actions", help="the endpoint posted to")
    parser.add_argument(
        "--calls-per-action",
        type=int,
        default=0,
        help="with --path traces: each action's ids and credits on an action span above this many calls "
        "(default: on every call's span)",
    )
    parser.add_argument("--runs", type=int, default=3)
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


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
