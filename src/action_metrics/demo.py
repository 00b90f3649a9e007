"""A small Agent Town that records its activity the way the seed's integrations did.

- LOD 3/4/5 citizen queries (the town API): a template manifest, no LLM, credits 10/100/400.
- Dialogue after each LLM generation (the dialogue engine): haiku, sonnet or template tokens,
  speaker/listener/operation in metadata, zero credits (dialogue is part of the INHABIT session).
- Flux operations greet/gossip/trade/solo (the town's clock): the system user, not billable, the
  phase and participants in metadata. The dialogue an operation triggers is its own `dialogue`
  metric, so its tokens are costed once.
- branch (150), inhabit (100 per 10 minutes) and force (the 50-credit ethics premium; a refused
  force is charged nothing and says why in its `error`).

`simulate()` is a pure function of its arguments: the same seed and end time give the same metrics,
ids included, so a re-run into the same database stores nothing twice.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from action_metrics.errors import InvalidValue
from action_metrics.ingest import metric_batches
from action_metrics.model import ActionMetric, uuid7_at
from action_metrics.pricing import ACTION_CREDITS, ActionType, ModelName
from action_metrics.store import AsyncMetricsStore

DEMO_TOWN: Final = "demo-town"
SYSTEM_USER: Final = "system"
CITIZENS: Final = (
    "alice", "bob", "clara", "dev", "eve", "farid", "grace", "hiro", "ines", "jonas", "kai", "lena",
)  # fmt: skip
USERS: Final = tuple(f"user-{number:03d}" for number in range(1, 9))
FORCED_ACTIONS: Final = ("confess", "apologise", "leave town", "reveal a secret")
REFUSAL: Final = "ConsentRefused"


@dataclass(frozen=True, slots=True)
class TownPlan:
    """How much activity to simulate, and when it ends."""

    seed: int = 42
    size: int = 2_000
    """Number of metrics recorded."""
    days: float = 3.0
    town_id: str = DEMO_TOWN
    end: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        if self.size < 1:
            raise InvalidValue("size", f"expected at least 1 metric, got {self.size}")
        if not 0 < self.days <= 366:
            raise InvalidValue("days", f"expected a number of days in (0, 366], got {self.days}")

    @property
    def start(self) -> datetime:
        return self.end - timedelta(days=self.days)


_GENERATIONS: Final = (
    # (cumulative share of generations, model, tokens in, tokens out, median latency ms, its spread)
    (0.70, ModelName.HAIKU, (300, 900), (60, 200), 650.0, 0.35),
    (0.85, ModelName.SONNET, (800, 2_000), (150, 400), 1_900.0, 0.3),
)


@dataclass(frozen=True, slots=True)
class _Call:
    """An LLM generation (or a template one): the model and what it cost in tokens and time."""

    model: str
    tokens_in: int
    tokens_out: int
    latency_ms: float


class _Town:
    """One random stream drives every choice, so a seed fixes the whole history."""

    def __init__(self, plan: TownPlan) -> None:
        self.plan = plan
        self.random = random.Random(plan.seed)

    # -- the pieces ------------------------------------------------------------------------------

    def latency(self, median_ms: float, spread: float) -> float:
        """Lognormal: most calls near the median, a tail of slow ones."""
        return round(median_ms * math.exp(self.random.gauss(0.0, spread)), 3)

    def generation(self) -> _Call:
        roll = self.random.random()
        for share, model, tokens_in, tokens_out, median_ms, spread in _GENERATIONS:
            if roll < share:
                in_, out = self.random.randint(*tokens_in), self.random.randint(*tokens_out)
                return _Call(model, in_, out, self.latency(median_ms, spread))
        # A canned line: no model call, sub-millisecond.
        return _Call(ModelName.TEMPLATE, 0, 0, self.latency(0.4, 0.5))

    def metric(
        self,
        action: ActionType,
        moment: datetime,
        *,
        user_id: str,
        citizen_id: str | None,
        call: _Call,
        credits: int,
        metadata: dict[str, Any],
        error: str | None = None,
    ) -> ActionMetric:
        return ActionMetric(
            action_type=action,
            user_id=user_id,
            town_id=self.plan.town_id,
            citizen_id=citizen_id,
            tokens_in=call.tokens_in,
            tokens_out=call.tokens_out,
            model=call.model,
            latency_ms=call.latency_ms,
            credits_charged=credits,
            timestamp=moment,
            metadata=metadata,
            error=error,
            id=uuid7_at(moment, self.random.getrandbits(74)),  # seeded: time-ordered and repeatable
        )

    @staticmethod
    def phase(moment: datetime) -> str:
        return ("night", "morning", "afternoon", "evening")[moment.hour // 6]

    # -- what happens in town --------------------------------------------------------------------

    def lod_query(self, moment: datetime, lod: int) -> list[ActionMetric]:
        action = {3: ActionType.LOD3, 4: ActionType.LOD4, 5: ActionType.LOD5}[lod]
        median = {3: 110.0, 4: 380.0, 5: 1_150.0}[lod]
        manifest = _Call(ModelName.TEMPLATE, 0, 0, self.latency(median, 0.3))
        return [
            self.metric(
                action,
                moment,
                user_id=self.random.choice(USERS),
                citizen_id=self.random.choice(CITIZENS),
                call=manifest,
                credits=ACTION_CREDITS[action],
                metadata={"lod": lod},
            )
        ]

    def dialogue(
        self, moment: datetime, user_id: str, speaker: str, listener: str, operation: str
    ) -> tuple[ActionMetric, float]:
        call = self.generation()
        metric = self.metric(
            ActionType.DIALOGUE,
            moment,
            user_id=user_id,
            citizen_id=speaker,
            call=call,
            credits=ACTION_CREDITS[ActionType.DIALOGUE],
            metadata={"speaker": speaker, "listener": listener, "operation": operation},
        )
        return metric, call.latency_ms

    def flux(self, moment: datetime, operation: ActionType) -> list[ActionMetric]:
        """A flux step: a dialogue between the participants (unless solo), then the step itself."""
        if operation is ActionType.SOLO:
            participants = [self.random.choice(CITIZENS)]
        else:
            participants = self.random.sample(CITIZENS, 2)
        recorded: list[ActionMetric] = []
        spent_ms = 0.0
        if len(participants) == 2:
            speaker, listener = participants
            line, spent_ms = self.dialogue(moment, SYSTEM_USER, speaker, listener, operation.value)
            recorded.append(line)
        step = _Call(ModelName.TEMPLATE, 0, 0, round(spent_ms + self.latency(3.0, 0.4), 3))
        recorded.append(
            self.metric(
                operation,
                moment + timedelta(milliseconds=step.latency_ms),
                user_id=SYSTEM_USER,
                citizen_id=participants[0],
                call=step,
                credits=ACTION_CREDITS[operation],
                metadata={"phase": self.phase(moment), "participants": participants},
            )
        )
        return recorded

    def inhabit(self, moment: datetime) -> list[ActionMetric]:
        """A user steps into a citizen for ten minutes and talks with the town."""
        user, citizen = self.random.choice(USERS), self.random.choice(CITIZENS)
        recorded = [
            self.metric(
                ActionType.INHABIT,
                moment,
                user_id=user,
                citizen_id=citizen,
                call=_Call(ModelName.TEMPLATE, 0, 0, self.latency(40.0, 0.3)),
                credits=ACTION_CREDITS[ActionType.INHABIT],
                metadata={"session_minutes": 10},
            )
        ]
        for turn in range(self.random.randint(1, 4)):
            listener = self.random.choice([name for name in CITIZENS if name != citizen])
            line, _ = self.dialogue(
                moment + timedelta(minutes=2 * turn + 1), user, citizen, listener, "inhabit"
            )
            recorded.append(line)
        return recorded

    def branch(self, moment: datetime) -> list[ActionMetric]:
        snapshot = _Call(ModelName.TEMPLATE, 0, 0, self.latency(220.0, 0.3))
        return [
            self.metric(
                ActionType.BRANCH,
                moment,
                user_id=self.random.choice(USERS),
                citizen_id=None,
                call=snapshot,
                credits=ACTION_CREDITS[ActionType.BRANCH],
                metadata={"branch": f"timeline-{self.random.randint(1, 999)}"},
            )
        ]

    def force(self, moment: datetime) -> list[ActionMetric]:
        """A user forces a citizen's hand: an LLM call and the ethics premium, unless refused."""
        call = self.generation()
        metadata: dict[str, Any] = {"forced_action": self.random.choice(FORCED_ACTIONS)}
        credits, error = ACTION_CREDITS[ActionType.FORCE], None
        if self.random.random() < 0.08:
            credits, error = 0, REFUSAL
        return [
            self.metric(
                ActionType.FORCE,
                moment,
                user_id=self.random.choice(USERS),
                citizen_id=self.random.choice(CITIZENS),
                call=call,
                credits=credits,
                metadata=metadata,
                error=error,
            )
        ]

    def present(self) -> list[ActionMetric]:
        """LOD3 queries in the last seconds before the end: the town reaches the present, so "today"
        has LOD3 queries at any hour (just after midnight too)."""
        moments = sorted(
            self.plan.end - timedelta(seconds=self.random.uniform(0.5, PRESENT_SECONDS))
            for _ in range(PRESENT_QUERIES)
        )
        return [metric for moment in moments for metric in self.lod_query(moment, 3)]

    def events(self) -> Sequence[tuple[float, Callable[[datetime], list[ActionMetric]]]]:
        return (
            (0.20, lambda moment: self.lod_query(moment, 3)),
            (0.07, lambda moment: self.lod_query(moment, 4)),
            (0.02, lambda moment: self.lod_query(moment, 5)),
            (0.16, lambda moment: self.flux(moment, ActionType.GREET)),
            (0.13, lambda moment: self.flux(moment, ActionType.GOSSIP)),
            (0.07, lambda moment: self.flux(moment, ActionType.TRADE)),
            (0.09, lambda moment: self.flux(moment, ActionType.SOLO)),
            (0.04, self.inhabit),
            (0.02, self.branch),
            (0.03, self.force),
        )

    def history(self) -> Iterator[ActionMetric]:
        events = self.events()
        happenings = [happen for _, happen in events]
        weights = [weight for weight, _ in events]
        # Events start at least a quarter of an hour before the end, so a session's last line
        # is not in the future.
        span = (self.plan.end - self.plan.start - timedelta(minutes=15)).total_seconds()
        while True:
            happen = self.random.choices(happenings, weights)[0]
            moment = self.plan.start + timedelta(seconds=self.random.uniform(0, max(span, 0.0)))
            yield from happen(moment)


PRESENT_QUERIES: Final = 3
PRESENT_SECONDS: Final = 10.0


def simulate(plan: TownPlan) -> list[ActionMetric]:
    """`plan.size` metrics of a town's life between `plan.start` and `plan.end`, oldest first; the
    last few are LOD3 queries of the last seconds."""
    town = _Town(plan)
    present = town.present()[: plan.size]
    history = town.history()
    metrics = [next(history) for _ in range(plan.size - len(present))] + present
    metrics.sort(key=lambda metric: (metric.timestamp, metric.id))
    return metrics


BATCH_SIZE: Final = 500


async def record(
    store: AsyncMetricsStore,
    metrics: Sequence[ActionMetric],
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Emit in batches through the public API; `on_batch(n)` after each batch of n, for progress."""
    for batch in metric_batches(metrics, BATCH_SIZE):
        await store.emit_many(batch)
        if on_batch is not None:
            on_batch(len(batch))
