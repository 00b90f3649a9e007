"""What `@instrument_action` adds to a call that does nothing: median and p99, in microseconds.

The undecorated function, the decorated one and a bare `ActionMetric(...)` are timed in the same
run, in interleaved rounds of 1000 calls, so machine load affects all three alike. The decorated
function emits into a real store (a temporary SQLite file). The store is flushed after each round,
outside the timing: the rounds measure the caller's path (build the metric, buffer it), with the
garbage collector on and a buffer no larger than the writer's usual batch, and the background
write's own cost per metric is printed apart (CPU time on the writer's thread, not the caller's
wait). Without a tracer provider (the default) spans cost nothing; `--tracing` installs the
OpenTelemetry SDK with an exporter that discards, to show what recording a span adds.

    PYTHONPATH=src python bench/decorator.py [--calls 200000] [--tracing]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from action_metrics import ActionMetric, MetricsStore, instrument_action

ROUND = 1_000


def round_us(function: Callable[[], object]) -> float:
    """Microseconds per call over one round (the clock's own cost amortised over the round)."""
    clock = time.perf_counter_ns
    start = clock()
    for _ in range(ROUND):
        function()
    return (clock() - start) / ROUND / 1000


def percentile(samples: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks, as numpy's default."""
    ordered = sorted(samples)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--tracing", action="store_true", help="install the OpenTelemetry SDK first")
    options = parser.parse_args()
    if options.tracing:
        from collections.abc import Sequence

        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        from action_metrics import setup_otel_tracing

        class Discard(SpanExporter):
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        setup_otel_tracing(Discard())

    rounds = max(10, options.calls // ROUND)
    with tempfile.TemporaryDirectory() as directory:
        # Timer and batch size out of reach: no write runs during a timed round of `decorated`.
        store = MetricsStore(
            f"sqlite:///{Path(directory) / 'bench.db'}", flush_interval=3600, batch_size=2 * ROUND
        )
        # Default settings: the writer wakes every 500 metrics and writes while the caller runs,
        # so these rounds also pay for sharing the GIL with it.
        busy_store = MetricsStore(f"sqlite:///{Path(directory) / 'busy.db'}")
        store.open()  # one at a time: each new SQLite file is migrated on first use
        busy_store.open()

        def plain(user_id: str = "user-1", town_id: str = "town-1") -> dict[str, int]:
            return {"tokens_in": 100, "tokens_out": 50}

        decorated = instrument_action("lod3", model="haiku", store=store)(plain)
        decorated_busy = instrument_action("lod3", model="haiku", store=busy_store)(plain)

        def metric_only() -> ActionMetric:
            return ActionMetric("lod3", "user-1", "town-1", None, 100, 50, "haiku", 1.5, 10)

        round_us(decorated)  # warm up: the stores open and migrate
        round_us(decorated_busy)
        store.flush()
        busy_store.flush()
        results: dict[str, list[float]] = {
            "undecorated": [],
            "decorated": [],
            "ActionMetric(...)": [],
            "decorated, writer busy": [],
        }
        flush_ns = 0
        for _ in range(rounds):
            results["undecorated"].append(round_us(plain))
            results["decorated"].append(round_us(decorated))
            start = time.perf_counter_ns()
            store.flush()
            flush_ns += time.perf_counter_ns() - start
            results["ActionMetric(...)"].append(round_us(metric_only))
            results["decorated, writer busy"].append(round_us(decorated_busy))
            busy_store.flush()  # its leftovers must not be written during the next rounds
        stored = store.aggregate().count
        store.close()
        busy_store.close()

    tracing = "on" if options.tracing else "off"
    print(f"{rounds * ROUND} calls each, per call, in rounds of {ROUND}; tracing {tracing}")
    print(f"{'':24} {'median us':>10} {'p99 us':>10}")
    for name, samples in results.items():
        print(f"{name:24} {statistics.median(samples):10.3f} {percentile(samples, 0.99):10.3f}")
    added = [d - u for d, u in zip(results["decorated"], results["undecorated"], strict=True)]
    print(
        f"{'added by the decorator':24} {statistics.median(added):10.3f} {percentile(added, 0.99):10.3f}"
        "   (target: < 10 us)"
    )
    busy = [d - u for d, u in zip(results["decorated, writer busy"], results["undecorated"], strict=True)]
    print(f"{'added, writer busy':24} {statistics.median(busy):10.3f} {percentile(busy, 0.99):10.3f}")
    print(
        f"background write (writer thread): {flush_ns / 1000 / (rounds * ROUND):.3f} us per metric "
        f"in batches of <= {ROUND}; stored {stored}, dropped {store.dropped + busy_store.dropped}"
    )


if __name__ == "__main__":
    main()
