"""What every write over HTTP shares (`POST /v1/actions`, and OTLP's `/v1/traces`): bounded bodies,
gzip, back-pressure, and the idempotent write whose answer counts what was stored.

A 200 means committed: the request's metrics are written in one transaction before the answer, so
a client that timed out retries the same metrics and their ids make the retry harmless. Requests
that arrive while another's transaction commits share the next one (`GroupCommit`): one commit and
one rollup upkeep for all of them, each answered once that transaction has committed.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

from fastapi import HTTPException, Request, status
from pydantic import BaseModel

from action_metrics.charges import InheritedCredits
from action_metrics.errors import (
    DatabaseError,
    DatabaseUnavailable,
    DataRejected,
    MetricInPrunedPeriod,
    SchemaError,
)
from action_metrics.model import ActionMetric
from action_metrics.store import AsyncMetricsStore

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS: Final = "5"
MiB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    """How much one write request may carry, and how many may be in flight at once.

    `max_body_bytes` bounds the body as sent, `max_decoded_bytes` after gzip (checked while
    inflating, so a gzip bomb is refused after at most that much output); `max_items` the metrics
    in one request, so that one request is one transaction of bounded size.
    """

    max_body_bytes: int = 8 * MiB
    max_decoded_bytes: int = 32 * MiB
    max_items: int = 10_000
    max_in_flight: int = 8


GROUP_COMMIT_METRICS: Final = 20_000
"""The most metrics `GroupCommit` puts in one transaction (as many as one of `emit_many`'s); a
single request larger than that still goes alone, whole."""


@dataclass(slots=True)
class _Waiting:
    store: AsyncMetricsStore
    metrics: Sequence[ActionMetric]
    answer: asyncio.Future[int]
    credits: InheritedCredits | None


class GroupCommit:
    """The write requests of one app, committed by one writer task: those that arrive while a
    transaction is committing wait and share the next transaction.

    A request is answered only once the transaction holding its metrics has committed, so a 200
    still means committed; counts are each request's own (an id sent by two requests of one
    transaction is stored for the first, a duplicate for the second). One writer also means that
    SQLite's write lock is never waited for by requests of this process.
    """

    def __init__(self, max_metrics: int = GROUP_COMMIT_METRICS) -> None:
        self.max_metrics = max_metrics
        self._waiting: list[_Waiting] = []
        self._writer: asyncio.Task[None] | None = None

    async def write(
        self,
        store: AsyncMetricsStore,
        metrics: Sequence[ActionMetric],
        credits: InheritedCredits | None = None,
    ) -> int:
        """Commit `metrics` (with whatever else is waiting), the `credits` they may inherit settled
        in the same transaction; how many of their ids were new."""
        if not metrics:
            return 0
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[int] = loop.create_future()
        self._waiting.append(_Waiting(store, metrics, answer, credits))
        if self._writer is None or self._writer.done() or self._writer.get_loop() is not loop:
            self._writer = loop.create_task(self._write_waiting())
        return await answer

    async def _write_waiting(self) -> None:
        while self._waiting:
            group = self._next_group()
            try:
                await self._commit(group)
            except BaseException:  # the writer cancelled (a shutdown): no request may be left waiting
                for waiting in [*group, *self._waiting]:
                    waiting.answer.cancel()
                self._waiting.clear()
                raise

    def _next_group(self) -> list[_Waiting]:
        """The oldest waiting requests for one store, up to `max_metrics` (at least one request); one
        request alone where the store cannot commit batches together (ClickHouse: had a later
        request of a group been refused, the earlier ones, already stored, would have been written
        again alone and counted as duplicates)."""
        first = self._waiting[0]
        group, size = [first], len(first.metrics)
        for waiting in self._waiting[1:] if first.store.batches_commit_together else ():
            if waiting.store is not first.store or size + len(waiting.metrics) > self.max_metrics:
                break
            group.append(waiting)
            size += len(waiting.metrics)
        del self._waiting[: len(group)]
        return group

    async def _commit(self, group: list[_Waiting]) -> None:
        try:
            counts = await group[0].store.emit_batches(
                [waiting.metrics for waiting in group], credits=[waiting.credits for waiting in group]
            )
        except DataRejected as error:
            if len(group) == 1:
                _answer(group[0], error=error)
                return
            # One request's data is refused: each goes alone, so only its own request learns it.
            for waiting in group:
                try:
                    _answer(waiting, await waiting.store.emit_batch(waiting.metrics, credits=waiting.credits))
                except DatabaseError as alone:
                    _answer(waiting, error=alone)
            return
        except Exception as error:
            for waiting in group:
                _answer(waiting, error=error)
            return
        for waiting, count in zip(group, counts, strict=True):
            _answer(waiting, count)


def _answer(waiting: _Waiting, count: int = 0, *, error: BaseException | None = None) -> None:
    """Settle a request's wait, unless it was given up (its client went away: what it sent is
    committed or not all the same, and a retry is harmless)."""
    if waiting.answer.done():
        return
    if error is not None:
        waiting.answer.set_exception(error)
    else:
        waiting.answer.set_result(count)


@dataclass(slots=True)
class Intake:
    """An app's limits, its count of write requests in flight and its writer (`state.intake`)."""

    limits: IntakeLimits = field(default_factory=IntakeLimits)
    in_flight: int = 0
    commits: GroupCommit = field(default_factory=GroupCommit)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Room for one more write request, or 503 at once: a client retries later rather than
        piling bodies up in this process's memory."""
        if self.in_flight >= self.limits.max_in_flight:
            raise busy("the server is taking as many writes as it can")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def intake_of(request: Request) -> Intake:
    intake: Intake = request.app.state.intake
    return intake


def busy(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE, detail, headers={"Retry-After": RETRY_AFTER_SECONDS}
    )


def unavailable(error: DatabaseError) -> HTTPException:
    """503 for a database that cannot answer; the log says why, the client only when to retry."""
    if isinstance(error, DatabaseUnavailable):
        logger.warning("metrics endpoint: database unavailable: %s", error)
        return busy("the metrics database is unavailable")
    if isinstance(error, SchemaError):
        logger.error("metrics endpoint: %s", error)
        return HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "the database schema is not the one this server needs; run action-metrics db upgrade",
        )
    # The database refused the statement (a table dropped under a running server, say): the operator
    # must act, the client can only wait. Logged with its traceback.
    logger.error("metrics endpoint: the database refused the statement: %s", error, exc_info=error)
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the metrics database cannot answer this query")


# --- bodies -----------------------------------------------------------------------------------


def _too_large(what: str, limit: int) -> HTTPException:
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"{what} is over {limit} bytes")


async def read_body(request: Request, limits: IntakeLimits) -> bytes:
    """The request's body, inflated if gzip; 413 as soon as either size passes its limit, 415 for an
    encoding other than gzip, 400 for a broken gzip stream."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip"):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"Content-Encoding {encoding!r}: send gzip or nothing"
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large("the body", limits.max_body_bytes)
    inflater = _Inflater(limits.max_decoded_bytes) if encoding != "identity" else None
    parts: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limits.max_body_bytes:
            raise _too_large("the body", limits.max_body_bytes)
        parts.append(chunk if inflater is None else inflater.feed(chunk))
    if inflater is not None:
        inflater.finish()
    return b"".join(parts)


class _Inflater:
    """gzip inflated a chunk at a time, never more than `limit` bytes in all (members may follow
    one another, as RFC 1952 allows)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.produced = 0
        self.member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> bytes:
        output: list[bytes] = []
        while data:
            try:
                inflated = self.member.decompress(data, self.limit - self.produced + 1)
            except zlib.error as error:
                raise HTTPException(
                    status.HTTP_400_BAD_REQUEST, f"the gzip body is broken: {error}"
                ) from None
            self.produced += len(inflated)
            if self.produced > self.limit:
                raise _too_large("the body inflated", self.limit)
            output.append(inflated)
            if self.member.eof:
                data = self.member.unused_data
                if data:
                    self.member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            else:
                data = self.member.unconsumed_tail
        return b"".join(output)

    def finish(self) -> None:
        if not self.member.eof:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "the gzip body ends before its end")


# --- the idempotent write -----------------------------------------------------------------------


class Rejected(BaseModel):
    """One item not stored: its position in the request, the field at fault (None: the whole item)."""

    index: int
    field: str | None
    error: str


class IntakeAnswer(BaseModel):
    """What became of a request's items: each is stored, a duplicate of one stored before, or rejected."""

    stored: int
    duplicate: int
    rejected: list[Rejected]


async def write(
    intake: Intake,
    store: AsyncMetricsStore,
    accepted: Sequence[tuple[int, ActionMetric]],
    rejected: list[Rejected],
    credits: InheritedCredits | None = None,
) -> IntakeAnswer:
    """Commit the accepted metrics (index in the request, metric) in one transaction, shared with
    concurrent requests (`GroupCommit`), and count them.

    An id sent twice in one request is stored once and counted once as a duplicate. Metrics from
    before the store's prune cut-off are rejected (field `timestamp`) and the rest written. Should
    the database refuse the batch's data otherwise (a constraint the checks here do not know), each
    metric is written on its own and only the refused ones are rejected. `credits`: what the
    metrics may inherit, claimed and charged in the transaction that writes them.
    """
    unique: dict[object, tuple[int, ActionMetric]] = {}
    for index, metric in accepted:
        unique.setdefault(metric.id, (index, metric))
    repeated = len(accepted) - len(unique)
    pending = list(unique.values())
    stored, already_rejected = 0, len(rejected)
    try:
        while pending:
            try:
                stored += await intake.commits.write(store, [metric for _, metric in pending], credits)
                break
            except MetricInPrunedPeriod as error:  # it names them all: the rest goes again at once
                rejected.extend(_rejected(pending[position][0], error) for position in error.indexes)
                out = set(error.indexes)
                pending = [item for position, item in enumerate(pending) if position not in out]
            except DataRejected:
                for index, metric in pending:
                    try:
                        stored += await store.emit_batch([metric], credits=credits)
                    except DataRejected as alone:
                        rejected.append(_rejected(index, alone))
                break
    except DatabaseError as error:
        raise unavailable(error) from error
    refused = len(rejected) - already_rejected
    rejected.sort(key=lambda item: item.index)
    duplicate = len(unique) - stored - refused + repeated
    return IntakeAnswer(stored=stored, duplicate=duplicate, rejected=rejected)


def _rejected(index: int, error: DataRejected) -> Rejected:
    if isinstance(error, MetricInPrunedPeriod):
        return Rejected(index=index, field=error.field, error=error.problem)
    return Rejected(index=index, field=None, error=f"the database refused it: {error.reason}")
