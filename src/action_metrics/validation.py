"""Field checks shared by metrics, filters and prices: each names the field it rejects."""

from __future__ import annotations

import json
import math
import numbers
import operator
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from action_metrics.errors import InvalidMetric, InvalidValue

try:
    from orjson import JSONEncodeError as _OrjsonError
    from orjson import dumps as _orjson_dumps
except ImportError:  # orjson comes with the server extra; without it the standard library writes
    _orjson_dumps = None  # type: ignore[assignment]

MAX_INT64: Final = 2**63 - 1
MAX_ID_LENGTH: Final = 256
MAX_MODEL_LENGTH: Final = 128
MAX_METADATA_BYTES: Final = 64 * 1024
MAX_METADATA_DEPTH: Final = 32
MAX_LATENCY_MS: Final = 1e15
"""About 31,700 years: anything longer is a broken clock, and sums of such values could overflow."""
ACTION_TYPE_PATTERN: Final = r"[a-z0-9_.\-]{1,64}"
"""What an action type is (matched whole): the check here, and the endpoint's `action_type` parameter."""
_ACTION_TYPE: Final = re.compile(ACTION_TYPE_PATTERN)


def shown(value: object) -> str:
    """A value for an error message, whatever it is: repr() cannot print an int of more than
    4300 digits, would copy a huge string whole, and may recurse without end into a container."""
    if isinstance(value, str):
        return repr(value[:80]) + ("..." if len(value) > 80 else "")
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if value is None or isinstance(value, int | float):
        return repr(value)
    return f"a {type(value).__name__}"


def storable_text(value: str) -> bool:
    """Whether both databases can store the string exactly: no NUL and no lone surrogate."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_MAX_REMEMBERED_ACTION_TYPES: Final = 4096
_valid_action_types: set[str] = set()
"""Action types that passed the check (they are few; a span received names one each)."""


def check_action_type(value: object) -> str:
    if type(value) is str and value in _valid_action_types:
        return value
    if not isinstance(value, str) or not _ACTION_TYPE.fullmatch(value):
        raise InvalidMetric(
            "action_type",
            f"expected 1-64 characters of a-z, 0-9, '_', '-', '.', got {shown(value)}",
        )
    checked = str(value)
    if len(_valid_action_types) < _MAX_REMEMBERED_ACTION_TYPES:
        _valid_action_types.add(checked)
    return checked


def check_model(value: object, error: type[InvalidValue] = InvalidMetric) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_MODEL_LENGTH:
        raise error("model", f"expected 1-{MAX_MODEL_LENGTH} characters, got {shown(value)}")
    if not value.isprintable() or not storable_text(value):
        raise error("model", f"expected printable characters only, got {shown(value)}")
    return str(value)


def check_id(field_name: str, value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_LENGTH:
        raise InvalidMetric(field_name, f"expected 1-{MAX_ID_LENGTH} characters, got {shown(value)}")
    if not storable_text(value):
        raise InvalidMetric(field_name, "must be valid Unicode without NUL characters")
    return str(value)


MAX_ERROR_LENGTH: Final = 256


def check_error(value: object) -> str:
    """What failed: the error's type name (`TimeoutError`, `openai.RateLimitError`)."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ERROR_LENGTH:
        raise InvalidMetric("error", f"expected None or 1-{MAX_ERROR_LENGTH} characters, got {shown(value)}")
    if not storable_text(value):
        raise InvalidMetric("error", "must be valid Unicode without NUL characters")
    return str(value)


def as_integer(value: object) -> int | None:
    """`value` as a plain int when it is an integer of any kind (NumPy's `int64`, anything with
    `__index__`); None for anything else. A bool is no count, NumPy's (`dtype.kind` "b") neither."""
    if type(value) is int:
        return value
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b":
        return None
    try:
        return int(operator.index(value))  # type: ignore[arg-type]
    except TypeError:
        return None


def check_flag(field_name: str, value: object, error: type[InvalidValue]) -> bool:
    """A yes-or-no argument: True or False only, since `bool("false")` is True and would run the
    other mode without a word."""
    if value is True or value is False:
        return value
    kind = type(value)
    got = (
        shown(value)
        if kind in (str, int, float) or value is None
        else f"a {kind.__module__}.{kind.__qualname__}"
    )
    raise error(field_name, f"expected True or False, got {got}")


def check_count(field_name: str, value: object, error: type[InvalidValue] = InvalidMetric) -> int:
    count = as_integer(value)
    if count is None:
        raise error(field_name, f"expected an integer, got {type(value).__name__}")
    if not 0 <= count <= MAX_INT64:
        raise error(field_name, f"expected 0 <= {field_name} < 2**63, got {shown(count)}")
    return count


def check_token_kinds(
    tokens_in: int, tokens_out: int, cache_read: object, cache_write: object, reasoning: object
) -> tuple[int, int, int]:
    """The token kinds of the OpenTelemetry GenAI conventions, which are parts of the totals: cache reads
    and writes of `tokens_in`, reasoning of `tokens_out`."""
    cache_read = check_count("cache_read_tokens", cache_read)
    cache_write = check_count("cache_write_tokens", cache_write)
    reasoning = check_count("reasoning_tokens", reasoning)
    if cache_read + cache_write > tokens_in:
        field = "cache_read_tokens" if cache_read > tokens_in else "cache_write_tokens"
        raise InvalidMetric(
            field,
            f"cache reads ({cache_read}) and writes ({cache_write}) are part of tokens_in ({tokens_in}) "
            "and cannot exceed it (totals are inclusive, as in the OpenTelemetry GenAI conventions)",
        )
    if reasoning > tokens_out:
        raise InvalidMetric(
            "reasoning_tokens",
            f"reasoning tokens ({reasoning}) are part of tokens_out ({tokens_out}) and cannot exceed it",
        )
    return cache_read, cache_write, reasoning


def check_latency(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        integer = as_integer(value)
        if integer is not None:
            value = integer
        elif isinstance(value, numbers.Real) and getattr(getattr(value, "dtype", None), "kind", None) != "b":
            value = float(value)  # NumPy's float32 (time.perf_counter deltas kept in an array), a Fraction
        else:
            raise InvalidMetric("latency_ms", f"expected a number, got {type(value).__name__}")
    try:
        latency = float(value)
    except OverflowError:  # an int beyond the range of a float
        raise InvalidMetric(
            "latency_ms", f"expected a number from 0 to {MAX_LATENCY_MS:g}, got {shown(value)}"
        ) from None
    if not math.isfinite(latency) or not 0 <= latency <= MAX_LATENCY_MS:
        raise InvalidMetric("latency_ms", f"expected a number from 0 to {MAX_LATENCY_MS:g}, got {value}")
    return latency


def as_utc(field_name: str, value: object, error: type[InvalidValue] = InvalidMetric) -> datetime:
    """An aware UTC datetime; a naive one is read as local time, as `datetime.astimezone()` does."""
    if not isinstance(value, datetime):
        raise error(field_name, f"expected a datetime, got {type(value).__name__}")
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError, OSError) as problem:
        raise error(field_name, f"cannot be expressed in UTC: {problem}") from None


def _check_json(value: object, path: str, depth: int) -> None:
    """Reject what JSON (as PostgreSQL's jsonb stores it) would not give back equal."""
    if depth > MAX_METADATA_DEPTH:
        raise InvalidMetric("metadata", f"nested deeper than {MAX_METADATA_DEPTH} levels at {path}")
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidMetric("metadata", f"{path} is {value}, which JSON cannot hold")
    elif isinstance(value, str):
        if not storable_text(value):
            raise InvalidMetric("metadata", f"{path} holds NUL or a lone surrogate")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]", depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not storable_text(key):
                raise InvalidMetric("metadata", f"keys must be valid strings, got {shown(key)} at {path}")
            _check_json(item, f"{path}.{key}", depth + 1)
    else:
        raise InvalidMetric("metadata", f"{path} is a {type(value).__name__}, not JSON")


_compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
"""One encoder, made once: `json.dumps` with options builds a new one per call."""


def json_text(value: object) -> str:
    """The JSON text the store writes: compact UTF-8, the same from every write path and backend.

    PostgreSQL's jsonb keeps numbers as NUMERIC and prints them without an exponent, so `1e+23`
    would come back as the integer 10**23, not the float 1e23. Such floats are written out in full
    with a `.0`, which reads back as the same float from jsonb and from SQLite's text alike.
    """
    text = _compact_json(value)
    return _positional_json(value) if "e+" in text else text


def _positional_json(value: object) -> str:
    if isinstance(value, float) and "e+" in (text := repr(value)):
        return f"{Decimal(text):f}.0"
    if isinstance(value, dict):
        return (
            "{"
            + ",".join(f"{_compact_json(key)}:{_positional_json(item)}" for key, item in value.items())
            + "}"
        )
    if isinstance(value, list):
        return "[" + ",".join(_positional_json(item) for item in value) + "]"
    return _compact_json(value)


def _flat_and_plain(metadata: dict[Any, Any]) -> bool:
    """Text keys to ASCII text without NUL, bools, None or ints: what `_check_json` would accept at
    once (the metadata a span or an HTTP writer sends, mostly), told in one pass."""
    for key, item in metadata.items():
        if type(key) is not str or not (key.isascii() and "\x00" not in key):
            return False
        if type(item) is str:
            if not (item.isascii() and "\x00" not in item):
                return False
        elif item is not None and item is not True and item is not False and type(item) is not int:
            return False
    return True


def check_metadata(value: object) -> tuple[dict[str, Any], str]:
    """The metadata as a dict and as its JSON text, which is what the store writes."""
    if not isinstance(value, Mapping):
        raise InvalidMetric("metadata", f"expected a dict, got {type(value).__name__}")
    if not value:
        return {}, "{}"
    metadata = dict(value)
    if _flat_and_plain(metadata) and (encoded := _flat_json(metadata)) is not None:
        if len(encoded) > MAX_METADATA_BYTES:
            raise InvalidMetric("metadata", f"serialises to more than {MAX_METADATA_BYTES} bytes")
        return metadata, encoded.decode()
    _check_json(metadata, "metadata", 0)
    try:
        text = json_text(metadata)
    except ValueError as problem:  # an int of more digits than Python converts to text
        raise InvalidMetric("metadata", f"cannot be written as JSON: {problem}") from None
    if len(text.encode("utf-8")) > MAX_METADATA_BYTES:
        raise InvalidMetric("metadata", f"serialises to more than {MAX_METADATA_BYTES} bytes")
    return metadata, text


def _flat_json(metadata: dict[str, Any]) -> bytes | None:
    """`json_text` of flat, plain metadata (ASCII, no floats) as UTF-8, by orjson when installed: the
    same text (tests/test_model.py compares them) in a tenth of the time, made once per metric.
    None when orjson is absent or cannot write it (an int beyond 64 bits): `json_text` then."""
    if _orjson_dumps is None:
        return None
    try:
        return _orjson_dumps(metadata)
    except _OrjsonError:
        return None
