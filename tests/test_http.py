"""The metrics endpoint: the real app, its lifespan and an HTTP client, on both backends."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import httpx
import pytest
from conftest import metric
from serving import READER, run_node
from serving import bearer as real_bearer
from serving import serving as serve_subprocess

from action_metrics import ActionType, AsyncMetricsStore, MetricsStore, ModelName, TokenConfigError, migrate
from action_metrics.dialects import backend_for
from action_metrics.http import ApiTokens, create_app, response_model
from action_metrics.report import run_checks

pytestmark = pytest.mark.anyio

TOWN_A_TOKEN = "town-a-token-0123456789abcdef"
ANY_TOWN_TOKEN = "any-town-token-0123456789abcdef"
TOKENS = ApiTokens.parse(f"{TOWN_A_TOKEN}:town-a ; {ANY_TOWN_TOKEN}:*")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def serving(url: str, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app started as uvicorn starts it (lifespan first), with a client talking ASGI to it."""
    options.setdefault("tokens", TOKENS)
    app = create_app(url, **options)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metrics.test") as client,
    ):
        yield client


def hours_ago(hours: float) -> datetime:
    return datetime.now(UTC) - timedelta(hours=hours)


@pytest.fixture
async def town(database_url: str) -> str:
    metrics = [
        # LOD3 queries on haiku in the last 24 hours, well away from the window's edge.
        metric(town_id="town-a", timestamp=hours_ago(1), latency_ms=100.0),
        metric(town_id="town-a", timestamp=hours_ago(2), latency_ms=140.0),
        metric(
            town_id="town-a",
            timestamp=hours_ago(3),
            action_type=ActionType.LOD4,
            credits_charged=100,
            model=ModelName.SONNET,
            tokens_in=1_000,
            tokens_out=200,
            latency_ms=900.0,
        ),
        # Between 24 and 48 hours ago.
        metric(town_id="town-a", timestamp=hours_ago(30), latency_ms=180.0),
        # Another town.
        metric(town_id="town-b", timestamp=hours_ago(1), latency_ms=50.0),
    ]
    async with AsyncMetricsStore(database_url) as store:
        await store.emit_many(metrics)
    return database_url


async def aggregate(url: str, **filters: Any) -> dict[str, Any]:
    async with AsyncMetricsStore(url) as store:
        return (await store.aggregate(**filters)).to_dict()


# --- auth -----------------------------------------------------------------------------------


async def test_healthz_needs_no_token(town: str) -> None:
    async with serving(town) as client:
        answer = await client.get("/healthz")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": f"Basic {TOWN_A_TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": TOWN_A_TOKEN},
    ],
    ids=["none", "basic", "empty", "no-scheme"],
)
async def test_a_missing_token_is_401(town: str, headers: dict[str, str]) -> None:
    async with serving(town) as client:
        answer = await client.get("/v1/town/town-a/metrics", headers=headers)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {TOWN_A_TOKEN}x",
        f"Bearer {TOWN_A_TOKEN[:-1]}",
        "Bearer " + "a" * 300,
        f"bearer {TOWN_A_TOKEN.upper()}",
        "Bearer é€-not-ascii".encode().decode("latin-1"),
    ],
    ids=["longer", "shorter", "huge", "case", "non-ascii"],
)
async def test_a_wrong_token_is_401(town: str, authorization: str) -> None:
    async with serving(town) as client:
        answer = await client.get(
            "/v1/town/town-a/metrics", headers={"Authorization": authorization.encode("latin-1")}
        )
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def test_a_token_reads_its_towns_only(town: str) -> None:
    async with serving(town) as client:
        own = await client.get("/v1/town/town-a/metrics", headers=bearer(TOWN_A_TOKEN))
        other = await client.get("/v1/town/town-b/metrics", headers=bearer(TOWN_A_TOKEN))
        nowhere = await client.get("/v1/town/town-z/metrics", headers=bearer(TOWN_A_TOKEN))
        everywhere = await client.get("/v1/town/town-b/metrics", headers=bearer(ANY_TOWN_TOKEN))
        scheme_case = await client.get(
            "/v1/town/town-a/metrics", headers={"Authorization": f"bearer {TOWN_A_TOKEN}"}
        )
    assert own.status_code == 200
    assert other.status_code == 403
    assert nowhere.status_code == 403
    assert everywhere.status_code == 200
    assert everywhere.json()["metrics"]["count"] == 1
    assert scheme_case.status_code == 200


async def test_bad_parameters_without_a_token_are_401_first(town: str) -> None:
    async with serving(town) as client:
        answer = await client.get("/v1/town/town-a/metrics?since_hours=-1")
    assert answer.status_code == 401


async def test_insecure_serves_without_a_token(town: str) -> None:
    async with serving(town, tokens=ApiTokens(()), insecure=True) as client:
        answer = await client.get("/v1/town/town-b/metrics")
    assert answer.status_code == 200


def test_the_app_refuses_to_exist_without_a_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ACTION_METRICS_API_TOKEN", raising=False)
    monkeypatch.delenv("ACTION_METRICS_API_TOKENS", raising=False)
    with pytest.raises(TokenConfigError, match="ACTION_METRICS_API_TOKEN"):
        create_app(f"sqlite:///{tmp_path / 'metrics.db'}")
    monkeypatch.setenv("ACTION_METRICS_API_TOKEN", TOWN_A_TOKEN)
    assert create_app(f"sqlite:///{tmp_path / 'metrics.db'}") is not None


async def test_tokens_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, town: str) -> None:
    monkeypatch.setenv("ACTION_METRICS_API_TOKEN", ANY_TOWN_TOKEN)
    monkeypatch.setenv("ACTION_METRICS_API_TOKENS", f"{TOWN_A_TOKEN}:town-a")
    async with serving(town, tokens=None) as client:
        assert (
            await client.get("/v1/town/town-b/metrics", headers=bearer(ANY_TOWN_TOKEN))
        ).status_code == 200
        assert (await client.get("/v1/town/town-b/metrics", headers=bearer(TOWN_A_TOKEN))).status_code == 403


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("short:town-a", "at least 16 characters"),
        (f"{TOWN_A_TOKEN}", "TOKEN:TOWN"),
        (f"{TOWN_A_TOKEN}:", "TOKEN:TOWN"),
        (f"{TOWN_A_TOKEN}:a;{TOWN_A_TOKEN}:b", "listed twice"),
        ("token with spaces 0123456789:a", "at least 16 characters"),
    ],
)
def test_malformed_token_lists_are_refused(spec: str, problem: str) -> None:
    with pytest.raises(TokenConfigError, match=problem):
        ApiTokens.parse(spec)


def test_a_token_list_names_towns() -> None:
    tokens = ApiTokens.parse(f"\n  {TOWN_A_TOKEN}: town-a, town-c\n{ANY_TOWN_TOKEN}:*;\n")
    own = tokens.grant_for(TOWN_A_TOKEN)
    assert own is not None
    assert own.allows("town-a")
    assert own.allows("town-c")
    assert not own.allows("town-b")
    anywhere = tokens.grant_for(ANY_TOWN_TOKEN)
    assert anywhere is not None
    assert anywhere.allows("town-b")
    assert tokens.grant_for("nobody-0123456789abcdef") is None


# --- the answer -----------------------------------------------------------------------------


async def test_the_answer_is_the_seed_json_over_the_last_day(town: str) -> None:
    async with serving(town) as client:
        answer = await client.get("/v1/town/town-a/metrics", headers=bearer(TOWN_A_TOKEN))
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"town_id", "action_type", "time_window_hours", "metrics"}
    assert body["town_id"] == "town-a"
    assert body["action_type"] is None
    assert body["time_window_hours"] == 24
    since = datetime.now(UTC) - timedelta(hours=24)
    assert body["metrics"] == await aggregate(town, town_id="town-a", since=since)
    # Independently: the three town-a actions of the last day, one of them LOD4 on sonnet.
    assert body["metrics"]["count"] == 3
    assert body["metrics"]["total_credits"] == 120
    assert body["metrics"]["by_model"]["sonnet"]["count"] == 1
    assert body["metrics"]["by_model"]["haiku"]["count"] == 2


async def test_filters_narrow_the_answer(town: str) -> None:
    async with serving(town) as client:

        async def ask(query: str) -> dict[str, Any]:
            answer = await client.get(f"/v1/town/town-a/metrics?{query}", headers=bearer(TOWN_A_TOKEN))
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            return body

        lod3_today = await ask("action_type=lod3")
        lod3_two_days = await ask("action_type=lod3&since_hours=48")
        half_hour = await ask("since_hours=0.5")
        unknown_action = await ask("action_type=teleport")
    assert lod3_today["action_type"] == "lod3"
    assert lod3_today["metrics"]["count"] == 2
    assert lod3_today["metrics"]["avg_latency_ms"] == pytest.approx(120.0)
    assert lod3_two_days["time_window_hours"] == 48
    assert lod3_two_days["metrics"]["count"] == 3
    assert lod3_two_days["metrics"]["avg_latency_ms"] == pytest.approx(140.0)
    assert half_hour["time_window_hours"] == 0.5
    assert half_hour["metrics"]["count"] == 0
    assert half_hour["metrics"]["avg_latency_ms"] is None
    assert half_hour["metrics"]["by_model"] == {}
    assert unknown_action["metrics"]["count"] == 0


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("since_hours=0", "since_hours"),
        ("since_hours=-3", "since_hours"),
        ("since_hours=abc", "since_hours"),
        ("since_hours=nan", "since_hours"),
        ("since_hours=inf", "since_hours"),
        ("since_hours=1e12", "since_hours"),
        ("since_hours=", "since_hours"),
        ("action_type=LOD3", "action_type"),
        ("action_type=", "action_type"),
        ("action_type=" + "a" * 65, "action_type"),
        ("action_type=lod3%00", "action_type"),
        ("action_type=lod3;drop", "action_type"),
    ],
)
async def test_bad_parameters_are_422_with_the_reason(town: str, query: str, parameter: str) -> None:
    async with serving(town) as client:
        answer = await client.get(f"/v1/town/town-a/metrics?{query}", headers=bearer(ANY_TOWN_TOKEN))
    assert answer.status_code == 422
    problems = answer.json()["detail"]
    assert [problem["loc"] for problem in problems] == [["query", parameter]]
    assert problems[0]["msg"]


async def test_an_over_long_town_id_is_422(town: str) -> None:
    async with serving(town) as client:
        answer = await client.get("/v1/town/" + "t" * 257 + "/metrics", headers=bearer(ANY_TOWN_TOKEN))
    assert answer.status_code == 422


async def test_unusual_town_ids_are_answered_not_crashed(town: str) -> None:
    async with serving(town) as client:
        for town_id in ("t%C3%A9st", "%F0%9F%8F%A0", "a%00b", "%20", "..", "%ED%A0%80"):
            answer = await client.get(f"/v1/town/{town_id}/metrics", headers=bearer(ANY_TOWN_TOKEN))
            assert answer.status_code in (200, 404, 422), (town_id, answer.status_code)
            if answer.status_code == 200:
                assert answer.json()["metrics"]["count"] == 0


# --- towns named "." and "..": no URL path can hold them ----------------------------------------

DOT_TOWNS = (".", "..", "a/..", "metrics")
"""Ids that are, or end in, a dot segment, and a town named after a read."""

NODE_READER = r"""
const [address, token] = [process.env.ADDRESS, process.env.TOKEN];
const read = async (path) => {
  const response = await fetch(address + path, {headers: {Authorization: "Bearer " + token}});
  return {status: response.status, url: new URL(response.url).pathname, answer: await response.json()};
};
(async () => {
  console.log(JSON.stringify({
    encoded: await read("/v1/town/%2E%2E/metrics?since_hours=24"),
    query: await read("/v1/town/metrics?town_id=..&since_hours=24"),
  }));
})().catch((error) => { console.error(error); process.exit(1); });
"""


def test_towns_named_dot_and_dot_dot_are_read_by_curl_httpx_and_node(database_url: str) -> None:
    """curl and httpx keep a `%2E` segment; browsers and Node resolve it as a dot segment (WHATWG
    URLs), and every client resolves a bare `.`: the query form `?town_id=` reaches any town."""
    sent = {
        town: [
            metric(
                town_id=town, user_id=f"user-{n % 2}", tokens_in=100 * (k + 1) + n, timestamp=hours_ago(1 + n)
            )
            for n in range(k + 2)
        ]
        for k, town in enumerate(DOT_TOWNS)
    }
    with MetricsStore(database_url, durable=True) as store:
        store.emit_many([item for metrics in sent.values() for item in metrics])
        store.emit_many([metric(town_id="town-a", timestamp=hours_ago(1))])

    def expected(town: str) -> tuple[str, int, int]:
        return town, len(sent[town]), sum(item.tokens_in for item in sent[town])

    def figures(answer: dict[str, Any]) -> tuple[str, int, int]:
        return answer["town_id"], answer["metrics"]["count"], answer["metrics"]["tokens_in"]

    with serve_subprocess(database_url) as server:
        headers = real_bearer(READER)
        curl = ["curl", "-sS", "-H", f"Authorization: Bearer {READER}"]
        for town, path in ((".", "%2E"), ("..", "%2e%2E"), ("a/..", "a/%2E%2E"), ("metrics", "metrics")):
            answer = subprocess.run(
                [*curl, f"{server.address}/v1/town/{path}/metrics?since_hours=24"],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            assert figures(json.loads(answer.stdout)) == expected(town), path

        with httpx.Client(base_url=server.address, headers=headers, timeout=60) as client:
            for town in DOT_TOWNS:
                window = {"town_id": town, "since_hours": 24}
                assert figures(client.get("/v1/town/metrics", params=window).json()) == expected(town)
                rows = client.get("/v1/town/breakdown", params={**window, "by": "user_id"}).json()
                assert rows["town_id"] == town
                by_user = {row["user_id"]: row["count"] for row in rows["rows"]}
                assert by_user == Counter(item.user_id for item in sent[town])
                assert client.get("/v1/town/checks", params=window).json()["town_id"] == town
            # httpx resolves the bare segment, as every client does: the answer says what to send.
            for path in ("/v1/town/./metrics", "/v1/town/../breakdown"):
                answer = client.get(path)
                assert answer.status_code == 404
                assert "?town_id=" in answer.json()["detail"]
            twice = client.get("/v1/town/metrics", params=[("town_id", "."), ("town_id", "..")])
            assert twice.status_code == 422
            assert [problem["loc"] for problem in twice.json()["detail"]] == [["query", "town_id"]]
            assert client.get("/v1/town/metrics", params={"town_id": ""}).status_code == 422
            assert client.get("/v1/actions").status_code == 405  # the other /v1 routes are unchanged

        report = run_node(NODE_READER, ADDRESS=server.address, TOKEN=READER)
        assert report["encoded"]["status"] == 404  # Node's fetch asked for /v1/metrics
        assert "?town_id=" in report["encoded"]["answer"]["detail"]
        assert report["query"]["status"] == 200
        assert figures(report["query"]["answer"]) == expected("..")


async def test_the_query_form_keeps_the_tokens_towns(town: str) -> None:
    async with serving(town) as client:
        for town_id, status in (("town-a", 200), ("..", 403), ("town-b", 403)):
            answer = await client.get(
                "/v1/town/metrics", params={"town_id": town_id}, headers=bearer(TOWN_A_TOKEN)
            )
            assert answer.status_code == status, town_id
        assert (await client.get("/v1/town/metrics", params={"town_id": ".."})).status_code == 401


async def test_the_openapi_schema_describes_the_endpoint(town: str) -> None:
    async with serving(town) as client:
        schema = (await client.get("/openapi.json")).json()
    operation = schema["paths"]["/v1/town/{town_id}/metrics"]["get"]
    assert {parameter["name"] for parameter in operation["parameters"]} == {
        "town_id",
        "action_type",
        "since_hours",
        "since",
        "until",
    }
    assert {"200", "401", "403", "422", "503"} <= set(operation["responses"])
    assert operation["security"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def resolved(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """`node` of an OpenAPI document with its `$ref` followed."""
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


async def test_the_openapi_schema_is_aggregate_to_dict_key_for_key(town: str) -> None:
    async with serving(town) as client:
        schema = (await client.get("/openapi.json")).json()
        answer = await client.get("/v1/town/town-a/metrics", headers=bearer(TOWN_A_TOKEN))
    ok = schema["paths"]["/v1/town/{town_id}/metrics"]["get"]["responses"]["200"]
    town_metrics = resolved(schema, ok["content"]["application/json"]["schema"])
    metrics = resolved(schema, town_metrics["properties"]["metrics"])
    by_model = resolved(schema, metrics["properties"]["by_model"]["additionalProperties"])

    figures = await aggregate(town, town_id="town-a", since=hours_ago(24))
    model_entry = next(iter(figures["by_model"].values()))
    # Every key documented, nothing undocumented, every key always there.
    assert set(metrics["properties"]) == set(metrics["required"]) == set(figures)
    assert set(by_model["properties"]) == set(by_model["required"]) == set(model_entry)
    assert metrics["additionalProperties"] is False
    assert by_model["additionalProperties"] is False
    assert answer.json()["metrics"] == figures


@dataclass(frozen=True, slots=True)
class Part:
    count: int


@dataclass(frozen=True, slots=True)
class Whole:
    error_count: int
    exact: bool
    parts: Mapping[str, Part]

    @property
    def errors_per_part(self) -> float | None:
        return self.error_count / len(self.parts) if self.parts else None


def test_a_figure_added_to_a_result_dataclass_appears_in_its_response_model() -> None:
    schema = response_model(Whole).model_json_schema()
    assert list(schema["properties"]) == ["error_count", "exact", "parts", "errors_per_part"]
    part = schema["properties"]["parts"]["additionalProperties"]["$ref"].rsplit("/", 1)[-1]
    assert list(schema["$defs"][part]["properties"]) == ["count"]


# --- the database ---------------------------------------------------------------------------


def unreachable_url(backend_name: str, tmp_path: Path) -> str:
    return {
        "sqlite": f"sqlite:///{tmp_path / 'missing-directory' / 'metrics.db'}",
        "postgresql": "postgresql://postgres@127.0.0.1:1/nowhere",
    }[backend_name]


async def test_an_unreachable_database_is_503(backend: Any, tmp_path: Path) -> None:
    async with serving(unreachable_url(backend.name, tmp_path)) as client:
        health = await client.get("/healthz")
        answer = await client.get("/v1/town/town-a/metrics", headers=bearer(TOWN_A_TOKEN))
        denied = await client.get("/v1/town/town-a/metrics")
    assert health.status_code == 200
    assert answer.status_code == 503
    assert answer.json() == {"detail": "the metrics database is unavailable"}
    assert answer.headers["Retry-After"]
    assert denied.status_code == 401


async def test_tables_dropped_under_a_running_server_are_503(town: str) -> None:
    async with serving(town) as client:
        assert (await client.get("/v1/town/town-a/metrics", headers=bearer(TOWN_A_TOKEN))).status_code == 200
        engine = backend_for(town).create_engine()
        try:
            await migrate.run_migrations(engine, migrate.downgrade_to("base"))
        finally:
            await engine.dispose()
        answer = await client.get("/v1/town/town-a/metrics", headers=bearer(TOWN_A_TOKEN))
    assert answer.status_code == 503


async def test_every_read_documents_the_statuses_it_answers(backend: Any, tmp_path: Path) -> None:
    """The OpenAPI schema lists what each read really answers: `/v1/towns`, as a town's reads, is
    503 with Retry-After while the database is unreachable, and 403 to a token that may only write."""
    writer = "write-only-token-0123456789abcdef"
    tokens = ApiTokens.parse(f"{ANY_TOWN_TOKEN}:* ; write:{writer}:*")
    async with serving(unreachable_url(backend.name, tmp_path), tokens=tokens) as client:
        schema = (await client.get("/openapi.json")).json()
        unavailable = await client.get("/v1/towns", headers=bearer(ANY_TOWN_TOKEN))
        denied = await client.get("/v1/towns", headers=bearer(writer))
        anonymous = await client.get("/v1/towns")
    assert (unavailable.status_code, denied.status_code, anonymous.status_code) == (503, 403, 401)
    assert unavailable.headers["Retry-After"]
    paths = schema["paths"].items()
    reads = {path: item["get"] for path, item in paths if path.startswith("/v1/") and "get" in item}
    assert {"/v1/towns", "/v1/town/{town_id}/metrics", "/v1/town/{town_id}/checks"} <= set(reads)
    for path, operation in reads.items():
        assert {"200", "401", "403", "503"} <= set(operation["responses"]), path


# --- breakdown ------------------------------------------------------------------------------


async def test_breakdown_per_model_and_berlin_hour_within_the_tokens_towns(town: str) -> None:
    async with serving(town) as client:
        path = "/v1/town/town-a/breakdown"
        query = {"by": "model", "bucket": "hour", "tz": "Europe/Berlin", "since_hours": 24, "sort": "count"}
        own = await client.get(path, params=query, headers=bearer(TOWN_A_TOKEN))
        other = await client.get("/v1/town/town-b/breakdown", params=query, headers=bearer(TOWN_A_TOKEN))
        zone = await client.get(path, params={**query, "tz": "Europe/Gotham"}, headers=bearer(TOWN_A_TOKEN))
        dimension = await client.get(path, params={**query, "by": "town"}, headers=bearer(TOWN_A_TOKEN))
        top = await client.get(path, params={"by": "model", "top": 1}, headers=bearer(TOWN_A_TOKEN))
    assert own.status_code == 200, own.text
    rows = own.json()["rows"]
    berlin = ZoneInfo("Europe/Berlin")
    for row in rows:
        start = datetime.fromisoformat(row["bucket_start"])
        assert start.utcoffset() == start.astimezone(berlin).utcoffset()
        since = start.astimezone(UTC)
        expected = await aggregate(
            town, town_id="town-a", model=row["model"], since=since, until=since + timedelta(hours=1)
        )
        assert row["count"] == expected["count"]
    assert sum(row["count"] for row in rows) == 3  # the three of the last 24 hours
    assert other.status_code == 403
    assert zone.status_code == 422
    assert "tz" in zone.text
    assert dimension.status_code == 422
    assert "by" in zone.text or "by" in dimension.text
    assert top.json()["rows"][0]["model"] == "sonnet"  # the dearest
    assert len(top.json()["rows"]) == 1


# --- a window between two moments -------------------------------------------------------------


def moment(at: datetime, zone: str) -> str:
    """`at` as the page sends it: ISO 8601 with the offset of `zone`."""
    return at.astimezone(ZoneInfo(zone)).isoformat()


async def test_a_window_between_two_moments_is_the_stores(town: str) -> None:
    since, until = hours_ago(36), hours_ago(2.5)
    window = {"since": moment(since, "America/New_York"), "until": moment(until, "Asia/Kolkata")}
    by_model = {"by": "model", "bucket": "hour", "tz": "Europe/Berlin", "sort": "count"}
    async with serving(town) as client:

        async def ask(path: str, **query: Any) -> dict[str, Any]:
            answer = await client.get(f"/v1/town/town-a/{path}", params=query, headers=bearer(TOWN_A_TOKEN))
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            return body

        metrics = await ask("metrics", **window)
        lod3 = await ask("metrics", action_type="lod3", **window)
        rows = (await ask("breakdown", **by_model, **window))["rows"]
        checks = await ask("checks", **window)
        # `until` with `since_hours`: the hours before it.
        before = await ask("metrics", until=window["until"], since_hours=12)
    filters = {"town_id": "town-a", "since": since, "until": until}
    async with AsyncMetricsStore(town) as store:
        expected = (await store.aggregate(**filters)).to_dict()
        expected_lod3 = (await store.aggregate(action_type="lod3", **filters)).to_dict()
        expected_rows = [
            row.to_dict()
            for row in await store.breakdown(
                ["model"], bucket="hour", tz="Europe/Berlin", sort="count", **filters
            )
        ]
        expected_checks = await run_checks(store, **filters)
        expected_before = await store.aggregate(
            town_id="town-a", since=until - timedelta(hours=12), until=until
        )
    assert metrics["metrics"] == expected
    assert metrics["time_window_hours"] == pytest.approx(33.5)
    assert lod3["metrics"] == expected_lod3
    assert rows == expected_rows
    assert checks["checks"] == [check.to_dict() for check in expected_checks]
    assert before["metrics"] == expected_before.to_dict()
    assert before["time_window_hours"] == 12
    # Independently: the LOD4 of 3 hours ago and the LOD3 of 30; not the two of the last 2.5 hours.
    assert metrics["metrics"]["count"] == 2
    assert metrics["metrics"]["total_credits"] == 110
    assert lod3["metrics"]["count"] == 1
    assert sum(row["count"] for row in rows) == 2
    assert before["metrics"]["count"] == 1


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("since=2025-06-01T00:00:00", "since"),  # no offset: whose midnight?
        ("since=yesterday", "since"),
        ("since=", "since"),
        ("until=2025-06-01", "until"),
        ("since=2025-06-01T00:00:00Z&since_hours=24", "since_hours"),
        ("since=2025-06-02T00:00:00Z&until=2025-06-01T00:00:00Z", "until"),
        ("since=2025-06-01T00:00:00Z&until=2025-06-01T00:00:00Z", "until"),
        ("since=2999-01-01T00:00:00Z", "since"),  # in the future, without an end
        ("since=0001-01-01T00:00:00%2B14:00", "since"),  # before the first UTC moment
        ("until=9999-12-31T23:59:59-14:00", "until"),  # after the last
        ("until=0001-01-01T01:00:00Z", "until"),  # 24 hours before it do not exist
        ("since=0400-01-01T00:00:00Z&until=2026-01-01T00:00:00Z", "since"),  # centuries: a typo
        ("since=2000-01-01T00:00:00Z", "since"),  # more than ten years to now
    ],
)
async def test_bad_windows_are_422_naming_the_parameter(town: str, query: str, parameter: str) -> None:
    async with serving(town) as client:
        for path in ("metrics", "breakdown", "checks"):
            answer = await client.get(f"/v1/town/town-a/{path}?{query}", headers=bearer(TOWN_A_TOKEN))
            assert answer.status_code == 422, (path, answer.text)
            problems = answer.json()["detail"]
            assert [problem["loc"] for problem in problems] == [["query", parameter]], path
            assert problems[0]["msg"]


# --- town ids that need percent-encoding ------------------------------------------------------

ODD_TOWNS = (
    "a",
    "a/b",
    "a/b/metrics",
    "a/checks",
    "north ward 50% ?#&=+ é🏠",
    "a/../b",
    "/",
    "%2F",
    "a\nb/c",
)
"""Ids whose path segment must be percent-encoded, and ids made of another route's segments."""


async def test_town_ids_that_need_percent_encoding_read_their_own_town(database_url: str) -> None:
    recent = hours_ago(1)
    async with AsyncMetricsStore(database_url) as store:
        # Town number n has n + 1 actions, so an answer says which town it counted.
        await store.emit_many(
            metric(town_id=town_id, timestamp=recent, user_id=f"user-{n}")
            for n, town_id in enumerate(ODD_TOWNS)
            for _ in range(n + 1)
        )
    tokens = ApiTokens.parse(f"{TOWN_A_TOKEN}:a ; {ANY_TOWN_TOKEN}:*")
    async with serving(database_url, tokens=tokens) as client:
        for n, town_id in enumerate(ODD_TOWNS):
            segment = quote(town_id, safe="")
            metrics = await client.get(f"/v1/town/{segment}/metrics", headers=bearer(ANY_TOWN_TOKEN))
            breakdown = await client.get(
                f"/v1/town/{segment}/breakdown", params={"by": "user_id"}, headers=bearer(ANY_TOWN_TOKEN)
            )
            checks = await client.get(f"/v1/town/{segment}/checks", headers=bearer(ANY_TOWN_TOKEN))
            for answer in (metrics, breakdown, checks):
                assert answer.status_code == 200, (town_id, answer.text)
                assert answer.json()["town_id"] == town_id
            assert metrics.json()["metrics"]["count"] == n + 1, town_id
            assert [row["user_id"] for row in breakdown.json()["rows"]] == [f"user-{n}"], town_id
            # A token for town "a" reads "a" only, however the path is spelled.
            denied = await client.get(f"/v1/town/{segment}/metrics", headers=bearer(TOWN_A_TOKEN))
            assert denied.status_code == (200 if town_id == "a" else 403), town_id
        # A slash need not be encoded: the route's last segment says which read it is.
        plain = await client.get("/v1/town/a/b/metrics/breakdown", headers=bearer(ANY_TOWN_TOKEN))
        assert plain.json()["town_id"] == "a/b/metrics"
        assert len(plain.json()["rows"]) == 1
        towns = await client.get("/v1/towns", headers=bearer(ANY_TOWN_TOKEN))
        assert towns.json()["towns"] == sorted(ODD_TOWNS)
        empty = await client.get("/v1/town//metrics", headers=bearer(ANY_TOWN_TOKEN))
        assert empty.status_code == 422
