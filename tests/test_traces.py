"""OTLP/HTTP traces into a real `action-metrics serve`, on both backends.

Real LLM clients (anthropic with its own GenAI spans, openai) and real instrumentations (OpenLLMetry's
anthropic, OpenTelemetry's official openai-v2) call a fake provider on 127.0.0.1; the SDK's own OTLP
exporters (protobuf and JSON, gzip or not) send their spans to `POST /v1/traces`. The server must store
exactly what `ActionMetricsSpanProcessor` stores in process from the same spans.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from conftest import metric as make_metric
from fake_provider import FakeProvider, directive
from opentelemetry.exporter.otlp.json.http.trace_exporter import OTLPSpanExporter as JsonExporter
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as ProtobufExporter
from opentelemetry.instrumentation.anthropic import AnthropicInstrumentor
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from serving import READER, TOWN_A_WRITER, WRITER, Server, app_client, bearer, kill_mid_stream, serving
from sqlalchemy import select

from action_metrics import ActionMetricsSpanProcessor, AsyncMetricsStore, MetricsStore
from action_metrics.charges import InheritedCredits
from action_metrics.dialects import backend_for
from action_metrics.errors import MetricInPrunedPeriod
from action_metrics.genai import metric_id_for_response
from action_metrics.rollup import floor_to
from action_metrics.schema import credit_claims

SONNET, GPT = "claude-sonnet-4-5-20250929", "gpt-4o-mini"
PRICES = {SONNET: (Decimal(3), Decimal(15)), GPT: (Decimal("0.15"), Decimal("0.60"))}
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    fake = FakeProvider()
    yield fake
    fake.close()


@pytest.fixture
def server(database_url: str) -> Iterator[Server]:
    with MetricsStore(database_url) as store:
        for model, (input_price, output_price) in PRICES.items():
            store.set_model_price(model, input_price, output_price, LONG_AGO)
    with serving(database_url) as running:
        yield running


def _protobuf(server: Server, token: str = WRITER) -> SpanExporter:
    return ProtobufExporter(endpoint=f"{server.address}/v1/traces", headers=bearer(token))


def _protobuf_gzip(server: Server, token: str = WRITER) -> SpanExporter:
    endpoint = f"{server.address}/v1/traces"
    return ProtobufExporter(endpoint=endpoint, headers=bearer(token), compression=Compression.Gzip)


def _json(server: Server, token: str = WRITER) -> SpanExporter:
    return JsonExporter(endpoint=f"{server.address}/v1/traces", headers=bearer(token))


EXPORTERS: dict[str, Callable[[Server], SpanExporter]] = {
    "protobuf": _protobuf,
    "protobuf+gzip": _protobuf_gzip,
    "json": _json,
}


def comparable(metric_dict: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metric_dict.items() if key != "estimated_cost_usd"}


def stored(url: str) -> dict[str, dict[str, Any]]:
    with MetricsStore(url) as store:
        return {str(metric.id): comparable(metric.to_dict()) for metric in store.query()}


def make_calls(provider: FakeProvider, tracer_provider: TracerProvider) -> None:
    """A lod4 action (ids and credits as the text an SDK in another language sends) making four calls:
    two to Claude (the client's own span and OpenLLMetry's for each), a failed one, one to GPT."""
    claude = anthropic.Anthropic(
        base_url=provider.url,
        api_key="test",
        max_retries=0,
        open_telemetry={"tracer_provider": tracer_provider},
    )
    gpt = openai.OpenAI(base_url=f"{provider.url}/v1", api_key="test", max_retries=0)
    tracer = tracer_provider.get_tracer("town.api")
    action = {
        "action.type": "lod4",
        "action.user_id": "user-7",
        "action.town_id": "town-a",
        "action.credits": "100",
    }
    with tracer.start_as_current_span("lod4 query", attributes=action):
        for usage in ({"input": 1200, "output": 300, "cache_read": 1000}, {"input": 90, "output": 20}):
            claude.messages.create(
                model=SONNET, max_tokens=64, messages=[{"role": "user", "content": directive(**usage)}]
            )
        with pytest.raises(anthropic.InternalServerError):
            claude.messages.create(
                model=SONNET, max_tokens=64, messages=[{"role": "user", "content": directive(fail=500)}]
            )
        gpt.chat.completions.create(
            model=GPT, messages=[{"role": "user", "content": directive(input=500, output=60)}]
        )


@pytest.fixture
def instrumented() -> Iterator[TracerProvider]:
    tracer_provider = TracerProvider()
    anthropic_instrumentor, openai_instrumentor = AnthropicInstrumentor(), OpenAIInstrumentor()
    anthropic_instrumentor.instrument(tracer_provider=tracer_provider)
    openai_instrumentor.instrument(tracer_provider=tracer_provider)
    yield tracer_provider
    openai_instrumentor.uninstrument()
    anthropic_instrumentor.uninstrument()
    tracer_provider.shutdown()


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_the_server_stores_what_the_span_processor_stores_in_process(
    server: Server,
    database_url: str,
    provider: FakeProvider,
    instrumented: TracerProvider,
    tmp_path: Path,
    exporter: str,
) -> None:
    local_url = f"sqlite:///{tmp_path / 'in-process.db'}"
    with MetricsStore(local_url) as local:
        instrumented.add_span_processor(ActionMetricsSpanProcessor(local))
        finished = InMemorySpanExporter()
        instrumented.add_span_processor(SimpleSpanProcessor(finished))
        # As services export: in batches, so a trace that ends within the batch delay travels together
        # (the server takes what a call inherits from its ancestors in the same request).
        instrumented.add_span_processor(BatchSpanProcessor(EXPORTERS[exporter](server)))
        make_calls(provider, instrumented)
        instrumented.force_flush()
        local.flush()
    over_the_wire, in_process = stored(database_url), stored(local_url)

    assert over_the_wire == in_process
    assert len(over_the_wire) == 4, "two Claude calls, a failed one, one GPT call: one metric each"
    metrics = list(over_the_wire.values())
    assert {(m["user_id"], m["town_id"], m["action_type"]) for m in metrics} == {("user-7", "town-a", "lod4")}
    assert sum(m["credits_charged"] for m in metrics) == 100, "the action's credits, charged once"
    assert [m["credits_charged"] for m in metrics if m["error"] is not None] == [0], "one failed call"
    response_ids = {m["metadata"].get("gen_ai.response.id") for m in metrics} - {None}
    assert {str(metric_id_for_response(response_id)) for response_id in response_ids} <= set(over_the_wire)

    # The exporter's retry (or the same spans from another exporter) stores nothing twice.
    spans = list(finished.get_finished_spans())
    assert EXPORTERS[exporter](server).export(spans) is SpanExportResult.SUCCESS
    assert stored(database_url) == over_the_wire


def post_spans(server: Server, spans: list[ReadableSpan], token: str = WRITER) -> ExportTraceServiceResponse:
    answer = httpx.post(
        f"{server.address}/v1/traces",
        content=encode_spans(spans).SerializeToString(),
        headers={**bearer(token), "Content-Type": "application/x-protobuf"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/x-protobuf"
    return ExportTraceServiceResponse.FromString(answer.content)


def genai_spans(*calls: dict[str, Any], started: dict[int, datetime] | None = None) -> list[ReadableSpan]:
    """Finished spans of a hand-made GenAI instrumentation, one per call, each with these attributes;
    `started`: the start of some calls (by index), when not now."""
    finished = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(finished))
    tracer = tracer_provider.get_tracer("hand.made")
    with tracer.start_as_current_span("http request"):  # not a GenAI span: ignored
        for index, attributes in enumerate(calls):
            at = (started or {}).get(index)
            start_time = None if at is None else int(at.timestamp() * 1e9)
            with tracer.start_as_current_span(f"chat {index}", attributes=attributes, start_time=start_time):
                pass
    tracer_provider.shutdown()
    return list(finished.get_finished_spans())


def call(town_id: str = "town-a", **attributes: Any) -> dict[str, Any]:
    return {
        "gen_ai.request.model": GPT,
        "gen_ai.usage.input_tokens": 10,
        "gen_ai.usage.output_tokens": 5,
        "action.town_id": town_id,
        **attributes,
    }


def test_a_bad_span_is_a_partial_success_and_the_others_are_stored(server: Server, database_url: str) -> None:
    spans = genai_spans(
        call(**{"gen_ai.response.id": "chatcmpl-good"}),
        call(**{"gen_ai.usage.input_tokens": -5}),
        call(**{"gen_ai.usage.cache_read.input_tokens": 50}),
        call(**{"gen_ai.response.id": "chatcmpl-also-good"}),
    )
    answer = post_spans(server, spans)

    assert answer.partial_success.rejected_spans == 2
    message = answer.partial_success.error_message
    assert "spans[1]: tokens_in" in message
    assert "spans[2]: cache_read_tokens" in message
    assert set(stored(database_url)) == {
        str(metric_id_for_response("chatcmpl-good")),
        str(metric_id_for_response("chatcmpl-also-good")),
    }


def test_a_span_from_before_the_prune_cut_off_is_a_partial_success_saying_why(
    server: Server, database_url: str
) -> None:
    ten_days_ago = datetime.now(UTC) - timedelta(days=10)
    with MetricsStore(database_url) as store:
        store.emit_many([make_metric(timestamp=ten_days_ago)])
        cutoff = store.prune(ten_days_ago + timedelta(days=5)).cutoff
    spans = genai_spans(
        call(**{"gen_ai.response.id": "chatcmpl-now"}),
        call(**{"gen_ai.response.id": "chatcmpl-pruned"}),
        call(**{"gen_ai.response.id": "chatcmpl-also-now"}),
        started={1: cutoff - timedelta(hours=1)},
    )
    answer = post_spans(server, spans)

    assert answer.partial_success.rejected_spans == 1
    message = answer.partial_success.error_message
    assert f"spans[1]: timestamp: before the prune cut-off {cutoff.isoformat()}" in message
    with MetricsStore(database_url) as store:
        kept = {str(one.id) for one in store.query(since=cutoff)}
    assert kept == {str(metric_id_for_response(f"chatcmpl-{name}")) for name in ("now", "also-now")}


def test_a_town_limited_token_writes_only_its_towns(server: Server, database_url: str) -> None:
    spans = genai_spans(call("town-a"), call("town-b"), call("town-a"))
    answer = post_spans(server, spans, TOWN_A_WRITER)

    assert answer.partial_success.rejected_spans == 1
    assert "spans[1]: town_id: this token may not write this town" in answer.partial_success.error_message
    assert sorted(metric["town_id"] for metric in stored(database_url).values()) == ["town-a", "town-a"]


def test_a_read_only_token_may_not_send_traces(server: Server, database_url: str) -> None:
    answer = httpx.post(
        f"{server.address}/v1/traces",
        content=encode_spans(genai_spans(call())).SerializeToString(),
        headers={**bearer(READER), "Content-Type": "application/x-protobuf"},
    )
    assert answer.status_code == 403
    assert stored(database_url) == {}


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"\x0a\xff\xff", "application/x-protobuf", 400),
        (b"{not json", "application/json", 400),
        (b"{}", "text/plain", 415),
        (b"{}", "application/json", 200),  # an empty request is a success with nothing in it
    ],
)
def test_a_body_that_is_not_otlp_is_refused_whole(
    refusing_server: Server, body: bytes, content_type: str, status: int
) -> None:
    answer = httpx.post(
        f"{refusing_server.address}/v1/traces",
        content=body,
        headers={**bearer(WRITER), "Content-Type": content_type},
    )
    assert answer.status_code == status, answer.text


def test_too_many_spans_are_413_naming_spans(server: Server) -> None:
    answer = httpx.post(
        f"{server.address}/v1/traces",
        content=encode_spans(genai_spans(*(call() for _ in range(10_001)))).SerializeToString(),
        headers={**bearer(WRITER), "Content-Type": "application/x-protobuf"},
        timeout=60,
    )
    assert answer.status_code == 413, answer.text
    assert answer.json()["detail"].endswith(" spans in one request; send at most 10000")


def traces_of_actions(count: int, calls: int) -> list[list[ReadableSpan]]:
    """`count` traces as a service's tracer makes them: an action span naming its credits, around
    `calls` GenAI calls with response ids; each trace's spans together, as a batch exporter sends them."""
    finished = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(finished))
    tracer = tracer_provider.get_tracer("town.api")
    for number in range(count):
        action = {"action.type": "lod4", "action.user_id": f"user-{number}", "action.credits": 100}
        with tracer.start_as_current_span("lod4 query", attributes=action):
            for index in range(calls):
                with tracer.start_as_current_span(
                    f"chat {index}", attributes=call(**{"gen_ai.response.id": f"chatcmpl-{number}-{index}"})
                ):
                    pass
    tracer_provider.shutdown()
    traces: dict[int, list[ReadableSpan]] = {}
    for span in finished.get_finished_spans():
        assert span.context is not None
        traces.setdefault(span.context.trace_id, []).append(span)
    return list(traces.values())


def test_a_retry_after_the_server_was_killed_mid_stream_stores_every_call_and_charge_once(
    database_url: str,
) -> None:
    """200 means committed, and a span's metric id comes from its response id: whatever a killed
    server had committed, the client's retry of every request stores each call once and charges each
    action's credits once, to the same call."""
    traces = traces_of_actions(60, 3)
    bodies = [
        encode_spans([span for trace in traces[start : start + 10] for span in trace]).SerializeToString()
        for start in range(0, len(traces), 10)
    ]
    headers = {**bearer(WRITER), "Content-Type": "application/x-protobuf"}
    server = Server(database_url)
    server.start()
    answered = kill_mid_stream(server, "/v1/traces", bodies, headers)
    assert all(
        ExportTraceServiceResponse.FromString(answer.content).partial_success.rejected_spans == 0
        for answer in answered
    )
    before = stored(database_url)
    assert len(before) >= 2 * 10 * 3  # the two answered requests were committed

    server.start()
    try:
        for body in bodies:
            answer = httpx.post(f"{server.address}/v1/traces", content=body, headers=headers, timeout=120)
            assert answer.status_code == 200, answer.text
            assert ExportTraceServiceResponse.FromString(answer.content).partial_success.rejected_spans == 0
    finally:
        server.stop()

    after = stored(database_url)
    expected_ids = {str(metric_id_for_response(f"chatcmpl-{n}-{i}")) for n in range(60) for i in range(3)}
    assert set(after) == expected_ids
    assert all(after[key] == metric for key, metric in before.items())  # nothing stored was rewritten
    charged: dict[str, list[int]] = {}
    for metric in after.values():
        charged.setdefault(metric["user_id"], []).append(metric["credits_charged"])
    assert sorted(charged) == sorted(f"user-{n}" for n in range(60))
    assert all(sorted(credits) == [0, 0, 100] for credits in charged.values())


# --- several server processes (`serve --workers`) -------------------------------------------------


def cut_differently(
    traces: list[list[ReadableSpan]], per_request: int = 5
) -> tuple[list[bytes], list[bytes]]:
    """Each action's spans sent twice, cut differently (as a Collector's retries may re-batch them):
    the action span with its first two calls, then with its last two. Both requests name the
    action's credits; the middle call is in both."""

    def bodies(calls: set[str]) -> list[bytes]:
        wanted = [
            [span for span in trace if span.name == "lod4 query" or span.name in calls] for trace in traces
        ]
        return [
            encode_spans(
                [span for trace in wanted[start : start + per_request] for span in trace]
            ).SerializeToString()
            for start in range(0, len(wanted), per_request)
        ]

    return bodies({"chat 0", "chat 1"}), bodies({"chat 1", "chat 2"})


def assert_each_action_charged_once(database_url: str, actions: int) -> None:
    """Every call of `traces_of_actions(actions, 3)` stored once, each action's 100 credits on one."""
    after = stored(database_url)
    expected = {str(metric_id_for_response(f"chatcmpl-{n}-{i}")) for n in range(actions) for i in range(3)}
    assert set(after) == expected
    charged: dict[str, list[int]] = {}
    for metric in after.values():
        charged.setdefault(metric["user_id"], []).append(metric["credits_charged"])
    assert {user: sorted(credits) for user, credits in charged.items()} == {
        f"user-{n}": [0, 0, 100] for n in range(actions)
    }


@pytest.mark.anyio
@pytest.mark.parametrize("order", ["later-calls-first", "at-once"])
async def test_two_server_processes_charge_an_action_once_however_its_spans_are_cut(
    database_url: str, order: str
) -> None:
    """Two apps over one database stand for two processes of `serve --workers 2`, each with its own
    memory: one takes each action's first two calls, the other its last two. The action's credits go
    to the call that claimed them first, in whichever process, and both requests that carry that
    call store it charged: each call stored once, each action charged once."""
    first_calls, last_calls = cut_differently(traces_of_actions(20, 3))
    headers = {**bearer(WRITER), "Content-Type": "application/x-protobuf"}
    (one, one_client), (other, other_client) = app_client(database_url), app_client(database_url)

    async def send(client: httpx.AsyncClient, bodies: list[bytes]) -> None:
        for body in bodies:
            answer = await client.post("/v1/traces", content=body, headers=headers)
            assert answer.status_code == 200, answer.text
            assert ExportTraceServiceResponse.FromString(answer.content).partial_success.rejected_spans == 0

    async with (
        one.router.lifespan_context(one),
        other.router.lifespan_context(other),
        one_client,
        other_client,
    ):
        if order == "at-once":
            await asyncio.gather(send(one_client, first_calls), send(other_client, last_calls))
        else:  # the last calls' request claims first: the other process must not charge the first call
            await send(other_client, last_calls)
            await send(one_client, first_calls)
    assert_each_action_charged_once(database_url, 20)


def test_serve_with_two_workers_stores_each_call_once_and_charges_each_action_once(database_url: str) -> None:
    """`serve --workers 2`: two processes take concurrent connections; each action's spans, cut
    differently, reach the server twice from several clients at once."""
    actions = 40
    first_calls, last_calls = cut_differently(traces_of_actions(actions, 3), per_request=2)
    headers = {**bearer(WRITER), "Content-Type": "application/x-protobuf"}
    with serving(database_url, workers=2) as server:
        assert server.process is not None
        pid = server.process.pid
        children = [
            Path(f"/proc/{child}/cmdline").read_bytes()
            for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        ]
        workers = [command for command in children if b"resource_tracker" not in command]
        assert len(workers) == 2  # uvicorn's two worker processes under its supervisor

        def send(bodies: list[bytes]) -> None:
            with httpx.Client(base_url=server.address, headers=headers, timeout=120) as client:
                for body in bodies:
                    answer = client.post("/v1/traces", content=body)
                    assert answer.status_code == 200, answer.text

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, [first_calls[::2], first_calls[1::2], last_calls[::2], last_calls[1::2]]))
    assert_each_action_charged_once(database_url, actions)


@pytest.mark.anyio
async def test_inherited_credits_go_to_the_first_claim_in_the_transaction_that_writes_the_calls(
    database_url: str,
) -> None:
    """The store's rules for calls that may carry their action's credits (`emit_batch(credits=)`):
    the first claim of an action holds, a later call or a retry gets the holder, two batches of one
    transaction claim in turn, a refused batch leaves no claim, and `prune` removes the claims of
    the period it removes."""
    now = datetime.now(UTC)
    long_ago, recent = now - timedelta(days=10), now - timedelta(hours=1)
    calls = {
        name: make_metric(timestamp=recent, credits_charged=0) for name in ("a2", "a3", "b", "c1", "c2", "d")
    }
    calls["a1"] = make_metric(timestamp=long_ago, credits_charged=0)
    calls["d_old"] = make_metric(timestamp=long_ago, credits_charged=0)
    action = {"a1": (1, 10), "a2": (1, 10), "a3": (1, 10), "b": (2, 7), "c1": (3, 5), "c2": (3, 5)}
    action |= {"d": (4, 3), "d_old": (4, 3)}
    credits = InheritedCredits(
        {calls[name].id: ((ancestor, 0xA), amount) for name, (ancestor, amount) in action.items()}
    )

    async def charged(**window: datetime) -> dict[str, int]:
        stored = {metric.id: metric.credits_charged for metric in await store.query(**window)}
        return {name: stored[metric.id] for name, metric in calls.items() if metric.id in stored}

    async with AsyncMetricsStore(database_url) as store:
        assert await store.emit_batch([calls["a1"], calls["a2"], calls["b"]], credits=credits) == 3
        engine = backend_for(database_url).create_engine()
        try:
            async with engine.connect() as connection:
                rows = (await connection.execute(select(credit_claims))).all()
        finally:
            await engine.dispose()
        assert sorted(rows) == [
            (f"{ancestor:032x}", f"{0xA:016x}", calls[name].id, calls[name].timestamp)
            for name, ancestor in (("a1", 1), ("b", 2))
        ]
        assert await store.emit_batch([calls["a2"], calls["a3"]], credits=credits) == 1  # cut differently
        assert await store.emit_batch([calls["a1"], calls["a2"]], credits=credits) == 0  # a retry
        assert await store.emit_batches([[calls["c2"]], [calls["c1"]]], credits=[credits, credits]) == [1, 1]
        assert await charged() == {"a1": 10, "a2": 0, "a3": 0, "b": 7, "c1": 0, "c2": 5}

        cutoff = floor_to(now - timedelta(days=5), "day")
        await store.prune(cutoff)  # a1 and its action's claim go
        with pytest.raises(MetricInPrunedPeriod):
            await store.emit_batch([calls["d_old"], calls["d"]], credits=credits)  # claims nothing
        assert await store.emit_batch([calls["d"]], credits=credits) == 1
        late = make_metric(timestamp=recent, credits_charged=0)
        calls["a4"] = late
        assert await store.emit_batch([late], credits=InheritedCredits({late.id: ((1, 0xA), 10)})) == 1
        assert await charged(since=cutoff) == {"a2": 0, "a3": 0, "b": 7, "c1": 0, "c2": 5, "d": 3, "a4": 10}
