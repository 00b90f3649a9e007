"""Real LLM clients and instrumentations, a fake provider on 127.0.0.1: one call is one metric, priced right.

The `openai` and `anthropic` clients, the anthropic client's own GenAI spans, OpenTelemetry's official
openai-v2 instrumentation and OpenLLMetry's openai and anthropic ones, all as pinned in the dev extra.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import anthropic
import openai
import pytest
from fake_provider import FakeProvider, directive
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.anthropic import AnthropicInstrumentor
from opentelemetry.instrumentation.openai import OpenAIInstrumentor as OpenLLMetryOpenAI
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor as OfficialOpenAI
from opentelemetry.sdk.trace import TracerProvider

from action_metrics import (
    ActionMetricsSpanProcessor,
    MetricsStore,
    action_context,
    configure,
    emit_action_metric,
    instrument_action,
)

SONNET, HAIKU, GPT = "claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001", "gpt-4o-mini"
PRICES = {  # USD per 1M tokens: input, output, cache read, cache write
    SONNET: (Decimal("3"), Decimal("15"), Decimal("0.30"), Decimal("3.75")),
    HAIKU: (Decimal("1"), Decimal("5"), Decimal("0.10"), Decimal("1.25")),
    GPT: (Decimal("0.15"), Decimal("0.60"), Decimal("0.075"), Decimal("0.15")),
}
CREDIT_USD = Decimal("0.006")
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)


def expected_cost(
    model: str, tokens_in: int, tokens_out: int, cache_read: int = 0, cache_write: int = 0
) -> Decimal:
    """The contract's cost formula, in Decimal: inclusive totals, cache tokens at their own prices."""
    input_price, output_price, read_price, write_price = PRICES[model]
    fresh = tokens_in - cache_read - cache_write
    return (
        fresh * input_price + cache_read * read_price + cache_write * write_price + tokens_out * output_price
    ) / Decimal(1_000_000)


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    fake = FakeProvider()
    yield fake
    fake.close()


@pytest.fixture
def store(database_url: str) -> Iterator[MetricsStore]:
    with MetricsStore(database_url) as opened:
        for model, (input_price, output_price, read_price, write_price) in PRICES.items():
            opened.set_model_price(
                model,
                input_price,
                output_price,
                LONG_AGO,
                cache_read_per_1m=read_price,
                cache_write_per_1m=write_price,
            )
        yield opened


@pytest.fixture
def tracing(store: MetricsStore) -> Iterator[tuple[TracerProvider, ActionMetricsSpanProcessor]]:
    tracer_provider = TracerProvider()
    processor = ActionMetricsSpanProcessor(store)
    tracer_provider.add_span_processor(processor)
    yield tracer_provider, processor
    tracer_provider.shutdown()


@pytest.fixture
def openllmetry_anthropic(tracing: tuple[TracerProvider, ActionMetricsSpanProcessor]) -> Iterator[None]:
    instrumentor = AnthropicInstrumentor()
    instrumentor.instrument(tracer_provider=tracing[0])
    yield
    instrumentor.uninstrument()


@pytest.fixture
def openllmetry_openai(tracing: tuple[TracerProvider, ActionMetricsSpanProcessor]) -> Iterator[None]:
    instrumentor = OpenLLMetryOpenAI()
    instrumentor.instrument(tracer_provider=tracing[0])
    yield
    instrumentor.uninstrument()


@pytest.fixture
def official_openai(tracing: tuple[TracerProvider, ActionMetricsSpanProcessor]) -> Iterator[None]:
    instrumentor = OfficialOpenAI()
    instrumentor.instrument(tracer_provider=tracing[0])
    yield
    instrumentor.uninstrument()


def anthropic_client(provider: FakeProvider, tracer_provider: TracerProvider) -> anthropic.Anthropic:
    """With its own GenAI spans on: the client emits them to the tracer provider it is given."""
    return anthropic.Anthropic(
        base_url=provider.url,
        api_key="test",
        max_retries=0,
        open_telemetry={"tracer_provider": tracer_provider},
    )


def openai_client(provider: FakeProvider) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{provider.url}/v1", api_key="test", max_retries=0)


def ask_claude(client: anthropic.Anthropic, model: str, **usage: int) -> None:
    client.messages.create(
        model=model, max_tokens=64, messages=[{"role": "user", "content": directive(**usage)}]
    )


def ask_gpt(client: openai.OpenAI, **usage: int) -> None:
    client.chat.completions.create(model=GPT, messages=[{"role": "user", "content": directive(**usage)}])


CALLS = [  # eleven Anthropic calls: (model, input total, output, cache read, cache write)
    (SONNET, 1200, 300, 1000, 0),
    (SONNET, 900, 40, 0, 800),
    (SONNET, 50, 10, 0, 0),
    (HAIKU, 400, 120, 300, 50),
    (HAIKU, 10, 1, 0, 0),
    (SONNET, 5000, 700, 4000, 900),
    (HAIKU, 75, 75, 0, 0),
    (SONNET, 333, 33, 100, 100),
    (HAIKU, 2048, 512, 2000, 0),
    (SONNET, 1, 1, 0, 0),
    (HAIKU, 640, 64, 0, 600),
]


@pytest.mark.usefixtures("openllmetry_anthropic")
def test_anthropic_calls_reported_by_the_client_and_openllmetry_are_stored_once_at_cache_prices(
    provider: FakeProvider, store: MetricsStore, tracing: tuple[TracerProvider, ActionMetricsSpanProcessor]
) -> None:
    tracer_provider, processor = tracing
    client = anthropic_client(provider, tracer_provider)
    for model, tokens_in, tokens_out, cache_read, cache_write in CALLS:
        ask_claude(
            client, model, input=tokens_in, output=tokens_out, cache_read=cache_read, cache_write=cache_write
        )
    store.flush()

    figures = store.aggregate(action_type="llm")
    assert figures.count == len(CALLS)
    assert processor.duplicates == len(CALLS)  # each call had two spans: the client's and OpenLLMetry's
    assert figures.tokens_in == sum(call[1] for call in CALLS)  # inclusive, though Anthropic's are not
    assert figures.cache_read_tokens == sum(call[3] for call in CALLS)
    assert figures.cache_write_tokens == sum(call[4] for call in CALLS)
    reference = sum(expected_cost(*call) for call in CALLS)
    assert abs(Decimal(str(figures.total_cost_usd)) - reference) < Decimal("1e-9")
    assert figures.unpriced_count == 0


@pytest.mark.usefixtures("openllmetry_anthropic")
def test_a_failed_call_is_one_error_and_stays_out_of_the_latency_percentiles(
    provider: FakeProvider, store: MetricsStore, tracing: tuple[TracerProvider, ActionMetricsSpanProcessor]
) -> None:
    client = anthropic_client(provider, tracing[0])
    ask_claude(client, SONNET, input=100, output=10)
    ask_claude(client, SONNET, input=200, output=20)
    with pytest.raises(anthropic.InternalServerError):
        ask_claude(client, SONNET, fail=500)
    with pytest.raises(anthropic.BadRequestError):
        ask_claude(client, SONNET, fail=400)
    store.flush()

    metrics = store.query()
    failed = [metric for metric in metrics if metric.error is not None]
    assert len(metrics) == 4
    assert len(failed) == 2  # two spans each, one metric each
    assert all(metric.tokens_in == 0 and metric.credits_charged == 0 for metric in failed)
    figures = store.aggregate(exact=True)
    assert figures.error_count == 2
    successes = [metric.latency_ms for metric in metrics if metric.error is None]
    assert figures.p50_latency_ms == pytest.approx(statistics.median(successes))


@pytest.mark.usefixtures("official_openai")
def test_the_official_openai_instrumentation_and_a_stream_without_usage(
    provider: FakeProvider,
    store: MetricsStore,
    tracing: tuple[TracerProvider, ActionMetricsSpanProcessor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    processor = tracing[1]
    client = openai_client(provider)
    ask_gpt(client, input=120, output=30)
    with_usage = client.chat.completions.create(
        model=GPT,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": directive(input=51, output=6)}],
    )
    for _ in with_usage:
        pass
    without_usage = client.chat.completions.create(
        model=GPT, stream=True, messages=[{"role": "user", "content": directive(input=50, output=5)}]
    )
    with caplog.at_level(logging.WARNING, logger="action_metrics"):
        for _ in without_usage:
            pass
    store.flush()

    metrics = store.query(model=GPT)
    assert sorted((metric.tokens_in, metric.tokens_out) for metric in metrics) == [(0, 0), (51, 6), (120, 30)]
    missing = [metric for metric in metrics if metric.metadata.get("usage_missing")]
    assert [(metric.tokens_in, metric.error) for metric in missing] == [(0, None)]
    assert processor.usage_missing == 1
    assert GPT in caplog.text
    assert "include_usage" in caplog.text
    figures = store.aggregate(model=GPT)
    assert abs(Decimal(str(figures.total_cost_usd)) - expected_cost(GPT, 171, 36)) < Decimal("1e-9")


@pytest.mark.usefixtures("openllmetry_openai")
def test_openai_cached_and_reasoning_tokens_are_priced_as_such(
    provider: FakeProvider, store: MetricsStore
) -> None:
    client = openai_client(provider)
    ask_gpt(client, input=2000, output=500, cache_read=1500, reasoning=300)
    store.flush()

    (metric,) = store.query()
    assert (metric.tokens_in, metric.cache_read_tokens, metric.reasoning_tokens) == (2000, 1500, 300)
    assert metric.id is not None
    assert metric.metadata["gen_ai.response.id"].startswith("chatcmpl-")
    cost = Decimal(str(store.aggregate().total_cost_usd))
    assert abs(cost - expected_cost(GPT, 2000, 500, cache_read=1500)) < Decimal("1e-9")


@pytest.mark.usefixtures("openllmetry_anthropic", "openllmetry_openai")
def test_a_decorated_action_is_charged_once_and_costs_what_its_calls_cost(
    provider: FakeProvider, store: MetricsStore, tracing: tuple[TracerProvider, ActionMetricsSpanProcessor]
) -> None:
    claude = anthropic_client(provider, tracing[0])
    gpt = openai_client(provider)

    @instrument_action("dialogue", credits_charged=25, store=store)
    def talk(user_id: str, town_id: str) -> str:
        ask_claude(claude, SONNET, input=1000, output=200, cache_read=600)
        ask_claude(claude, HAIKU, input=300, output=50)
        ask_gpt(gpt, input=800, output=100, cache_read=400)
        return "done"

    for _ in range(5):
        talk("user-7", "town-3")
    store.flush()

    figures = store.aggregate(action_type="dialogue")
    call_cost = (
        expected_cost(SONNET, 1000, 200, cache_read=600)
        + expected_cost(HAIKU, 300, 50)
        + expected_cost(GPT, 800, 100, cache_read=400)
    )
    assert figures.count == 5 * 4  # each action and its three calls
    assert figures.total_credits == 5 * 25
    assert abs(Decimal(str(figures.total_revenue_usd)) - 5 * 25 * CREDIT_USD) < Decimal("1e-9")
    assert abs(Decimal(str(figures.total_cost_usd)) - 5 * call_cost) < Decimal("1e-9")
    assert abs(Decimal(str(figures.total_profit_usd)) - 5 * (25 * CREDIT_USD - call_cost)) < Decimal("1e-9")
    calls = [metric for metric in store.query(action_type="dialogue") if metric.model != "unknown"]
    assert {(metric.user_id, metric.town_id, metric.credits_charged) for metric in calls} == {
        ("user-7", "town-3", 0)
    }
    actions = {str(metric.id) for metric in store.query(action_type="dialogue", model="unknown")}
    assert {metric.metadata["action_id"] for metric in calls} == actions


@pytest.mark.usefixtures("openllmetry_anthropic")
def test_calls_in_an_action_context_inherit_its_ids_and_its_credits_once(
    provider: FakeProvider, store: MetricsStore, tracing: tuple[TracerProvider, ActionMetricsSpanProcessor]
) -> None:
    client = anthropic_client(provider, tracing[0])
    with action_context(action_type="gossip", user_id="user-1", town_id="town-1", credits_charged=10):
        ask_claude(client, HAIKU, input=100, output=10)
        ask_claude(client, HAIKU, input=100, output=10)
    ask_claude(client, HAIKU, input=100, output=10)  # outside: anonymous
    store.flush()

    inside = store.query(action_type="gossip")
    assert {(metric.user_id, metric.town_id) for metric in inside} == {("user-1", "town-1")}
    assert sorted(metric.credits_charged for metric in inside) == [0, 10]
    (outside,) = store.query(action_type="llm")
    assert (outside.user_id, outside.credits_charged) == ("anonymous", 0)


def test_emit_action_metric_inherits_the_context_in_sync_and_async_code(store: MetricsStore) -> None:
    configure(store)
    try:
        with action_context(user_id="user-2", town_id="town-2", credits_charged=4):
            first = emit_action_metric(
                action_type="trade",
                tokens_in=0,
                tokens_out=0,
                model="template",
                latency_ms=1.0,
                citizen_id=None,
            )
            second = emit_action_metric(
                action_type="trade",
                tokens_in=0,
                tokens_out=0,
                model="template",
                latency_ms=1.0,
                citizen_id=None,
            )

        async def in_a_task(user_id: str) -> tuple[str, int]:
            async with action_context(user_id=user_id, town_id="town-9", credits_charged=3):
                await asyncio.sleep(0)  # another task runs here, in its own context
                made = emit_action_metric(
                    action_type="greet",
                    tokens_in=0,
                    tokens_out=0,
                    model="template",
                    latency_ms=1.0,
                    citizen_id=None,
                )
                return made.user_id, made.credits_charged

        async def both() -> list[tuple[str, int]]:
            return list(await asyncio.gather(in_a_task("user-a"), in_a_task("user-b")))

        assert asyncio.run(both()) == [("user-a", 3), ("user-b", 3)]
    finally:
        configure(None)
    assert (first.user_id, first.town_id, first.credits_charged) == ("user-2", "town-2", 4)
    assert second.credits_charged == 0  # the block's credits were charged once


@pytest.mark.usefixtures("openllmetry_anthropic")
def test_baggage_credits_arrive_as_text_and_a_bad_value_keeps_the_call(
    provider: FakeProvider,
    store: MetricsStore,
    tracing: tuple[TracerProvider, ActionMetricsSpanProcessor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    processor = tracing[1]
    client = anthropic_client(provider, tracing[0])
    context = baggage.set_baggage("action.credits", "10")
    context = baggage.set_baggage("action.user_id", "user-5", context)
    token = otel_context.attach(baggage.set_baggage("action.type", "solo", context))
    try:
        ask_claude(client, SONNET, input=10, output=1)
    finally:
        otel_context.detach(token)
    token = otel_context.attach(baggage.set_baggage("action.credits", "ten"))
    try:
        with caplog.at_level(logging.WARNING, logger="action_metrics"):
            ask_claude(client, SONNET, input=10, output=1)
    finally:
        otel_context.detach(token)
    store.flush()

    (solo,) = store.query(action_type="solo")
    assert (solo.user_id, solo.credits_charged) == ("user-5", 10)
    (kept,) = store.query(action_type="llm")
    assert kept.credits_charged == 0
    assert processor.bad_attribution == 2  # the bad credits, on each of the call's two spans
    assert "action.credits" in caplog.text
