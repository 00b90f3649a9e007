"""A fake LLM provider on 127.0.0.1: OpenAI chat completions and Anthropic messages, for the real clients.

The last user message is a JSON directive saying what the call uses and how it ends, e.g.
`{"input": 120, "output": 30, "cache_read": 40, "cache_write": 20, "reasoning": 10, "fail": 500}`.
Counts are the inclusive totals of the OpenTelemetry GenAI conventions (and of our metric); the
Anthropic answer reports them as Anthropic does, its `input_tokens` EXCLUSIVE of cache reads and writes.
Streams are server-sent events; an OpenAI stream carries usage only when `stream_options.include_usage`.
"""

from __future__ import annotations

import http.server
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_ids = itertools.count(1)


@dataclass(frozen=True)
class Directive:
    """What one fake call uses, read from its prompt."""

    input: int = 100
    output: int = 20
    cache_read: int = 0
    cache_write: int = 0
    reasoning: int = 0
    fail: int | None = None

    @classmethod
    def of(cls, text: str) -> Directive:
        return cls(**json.loads(text))


def directive(**fields: int) -> str:
    """The prompt that makes the fake provider answer with these counts."""
    return json.dumps(fields)


def _last_user_text(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    if isinstance(content, list):  # content blocks
        return "".join(block.get("text", "") for block in content)
    return str(content)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        return None

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length))
        call = Directive.of(_last_user_text(body))
        anthropic = self.path.rstrip("/").endswith("/messages")
        if call.fail is not None:
            self._fail(call.fail, anthropic)
        elif anthropic:
            self._anthropic(body, call)
        else:
            self._openai(body, call)

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_events(self, events: Iterator[tuple[str | None, dict[str, Any] | str]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for name, payload in events:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            prefix = f"event: {name}\n" if name else ""
            self.wfile.write(f"{prefix}data: {data}\n\n".encode())
        self.wfile.flush()
        self.close_connection = True

    def _fail(self, status: int, anthropic: bool) -> None:
        if anthropic:
            kind = "api_error" if status >= 500 else "invalid_request_error"
            self._send_json(status, {"type": "error", "error": {"type": kind, "message": "fake failure"}})
        else:
            self._send_json(
                status, {"error": {"message": "fake failure", "type": "server_error", "code": None}}
            )

    # --- OpenAI ------------------------------------------------------------------------------

    def _openai(self, body: dict[str, Any], call: Directive) -> None:
        response_id = f"chatcmpl-fake{next(_ids):08d}"
        model = body["model"]
        usage = {
            "prompt_tokens": call.input,
            "completion_tokens": call.output,
            "total_tokens": call.input + call.output,
            "prompt_tokens_details": {"cached_tokens": call.cache_read},
            "completion_tokens_details": {"reasoning_tokens": call.reasoning},
        }
        if not body.get("stream"):
            self._send_json(
                200,
                {
                    "id": response_id,
                    "object": "chat.completion",
                    "created": 1_700_000_000,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "fake answer"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        def events() -> Iterator[tuple[str | None, dict[str, Any] | str]]:
            yield None, chunk({"role": "assistant", "content": "fake "}, None)
            yield None, chunk({"content": "answer"}, None)
            yield None, chunk({}, "stop")
            if include_usage:
                yield None, {**chunk({}, None), "choices": [], "usage": usage}
            yield None, "[DONE]"

        self._send_events(events())

    # --- Anthropic ---------------------------------------------------------------------------

    def _anthropic(self, body: dict[str, Any], call: Directive) -> None:
        message_id = f"msg_fake{next(_ids):08d}"
        usage = {
            # Anthropic's input_tokens leave out the tokens read from or written to the cache.
            "input_tokens": call.input - call.cache_read - call.cache_write,
            "cache_read_input_tokens": call.cache_read,
            "cache_creation_input_tokens": call.cache_write,
            "output_tokens": call.output,
        }
        message = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": "fake answer"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not body.get("stream"):
            self._send_json(200, message)
            return

        def events() -> Iterator[tuple[str | None, dict[str, Any] | str]]:
            start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
            yield "message_start", {"type": "message_start", "message": start}
            yield (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            yield (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": "fake answer"},
                },
            )
            yield "content_block_stop", {"type": "content_block_stop", "index": 0}
            yield (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": call.output},
                },
            )
            yield "message_stop", {"type": "message_stop"}

        self._send_events(events())


class FakeProvider:
    """The server, on a free port of 127.0.0.1, answering from a daemon thread until `close()`."""

    def __init__(self) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
