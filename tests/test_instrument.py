"""@instrument_action and emit_action_metric on both backends: one metric and one span per call."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from action_metrics import (
    ACTION_CREDITS,
    ActionMetric,
    AsyncMetricsStore,
    InvalidMetric,
    MetricsStore,
    StoreClosed,
    action_context,
    configure,
    default_store,
    emit_action_metric,
    instrument_action,
)
from action_metrics.context import current_attribution


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """Spans of this process, captured by the SDK's in-memory exporter on the global provider."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter
    exporter.clear()


@pytest.fixture
def store(database_url: str) -> Iterator[MetricsStore]:
    with MetricsStore(database_url) as store:
        yield store


def test_a_sync_call_records_tokens_ids_credits_and_latency(store: MetricsStore, spans) -> None:
    @instrument_action("lod3", model="haiku", store=store)
    def query_citizen_memory(user_id: str, town_id: str, citizen_id: str) -> dict[str, int]:
        return {"tokens_in": 100, "tokens_out": 50}

    assert query_citizen_memory("user-1", town_id="town-1", citizen_id="alice") == {
        "tokens_in": 100,
        "tokens_out": 50,
    }
    [metric] = store.query()
    assert (metric.action_type, metric.user_id, metric.town_id, metric.citizen_id) == (
        "lod3",
        "user-1",
        "town-1",
        "alice",
    )
    assert (metric.tokens_in, metric.tokens_out, metric.model) == (100, 50, "haiku")
    assert metric.credits_charged == ACTION_CREDITS["lod3"]
    assert metric.latency_ms >= 0
    assert metric.metadata == {}
    [span] = spans.get_finished_spans()
    assert dict(span.attributes or {}) == metric.to_otel_span()
    assert span.status.status_code is StatusCode.UNSET


@pytest.mark.anyio
async def test_an_async_call_into_an_async_store(database_url: str, spans) -> None:
    async with AsyncMetricsStore(database_url) as store:

        @instrument_action("dialogue", credits_charged=3, store=store)
        async def speak(citizen_id: str, *, user_id: str, town_id: str) -> dict[str, object]:
            return {"tokens_in": 7, "tokens_out": 9, "model": "claude-sonnet-4-5@20250929"}

        await speak("bob", user_id="user-2", town_id="town-2")
        [metric] = await store.query()
    assert (metric.user_id, metric.town_id, metric.citizen_id) == ("user-2", "town-2", "bob")
    assert (metric.tokens_in, metric.tokens_out, metric.credits_charged) == (7, 9, 3)
    assert metric.model == "claude-sonnet-4-5@20250929"
    [span] = spans.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["gen_ai.request.model"] == "claude-sonnet-4-5@20250929"
    assert span.attributes["gen_ai.usage.output_tokens"] == 9


def test_a_failing_call_charges_nothing_and_reraises_the_same_exception(store: MetricsStore, spans) -> None:
    raised = LookupError("no such citizen")

    @instrument_action("lod4", model="sonnet", store=store)
    def manifest(user_id: str, town_id: str) -> dict[str, int]:
        raise raised

    with pytest.raises(LookupError) as caught:
        manifest("user-1", "town-1")
    assert caught.value is raised
    [metric] = store.query()
    assert metric.credits_charged == 0
    assert (metric.error, metric.metadata) == ("LookupError", {"error": "LookupError"})
    assert (metric.tokens_in, metric.tokens_out) == (0, 0)
    [span] = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]


@pytest.mark.anyio
async def test_a_failing_async_call_is_recorded_the_same_way(database_url: str, spans) -> None:
    async with AsyncMetricsStore(database_url) as store:

        @instrument_action("force", store=store)
        async def force(user_id: str, town_id: str) -> None:
            raise TimeoutError("model did not answer")

        with pytest.raises(TimeoutError, match="model did not answer"):
            await force("u", "t")
        [metric] = await store.query()
    assert (metric.credits_charged, metric.error, metric.metadata) == (
        0,
        "TimeoutError",
        {"error": "TimeoutError"},
    )
    assert spans.get_finished_spans()[0].status.status_code is StatusCode.ERROR


def test_calls_without_ids_or_model_are_anonymous_and_unpriced(store: MetricsStore) -> None:
    @instrument_action("greet", store=store)
    def greet() -> str:
        return "hello"

    greet()
    [metric] = store.query()
    assert (metric.user_id, metric.town_id, metric.citizen_id, metric.model) == (
        "anonymous",
        "unknown",
        None,
        "unknown",
    )
    assert store.aggregate().unpriced_count == 1


def test_nested_decorated_actions_each_charge_their_own_credits(store: MetricsStore) -> None:
    @instrument_action("lod3", store=store)
    def lod3(town_id: str) -> None:
        return None

    @instrument_action("lod4", store=store)
    def lod4(town_id: str) -> None:
        lod3(town_id)
        lod3(town_id)

    lod4("town-1")
    credits = sorted((metric.action_type, metric.credits_charged) for metric in store.query())
    lod3_credits = ACTION_CREDITS["lod3"]
    assert credits == [
        ("lod3", lod3_credits),
        ("lod3", lod3_credits),
        ("lod4", ACTION_CREDITS["lod4"]),
    ]


def test_ids_from_defaults_kwargs_and_numeric_values(store: MetricsStore) -> None:
    @instrument_action("trade", store=store)
    def trade(amount: int, town_id: str = "harbour", **context: object) -> dict[str, int]:
        return {"tokens_in": amount, "tokens_out": 1}

    trade(5, user_id=42)
    [metric] = store.query()
    assert (metric.user_id, metric.town_id, metric.tokens_in) == ("42", "harbour", 5)


def test_methods_take_ids_from_their_arguments(store: MetricsStore) -> None:
    class Town:
        @instrument_action("solo", store=store)
        def act(self, user_id: str, town_id: str) -> None:
            return None

    Town().act("user-9", "town-9")
    [metric] = store.query()
    assert (metric.user_id, metric.town_id) == ("user-9", "town-9")


def test_the_wrapper_keeps_name_docstring_and_signature(store: MetricsStore) -> None:
    def lookup(user_id: str, town_id: str, *, depth: int = 3) -> dict[str, int]:
        """Look a citizen up."""
        return {}

    wrapped = instrument_action("lod3", store=store)(lookup)
    assert wrapped.__name__ == "lookup"
    assert wrapped.__doc__ == "Look a citizen up."
    assert inspect.signature(wrapped) == inspect.signature(lookup)
    assert inspect.iscoroutinefunction(instrument_action("lod3")(_async_noop))


async def _async_noop() -> None:
    return None


def test_a_result_that_makes_no_valid_metric_is_logged_not_raised(
    store: MetricsStore, caplog: pytest.LogCaptureFixture
) -> None:
    @instrument_action("lod3", store=store)
    def broken(user_id: str, town_id: str) -> dict[str, int]:
        return {"tokens_in": -1, "tokens_out": 5}

    with caplog.at_level(logging.WARNING, logger="action_metrics"):
        assert broken("u", "t") == {"tokens_in": -1, "tokens_out": 5}
    assert "tokens_in" in caplog.text
    assert store.query() == []


@pytest.mark.parametrize(
    "usage",
    [{"input_tokens": 5, "output_tokens": 2}, {"prompt_tokens": 5, "completion_tokens": 2}],
    ids=["anthropic", "openai"],
)
def test_a_result_counting_tokens_under_a_providers_names_is_warned_of_once_per_function(
    store: MetricsStore, caplog: pytest.LogCaptureFixture, usage: dict[str, int]
) -> None:
    @instrument_action("lod3", model="haiku", store=store)
    def summarise(user_id: str, town_id: str) -> dict[str, int]:
        return usage

    @instrument_action("lod3", model="haiku", store=store)
    def counted(user_id: str, town_id: str) -> dict[str, int]:
        return {"tokens_in": 5, "tokens_out": 2, **usage}

    @instrument_action("branch", store=store)
    def branch(user_id: str, town_id: str) -> dict[str, str]:
        return {"answer": "no tokens here"}

    with caplog.at_level(logging.WARNING, logger="action_metrics"):
        for _ in range(3):
            summarise("u", "t")
            counted("u", "t")
            branch("u", "t")
    [warning] = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert "summarise returned " + ", ".join(usage) in warning
    assert "tokens_in and tokens_out" in warning
    recorded = sorted((m.action_type, m.tokens_in, m.tokens_out) for m in store.query())
    assert recorded == [("branch", 0, 0)] * 3 + [("lod3", 0, 0)] * 3 + [("lod3", 5, 2)] * 3


def test_bad_decorator_arguments_fail_at_decoration() -> None:
    with pytest.raises(InvalidMetric, match=r"^action_type:"):
        instrument_action("LOD 3")
    with pytest.raises(InvalidMetric, match=r"^credits_charged:"):
        instrument_action("lod3", credits_charged=-5)
    with pytest.raises(InvalidMetric, match=r"^model:"):
        instrument_action("lod3", model="")


def test_a_durable_store_has_the_metric_committed_when_the_call_returns(database_url: str) -> None:
    with MetricsStore(database_url, durable=True) as durable, MetricsStore(database_url) as reader:

        @instrument_action("branch", store=durable)
        def branch(user_id: str, town_id: str) -> None:
            return None

        branch("u", "t")
        assert [m.action_type for m in reader.query()] == ["branch"]


@pytest.mark.anyio
async def test_calls_into_a_closed_store_are_counted_and_logged_never_raised(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    blocking, durable = MetricsStore(database_url), MetricsStore(database_url, durable=True)
    asynchronous = AsyncMetricsStore(database_url)
    blocking.close()
    durable.close()
    await asynchronous.close()
    with caplog.at_level(logging.WARNING, logger="action_metrics"):
        for store in (blocking, durable, asynchronous):

            @instrument_action("lod3", store=store)
            def recall(user_id: str) -> dict[str, int]:
                return {"tokens_in": 1, "tokens_out": 1}

            @instrument_action("lod3", store=store)
            async def speak(user_id: str) -> dict[str, int]:
                return {"tokens_in": 1, "tokens_out": 1}

            assert recall("user-1") == {"tokens_in": 1, "tokens_out": 1}
            assert await speak("user-1") == {"tokens_in": 1, "tokens_out": 1}
            assert store.dropped == 2
    assert caplog.text.count("the writer is closed, dropping metrics") == 3  # once per store
    configure(blocking)
    try:  # a direct call is told, as store.emit() is
        with pytest.raises(StoreClosed, match="is closed"):
            emit_action_metric(
                action_type="lod3",
                user_id="u",
                town_id="t",
                tokens_in=1,
                tokens_out=1,
                model="haiku",
                latency_ms=1,
                credits_charged=1,
            )
    finally:
        configure(None)


def test_emit_action_metric_goes_to_the_configured_store(store: MetricsStore) -> None:
    configure(store)
    try:
        assert default_store() is store
        metric = emit_action_metric(
            action_type="lod4",
            user_id="user-123",
            town_id="town-456",
            citizen_id="citizen-789",
            tokens_in=500,
            tokens_out=300,
            model="sonnet",
            latency_ms=1000,
            credits_charged=100,
        )

        @instrument_action("lod5", model="opus")
        def deep(user_id: str, town_id: str) -> dict[str, int]:
            return {"tokens_in": 1, "tokens_out": 2}

        deep("user-123", "town-456")
    finally:
        configure(None)
    assert isinstance(metric, ActionMetric)
    assert {m.id for m in store.query()} >= {metric.id}
    assert sorted(m.action_type for m in store.query()) == ["lod4", "lod5"]


def test_emit_action_metric_in_a_context_naming_no_citizen_records_none(store: MetricsStore) -> None:
    configure(store)
    try:
        with action_context(action_type="dialogue", user_id="u1", town_id="t1", credits_charged=10):
            made = emit_action_metric(tokens_in=5, tokens_out=2, model="haiku", latency_ms=1.5)
    finally:
        configure(None)
    assert (made.citizen_id, made.credits_charged, made.user_id) == (None, 10, "u1")
    assert store.query() == [made]


def test_emit_action_metric_names_a_field_neither_the_call_nor_the_context_gives(store: MetricsStore) -> None:
    """An `InvalidMetric` naming the field, never `__init__`'s TypeError; a refused metric takes none
    of the block's credits."""
    call = {"tokens_in": 5, "tokens_out": 2, "model": "haiku", "latency_ms": 1.5}
    configure(store)
    try:
        with action_context(action_type="dialogue", user_id="u1", town_id="t1", credits_charged=10):
            with pytest.raises(InvalidMetric, match=r"^latency_ms: missing: pass it to emit_\w+\(\)$"):
                emit_action_metric(tokens_in=5, tokens_out=2, model="haiku")
            with pytest.raises(InvalidMetric, match=r"^input_tokens: unknown field; a metric"):
                emit_action_metric(**call, input_tokens=5)
            with pytest.raises(InvalidMetric, match=r"^tokens_in: expected 0 <= tokens_in"):
                emit_action_metric(**{**call, "tokens_in": -1})
            made = emit_action_metric(**call)
        with action_context(action_type="dialogue", user_id="u1"):
            with pytest.raises(InvalidMetric, match=r"^town_id: missing: .* enclosing action_context\(\)$"):
                emit_action_metric(**call, credits_charged=0)
            with pytest.raises(InvalidMetric, match=r"^credits_charged: missing"):
                emit_action_metric(**call, town_id="t1")
    finally:
        configure(None)
    assert made.credits_charged == 10
    assert store.query() == [made]


def test_the_default_store_comes_from_the_environment(backend, database_url: str, monkeypatch) -> None:
    monkeypatch.setenv("ACTION_METRICS_URL", database_url)
    configure(None)
    try:
        metric = emit_action_metric(
            action_type="inhabit",
            user_id="u",
            town_id="t",
            citizen_id=None,
            tokens_in=1,
            tokens_out=1,
            model="haiku",
            latency_ms=0.25,
            credits_charged=100,
        )
        assert str(default_store().url) == database_url
    finally:
        configure(None)  # closes the store it opened, which flushes it
    with MetricsStore(database_url) as reader:
        assert reader.query() == [metric]


# --- generator functions: a streamed answer is one call, from its first step to its end -------------


def _ids_in_force() -> tuple[str | None, str | None]:
    attribution = current_attribution()
    return attribution.user_id, attribution.town_id


def test_a_generator_call_lasts_until_its_end_with_its_ids_in_its_body_only(
    store: MetricsStore, spans
) -> None:
    tracer = trace.get_tracer("test")
    seen_in_body: list[tuple[str | None, str | None]] = []

    @instrument_action("lod4", model="sonnet", store=store)
    def stream_answer(user_id: str, town_id: str) -> Iterator[str]:
        for word in ("the", "harbour", "floods"):
            time.sleep(0.02)
            seen_in_body.append(_ids_in_force())
            with tracer.start_as_current_span("llm chunk"):
                pass
            yield word
        return {"tokens_in": 40, "tokens_out": 3}  # type: ignore[return-value]  # its tokens

    with action_context(user_id="caller", town_id="elsewhere"):
        answer = stream_answer("user-1", "town-1")  # made here, consumed outside the block
    seen_between: list[tuple[str | None, str | None]] = []
    words = []
    with tracer.start_as_current_span("consumer"):
        for word in answer:
            seen_between.append(_ids_in_force())
            with tracer.start_as_current_span("consumer work"):
                words.append(word)
    assert words == ["the", "harbour", "floods"]
    assert seen_in_body == [("user-1", "town-1")] * 3
    assert seen_between == [(None, None)] * 3  # the consumer's code never runs as the action
    [metric] = store.query()
    assert (metric.action_type, metric.user_id, metric.town_id, metric.model) == (
        "lod4",
        "user-1",
        "town-1",
        "sonnet",
    )
    assert (metric.tokens_in, metric.tokens_out, metric.error) == (40, 3, None)
    assert metric.credits_charged == ACTION_CREDITS["lod4"]
    assert metric.latency_ms >= 60  # the whole stream, not the call that made the generator
    finished = {span.name: span for span in spans.get_finished_spans() if span.name != "llm chunk"}
    action_span = finished["lod4"]
    chunks = [span for span in spans.get_finished_spans() if span.name == "llm chunk"]
    assert len(chunks) == 3
    assert all(
        chunk.parent is not None and chunk.parent.span_id == action_span.context.span_id for chunk in chunks
    )
    consumer_work = finished["consumer work"]
    assert consumer_work.parent is not None
    assert consumer_work.parent.span_id == finished["consumer"].context.span_id
    assert dict(action_span.attributes or {}) == metric.to_otel_span()


def test_a_generator_its_consumer_leaves_early_is_recorded_when_closed(store: MetricsStore) -> None:
    @instrument_action("dialogue", store=store)
    def chatter(town_id: str) -> Iterator[int]:
        yield from range(1_000)

    numbers = chatter("town-2")
    for number in numbers:
        if number == 2:
            break
    assert store.query() == []  # not over yet: its consumer may come back for more
    del numbers  # closes it (CPython: at once, by reference counting), as `numbers.close()` would
    [metric] = store.query()
    assert (metric.town_id, metric.error, metric.credits_charged) == (
        "town-2",
        None,
        ACTION_CREDITS["dialogue"],
    )


def test_a_generator_that_raises_mid_stream_is_a_failed_call(store: MetricsStore, spans) -> None:
    @instrument_action("lod3", store=store)
    def flaky(town_id: str) -> Iterator[int]:
        yield 1
        raise TimeoutError("the model stopped answering")

    stream = flaky("town-3")
    assert next(stream) == 1
    with pytest.raises(TimeoutError, match="stopped answering"):
        next(stream)
    [metric] = store.query()
    assert (metric.error, metric.credits_charged) == ("TimeoutError", 0)
    [span] = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR


def test_a_generator_gets_what_its_consumer_sends_and_throws(store: MetricsStore) -> None:
    @instrument_action("trade", store=store)
    def haggle(town_id: str) -> Iterator[int]:
        offer = 10
        while True:
            try:
                answer = yield offer
            except ValueError:
                return {"tokens_in": offer, "tokens_out": 0}  # type: ignore[return-value]
            offer = answer - 1

    talk = haggle("market")
    assert next(talk) == 10
    assert talk.send(8) == 7
    with pytest.raises(StopIteration) as stopped:
        talk.throw(ValueError("no deal"))
    assert stopped.value.value == {"tokens_in": 7, "tokens_out": 0}
    [metric] = store.query()
    assert (metric.town_id, metric.tokens_in, metric.error) == ("market", 7, None)


@pytest.mark.anyio
async def test_an_async_generator_call_lasts_until_its_end(database_url: str, spans) -> None:
    async with AsyncMetricsStore(database_url) as store:

        @instrument_action("lod4", model="haiku", store=store)
        async def stream(user_id: str, town_id: str) -> AsyncIterator[str]:
            for word in ("tide", "rises"):
                await asyncio.sleep(0.02)
                assert _ids_in_force() == ("user-4", "town-4")
                yield word

        words = []
        async for word in stream("user-4", "town-4"):
            assert _ids_in_force() == (None, None)
            words.append(word)
        assert words == ["tide", "rises"]

        @instrument_action("lod3", store=store)
        async def endless(town_id: str) -> AsyncIterator[int]:
            number = 0
            while True:
                yield number
                number += 1

        numbers = endless("town-5")
        assert [await anext(numbers), await anext(numbers)] == [0, 1]
        await numbers.aclose()
        metrics = {metric.action_type: metric for metric in await store.query()}
    assert metrics["lod4"].latency_ms >= 40
    assert (metrics["lod4"].user_id, metrics["lod4"].town_id, metrics["lod4"].error) == (
        "user-4",
        "town-4",
        None,
    )
    assert (metrics["lod3"].town_id, metrics["lod3"].error) == ("town-5", None)
    assert sorted(span.name for span in spans.get_finished_spans()) == ["lod3", "lod4"]
