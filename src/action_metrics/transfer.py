"""`action-metrics db copy`: move a store to another database (SQLite, PostgreSQL or ClickHouse, in
any direction), its prices first and then its raw actions in batches, resumably.

The actions are read in (timestamp, id) order, a batch at a time, each batch one insert. A
destination that keeps checkpoints (ClickHouse: `copy_checkpoints`, schema version 3) records the
last action sent after each batch, and a copy run again starts after it; a crash between the
insert and the checkpoint re-sends that batch, which counts once (ReplacingMergeTree, read with
FINAL). Into SQLite or PostgreSQL a copy run again starts from the first action and every action
already there is skipped by its id (`ON CONFLICT DO NOTHING`): nothing counts twice, but the source
is read again. A finished copy run again brings what was written to the source since, as long as
it is newer than the last action copied: stop the source's writers before the copy (or point them
at the destination) so that no late action is left behind.

Raw actions, prices and credit claims (which call carries an action's credits over OTLP) are
copied, never rollups: a source pruned by `db prune` (its actions
before the cut-off survive only as rollup totals) is refused unless `skip_pruned_period`; then the
destination records the cut-off, and what needs actions from before it raises `RawRowsPruned`.
A pruned destination refuses actions from before its own cut-off (`MetricInPrunedPeriod`), so a
source holding some is refused too (`DestinationPruned`) unless `skip_pruned_period`; then the copy
starts at the later of the two cut-offs. A price the destination had set by hand for a model from
the same instant as one of the source's, but different, is refused (`PriceConflict`): the copy
would overwrite it; so is a price the pruned destination cannot take, one starting inside a UTC
day it pruned (`PriceInPrunedDestination`). Every refusal comes before anything is written, and
removes the destination's SQLite file if the copy created it.
"""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

from action_metrics.aggregate import Aggregate
from action_metrics.dialects import display_url, resolve_url
from action_metrics.errors import (
    DestinationPruned,
    PriceConflict,
    PriceInPrunedDestination,
    SourcePruned,
    UnsupportedDatabase,
)
from action_metrics.pricing import BEGINNING_OF_TIME, MODEL_COSTS_PER_1M, ModelPrice, exact
from action_metrics.query import CopyCheckpoint, CopyPosition, MetricFilter
from action_metrics.store import Repository, repository_for

DEFAULT_COPY_BATCH: Final = 10_000
"""Actions per read and per insert: one ClickHouse part (or one SQL transaction) per batch."""

_LAST_ID: Final = uuid.UUID(int=(1 << 128) - 1)
"""The greatest id in every database's order: a position at it is after every action of its instant."""


@runtime_checkable
class Checkpoints(Protocol):
    """A destination that remembers how far a copy into it got (ClickHouse's repository)."""

    async def copy_checkpoint(self, source: str) -> CopyCheckpoint | None: ...
    async def save_copy_checkpoint(self, checkpoint: CopyCheckpoint) -> None: ...


@dataclass(frozen=True, slots=True)
class CopyProgress:
    """Actions sent by this run so far, of `total` found after the resume point when it began."""

    sent: int
    total: int
    batches: int


@dataclass(frozen=True, slots=True)
class CopyResult:
    """What a copy did. `resumed_after`: the checkpoint it started after (None: from the first
    action); `sent`: actions this run wrote, those the destination did not hold yet (run again, 0);
    `copied`: the source's actions up to where the copy got, by every run into a checkpointing
    destination, else by this run; `pruned_before`: the source's prune cut-off, when skipped."""

    source: str
    destination: str
    sent: int
    copied: int
    resumed_after: CopyPosition | None
    model_prices: int
    credit_prices: int
    destination_only_prices: tuple[ModelPrice, ...]
    """Model prices the destination had and the source has not: they price the copied actions too."""
    pruned_before: datetime | None
    credit_claims: int = 0
    """Credit claims the destination did not have (SQLite and PostgreSQL keep them; ClickHouse in
    its server's memory, so none are copied to or from it)."""


def _source_url(url: str) -> str:
    """The source's URL, refused if it is a SQLite file that does not exist (a store would create it)."""
    resolved = resolve_url(url)
    if resolved.get_backend_name() == "sqlite":
        path = resolved.database
        if not path or path == ":memory:" or not Path(path).is_file():
            raise UnsupportedDatabase(f"the source {display_url(resolved)} is not a SQLite file that exists")
    return url


_SQLITE_COMPANIONS: Final = ("-journal", "-wal", "-shm")


def _files_a_store_would_create(url: str) -> tuple[Path, ...]:
    """The SQLite file at `url` and its journal, WAL and shared-memory files, if the file is not there
    yet (opening a store creates and migrates it), but none that exists already: what a copy refused
    before writing anything removes. None for other databases, nor for a SQLite URI filename."""
    resolved = resolve_url(url)
    path = resolved.database
    if resolved.get_backend_name() != "sqlite" or not path or path == ":memory:" or "uri" in resolved.query:
        return ()
    if Path(path).exists():
        return ()
    files = (Path(path), *(Path(path + suffix) for suffix in _SQLITE_COMPANIONS))
    return tuple(file for file in files if not file.exists())


def _price_key(price: ModelPrice) -> tuple[str, datetime]:
    return price.model, price.effective_from


def _charged(price: ModelPrice) -> tuple[Decimal, ...]:
    """What a price charges per 1M input, output, cache read and cache write tokens (a cache price
    not set is the input price): two prices charging the same are the same price."""
    return (
        price.input_per_1m,
        price.output_per_1m,
        price.input_per_1m if price.cache_read_per_1m is None else price.cache_read_per_1m,
        price.input_per_1m if price.cache_write_per_1m is None else price.cache_write_per_1m,
    )


def _seeded(price: ModelPrice) -> bool:
    """A price every new store holds (the seed's, from the beginning of time), not one set by hand."""
    seed = MODEL_COSTS_PER_1M.get(price.model)
    if seed is None or price.effective_from != BEGINNING_OF_TIME:
        return False
    input_price, output_price = exact(seed[0]), exact(seed[1])
    return _charged(price) == (input_price, output_price, input_price, input_price)


def _amount(value: Decimal) -> str:
    return f"{value.normalize():f}"


def _shown(price: ModelPrice) -> str:
    cache = [
        f"cache {kind} {_amount(value)}"
        for kind, value in (("read", price.cache_read_per_1m), ("write", price.cache_write_per_1m))
        if value is not None
    ]
    more = f" ({', '.join(cache)})" if cache else ""
    amounts = f"{_amount(price.input_per_1m)} / {_amount(price.output_per_1m)}"
    return f"{amounts} USD per 1M input / output tokens{more}"


def _set_command(price: ModelPrice, url: str) -> str:
    """The `prices set` command that gives the store at `url` this price."""
    cache = "".join(
        f" --cache-{kind} {_amount(value)}"
        for kind, value in (("read", price.cache_read_per_1m), ("write", price.cache_write_per_1m))
        if value is not None
    )
    return (
        f"action-metrics prices set {shlex.quote(price.model)} --input {_amount(price.input_per_1m)} "
        f"--output {_amount(price.output_per_1m)}{cache} --from {price.effective_from.isoformat()} "
        f"--url {shlex.quote(url)}"
    )


def _refuse_overwriting_hand_set_prices(
    copied: Sequence[ModelPrice], held: Sequence[ModelPrice], source_name: str, destination_name: str
) -> None:
    """`PriceConflict` if a price the copy writes would replace a different one the destination had
    set by hand for the same model from the same instant. The same price passes: run again, a copy
    writes its prices again."""
    writes = {_price_key(price): price for price in copied}
    conflicts = [
        (kept, writes[_price_key(kept)])
        for kept in held
        if kept.source == "manual"
        and not _seeded(kept)
        and _price_key(kept) in writes
        and _charged(kept) != _charged(writes[_price_key(kept)])
    ]
    if conflicts:
        kept, price = conflicts[0]
        raise PriceConflict(
            destination_name,
            source_name,
            kept.model,
            kept.effective_from,
            _shown(kept),
            _shown(price),
            take_source=_set_command(price, destination_name),
            others=len(conflicts) - 1,
        )


async def _open(url: str) -> Repository:
    repository = repository_for(resolve_url(url))()
    try:
        await repository.ensure_schema()
    except BaseException:
        await repository.close()
        raise
    return repository


async def copy_store(
    source_url: str,
    destination_url: str,
    *,
    batch_size: int = DEFAULT_COPY_BATCH,
    skip_pruned_period: bool = False,
    progress: Callable[[CopyProgress], None] | None = None,
) -> CopyResult:
    """Copy the prices, then the raw actions, of the store at `source_url` into `destination_url`
    (see the module). `progress` is called once before the first batch and after each one."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    source_name = display_url(resolve_url(_source_url(source_url)))
    destination_name = display_url(resolve_url(destination_url))
    if source_name == destination_name:
        raise UnsupportedDatabase(f"the source and the destination are the same database: {source_name}")
    created = _files_a_store_would_create(destination_url)
    source = await _open(source_url)
    try:
        refused = True  # until the first write; from then on a new destination is the copy's to resume
        try:
            destination = await _open(destination_url)
            try:
                plan = await _plan(
                    source, destination, source_name, destination_name, skip_pruned_period=skip_pruned_period
                )
                refused = False
                return await _copy(
                    source, destination, source_name, destination_name, batch_size, plan, progress=progress
                )
            finally:
                await destination.close()
        finally:
            if refused:
                for file in created:
                    file.unlink(missing_ok=True)
    finally:
        await source.close()


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a copy writes, decided before it writes anything: the prune cut-off it starts at (None:
    from the first action) and the source's model prices, manual ones first."""

    cutoff: datetime | None
    model_prices: tuple[ModelPrice, ...]


async def _plan(
    source: Repository,
    destination: Repository,
    source_name: str,
    destination_name: str,
    *,
    skip_pruned_period: bool,
) -> _Plan:
    """Every refusal of a copy, before it writes anything: a pruned source or destination, a price
    set by hand in the destination that the source's would overwrite, a price the pruned destination
    cannot take (one starting inside a UTC day it pruned)."""
    cutoff = await source.raw_kept_from()
    if cutoff is not None and not skip_pruned_period:
        raise SourcePruned(source_name, cutoff)
    refused_before = await destination.raw_kept_from()
    if refused_before is not None and (cutoff is None or cutoff < refused_before):
        if not skip_pruned_period:
            first = await source.read_after(None, 1)
            if first and first[0].timestamp < refused_before:
                raise DestinationPruned(destination_name, refused_before, source_name, first[0].timestamp)
        else:
            cutoff = refused_before
    # Manual prices first: writing one removes the catalogue's prices of its model from its start
    # on, which the source's catalogue prices never reach (they all begin before it).
    model_prices = sorted(await source.model_prices(), key=lambda price: price.source != "manual")
    _refuse_overwriting_hand_set_prices(
        model_prices, await destination.model_prices(), source_name, destination_name
    )
    if refused_before is not None:
        starts: list[tuple[str | None, datetime]] = [(p.model, p.effective_from) for p in model_prices]
        starts += [(None, price.effective_from) for price in await source.credit_prices()]
        for model, start in starts:
            refusing = await destination.price_start_refused(start, model)
            if refusing is not None:
                raise PriceInPrunedDestination(destination_name, refusing, source_name, model, start)
    return _Plan(cutoff, tuple(model_prices))


async def _copy(
    source: Repository,
    destination: Repository,
    source_name: str,
    destination_name: str,
    batch_size: int,
    plan: _Plan,
    *,
    progress: Callable[[CopyProgress], None] | None,
) -> CopyResult:
    cutoff, model_prices = plan.cutoff, plan.model_prices
    for price in model_prices:
        await destination.set_model_price(price)
    credit_prices = await source.credit_prices()
    for credit_price in credit_prices:
        await destination.set_credit_price(credit_price)
    copied_keys = {_price_key(price) for price in model_prices}
    destination_only = tuple(p for p in await destination.model_prices() if _price_key(p) not in copied_keys)
    if cutoff is not None:
        await destination.record_raw_kept_from(cutoff)

    checkpoints = destination if isinstance(destination, Checkpoints) else None
    checkpoint = await checkpoints.copy_checkpoint(source_name) if checkpoints is not None else None
    resumed_after = position = checkpoint.position if checkpoint is not None else None
    if cutoff is not None and (position is None or position.timestamp < cutoff):
        position = CopyPosition(cutoff - timedelta(microseconds=1), _LAST_ID)  # from the cut-off on
    copied_before = checkpoint.copied if checkpoint is not None else 0
    total = await source.count_after(position)
    sent = written = batches = 0
    if progress is not None:
        progress(CopyProgress(sent, total, batches))
    while read := await source.read_after(position, batch_size):
        batch = read if cutoff is None else [metric for metric in read if metric.timestamp >= cutoff]
        written += await destination.insert_counting(batch)  # the ids already there are skipped
        position = CopyPosition.of(read[-1])
        sent += len(batch)
        batches += 1
        if checkpoints is not None:
            await checkpoints.save_copy_checkpoint(
                CopyCheckpoint(source_name, position, copied_before + sent)
            )
        if progress is not None:
            progress(CopyProgress(sent, max(total, sent), batches))
        if len(read) < batch_size:
            break
    claims = await _copy_credit_claims(source, destination, batch_size, cutoff)
    return CopyResult(
        source=source_name,
        destination=destination_name,
        sent=written,
        copied=copied_before + sent,
        resumed_after=resumed_after,
        model_prices=len(model_prices),
        credit_prices=len(credit_prices),
        destination_only_prices=destination_only,
        pruned_before=cutoff,
        credit_claims=claims,
    )


async def _copy_credit_claims(
    source: Repository, destination: Repository, batch_size: int, cutoff: datetime | None
) -> int:
    """The source's credit claims (which call carries an action's credits, `POST /v1/traces`) from the
    cut-off on, those the destination lacks: after the copy, spans of an action sent again to the
    destination charge it nothing, as they would have at the source. How many were new."""
    new = 0
    after: tuple[str, str] | None = None
    while claims := await source.credit_claims_after(after, batch_size):
        new += await destination.copy_credit_claims(
            [claim for claim in claims if cutoff is None or claim.timestamp >= cutoff]
        )
        after = claims[-1].ancestor
        if len(claims) < batch_size:
            break
    return new


@dataclass(frozen=True, slots=True)
class Totals:
    """`aggregate()` of the source and of the destination after a copy (from the prune cut-off on,
    if the source was pruned), for the command to show side by side."""

    source: Aggregate
    destination: Aggregate

    @property
    def agree(self) -> bool:
        """Counts, tokens and credits equal; cost and revenue within 1e-9 USD."""
        a, b = self.source, self.destination
        return (
            (a.count, a.tokens_in, a.tokens_out, a.total_credits, a.unpriced_count)
            == (b.count, b.tokens_in, b.tokens_out, b.total_credits, b.unpriced_count)
            and abs(a.total_cost_usd - b.total_cost_usd) <= 1e-9
            and abs(a.total_revenue_usd - b.total_revenue_usd) <= 1e-9
        )


async def compare_totals(source_url: str, destination_url: str, since: datetime | None = None) -> Totals:
    """Both stores' totals since `since` (all time when None)."""
    totals = []
    for url in (source_url, destination_url):
        repository = await _open(url)
        try:
            totals.append(await repository.aggregate(MetricFilter(since=since)))
        finally:
            await repository.close()
    return Totals(*totals)
