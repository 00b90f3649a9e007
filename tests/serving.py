"""`action-metrics serve` as a real child process, and the tokens the write tests use."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from action_metrics.access import ApiTokens
from action_metrics.http import create_app

SRC = Path(__file__).resolve().parent.parent / "src"
WRITER = "writer-token-0123456789abcdef"
TOWN_A_WRITER = "town-a-writer-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
LEGACY = "legacy-dashboard-token-0123456789"
TOKENS = f"write:{WRITER}:* ; write:{TOWN_A_WRITER}:town-a ; {READER}:*"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def app_client(url: str, **options: Any) -> tuple[FastAPI, httpx.AsyncClient]:
    """The endpoint's app in this process (run its lifespan around the requests) and a client of it."""
    app = create_app(url, tokens=ApiTokens.parse(TOKENS), **options)
    return app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metrics.test")


# --- the server ---------------------------------------------------------------------------------


@dataclass
class Server:
    """`action-metrics serve` in a child process, on a port of its own choosing."""

    url: str
    workers: int = 1
    process: subprocess.Popen[str] | None = None
    address: str = ""

    def start(self) -> None:
        environment = {
            key: value for key, value in os.environ.items() if not key.startswith("ACTION_METRICS_")
        }
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
        environment.update(ACTION_METRICS_API_TOKENS=TOKENS, ACTION_METRICS_API_TOKEN=LEGACY)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "action_metrics",
                "serve",
                "--url",
                self.url,
                "--port",
                "0",
                "--workers",
                f"{self.workers}",
            ],
            stdout=subprocess.DEVNULL,  # uvicorn's access log
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        assert self.process.stderr is not None
        self.address, started = "", 0
        for line in self.process.stderr:  # uvicorn names its port, and each process says it started
            found = re.search(r"Uvicorn running on (http://\S+)", line)
            if found:
                self.address = found[1]
            started += "Application startup complete" in line
            if self.address and started == self.workers:
                break
        assert self.address, "the server did not start"
        assert started == self.workers, f"{started} of {self.workers} server processes started"
        # Keep reading its log, or a full pipe would block the server.
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


@contextmanager
def serving(url: str, workers: int = 1) -> Iterator[Server]:
    server = Server(url, workers)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def kill_mid_stream(
    server: Server, path: str, bodies: Sequence[bytes], headers: Mapping[str, str], *, answers: int = 2
) -> list[httpx.Response]:
    """POST `bodies` to `path` one after another, as a client streaming batches does, and SIGKILL the
    server once `answers` of them are answered: the next request is cut wherever it had got to. The
    answers received."""
    answered: list[httpx.Response] = []
    enough = threading.Event()

    def send_all() -> None:
        with httpx.Client(timeout=120) as client:
            for body in bodies:
                try:
                    answered.append(
                        client.post(f"{server.address}{path}", content=body, headers=dict(headers))
                    )
                except httpx.HTTPError:
                    return
                if len(answered) == answers:
                    enough.set()

    sender = threading.Thread(target=send_all)
    sender.start()
    assert enough.wait(timeout=120), "the server did not answer the first requests"
    server.kill()
    sender.join(timeout=120)
    return answered


def run_node(script: str, **environment: str) -> Any:
    """`script` run by Node (whose built-in `fetch` is the client), with `environment` added; what it
    printed, read as JSON."""
    result = subprocess.run(
        ["node", "-e", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, **environment},
    )
    return json.loads(result.stdout)
