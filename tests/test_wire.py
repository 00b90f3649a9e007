"""Metrics over the wire: `POST /v1/actions` on a real `action-metrics serve`, on both backends.

Clients are the ones a writer in another language uses: `curl`, Node's built-in `fetch`, and httpx.
What the store holds afterwards (`query()`) is compared with what was sent: the tests that only add
metrics share one server per module and backend (`server`; starting one is most of such a test's
time), and each compares what its requests added to the store with what it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import math
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Databases, metric, serving_a_database
from serving import (
    LEGACY,
    READER,
    TOWN_A_WRITER,
    WRITER,
    Server,
    app_client,
    bearer,
    kill_mid_stream,
    run_node,
    serving,
)
from sqlalchemy import event

from action_metrics import ActionMetric, AsyncMetricsStore, InvalidMetric, MetricsStore, TokenConfigError
from action_metrics.access import READ_ONLY, ApiTokens, Scope
from action_metrics.errors import DataRejected
from action_metrics.intake import GroupCommit, IntakeLimits


def stored(url: str) -> dict[str, dict[str, Any]]:
    """Every metric in the database, by id, in `to_dict()` form."""
    with MetricsStore(url) as store:
        metrics = store.query()
    by_id = {str(metric.id): metric.to_dict() for metric in metrics}
    assert len(by_id) == len(metrics), "an id is stored twice"
    return by_id


@dataclass(frozen=True)
class SharedServer:
    """The module's server for one test: where it listens, its database, and the ids its store held
    when the test began (a test process runs one test at a time, so nothing else writes meanwhile)."""

    running: Server
    before: frozenset[str]

    @property
    def address(self) -> str:
        return self.running.address

    @property
    def url(self) -> str:
        return self.running.url


def added(server: SharedServer) -> dict[str, dict[str, Any]]:
    """What the test's requests added to the store: `stored` but the ids held when it began."""
    return {key: item for key, item in stored(server.url).items() if key not in server.before}


@pytest.fixture(scope="module")
def module_server(backend: Databases) -> Iterator[Server]:
    yield from serving_a_database(backend)


@pytest.fixture
def server(module_server: Server) -> SharedServer:
    return SharedServer(module_server, frozenset(stored(module_server.url)))


def sent_metrics(count: int, **fields: Any) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    return [
        metric(
            timestamp=now - timedelta(seconds=index),
            tokens_in=100 + index,
            cache_read_tokens=index % 50,
            latency_ms=10.5 + index / 8,
            metadata={"request": index, "tags": ["wire", str(index)]},
            **fields,
        ).to_dict()
        for index in range(count)
    ]


def post(server: Server | SharedServer, body: bytes, token: str = WRITER, **headers: str) -> httpx.Response:
    headers = {"Content-Type": "application/json", **bearer(token), **headers}
    return httpx.post(f"{server.address}/v1/actions", content=body, headers=headers, timeout=120)


# --- clients in other languages ---------------------------------------------------------------------


def test_curl_posts_an_array_and_gzip_ndjson_and_the_store_holds_what_was_sent(
    server: SharedServer, tmp_path: Path
) -> None:
    array, lines = sent_metrics(300, town_id="town-a"), sent_metrics(200, user_id="user-2")
    (tmp_path / "array.json").write_text(json.dumps(array))
    (tmp_path / "lines.ndjson.gz").write_bytes(gzip.compress("\n".join(map(json.dumps, lines)).encode()))

    def curl(path: str, content_type: str, *headers: str) -> dict[str, Any]:
        result = subprocess.run(
            [
                "curl",
                "-sS",
                "--fail-with-body",
                "-H",
                f"Authorization: Bearer {WRITER}",
                "-H",
                f"Content-Type: {content_type}",
                *headers,
                "--data-binary",
                f"@{tmp_path / path}",
                f"{server.address}/v1/actions",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    assert curl("array.json", "application/json") == {"stored": 300, "duplicate": 0, "rejected": []}
    assert curl("lines.ndjson.gz", "application/x-ndjson", "-H", "Content-Encoding: gzip") == {
        "stored": 200,
        "duplicate": 0,
        "rejected": [],
    }
    assert added(server) == {item["id"]: item for item in array + lines}


NODE_WRITER = r"""
const zlib = require("zlib");
const count = Number(process.env.COUNT);
const now = Date.now();
const sent = [];
for (let i = 0; i < count; i++) {
  sent.push({
    id: crypto.randomUUID(), action_type: "dialogue", user_id: `node-user-${i % 7}`, town_id: "town-a",
    citizen_id: i % 3 ? `citizen-${i}` : null, tokens_in: 1000 + i, tokens_out: 200 + i,
    reasoning_tokens: i % 20, model: "claude-sonnet-4-5@20250929", latency_ms: 250.25 + i,
    credits_charged: 5, timestamp: new Date(now - i * 1000).toISOString(), metadata: {lang: "node", i},
  });
}
const ndjson = process.env.FORMAT === "ndjson";
const text = ndjson ? sent.map((m) => JSON.stringify(m)).join("\n") : JSON.stringify(sent);
(async () => {
  const response = await fetch(process.env.ADDRESS + "/v1/actions", {
    method: "POST",
    headers: {
      "Authorization": "Bearer " + process.env.TOKEN,
      "Content-Type": ndjson ? "application/x-ndjson" : "application/json",
      "Content-Encoding": "gzip",
    },
    body: zlib.gzipSync(text),
  });
  console.log(JSON.stringify({status: response.status, answer: await response.json(), sent}));
})().catch((error) => { console.error(error); process.exit(1); });
"""


@pytest.mark.parametrize("body_format", ["array", "ndjson"])
def test_node_fetch_posts_metrics_and_the_store_holds_what_was_sent(
    server: SharedServer, body_format: str
) -> None:
    report = run_node(
        NODE_WRITER, ADDRESS=server.address, TOKEN=TOWN_A_WRITER, COUNT="250", FORMAT=body_format
    )
    assert report["status"] == 200
    assert report["answer"] == {"stored": 250, "duplicate": 0, "rejected": []}
    holds = added(server)
    assert set(holds) == {item["id"] for item in report["sent"]}
    for item in report["sent"]:
        kept = holds[item["id"]]
        expected = ActionMetric.from_dict(item).to_dict()
        assert kept == expected
        assert datetime.fromisoformat(kept["timestamp"]) == datetime.fromisoformat(item["timestamp"])


# --- what each item gets ---------------------------------------------------------------------------


def test_bad_items_are_rejected_with_their_index_and_field_and_the_rest_stored(server: SharedServer) -> None:
    good = sent_metrics(4)
    items: list[Any] = [
        good[0],
        {**good[1], "tokens_in": -5},
        good[1],
        {**good[2], "action_type": "Chat!"},
        {key: value for key, value in good[2].items() if key != "id"},
        {**good[2], "timestamp": "2026-01-01T12:00:00"},
        {**good[2], "metadata": "not json"},
        {**good[2], "tokens_out": 1.5},
        {**good[2], "id": "x"},
        {**good[2], "reasoning_tokens": 10_000},
        {**good[2], "tokns_in": 3},
        "a string",
        good[2],
        good[3],
    ]
    answer = post(server, json.dumps(items).encode())
    assert answer.status_code == 200
    result = answer.json()
    assert result["stored"] == 4
    assert result["duplicate"] == 0
    assert [(item["index"], item["field"]) for item in result["rejected"]] == [
        (1, "tokens_in"),
        (3, "action_type"),
        (4, "id"),
        (5, "timestamp"),
        (6, "metadata"),
        (7, "tokens_out"),
        (8, "id"),
        (9, "reasoning_tokens"),
        (10, "tokns_in"),
        (11, "metric"),
    ]
    assert all(item["error"] for item in result["rejected"])
    assert added(server) == {item["id"]: item for item in good}


def test_items_from_before_the_prune_cut_off_are_rejected_naming_timestamp_and_the_rest_stored(
    database_url: str,
) -> None:
    with serving(database_url) as server:  # a server of its own: it prunes its store
        prune_and_post(server)


def prune_and_post(server: Server) -> None:
    ten_days_ago = datetime.now(UTC) - timedelta(days=10)
    pruned = [metric(timestamp=ten_days_ago + timedelta(minutes=i)) for i in range(3)]
    with MetricsStore(server.url) as store:
        store.emit_many(pruned)
        cutoff = store.prune(ten_days_ago + timedelta(days=5)).cutoff
    good, late = sent_metrics(4), metric(timestamp=cutoff - timedelta(seconds=1)).to_dict()
    items = [good[0], pruned[1].to_dict(), good[1], {**good[2], "tokens_in": -5}, late, good[2], good[3]]
    answer = post(server, json.dumps(items).encode())
    assert answer.status_code == 200
    result = answer.json()
    assert (result["stored"], result["duplicate"]) == (4, 0)
    assert [(item["index"], item["field"]) for item in result["rejected"]] == [
        (1, "timestamp"),
        (3, "tokens_in"),
        (4, "timestamp"),
    ]
    assert cutoff.isoformat() in result["rejected"][0]["error"]
    with MetricsStore(server.url) as store:
        kept = {str(one.id): one.to_dict() for one in store.query(since=cutoff)}
        assert store.aggregate().count == len(pruned) + len(good)  # the re-sent one counted once
    assert kept == {item["id"]: item for item in good}


def test_duplicates_are_counted_and_stored_once(server: SharedServer) -> None:
    first, second = sent_metrics(10), sent_metrics(5)
    assert post(server, json.dumps(first).encode()).json() == {"stored": 10, "duplicate": 0, "rejected": []}
    again = first[:6] + second + second[:2]  # six sent before, two twice within the request
    assert post(server, json.dumps(again).encode()).json() == {"stored": 5, "duplicate": 8, "rejected": []}
    assert added(server) == {item["id"]: item for item in first + second}


def test_ndjson_lines_that_are_not_json_are_rejected_alone_by_line_number(server: SharedServer) -> None:
    """An NDJSON item's index is its line's number from 0, blank lines counted: what a client maps
    back to the lines it sent."""
    good = sent_metrics(3)
    lines = [json.dumps(good[0]), "{not json", "", json.dumps(good[1]), "NaN", " \r", json.dumps(good[2])]
    answer = post(
        server, "\n".join(lines).encode() + b"\n", **{"Content-Type": "application/x-ndjson; charset=utf-8"}
    )
    result = answer.json()
    assert (result["stored"], result["duplicate"]) == (3, 0)
    assert [(item["index"], item["field"]) for item in result["rejected"]] == [(1, None), (4, None)]
    assert set(added(server)) == {item["id"] for item in good}


CUT_EMOJI = "\ud83d"
"""The first half of U+1F600, a lone surrogate: what JavaScript's `JSON.stringify` writes, escaped
(valid JSON), for a string cut in the middle of an emoji; so does Python's `json.dumps`."""


@pytest.mark.parametrize("body_format", ["array", "ndjson"])
def test_an_item_holding_a_lone_surrogate_is_rejected_alone_naming_its_field(
    server: SharedServer, body_format: str
) -> None:
    good = sent_metrics(3)
    items: list[Any] = [
        good[0],
        {**good[1], "user_id": CUT_EMOJI},
        good[1],
        {**good[2], "metadata": {"note": f"cut {CUT_EMOJI}"}},
        {**good[2], CUT_EMOJI: 1},
        good[2],
    ]
    if body_format == "array":
        answer = post(server, json.dumps(items).encode())
    else:
        lines = "\n".join(map(json.dumps, items)).encode()
        answer = post(server, lines, **{"Content-Type": "application/x-ndjson"})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert (result["stored"], result["duplicate"]) == (3, 0)
    assert [(item["index"], item["field"]) for item in result["rejected"]] == [
        (1, "user_id"),
        (3, "metadata"),
        (4, "\\ud83d"),  # an unknown key named as JSON escapes it: the answer is valid UTF-8
    ]
    assert added(server) == {item["id"]: item for item in good}


WIDE_INTEGERS = {"request": 2**64, "below": -(2**63) - 1, "huge": 10**30, "nested": {"ids": [2**64 + 1]}}
"""Integers beyond 64 bits (a provider's 20-digit request number): orjson alone reads them as floats."""


def typed(value: Any) -> Any:
    """`value` with each number paired with its type: 1e19 == 10**19 in Python."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return (type(value).__name__, value)


def test_integers_beyond_64_bits_in_metadata_are_stored_exactly_and_a_float_stays_a_float(
    server: SharedServer,
) -> None:
    array, lines = sent_metrics(3), sent_metrics(3, user_id="user-2")
    for items in (array, lines):
        items[0]["metadata"] = {**WIDE_INTEGERS, "sampled_at": 1e19}
        items[2]["metadata"] = {"sampled_at": 1e19}  # a float alone, as `json.dumps` writes it: 1e+19
    assert post(server, json.dumps(array).encode()).json() == {"stored": 3, "duplicate": 0, "rejected": []}
    ndjson = "\n".join(map(json.dumps, lines)).encode()
    assert post(server, ndjson, **{"Content-Type": "application/x-ndjson"}).json() == {
        "stored": 3,
        "duplicate": 0,
        "rejected": [],
    }
    holds = added(server)
    for item in array + lines:
        assert typed(holds[item["id"]]["metadata"]) == typed(item["metadata"])
    assert holds[array[0]["id"]]["metadata"]["request"] == 18446744073709551616
    assert type(holds[lines[2]["id"]]["metadata"]["sampled_at"]) is float


def test_a_number_beyond_a_double_is_kept_as_an_int_or_rejected_alone_as_an_infinity(
    server: SharedServer,
) -> None:
    """orjson refuses a number past 1.8e308; Python keeps such an integer and refuses an infinite
    float (what `1e400` is) naming its field: so does the wire, in an array and in NDJSON."""
    good = sent_metrics(4)
    items = [
        good[0],
        {**good[1], "metadata": {"digits": 10**400}},
        {**good[2], "metadata": {"ratio": "INFINITE"}},
        {**good[2], "latency_ms": "INFINITE"},
        good[3],
    ]
    texts = [json.dumps(item).replace('"INFINITE"', "1e400") for item in items]
    array = post(server, f"[{','.join(texts)}]".encode()).json()
    lines = post(server, "\n".join(texts).encode(), **{"Content-Type": "application/x-ndjson"}).json()
    for answer, stored_now in ((array, 3), (lines, 0)):
        assert (answer["stored"], answer["duplicate"]) == (stored_now, 3 - stored_now)
        assert [(item["index"], item["field"]) for item in answer["rejected"]] == [
            (2, "metadata"),
            (3, "latency_ms"),
        ]
    for field, value in (("metadata", {"ratio": math.inf}), ("latency_ms", math.inf)):
        with pytest.raises(InvalidMetric) as refused:
            ActionMetric.from_dict({**good[2], field: value})
        assert refused.value.field == field
    holds = added(server)
    assert holds == {item["id"]: item for item in (good[0], items[1], good[3])}
    assert holds[good[1]["id"]]["metadata"]["digits"] == 10**400


# --- tokens ---------------------------------------------------------------------------------------


def test_a_town_limited_token_writes_only_its_towns(server: SharedServer) -> None:
    mine, theirs = sent_metrics(3, town_id="town-a"), sent_metrics(2, town_id="town-b")
    answer = post(
        server, json.dumps([mine[0], theirs[0], mine[1], theirs[1], mine[2]]).encode(), TOWN_A_WRITER
    )
    result = answer.json()
    assert (result["stored"], result["duplicate"]) == (3, 0)
    assert [(item["index"], item["field"]) for item in result["rejected"]] == [(1, "town_id"), (3, "town_id")]
    assert set(added(server)) == {item["id"] for item in mine}


def test_read_only_tokens_cannot_write_and_write_only_tokens_cannot_read(server: SharedServer) -> None:
    body = json.dumps(sent_metrics(2)).encode()
    # A token configured before tokens could write (ACTION_METRICS_API_TOKEN, or an entry without
    # a scope) still only reads.
    for token in (READER, LEGACY):
        denied = post(server, body, token)
        assert denied.status_code == 403
        assert denied.json() == {"detail": "this token may not write"}
        assert httpx.get(f"{server.address}/v1/town/town-a/metrics", headers=bearer(token)).status_code == 200
    assert post(server, body, "not-a-token-of-this-server-0123").status_code == 401
    assert httpx.post(f"{server.address}/v1/actions", content=body).status_code == 401
    assert httpx.get(f"{server.address}/v1/town/town-a/metrics", headers=bearer(WRITER)).status_code == 403
    assert added(server) == {}


def test_token_scopes_parse_backward_compatibly() -> None:
    tokens = ApiTokens.parse(
        f"{READER}:a,b; write:{WRITER}:*; read,write:{TOWN_A_WRITER}:town-a; {LEGACY}:x:y"
    )
    reader, writer, both, colon_town = tokens.grants
    assert reader.scopes == READ_ONLY
    assert reader.towns == {"a", "b"}
    assert writer.scopes == {Scope.WRITE}
    assert writer.towns is None
    assert both.scopes == {Scope.READ, Scope.WRITE}
    assert both.towns == {"town-a"}
    assert colon_town.scopes == READ_ONLY
    assert colon_town.towns == {"x:y"}
    assert ApiTokens.single(LEGACY).grants[0].scopes == READ_ONLY
    with pytest.raises(TokenConfigError, match="TOKEN:TOWN"):
        ApiTokens.parse(f"write:{WRITER}")


# --- limits -----------------------------------------------------------------------------------------


def test_a_gzip_bomb_is_refused_before_it_is_inflated(refusing_server: Server) -> None:
    server = refusing_server
    bomb = gzip.compress(b"[" + b" " * (256 * 1024 * 1024), compresslevel=1)  # 256 MiB in ~1 MB
    assert len(bomb) < IntakeLimits().max_body_bytes
    answer = post(server, bomb, **{"Content-Encoding": "gzip"})
    assert answer.status_code == 413
    assert "inflated" in answer.json()["detail"]


def test_an_oversize_body_and_too_many_items_are_413(refusing_server: Server) -> None:
    server, limits = refusing_server, IntakeLimits()
    oversize = post(server, b"[" + b" " * limits.max_body_bytes + b"]")
    assert oversize.status_code == 413
    many = post(server, b"[" + b",".join([b"{}"] * (limits.max_items + 1)) + b"]")
    assert many.status_code == 413
    assert str(limits.max_items) in many.json()["detail"]
    assert stored(server.url) == {}


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"{not json", {}, 400),
        (b'{"id": 1}', {}, 400),
        (b"[" * 100_000, {}, 400),
        (b"[]", {"Content-Type": "text/plain"}, 415),
        (b"[]", {"Content-Encoding": "br"}, 415),
        (b"\x1f\x8b not gzip", {"Content-Encoding": "gzip"}, 400),
        (gzip.compress(b"[]")[:-4], {"Content-Encoding": "gzip"}, 400),
        (b"[" + b"9" * 5000 + b"]", {}, 400),
        (b'[{"user_id": "\\ud83d"}, {not json]', {}, 400),
        (b'[{"user_id": "\\ud83d"}, NaN]', {}, 400),
        (b'[{"user_id": "\\ud83d"}, ' + b"[" * 100_000, {}, 400),
        (b'[{"user_id": "\\ud83d"}, "\xed\xa0\xbd"]', {}, 400),
    ],
    ids=[
        *("broken", "object", "deep", "text", "brotli", "not-gzip", "truncated-gzip", "huge-int"),
        *("surrogate-broken", "surrogate-nan", "surrogate-deep", "surrogate-bad-utf8"),
    ],
)
def test_unreadable_bodies_are_4xx(
    refusing_server: Server, body: bytes, headers: dict[str, str], status: int
) -> None:
    answer = post(refusing_server, body, **headers)
    assert answer.status_code == status, answer.text
    assert answer.json()["detail"]


# --- back-pressure --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_writes_beyond_the_in_flight_bound_get_503_with_retry_after(database_url: str) -> None:
    app, client = app_client(database_url, limits=IntakeLimits(max_in_flight=1))
    body = json.dumps(sent_metrics(3)).encode()
    headers = {"Content-Type": "application/json", **bearer(WRITER)}
    async with app.router.lifespan_context(app), client:
        async with app.state.intake.slot():  # another write holds the only slot
            busy = await client.post("/v1/actions", content=body, headers=headers)
        taken = await client.post("/v1/actions", content=body, headers=headers)
    assert busy.status_code == 503
    assert busy.headers["Retry-After"]
    assert taken.json()["stored"] == 3


@pytest.mark.anyio
async def test_an_unreachable_database_is_503_with_retry_after(backend: Any, tmp_path: Path) -> None:
    url = {
        "sqlite": f"sqlite:///{tmp_path / 'missing-directory' / 'metrics.db'}",
        "postgresql": "postgresql://postgres@127.0.0.1:1/nowhere",
    }[backend.name]
    app, client = app_client(url)
    async with app.router.lifespan_context(app), client:
        answer = await client.post(
            "/v1/actions",
            content=json.dumps(sent_metrics(2)).encode(),
            headers={"Content-Type": "application/json", **bearer(WRITER)},
        )
    assert answer.status_code == 503
    assert answer.headers["Retry-After"]


# --- what a 200 means ---------------------------------------------------------------------------


def batches_of(items: list[dict[str, Any]], size: int) -> list[bytes]:
    return [json.dumps(items[start : start + size]).encode() for start in range(0, len(items), size)]


def test_a_retry_after_the_server_was_killed_mid_request_stores_everything_once(database_url: str) -> None:
    items = sent_metrics(12_000)
    batches = batches_of(items, 2_000)
    server = Server(database_url)

    # 1. Killed while the first body is half uploaded.
    server.start()
    half_sent, killed = threading.Event(), threading.Event()

    def halves() -> Iterator[bytes]:
        middle = len(batches[0]) // 2
        yield batches[0][:middle]
        half_sent.set()
        killed.wait(timeout=120)
        yield batches[0][middle:]

    def upload_in_halves() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server is gone: the client must retry
            httpx.post(
                f"{server.address}/v1/actions",
                content=halves(),
                headers={"Content-Type": "application/json", **bearer(WRITER)},
                timeout=120,
            )

    uploader = threading.Thread(target=upload_in_halves)
    uploader.start()
    assert half_sent.wait(timeout=120)
    server.kill()
    killed.set()
    uploader.join(timeout=120)

    # 2. Killed at whatever point the third request of a stream of them has reached.
    server.start()
    headers = {"Content-Type": "application/json", **bearer(WRITER)}
    answered = kill_mid_stream(server, "/v1/actions", batches[1:], headers)
    expected = {"stored": 2_000, "duplicate": 0, "rejected": []}
    assert [answer.json() for answer in answered[:2]] == [expected, expected]

    # 3. The client retries every batch: whatever was committed before counts as a duplicate.
    before = set(stored(database_url))
    assert {item["id"] for body in batches[1:3] for item in json.loads(body)} <= before
    server.start()
    try:
        retried = [post(server, body).json() for body in batches]
    finally:
        server.stop()
    for body, answer in zip(batches, retried, strict=True):
        sent = {item["id"] for item in json.loads(body)}
        assert answer["rejected"] == []
        assert answer["duplicate"] == len(sent & before)
        assert answer["stored"] == len(sent - before)
    assert stored(database_url) == {item["id"]: item for item in items}


# --- from_dict ------------------------------------------------------------------------------------


def test_from_dict_reads_what_to_dict_writes() -> None:
    original = metric(
        metadata={"nested": {"list": [1, 2.5, None, "x"]}},
        error="TimeoutError",
        cache_read_tokens=10,
        cache_write_tokens=5,
        reasoning_tokens=7,
        citizen_id=None,
        id=uuid.uuid4(),
    )
    assert ActionMetric.from_dict(original.to_dict()) == original
    assert ActionMetric.from_dict(json.loads(json.dumps(original.to_dict()))) == original
    optional = {"citizen_id", "metadata", "error", "cache_read_tokens", "cache_write_tokens"}
    optional.add("reasoning_tokens")
    least = {name: value for name, value in metric().to_dict().items() if name not in optional}
    assert ActionMetric.from_dict(least).citizen_id is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"latency_ms": "fast"}, "latency_ms"),
        ({"timestamp": 1_700_000_000}, "timestamp"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"user_id": ""}, "user_id"),
        ({"town_id": None}, "town_id"),
        ({"model": None}, "model"),
        ({"credits_charged": True}, "credits_charged"),
        ({"cache_write_tokens": 10**6}, "cache_write_tokens"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_from_dict_names_the_field_at_fault(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidMetric) as raised:
        ActionMetric.from_dict({**metric().to_dict(), **change})
    assert raised.value.field == field


def test_batches_written_together_count_each_id_for_the_first_batch_that_has_it(database_url: str) -> None:
    stored_before, first_new, second_new = [metric() for _ in range(2)], metric(), metric()
    with MetricsStore(database_url) as store:
        store.emit_batch(stored_before)
        counts = store.emit_batches(
            [
                [stored_before[0], first_new, first_new],  # a stored id, a new one sent twice
                [first_new, second_new, stored_before[1]],  # the first batch's new id, one new, one stored
                [],
            ]
        )
        held = store.query()
    assert counts == [1, 1, 0]
    assert sorted(str(m.id) for m in held) == sorted(
        str(m.id) for m in [*stored_before, first_new, second_new]
    )


def _count_commits(app: Any) -> list[int]:
    """A list that grows by one at each commit of the app's store (its engine's own event)."""
    commits: list[int] = []
    engine = app.state.store._repository.engine.sync_engine
    event.listen(engine, "commit", lambda _connection: commits.append(1))
    return commits


@pytest.mark.anyio
async def test_concurrent_requests_share_commits_and_each_counts_its_own_items(database_url: str) -> None:
    app, client = app_client(database_url)
    items = sent_metrics(40)
    bodies = [items[:10], items[5:20], items[15:30], items[:40]]  # each overlaps the one before
    headers = {"Content-Type": "application/json", **bearer(WRITER)}
    async with app.router.lifespan_context(app), client:
        await app.state.store.open()
        commits = _count_commits(app)
        answers = await asyncio.gather(
            *(
                client.post("/v1/actions", content=json.dumps(body).encode(), headers=headers)
                for body in bodies
            )
        )
    counts = [answer.json() for answer in answers]
    assert all(answer.status_code == 200 for answer in answers), counts
    assert [count["stored"] + count["duplicate"] for count in counts] == [len(body) for body in bodies]
    assert sum(count["stored"] for count in counts) == 40  # each id stored by exactly one request
    assert len(commits) < len(bodies)  # written together
    assert set(stored(database_url)) == {item["id"] for item in items}


@pytest.mark.anyio
@pytest.mark.clickhouse  # which has no transactions: the requests before the refused one are stored
async def test_a_refused_request_in_a_shared_commit_costs_the_others_nothing(database_url: str) -> None:
    from test_ingest import corrupted

    first, refused, last = [metric() for _ in range(3)], [corrupted(metric())], [metric() for _ in range(2)]
    commits = GroupCommit()
    async with AsyncMetricsStore(database_url) as store:
        await store.open()
        answers = await asyncio.gather(
            *(commits.write(store, batch) for batch in (first, refused, last)), return_exceptions=True
        )
        held = {m.id for m in await store.query()}
    assert answers[0] == 3
    assert answers[2] == 2
    assert isinstance(answers[1], DataRejected)
    assert held == {m.id for m in [*first, *last]}


def test_the_async_store_counts_new_ids(database_url: str) -> None:
    import asyncio

    metrics = [metric() for _ in range(5)]

    async def run() -> tuple[int, int]:
        async with AsyncMetricsStore(database_url) as store:
            return await store.emit_batch(metrics[:3]), await store.emit_batch(metrics)

    assert asyncio.run(run()) == (3, 2)
    with MetricsStore(database_url) as store:  # the blocking face, the same method
        assert store.emit_batch([*metrics, metric()]) == 1
