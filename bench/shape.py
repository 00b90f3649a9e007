"""The shape of a product's actions for the benchmarks: what `generate` yields, and why.

11 action types charged their `ACTION_CREDITS`, 50 towns, 1,000 users, 5,000 citizens (80% of
actions have one), the 5 seeded models with lognormal latencies (sigma 0.6) around a median of their
own, random token counts, spread evenly over the last `days` days, in time order: 10M actions over 90
days is one every ~0.78 s, about 4,600 an hour.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Final

from action_metrics import ACTION_CREDITS, ActionMetric, ActionType, ModelName

ACTIONS: Final = [action.value for action in ActionType]
MODELS: Final = [model.value for model in ModelName]
TOWNS: Final = 50
USERS: Final = 1_000
CITIZENS: Final = 5_000
CITIZEN_SHARE: Final = 0.8
LATENCY_SIGMA: Final = 0.6
MEDIAN_LATENCY_MS: Final[dict[str, float]] = {
    ModelName.TEMPLATE: 2.0,
    ModelName.CACHED: 5.0,
    ModelName.HAIKU: 400.0,
    ModelName.SONNET: 1_500.0,
    ModelName.OPUS: 4_000.0,
}
DEFAULT_SEED: Final = 11


def generate(
    count: int, *, days: float = 90, end: datetime | None = None, seed: int = DEFAULT_SEED
) -> Iterator[ActionMetric]:
    """`count` actions evenly spread over the `days` before `end` (default now), oldest first.

    The same `count`, `days`, `end` and `seed` give the same actions but for their ids (UUIDv7s,
    made when each metric is).
    """
    rng = random.Random(seed)
    end = datetime.now(UTC) if end is None else end.astimezone(UTC)
    start = end - timedelta(days=days)
    step_us = days * 86_400_000_000 / max(count, 1)
    mu = {model: math.log(median) for model, median in MEDIAN_LATENCY_MS.items()}
    choice, randrange, uniform, lognormal = rng.choice, rng.randrange, rng.random, rng.lognormvariate
    for index in range(count):
        action = choice(ACTIONS)
        model = choice(MODELS)
        # One slot of `step_us` per action, a random instant within it, so the actions come in time order.
        offset_us = int((index + uniform()) * step_us)
        yield ActionMetric(
            action_type=action,
            user_id=f"user-{randrange(USERS)}",
            town_id=f"town-{randrange(TOWNS)}",
            citizen_id=f"citizen-{randrange(CITIZENS)}" if uniform() < CITIZEN_SHARE else None,
            tokens_in=randrange(50, 4_000),
            tokens_out=randrange(10, 1_500),
            model=model,
            latency_ms=lognormal(mu[model], LATENCY_SIGMA),
            credits_charged=ACTION_CREDITS[action],
            timestamp=start + timedelta(microseconds=offset_us),
            metadata={"lod": randrange(3, 6)} if action.startswith("lod") else {},
        )
