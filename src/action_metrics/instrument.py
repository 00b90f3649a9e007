"""`@instrument_action` and `emit_action_metric()`: one metric (and one span) per action, off the hot path.

Both emit to a store given explicitly or to the one default store: the one passed to `configure()`,
else a `MetricsStore` opened from `ACTION_METRICS_URL` on first use.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, ParamSpec, TypeVar, cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from action_metrics.context import (
    NO_ATTRIBUTION,
    ActionEntry,
    current_attribution,
    current_claim,
    current_entry,
    leave,
)
from action_metrics.errors import InvalidMetric, InvalidValue, StoreClosed
from action_metrics.model import ANONYMOUS_USER, UNKNOWN_MODEL, UNKNOWN_TOWN, ActionMetric, uuid7
from action_metrics.pricing import ACTION_CREDITS
from action_metrics.store import AsyncMetricsStore, MetricsStore
from action_metrics.validation import check_action_type, check_count, check_model

P = ParamSpec("P")
R = TypeVar("R")
Store = MetricsStore | AsyncMetricsStore

logger: Final = logging.getLogger(__name__)

TRACER_NAME: Final = "action_metrics"


def get_tracer() -> trace.Tracer:
    """The tracer `@instrument_action` records spans with, from the global tracer provider.

    Made before any provider is set, it follows the one set later (OpenTelemetry's proxy tracer).
    """
    return trace.get_tracer(TRACER_NAME)


# --- the default store -----------------------------------------------------------------------

_default_store: Store | None = None
_default_store_is_ours = False
_default_store_lock = threading.Lock()


def configure(store: Store | None) -> None:
    """Make `store` the default for `@instrument_action` and `emit_action_metric()`.

    None goes back to a store opened from `ACTION_METRICS_URL` on next use. A default store this
    module opened itself is closed (so flushed) when it is replaced.
    """
    global _default_store, _default_store_is_ours
    if store is not None and not isinstance(store, MetricsStore | AsyncMetricsStore):
        raise TypeError(f"expected a MetricsStore or AsyncMetricsStore, got {type(store).__name__}")
    with _default_store_lock:
        previous, was_ours = _default_store, _default_store_is_ours
        _default_store, _default_store_is_ours = store, False
    if was_ours and previous is not None and previous is not store:
        cast(MetricsStore, previous).close()


def default_store() -> Store:
    """The store metrics go to when none is given: configured, or opened from the environment."""
    global _default_store, _default_store_is_ours
    store = _default_store
    if store is not None:
        return store
    with _default_store_lock:
        if _default_store is None:
            _default_store, _default_store_is_ours = MetricsStore(), True
        return _default_store


_INHERITED_FIELDS: Final = ("action_type", "user_id", "town_id", "citizen_id")
_CONTEXT_FIELDS: Final = frozenset((*_INHERITED_FIELDS, "credits_charged"))
_METRIC_PARAMETERS: Final = inspect.signature(ActionMetric).parameters
_METRIC_FIELDS: Final = tuple(_METRIC_PARAMETERS)
_REQUIRED_FIELDS: Final = tuple(
    name
    for name, parameter in _METRIC_PARAMETERS.items()
    if parameter.default is parameter.empty and name != "citizen_id"  # a metric may name no citizen
)
_KNOWN: Final = frozenset(_METRIC_FIELDS)
_REQUIRED: Final = frozenset(_REQUIRED_FIELDS)


def _refuse_fields(fields: Mapping[str, Any]) -> None:
    """An `InvalidMetric` naming the first field unknown or missing, rather than `__init__`'s TypeError."""
    if unknown := fields.keys() - _KNOWN:
        raise InvalidMetric(min(unknown)[:64], f"unknown field; a metric has {', '.join(_METRIC_FIELDS)}")
    for name in _REQUIRED_FIELDS:
        if name not in fields:
            where = " or set it in an enclosing action_context()" if name in _CONTEXT_FIELDS else ""
            raise InvalidMetric(name, f"missing: pass it to emit_action_metric(){where}")


def emit_action_metric(**fields: Any) -> ActionMetric:
    """Build an `ActionMetric` from its fields, emit it to the default store, and return it.

    Fields not given come from the `action_context` in force (its credits only if no metric made
    inside it has taken them yet); `citizen_id` may be left out (None). Another field left out is an
    `InvalidMetric` naming it.
    """
    inherited = current_attribution()
    for name in _INHERITED_FIELDS:
        value = getattr(inherited, name)
        if value is not None and name not in fields:
            fields[name] = value
    claim = None if "credits_charged" in fields else current_claim()
    if claim is not None:
        fields["credits_charged"] = 0  # the block's credits are taken once the metric is valid, below
    if "citizen_id" not in fields:
        fields["citizen_id"] = None
    if not _REQUIRED <= fields.keys() <= _KNOWN:
        _refuse_fields(fields)
    metric = ActionMetric(**fields)
    if claim is not None and (credits := claim.take()):  # None once a metric inside took them
        metric = metric.charged(credits)
    store = default_store()
    if isinstance(store, MetricsStore):
        store.emit(metric)
    else:
        store.emit_nowait(metric)
    return metric


# --- the decorator ---------------------------------------------------------------------------

_MISSING: Final[Any] = object()


@dataclass(frozen=True, slots=True)
class _Argument:
    """Where a call carries one named argument; found once, when the function is decorated."""

    name: str
    position: int | None
    by_keyword: bool
    default: Any

    @classmethod
    def find(cls, signature: inspect.Signature, name: str) -> _Argument | None:
        parameters = list(signature.parameters.values())
        for position, parameter in enumerate(parameters):
            if parameter.name != name:
                continue
            default = _MISSING if parameter.default is inspect.Parameter.empty else parameter.default
            positional = parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
            return cls(
                name,
                position if positional else None,
                parameter.kind is not parameter.POSITIONAL_ONLY,
                default,
            )
        if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
            return cls(name, None, True, _MISSING)
        return None

    def id(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], missing: Any) -> Any:
        """The call's value of this id argument, as `_as_id` gives it."""
        if self.position is not None and self.position < len(args):
            value = args[self.position]
        elif self.by_keyword:
            value = kwargs.get(self.name, self.default)
        else:
            value = self.default
        return value if type(value) is str else _as_id(value, missing)


def _as_id(value: Any, missing: Any) -> Any:
    """Ids are text; an integer or UUID id is written as text, None or absent means `missing`."""
    if value is None or value is _MISSING:
        return missing
    if type(value) is str:
        return value
    if isinstance(value, int | uuid.UUID) and not isinstance(value, bool):
        return str(value)
    return value  # anything else is refused by ActionMetric, naming the field


class _Action:
    """What one decorated function records: fixed at decoration, so a call only reads its values."""

    def __init__(
        self,
        function: Callable[..., Any],
        action_type: str,
        model: str | None,
        credits_charged: int,
        credits_given: bool,
        store: Store | None,
    ) -> None:
        self.action_type = action_type
        self.model = model
        self.credits_charged = credits_charged
        self.credits_given = credits_given
        self.store = store
        self.qualname = getattr(function, "__qualname__", repr(function))
        signature = inspect.signature(function)
        self.user_id = _Argument.find(signature, "user_id")
        self.town_id = _Argument.find(signature, "town_id")
        self.citizen_id = _Argument.find(signature, "citizen_id")
        self.span_name = action_type
        self.warned_of_usage_names = False

    def begin(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> ActionEntry:
        """Put the call's attribution in force for its body: the LLM calls made inside inherit its
        ids and action type, and no credits (this action is charged once, by its own metric).

        Run on every call, so kept cheap: a small entry holding the ids as given and the metric's
        id as a UUID; the `Attribution` that LLM calls and metrics inside read is built from it only
        when one reads it (`ActionEntry.attribution`)."""
        outer = current_entry()
        inherited = NO_ATTRIBUTION if outer is None else outer.attribution
        user_id = self.user_id.id(args, kwargs, inherited.user_id) if self.user_id else inherited.user_id
        town_id = self.town_id.id(args, kwargs, inherited.town_id) if self.town_id else inherited.town_id
        citizen_id = (
            self.citizen_id.id(args, kwargs, inherited.citizen_id)
            if self.citizen_id
            else inherited.citizen_id
        )
        return ActionEntry(self.action_type, user_id, town_id, citizen_id, uuid7(), outer)

    def metric(
        self,
        call: ActionEntry,
        result: Any,
        error: BaseException | None,
        started_at: datetime,
        elapsed_ns: int,
    ) -> ActionMetric | None:
        """The metric of one call; None (logged) when the call's values make no valid metric."""
        leave(call.token)
        credits = 0
        if error is None:
            credits = self.credits_charged
            outer_claim = None if call.outer is None else call.outer.claim
            # Only an action_context's credits pass to a decorated action inside it; an enclosing
            # decorated action (a 0-credit claim, for its LLM calls) leaves this one its own price.
            if not (self.credits_given or outer_claim is None or isinstance(outer_claim, ActionEntry)):
                claimed = outer_claim.take()
                credits = credits if claimed is None else claimed
        tokens_in = tokens_out = 0
        model = self.model
        if error is None and isinstance(result, Mapping):
            tokens_in = result.get("tokens_in", 0)
            tokens_out = result.get("tokens_out", 0)
            model = result.get("model") or model
            if not self.warned_of_usage_names and "tokens_in" not in result and "tokens_out" not in result:
                self.warn_of_usage_names(result)
        try:
            return ActionMetric(
                self.action_type,
                ANONYMOUS_USER if call.user_id is None else call.user_id,
                UNKNOWN_TOWN if call.town_id is None else call.town_id,
                call.citizen_id,
                tokens_in,
                tokens_out,
                model or UNKNOWN_MODEL,
                elapsed_ns / 1e6,
                credits,
                started_at,
                # The metadata key is what 0.1 recorded; `error` is where 0.2 reads it.
                {"error": type(error).__name__} if error is not None else {},
                call.action_id,
                error=None if error is None else type(error).__name__,
            )
        except InvalidValue as invalid:
            logger.warning("action-metrics: %s recorded no metric: %s", self.qualname, invalid)
            return None

    def warn_of_usage_names(self, result: Mapping[Any, Any]) -> None:
        """Log, once per function, a result that counts its tokens under a provider's names: they
        would be recorded as 0 without a word."""
        found = [name for name in _PROVIDER_TOKEN_KEYS if name in result]
        if not found:
            return
        with _warning_lock:
            if self.warned_of_usage_names:
                return
            self.warned_of_usage_names = True
        logger.warning(
            "action-metrics: %s returned %s but no tokens_in or tokens_out: recorded 0 tokens; "
            "return the counts as tokens_in and tokens_out (warned once for this function)",
            self.qualname,
            ", ".join(found),
        )

    def store_for_call(self) -> Store:
        return self.store if self.store is not None else default_store()


_PROVIDER_TOKEN_KEYS: Final = ("input_tokens", "output_tokens", "prompt_tokens", "completion_tokens")
"""Token counts under providers' names (Anthropic's and OpenAI's usage), which the decorator does not read."""
_warning_lock: Final = threading.Lock()


def _record_span(span: trace.Span, metric: ActionMetric | None, error: BaseException | None) -> None:
    if metric is not None:
        span.set_attributes(metric.to_otel_span())
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))


def instrument_action(
    action_type: str,
    *,
    model: str | None = None,
    credits_charged: int | None = None,
    store: Store | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Record one `ActionMetric` and one span per call of the decorated function (sync or async).

    Latency is the call's, on a monotonic clock. A dict result gives `tokens_in`, `tokens_out` and
    optionally `model` (which wins over `model=`; neither: "unknown", counted as unpriced); one with
    a provider's names instead (`input_tokens`...) is logged as a warning, once per function. The
    call's `user_id`, `town_id` and `citizen_id` arguments give the ids; without them the user is
    "anonymous" and the town "unknown". Credits default to `ACTION_CREDITS[action_type]` (0 for other
    types). A call that raises is recorded with 0 credits and `{"error": <type name>}` and the span
    marked as an error; the exception propagates unchanged. A generator function's call (sync or
    async, such as a streamed answer) lasts from its first step to its end: exhausted (a sync
    generator's `return {...}` gives the tokens), raised, or closed by its consumer (`break`,
    `close()`: a finished call, recorded then); its ids and enclosing block are those in force where
    it was called, and the ids are in force in its body at every step, never in the consumer's code
    between them. The metric is buffered (the call never
    waits on the database) unless the store is durable. Values that make no valid metric (say a
    negative token count) are logged on the `action_metrics` logger, never raised into the caller.
    """
    checked_type = check_action_type(str(action_type))
    checked_model = None if model is None else check_model(str(model))
    credits = (
        ACTION_CREDITS.get(checked_type, 0)
        if credits_charged is None
        else check_count("credits_charged", credits_charged)
    )
    if store is not None and not isinstance(store, MetricsStore | AsyncMetricsStore):
        raise TypeError(f"store: expected a MetricsStore or AsyncMetricsStore, got {type(store).__name__}")

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        action = _Action(function, checked_type, checked_model, credits, credits_charged is not None, store)
        if inspect.iscoroutinefunction(function):
            return cast(Callable[P, R], _async_wrapper(action, function))
        if inspect.isgeneratorfunction(function):
            return cast(Callable[P, R], _generator_wrapper(action, function, _steps))
        if inspect.isasyncgenfunction(function):
            return cast(Callable[P, R], _generator_wrapper(action, function, _async_steps))
        return _sync_wrapper(action, function)

    return decorate


def _sync_wrapper(action: _Action, function: Callable[P, R]) -> Callable[P, R]:
    tracer = get_tracer()
    now, clock = datetime.now, time.perf_counter_ns

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        # Inlined in both wrappers on purpose: a shared helper measured +0.2-0.3 us median per call.
        span: trace.Span | None = tracer.start_span(action.span_name)
        if span.is_recording():  # type: ignore[union-attr]
            context_token = otel_context.attach(trace.set_span_in_context(span))  # type: ignore[arg-type]
        else:
            span = context_token = None  # no tracer provider: nothing to record
        call = action.begin(args, kwargs)
        started_at = now(UTC)
        start = clock()
        try:
            result = function(*args, **kwargs)
        except BaseException as error:
            elapsed = clock() - start
            try:
                _finish_sync(action, call, None, error, started_at, elapsed, span, context_token)
            except Exception:  # the caller gets its own exception, unchanged
                logger.exception("action-metrics: recording the failed call of %s failed", action.qualname)
            raise
        elapsed = clock() - start
        _finish_sync(action, call, result, None, started_at, elapsed, span, context_token)
        return result

    return wrapper


def _conclude(
    action: _Action,
    call: ActionEntry,
    result: Any,
    error: BaseException | None,
    started_at: datetime,
    elapsed: int,
    span: trace.Span | None,
    context_token: object,
) -> tuple[ActionMetric, Store] | None:
    """End the call's span; the metric to emit and the store to emit it to (None: nothing valid)."""
    metric = action.metric(call, result, error, started_at, elapsed)
    if span is not None:
        _record_span(span, metric, error)
        otel_context.detach(context_token)  # type: ignore[arg-type]
        span.end()
    return None if metric is None else (metric, action.store_for_call())


def _finish_sync(*call: Any) -> None:
    concluded = _conclude(*call)
    if concluded is None:
        return
    metric, store = concluded
    try:
        if type(store) is MetricsStore:
            store.emit(metric)
        else:
            store.emit_nowait(metric)  # a sync function cannot await an async store's commit
    except StoreClosed:  # the application is not told: counted in `dropped` and logged
        store.writer.drop_closed()


def _async_wrapper(action: _Action, function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    tracer = get_tracer()
    now, clock = datetime.now, time.perf_counter_ns

    @functools.wraps(function)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        # Inlined in both wrappers on purpose: a shared helper measured +0.2-0.3 us median per call.
        span: trace.Span | None = tracer.start_span(action.span_name)
        if span.is_recording():  # type: ignore[union-attr]
            context_token = otel_context.attach(trace.set_span_in_context(span))  # type: ignore[arg-type]
        else:
            span = context_token = None  # no tracer provider: nothing to record
        call = action.begin(args, kwargs)
        started_at = now(UTC)
        start = clock()
        try:
            result = await function(*args, **kwargs)
        except BaseException as error:
            elapsed = clock() - start
            try:
                await _finish_async(action, call, None, error, started_at, elapsed, span, context_token)
            except Exception:  # the caller gets its own exception, unchanged
                logger.exception("action-metrics: recording the failed call of %s failed", action.qualname)
            raise
        elapsed = clock() - start
        await _finish_async(action, call, result, None, started_at, elapsed, span, context_token)
        return result

    return wrapper


async def _finish_async(*call: Any) -> None:
    concluded = _conclude(*call)
    if concluded is None:
        return
    metric, store = concluded
    try:
        if type(store) is AsyncMetricsStore:
            await store.emit(metric)
        elif store.durable:
            await asyncio.to_thread(store.emit, metric)  # a blocking commit, kept off the event loop
        else:
            store.emit(metric)
    except StoreClosed:  # the application is not told: counted in `dropped` and logged
        store.writer.drop_closed()


# --- generator functions ---------------------------------------------------------------------
#
# A generator's body runs one step at a time, in whatever context iterates it (a web framework's
# streaming response may iterate it in another task or thread). So the call's ids and span are put
# in force around each step and taken away before the item is handed over: the consumer's own code
# between steps never runs as part of this action.

Steps = Callable[[_Action, ActionEntry, Any, otel_context.Context], Any]


def _generator_wrapper(action: _Action, function: Callable[..., Any], steps: Steps) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = action.begin(args, kwargs)  # the ids and outer block in force where it is called
        leave(call.token)
        return steps(action, call, function(*args, **kwargs), otel_context.get_current())

    return wrapper


class _Step:
    """Puts a generator call's span and ids in force for one step of its body."""

    __slots__ = ("call", "context_token", "span")

    def __init__(self, action: _Action, call: ActionEntry, parent: otel_context.Context) -> None:
        span = get_tracer().start_span(action.span_name, context=parent)
        self.span: trace.Span | None = span if span.is_recording() else None
        self.call = call
        self.context_token: object = None

    def enter(self) -> None:
        if self.span is not None:
            self.context_token = otel_context.attach(trace.set_span_in_context(self.span))
        self.call.resume()

    def leave(self) -> None:
        leave(self.call.token)
        if self.span is not None:
            otel_context.detach(self.context_token)  # type: ignore[arg-type]


def _steps(action: _Action, call: ActionEntry, generator: Any, parent: otel_context.Context) -> Any:
    """Drive `generator` for its consumer (PEP 380's `yield from`, step by step), recording the call."""
    step = _Step(action, call, parent)
    started_at, start = datetime.now(UTC), time.perf_counter_ns()
    sending: Any = None
    throwing: BaseException | None = None
    while True:
        step.enter()
        try:
            item = generator.send(sending) if throwing is None else generator.throw(throwing)
        except StopIteration as stop:  # its end: the return value is the call's result
            _finish_sync(
                action, call, stop.value, None, started_at, _since(start), step.span, step.context_token
            )
            return stop.value
        except BaseException as error:
            _record_failure_sync(action, call, error, started_at, _since(start), step)
            raise
        step.leave()
        throwing = None
        try:
            sending = yield item
        except GeneratorExit:  # its consumer is done with it: close the body, record the call
            step.enter()
            try:
                generator.close()
            except BaseException as error:
                _record_failure_sync(action, call, error, started_at, _since(start), step)
                raise
            _finish_sync(action, call, None, None, started_at, _since(start), step.span, step.context_token)
            raise
        except BaseException as thrown:  # thrown in by the consumer: into the body at the next step
            throwing = thrown


async def _async_steps(
    action: _Action, call: ActionEntry, generator: Any, parent: otel_context.Context
) -> Any:
    """`_steps` for an async generator (which returns no value: its result is None)."""
    step = _Step(action, call, parent)
    started_at, start = datetime.now(UTC), time.perf_counter_ns()
    sending: Any = None
    throwing: BaseException | None = None
    while True:
        step.enter()
        try:
            item = await (generator.asend(sending) if throwing is None else generator.athrow(throwing))
        except StopAsyncIteration:
            await _finish_async(
                action, call, None, None, started_at, _since(start), step.span, step.context_token
            )
            return
        except BaseException as error:
            await _record_failure_async(action, call, error, started_at, _since(start), step)
            raise
        step.leave()
        throwing = None
        try:
            sending = yield item
        except GeneratorExit:
            step.enter()
            try:
                await generator.aclose()
            except BaseException as error:
                await _record_failure_async(action, call, error, started_at, _since(start), step)
                raise
            await _finish_async(
                action, call, None, None, started_at, _since(start), step.span, step.context_token
            )
            raise
        except BaseException as thrown:
            throwing = thrown


def _since(start: int) -> int:
    return time.perf_counter_ns() - start


def _record_failure_sync(
    action: _Action, call: ActionEntry, error: BaseException, started_at: datetime, elapsed: int, step: _Step
) -> None:
    try:
        _finish_sync(action, call, None, error, started_at, elapsed, step.span, step.context_token)
    except Exception:  # the consumer gets the body's own exception, unchanged
        logger.exception("action-metrics: recording the failed call of %s failed", action.qualname)


async def _record_failure_async(
    action: _Action, call: ActionEntry, error: BaseException, started_at: datetime, elapsed: int, step: _Step
) -> None:
    try:
        await _finish_async(action, call, None, error, started_at, elapsed, step.span, step.context_token)
    except Exception:
        logger.exception("action-metrics: recording the failed call of %s failed", action.qualname)
