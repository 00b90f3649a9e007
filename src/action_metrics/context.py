"""Attribution: who an action or LLM call was for, carried by `action_context()` across sync and async code.

A block inside `with action_context(user_id="u1", credits_charged=10):` gives its fields to every metric
made inside it that does not name its own: `emit_action_metric()`, `@instrument_action` and the GenAI
spans `ActionMetricsSpanProcessor` records. The credits of a block are charged once, to the first
metric recorded inside it that takes credits, so several LLM calls in one block never multiply revenue.
Contexts nest: an inner block's fields win, the others come from the outer one.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Final

from action_metrics.errors import InvalidValue
from action_metrics.validation import MAX_ID_LENGTH, MAX_INT64, check_action_type, check_count, check_id

ATTRIBUTE_NAMES: Final = {
    "action_type": "action.type",
    "user_id": "action.user_id",
    "town_id": "action.town_id",
    "citizen_id": "action.citizen_id",
    "credits_charged": "action.credits",
}
"""Where spans (their attributes, and OpenTelemetry baggage) carry each field."""


@dataclass(frozen=True, slots=True)
class Attribution:
    """The fields an action inherits; None means "not said here"."""

    action_type: str | None = None
    user_id: str | None = None
    town_id: str | None = None
    citizen_id: str | None = None
    credits_charged: int | None = None
    action_id: str | None = None
    """The id of the decorated action a call was made in (kept in the call's metadata)."""

    def over(self, fallback: Attribution) -> Attribution:
        """These fields where said, else `fallback`'s (run per span received: field by field)."""
        if fallback.empty:
            return self
        if self.empty:
            return fallback
        return Attribution(
            self.action_type if self.action_type is not None else fallback.action_type,
            self.user_id if self.user_id is not None else fallback.user_id,
            self.town_id if self.town_id is not None else fallback.town_id,
            self.citizen_id if self.citizen_id is not None else fallback.citizen_id,
            self.credits_charged if self.credits_charged is not None else fallback.credits_charged,
            self.action_id if self.action_id is not None else fallback.action_id,
        )

    @property
    def empty(self) -> bool:
        return (
            self.action_type is None
            and self.user_id is None
            and self.town_id is None
            and self.citizen_id is None
            and self.credits_charged is None
            and self.action_id is None
        )


class CreditClaim:
    """Credits to charge once: the first `take()` gets them, later ones get None."""

    __slots__ = ("_taken", "credits")

    def __init__(self, credits: int) -> None:
        self.credits = credits
        self._taken = False

    def take(self) -> int | None:
        with _claim_lock:
            if self._taken:
                return None
            self._taken = True
            return self.credits


_claim_lock: Final = threading.Lock()
"""One for all claims: a claim is made per block and per decorated call, taken far less often."""


NO_ATTRIBUTION: Final = Attribution()
"""Nothing said (frozen, so shared)."""


class _Entry:
    """What an `action_context` block puts in force: everything in force there, the outer blocks'
    fields included (credits are in `claim`)."""

    __slots__ = ("attribution", "claim")

    def __init__(self, attribution: Attribution, claim: CreditClaim | None) -> None:
        self.attribution = attribution
        self.claim = claim


class ActionEntry(CreditClaim):
    """What one call of a decorated action puts in force, and made on every call, so kept cheap.

    It holds the call's ids as given and the metric's id as a UUID; the `Attribution` (with the id
    as text) is built, once, only if something reads it: an instrumented LLM call or a metric
    emitted inside. It is its own claim, of 0 credits, so the calls inside never take an outer
    block's credits (the action is charged once, by its own metric). Making one puts it in force;
    `leave(entry.token)` (in the same context) ends that.
    """

    __slots__ = (
        "_attribution",
        "action_id",
        "action_type",
        "citizen_id",
        "outer",
        "token",
        "town_id",
        "user_id",
    )

    def __init__(
        self,
        action_type: str,
        user_id: Any,
        town_id: Any,
        citizen_id: Any,
        action_id: uuid.UUID,
        outer: Entry | None,
    ) -> None:
        self.credits = 0  # CreditClaim's fields, set here: one call less per action
        self._taken = False
        self._attribution: Attribution | None = None
        self.action_type = action_type
        self.user_id = (
            user_id  # ids may be anything here (a bad one makes no metric): text ones are inherited
        )
        self.town_id = town_id
        self.citizen_id = citizen_id
        self.action_id = action_id
        self.outer = outer
        self.token = _current.set(self)

    def resume(self) -> None:
        """Put this call in force again (a generator's body runs one step at a time: each step
        resumes it, and `leave(entry.token)` ends the step)."""
        self.token = _current.set(self)

    @property
    def claim(self) -> CreditClaim:
        return self

    @property
    def attribution(self) -> Attribution:
        made = self._attribution
        if made is None:  # two threads may both build it: the same value
            made = Attribution(
                self.action_type,
                self.user_id if type(self.user_id) is str else None,
                self.town_id if type(self.town_id) is str else None,
                self.citizen_id if type(self.citizen_id) is str else None,
                None,
                str(self.action_id),
            )
            if self.outer is not None:
                made = made.over(self.outer.attribution)
            self._attribution = made
        return made


Entry = _Entry | ActionEntry

_current: ContextVar[Entry | None] = ContextVar("action_metrics_context", default=None)


current_entry: Final = _current.get
"""The innermost block in force here, if any (the context variable's own getter: no call of ours)."""


def current_attribution() -> Attribution:
    """The fields in force here (credits left out: take them with `claim_credits()`)."""
    entry = _current.get()
    return NO_ATTRIBUTION if entry is None else entry.attribution


def current_claim() -> CreditClaim | None:
    """The credits of the innermost block that names credits, for whoever records first."""
    entry = _current.get()
    return None if entry is None else entry.claim


def claim_credits() -> int | None:
    """Take the credits of the innermost block that names them; None if none or already taken."""
    claim = current_claim()
    return None if claim is None else claim.take()


def enter(attribution: Attribution, credits: int | None) -> Token[Entry | None]:
    """Put `attribution` (over the outer block's) and its own `credits`, if any, in force; `leave()`
    with the token undoes it. For `action_context` (checked values only; `@instrument_action` puts
    an `ActionEntry` in force instead)."""
    outer = _current.get()
    if outer is None:
        merged, claim = attribution, None
    else:
        merged, claim = attribution.over(outer.attribution), outer.claim
    if credits is not None:
        claim = CreditClaim(credits)
    return _current.set(_Entry(merged, claim))


leave: Final = _current.reset
"""Undo an `enter()` or an `ActionEntry` with its token (the context variable's own reset)."""


class action_context:  # lowercase: named by the public contract, used like contextlib's
    """`with action_context(user_id=..., credits_charged=...):` (or `async with`): the fields that the
    metrics and GenAI spans made inside inherit. Values are checked here: bad ones raise
    `InvalidMetric` naming the field."""

    def __init__(
        self,
        *,
        action_type: str | None = None,
        user_id: str | None = None,
        town_id: str | None = None,
        citizen_id: str | None = None,
        credits_charged: int | None = None,
        action_id: str | None = None,
    ) -> None:
        self.attribution = Attribution(
            action_type=None if action_type is None else check_action_type(action_type),
            user_id=None if user_id is None else check_id("user_id", user_id),
            town_id=None if town_id is None else check_id("town_id", town_id),
            citizen_id=None if citizen_id is None else check_id("citizen_id", citizen_id),
            action_id=action_id,
        )
        self.credits = None if credits_charged is None else check_count("credits_charged", credits_charged)
        self._tokens: list[Token[Entry | None]] = []

    def __enter__(self) -> Attribution:
        token = enter(self.attribution, self.credits)
        self._tokens.append(token)
        merged = current_attribution()
        return merged if self.credits is None else replace(merged, credits_charged=self.credits)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        leave(self._tokens.pop())

    async def __aenter__(self) -> Attribution:
        return self.__enter__()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(kind, error, traceback)


def parse_attribution(
    values: Mapping[str, object], names: Mapping[str, str] = ATTRIBUTE_NAMES
) -> tuple[Attribution, tuple[str, ...]]:
    """The attribution that span attributes or baggage carry, where everything may arrive as text.

    `"10"` credits is 10; an integer id is its text. A value that cannot be read is left out and
    described in the second item (naming its key), so the caller can count and log it and still
    record the call.
    """
    parsed: dict[str, str | int] = {}
    problems: list[str] = []
    for field_name, key in names.items():
        value = values.get(key)
        if value is None:
            continue
        if type(value) is str and field_name in _ID_FIELDS and _plain_id(value):
            parsed[field_name] = value  # the common case, valid as it is (full check: `_parse`)
            continue
        try:
            parsed[field_name] = _parse(field_name, value)
        except InvalidValue as error:
            problems.append(f"{key}: {error}")
    if not parsed:
        return NO_ATTRIBUTION, tuple(problems)
    return Attribution(**parsed), tuple(problems)  # type: ignore[arg-type]


_ID_FIELDS: Final = frozenset(("user_id", "town_id", "citizen_id"))


def _plain_id(text: str) -> bool:
    """1-256 ASCII characters without NUL: an id `check_id` accepts as it is."""
    return 0 < len(text) <= MAX_ID_LENGTH and text.isascii() and "\x00" not in text


def _parse(field_name: str, value: object) -> str | int:
    if type(value) is int and field_name == "credits_charged" and 0 <= value <= MAX_INT64:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and field_name != "credits_charged":
        value = str(value)
    if field_name == "credits_charged":
        if isinstance(value, str):
            text = value.strip()
            if not (text.isascii() and text.isdigit()):
                raise InvalidValue(field_name, f"expected a whole number of credits, got {value!r}")
            value = int(text)
        return check_count(field_name, value)
    if field_name == "action_type":
        return check_action_type(value)
    return check_id(field_name, value)
