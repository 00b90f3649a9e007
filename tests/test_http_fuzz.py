"""The metrics endpoint fuzzed from its own OpenAPI schema with schemathesis, on both backends.

The real app (`create_app`, tokens required) runs its lifespan, so the store is open over a database
holding a few metrics in two towns. Every operation of the schema gets generated requests, valid and
invalid (schemathesis' positive and negative modes), once with a valid bearer token on each request
(one token reads every town, one only `town-a`) and once with missing or wrong credentials. No
response may be a 5xx, and every response must conform to the schema: a documented status code,
content type, headers and body.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from action_metrics import ActionMetric, ActionType, AsyncMetricsStore, ModelName
from action_metrics.http import ApiTokens, create_app

TOWN_A_TOKEN = "town-a-token-0123456789abcdef"
ANY_TOWN_TOKEN = "any-town-token-0123456789abcdef"
# Both tokens read and write, so that every operation gets past authorisation.
TOKENS = ApiTokens.parse(f"read,write:{TOWN_A_TOKEN}:town-a ; read,write:{ANY_TOWN_TOKEN}:*")
TOWNS = ("town-a", "town-b")
ACTIONS = (ActionType.LOD3.value, ActionType.LOD4.value, ActionType.DIALOGUE.value)
METRICS_PATH = "/v1/town/{town_id}/metrics"
BREAKDOWN_PATH = "/v1/town/{town_id}/breakdown"
ACTIONS_PATH = "/v1/actions"
TRACES_PATH = "/v1/traces"
TOWNS_PATH = "/v1/towns"
CHECKS_PATH = "/v1/town/{town_id}/checks"


@schemathesis.serializer("application/x-protobuf")
def protobuf(context: Any, value: Any) -> bytes:
    """Generated binary bodies as they are: random bytes for the OTLP protobuf decoder."""
    return value if isinstance(value, bytes) else str(value).encode()


@schemathesis.serializer("application/x-ndjson")
def ndjson(context: Any, value: Any) -> bytes:
    """An array body as NDJSON, one item per line; anything else as one JSON line."""
    items = value if isinstance(value, list) else [value]
    return b"\n".join(json.dumps(item).encode() for item in items)


EXAMPLES = 60
"""Hypothesis examples per operation, per generation mode, per kind of credentials."""
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def seed_metrics() -> list[ActionMetric]:
    now = datetime.now(UTC)
    rows: list[ActionMetric] = []
    for town in TOWNS:
        for index, (action, model, tokens_in, tokens_out) in enumerate(
            [
                (ActionType.LOD3, ModelName.TEMPLATE, 0, 0),
                (ActionType.LOD3, ModelName.HAIKU, 400, 80),
                (ActionType.LOD4, ModelName.SONNET, 1_200, 300),
                (ActionType.DIALOGUE, ModelName.OPUS, 2_000, 500),
                (ActionType.DIALOGUE, ModelName.HAIKU, 300, 60),
            ]
        ):
            rows.append(
                ActionMetric(
                    action_type=action,
                    user_id=f"user-{index % 2}",
                    town_id=town,
                    citizen_id=f"citizen-{index}",
                    tokens_in=tokens_in,
                    tokens_out=tokens_out,
                    model=model,
                    latency_ms=100.0 + 75.0 * index,
                    credits_charged=10 * (index + 1),
                    # Inside the default 24-hour window, and a few days back for longer windows.
                    timestamp=now - timedelta(hours=1 + 20 * index),
                )
            )
    return rows


@pytest.fixture
def api_schema(database_url: str) -> Iterator[schemathesis.BaseSchema]:
    """The schema of the real app over a seeded database; its lifespan runs until the test ends."""

    async def seed() -> None:
        async with AsyncMetricsStore(database_url) as store:
            await store.emit_many(seed_metrics())

    asyncio.run(seed())
    app = create_app(database_url, tokens=TOKENS, insecure=False)
    # Loading the schema over ASGI starts the app's lifespan (the store opens); schemathesis keeps it
    # running for every call to this app and it is shut down here, before the database is dropped.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    try:
        yield schema
    finally:
        shutdown_lifespans()


Headers = dict[str, str] | None


@dataclass
class Tally:
    """What the fuzzer saw: (path, status) of every response, and the 200s that carried data."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    answers_with_data: int = 0
    writes_stored: int = 0
    items_rejected: int = 0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def of(self, path: str) -> set[int]:
        return {status for (seen, status) in self.statuses if seen == path}


def fuzz(schema: schemathesis.BaseSchema, credentials: st.SearchStrategy[Headers]) -> Tally:
    """Every operation of the schema, in both modes, `EXAMPLES` examples each."""
    tally = Tally()
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {"/healthz", METRICS_PATH, BREAKDOWN_PATH, ACTIONS_PATH, TRACES_PATH, TOWNS_PATH, CHECKS_PATH}
    assert {operation.path for operation in operations} == paths
    for operation in operations:
        # An operation without parameters or body (healthz) has no invalid request to generate.
        raw = operation.definition.raw
        has_parameters = bool(raw.get("parameters") or raw.get("requestBody"))
        for mode in MODES if has_parameters else (GenerationMode.POSITIVE,):
            run = _fuzz_operation(operation, mode, credentials, tally)
            run()
    return tally


def _fuzz_operation(
    operation: Any, mode: GenerationMode, credentials: st.SearchStrategy[Headers], tally: Tally
) -> Callable[[], None]:
    @FUZZ_SETTINGS
    @given(
        case=operation.as_strategy(generation_mode=mode),
        town=st.none() | st.sampled_from(TOWNS),
        action=st.none() | st.sampled_from(ACTIONS),
        headers=credentials,
    )
    def run(case: schemathesis.Case, town: str | None, action: str | None, headers: Headers) -> None:
        # Steer some requests to towns and action types that hold data, so 200s with numbers and
        # 403s are exercised too, not only the empty answers of random ids.
        if town is not None and case.path_parameters is not None and "town_id" in case.path_parameters:
            case.path_parameters["town_id"] = town
        if action is not None and case.query is not None and "action_type" in case.query:
            case.query["action_type"] = action
        sent = None if headers is None else dict(headers)  # schemathesis adds its defaults to it
        response = case.call(headers=sent)
        case.validate_response(response, checks=CHECKS, headers=sent)
        tally.statuses[(operation.path, response.status_code)] += 1
        if operation.path == METRICS_PATH and response.status_code == 200:
            answer = response.json()
            tally.answers_with_data += answer["metrics"]["count"] > 0
            if headers == bearer(TOWN_A_TOKEN):
                assert answer["town_id"] == "town-a"
        if operation.path == ACTIONS_PATH and response.status_code == 200:
            answer = response.json()
            tally.writes_stored += answer["stored"]
            tally.items_rejected += len(answer["rejected"])
        if response.status_code == 403:
            assert headers == bearer(TOWN_A_TOKEN)
            assert case.path_parameters is not None
            assert case.path_parameters["town_id"] != "town-a"

    return run


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_fuzz_with_a_valid_token(api_schema: schemathesis.BaseSchema) -> None:
    # Authorization is not a generated parameter here, so a valid token reaches every request.
    api_schema.config.generation.update(with_security_parameters=False)
    tally = fuzz(api_schema, st.sampled_from([bearer(ANY_TOWN_TOKEN), bearer(TOWN_A_TOKEN)]))

    # Every response passed the checks; these say the fuzzer reached every kind of answer.
    assert tally.of("/healthz") == {200}
    assert tally.of(METRICS_PATH) == {200, 403, 422}
    assert tally.of(BREAKDOWN_PATH) <= {200, 403, 422}
    assert tally.of(CHECKS_PATH) <= {200, 403, 422}
    assert tally.of(TOWNS_PATH) == {200}
    assert tally.answers_with_data > 0
    assert 200 in tally.of(ACTIONS_PATH)
    assert tally.of(TRACES_PATH) <= {200, 400, 415}
    assert 400 in tally.of(TRACES_PATH)
    assert tally.writes_stored > 0
    assert tally.items_rejected > 0
    assert tally.requests >= 2 * EXAMPLES


WRONG_CREDENTIALS = [
    None,  # only what schemathesis generates for the bearer scheme: a random token, or none
    bearer("not-a-token-of-this-server-0123456789"),
    bearer(TOWN_A_TOKEN + "x"),
    {"Authorization": f"Basic {TOWN_A_TOKEN}"},
    {"Authorization": "Bearer"},
    {"Authorization": TOWN_A_TOKEN},
]


def test_fuzz_without_a_valid_token(api_schema: schemathesis.BaseSchema) -> None:
    tally = fuzz(api_schema, st.sampled_from(WRONG_CREDENTIALS))

    assert tally.of("/healthz") == {200}
    # No data and no 403 without a valid token: bad parameters are 422, everything else 401.
    assert tally.of(METRICS_PATH) == {401, 422}
    assert tally.of(BREAKDOWN_PATH) <= {401, 422}
    assert tally.of(CHECKS_PATH) <= {401, 422}
    assert tally.of(TOWNS_PATH) == {401}
    assert tally.of(ACTIONS_PATH) <= {401, 415}
    assert tally.of(TRACES_PATH) <= {401, 415}
    assert tally.answers_with_data == 0
    assert tally.requests >= 2 * EXAMPLES
