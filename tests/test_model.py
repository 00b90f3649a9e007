"""ActionMetric: validated at construction, each bad field named; the seed's properties and exports."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from conftest import METRIC_FIELDS, metric
from hypothesis import given, settings
from hypothesis import strategies as st

from action_metrics import (
    ACTION_CREDITS,
    MODEL_COSTS_PER_1M,
    REVENUE_PER_CREDIT_USD,
    ActionMetric,
    ActionType,
    InvalidMetric,
    ModelName,
)

LOD4_ON_SONNET: dict[str, Any] = {
    "action_type": "lod4",
    "tokens_in": 500,
    "tokens_out": 300,
    "model": "sonnet",
    "latency_ms": 1000,
    "credits_charged": 100,
}
"""The README's example action."""


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("action_type", ""),
        ("action_type", "LOD3"),
        ("action_type", "lod 3"),
        ("action_type", "x" * 65),
        ("action_type", 3),
        ("user_id", ""),
        ("user_id", "u" * 257),
        ("user_id", "nul\x00inside"),
        ("user_id", "lone \ud800 surrogate"),
        ("user_id", None),
        ("town_id", ""),
        ("town_id", 456),
        ("citizen_id", ""),
        ("citizen_id", "c" * 257),
        ("tokens_in", -1),
        ("tokens_in", 1.5),
        ("tokens_in", "100"),
        ("tokens_in", True),
        ("tokens_in", 2**63),
        ("tokens_out", -5),
        ("tokens_out", 2**64),
        ("credits_charged", -1),
        ("credits_charged", 10.0),
        ("credits_charged", 2**63),
        ("model", ""),
        ("model", "m" * 129),
        ("model", "tab\tinside"),
        ("model", "new\nline"),
        ("model", None),
        ("latency_ms", float("nan")),
        ("latency_ms", float("inf")),
        ("latency_ms", -0.5),
        ("latency_ms", "12"),
        ("latency_ms", None),
        ("timestamp", "2026-01-01"),
        ("timestamp", date(2026, 1, 1)),
        ("timestamp", 1700000000),
        ("metadata", ["not", "a", "dict"]),
        ("metadata", {"when": datetime(2026, 1, 1)}),
        ("metadata", {"bad": float("nan")}),
        ("metadata", {"bad": [1, float("inf")]}),
        ("metadata", {1: "int key"}),
        ("metadata", {"nul": "a\x00b"}),
        ("metadata", {"surrogate": "\udfff"}),
        ("metadata", {"big": "x" * (64 * 1024)}),
        ("metadata", {"set": {1, 2}}),
        ("id", "not-a-uuid"),
        ("cache_read_tokens", -1),
        ("cache_read_tokens", 1.0),
        ("cache_write_tokens", True),
        ("reasoning_tokens", 2**63),
        ("tokens_in", np.True_),
        ("tokens_in", np.int64(-1)),
        ("tokens_out", np.uint64(2**64 - 1)),
        ("credits_charged", np.float64(10.0)),
        ("latency_ms", np.True_),
    ],
)
def test_bad_input_is_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidMetric, match=f"^{field}:") as raised:
        metric(**{field: value})
    assert raised.value.field == field
    assert isinstance(raised.value, ValueError)


def test_deeply_nested_metadata_is_refused() -> None:
    nested: dict[str, Any] = {}
    cursor = nested
    for _ in range(100):
        cursor["next"] = {}
        cursor = cursor["next"]
    with pytest.raises(InvalidMetric, match=r"^metadata: nested deeper"):
        metric(metadata=nested)


@pytest.mark.parametrize(
    "value",
    [0, 2**63 - 1],
)
def test_counts_accept_the_full_64_bit_range(value: int) -> None:
    action = metric(tokens_in=value, tokens_out=value, credits_charged=value)
    assert action.tokens_in == value


def test_numpy_integers_are_integers_made_plain() -> None:
    """Counts computed with NumPy (an `int64` from an array sum) are integers: anything with `__index__`."""
    action = metric(
        tokens_in=np.int64(7),
        tokens_out=np.uint32(3),
        credits_charged=np.int16(10),
        latency_ms=np.int64(12),
        cache_read_tokens=np.int64(2),
        reasoning_tokens=np.int8(1),
    )
    counts = (action.tokens_in, action.tokens_out, action.credits_charged)
    kinds = (action.cache_read_tokens, action.cache_write_tokens, action.reasoning_tokens)
    assert (counts, kinds, action.latency_ms) == ((7, 3, 10), (2, 0, 1), 12.0)
    assert {type(value) for value in (*counts, *kinds)} == {int}
    assert json.loads(json.dumps(action.to_dict()))["tokens_in"] == 7
    assert action.charged(np.int64(4)).credits_charged == 4


def test_latencies_of_any_real_number_type_are_floats() -> None:
    """A latency from a NumPy float32 array or a Fraction is a latency (float64 is a float already)."""
    for value, expected in [(np.float32(12.5), 12.5), (Fraction(3, 4), 0.75), (np.float16(2.0), 2.0)]:
        latency = metric(latency_ms=value).latency_ms
        assert (latency, type(latency)) == (expected, float)
    for bad in (np.float32("nan"), np.float32(-1.0), Decimal("1.5"), np.bool_(False)):
        with pytest.raises(InvalidMetric, match=r"^latency_ms:"):
            metric(latency_ms=bad)


def test_sub_millisecond_latency_is_kept() -> None:
    assert metric(latency_ms=0.037).latency_ms == 0.037
    assert metric(latency_ms=12).latency_ms == 12.0


def test_real_provider_model_names_and_custom_action_types_are_accepted() -> None:
    for model in ["claude-sonnet-4-5@20250929", "openai/gpt-4o-mini", "Meta Llama 3.1 (70B)"]:
        assert metric(model=model).model == model
    assert metric(action_type="agent.plan-step_2").action_type == "agent.plan-step_2"


def test_enums_are_stored_as_their_plain_values() -> None:
    action = metric(action_type=ActionType.LOD5, model=ModelName.OPUS)
    assert action.action_type == "lod5"
    assert type(action.action_type) is str
    assert type(action.model) is str


def test_timestamp_defaults_to_now_in_utc() -> None:
    before = datetime.now(UTC)
    action = metric()
    assert before <= action.timestamp <= datetime.now(UTC)
    assert action.timestamp.tzinfo is UTC


def test_a_naive_timestamp_is_local_time() -> None:
    naive = datetime(2026, 3, 29, 1, 30)
    assert metric(timestamp=naive).timestamp == naive.astimezone(UTC)


def test_an_aware_timestamp_is_converted_to_utc() -> None:
    aware = datetime(2026, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=-8)))
    stamped = metric(timestamp=aware).timestamp
    assert stamped == aware
    assert stamped.utcoffset() == timedelta(0)
    assert stamped.hour == 20


@pytest.mark.parametrize(
    "moment",
    [datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)],
    ids=["first instant", "last instant"],
)
def test_the_first_and_last_instant_a_datetime_holds_are_refused_naming_timestamp(moment: datetime) -> None:
    """PostgreSQL's driver writes them as -infinity and infinity, which SQL readers cannot bucket."""
    with pytest.raises(InvalidMetric) as raised:
        metric(timestamp=moment)
    assert raised.value.field == "timestamp"
    with pytest.raises(InvalidMetric) as raised:
        ActionMetric.from_dict({**metric().to_dict(), "timestamp": moment.isoformat()})
    assert raised.value.field == "timestamp"
    step = timedelta(microseconds=1)
    inside = moment + step if moment.year == 1 else moment - step
    assert metric(timestamp=inside).timestamp == inside


def test_a_wire_timestamp_may_end_in_a_lower_case_z() -> None:
    """RFC 3339 allows "z" for "Z"; `datetime.fromisoformat` does not."""
    sent = {**metric().to_dict(), "timestamp": "2026-11-28T09:00:00.5z"}
    assert ActionMetric.from_dict(sent).timestamp == datetime(2026, 11, 28, 9, 0, 0, 500000, tzinfo=UTC)


def test_the_seed_properties() -> None:
    action = metric(**LOD4_ON_SONNET)
    assert action.total_tokens == 800
    cost = (500 * Decimal("3.00") + 300 * Decimal("15.00")) / Decimal(1_000_000)
    assert action.estimated_cost_usd == pytest.approx(float(cost), abs=1e-15)
    assert action.revenue_usd == pytest.approx(100 * 0.006)
    assert action.gross_margin == pytest.approx((0.6 - float(cost)) / 0.6)


def test_margin_is_none_without_revenue_or_without_a_price() -> None:
    assert metric(credits_charged=0).gross_margin is None
    unpriced = metric(model="mystery")
    assert unpriced.estimated_cost_usd is None
    assert unpriced.gross_margin is None


def test_to_dict_is_json_safe_and_round_trips_the_fields() -> None:
    action = metric(**LOD4_ON_SONNET, metadata={"lod": 4, "speaker": "alice"})
    data = json.loads(json.dumps(action.to_dict()))
    assert data["id"] == str(action.id)
    assert datetime.fromisoformat(data["timestamp"]) == action.timestamp
    assert data["metadata"] == {"lod": 4, "speaker": "alice"}
    assert data["total_tokens"] == 800
    for key, value in {**METRIC_FIELDS, **LOD4_ON_SONNET}.items():
        assert data[key] == value


@pytest.mark.parametrize(
    ("kinds", "field"),
    [
        ({"cache_read_tokens": 501}, "cache_read_tokens"),
        ({"cache_write_tokens": 501}, "cache_write_tokens"),
        ({"cache_read_tokens": 300, "cache_write_tokens": 201}, "cache_write_tokens"),
        ({"reasoning_tokens": 301}, "reasoning_tokens"),
    ],
)
def test_token_kinds_are_parts_of_the_totals(kinds: dict[str, int], field: str) -> None:
    # Inclusive totals, as in the OpenTelemetry GenAI conventions: 500 in, 300 out.
    with pytest.raises(InvalidMetric, match=f"^{field}:.*tokens_") as raised:
        metric(**LOD4_ON_SONNET, **kinds)
    assert raised.value.field == field
    whole = metric(**LOD4_ON_SONNET, cache_read_tokens=300, cache_write_tokens=200, reasoning_tokens=300)
    assert (whole.cache_read_tokens, whole.cache_write_tokens, whole.reasoning_tokens) == (300, 200, 300)
    assert metric(**LOD4_ON_SONNET).cache_read_tokens == 0  # none by default


def test_token_kinds_go_out_as_the_genai_usage_attributes() -> None:
    action = metric(**LOD4_ON_SONNET, cache_read_tokens=120, cache_write_tokens=30, reasoning_tokens=64)
    attributes = action.to_otel_span()
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 120
    assert attributes["gen_ai.usage.cache_write.input_tokens"] == 30
    assert attributes["gen_ai.usage.reasoning.output_tokens"] == 64
    assert attributes["gen_ai.usage.input_tokens"] == 500  # inclusive
    data = json.loads(json.dumps(action.to_dict()))
    assert (data["cache_read_tokens"], data["cache_write_tokens"], data["reasoning_tokens"]) == (120, 30, 64)
    assert "gen_ai.usage.cache_read.input_tokens" not in metric(**LOD4_ON_SONNET).to_otel_span()


def test_otel_attributes_follow_the_genai_conventions() -> None:
    attributes = metric(**LOD4_ON_SONNET).to_otel_span()
    assert attributes["gen_ai.request.model"] == "sonnet"
    assert attributes["gen_ai.usage.input_tokens"] == 500
    assert attributes["gen_ai.usage.output_tokens"] == 300
    assert attributes["action.type"] == "lod4"
    assert attributes["action.credits"] == 100
    assert attributes["action.citizen_id"] == METRIC_FIELDS["citizen_id"]
    assert all(value is not None for value in attributes.values())
    assert "action.citizen_id" not in metric(citizen_id=None).to_otel_span()


def test_the_seed_constants() -> None:
    assert MODEL_COSTS_PER_1M["haiku"] == (0.25, 1.25)
    assert MODEL_COSTS_PER_1M["sonnet"] == (3.00, 15.00)
    assert MODEL_COSTS_PER_1M["opus"] == (15.00, 75.00)
    assert MODEL_COSTS_PER_1M["template"] == MODEL_COSTS_PER_1M["cached"] == (0.0, 0.0)
    assert {k: ACTION_CREDITS[k] for k in ("lod3", "lod4", "lod5", "branch", "inhabit", "force")} == {
        "lod3": 10,
        "lod4": 100,
        "lod5": 400,
        "branch": 150,
        "inhabit": 100,
        "force": 50,
    }
    assert REVENUE_PER_CREDIT_USD == 0.006
    assert {a.value for a in ActionType} == {
        "lod3", "lod4", "lod5", "branch", "inhabit", "force", "dialogue", "greet", "gossip", "trade", "solo"
    }  # fmt: skip
    assert {m.value for m in ModelName} == {"haiku", "sonnet", "opus", "template", "cached"}


def test_metrics_are_values() -> None:
    action = metric()
    with pytest.raises(AttributeError):
        action.tokens_in = 5  # type: ignore[misc]
    assert action == ActionMetric(**METRIC_FIELDS, timestamp=action.timestamp, id=action.id)
    assert action != metric(timestamp=action.timestamp)  # another id: another action


FLAT_TEXT = (
    st.text(st.characters(codec=None), max_size=12)
    | st.text(st.characters(max_codepoint=127), max_size=12)  # ASCII: written by orjson, when installed
    | st.sampled_from(["a\x00", "\udfff", "é", "", '\x7f\x1f\b\f\n\r\t"\\/'])
)


@settings(max_examples=400, deadline=None)
@given(
    metadata=st.dictionaries(
        FLAT_TEXT, FLAT_TEXT | st.booleans() | st.none() | st.integers(-(2**70), 2**70), max_size=6
    )
)
def test_flat_metadata_is_kept_unless_it_holds_nul_or_a_lone_surrogate(metadata: dict[str, Any]) -> None:
    texts = [*metadata, *(value for value in metadata.values() if isinstance(value, str))]
    storable = all("\x00" not in text and not any(0xD800 <= ord(c) <= 0xDFFF for c in text) for text in texts)
    if not storable:
        with pytest.raises(InvalidMetric, match=r"^metadata: "):
            metric(metadata=metadata)
        return
    made = metric(metadata=metadata)
    assert made.metadata == metadata
    assert made.metadata_json == json.dumps(metadata, ensure_ascii=False, separators=(",", ":"))


def test_a_metric_charged_other_credits_keeps_everything_else() -> None:
    original = metric(credits_charged=0, metadata={"trace_id": "ab"}, cache_read_tokens=3)
    charged = original.charged(25)
    assert charged == dataclasses.replace(original, credits_charged=25)  # built and checked anew
    assert charged.metadata_json == original.metadata_json
    assert original.credits_charged == 0
    for bad in (-1, 2**63, 1.5, True):
        with pytest.raises(InvalidMetric) as raised:
            original.charged(bad)  # type: ignore[arg-type]
        assert raised.value.field == "credits_charged"
